"""The in-library asyncio server: the listener and its lifecycle.

:func:`serve` binds a TCP, TLS or Unix socket on the running loop and hands
each accepted socket to a :class:`~timer_sdk.serving.connection.Connection`. The
:class:`Server` owns what spans connections: the bounds of :class:`Limits`,
the counters of :class:`ServerStats`, event fan-out, and a graceful close.

Over 400 lines: the public face (serve, Server, its close) and the event
fan-out share the set of subscribers; a connection's parts are in serving/.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from asyncio.selector_events import BaseSelectorEventLoop
from collections.abc import Callable
from ssl import SSLContext
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .limits import Limits, ServerStats
from .models import EchoEvent
from .serving.connection import Connection, event_frame
from .serving.listener import Acceptor
from .serving.plans import Plan, plan
from .serving.shutdown import serve_until_signal
from .serving.subscriber import Subscriber
from .wire.address import Address
from .wire.api import METHODS, Method, Procs
from .wire.backlog import event_size
from .wire.budget import Budget
from .wire.codec import StrictDecoder

if TYPE_CHECKING:
    from .bus import EventBus
    from .serving.stats import CallTiming

__all__ = ["Limits", "Server", "ServerStats", "serve"]

logger = logging.getLogger(__name__)

# asyncio's default of 100 makes a burst of connects fail before max_connections applies.
_BACKLOG = socket.SOMAXCONN
_REPLY_HEAD = 8  # ret and length, before the body that max_frame_size bounds
_ABORT_GRACE = 1.0  # seconds for cancelled procs to send their error replies


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class Server:
    """A running server. Create it with :func:`serve` or :meth:`Timer.serve`.

    Use ``async with`` to close it on exit, or :meth:`serve_forever`.
    """

    def __init__(self, timer: Procs, limits: Limits, loop: asyncio.AbstractEventLoop) -> None:
        """Not called directly: :func:`serve` returns a server that is listening."""
        self.timer = timer
        """The timer whose procs this server calls."""
        self.limits = limits
        """The bounds this server enforces."""
        self.loop = loop
        self.stats = ServerStats()
        """What the server did and what its bounds did, counted since it started."""
        self.budget = Budget(limits.memory_budget)
        self.decoder = StrictDecoder(limits.max_depth)
        """Every connection's requests are decoded by this one: they share the loop's thread."""
        self.plans: dict[str, tuple[Method[Any, Any], Plan]] = {
            name: (method, plan(method, timer, self.decoder, limits.max_items))
            for name, method in METHODS.items()
        }
        """What each method name runs: the method, and its plan (plans.py)."""
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.refused: set[Connection] = set()  # being aborted in connection_made
        self.closing = False
        self._subscribers: set[Subscriber] = set()  # each connection's subscriber side
        self.bus: EventBus | None = None
        """Where events travel beyond this process; ``None``: in process only."""
        self.timing: CallTiming | None = None
        """Per-method durations and errors, once someone reads them (stats.py)."""
        self.stats_enabled = False
        """Whether peers may call the ``server.stats`` extension."""
        self._stop_listening: Callable[[], None] | None = None
        self._address: Address | None = None
        self._server: asyncio.Server | None = None
        self._acceptor: Acceptor | None = None
        self._unix_path: str | None = None
        self._unix_inode: int | None = None
        self._closed = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()

    @property
    def address(self) -> str:
        """The address really bound, with the port the OS chose for port 0."""
        return str(self._address)

    def __repr__(self) -> str:
        state = "closed" if self._closed.is_set() else "closing" if self.closing else "serving"
        return (
            f"<Server {self.address} timer={self.timer.name!r} {state}, "
            f"{_count(len(self.connections), 'connection')}>"
        )

    async def serve_forever(self) -> None:
        """Wait until the server is closed. Cancelling this closes the server."""
        try:
            await self._closed.wait()
        except asyncio.CancelledError:
            await asyncio.shield(self.close())
            raise

    async def serve_until_signal(
        self, *, shutdown_timeout: float | None = 10.0, report: Callable[[str], Any] | None = None
    ) -> bool:
        """Serve until Ctrl-C or SIGTERM, then close gracefully, without a traceback.

        The first signal closes the server as :meth:`close` does, and says how
        many requests it is finishing (``report`` gets each message; by default
        the ``timer_sdk.shutdown`` logger, at WARNING when requests are in
        flight). A second signal is acknowledged, a third stops at once. Returns
        ``True`` if the close was graceful, ``False`` if a third signal cut it
        short. Main thread only: it uses ``loop.add_signal_handler``.
        ``shutdown_timeout`` is :meth:`close`'s ``timeout``: how long the
        requests in flight may take before they are cancelled.
        """
        return await serve_until_signal(self, shutdown_timeout=shutdown_timeout, report=report)

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has finished."""
        await self._closed.wait()

    async def close(self, timeout: float | None = 10.0) -> None:
        """Stop accepting, finish the requests already received, then close.

        Each connection answers every frame it had wholly received, then
        closes. After ``timeout`` seconds, procs still running are cancelled
        (their callers get an error reply), and a connection that still has
        not closed a moment later is aborted.
        Safe to call more than once; cancelling it aborts at once.
        """
        if self.closing:
            await self._closed.wait()
            return
        self.closing = True
        assert self._server is not None
        if self._acceptor is not None:
            await self._acceptor.close()
        self._server.close()
        await asyncio.sleep(0)  # connections already accepted reach connection_made
        for conn in list(self.connections):
            conn.shutdown()
        try:
            async with asyncio.timeout(timeout):
                await self._wait_idle()
        except TimeoutError:
            logger.warning("shutdown took over %s s: cancelling what is still running", timeout)
            for task in self.tasks:
                task.cancel()  # each caller still gets an error reply
            try:
                async with asyncio.timeout(_ABORT_GRACE):
                    await self._wait_idle()
            except TimeoutError:
                self._abort_all()
                await self._wait_idle()
        except asyncio.CancelledError:
            self._abort_all()
            self._finish_close()
            if self.bus is not None:
                await self.bus.close()
            raise
        if self.bus is not None:
            await self.bus.close()
        self._finish_close()

    async def _wait_idle(self) -> None:
        await self._drained.wait()
        while self.tasks:  # procs whose callers left still run to the end
            await asyncio.wait(tuple(self.tasks))

    def _abort_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()
        for task in self.tasks:
            task.cancel()

    def _finish_close(self) -> None:
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                if os.stat(self._unix_path).st_ino == self._unix_inode:
                    os.unlink(self._unix_path)
            self._unix_path = None
        self._closed.set()

    @property
    def subscribers(self) -> int:
        """How many connections are subscribed to events."""
        return len(self._subscribers)

    def _subscribe(self, conn: Subscriber) -> None:
        """Send this connection every event the timer fires."""
        self._subscribers.add(conn)
        self.budget.split(len(self._subscribers))
        if self.bus is not None and len(self._subscribers) == 1:
            self.bus.listen(True)
        if self._stop_listening is None:
            self._stop_listening = self.timer.add_echo_listener(self._publish_echo)

    def _reclaim(self) -> None:
        """Free what the budget can spare first: held events, and stale write charges.

        Called when a connection must wait for room, as gRPC reclaims idle
        buffers before busy ones; each subscriber's next drop notice counts them.
        """
        for sub in self._subscribers:
            sub.shed_backlog()
        for conn in self.connections:
            conn.refresh_charge()  # a write buffer the peer has drained since is not held

    def _unsubscribe(self, conn: Subscriber) -> None:
        """Stop sending events to this connection."""
        if conn in self._subscribers:  # every connection comes here as it closes
            self._subscribers.discard(conn)
            self.budget.split(len(self._subscribers))
        if self.bus is not None and not self._subscribers:
            self.bus.listen(False)
        if not self._subscribers and self._stop_listening is not None:
            self._stop_listening()
            self._stop_listening = None

    def _publish_echo(self, event: EchoEvent) -> None:
        subscribers = self._subscribers
        if event_size(event) > self.limits.max_frame_size:
            whole = event_frame(event)  # rare: the estimate says it may not fit
            if len(whole) - _REPLY_HEAD > self.limits.max_frame_size:
                # No subscriber could accept it; each one is told it was dropped.
                self.stats.oversize_events += 1
                for conn in subscribers:
                    conn.drop_event()
                return
        frame: bytes | None = None  # encoded once, never for subscribers who are not reading
        for conn in subscribers:
            if conn.events_paused:
                conn.hold_event(event)
            else:
                if frame is None:
                    frame = event_frame(event)
                conn.send_event(frame)

    def _connection_gone(self) -> None:
        if not self.connections and not self.refused:
            self._drained.set()

    def _protocol(self) -> Connection:
        return Connection(self)

    async def _start(
        self, address: Address, ssl: SSLContext | None, unix_mode: int, reuse_port: bool
    ) -> None:
        if address.scheme == "tls" and ssl is None:
            raise ValueError(f"{address}: a tls: address needs an ssl.SSLContext (ssl=...)")
        if address.scheme == "unix" and ssl is not None:
            raise ValueError(f"{address}: TLS is for tcp: and tls: addresses")
        # A handshake that never finishes is a slowloris too.
        handshake_timeout = (self.limits.frame_timeout or None) if ssl else None
        # On the selector loop we accept ourselves (listener.py); uvloop accepts well.
        own_accept = isinstance(self.loop, BaseSelectorEventLoop)
        if address.scheme == "unix":
            sock = _bind_unix(address.path, unix_mode)
            self._unix_path = address.path
            self._unix_inode = os.stat(address.path).st_ino
            self._server = await self.loop.create_unix_server(
                self._protocol, sock=sock, backlog=_BACKLOG, start_serving=not own_accept
            )
            self._address = address
        else:
            self._server = await self.loop.create_server(
                self._protocol,
                address.host,
                address.port,
                ssl=None if own_accept else ssl,
                reuse_address=True,
                reuse_port=reuse_port or None,
                backlog=_BACKLOG,
                ssl_handshake_timeout=None if own_accept else handshake_timeout,
                start_serving=not own_accept,
            )
            host, port = self._server.sockets[0].getsockname()[:2]
            self._address = Address("tls" if ssl else "tcp", host=host, port=port)
        if own_accept:
            self._acceptor = Acceptor(
                self.loop,
                [sock.dup() for sock in self._server.sockets],
                self._protocol,
                ssl=ssl,
                handshake_timeout=handshake_timeout,
                stats=self.stats,
                backlog=_BACKLOG,
            )

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _BusSink:
    """The server as its bus sees it (:class:`~timer_sdk.bus.EventSink`): others' events."""

    __slots__ = ("_server",)

    def __init__(self, server: Server) -> None:
        self._server = server

    @property
    def subscribers(self) -> int:
        return self._server.subscribers

    def deliver_echo(self, event: EchoEvent) -> None:
        """Fan out an event another server published on the bus."""
        self._server._publish_echo(event)

    def deliver_dropped(self, count: int) -> None:
        """Tell every subscriber that ``count`` events were lost on the bus."""
        for conn in self._server._subscribers:
            conn.note_dropped(count)

    def deliver_gap(self, reason: str) -> None:
        """Tell every subscriber that events may be missing here: the bus was cut off."""
        for conn in self._server._subscribers:
            conn.note_gap(reason)


def _bind_unix(path: str, mode: int) -> socket.socket:
    """Bind a listening Unix socket; replace only a stale socket file."""
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(existing.st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket", path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)  # stale: nothing listens on it
            else:
                raise OSError(errno.EADDRINUSE, f"a server is already listening on {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    timer: Procs,
    address: str | Address = "tcp:127.0.0.1:0",
    *,
    limits: Limits | None = None,
    ssl: SSLContext | None = None,
    unix_mode: int = 0o600,
    reuse_port: bool = False,
    bus: str | EventBus | None = None,
    stats: bool | None = None,
) -> Server:
    """Serve ``timer`` at ``address`` on the running loop; return once listening.

    ``address`` is ``tcp:HOST:PORT``, ``tls:HOST:PORT`` (with ``ssl``) or
    ``unix:PATH``; port 0 picks a free port, and :attr:`Server.address` tells
    which. ``limits`` bounds what peers may take (:class:`~timer_sdk.Limits`
    with its defaults if not given). ``ssl`` is the server's TLS context, for
    ``tls:`` (see the TLS guide). A Unix socket is created with ``unix_mode`` (owner only by
    default); an existing path is replaced only if it is a stale socket.
    ``reuse_port`` lets several processes share one TCP port (SO_REUSEPORT).
    ``bus`` carries events between servers of one timer: a ``nats://HOST:PORT``
    URL (the ``nats`` extra) or an :class:`~timer_sdk.bus.EventBus`; by
    default events stay in this process.
    ``stats`` lets peers call the ``server.stats`` extension, which reveals
    load; by default only on a ``unix:`` address, where the file mode guards it.

    Raises :class:`~timer_sdk.errors.AddressError` for a malformed address,
    :class:`~timer_sdk.bus.BusError` for a bus that cannot be used, and
    :class:`OSError` when the address cannot be bound.
    """
    server = Server(timer, limits or Limits(), asyncio.get_running_loop())
    parsed = Address.parse(address)
    server.stats_enabled = parsed.scheme == "unix" if stats is None else stats
    if bus is not None:
        from .bus import open_bus

        server.bus = open_bus(bus)
        assert server.bus is not None
        await server.bus.start(timer, _BusSink(server))
    try:
        await server._start(parsed, ssl, unix_mode, reuse_port)
    except BaseException:
        if server.bus is not None:
            await server.bus.close()
        raise
    logger.info("timer %r listening on %s", timer.name, server.address)
    return server
