"""``timer-sdk describe`` and ``timer-sdk compat``: a running server's API, and what changed.

``describe`` reads a server's API through the ``server.describe`` extension and
prints it as ``timer-sdk schema`` prints the SDK's own, so the two compare
byte for byte. ``compat`` compares two APIs, each a file that ``timer-sdk
schema --format json-schema`` wrote or a live address, with the rules of
:mod:`timer_sdk.tools.compat`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from ssl import SSLContext
from typing import Any

from ..client import TimerClient
from ..errors import RemoteCallError, TimerError
from ..wire.served import DESCRIBE, ServerDescription
from . import compat, schema

__all__ = ["add_compat_arguments", "add_describe_arguments", "fetch", "run_command"]

_ADDRESS = re.compile(r"(tcp|tls|unix):")


class Unreadable(Exception):
    """OLD or NEW could not be read: a missing file, bad JSON, a server that cannot say."""


def add_describe_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``timer-sdk describe``."""
    parser.add_argument("address", help="tcp:HOST:PORT, tls:HOST:PORT or unix:PATH")
    parser.add_argument(
        "--format",
        choices=("cddl", "json-schema"),
        default="cddl",
        help="CDDL (RFC 8610) or JSON Schema 2020-12, by wire names (default %(default)s)",
    )
    _add_timeout(parser)


def add_compat_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``timer-sdk compat``."""
    what = "a file written by `timer-sdk schema --format json-schema`, or a server's address"
    parser.add_argument("old", metavar="OLD", help=f"the older API: {what}")
    parser.add_argument("new", metavar="NEW", help=f"the newer API: {what}")
    _add_timeout(parser)


def _add_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="time to wait for a server's reply (seconds; default %(default)g)",
    )


async def fetch(address: str, *, timeout: float, ssl: SSLContext | None) -> ServerDescription:
    """The description of the server at ``address``."""
    async with await TimerClient.connect(address, timeout=timeout, ssl=ssl) as client:
        return await client.describe()


def _describe(address: str, timeout: float, ssl: SSLContext | None) -> ServerDescription:
    try:
        return asyncio.run(fetch(address, timeout=timeout, ssl=ssl))
    except RemoteCallError as exc:
        raise Unreadable(
            f"{address} does not describe its API: it answered {exc.message!r}, as a server "
            f"without the {DESCRIBE} extension does (the reference, or an older timer-sdk)"
        ) from None
    except (OSError, TimerError) as exc:
        raise Unreadable(f"{address}: {exc}") from None


def _load(source: str, timeout: float, ssl: SSLContext | None) -> dict[str, Any]:
    if _ADDRESS.match(source):
        return schema.json_schema(_describe(source, timeout, ssl).api)
    try:
        with open(source, encoding="utf-8") as file:
            document = json.load(file)
    except OSError as exc:
        raise Unreadable(f"cannot read {source}: {exc.strerror}") from None
    except ValueError as exc:
        raise Unreadable(f"{source} is not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("$defs"), dict):
        raise Unreadable(
            f"{source} is not an API description: write one with "
            "`timer-sdk schema --format json-schema`"
        )
    return document


def run_command(args: argparse.Namespace, ssl: SSLContext | None) -> int:
    """Run ``timer-sdk describe`` or ``timer-sdk compat``; errors are one line on stderr."""
    try:
        if args.command == "describe":
            api = _describe(args.address, args.timeout, ssl).api
            if args.format == "cddl":
                print(schema.cddl(api), end="")
            else:
                print(json.dumps(schema.json_schema(api), indent=2))
            return 0
        old = _load(args.old, args.timeout, ssl)
        new = _load(args.new, args.timeout, ssl)
    except Unreadable as exc:
        print(f"timer-sdk {args.command}: {exc}", file=sys.stderr)
        return 1 if args.command == "describe" else 2
    try:
        changes = compat.compare(old, new)
    except ValueError as exc:
        print(f"timer-sdk compat: {exc}", file=sys.stderr)
        return 2
    print(compat.report(changes), end="")
    return 1 if any(change.level == compat.BREAKING for change in changes) else 0
