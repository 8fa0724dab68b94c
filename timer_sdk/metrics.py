"""Prometheus metrics over a server's live counters (the ``metrics`` extra).

:class:`ServerCollector` is a ``prometheus_client`` custom collector: it
reads :func:`timer_sdk.serving.stats.snapshot` at scrape time and builds metric
families then, so serving calls never touches a Prometheus object.
:func:`register` adds one to a registry in one call, for an app with its own
HTTP stack; :func:`serve_metrics` is ``timer-sdk serve --metrics``: a small
HTTP server on the server's own event loop, bounded like the RPC port (a
connection cap, a deadline, no thread per connection), because
``prometheus_client``'s thread-per-connection server let held-open
connections take every descriptor of the process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from asyncio.selector_events import BaseSelectorEventLoop
from collections.abc import Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

from ._extras import install_hint
from .errors import AddressError
from .limits import ServerStats
from .serving.listener import Acceptor
from .serving.metrics_address import metrics_address, refuse_every_interface
from .serving.stats import enable_timing, snapshot

try:
    from prometheus_client import CollectorRegistry, ProcessCollector
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the extra is in dev
    raise ImportError(
        f"timer_sdk.metrics needs prometheus_client: {install_hint('metrics')}"
    ) from exc

if TYPE_CHECKING:
    from .server import Server

__all__ = ["COUNTERS", "MetricsServer", "ServerCollector", "register", "serve_metrics"]

logger = logging.getLogger(__name__)

PREFIX = "timer_sdk"
_BACKLOG = 16  # also bounds what one accept batch takes before the cap closes the oldest
_MAX_HEAD = 8192  # bytes of request line and headers; a scraper sends a few hundred

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
        errors.add_metric([*values, method], entry["errors"])
        cumulative, total = [], 0
        for le, count in zip(bounds, entry["buckets"], strict=True):  # the collector times all
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


async def serve_metrics(
    server: Server,
    address: str,
    labels: dict[str, str] | None = None,
    *,
    max_connections: int = 8,
    timeout: float = 5.0,
) -> MetricsServer:
    """Serve ``server``'s metrics at ``/metrics`` on ``address``, on the running loop.

    ``address`` is ``tcp:HOST:PORT``; a host that means every interface is
    refused (:class:`~timer_sdk.errors.AddressError`), however it is spelled
    and for a name when it is bound. Port 0 picks a free port, and
    :attr:`MetricsServer.url` tells which. At most
    ``max_connections`` are open at once: one more closes the oldest. A
    connection has ``timeout`` seconds to send its request head and take
    the reply. :meth:`MetricsServer.close` stops it.
    """
    parsed = metrics_address(address)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(ServerCollector(server, labels))
    port = MetricsServer(registry, max_connections, timeout)
    loop = asyncio.get_running_loop()
    try:
        # Bound but not listening until judged: nothing can connect to a refused address.
        listening = await loop.create_server(
            port._exchange, parsed.host, parsed.port, reuse_address=True, backlog=_BACKLOG,
            start_serving=False,
        )  # fmt: skip
    except OSError as exc:
        raise OSError(exc.errno, f"--metrics {address}: {os.strerror(exc.errno or 0)}") from None
    try:
        for sock in listening.sockets:
            refuse_every_interface(address, sock.getsockname()[0])
    except AddressError:
        listening.close()
        raise
    try:
        await port._start(listening, server.stats)
    except BaseException:  # out of descriptors, say: nothing may stay bound
        listening.close()
        raise
    host, bound = listening.sockets[0].getsockname()[:2]
    port.url = f"http://{f'[{host}]' if ':' in host else host}:{bound}/metrics"
    logger.info("metrics at %s", port.url)
    return port


class MetricsServer:
    """``/metrics`` over HTTP/1.1 on the server's own event loop, bounded like the RPC port.

    No thread and at most ``max_connections`` descriptors: a new connection
    beyond them closes the oldest, so held-open connections cannot lock a
    scraper out, and a flood of them cannot take descriptors the RPC port
    needs. Each connection gets one answer, then is closed.
    """

    url: str = ""
    """The address of ``/metrics`` as a URL, with the host and port it bound."""

    def __init__(self, registry: CollectorRegistry, max_connections: int, timeout: float) -> None:
        self._registry = registry
        self._cap = max_connections
        self._timeout = timeout
        self._open: dict[_Exchange, None] = {}  # oldest first
        self._listening: asyncio.Server | None = None
        self._acceptor: Acceptor | None = None

    async def _start(self, listening: asyncio.Server, stats: ServerStats) -> None:
        self._listening = listening
        loop = asyncio.get_running_loop()
        if isinstance(loop, BaseSelectorEventLoop):  # accept without spinning when out of fds
            socks: list[socket.socket] = []
            try:
                socks.extend(sock.dup() for sock in listening.sockets)
                self._acceptor = Acceptor(
                    loop, socks, self._exchange, ssl=None, handshake_timeout=None, stats=stats,
                    backlog=_BACKLOG,
                )  # fmt: skip
            except BaseException:
                for sock in socks:
                    loop.remove_reader(sock.fileno())
                    sock.close()
                raise
        else:
            await listening.start_serving()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._acceptor is not None:
            await self._acceptor.close()
        assert self._listening is not None  # set before serve_metrics returns this server
        self._listening.close()
        for exchange in list(self._open):
            exchange.abort()

    def _exchange(self) -> _Exchange:
        return _Exchange(self)

    def _opened(self, exchange: _Exchange) -> None:
        if len(self._open) >= self._cap:
            oldest = next(iter(self._open))
            oldest.abort()
            self._open.pop(oldest, None)
        self._open[exchange] = None

    def _closed(self, exchange: _Exchange) -> None:
        self._open.pop(exchange, None)

    def _answer(self, head: bytes) -> bytes:
        """The whole HTTP response to a request ``head``."""
        line, _, rest = head.decode("latin-1").partition("\r\n")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _response(400, b"a request line is METHOD /metrics HTTP/1.1\n")
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return _response(405, b"GET or HEAD\n", ("Allow", "GET, HEAD"))
        if target.partition("?")[0] != "/metrics":
            return _response(404, b"metrics are at /metrics\n")
        accept = ""
        for field in rest.split("\r\n"):
            name, _, value = field.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        encoder, content_type = choose_encoder(accept)
        body = encoder(self._registry)
        return _response(200, body, ("Content-Type", content_type), bodyless=method == "HEAD")


def _response(status: int, body: bytes, *headers: tuple[str, str], bodyless: bool = False) -> bytes:
    if not headers:
        headers = (("Content-Type", "text/plain; charset=utf-8"),)
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", *(f"{k}: {v}" for k, v in headers),
             f"Content-Length: {len(body)}", "Connection: close", "", ""]  # fmt: skip
    return "\r\n".join(lines).encode("latin-1") + (b"" if bodyless else body)


class _Exchange(asyncio.Protocol):
    """One connection: a request head within the deadline, one answer, closed."""

    def __init__(self, port: MetricsServer) -> None:
        self._port = port
        self._head = b""
        self._answered = False
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._port._timeout, self._expire)
        self._port._opened(self)

    def data_received(self, data: bytes) -> None:
        start = max(0, len(self._head) - 3)  # the blank line may straddle two reads
        self._head += data
        end = self._head.find(b"\r\n\r\n", start)
        if end >= 0:
            self._reply(self._port._answer(self._head[:end]))
        elif len(self._head) > _MAX_HEAD:
            self._reply(_response(431, b"the request head is over 8 KiB\n"))

    def connection_lost(self, exc: Exception | None) -> None:
        assert self._deadline is not None  # set when the connection was made
        self._deadline.cancel()
        self._port._closed(self)

    def abort(self) -> None:
        assert self._transport is not None
        self._transport.abort()

    def _reply(self, response: bytes) -> None:
        assert self._transport is not None
        self._answered = True
        self._transport.write(response)
        self._transport.close()

    def _expire(self) -> None:
        if self._answered:  # the peer has not taken its reply
            self.abort()
        else:
            self._reply(_response(408, b"the request head did not arrive in time\n"))
