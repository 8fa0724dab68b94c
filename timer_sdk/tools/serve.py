"""``timer-sdk serve`` in one process: the server on the chosen event loop, until a signal.

A worker of ``serve --workers`` runs the same :func:`serve`, with a pipe to its
parent in place of the terminal (:mod:`timer_sdk.tools.workers`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing.connection
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from .._extras import install_hint
from .._version import __version__
from ..bus import Unshared, redact, subject_for
from ..logs import configure as configure_logging
from ..models import TimerConfig
from ..server import Server
from ..serving.serve_gc import freeze_startup_heap
from ..timer import Timer
from .cli_help import limits_from_args
from .observe import start_metrics
from .tls_flags import server_ssl

_shutdown_log = logging.getLogger("timer_sdk.shutdown")  # where serve_until_signal reports


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit(
                f"timer-sdk: --loop uvloop needs the fast extra: {install_hint('fast')}"
            ) from None
        return None
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, int], loop: str = "auto") -> int:
    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        return runner.run(coro)


async def serve(
    args: argparse.Namespace,
    *,
    reuse_port: bool = False,
    ready: multiprocessing.connection.Connection | None = None,
) -> int:
    configure_logging(args.log_format, args.log_level)
    limits = limits_from_args(args)
    timer = Timer(TimerConfig(name=args.name))
    bus: str | Unshared | None = args.events_url
    if getattr(args, "unshared_events", None):
        bus = Unshared(args.unshared_events)
    # A bus that does not answer may take its whole connect timeout: say why we wait.
    url = args.events_url if ready is None else None  # a worker's parent speaks for it
    waiting = asyncio.get_running_loop().call_later(1.0, say_connecting, url)
    try:
        server = await timer.serve(
            args.address,
            limits=limits,
            ssl=server_ssl(args),
            unix_mode=int(args.unix_mode, 8),
            reuse_port=reuse_port,
            bus=bus,
            stats=args.stats,  # None: the default, on for unix: only
        )
    finally:
        waiting.cancel()
    try:
        metrics = await start_metrics(server, args, worker=ready is not None)
    except BaseException:
        await server.close(timeout=0)
        raise
    freeze_startup_heap()  # before the first request: full collections skip startup's heap
    try:
        return await _serve_until_stopped(server, args, ready, metrics.url if metrics else None)
    finally:
        if metrics is not None:
            await metrics.close()


async def _serve_until_stopped(
    server: Server,
    args: argparse.Namespace,
    ready: multiprocessing.connection.Connection | None,
    metrics_url: str | None,
) -> int:
    if ready is not None:  # a worker: the parent speaks for all of them
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # A worker leaves Ctrl-C to its parent, which forwards it as SIGTERM.
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        ready.send(server.address)
        # EOF on the pipe means the parent is gone, even if it was killed: stop too.
        loop.add_reader(ready.fileno(), stop.set)
        await stop.wait()
        loop.remove_reader(ready.fileno())
        await server.close(timeout=args.shutdown_timeout)
        return 0
    print(
        f"timer-sdk {__version__}: timer {server.timer.name!r} listening on {server.address}",
        flush=True,
    )
    if metrics_url:
        print(f"timer-sdk: metrics at {metrics_url}", flush=True)
    say_shared(args.events_url, server.timer.name)
    # Same task step as the print: the handlers are in place before any request is read.
    graceful = await server.serve_until_signal(
        shutdown_timeout=args.shutdown_timeout,
        report=lambda message: say(args, message, logging.WARNING),
    )
    say(args, "stopped" if graceful else "stopped at once", logging.INFO)
    return 0 if graceful else 1


def say(args: argparse.Namespace, message: str, level: int) -> None:
    """A line for people on stdout; with --log-format json, a record for machines too."""
    print(f"timer-sdk: {message}", flush=True)
    if args.log_format == "json":
        _shutdown_log.log(level, message)


def say_connecting(url: str | None, who: str = "") -> None:
    if url:
        print(f"timer-sdk: {who}connecting to the event bus at {redact(url)}...",
              file=sys.stderr, flush=True)  # fmt: skip


def say_shared(url: str | None, name: str) -> None:
    if url:
        print(f"timer-sdk: events shared through {redact(url)}, subject {subject_for(name)}",
              flush=True)  # fmt: skip
