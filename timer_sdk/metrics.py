"""Prometheus metrics over a server's live counters (the ``metrics`` extra).

:class:`ServerCollector` is a ``prometheus_client`` custom collector: it
reads :func:`timer_sdk.serving.stats.snapshot` at scrape time and builds metric
families then, so serving calls never touches a Prometheus object.
:func:`register` adds one to a registry in one call, for an app with its own
HTTP stack; :func:`start_http` is ``timer-sdk serve --metrics``, on
``prometheus_client``'s own HTTP server.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from ._extras import install_hint
from .serving.stats import enable_timing, snapshot
from .wire.address import metrics_address

try:
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the extra is in dev
    raise ImportError(
        f"timer_sdk.metrics needs prometheus_client: {install_hint('metrics')}"
    ) from exc

if TYPE_CHECKING:
    from .server import Server

__all__ = ["COUNTERS", "ServerCollector", "register", "start_http", "stop_http"]

logger = logging.getLogger(__name__)

PREFIX = "timer_sdk"

COUNTERS: dict[str, str] = {
    # a ServerStats field, exported as timer_sdk_<field>_total: its help
    "connections_accepted": "Connections accepted.",
    "connections_refused": "Connections closed at once: over max_connections, or shutting down.",
    "error_replies": "Error replies sent for any reason: calls, bad frames, unknown methods.",
    "protocol_violations": "Frames or payloads that broke the protocol.",
    "frame_timeouts": "Frames not finished within frame_timeout.",
    "idle_timeouts": "Connections closed after idle_timeout.",
    "events_sent": "Event frames sent to subscribers.",
    "events_dropped": "Events a subscriber lost: not reading, or over the memory budget.",
    "budget_waits": "Times a connection stopped reading: the memory budget was spent.",
    "budget_refusals": "Requests refused as larger than the whole memory budget.",
    "orphans_cancelled": "Calls cancelled because their connection was gone.",
    "oversize_replies": "Replies over max_frame_size, sent as error replies.",
    "oversize_events": "Events over max_frame_size, dropped.",
    "accept_pauses": "Times accepting paused: the process was out of file descriptors.",
}


class ServerCollector(Collector):
    """The metrics of one :class:`~timer_sdk.server.Server`, read at each scrape.

    ``labels`` are added to every sample, e.g. ``{"worker": "0"}``.
    """

    def __init__(self, server: Server, labels: dict[str, str] | None = None) -> None:
        self._server = server
        self._const = dict(labels or {})
        enable_timing(server)

    def collect(self) -> Iterator[Metric]:
        snap = snapshot(self._server)
        names = list(self._const)
        values = list(self._const.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=names)
            family.add_metric(values, value)
            return family

        yield from _per_method(snap, names, values)
        for field, doc in COUNTERS.items():
            yield counter(field, doc, snap["counters"][field])
        yield gauge("connections_open", "Connections open now.", snap["connections"])
        yield gauge("event_subscribers", "Connections subscribed to events now.",
                    snap["subscribers"])  # fmt: skip
        budget = snap["budget"]
        yield gauge("budget_used_bytes", "Bytes held for peers now.", budget["used"])
        yield gauge("budget_limit_bytes", "The memory budget.", budget["limit"])
        yield gauge("budget_waiting_connections", "Connections waiting for budget now.",
                    budget["waiting"])  # fmt: skip


def _per_method(snap: dict[str, Any], names: list[str], values: list[str]) -> Iterator[Metric]:
    labels = [*names, "method"]
    requests = CounterMetricFamily(
        f"{PREFIX}_requests", "Requests received, per method; 'other': extensions and unknown.",
        labels=labels,
    )  # fmt: skip
    errors = CounterMetricFamily(
        f"{PREFIX}_request_errors", "Calls answered with an error reply, per method.", labels=labels
    )
    durations = HistogramMetricFamily(
        f"{PREFIX}_request_duration_seconds",
        "Time from a request's dispatch until its reply is ready, per method.",
        labels=labels,
    )
    bounds = [*map(str, snap["bounds"]), "+Inf"]
    known = 0
    for method, entry in snap["methods"].items():
        known += entry["calls"]
        requests.add_metric([*values, method], entry["calls"])
        if "buckets" in entry:
            errors.add_metric([*values, method], entry["errors"])
            cumulative, total = [], 0
            for le, count in zip(bounds, entry["buckets"], strict=True):
                total += count
                cumulative.append((le, total))
            durations.add_metric([*values, method], cumulative, entry["sum"])
    requests.add_metric([*values, "other"], snap["counters"]["requests"] - known)
    yield from (requests, errors, durations)


def register(server: Server, registry: CollectorRegistry, **labels: str) -> ServerCollector:
    """Add ``server``'s metrics to ``registry``; durations are timed from now on."""
    collector = ServerCollector(server, labels)
    registry.register(collector)
    return collector


def start_http(
    server: Server, address: str, labels: dict[str, str] | None = None
) -> tuple[WSGIServer, str]:
    """Serve ``server``'s metrics at ``/metrics`` on ``address``; return the server and its URL.

    The HTTP server runs in a daemon thread; ``shutdown()`` and ``server_close()`` stop it.
    """
    parsed = metrics_address(address)
    host, port = parsed.host, parsed.port
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(ServerCollector(server, labels))
    try:
        httpd, _thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise OSError(exc.errno, f"--metrics {address}: {exc.strerror}") from None
    bound = httpd.server_address[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/metrics"
    logger.info("metrics at %s", url)
    return httpd, url


def stop_http(httpd: WSGIServer) -> None:
    """Stop what :func:`start_http` started."""
    httpd.shutdown()
    httpd.server_close()
