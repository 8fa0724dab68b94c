"""The ``timer-sdk`` command: serve, call, example, schema, describe, compat, stubs, demo, top...

``timer-sdk serve [ADDRESS]`` runs the in-library server until Ctrl-C or
SIGTERM; ``--workers N`` runs N server processes on one TCP port. ``timer-sdk
call ADDRESS METHOD [JSON]`` calls any method and prints the reply as JSON, as
grpcurl does for gRPC; ``timer-sdk example METHOD`` prints a payload to start
from. ``timer-sdk schema`` prints the wire API as CDDL or JSON Schema, and
``timer-sdk stubs`` writes a typed client for another language (:mod:`timer_sdk.tools.stubs`).
``timer-sdk describe`` prints a running server's API and ``timer-sdk compat``
judges what changed between two (:mod:`timer_sdk.tools.api_commands`).
``timer-sdk demo`` starts a server process and makes a round trip of every
method against it. ``timer-sdk bench`` measures the server and client beside a
minimal floor (see :mod:`timer_sdk.bench`); ``timer-sdk top`` watches a running
server (:mod:`timer_sdk.tools.top`). Help texts and errors are in
:mod:`timer_sdk.tools.cli_help`.

Over 400 lines: one short function per subcommand; their parsers and help
texts are in cli_help.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from pydantic import BaseModel

from .._extras import install_hint
from .._version import __version__
from ..bus import NATS_EXTRA, Unshared, nats_available, redact, subject_for
from ..bus.natsd import NatsServer, nats_server_binary
from ..client import TimerClient
from ..errors import CallError, RemoteCallError, TimerError
from ..logs import configure as configure_logging
from ..models import ComplexRequest, EchoRequest, JobSpec, RetryPolicy, ScheduleConfig, TimerConfig
from ..server import Server
from ..serving.serve_gc import freeze_startup_heap
from ..serving.workers_port import claim_port
from ..timer import Timer
from ..wire.address import Address
from ..wire.codec import decode_item, encode_item
from . import schema
from .cli_help import (
    DEFAULT_ADDRESS,
    UsageError,
    build_parser,
    check_payload,
    find_method,
    limits_from_args,
)
from .observe import start_metrics
from .reload import Hangup, reload_workers
from .tls_flags import client_ssl, server_ssl

__all__ = ["DEFAULT_ADDRESS", "LISTENING", "main"]

_shutdown_log = logging.getLogger("timer_sdk.shutdown")  # where serve_until_signal reports

LISTENING = re.compile(r"listening on (\S+)")
_parser = build_parser  # the name tests and tools know


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


def _run(coro: Coroutine[Any, Any, int], loop: str = "auto") -> int:
    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        return runner.run(coro)


# --- serve -------------------------------------------------------------------


async def _serve(
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
    waiting = asyncio.get_running_loop().call_later(1.0, _say_connecting, url)
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
    _say_shared(args.events_url, server.timer.name)
    # Same task step as the print: the handlers are in place before any request is read.
    graceful = await server.serve_until_signal(
        shutdown_timeout=args.shutdown_timeout,
        report=lambda message: _say(args, message, logging.WARNING),
    )
    _say(args, "stopped" if graceful else "stopped at once", logging.INFO)
    return 0 if graceful else 1


def _say(args: argparse.Namespace, message: str, level: int) -> None:
    """A line for people on stdout; with --log-format json, a record for machines too."""
    print(f"timer-sdk: {message}", flush=True)
    if args.log_format == "json":
        _shutdown_log.log(level, message)


def _say_connecting(url: str | None, who: str = "") -> None:
    if url:
        print(f"timer-sdk: {who}connecting to the event bus at {redact(url)}...",
              file=sys.stderr, flush=True)  # fmt: skip


def _say_shared(url: str | None, name: str) -> None:
    if url:
        print(f"timer-sdk: events shared through {redact(url)}, subject {subject_for(name)}",
              flush=True)  # fmt: skip


def _worker(args: argparse.Namespace, ready: multiprocessing.connection.Connection) -> None:
    """Serve as one of ``--workers`` processes (the target of each child)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C reaches the parent too
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the parent's, not ours
    try:
        code = _run(_serve(args, reuse_port=True, ready=ready), args.loop)
    except (OSError, TimerError, ValueError, UsageError) as exc:
        print(f"timer-sdk serve: worker {os.getpid()}: {exc}", file=sys.stderr, flush=True)
        code = 1
    sys.exit(code)


def _serve_workers(args: argparse.Namespace) -> int:
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
                _say_shared(args.events_url, args.name)
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
        _say_connecting(bus_url, "the workers are ")
    for pipe in pipes[first:]:
        try:
            bound = pipe.recv()
        except EOFError:
            return None
        if stopping():
            return None
    return bound


# --- call --------------------------------------------------------------------


def _to_json(value: object) -> str:
    if isinstance(value, BaseModel):
        return value.model_dump_json(by_alias=True, indent=2)
    return json.dumps(value, indent=2, default=repr)


async def _call(args: argparse.Namespace) -> int:
    # Checked before connecting, with the server's own validation: nothing bad is sent.
    method = None if args.raw else find_method(args.method)
    if method is not None:
        params = check_payload(method, args.json)
    else:
        try:
            params_json = json.loads(args.json)
        except json.JSONDecodeError as exc:
            raise UsageError(f"the payload is not valid JSON: {exc}") from None
    try:
        async with await TimerClient.connect(
            args.address, timeout=args.timeout, ssl=client_ssl(args)
        ) as client:
            if method is not None:
                result: object = await client.call(method, params)
            else:  # not ours: send it as is, for servers with more methods
                body = await client.call_raw(args.method, encode_item(params_json))
                result = decode_item(body)
    except CallError as exc:
        # An unknown method's reply names it already: do not say it twice.
        message = exc.message if isinstance(exc, RemoteCallError) and method is None else exc
        print(f"timer-sdk call: error reply: {message}", file=sys.stderr)
        return 1
    except TimerError as exc:
        print(f"timer-sdk call: {exc}", file=sys.stderr)
        return 1
    print(_to_json(result))
    return 0


# --- demo --------------------------------------------------------------------


async def _demo(args: argparse.Namespace) -> int:
    print(f"starting a server process: {sys.executable} -m timer_sdk serve tcp:127.0.0.1:0")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "timer_sdk", "serve", "tcp:127.0.0.1:0", "--name", "demo-timer",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        match = LISTENING.search(line)
        if match is None:
            print(f"the server did not start: {line!r}", file=sys.stderr)
            return 1
        address = match.group(1)
        print(f"  server says: {line.strip()}")
        async with await TimerClient.connect(address, timeout=10) as client:
            print(f"connected: {client!r}")
            print(f"  version()  -> {await client.version()!r}")
            echo = await client.echo(EchoRequest(message="hello over the wire", delay_ms=5))
            print(f"  echo()     -> {echo!r}")
            summary = await client.complex(
                ComplexRequest(messages=[], tags=["demo"], note="from the demo")
            )
            print(f"  complex()  -> {summary!r}")
            job = JobSpec(name="nightly", payload=["a"], priority=1)
            retry = RetryPolicy(max_attempts=3, backoff_ms=100, retry_on=["timeout"])
            when = ScheduleConfig(start_at_ms=1000, interval_ms=500, jitter=7)
            print(f"  schedule() -> {await client.schedule(job, retry, when)!r}")
            try:
                await client.schedule(job.model_copy(update={"name": ""}), retry, when)
            except CallError as exc:
                print(f"  schedule(name='') raised {exc!r}")
            started = time.perf_counter()
            calls = [client.echo(EchoRequest(message=str(i), delay_ms=0)) for i in range(1000)]
            replies = await asyncio.gather(*calls)
            elapsed = time.perf_counter() - started
            ok = all(reply.echoed == str(i) for i, reply in enumerate(replies))
            print(f"  1000 pipelined echo calls in {elapsed * 1000:.1f} ms, all matched: {ok}")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rest = (await proc.communicate())[0].decode().strip()
    for line in rest.splitlines():
        print(f"  server says: {line}")
    print(f"server process exited with code {proc.returncode}")
    return 0 if proc.returncode == 0 and ok else 1


# --- example, schema ----------------------------------------------------------


def _example(args: argparse.Namespace) -> int:
    method = find_method(args.method)
    print(json.dumps(schema.example(method.params)))
    return 0


def _schema(args: argparse.Namespace) -> int:
    if args.format == "cddl":
        print(schema.cddl(), end="")
    else:
        print(json.dumps(schema.json_schema(), indent=2))
    return 0


# --- argument parsing --------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            if args.workers < 1:
                raise ValueError("--workers must be at least 1")
            if args.workers > 1:
                return _serve_workers(args)
            return _run(_serve(args), args.loop)
        if args.command == "call":
            return _run(_call(args))
        if args.command == "example":
            return _example(args)
        if args.command == "schema":
            return _schema(args)
        if args.command in ("describe", "compat"):
            from .api_commands import run_command as run_api

            return run_api(args, client_ssl(args))
        if args.command == "stubs":
            from .stubs import run_command as run_stubs

            return run_stubs(args)
        if args.command == "top":
            from .top import run_command as run_top

            return run_top(args)
        if args.command == "bench":
            from ..bench import run_command

            return run_command(args)
        return _run(_demo(args))
    except UsageError as exc:
        print(f"timer-sdk {args.command}: {exc}", file=sys.stderr)
        return 2
    except (OSError, TimerError, ValueError) as exc:
        print(f"timer-sdk {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
