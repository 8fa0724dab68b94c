"""``timer-sdk serve`` flags to observe a server: --metrics, --stats, --log-format.

Under ``--workers N`` each worker serves its own ``/metrics`` on the port
after the one before (``--metrics tcp:127.0.0.1:9464``: 9464, 9465, ...),
and labels every sample ``worker="I"``. prometheus_client's multiprocess
mode would need its own metric objects updated on every call, which the
collector over live counters is there to avoid.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import re
from typing import TYPE_CHECKING

from .._extras import install_hint
from ..errors import AddressError
from ..serving.metrics_address import metrics_address

if TYPE_CHECKING:
    from ..metrics import MetricsServer
    from ..server import Server

__all__ = ["add_serve_flags", "start_metrics"]

METRICS_EXTRA = install_hint("metrics")


def _metrics_flag(text: str) -> str:
    try:
        metrics_address(text)
        import prometheus_client  # noqa: F401
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--metrics {text}: ")) from None
    except ImportError:
        raise argparse.ArgumentTypeError(f"needs prometheus_client: {METRICS_EXTRA}") from None
    return text


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("observability")
    group.add_argument(
        "--metrics",
        type=_metrics_flag,
        metavar="tcp:HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics; a loopback host, or "
        "one interface named explicitly (every spelling of a wildcard, such as 0.0.0.0, 0 "
        "or [::], is refused); under "
        f"--workers, worker I serves on PORT+I. Needs: {METRICS_EXTRA}",
    )
    group.add_argument(
        "--stats",
        action=argparse.BooleanOptionalAction,
        help="answer the server.stats method, which timer-sdk top reads and which reveals "
        "load (default: on a unix: socket only; --no-stats refuses it there too)",
    )
    group.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines on stderr as plain text or one JSON object each (default %(default)s)",
    )
    group.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="warning",
        help="least severe log level shown (default %(default)s)",
    )


def _worker_index() -> int:
    # serve --workers names its processes timer-sdk-worker-I (workers._start_workers).
    name = multiprocessing.current_process().name
    match = re.fullmatch(r"timer-sdk-worker-(\d+)", name)
    if match is None:
        raise ValueError(f"--metrics: cannot tell which worker process {name!r} is")
    return int(match.group(1))


async def start_metrics(
    server: Server, args: argparse.Namespace, *, worker: bool
) -> MetricsServer | None:
    """Serve ``/metrics`` if ``--metrics`` was given, on the running loop.

    A worker says where at once; a single server after its listening line.
    """
    if not args.metrics:
        return None
    from ..metrics import serve_metrics

    address = metrics_address(args.metrics)
    labels = None
    if worker:
        index = _worker_index()
        labels = {"worker": str(index)}
        if address.port:
            address = dataclasses.replace(address, port=address.port + index)
    metrics = await serve_metrics(server, str(address), labels)
    if worker:
        print(f"timer-sdk: worker {index} metrics at {metrics.url}", flush=True)
    return metrics
