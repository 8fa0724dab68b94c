"""What serving metrics costs: one server with ``--metrics`` beside one without.

``python -m timer_sdk.bench.metrics_cost`` starts both (``serve unix:...
--loop asyncio``, one with ``--metrics tcp:127.0.0.1:0``, which times every
call), then runs the same load on each in alternation, round after round,
so that both see the same machine; it prints the medians and their ratio.
The load is the benchmark's own load generator, in this process. Last, it
scrapes the second server's ``/metrics`` and prints the server CPU per
scrape: the time a scrape holds the server's event loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from .loadgen import cpu_seconds, run_job
from .processes import ServerProcess
from .server_groups import request

__all__ = ["main"]

_LOADS: dict[str, dict[str, Any]] = {
    "pipelined echo 4x32, calls/s": {"mode": "pipeline", "method": "echo", "conns": 4, "depth": 32},
    "pipelined version 4x32, calls/s": {
        "mode": "pipeline", "method": "version", "conns": 4, "depth": 32,
    },
    "ping-pong echo, calls/s": {"mode": "pingpong", "method": "echo"},
}  # fmt: skip


def _measure(server: ServerProcess, load: dict[str, Any], duration: float) -> tuple[float, float]:
    """Calls per second, and server CPU µs per call (0 for ping-pong)."""
    job = {k: v for k, v in load.items() if k != "method"}
    job |= {"address": server.address, "request": request(load["method"]).hex()}
    job |= {"warmup": 0.1, "duration": duration, "cpu_pid": server.pid}
    result = run_job(job)
    rate = result["calls"] / result["seconds"]
    cpu = result.get("server_cpu_seconds")
    return rate, (cpu * 1e6 / result["calls"] if cpu else 0.0)


def _scrape_cpu_ms(server: ServerProcess, url: str, scrapes: int) -> float:
    """Server CPU per scrape of ``url``, in ms: accept, parse, build the exposition, reply."""
    assert server.pid is not None
    before = cpu_seconds(server.pid)
    for _ in range(scrapes):
        with urllib.request.urlopen(url, timeout=30) as reply:
            reply.read()
    after = cpu_seconds(server.pid)
    return (after - before) * 1e3 / scrapes if before is not None and after is not None else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m timer_sdk.bench.metrics_cost")
    parser.add_argument("--rounds", type=int, default=9, help="alternations (default 9)")
    parser.add_argument("--duration", type=float, default=0.3, help="seconds per run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = [sys.executable, "-m", "timer_sdk", "serve", "--loop", "asyncio"]
        off = ServerProcess("off", [*base, f"unix:{Path(tmp, 'off.sock')}"])
        on = ServerProcess("on", [*base, f"unix:{Path(tmp, 'on.sock')}",
                                  "--metrics", "tcp:127.0.0.1:0"])  # fmt: skip
        assert on.proc.stdout is not None
        url = on.proc.stdout.readline().decode().rsplit(" ", 1)[-1].strip()  # metrics at URL
        try:
            print(f"{'load':34} {'metrics off':>12} {'metrics on':>12} {'on/off':>7}")
            for name, load in _LOADS.items():
                seen: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
                for i in range(args.rounds):
                    pair = (off, on) if i % 2 == 0 else (on, off)
                    for server in pair:
                        seen[server.label].append(_measure(server, load, args.duration))
                rate = {k: statistics.median(r for r, _ in v) for k, v in seen.items()}
                print(f"{name:34} {rate['off']:12,.0f} {rate['on']:12,.0f} "
                      f"{rate['on'] / rate['off']:7.3f}")  # fmt: skip
                if load["mode"] == "pipeline":
                    cpu = {k: statistics.median(c for _, c in v) for k, v in seen.items()}
                    print(f"{'  server CPU per call, µs':34} {cpu['off']:12.2f} {cpu['on']:12.2f} "
                          f"{cpu['on'] / cpu['off']:7.3f}")  # fmt: skip
            # After the loads: every method is timed, so the exposition is at its fullest.
            scrape = _scrape_cpu_ms(on, url, scrapes=10 * args.rounds)
            print(f"{'scrape /metrics, server CPU ms':34} {'-':>12} {scrape:12.2f}")
        finally:
            off.stop()
            on.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
