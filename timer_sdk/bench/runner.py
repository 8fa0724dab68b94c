"""Run every measurement beside the two floors and return the JSON document.

Server rows (``server_groups.py``): ours (``timer-sdk serve``, exactly as a
user starts it), the models floor and the floor each run in their own
process, on the event loop being measured, and take the same load from the
load generator process. With ``--against ADDRESS`` a server someone else
started takes the same load too. Client and codec rows
(``client_groups.py``) run in this process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import platform
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .._version import __version__
from .client_groups import bench_codec, client_rows
from .processes import Foreign, LoadGen, servers, start
from .rows import (
    GROUPS,
    Row,
    Settings,
    available_loops,
    estimate_seconds,
    progress,
    start_progress,
)
from .server_groups import DEPTH, Context, bench_server_groups

__all__ = ["GROUPS", "Row", "Settings", "available_loops", "run_benchmark"]

SCHEMA = 1
"""Bumped only when a field changes meaning; new fields are added without a bump."""


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def _bench_loop(ctx: Context, tmp: Path) -> None:
    loop = ctx.loop
    tcp = "tcp:127.0.0.1:0"
    with servers(
        lambda: [start("ours", f"unix:{tmp / f'ours-{loop}.sock'}", loop)],
        lambda: [start("models floor", f"unix:{tmp / f'models-{loop}.sock'}", loop)],
        lambda: [start("floor", f"unix:{tmp / f'floor-{loop}.sock'}", loop)],
        lambda: [start("ours", tcp, loop)],
        lambda: [start("models floor", tcp, loop)],
        lambda: [start("floor", tcp, loop)],
    ) as started:
        kinds = ("ours", "models floor", "floor")
        unix = dict(zip(kinds, started[:3], strict=True))
        tcp_set = dict(zip(kinds, started[3:], strict=True))
        bench_server_groups(ctx, dict(unix), dict(tcp_set))
        if "client" in ctx.settings.groups:
            _run_on_new_loop(loop, lambda: client_rows(ctx, unix["floor"].address))


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


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def run_benchmark(settings: Settings | None = None) -> dict[str, Any]:
    """Run the benchmark and return its results as the JSON document."""
    settings = (settings or Settings()).resolved()
    start_progress(settings.progress)
    progress(
        f"this run takes about {estimate_seconds(settings):.0f} s: "
        f"{', '.join(settings.groups)} on {' and '.join(settings.loops)}"
    )
    loadgen_loop = available_loops()[-1]
    against = Foreign(settings.against) if settings.against else None
    if against is not None:
        against.check()
    rows: list[Row] = []
    loadavg = _loadavg()
    started = time.perf_counter()
    loadgen = LoadGen()
    try:
        with tempfile.TemporaryDirectory(prefix="timer-sdk-bench-") as tmp:
            for loop in settings.loops:
                ctx = Context(settings, loop, loadgen, loadgen_loop, rows, against)
                _bench_loop(ctx, Path(tmp))
    finally:
        loadgen.close()
    if "codec" in settings.groups:
        bench_codec(settings, rows)
    return {
        "schema": SCHEMA,
        "timer_sdk": __version__,
        "quick": settings.quick,
        "against": settings.against,
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
            "loadavg": loadavg,
            "loadavg_end": _loadavg(),
        },
        "seconds": time.perf_counter() - started,
        "rows": [asdict(row) for row in rows],
    }
