"""Client rows (our client, the models floor client, the floor client) and codec rows.

Client rows run in this process against one floor server, so that only the
client differs: the server answers all three clients alike and as cheaply as
anything can. Codec rows time each encode and decode step of one call in
process: ours (strict) beside the models floor's plain cbor2 + pydantic and
the floor's cbor2 alone.
"""

from __future__ import annotations

import asyncio
import gc
import time
import timeit
from collections.abc import Callable, Coroutine
from typing import Any

import cbor2

from ..calling import plans as client_plan
from ..client import TimerClient
from ..models import EchoParams, EchoRequest, EchoResponse, VersionParams
from ..wire import api
from ..wire.codec import StrictDecoder
from ..wire.framing import RET_OK, encode_reply, encode_request
from . import models_floor as mf
from .floor import FloorClient
from .models_floor import ModelsFloorClient
from .processes import TIMER_NAME, version_string
from .rows import Row, Settings, progress
from .server_groups import ECHO_MESSAGE, Context

__all__ = ["GATHER_CALLS", "bench_codec", "client_rows"]

GATHER_CALLS = 10_000
CLIENT_SKIPPED = "client row"
TIMEOUT = 5.0
TIMED = {"ours, timeout=5": "timeout=5", "ours, client timeout=5": "client timeout=5"}
"""Our echo again with a deadline: per call, and as the client's default (the README's)."""

Call = Callable[[], Coroutine[Any, Any, object]]


async def client_rows(ctx: Context, address: str) -> None:
    """Add the client rows, measured against the server at ``address``."""
    ours = await TimerClient.connect(address)  # the default: no per-call timeout
    timed = await TimerClient.connect(address, timeout=TIMEOUT)
    models = await ModelsFloorClient.connect(address)
    floor = await FloorClient.connect(address)
    try:
        await _client_measure(ctx, (ours, timed), models, floor)
    finally:
        await ours.close()
        await timed.close()
        await models.close()
        await floor.close()


async def _sequential(call: Call, seconds: float) -> float:
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while not count or time.perf_counter() < deadline:  # one batch at least
        for _ in range(50):
            await call()
        count += 50
    return count / (time.perf_counter() - started)


async def _gathered(call: Call, seconds: float) -> float:
    """Gathers of ``GATHER_CALLS`` calls, one after another for about ``seconds``."""
    count = 0
    elapsed = 0.0
    while not count or elapsed < seconds:
        gc.collect()  # outside the clock: each gather starts with no garbage
        started = time.perf_counter()
        results = await asyncio.gather(*(call() for _ in range(GATHER_CALLS)))
        elapsed += time.perf_counter() - started
        assert len(results) == GATHER_CALLS
        count += GATHER_CALLS
    return count / elapsed


async def _client_measure(
    ctx: Context,
    clients: tuple[TimerClient, TimerClient],
    models: ModelsFloorClient,
    floor: FloorClient,
) -> None:
    ours, timed = clients
    echo_req = {"message": ECHO_MESSAGE, "delayMs": 0}

    async def ours_echo() -> object:
        return await ours.echo(EchoRequest(message=ECHO_MESSAGE, delay_ms=0))

    async def ours_echo_timeout() -> object:
        return await ours.echo(EchoRequest(message=ECHO_MESSAGE, delay_ms=0), timeout=TIMEOUT)

    async def ours_echo_default() -> object:
        return await timed.echo(EchoRequest(message=ECHO_MESSAGE, delay_ms=0))

    async def models_echo() -> object:
        params = EchoParams(req=EchoRequest(message=ECHO_MESSAGE, delay_ms=0))
        return await models.call_model(b"echo", params)

    async def floor_echo() -> object:
        return await floor.call(b"echo", {"req": dict(echo_req)})

    calls: dict[str, dict[str, Call]] = {
        "version": {
            "ours": ours.version,
            "models floor": lambda: models.call_model(b"version", VersionParams()),
            "floor": lambda: floor.call(b"version", {}),
        },
        "echo": {
            "ours": ours_echo,
            "models floor": models_echo,
            "floor": floor_echo,
            "ours, timeout=5": ours_echo_timeout,
            "ours, client timeout=5": ours_echo_default,
        },
    }
    for kind, measure in (("sequential", _sequential), ("gather", _gathered)):
        for method, by_role in calls.items():
            progress(f"{ctx.loop}: client {kind} {method}")
            for call in by_role.values():
                await _sequential(call, ctx.warmup)
            rates: dict[str, list[float]] = {role: [] for role in by_role}
            roles = list(by_role)
            for i in range(ctx.rounds):
                turn = i % len(roles)
                for role in roles[turn:] + roles[:turn]:
                    # Each run starts with no garbage left by the one before: a full
                    # collection of this process's heap would land in one run only.
                    gc.collect()
                    rates[role].append(await measure(by_role[role], ctx.duration))
            what = (
                f"await client.{method}()"
                if kind == "sequential"
                else f"gathers of {GATHER_CALLS:,} {method} calls"
            )
            median = {role: sorted(values)[len(values) // 2] for role, values in rates.items()}
            ctx.add(
                Row(
                    "client",
                    f"client {kind} {method}",
                    "calls/s",
                    median["ours"],
                    median["floor"],
                    ctx.loop,
                    "higher",
                    models_floor=median["models floor"],
                    against_skipped=ctx.skip_against(CLIENT_SKIPPED),
                    detail={"what": what},
                )
            )
            for role, label in TIMED.items():
                if role not in median:
                    continue
                ctx.add(
                    Row(
                        "client",
                        f"client {kind} {method}, {label}",
                        "calls/s",
                        median[role],
                        median["floor"],
                        ctx.loop,
                        "higher",
                        models_floor=median["models floor"],
                        against_skipped=ctx.skip_against(CLIENT_SKIPPED),
                        detail={
                            "what": f"{what}, {label}",
                            "untimed": median["ours"],
                            # Runs of one round are close in time: their ratio is steadier.
                            "vs_untimed": _median_ratio(rates[role], rates["ours"]),
                        },
                    )
                )
    replies = {await ours.version(), await models.call_model(b"version", VersionParams())}
    if replies != {await floor.call(b"version", {})}:
        raise RuntimeError(f"the clients disagree on the version reply: {replies}")


def _median_ratio(values: list[float], bases: list[float]) -> float:
    ratios = sorted(value / base for value, base in zip(values, bases, strict=True))
    return ratios[len(ratios) // 2]


def _per_call_us(fn: Callable[[], object], quick: bool) -> float:
    """Return the best time per call in µs, over a few batches of about equal length."""
    batch_seconds = 0.02 if quick else 0.1
    number = 1
    while True:  # calibrate: grow the batch until it lasts long enough to time
        elapsed = timeit.timeit(fn, number=number)
        if elapsed >= batch_seconds / 4:
            break
        number *= 4
    number = max(1, int(number * batch_seconds / elapsed))
    best = min(timeit.repeat(fn, number=number, repeat=3 if quick else 7))
    return best / number * 1e6


Step = tuple[str, Callable[[], object], Callable[[], object], Callable[[], object]]


def _frame(body: bytes) -> bytes:
    return encode_reply(RET_OK, body)


def _steps() -> list[Step]:
    """Each codec step of one call: ours, the models floor's, the floor's.

    The server steps are what the server runs: its reused decoder, and success
    frames (head and body) from the generated encoders; the floors frame too.
    The client steps are what the client runs: its plans (whole request frames,
    and reply decoding); the floors frame their requests too.
    """
    decoder = StrictDecoder()
    echo_plan, version_plan = client_plan.plan(api.ECHO), client_plan.plan(api.VERSION)
    echo_params = EchoParams(req=EchoRequest(message=ECHO_MESSAGE, delay_ms=0))
    echo_dict = {"req": {"message": ECHO_MESSAGE, "delayMs": 0}}
    echo_payload = api.ECHO.encode_params(echo_params)
    echo_result = EchoResponse(echoed=ECHO_MESSAGE, timer_name=TIMER_NAME)
    echo_result_dict = {"echoed": ECHO_MESSAGE, "timerName": TIMER_NAME}
    echo_body = api.ECHO.encode_result(echo_result)
    version = version_string()
    version_body = api.VERSION.encode_result(version)
    echo, version_proc = mf.PROCS[b"echo"], mf.PROCS[b"version"]
    same = (
        cbor2.dumps(echo_dict) == mf.dump(echo_params) == echo_payload
        and cbor2.dumps(echo_result_dict) == mf.dump(echo_result) == echo_body
        and echo_plan.frame(echo_params) == encode_request(b"echo", echo_payload)
    )
    if not same:
        raise RuntimeError("the floors' CBOR differs from ours")
    return [
        ("echo: client encode",
         lambda: echo_plan.frame(echo_params),
         lambda: encode_request(b"echo", mf.dump(echo_params)),
         lambda: encode_request(b"echo", cbor2.dumps(echo_dict))),
        ("echo: server decode",
         lambda: api.ECHO.decode_params(echo_payload, decoder=decoder),
         lambda: mf.load_params(echo, echo_payload),
         lambda: cbor2.loads(echo_payload)),
        ("echo: server encode",
         lambda: api.ECHO.encode_frame(echo_result),
         lambda: mf._encode(echo_result),
         lambda: _frame(cbor2.dumps(echo_result_dict))),
        ("echo: client decode",
         lambda: echo_plan.decode_result(echo_body),
         lambda: mf.validate_result(echo, cbor2.loads(echo_body)),
         lambda: cbor2.loads(echo_body)),
        ("version: client encode",
         lambda: version_plan.frame(VersionParams()),
         lambda: encode_request(b"version", mf.dump(VersionParams())),
         lambda: encode_request(b"version", cbor2.dumps({}))),
        ("version: server decode",
         lambda: api.VERSION.decode_params(b"\xa0", decoder=decoder),
         lambda: mf.load_params(version_proc, b"\xa0"),
         lambda: cbor2.loads(b"\xa0")),
        ("version: server encode",
         lambda: api.VERSION.encode_frame(version),
         lambda: mf._encode(version),
         lambda: _frame(cbor2.dumps(version))),
        ("version: client decode",
         lambda: version_plan.decode_result(version_body),
         lambda: mf.validate_result(version_proc, cbor2.loads(version_body)),
         lambda: cbor2.loads(version_body)),
    ]  # fmt: skip


def bench_codec(settings: Settings, rows: list[Row]) -> None:
    """Add the codec rows: µs per step of one call, in process ("decode" validates too)."""
    progress("codec")
    skipped = "in process" if settings.against else None
    totals: dict[str, list[float]] = {"echo": [0.0, 0.0, 0.0], "version": [0.0, 0.0, 0.0]}
    for name, *fns in _steps():
        ours, models, floor = (_per_call_us(fn, settings.quick) for fn in fns)
        total = totals[name.split(":")[0]]
        for i, value in enumerate((ours, models, floor)):
            total[i] += value
        rows.append(Row("codec", f"codec {name}", "µs", ours, floor, "none", "lower",
                        models_floor=models, against_skipped=skipped))  # fmt: skip
    for method, (ours, models, floor) in totals.items():
        rows.append(Row("codec", f"codec {method}: all four steps", "µs", ours, floor, "none",
                        "lower", models_floor=models, against_skipped=skipped))  # fmt: skip
