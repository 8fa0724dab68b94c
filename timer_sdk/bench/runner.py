"""Run every measurement beside the floor, print the table, write the JSON.

Server rows: the server under test runs in its own process (``timer-sdk
serve``, exactly as a user starts it), and the load comes from another
process (``loadgen.py``), so the client's cost does not hide the server's.
The floor server (``floor.py``) runs in the same way on the same event loop,
under the same load; every row is ``ours / floor``. Each measurement runs
``rounds`` times, ours and the floor taking turns, and reports the median.

Client rows run in this process against a floor server, once with our client
and once with the floor client. Codec rows time the encode, decode and
validation steps of one call, in process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import math
import os
import platform
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import cbor2

from .. import _eager, api
from .._version import __version__
from ..client import TimerClient
from ..framing import encode_request
from ..models import EchoParams, EchoRequest, EchoResponse, VersionParams
from ..timer import Timer
from . import floor as floor_module
from . import loadgen as loadgen_module
from .floor import FloorClient

__all__ = ["GROUPS", "REFERENCE", "Row", "Settings", "format_table", "run_benchmark"]

GROUPS = ("memory", "ping-pong", "pipelined", "workers", "client", "codec")

TIMER_NAME = "ipc-server"
ECHO_MESSAGE = "hello over the wire"
DEPTH = 32
GATHER_CALLS = 10_000
IDLE_CONNECTIONS = 1_000
WORKER_CONNECTIONS = 8

REFERENCE_NOTE = (
    "quoted from the compiled Nim reference's published numbers on a 2-core machine, "
    "not measured here"
)
REFERENCE: dict[str, float] = {
    "pipelined echo unix 4x32": 84_000,
    "pipelined version unix 4x32": 131_000,
    "ping-pong echo unix p50": 60,
    "ping-pong version unix p50": 60,
    "ping-pong echo tcp": 23,
    "ping-pong version tcp": 23,
}
"""The reference's published numbers, by row name (quoted, not measured)."""

LISTENING = re.compile(rb"listening on (\S+)")


@dataclass(frozen=True)
class Settings:
    """What to run, and for how long."""

    quick: bool = False
    loops: tuple[str, ...] = ()
    """Event loops to measure; empty means asyncio, and uvloop too when installed."""
    groups: tuple[str, ...] = GROUPS
    warmup: float | None = None
    duration: float | None = None
    rounds: int | None = None
    progress: bool = True
    """Say on stderr what is running."""

    def resolved(self) -> Settings:
        """Fill in what was left to the defaults of quick or normal mode."""
        loops = self.loops or available_loops()
        for name in loops:
            if name not in ("asyncio", "uvloop"):
                raise ValueError(f"unknown event loop {name!r}")
            if name == "uvloop" and "uvloop" not in available_loops():
                raise ValueError("--loop uvloop needs: pip install 'timer-sdk[fast]'")
        for group in self.groups:
            if group not in GROUPS:
                raise ValueError(f"unknown group {group!r}; choose from {', '.join(GROUPS)}")
        return Settings(
            quick=self.quick,
            loops=tuple(loops),
            groups=self.groups,
            warmup=self.warmup if self.warmup is not None else 0.05 if self.quick else 0.3,
            duration=self.duration if self.duration is not None else 0.25 if self.quick else 1.5,
            rounds=self.rounds if self.rounds is not None else 1 if self.quick else 3,
            progress=self.progress,
        )


@dataclass
class Row:
    """One line of the table: ours beside the floor."""

    group: str
    name: str
    unit: str
    ours: float
    floor: float
    loop: str
    better: str
    """``higher`` or ``lower``: which way a number is good."""
    ratio: float = 0.0
    """``ours / floor``."""
    target: str | None = None
    met: bool | None = None
    reference: float | None = None
    """The reference's published number for this row (quoted, not measured)."""
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ratio = self.ours / self.floor if self.floor else float("nan")
        if self.target is not None:
            bound = float(self.target.split()[-1])
            self.met = self.ratio >= bound if self.target.startswith(">=") else self.ratio <= bound


def available_loops() -> tuple[str, ...]:
    """Return the event loops this interpreter can run."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ("asyncio",)
    return ("asyncio", "uvloop")


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


_progress_started: list[float] = []  # when this run started, if it reports progress


def _progress(message: str) -> None:
    if _progress_started:
        elapsed = time.perf_counter() - _progress_started[0]
        print(f"bench: {elapsed:5.1f} s  {message}", file=sys.stderr, flush=True)


# --- processes ---------------------------------------------------------------


def _read_line(stream: IO[bytes], timeout: float) -> bytes:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no answer within {timeout} s")
    return stream.readline()


class _Server:
    """A server process that prints ``listening on ADDRESS`` once it is ready."""

    def __init__(self, label: str, argv: list[str]) -> None:
        self.label = label
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        try:
            line = _read_line(self.proc.stdout, 60)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{label}: did not start within 60 s") from None
        match = LISTENING.search(line)
        if match is None:
            self.stop()
            raise RuntimeError(f"{label}: did not start: {line!r}")
        self.address = match.group(1).decode()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        """Return the resident set size of the server process (Linux only)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match is not None
        return int(match.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def _ours(label: str, address: str, loop: str, workers: int = 1) -> _Server:
    argv = [sys.executable, "-m", "timer_sdk", "serve", address, "--loop", loop]
    argv += ["--name", TIMER_NAME]
    if workers > 1:
        argv += ["--workers", str(workers)]
    return _Server(label, argv)


def _floor(label: str, address: str, loop: str, *, reuse_port: bool = False) -> _Server:
    argv = [sys.executable, floor_module.__file__, address, "--loop", loop]
    argv += ["--version", _version_string(), "--name", TIMER_NAME]
    if reuse_port:
        argv.append("--reuse-port")
    return _Server(label, argv)


def _version_string() -> str:
    version = _eager.start(Timer().version())
    assert isinstance(version, str)
    return version


class _LoadGen:
    """The load generator process: one JSON job per line, one JSON answer."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, loadgen_module.__file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def run(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job).encode() + b"\n")
        self.proc.stdin.flush()
        try:
            line = _read_line(self.proc.stdout, timeout)
        except TimeoutError:
            self.proc.kill()
            raise RuntimeError(f"the load generator hung on {job['mode']}") from None
        if not line:
            raise RuntimeError("the load generator exited")
        result: dict[str, Any] = json.loads(line)
        if not result.pop("ok"):
            raise RuntimeError(f"load generator: {result['error']}")
        return result

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


# --- requests ----------------------------------------------------------------


def _request(method: str) -> bytes:
    if method == "version":
        return encode_request(b"version", b"\xa0")
    payload = cbor2.dumps({"req": {"message": ECHO_MESSAGE, "delayMs": 0}})
    return encode_request(b"echo", payload)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# --- server rows ---------------------------------------------------------------


@dataclass
class _Context:
    settings: Settings
    loop: str
    loadgen: _LoadGen
    loadgen_loop: str
    rows: list[Row]

    @property
    def warmup(self) -> float:
        assert self.settings.warmup is not None
        return self.settings.warmup

    @property
    def duration(self) -> float:
        assert self.settings.duration is not None
        return self.settings.duration

    @property
    def rounds(self) -> int:
        assert self.settings.rounds is not None
        return self.settings.rounds

    def timeout(self) -> float:
        return self.warmup + self.duration + 60

    def add(self, row: Row) -> None:
        self.rows.append(row)


def _paired(
    ctx: _Context, ours: _Server, floor: _Server, job: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run a load job ``rounds`` times against each server, taking turns."""
    ours_results: list[dict[str, Any]] = []
    floor_results: list[dict[str, Any]] = []
    for i in range(ctx.rounds):
        order = ((ours, ours_results), (floor, floor_results))
        for server, results in order if i % 2 == 0 else order[::-1]:
            job = {**job, "address": server.address, "loop": ctx.loadgen_loop}
            results.append(ctx.loadgen.run(job, ctx.timeout()))
    if ours_results[0]["reply"] != floor_results[0]["reply"]:
        raise RuntimeError(
            f"the floor's reply differs from ours: {floor_results[0]['reply']} "
            f"!= {ours_results[0]['reply']}"
        )
    return ours_results, floor_results


def _rate(results: list[dict[str, Any]]) -> float:
    return _median([r["calls"] / r["seconds"] for r in results])


def _bench_memory(ctx: _Context, ours: _Server, floor: _Server) -> None:
    request = _request("version").hex()
    sizes: dict[str, tuple[int, int]] = {}
    for server in (ours, floor):
        ctx.loadgen.run({"mode": "hold", "address": server.address, "request": request}, 60)
        ctx.loadgen.run({"mode": "release"}, 60)
        time.sleep(0.1)
        before = server.rss_kib()
        job = {
            "mode": "hold",
            "address": server.address,
            "request": request,
            "conns": IDLE_CONNECTIONS,
        }
        ctx.loadgen.run(job, 120)
        time.sleep(0.1)
        after = server.rss_kib()
        ctx.loadgen.run({"mode": "release"}, 60)
        sizes[server.label] = (before, after)
    (ours_before, ours_after), (floor_before, floor_after) = sizes.values()
    ctx.add(
        Row(
            "memory",
            f"server RSS, {IDLE_CONNECTIONS} idle connections",
            "MiB",
            ours_after / 1024,
            floor_after / 1024,
            ctx.loop,
            "lower",
            detail={"ours_before_kib": ours_before, "floor_before_kib": floor_before},
        )
    )
    ctx.add(
        Row(
            "memory",
            "server RSS per idle connection",
            "KiB",
            (ours_after - ours_before) / IDLE_CONNECTIONS,
            (floor_after - floor_before) / IDLE_CONNECTIONS,
            ctx.loop,
            "lower",
        )
    )


def _bench_pingpong(ctx: _Context, transport: str, ours: _Server, floor: _Server) -> None:
    for method in ("version", "echo"):
        _progress(f"{ctx.loop}: ping-pong {method} over {transport}")
        job = {
            "mode": "pingpong",
            "request": _request(method).hex(),
            "warmup": ctx.warmup,
            "duration": ctx.duration,
        }
        ours_r, floor_r = _paired(ctx, ours, floor, job)
        name = f"ping-pong {method} {transport}"
        ctx.add(
            Row(
                "ping-pong",
                name,
                "calls/s",
                _rate(ours_r),
                _rate(floor_r),
                ctx.loop,
                "higher",
                reference=REFERENCE.get(name),
            )
        )

        def pct(results: list[dict[str, Any]], p: int) -> float:
            return _median([r["percentiles_us"][p] for r in results])

        ours_dist = sorted(ours_r, key=lambda r: r["percentiles_us"][50])[len(ours_r) // 2]
        floor_dist = sorted(floor_r, key=lambda r: r["percentiles_us"][50])[len(floor_r) // 2]
        ctx.add(
            Row(
                "ping-pong",
                f"{name} p50",
                "µs",
                pct(ours_r, 50),
                pct(floor_r, 50),
                ctx.loop,
                "lower",
                target="<= 1.25",
                reference=REFERENCE.get(f"{name} p50"),
                detail={
                    "ours_percentiles_us": ours_dist["percentiles_us"],
                    "floor_percentiles_us": floor_dist["percentiles_us"],
                },
            )
        )
        ctx.add(
            Row(
                "ping-pong",
                f"{name} p99",
                "µs",
                pct(ours_r, 99),
                pct(floor_r, 99),
                ctx.loop,
                "lower",
            )
        )


def _bench_pipelined(
    ctx: _Context, transport: str, ours: _Server, floor: _Server, methods: Sequence[str]
) -> None:
    for method in methods:
        for conns in (1, 4):
            _progress(f"{ctx.loop}: pipelined {method} over {transport}, {conns}x{DEPTH}")
            job = {
                "mode": "pipeline",
                "request": _request(method).hex(),
                "conns": conns,
                "depth": DEPTH,
                "warmup": ctx.warmup,
                "duration": ctx.duration,
            }
            ours_r, floor_r = _paired(ctx, ours, floor, job)
            name = f"pipelined {method} {transport} {conns}x{DEPTH}"
            ctx.add(
                Row(
                    "pipelined",
                    name,
                    "calls/s",
                    _rate(ours_r),
                    _rate(floor_r),
                    ctx.loop,
                    "higher",
                    target=">= 0.8" if method == "echo" else None,
                    reference=REFERENCE.get(name),
                )
            )


def _bench_workers(ctx: _Context, one_ours: _Server, one_floor: _Server) -> None:
    job = {
        "mode": "pipeline",
        "request": _request("echo").hex(),
        "conns": WORKER_CONNECTIONS,
        "depth": DEPTH,
        "warmup": ctx.warmup,
        "duration": ctx.duration,
    }
    name = f"echo tcp {WORKER_CONNECTIONS}x{DEPTH}"
    _progress(f"{ctx.loop}: workers=1, pipelined {name}")
    ours_r, floor_r = _paired(ctx, one_ours, one_floor, job)
    one = (_rate(ours_r), _rate(floor_r))
    ctx.add(Row("workers", f"workers=1 {name}", "calls/s", *one, ctx.loop, "higher"))
    for n in (2, 4):
        _bench_n_workers(ctx, job, name, one, n)


def _bench_n_workers(
    ctx: _Context, job: dict[str, Any], name: str, one: tuple[float, float], n: int
) -> None:
    servers: list[_Server] = []
    try:
        servers.append(_ours(f"ours x{n}", "tcp:127.0.0.1:0", ctx.loop, workers=n))
        first = _floor(f"floor x{n}", "tcp:127.0.0.1:0", ctx.loop, reuse_port=True)
        servers.append(first)
        for i in range(2, n + 1):
            servers.append(_floor(f"floor x{n} ({i})", first.address, ctx.loop, reuse_port=True))
        _progress(f"{ctx.loop}: workers={n}, pipelined {name}")
        ours_r, floor_r = _paired(ctx, servers[0], first, job)
    finally:
        for server in servers:
            server.stop()
    rates = (_rate(ours_r), _rate(floor_r))
    ctx.add(
        Row(
            "workers",
            f"workers={n} {name}",
            "calls/s",
            *rates,
            ctx.loop,
            "higher",
            detail={
                "ours_scaling": rates[0] / one[0],
                "floor_scaling": rates[1] / one[1],
                "ours_per_connection": ours_r[-1]["per_connection"],
            },
        )
    )


# --- client rows -----------------------------------------------------------------


async def _client_rows(ctx: _Context, address: str) -> None:
    ours = await TimerClient.connect(address)  # the default: no per-call timeout
    floor = await FloorClient.connect(address)
    try:
        await _client_measure(ctx, ours, floor)
    finally:
        await ours.close()
        await floor.close()


async def _client_measure(ctx: _Context, ours: TimerClient, floor: FloorClient) -> None:
    echo_params = {"req": {"message": ECHO_MESSAGE, "delayMs": 0}}

    async def ours_version() -> object:
        return await ours.version()

    async def floor_version() -> object:
        return await floor.call(b"version", {})

    async def ours_echo() -> object:
        return await ours.echo(EchoRequest(message=ECHO_MESSAGE, delay_ms=0))

    async def floor_echo() -> object:
        return await floor.call(b"echo", {"req": dict(echo_params["req"])})

    calls: dict[str, tuple[Callable[[], Coroutine[Any, Any, object]], ...]] = {
        "version": (ours_version, floor_version),
        "echo": (ours_echo, floor_echo),
    }

    async def sequential(call: Callable[[], Coroutine[Any, Any, object]], seconds: float) -> float:
        count = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            for _ in range(50):
                await call()
            count += 50
        return count / (time.perf_counter() - started)

    async def gathered(call: Callable[[], Coroutine[Any, Any, object]], _seconds: float) -> float:
        started = time.perf_counter()
        results = await asyncio.gather(*(call() for _ in range(GATHER_CALLS)))
        elapsed = time.perf_counter() - started
        assert len(results) == GATHER_CALLS
        return GATHER_CALLS / elapsed

    for kind, measure in (("sequential", sequential), ("gather", gathered)):
        for method, (ours_call, floor_call) in calls.items():
            _progress(f"{ctx.loop}: client {kind} {method}")
            await sequential(ours_call, ctx.warmup)
            await sequential(floor_call, ctx.warmup)
            ours_rates: list[float] = []
            floor_rates: list[float] = []
            for i in range(ctx.rounds):
                pair = ((ours_call, ours_rates), (floor_call, floor_rates))
                for call, rates in pair if i % 2 == 0 else pair[::-1]:
                    rates.append(await measure(call, ctx.duration))
            what = (
                f"await client.{method}()"
                if kind == "sequential"
                else (f"gather of {GATHER_CALLS:,} {method} calls")
            )
            ctx.add(
                Row(
                    "client",
                    f"client {kind} {method}",
                    "calls/s",
                    _median(ours_rates),
                    _median(floor_rates),
                    ctx.loop,
                    "higher",
                    target=">= 0.7" if kind == "gather" else None,
                    detail={"what": what},
                )
            )
    if await ours.version() != await floor.call(b"version", {}):
        raise RuntimeError("the floor client and ours disagree on the version reply")


# --- codec rows --------------------------------------------------------------------


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


def _bench_codec(settings: Settings, rows: list[Row]) -> None:
    _progress("codec")
    quick = settings.quick
    echo_params = EchoParams(req=EchoRequest(message=ECHO_MESSAGE, delay_ms=0))
    echo_dict = {"req": {"message": ECHO_MESSAGE, "delayMs": 0}}
    echo_payload = api.ECHO.encode_params(echo_params)
    echo_result = EchoResponse(echoed=ECHO_MESSAGE, timer_name=TIMER_NAME)
    echo_result_dict = {"echoed": ECHO_MESSAGE, "timerName": TIMER_NAME}
    echo_body = api.ECHO.encode_result(echo_result)
    version = _version_string()
    version_body = api.VERSION.encode_result(version)
    if cbor2.dumps(echo_dict) != echo_payload or cbor2.dumps(echo_result_dict) != echo_body:
        raise RuntimeError("the floor's CBOR differs from ours")

    steps: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        (
            "echo: client encodes the request",
            lambda: api.ECHO.encode_params(echo_params),
            lambda: cbor2.dumps(echo_dict),
        ),
        (
            "echo: server decodes + validates the request",
            lambda: api.ECHO.decode_params(echo_payload),
            lambda: cbor2.loads(echo_payload),
        ),
        (
            "echo: server encodes the reply",
            lambda: api.ECHO.encode_result(echo_result),
            lambda: cbor2.dumps(echo_result_dict),
        ),
        (
            "echo: client decodes + validates the reply",
            lambda: api.ECHO.decode_result(echo_body),
            lambda: cbor2.loads(echo_body),
        ),
        (
            "version: client encodes the request",
            lambda: api.VERSION.encode_params(VersionParams()),
            lambda: cbor2.dumps({}),
        ),
        (
            "version: server decodes + validates the request",
            lambda: api.VERSION.decode_params(b"\xa0"),
            lambda: cbor2.loads(b"\xa0"),
        ),
        (
            "version: server encodes the reply",
            lambda: api.VERSION.encode_result(version),
            lambda: cbor2.dumps(version),
        ),
        (
            "version: client decodes + validates the reply",
            lambda: api.VERSION.decode_result(version_body),
            lambda: cbor2.loads(version_body),
        ),
    ]
    totals: dict[str, list[float]] = {"echo": [0.0, 0.0], "version": [0.0, 0.0]}
    for name, ours, floor in steps:
        ours_us = _per_call_us(ours, quick)
        floor_us = _per_call_us(floor, quick)
        method = name.split(":")[0]
        totals[method][0] += ours_us
        totals[method][1] += floor_us
        rows.append(Row("codec", f"codec {name}", "µs", ours_us, floor_us, "none", "lower"))
    for method, (ours_us, floor_us) in totals.items():
        rows.append(
            Row(
                "codec",
                f"codec {method}: all four steps of one call",
                "µs",
                ours_us,
                floor_us,
                "none",
                "lower",
            )
        )


# --- the run -----------------------------------------------------------------------


@contextlib.contextmanager
def _servers(*starters: Callable[[], _Server]) -> Iterator[list[_Server]]:
    started: list[_Server] = []
    try:
        for start in starters:
            started.append(start())
        yield started
    finally:
        for server in started:
            server.stop()


def _bench_loop(ctx: _Context, tmp: Path) -> None:
    loop = ctx.loop
    groups = ctx.settings.groups
    unix = f"unix:{tmp / f'ours-{loop}.sock'}"
    floor_unix = f"unix:{tmp / f'floor-{loop}.sock'}"
    with _servers(
        lambda: _ours("ours unix", unix, loop),
        lambda: _floor("floor unix", floor_unix, loop),
        lambda: _ours("ours tcp", "tcp:127.0.0.1:0", loop),
        lambda: _floor("floor tcp", "tcp:127.0.0.1:0", loop),
    ) as (ours_unix, floor_unix_server, ours_tcp, floor_tcp):
        if "memory" in groups and sys.platform == "linux":
            _progress(f"{loop}: server memory with {IDLE_CONNECTIONS} idle connections")
            _bench_memory(ctx, ours_unix, floor_unix_server)
        if "ping-pong" in groups:
            _bench_pingpong(ctx, "unix", ours_unix, floor_unix_server)
            _bench_pingpong(ctx, "tcp", ours_tcp, floor_tcp)
        if "pipelined" in groups:
            _bench_pipelined(ctx, "unix", ours_unix, floor_unix_server, ("echo", "version"))
            _bench_pipelined(ctx, "tcp", ours_tcp, floor_tcp, ("echo",))
        if "workers" in groups:
            _bench_workers(ctx, ours_tcp, floor_tcp)
        if "client" in groups:
            _run_on_new_loop(loop, lambda: _client_rows(ctx, floor_unix_server.address))


def _run_on_new_loop(loop: str, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine on a new loop of kind ``loop``, in a thread if one is running here."""

    def run() -> None:
        with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
            runner.run(make())

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        run()
        return
    # Inside Jupyter, say, whose kernel runs its own loop in this thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(run).result()


def run_benchmark(settings: Settings | None = None) -> dict[str, Any]:
    """Run the benchmark and return its results as the JSON document."""
    settings = (settings or Settings()).resolved()
    _progress_started[:] = [time.perf_counter()] if settings.progress else []
    loadgen_loop = available_loops()[-1]
    rows: list[Row] = []
    started = time.perf_counter()
    loadgen = _LoadGen()
    try:
        with tempfile.TemporaryDirectory(prefix="timer-sdk-bench-") as tmp:
            for loop in settings.loops:
                ctx = _Context(settings, loop, loadgen, loadgen_loop, rows)
                _bench_loop(ctx, Path(tmp))
    finally:
        loadgen.close()
    if "codec" in settings.groups:
        _bench_codec(settings, rows)
    return {
        "schema": 1,
        "timer_sdk": __version__,
        "quick": settings.quick,
        "settings": {
            "loops": list(settings.loops),
            "groups": list(settings.groups),
            "warmup_s": settings.warmup,
            "duration_s": settings.duration,
            "rounds": settings.rounds,
            "depth": DEPTH,
            "loadgen_loop": loadgen_loop,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "reference_note": REFERENCE_NOTE,
        "seconds": time.perf_counter() - started,
        "rows": [asdict(row) for row in rows],
    }


# --- the table ---------------------------------------------------------------------


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if math.isnan(value):
        return "n/a"
    if unit == "calls/s":
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def format_table(document: dict[str, Any]) -> str:
    """Return the rows of a result document as a Markdown table."""
    header = (
        "loop",
        "measurement",
        "unit",
        "ours",
        "floor",
        "ours/floor",
        "better",
        "target",
        "reference (quoted)",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in document["rows"]:
        target = ""
        if row["target"]:
            target = f"{row['target']} {'met' if row['met'] else 'MISSED'}"
        cells = (
            row["loop"],
            row["name"],
            row["unit"],
            _number(row["ours"], row["unit"]),
            _number(row["floor"], row["unit"]),
            f"{row['ratio']:.2f}",
            row["better"],
            target,
            _number(row["reference"], row["unit"]),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
