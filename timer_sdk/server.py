"""The in-library asyncio server: CBOR decoded at the socket edge, procs called directly.

Each connection is an :class:`asyncio.Protocol` (no reader task). It feeds a
sans-I/O :class:`~timer_sdk.framing.RequestReader`, dispatches every whole
frame at once, and keeps an ordered queue of reply slots: handlers run
concurrently, replies leave in request order. A proc that finishes without
suspending never gets a Task. Replies that are ready together go out in one
write, and ``TCP_NODELAY`` is set.

Bounds: in-flight requests per connection (reading pauses at the bound),
connections per server, frame and method-name sizes, CBOR depth, a deadline
to finish a frame once it has started, and an optional idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from ssl import SSLContext
from types import TracebackType
from typing import Any, cast

from . import _eager
from .address import Address
from .api import (
    EVENTS,
    METHODS,
    SUBSCRIBE,
    UNSUBSCRIBE,
    Method,
    encode_event,
    encode_events_dropped,
)
from .codec import DEFAULT_MAX_DEPTH, DecodeError, decode_item, encode_item
from .errors import CallError
from .framing import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_METHOD_LENGTH,
    RET_ERROR,
    RET_EVENT,
    RET_EVENTS_DROPPED,
    RET_OK,
    Broken,
    Rejected,
    Request,
    RequestReader,
    encode_reply,
)
from .models import EchoEvent
from .timer import Timer

__all__ = ["Limits", "Server", "ServerStats", "serve"]

logger = logging.getLogger("timer_sdk.server")

# asyncio's default of 100 makes a burst of connects fail before max_connections applies.
_BACKLOG = socket.SOMAXCONN
_ABORT_GRACE = 1.0  # seconds for cancelled procs to send their error replies


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound the server enforces. All are per server."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    """Largest request payload in bytes; a larger one gets an error reply."""
    max_method_length: int = DEFAULT_MAX_METHOD_LENGTH
    """Longest method name in bytes; a longer prefix closes the connection."""
    max_in_flight: int = 128
    """Requests per connection being handled at once; reading pauses at this bound."""
    max_connections: int = 1024
    """Open connections; one more is closed as soon as it is accepted."""
    max_depth: int = DEFAULT_MAX_DEPTH
    """Deepest CBOR nesting in a payload."""
    frame_timeout: float | None = 10.0
    """Seconds to finish a frame once its first byte arrived (defeats slowloris)."""
    idle_timeout: float | None = None
    """Close a connection with nothing in flight after this many quiet seconds."""
    max_event_queue: int = 1024
    """Events queued per remote subscriber before the oldest are dropped."""


@dataclass(slots=True)
class ServerStats:
    """Counters since the server started."""

    connections_accepted: int = 0
    connections_refused: int = 0
    requests: int = 0
    error_replies: int = 0
    protocol_violations: int = 0
    frame_timeouts: int = 0
    idle_timeouts: int = 0
    events_sent: int = 0
    events_dropped: int = 0
    by_method: dict[str, int] = field(default_factory=dict)


class _Slot:
    """A reply's place in a connection's order; ``frame`` is set once ready."""

    __slots__ = ("frame",)

    def __init__(self, frame: bytes | None = None) -> None:
        self.frame = frame


def _event_frame(event: EchoEvent) -> bytes:
    return encode_reply(RET_EVENT, encode_event("on_echo_fired", event))


def _error_frame(message: str) -> bytes:
    return encode_reply(RET_ERROR, message.encode())


class _Connection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._timer = server.timer
        self._stats = server.stats
        self._loop = server.loop
        limits = server.limits
        self._max_in_flight = limits.max_in_flight
        self._max_depth = limits.max_depth
        self._frame_timeout = limits.frame_timeout
        self._idle_timeout = limits.idle_timeout
        self._max_event_queue = limits.max_event_queue
        self._event_backlog: deque[EchoEvent] = deque()  # held while writes are paused
        self._events_dropped = 0
        self._reader = RequestReader(
            max_frame_size=limits.max_frame_size, max_method_length=limits.max_method_length
        )
        self._slots: deque[_Slot] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._flush_scheduled = False
        self._reading_paused = False
        self._writing_paused = False
        self._shutting_down = False
        self._frame_deadline: asyncio.TimerHandle | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._last_activity = 0.0

    # --- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        server = self._server
        self._peer = _describe_peer(transport)
        if server.closing or len(server.connections) >= server.limits.max_connections:
            self._stats.connections_refused += 1
            logger.warning("refusing %s: %d connections open", self._peer, len(server.connections))
            server.refused.add(self)  # close() waits for the abort to finish too
            server._drained.clear()
            transport.abort()
            return
        self._transport = transport
        server.connections.add(self)
        # Here, not at accept: a TLS handshake that fails never reaches this point.
        server._drained.clear()
        self._stats.connections_accepted += 1
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # The reference leaves Nagle on and pays ~40 ms per call for it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._idle_timeout is not None:
            self._last_activity = self._loop.time()
            self._idle_handle = self._loop.call_later(self._idle_timeout, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self._idle_timeout is not None:
            self._last_activity = self._loop.time()
        self._reader.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        # Half-closed by the peer: finish what was read, then close our side.
        self._shutting_down = True
        self._process()
        # Keeping a half-open TLS transport is not supported (asyncio warns).
        transport = self._transport
        return transport is not None and transport.get_extra_info("sslcontext") is None

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._events_dropped:
            notice = encode_events_dropped(self._events_dropped)
            self._out.append(encode_reply(RET_EVENTS_DROPPED, notice))
            self._events_dropped = 0
        if self._event_backlog:
            self._stats.events_sent += len(self._event_backlog)
            self._out.extend(_event_frame(event) for event in self._event_backlog)
            self._event_backlog.clear()
        self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is None:  # refused in connection_made
            self._server.refused.discard(self)
            self._server._connection_gone()
            return
        self._transport = None
        self._cancel_timers()
        self._out.clear()
        self._event_backlog.clear()
        self._server.connections.discard(self)
        self._server.unsubscribe(self)
        self._server._connection_gone()
        # In-flight procs run to the end: work accepted is not cut short.

    # --- requests -----------------------------------------------------------

    def _process(self) -> None:
        """Handle every whole frame buffered, within the in-flight bound."""
        transport = self._transport
        if transport is None:
            return
        reader = self._reader
        slots = self._slots
        out = self._out
        limit = self._max_in_flight
        completed_any = False
        while len(slots) < limit and not self._writing_paused:
            event = reader.next_event()
            if event is None:
                break
            completed_any = True
            if type(event) is Request:
                frame = self._dispatch(event)
            elif type(event) is Rejected:
                self._stats.protocol_violations += 1
                self._stats.error_replies += 1
                logger.info("%s: %s: %s", self._peer, event.method, event.message)
                frame = _error_frame(f"{event.method}: {event.message}")
            else:
                assert isinstance(event, Broken)
                self._stats.protocol_violations += 1
                logger.warning("%s: closing: %s", self._peer, event.message)
                # Answer the whole frames before the bad one, then close.
                self._shutting_down = True
                if not self._reading_paused:
                    self._reading_paused = True
                    transport.pause_reading()
                break
            if frame is None:
                continue  # a slot was queued; the proc is running
            if slots:
                slots.append(_Slot(frame))
            else:
                out.append(frame)
        if out:
            self._flush()
        blocked = len(slots) >= limit or self._writing_paused
        self._arm_frame_deadline(completed_any, waiting_for_bytes=not blocked)
        if self._shutting_down:
            if not slots and not self._writing_paused:
                transport.close()  # every whole frame received is answered
            return
        if blocked and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not blocked and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _dispatch(self, request: Request) -> bytes | None:
        """Return the reply frame now, or queue a slot and return ``None``."""
        stats = self._stats
        stats.requests += 1
        method = METHODS.get(request.method)
        if method is None:
            return self._dispatch_extension(request)
        by_method = stats.by_method  # known names only: peers cannot grow it
        by_method[method.name] = by_method.get(method.name, 0) + 1
        try:
            params = method.decode_params(request.payload, max_depth=self._max_depth)
        except DecodeError as exc:
            stats.error_replies += 1
            stats.protocol_violations += 1
            logger.info("%s: %s", self._peer, exc)
            return _error_frame(str(exc))
        try:
            outcome = _eager.start(method.invoke(self._timer, params))
            if type(outcome) is not _eager.Suspended:
                return encode_reply(RET_OK, method.encode_result(outcome))
        except CallError as exc:
            stats.error_replies += 1
            return _error_frame(exc.message)
        except Exception:
            stats.error_replies += 1
            logger.exception("%s: %s raised", self._peer, method.name)
            return _error_frame(f"{method.name}: internal error")
        slot = _Slot()
        self._slots.append(slot)
        task = self._loop.create_task(self._finish(method, outcome, slot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._server.tasks.add(task)
        task.add_done_callback(self._server.tasks.discard)
        return None

    async def _finish(
        self, method: Method[Any, Any], suspended: _eager.Suspended, slot: _Slot
    ) -> None:
        try:
            result = await _eager.resume(suspended)
            slot.frame = encode_reply(RET_OK, method.encode_result(result))
        except CallError as exc:
            self._stats.error_replies += 1
            slot.frame = _error_frame(exc.message)
        except asyncio.CancelledError:
            self._stats.error_replies += 1
            slot.frame = _error_frame(f"{method.name}: cancelled: the server is shutting down")
        except Exception:
            self._stats.error_replies += 1
            logger.exception("%s: %s raised", self._peer, method.name)
            slot.frame = _error_frame(f"{method.name}: internal error")
        self._slot_ready()

    def _dispatch_extension(self, request: Request) -> bytes:
        """Answer a method that is not a Timer proc: the event extension, or unknown."""
        if request.method == SUBSCRIBE:
            return self._subscribe(request.payload)
        if request.method == UNSUBSCRIBE:
            self._server.unsubscribe(self)
            return encode_reply(RET_OK, encode_item(None))
        self._stats.error_replies += 1
        return _error_frame(f"unknown method: {request.method}")

    # --- events ---------------------------------------------------------------

    def _subscribe(self, payload: bytes) -> bytes:
        try:
            item = decode_item(payload, max_depth=self._max_depth) if payload else {}
        except DecodeError as exc:
            return _error_frame(f"{SUBSCRIBE}: invalid request: {exc}")
        names = item.get("events", list(EVENTS)) if isinstance(item, dict) else None
        if (
            not isinstance(item, dict)
            or set(item) - {"events"}
            or not isinstance(names, list)
            or not names
            or any(name not in EVENTS for name in names)
        ):
            known = ", ".join(EVENTS)
            return _error_frame(
                f"{SUBSCRIBE}: invalid request: expected {{}} or {{events: [names]}} with names "
                f"from: {known}"
            )
        self._server.subscribe(self)
        return encode_reply(RET_OK, encode_item({"events": names}))

    @property
    def events_paused(self) -> bool:
        """Whether event frames must wait: the peer is not reading."""
        return self._writing_paused

    def hold_event(self, event: EchoEvent) -> None:
        """Keep an event until the peer reads again, dropping the oldest past the bound."""
        backlog = self._event_backlog
        if len(backlog) >= self._max_event_queue:
            backlog.popleft()  # the oldest goes; the notice says how many
            self._events_dropped += 1
            self._stats.events_dropped += 1
        backlog.append(event)

    def send_event(self, frame: bytes) -> None:
        """Send an event frame with the next write."""
        if self._transport is not None:
            self._stats.events_sent += 1
            self._out.append(frame)
            self._schedule_flush()

    # --- replies ------------------------------------------------------------

    def _slot_ready(self) -> None:
        slots = self._slots
        out = self._out
        while slots and slots[0].frame is not None:
            out.append(slots.popleft().frame)  # type: ignore[arg-type]
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # Frames that become ready in the same loop iteration share one write.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._after_completions)

    def _after_completions(self) -> None:
        self._flush_scheduled = False
        if self._out:
            self._flush()
        self._process()

    def _flush(self) -> None:
        out = self._out
        if self._transport is not None:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    # --- endings ------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop reading; answer the frames already received; then close."""
        if self._transport is None or self._shutting_down:
            return
        self._shutting_down = True
        if not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        self._process()

    def abort(self) -> None:
        """Close now; cancel the procs still running for this connection."""
        for task in self._tasks:
            task.cancel()
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, reason: str) -> None:
        self._stats.protocol_violations += 1
        logger.warning("%s: closing: %s", self._peer, reason)
        if self._transport is not None:
            self._transport.close()

    def _arm_frame_deadline(self, completed_any: bool, *, waiting_for_bytes: bool) -> None:
        timeout = self._frame_timeout
        if timeout is None:
            return
        handle = self._frame_deadline
        if waiting_for_bytes and self._reader.in_frame:
            if handle is None or completed_any:
                if handle is not None:
                    handle.cancel()
                self._frame_deadline = self._loop.call_later(timeout, self._frame_timed_out)
        elif handle is not None:
            handle.cancel()
            self._frame_deadline = None

    def _frame_timed_out(self) -> None:
        self._frame_deadline = None
        self._stats.frame_timeouts += 1
        self._fail(f"frame not finished within {self._frame_timeout} s")

    def _check_idle(self) -> None:
        assert self._idle_timeout is not None
        quiet = self._loop.time() - self._last_activity
        if quiet >= self._idle_timeout and not self._slots and self._transport is not None:
            self._idle_handle = None
            self._stats.idle_timeouts += 1
            logger.info("%s: closing after %.1f s idle", self._peer, quiet)
            self._transport.close()
            return
        wait = max(self._idle_timeout - quiet, 0.01)
        self._idle_handle = self._loop.call_later(wait, self._check_idle)

    def _cancel_timers(self) -> None:
        for handle in (self._frame_deadline, self._idle_handle):
            if handle is not None:
                handle.cancel()
        self._frame_deadline = self._idle_handle = None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _describe_peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "unix peer"


class Server:
    """A running server. Create it with :func:`serve` or :meth:`Timer.serve`.

    Use ``async with`` to close it on exit, or :meth:`serve_forever`.
    """

    def __init__(self, timer: Timer, limits: Limits, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = timer
        self.limits = limits
        self.loop = loop
        self.stats = ServerStats()
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.refused: set[_Connection] = set()  # being aborted in connection_made
        self.closing = False
        self._subscribers: set[_Connection] = set()
        self._stop_listening: Callable[[], None] | None = None
        self._address: Address | None = None
        self._server: asyncio.Server | None = None
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
            raise
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

    def subscribe(self, conn: _Connection) -> None:
        """Send this connection every event the timer fires."""
        self._subscribers.add(conn)
        if self._stop_listening is None:
            self._stop_listening = self.timer.add_echo_listener(self._publish_echo)

    def unsubscribe(self, conn: _Connection) -> None:
        """Stop sending events to this connection."""
        self._subscribers.discard(conn)
        if not self._subscribers and self._stop_listening is not None:
            self._stop_listening()
            self._stop_listening = None

    def _publish_echo(self, event: EchoEvent) -> None:
        frame = None  # encoded once for all, and never for subscribers who are not reading
        for conn in self._subscribers:
            if conn.events_paused:
                conn.hold_event(event)
            else:
                if frame is None:
                    frame = _event_frame(event)
                conn.send_event(frame)

    def _connection_gone(self) -> None:
        if not self.connections and not self.refused:
            self._drained.set()

    def _protocol(self) -> _Connection:
        return _Connection(self)

    async def _start(
        self, address: Address, ssl: SSLContext | None, unix_mode: int, reuse_port: bool
    ) -> None:
        if address.scheme == "tls" and ssl is None:
            raise ValueError(f"{address}: a tls: address needs an ssl.SSLContext (ssl=...)")
        if address.scheme == "unix":
            if ssl is not None:
                raise ValueError(f"{address}: TLS is for tcp: and tls: addresses")
            sock = _bind_unix(address.path, unix_mode)
            self._unix_path = address.path
            self._unix_inode = os.stat(address.path).st_ino
            self._server = await self.loop.create_unix_server(
                self._protocol, sock=sock, backlog=_BACKLOG
            )
            self._address = address
            return
        self._server = await self.loop.create_server(
            self._protocol,
            address.host,
            address.port,
            ssl=ssl,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=_BACKLOG,
            # A handshake that never finishes is a slowloris too.
            ssl_handshake_timeout=(self.limits.frame_timeout or None) if ssl else None,
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        self._address = Address("tls" if ssl else "tcp", host=host, port=port)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


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
    timer: Timer,
    address: str | Address = "tcp:127.0.0.1:0",
    *,
    limits: Limits | None = None,
    ssl: SSLContext | None = None,
    unix_mode: int = 0o600,
    reuse_port: bool = False,
) -> Server:
    """Serve ``timer`` at ``address`` on the running loop; return once listening.

    ``address`` is ``tcp:HOST:PORT``, ``tls:HOST:PORT`` (with ``ssl``) or
    ``unix:PATH``; port 0 picks a free port, and :attr:`Server.address` tells
    which. A Unix socket is created with ``unix_mode`` (owner only by
    default); an existing path is replaced only if it is a stale socket.
    ``reuse_port`` lets several processes share one TCP port (SO_REUSEPORT).

    Raises :class:`~timer_sdk.errors.AddressError` for a malformed address and
    :class:`OSError` when the address cannot be bound.
    """
    server = Server(timer, limits or Limits(), asyncio.get_running_loop())
    await server._start(Address.parse(address), ssl, unix_mode, reuse_port)
    logger.info("timer %r listening on %s", timer.name, server.address)
    return server
