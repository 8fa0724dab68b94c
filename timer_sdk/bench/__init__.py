"""``timer-sdk bench``: our server and client measured beside two floors.

Every row puts ours beside two floors measured in the same run, on the same
event loop, under the same load: the *models floor* (``models_floor.py``), a
plain server and client that do the work ours cannot skip (cbor2, pydantic
into the same models, the same Timer procs) without our strict checks, and
the *floor* (``floor.py``), cbor2 alone. Server rows take their load from a
separate process (``loadgen.py``); each server under test runs in its own
process too. ``--against ADDRESS`` adds a server someone else started. The
table goes to stdout, the results to a JSON file that
``notebooks/benchmark.ipynb`` plots.

Run ``timer-sdk bench`` (or ``python -m timer_sdk.bench``); ``--quick`` takes about
a minute with both event loops. ``TIMER_SDK_BENCH_QUICK=1`` makes it the default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .rows import GROUPS, TARGETS, Row, Settings
from .runner import run_benchmark
from .table import format_table

__all__ = [
    "GROUPS",
    "TARGETS",
    "Row",
    "Settings",
    "add_arguments",
    "format_table",
    "main",
    "run_benchmark",
    "run_command",
]

DEFAULT_JSON = "timer-sdk-bench.json"
DESCRIPTION = (
    "Measure our server and client beside two floors, in the same run, on the same event "
    "loop, under the same load: the models floor (a plain server and client that decode with "
    "cbor2 and validate into the same models, without our strict checks) and the floor "
    "(cbor2 alone). Prints a table and writes the results as JSON, which "
    "notebooks/benchmark.ipynb plots."
)
"""The help text of ``timer-sdk bench`` and ``python -m timer_sdk.bench``: plain words."""


def quick_by_default() -> bool:
    """Whether ``TIMER_SDK_BENCH_QUICK`` asks for quick mode."""
    return os.environ.get("TIMER_SDK_BENCH_QUICK", "") not in ("", "0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        default=quick_by_default(),
        help="short runs, one round each (about a minute with both event loops)",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop to measure (auto: both when uvloop is installed)",
    )
    parser.add_argument(
        "--only",
        metavar="GROUPS",
        default=",".join(GROUPS),
        help=f"comma-separated groups to run (default: {','.join(GROUPS)})",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=DEFAULT_JSON,
        help=f"where to write the results (default: {DEFAULT_JSON})",
    )
    parser.add_argument("--duration", type=float, help="seconds per measured run")
    parser.add_argument("--rounds", type=int, help="runs per measurement; the median is kept")
    parser.add_argument(
        "--against",
        metavar="ADDRESS",
        help="also measure the server already listening at ADDRESS "
        "(unix:PATH or tcp:127.0.0.1:PORT), under the same load",
    )


def run_command(args: argparse.Namespace) -> int:
    """Run the benchmark as the parsed options say; print the table, write the JSON."""
    settings = Settings(
        quick=args.quick,
        loops=() if args.loop == "auto" else (args.loop,),
        groups=tuple(group.strip() for group in args.only.split(",") if group.strip()),
        duration=args.duration,
        rounds=args.rounds,
        against=args.against,
    )
    document = run_benchmark(settings)
    document["argv"] = list(sys.argv)
    print(format_table(document))
    print(f"\nran in {document['seconds']:.1f} s; results written to {args.json}")
    Path(args.json).write_text(json.dumps(document, indent=1) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m timer_sdk.bench``."""
    parser = argparse.ArgumentParser(prog="python -m timer_sdk.bench", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except ValueError as exc:
        print(f"timer-sdk bench: {exc}", file=sys.stderr)
        return 2
