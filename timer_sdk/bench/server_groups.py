"""Server rows: memory, ping-pong, pipelined (with server CPU), workers.

Every server under test runs in its own process and takes the same load from
the load generator: ours, the models floor, the floor and, with
``--against``, someone else's server. Each job runs ``rounds`` times, the
servers taking turns in a rotating order, and each row keeps the median.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

from ..wire.framing import encode_request
from .processes import Foreign, LoadGen, ServerProcess, UnderTest, servers, start
from .rows import WORKER_COUNTS, Row, Settings, progress

__all__ = ["DEPTH", "Context", "ServerSet", "bench_server_groups"]

ECHO_MESSAGE = "hello over the wire"
DEPTH = 32
IDLE_CONNECTIONS = 1_000
WORKER_CONNECTIONS = 8
KINDS = ("ours", "models floor", "floor")

ServerSet = dict[str, UnderTest]
"""The servers of one row by role: ``ours``, ``models floor``, ``floor``, maybe ``against``."""


@dataclass
class Context:
    """One event loop's share of a run."""

    settings: Settings
    loop: str
    loadgen: LoadGen
    loadgen_loop: str
    rows: list[Row]
    against: Foreign | None = None

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

    def skip_against(self, reason: str | None) -> str | None:
        """``reason``, if there is an ``--against`` server to skip; else ``None``."""
        return reason if self.against is not None else None

    def add(self, row: Row) -> None:
        self.rows.append(row)


def request(method: str) -> bytes:
    """The request frame the load generator repeats for ``method``."""
    if method == "version":
        return encode_request(b"version", b"\xa0")
    payload = cbor2.dumps({"req": {"message": ECHO_MESSAGE, "delayMs": 0}})
    return encode_request(b"echo", payload)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


class _Results:
    """The results of one job, by server role; ``failed`` says why ``against`` has none."""

    def __init__(self, by_role: dict[str, list[dict[str, Any]]], failed: str | None) -> None:
        self.by_role = by_role
        self.failed = failed

    def value(self, role: str, of: Any) -> float | None:
        """The median over rounds of ``of(result)``; ``None`` if ``role`` did not run."""
        results = self.by_role.get(role)
        if not results:
            return None
        values = [of(r) for r in results]
        if any(v is None for v in values):
            return None
        return _median(values)


def _measure(
    ctx: Context, targets: ServerSet, job: dict[str, Any], *, cpu: bool = False
) -> _Results:
    """Run ``job`` ``rounds`` times against each server, in a rotating order."""
    roles = list(targets)
    by_role: dict[str, list[dict[str, Any]]] = {role: [] for role in roles}
    failed: str | None = None
    for i in range(ctx.rounds):
        for role in roles[i % len(roles) :] + roles[: i % len(roles)]:
            if role == "against" and failed:
                continue
            server = targets[role]
            run = {**job, "address": server.address, "loop": ctx.loadgen_loop}
            if cpu and server.pid is not None:
                run["cpu_pid"] = server.pid
            try:
                by_role[role].append(ctx.loadgen.run(run, ctx.timeout()))
            except RuntimeError as exc:
                if role != "against":
                    raise
                failed = f"failed: {exc}"[:200]
    replies = {role: by_role[role][0]["reply"] for role in KINDS if by_role.get(role)}
    if len(set(replies.values())) > 1:
        raise RuntimeError(f"the servers under test answer different bytes: {replies}")
    if failed:
        by_role["against"] = []
    return _Results(by_role, failed)


def _row(
    ctx: Context,
    what: tuple[str, str, str, str],
    results: _Results,
    of: Any,
    *,
    skipped: str | None = None,
    detail: dict[str, Any] | None = None,
) -> Row:
    """A row of ``what`` (group, name, unit, better) from the medians of ``of(result)``."""
    group, name, unit, better = what
    ours = results.value("ours", of)
    floor = results.value("floor", of)
    assert ours is not None
    assert floor is not None
    against = results.value("against", of)
    if ctx.against is not None and against is None and skipped is None:
        skipped = results.failed or "no measurement"
    return Row(
        group,
        name,
        unit,
        ours,
        floor,
        ctx.loop,
        better,
        models_floor=results.value("models floor", of),
        against=against,
        against_skipped=ctx.skip_against(skipped),
        detail=detail or {},
    )


def _with_against(ctx: Context, targets: ServerSet, transport: str) -> tuple[ServerSet, str | None]:
    """Add the ``--against`` server when it speaks ``transport``; else say why not."""
    if ctx.against is None:
        return targets, None
    scheme = ctx.against.address.partition(":")[0]
    if scheme != transport:
        return targets, f"{scheme} address"
    return {**targets, "against": ctx.against}, None


def _rate(result: dict[str, Any]) -> float:
    return float(result["calls"] / result["seconds"])


def _cpu_us(result: dict[str, Any]) -> float | None:
    cpu = result.get("server_cpu_seconds")
    if cpu is None:
        return None
    # A window too short for a busy machine may finish no call: no number, not a crash.
    return float(cpu / result["calls"] * 1e6) if result["calls"] else math.nan


def _bench_memory(ctx: Context, targets: ServerSet) -> None:
    frame = request("version").hex()
    sizes: dict[str, tuple[int, int]] = {}
    for role in KINDS:
        server = targets[role]
        assert isinstance(server, ServerProcess)
        ctx.loadgen.run({"mode": "hold", "address": server.address, "request": frame}, 60)
        ctx.loadgen.run({"mode": "release"}, 60)
        time.sleep(0.1)  # let the server drop the closed connections
        before = server.rss_kib()
        job = {"mode": "hold", "address": server.address, "request": frame}
        ctx.loadgen.run({**job, "conns": IDLE_CONNECTIONS}, 120)
        time.sleep(0.1)
        after = server.rss_kib()
        ctx.loadgen.run({"mode": "release"}, 60)
        sizes[role] = (before, after)
    skipped = ctx.skip_against("not our process")
    ctx.add(
        Row(
            "memory",
            f"server RSS, {IDLE_CONNECTIONS} idle connections",
            "MiB",
            sizes["ours"][1] / 1024,
            sizes["floor"][1] / 1024,
            ctx.loop,
            "lower",
            models_floor=sizes["models floor"][1] / 1024,
            against_skipped=skipped,
            detail={f"{role.replace(' ', '_')}_before_kib": sizes[role][0] for role in KINDS},
        )
    )
    per_conn = {
        role: (after - before) / IDLE_CONNECTIONS for role, (before, after) in sizes.items()
    }
    ctx.add(
        Row(
            "memory",
            "server RSS per idle connection",
            "KiB",
            per_conn["ours"],
            per_conn["floor"],
            ctx.loop,
            "lower",
            models_floor=per_conn["models floor"],
            against_skipped=skipped,
        )
    )


def _middle(results: _Results, role: str) -> list[float] | None:
    """The latency percentiles of the round with the median p50."""
    runs = results.by_role.get(role)
    if not runs:
        return None
    runs = sorted(runs, key=lambda r: r["percentiles_us"][50])
    return list(runs[len(runs) // 2]["percentiles_us"])


def _bench_pingpong(ctx: Context, transport: str, targets: ServerSet) -> None:
    targets, skipped = _with_against(ctx, targets, transport)
    for method in ("version", "echo"):
        progress(f"{ctx.loop}: ping-pong {method} over {transport}")
        job = {
            "mode": "pingpong",
            "request": request(method).hex(),
            "warmup": ctx.warmup,
            "duration": ctx.duration,
        }
        results = _measure(ctx, targets, job)
        name = f"ping-pong {method} {transport}"
        ctx.add(
            _row(ctx, ("ping-pong", name, "calls/s", "higher"), results, _rate, skipped=skipped)
        )

        detail = {f"{role.replace(' ', '_')}_percentiles_us": _middle(results, role)
                  for role in targets}  # fmt: skip
        for p in (50, 99):
            ctx.add(
                _row(
                    ctx,
                    ("ping-pong", f"{name} p{p}", "µs", "lower"),
                    results,
                    lambda r, p=p: r["percentiles_us"][p],
                    skipped=skipped,
                    detail=detail if p == 50 else None,
                )
            )


def _bench_pipelined(
    ctx: Context, transport: str, targets: ServerSet, methods: Sequence[str]
) -> None:
    targets, skipped = _with_against(ctx, targets, transport)
    for method in methods:
        for conns in (1, 4):
            progress(f"{ctx.loop}: pipelined {method} over {transport}, {conns}x{DEPTH}")
            job = {
                "mode": "pipeline",
                "request": request(method).hex(),
                "conns": conns,
                "depth": DEPTH,
                "warmup": ctx.warmup,
                "duration": ctx.duration,
            }
            results = _measure(ctx, targets, job, cpu=True)
            name = f"pipelined {method} {transport} {conns}x{DEPTH}"
            cpu = {f"{role.replace(' ', '_')}_cpu_us_per_call": results.value(role, _cpu_us)
                   for role in KINDS}  # fmt: skip
            row = _row(ctx, ("pipelined", name, "calls/s", "higher"), results, _rate,
                       skipped=skipped, detail=cpu)  # fmt: skip
            ctx.add(row)
            if name == f"pipelined echo unix 4x{DEPTH}" and all(cpu.values()):
                _add_cpu_row(ctx, name, results, skipped)


def _add_cpu_row(ctx: Context, name: str, results: _Results, skipped: str | None) -> None:
    ctx.add(
        _row(
            ctx,
            ("pipelined", f"server CPU per {name}", "µs", "lower"),
            results,
            _cpu_us,
            skipped=skipped or "not our process",
            detail={"what": "server-process CPU time in the measured window / calls answered"},
        )
    )


def _bench_workers(ctx: Context, one: ServerSet) -> None:
    job = {
        "mode": "pipeline",
        "request": request("echo").hex(),
        "conns": WORKER_CONNECTIONS,
        "depth": DEPTH,
        "warmup": ctx.warmup,
        "duration": ctx.duration,
    }
    name = f"echo tcp {WORKER_CONNECTIONS}x{DEPTH}"
    skipped = "not ours to start"
    progress(f"{ctx.loop}: workers=1, pipelined {name}")
    results_one = _measure(ctx, {role: one[role] for role in KINDS}, job)
    ctx.add(_row(ctx, ("workers", f"workers=1 {name}", "calls/s", "higher"), results_one, _rate,
                 skipped=skipped))  # fmt: skip
    for n in WORKER_COUNTS[1:]:
        _bench_n_workers(ctx, job, name, results_one, n)


def _bench_n_workers(
    ctx: Context, job: dict[str, Any], name: str, results_one: Any, n: int
) -> None:
    tcp = "tcp:127.0.0.1:0"

    def floors(kind: str) -> list[ServerProcess]:
        first = start(kind, tcp, ctx.loop, workers=n)
        rest: list[ServerProcess] = []
        try:
            rest.extend(start(kind, first.address, ctx.loop, workers=n) for _ in range(n - 1))
        except BaseException:
            for server in (first, *rest):
                server.stop()
            raise
        return [first, *rest]

    with servers(
        lambda: [start("ours", tcp, ctx.loop, workers=n)],
        lambda: floors("models floor"),
        lambda: floors("floor"),
    ) as started:
        ours, models, floor = started[0], started[1], started[1 + n]
        progress(f"{ctx.loop}: workers={n}, pipelined {name}")
        results = _measure(ctx, {"ours": ours, "models floor": models, "floor": floor}, job)
    rates_one = {role: results_one.value(role, _rate) or 0.0 for role in KINDS}
    detail: dict[str, Any] = {
        f"{role.replace(' ', '_')}_scaling": (results.value(role, _rate) or 0.0) / rates_one[role]
        for role in KINDS
    }
    detail["ours_per_connection"] = results.by_role["ours"][-1]["per_connection"]
    ctx.add(_row(ctx, ("workers", f"workers={n} {name}", "calls/s", "higher"), results, _rate,
                 skipped="not ours to start", detail=detail))  # fmt: skip


def bench_server_groups(ctx: Context, unix: ServerSet, tcp: ServerSet) -> None:
    """Add the rows of every server group the settings ask for."""
    groups = ctx.settings.groups
    if "memory" in groups and sys.platform == "linux":
        progress(f"{ctx.loop}: server memory with {IDLE_CONNECTIONS} idle connections")
        _bench_memory(ctx, unix)
    if "ping-pong" in groups:
        _bench_pingpong(ctx, "unix", unix)
        _bench_pingpong(ctx, "tcp", tcp)
    if "pipelined" in groups:
        _bench_pipelined(ctx, "unix", unix, ("echo", "version"))
        _bench_pipelined(ctx, "tcp", tcp, ("echo",))
    if "workers" in groups:
        _bench_workers(ctx, tcp)
