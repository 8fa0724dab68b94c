"""One client connection: an :class:`asyncio.Protocol`, in-order replies.

The connection feeds a sans-I/O :class:`~timer_sdk.framing.RequestReader`,
dispatches every whole frame at once, and keeps an ordered queue of reply
slots: handlers run concurrently, replies leave in request order. A proc that
finishes without suspending never gets a Task. Replies that are ready
together go out in one write, and ``TCP_NODELAY`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, cast

from . import _eager
from .api import (
    EVENTS,
    METHODS,
    SUBSCRIBE,
    UNSUBSCRIBE,
    Method,
    encode_event,
    encode_events_dropped,
)
from .codec import DecodeError, decode_item, encode_item
from .errors import CallError
from .framing import (
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

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Connection", "event_frame"]

logger = logging.getLogger("timer_sdk.server")


class _Slot:
    """A reply's place in a connection's order; ``frame`` is set once ready."""

    __slots__ = ("frame",)

    def __init__(self, frame: bytes | None = None) -> None:
        self.frame = frame


def event_frame(event: EchoEvent) -> bytes:
    return encode_reply(RET_EVENT, encode_event("on_echo_fired", event))


def _error_frame(message: str) -> bytes:
    return encode_reply(RET_ERROR, message.encode())


class Connection(asyncio.Protocol):
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
            self._out.extend(event_frame(event) for event in self._event_backlog)
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

    def _dispatch_extension(self, request: Request) -> bytes | None:
        """Answer a method that is not a Timer proc: the event extension, or unknown."""
        if request.method == SUBSCRIBE:
            return self._subscribe(request.payload)
        if request.method == UNSUBSCRIBE:
            self._server.unsubscribe(self)
            return encode_reply(RET_OK, encode_item(None))
        self._stats.error_replies += 1
        return _error_frame(f"unknown method: {request.method}")

    # --- events ---------------------------------------------------------------

    def _subscribe(self, payload: bytes) -> bytes | None:
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
        bus = self._server.bus
        if bus is not None and bus.refusal is not None:
            self._stats.error_replies += 1
            return _error_frame(f"{SUBSCRIBE}: {bus.refusal}")
        self._server.subscribe(self)
        reply = encode_reply(RET_OK, encode_item({"events": names}))
        waiter = bus.ready() if bus is not None else None
        if waiter is None:
            return reply
        # The reply promises every event from here on: wait until the bus delivers them.
        slot = _Slot()
        self._slots.append(slot)
        task = self._loop.create_task(self._reply_when(waiter, slot, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._server.tasks.add(task)
        task.add_done_callback(self._server.tasks.discard)
        return None

    async def _reply_when(self, waiter: Awaitable[None], slot: _Slot, reply: bytes) -> None:
        try:
            await asyncio.shield(waiter)  # shared by every subscription waiting
            slot.frame = reply
        except asyncio.CancelledError:
            self._stats.error_replies += 1
            slot.frame = _error_frame(f"{SUBSCRIBE}: cancelled: the server is shutting down")
        self._slot_ready()

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

    def note_dropped(self, count: int) -> None:
        """Tell the peer that ``count`` events were lost before they reached this server."""
        if self._writing_paused:
            self._events_dropped += count  # sent first when the peer reads again
        elif self._transport is not None:
            self._out.append(encode_reply(RET_EVENTS_DROPPED, encode_events_dropped(count)))
            self._schedule_flush()

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


def _describe_peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "unix peer"
