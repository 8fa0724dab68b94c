"""The ``timer-sdk`` command: serve, call, example, schema, describe, compat, stubs, demo, top...

``timer-sdk serve [ADDRESS]`` runs the in-library server until Ctrl-C or
SIGTERM (:mod:`timer_sdk.tools.serve`); ``--workers N`` runs N server processes
on one TCP port (:mod:`timer_sdk.tools.workers`). ``timer-sdk
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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Sequence

from pydantic import BaseModel

from ..client import TimerClient
from ..errors import CallError, RemoteCallError, TimerError
from ..models import ComplexRequest, EchoRequest, JobSpec, RetryPolicy, ScheduleConfig
from ..wire.codec import decode_item, encode_item
from . import schema
from .cli_help import (
    DEFAULT_ADDRESS,
    UsageError,
    build_parser,
    check_payload,
    find_method,
)
from .serve import run, serve
from .server_process import LISTENING
from .tls_flags import client_ssl
from .workers import serve_workers

__all__ = ["DEFAULT_ADDRESS", "LISTENING", "main"]

_parser = build_parser  # the name tests and tools know


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
                return serve_workers(args)
            return run(serve(args), args.loop)
        if args.command == "call":
            return run(_call(args))
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
        return run(_demo(args))
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
