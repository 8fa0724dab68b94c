"""A bounded load and soak run: many connections, every method, every reply checked.

``python -m timer_sdk.tools.soak --seconds 60 --connections 200`` starts a server
process (``python -m timer_sdk serve``) on ``127.0.0.1`` or a Unix socket in a
temporary directory, runs the load against it, and prints calls per second,
error counts, mismatches (must be 0) and the server's resident memory at the
start and the end. It exits non-zero if any reply was wrong or any call failed
unexpectedly. ``tests/test_load.py`` runs the same load, briefly.

Each connection makes batches of concurrent calls that mix every method with
calls that must fail (empty job name, no attempts, unknown method, unknown
field), calls that time out and calls that are cancelled. Every request
carries something unique (a message, a note, a job name, a field name), so a
reply delivered to the wrong caller is a mismatch, never a coincidence. This is
the check that catches the desync of redis-py's CVE-2023-28858/28859.

The calls and their checks are :mod:`timer_sdk.tools.call_mix`; the server
process is :mod:`timer_sdk.tools.server_process`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import ssl as _ssl
import sys
import tempfile
import time
from collections.abc import Sequence

from ..client import TimerClient
from ..errors import TimerError
from .call_mix import LoadReport, check, make_call, perform
from .server_process import ServerProcess

__all__ = ["LoadReport", "main", "run_load"]


async def _connection(
    index: int,
    address: str,
    report: LoadReport,
    *,
    deadline: float,
    calls: int | None,
    seed: int,
    timer_name: str,
    ssl: _ssl.SSLContext | None,
) -> None:
    rng = random.Random(seed * 1_000_003 + index)
    try:
        client = await TimerClient.connect(address, timeout=60, connect_timeout=30, ssl=ssl)
    except TimerError as exc:
        report.connect_errors += 1
        report.note(f"connection {index}: {exc!r}")
        return
    made = 0
    async with client:
        while (calls is None or made < calls) and time.monotonic() < deadline:
            size = rng.randint(1, 8) if calls is None else min(rng.randint(1, 8), calls - made)
            batch = [make_call(rng, f"{index}.{made + i}.", timer_name) for i in range(size)]
            made += size
            outcomes = await asyncio.gather(*(perform(client, call) for call in batch))
            for i, (call, outcome) in enumerate(zip(batch, outcomes, strict=True)):
                check(call, outcome, report, f"connection {index} call {made - size + i}")
            if client.closed:
                report.unexpected += 1
                report.note(f"connection {index}: the client broke: {client!r}")
                return


async def run_load(
    address: str,
    *,
    connections: int,
    seconds: float | None = None,
    calls: int | None = None,
    seed: int = 0,
    timer_name: str = "ipc-server",
    ssl: _ssl.SSLContext | None = None,
) -> LoadReport:
    """Run the load on ``connections`` connections for ``seconds`` or ``calls`` each.

    Returns a :class:`LoadReport`; it raises only if the run itself is cancelled.
    """
    if seconds is None and calls is None:
        raise ValueError("give seconds, calls, or both")
    report = LoadReport(connections=connections)
    started = time.monotonic()
    deadline = started + seconds if seconds is not None else float("inf")
    await asyncio.gather(
        *(
            _connection(
                i,
                address,
                report,
                deadline=deadline,
                calls=calls,
                seed=seed,
                timer_name=timer_name,
                ssl=ssl,
            )
            for i in range(connections)
        )
    )
    report.seconds = time.monotonic() - started
    return report


def _check_target(address: str) -> None:
    if not (address.startswith("tcp:127.0.0.1:") or address.startswith("unix:")):
        raise SystemExit(f"soak: refusing to load {address}: only 127.0.0.1 and unix: sockets")


async def _soak(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        if args.transport == "unix":
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="timer-soak-"))
            where = f"unix:{directory}/soak.sock"
        else:
            where = "tcp:127.0.0.1:0"
        serve_args = ["--max-connections", str(max(1024, args.connections + 16))]
        async with ServerProcess(where, *serve_args) as server:
            _check_target(server.address)
            # Warm up: the first calls import and allocate what every later call reuses.
            await run_load(server.address, connections=min(args.connections, 20), calls=50)
            rss_start, _ = server.rss_kib()
            print(
                f"soak: {args.connections} connections for {args.seconds:g} s against "
                f"{server.address} (server pid {server.pid}), seed {args.seed}",
                flush=True,
            )
            report = await run_load(
                server.address,
                connections=args.connections,
                seconds=args.seconds,
                seed=args.seed,
            )
            rss_end, rss_peak = server.rss_kib()
            print(report.summary())
            print(
                f"server RSS: start {rss_start / 1024:.1f} MiB, end {rss_end / 1024:.1f} MiB, "
                f"peak {rss_peak / 1024:.1f} MiB"
            )
        print(f"server exited with status {server.returncode}")
    return 0 if report.clean and server.returncode == 0 else 1


DESCRIPTION = """\
A bounded load and soak run: many connections, every method, every reply checked.

Starts a server process on 127.0.0.1 (or on a Unix socket in a temporary
directory), runs the load against it, and prints calls per second, error counts,
mismatches (must be 0) and the server's resident memory at the start and the end.
Each connection mixes every method with calls that must fail, time out or be
cancelled; every request carries something unique, so a reply delivered to the
wrong caller counts as a mismatch. Exits non-zero if any reply was wrong or any
call failed unexpectedly.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak from the command line; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m timer_sdk.tools.soak",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run the load")
    parser.add_argument("--connections", type=int, default=200, help="concurrent connections")
    parser.add_argument("--transport", choices=("tcp", "unix"), default="tcp")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.connections <= 5000 or not 0 < args.seconds <= 24 * 3600:
        parser.error("--connections must be 1..5000 and --seconds 0..86400")
    return asyncio.run(_soak(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
