"""How the ``timer-sdk`` command explains itself: flags, help texts, readable errors.

The ``serve`` limit flags are generated from the fields of
:class:`~timer_sdk.limits.Limits` and their ``metadata`` (``help``,
``unit``), so a new bound gets its flag without touching the CLI. The
``call`` help and its errors are generated from :mod:`timer_sdk.wire.api` and
:mod:`timer_sdk.tools.schema`, and payloads are checked by the server's own
validation before anything is sent.

Over 400 lines by a few: every subcommand's parser in one place, so that
its help and its errors read alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import textwrap
import types
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from .._version import __version__
from ..limits import Limits
from ..models import TimerConfig
from ..wire import api
from ..wire.codec import DecodeError
from ..wire.description import unwrap
from . import schema

__all__ = [
    "DEFAULT_ADDRESS",
    "UsageError",
    "add_limit_flags",
    "build_parser",
    "call_epilog",
    "check_payload",
    "find_method",
    "help_texts",
    "limits_from_args",
]


DEFAULT_ADDRESS = "tcp:127.0.0.1:9099"


class UsageError(Exception):
    """The command line asked for something impossible; nothing was sent."""


# --- serve: one flag per Limits field ------------------------------------------


def _limit_type(name: str, annotation: Any) -> tuple[type[int] | type[float], bool]:
    """Return ``(int or float, whether None switches it off)``."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else annotation
    if annotation not in (int, float):
        raise TypeError(
            f"Limits.{name}: no flag for type {annotation!r}; use int or float, "
            "or int | None / float | None for a bound that can be off"
        )
    return annotation, optional


def _limit_parser(
    kind: type[int] | type[float], optional: bool, unit: str
) -> Callable[[str], int | float | None]:
    def parse(text: str) -> int | float | None:
        if optional and text.strip().lower() == "off":
            return None
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            off = ", or off" if optional else ""
            raise argparse.ArgumentTypeError(
                f"expected {what} of {unit}{off}, got {text!r}"
            ) from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
        return None if optional and value == 0 else value

    return parse


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every field of :class:`Limits`, with its help and unit."""
    group = parser.add_argument_group(
        "limits", "every bound the server enforces (the fields of timer_sdk.Limits)"
    )
    hints = typing.get_type_hints(Limits)
    defaults = Limits()
    for field in dataclasses.fields(Limits):
        kind, optional = _limit_type(field.name, hints[field.name])
        unit = field.metadata["unit"]
        default = getattr(defaults, field.name)
        shown = "off" if default is None else f"{default:g}" if kind is float else str(default)
        off = "; 0 or off: no limit" if optional else ""
        group.add_argument(
            _flag(field.name),
            dest=f"limit_{field.name}",
            type=_limit_parser(kind, optional, unit),
            default=default,
            metavar=unit.upper(),
            help=f"{field.metadata['help']} ({unit}; default {shown}{off})",
        )


def limits_from_args(args: argparse.Namespace) -> Limits:
    """Build :class:`Limits` from the flags :func:`add_limit_flags` added."""
    values = {f.name: getattr(args, f"limit_{f.name}") for f in dataclasses.fields(Limits)}
    return Limits(**values)


# --- call: methods, shapes, readable errors --------------------------------------


def call_epilog() -> str:
    """The methods and the JSON shape of each, for ``call --help``."""
    width = max(len(name) for name in api.METHODS)
    lines = [
        "methods and their JSON payloads (camelCase field names, as on the wire;",
        "? marks an optional field):",
    ]
    for name, method in api.METHODS.items():
        lines += textwrap.wrap(
            schema.shape(method.params),
            79,
            initial_indent=f"  {name:<{width}}  ",
            subsequent_indent=" " * (width + 6),
            break_on_hyphens=False,
        )
    lines += [
        "",
        "`timer-sdk example METHOD` prints a valid payload to start from, e.g.",
        '  timer-sdk call tcp:127.0.0.1:9099 echo "$(timer-sdk example echo)"',
    ]
    return "\n".join(lines)


def _known() -> str:
    return ", ".join(api.METHODS)


def find_method(name: str) -> api.Method[Any, Any]:
    """Return the method called ``name``; raise :class:`UsageError` listing the known ones."""
    method = api.METHODS.get(name)
    if method is not None:
        return method
    close = difflib.get_close_matches(name.lower(), list(api.METHODS), n=1, cutoff=0.6)
    guess = f" (did you mean {close[0]}?)" if close else ""
    raise UsageError(f"unknown method {name!r}{guess}; the methods are: {_known()}")


def _snake_hints(model: type[BaseModel], item: object, where: str = "") -> list[str]:
    """Name the keys of ``item`` spelled snake_case where the wire spells them camelCase."""
    if not isinstance(item, dict):
        return []
    hints = []
    fields = {info.alias or name: info for name, info in model.model_fields.items()}
    for key, value in item.items():
        info = fields.get(key)
        if info is None and isinstance(key, str) and to_camel(key) in fields:
            hints.append(f"{where}{key} is spelled {to_camel(key)} on the wire")
        elif info is not None:
            inner = unwrap(info.annotation)[0]
            if typing.get_origin(inner) is list:
                inner = typing.get_args(inner)[0]
                values = value if isinstance(value, list) else []
                for i, element in enumerate(values):
                    hints += _nested_hints(inner, element, f"{where}{key}.{i}.")
            else:
                hints += _nested_hints(inner, value, f"{where}{key}.")
    return hints


def _nested_hints(annotation: Any, item: object, where: str) -> list[str]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _snake_hints(annotation, item, where)
    return []


def check_payload(method: api.Method[Any, Any], text: str) -> BaseModel:
    """Parse and validate a JSON payload as the server would; raise :class:`UsageError`."""
    try:
        item = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"the payload is not valid JSON: {exc}") from None
    shape = schema.shape(method.params)
    if not isinstance(item, dict):
        raise UsageError(f"{method.name}: the payload must be a JSON object: {shape}")
    try:
        params: BaseModel = method.validate_params(item)
    except DecodeError as exc:
        lines = [str(exc)]
        lines += [f"  ({hint})" for hint in _snake_hints(method.params, item)]
        lines.append(f"  the payload of {method.name} is {shape}")
        lines.append(f"  `timer-sdk example {method.name}` prints a valid one")
        raise UsageError("\n".join(lines)) from None
    return params


# --- the parser ------------------------------------------------------------------

_FORMATTER = argparse.RawDescriptionHelpFormatter


def _para(text: str) -> str:
    """Wrap a description for a raw formatter (which keeps the epilog's layout)."""
    return textwrap.fill(text, 79)


def _add_tls(parser: argparse.ArgumentParser, *, server: bool) -> None:
    group = parser.add_argument_group("TLS (file paths, PEM)")
    group.add_argument("--tls-cert", metavar="PEM", help="certificate chain to present")
    group.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    if server:
        group.add_argument(
            "--tls-client-ca", metavar="PEM", help="require client certificates from this CA"
        )
    else:
        group.add_argument(
            "--tls-ca", metavar="PEM", help="trust this CA for the server's certificate"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="timer-sdk",
        description="Serve the timer library over a socket, call it, or print its wire schema.",
        epilog="Run `timer-sdk COMMAND --help` for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"timer-sdk {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve a timer until Ctrl-C or SIGTERM",
        description=_para(
            "Serve a timer until Ctrl-C or SIGTERM, then stop gracefully: stop accepting, "
            "answer every request already received, close. A second Ctrl-C says it was "
            "heard; a third stops at once."
        ),
        formatter_class=_FORMATTER,
    )
    where = f"tcp:HOST:PORT, tls:HOST:PORT or unix:PATH (default {DEFAULT_ADDRESS})"
    serve.add_argument("address", nargs="?", default=DEFAULT_ADDRESS, help=where)
    serve.add_argument(
        "--name",
        default=TimerConfig().name,
        help="the timer's name, in every echo reply (default %(default)s)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on stop, time to finish requests in flight before their procs "
        "are cancelled (seconds; default %(default)g)",
    )
    serve.add_argument(
        "--unix-mode",
        default="600",
        metavar="OCTAL",
        help="file mode of a unix: socket (octal; default %(default)s)",
    )
    serve.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop; auto takes uvloop when installed (default %(default)s)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes sharing one TCP port via SO_REUSEPORT (default %(default)s); "
        "with the nats extra they share events through a private nats-server",
    )
    serve.add_argument(
        "--events-url",
        metavar="URL",
        help="share events with every server of this timer name on nats://HOST:PORT",
    )
    add_limit_flags(serve)
    _add_tls(serve, server=True)
    from .observe import add_serve_flags

    add_serve_flags(serve)

    call = commands.add_parser(
        "call",
        help="call a method and print the reply as JSON",
        description=_para(
            "Call METHOD on the server at ADDRESS and print the reply as JSON. The payload "
            "is checked as the server would check it before anything is sent."
        ),
        epilog=call_epilog(),
        formatter_class=_FORMATTER,
    )
    call.add_argument("address", help="tcp:HOST:PORT, tls:HOST:PORT or unix:PATH")
    call.add_argument("method", help=f"one of: {', '.join(api.METHODS)}")
    call.add_argument(
        "json",
        nargs="?",
        default="{}",
        metavar="JSON",
        help="the payload, a JSON object (default {})",
    )
    call.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="time to wait for the reply (seconds; default %(default)g)",
    )
    call.add_argument(
        "--raw",
        action="store_true",
        help="send METHOD and JSON unchecked, for a server with more methods",
    )
    _add_tls(call, server=False)

    example = commands.add_parser(
        "example",
        help="print a valid JSON payload for a method",
        description=_para(
            "Print a valid JSON payload for METHOD, every optional field set, to edit and "
            "pass to `timer-sdk call`."
        ),
        epilog=call_epilog(),
        formatter_class=_FORMATTER,
    )
    example.add_argument("method", help=f"one of: {', '.join(api.METHODS)}")

    schema_command = commands.add_parser(
        "schema",
        help="print the wire API as CDDL or JSON Schema",
        description="Print the wire API, generated from the SDK's one declaration of it: "
        "request payloads, replies, events and the event extension.",
    )
    schema_command.add_argument(
        "--format",
        choices=("cddl", "json-schema"),
        default="cddl",
        help="CDDL (RFC 8610) or JSON Schema 2020-12, by wire names (default %(default)s)",
    )

    from .api_commands import add_compat_arguments, add_describe_arguments

    describe = commands.add_parser(
        "describe",
        help="print a running server's API, as schema prints this SDK's",
        description=_para(
            "Print the API of the server at ADDRESS, read through its server.describe "
            "extension, in the formats of `timer-sdk schema`: for a server of this version "
            "the output is the same, byte for byte. A server without the extension (the "
            "reference, or an older timer-sdk) is named as such: exit status 1."
        ),
        formatter_class=_FORMATTER,
    )
    add_describe_arguments(describe)
    _add_tls(describe, server=False)
    compat = commands.add_parser(
        "compat",
        help="list what changed between two APIs, and whom it breaks",
        description=_para(
            "List every difference from API OLD to API NEW, each judged for an older client "
            "against a newer server and for a newer client against an older server: safe, "
            "'if used' (only a peer that uses the new part fails), or breaking. Exit status: "
            "0 when compatible both ways, 1 when something breaks, 2 when OLD or NEW cannot "
            "be read."
        ),
        formatter_class=_FORMATTER,
    )
    add_compat_arguments(compat)
    _add_tls(compat, server=False)

    commands.add_parser(
        "demo",
        help="start a server process and call every method on it",
        description="Start a server process and make a round trip of every method against it.",
    )

    from .stubs import add_arguments as add_stubs_arguments

    stubs = commands.add_parser(
        "stubs",
        help="write a typed client package for another language",
        description="Write a typed client package for another language, generated from the "
        "SDK's one declaration of its API: its types, one method per proc, the framing "
        "and the event extension.",
    )
    add_stubs_arguments(stubs)
    from .top import add_arguments as add_top_arguments

    top = commands.add_parser("top", help="watch a running server: calls/s, latency, errors")
    add_top_arguments(top)

    from ..bench import DESCRIPTION as BENCH_DESCRIPTION
    from ..bench import add_arguments as add_bench_arguments

    bench = commands.add_parser(
        "bench",
        help="measure the server and client beside a floor",
        description=BENCH_DESCRIPTION,
    )
    add_bench_arguments(bench)
    return parser


def help_texts() -> dict[str, str]:
    """Every ``--help`` the CLI prints, by command line: ``timer-sdk``, ``timer-sdk serve``..."""
    parser = build_parser()
    texts = {"timer-sdk": parser.format_help()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts.update({f"timer-sdk {n}": p.format_help() for n, p in action.choices.items()})
    return texts
