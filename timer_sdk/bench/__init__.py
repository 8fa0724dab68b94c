"""``timer-sdk bench``: our server and client measured beside a minimal floor.

Every row is ``ours / floor`` from the same run: the floor (``floor.py``) is
the least an asyncio server and client can do to speak the protocol, run on
the same event loop under the same load. Server rows take their load from a
separate process (``loadgen.py``); the server under test runs in its own
process too. The table goes to stdout, the results to a JSON file that
``notebooks/benchmark.ipynb`` plots.

Run ``timer-sdk bench`` (or ``python -m timer_sdk.bench``); ``--quick`` takes
well under a minute. ``TIMER_SDK_BENCH_QUICK=1`` makes quick mode the default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .runner import GROUPS, REFERENCE, REFERENCE_NOTE, Row, Settings, format_table, run_benchmark

__all__ = [
    "GROUPS",
    "REFERENCE",
    "Row",
    "Settings",
    "add_arguments",
    "format_table",
    "main",
    "run_benchmark",
    "run_command",
]

DEFAULT_JSON = "timer-sdk-bench.json"


def quick_by_default() -> bool:
    """Whether ``TIMER_SDK_BENCH_QUICK`` asks for quick mode."""
    return os.environ.get("TIMER_SDK_BENCH_QUICK", "") not in ("", "0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        default=quick_by_default(),
        help="short runs, one round each (under a minute)",
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


def run_command(args: argparse.Namespace) -> int:
    """Run the benchmark as the parsed options say; print the table, write the JSON."""
    settings = Settings(
        quick=args.quick,
        loops=() if args.loop == "auto" else (args.loop,),
        groups=tuple(group.strip() for group in args.only.split(",") if group.strip()),
        duration=args.duration,
        rounds=args.rounds,
    )
    document = run_benchmark(settings)
    document["argv"] = list(sys.argv)
    print(format_table(document))
    print(f"\nreference column: {REFERENCE_NOTE}")
    print(f"ran in {document['seconds']:.1f} s; results written to {args.json}")
    Path(args.json).write_text(json.dumps(document, indent=1) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m timer_sdk.bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m timer_sdk.bench", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except ValueError as exc:
        print(f"timer-sdk bench: {exc}", file=sys.stderr)
        return 2
