"""``timer-sdk top ADDRESS``: a live view of a running server, refreshed in place.

It calls the ``server.stats`` extension every ``--interval`` seconds and
shows what changed since the sample before: calls/s, errors/s and p50/p99
per method (from the difference of the duration histograms), connections,
the memory budget and events. Drawn with ``rich`` (the ``metrics`` extra);
Ctrl-C stops it. The arithmetic is in plain functions, apart from drawing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._extras import install_hint
from ..errors import CallError, TimerError
from ..serving.stats import STATS
from ..wire.codec import decode_item

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["MethodRow", "Sample", "add_arguments", "quantile", "rows", "run_command"]


@dataclass(frozen=True)
class MethodRow:
    """One method between two samples."""

    name: str
    calls: int
    """Calls since the server started."""
    errors: int
    """Error replies since the server started."""
    rate: float
    """Calls per second between the two samples."""
    error_rate: float
    p50: float | None
    """Seconds; ``None`` if no call finished between the samples."""
    p99: float | None


Sample = dict[str, Any]  # a decoded server.stats reply


def quantile(q: float, bounds: list[float], buckets: list[int]) -> float | None:
    """The ``q`` quantile of a histogram (counts per bucket, not cumulative).

    Linear within the bucket it falls in, as Prometheus' ``histogram_quantile``;
    in the last, unbounded bucket it is the largest bound.
    """
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i == len(bounds):
                return bounds[-1]
            low = bounds[i - 1] if i else 0.0
            return low + (bounds[i] - low) * (rank - seen) / count
        seen += count
    return bounds[-1]  # pragma: no cover - the loop returns for any total > 0


def rows(before: Sample, now: Sample) -> list[MethodRow]:
    """Each method's row between two samples of one server."""
    elapsed = max(now["time"] - before["time"], 1e-9)
    bounds = now["bounds"]
    result = []
    for name, entry in now["methods"].items():
        old = before["methods"].get(name, {})
        buckets = entry.get("buckets", [0] * (len(bounds) + 1))
        old_buckets = old.get("buckets", [0] * len(buckets))
        delta = [b - a for a, b in zip(old_buckets, buckets, strict=True)]
        errors = entry.get("errors", 0)
        result.append(
            MethodRow(
                name=name,
                calls=entry["calls"],
                errors=errors,
                rate=(entry["calls"] - old.get("calls", 0)) / elapsed,
                error_rate=(errors - old.get("errors", 0)) / elapsed,
                p50=quantile(0.5, bounds, delta),
                p99=quantile(0.99, bounds, delta),
            )
        )
    return result


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def render(address: str, before: Sample, now: Sample, *, hint: bool = True) -> RenderableType:
    """The view of two samples: a summary line over a table of methods.

    ``hint`` adds "Ctrl-C to stop", for a view that runs until then.
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    elapsed = max(now["time"] - before["time"], 1e-9)
    counters, old = now["counters"], before["counters"]
    budget = now["budget"]
    summary = Text(
        f"timer {now['timer']!r} at {address}\n"
        f"connections {now['connections']}   subscribers {now['subscribers']}   "
        f"error replies {counters['error_replies']}\n"
        f"budget used {_mib(budget['used'])} of {_mib(budget['limit'])}, "
        f"{budget['waiting']} waiting   "
        f"events sent {(counters['events_sent'] - old['events_sent']) / elapsed:.0f}/s, "
        f"dropped {counters['events_dropped']}"
    )
    table = Table(expand=False)
    for heading in ("method", "calls/s", "p50", "p99", "errors/s", "calls", "errors"):
        table.add_column(heading, justify="left" if heading == "method" else "right")
    for row in rows(before, now):
        table.add_row(
            row.name, f"{row.rate:.0f}", _ms(row.p50), _ms(row.p99),
            f"{row.error_rate:.0f}", str(row.calls), str(row.errors),
        )  # fmt: skip
    return Group(summary, table, *([Text("Ctrl-C to stop", style="dim")] if hint else []))


async def _watch(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from ..client import TimerClient

    console = Console()
    async with await TimerClient.connect(args.address, timeout=args.timeout) as client:

        async def sample() -> Sample:
            reply = decode_item(await client.call_raw(STATS))
            assert isinstance(reply, dict)
            return reply

        before = await sample()
        shown = 0
        with Live(console=console, auto_refresh=False, transient=False) as live:
            # Something to see at once, even if Ctrl-C comes before the first sample.
            live.update(Text(f"{args.address}: first figures in {args.interval:g} s"), refresh=True)
            while not args.count or shown < args.count:
                await asyncio.sleep(args.interval)
                now = await sample()
                live.update(render(args.address, before, now, hint=not args.count), refresh=True)
                before = now
                shown += 1
    if not console.is_terminal:
        console.line()  # a file or pipe gets a last newline; a terminal has its cursor there
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Watch a running server: calls/s, p50 and p99 per method, errors, connections, "
        "memory budget and events, refreshed in place until Ctrl-C. It reads the "
        "server.stats method, which a unix: server answers by default and a tcp: server "
        "only when started with --stats. Needs the metrics extra: " + install_hint("metrics")
    )
    parser.add_argument("address", help="tcp:HOST:PORT or unix:PATH of the server")
    parser.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS",
        help="time between refreshes (default %(default)g)",
    )  # fmt: skip
    parser.add_argument(
        "--count", type=int, default=0, metavar="N",
        help="stop after N refreshes (default: until Ctrl-C)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS",
        help="time allowed to connect and for each reply (default %(default)g)",
    )  # fmt: skip


def run_command(args: argparse.Namespace) -> int:
    """Run ``timer-sdk top``; Ctrl-C is a normal way to stop."""
    try:
        import rich  # noqa: F401
    except ImportError:
        print(f"timer-sdk top: needs rich: {install_hint('metrics')}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_watch(args))
    except KeyboardInterrupt:
        return 0
    except CallError as exc:
        print(f"timer-sdk top: {exc}", file=sys.stderr)
        return 1
    except (OSError, TimerError) as exc:
        print(f"timer-sdk top: {args.address}: {exc}", file=sys.stderr)
        return 1
