"""One client connection: an :class:`asyncio.Protocol`, in-order replies.

The connection feeds a sans-I/O :class:`~timer_sdk.framing.RequestReader`,
dispatches whole frames, and keeps an ordered queue of reply slots: handlers
run concurrently, replies leave in request order. A proc that finishes
without suspending never gets a Task. Replies that are ready together go out
in one write, and ``TCP_NODELAY`` is set.

Everything it holds for its peer (the receive buffer, requests in flight,
replies not yet written, held events) is charged to the server's
:class:`~timer_sdk.budget.Budget`; when that is spent the connection stops
reading until bytes are freed. It handles at most ``_QUANTUM`` frames per
loop turn, so a busy peer cannot keep the loop from everyone else.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, cast

from . import _eager
from .api import (
    SUBSCRIBE,
    UNSUBSCRIBE,
    Method,
    decode_subscribe,
    encode_event,
    encode_events_dropped,
)
from .backlog import EventBacklog
from .budget import READ_HEADROOM
from .codec import DecodeError, encode_item
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

_QUANTUM = 64
"""Frames one connection handles per loop turn before the others get theirs."""

_IN_FLIGHT_COST = 2048
"""Bytes charged per running proc over its payload: its Task, frame and slot."""

_WRITE_HIGH = 64 * 1024
"""Unsent bytes past which a connection handles no more requests until its peer reads."""

_REPLY_HEAD = 8
"""Bytes of a reply frame before its body: ``ret`` and the body's length."""

_LINGER = 2.0
"""Seconds to drain a peer's unread requests after our last reply, before closing."""

_PEER_CHECK = 1.0
"""Seconds between looks at a peer we are not reading from, to see whether it is gone."""


class _Slot:
    """A reply's place in a connection's order; ``frame`` is set once ready."""

    __slots__ = ("charge", "frame")

    def __init__(self, frame: bytes | None, charge: int) -> None:
        self.frame = frame
        self.charge = charge  # bytes held for it: the request while running, then the reply


def event_frame(event: EchoEvent) -> bytes:
    return encode_reply(RET_EVENT, encode_event("on_echo_fired", event))


def _error_frame(message: str) -> bytes:
    return encode_reply(RET_ERROR, message.encode())


# Every read lands here first: reads happen one at a time on the loop, and each is
# handed over (copied into its connection's reader) before the next starts.
_SCRATCH = memoryview(bytearray(READ_HEADROOM))


class Connection(asyncio.BufferedProtocol):
    """One client connection.

    A BufferedProtocol, so that the size of each read is the budget's to
    choose: a read never takes more than the room left, give or take
    :data:`~timer_sdk.budget.MIN_READ`.
    """

    def __init__(self, server: Server) -> None:
        self._server = server
        self._timer = server.timer
        self._stats = server.stats
        self._loop = server.loop
        self._budget = server.budget
        limits = server.limits
        self._max_in_flight = limits.max_in_flight
        self._max_depth = limits.max_depth
        self._max_frame_size = limits.max_frame_size
        self._frame_timeout = limits.frame_timeout
        self._idle_timeout = limits.idle_timeout
        self._backlog = EventBacklog(
            max_count=limits.max_event_queue, max_bytes=limits.max_event_backlog
        )
        self._plans = server.plans
        self._reader = RequestReader(
            max_frame_size=limits.max_frame_size, max_method_length=limits.max_method_length
        )
        self._slots: deque[_Slot] = deque()
        self._slot_bytes = 0
        self._write_buffered = 0  # sampled while writing is paused; 0 once drained
        self.held = 0
        """Bytes this connection has charged to the server's budget."""
        self._received = 0  # the part of held that its reader buffers
        self._tasks: set[asyncio.Task[None]] = set()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._flush_scheduled = False
        self._reading_paused = False
        self._writing_paused = False
        self._budget_wait = False
        self._shutting_down = False
        self._peer_done = False  # the peer half-closed: nothing unread can follow
        self._lingering = False
        self._frame_deadline: asyncio.TimerHandle | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._peer_check: asyncio.TimerHandle | None = None
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
        # Unsent bytes are charged after every write: an upper bound until the
        # next write, re-checked whenever someone waits for room (refresh_charge).
        # A paused transport drains to 0 before it resumes us.
        transport.set_write_buffer_limits(high=_WRITE_HIGH, low=0)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # The reference leaves Nagle on and pays ~40 ms per call for it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._idle_timeout is not None:
            self._last_activity = self._loop.time()
            self._idle_handle = self._loop.call_later(self._idle_timeout, self._check_idle)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SCRATCH[: self._budget.read_size(self)]

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_SCRATCH[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self._lingering:
            return  # requests after our last reply: drained, never answered
        if self._idle_timeout is not None:
            self._last_activity = self._loop.time()
        self._reader.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        # Half-closed by the peer: finish what was read, then close our side.
        self._peer_done = True
        if self._lingering:
            return False
        self._shutting_down = True
        self._process()
        # Keeping a half-open TLS transport is not supported (asyncio warns).
        transport = self._transport
        return transport is not None and transport.get_extra_info("sslcontext") is None

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._write_buffered = 0
        backlog = self._backlog
        if len(backlog) or backlog.dropped:
            events = backlog.take()
            frames = list(map(event_frame, events))  # each fits: oversize ones never got here
            if backlog.dropped:
                notice = encode_events_dropped(backlog.take_dropped())
                self._out.append(encode_reply(RET_EVENTS_DROPPED, notice))
            self._stats.events_sent += len(frames)
            self._out.extend(frames)
        self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        server = self._server
        if self._transport is None:  # refused in connection_made
            server.refused.discard(self)
            server._connection_gone()
            return
        self._transport = None
        self._cancel_timers()
        self._out.clear()
        self._backlog.take()
        self._slots.clear()
        self._slot_bytes = self._write_buffered = 0
        self._budget.forget(self)
        self._recharge()
        # Nobody can receive these replies: cancel the work, as gRPC does.
        orphans = [task for task in self._tasks if not task.done()]
        for task in orphans:
            task.cancel()
        self._stats.orphans_cancelled += len(orphans)
        server.connections.discard(self)
        server.unsubscribe(self)
        server._connection_gone()

    # --- requests -----------------------------------------------------------

    def _process(self) -> None:
        """Handle the whole frames buffered, within the in-flight bound and a quantum."""
        transport = self._transport
        if transport is None or self._lingering:
            return
        reader = self._reader
        slots = self._slots
        out = self._out
        limit = self._max_in_flight
        quantum = _QUANTUM
        # Each frame adds at most one slot, so a batch within the in-flight room fits.
        while len(slots) < limit and not self._writing_paused:
            if not quantum:
                self._schedule_flush()  # the rest next turn, after everyone else
                break
            wanted = min(quantum, limit - len(slots))
            events = reader.take(wanted)
            if not events:
                break
            quantum -= len(events)
            for event in events:
                if type(event) is Request:
                    frame = self._dispatch(event)
                    if frame is None:
                        continue  # a slot was queued; the proc is running
                elif type(event) is Rejected:
                    self._stats.protocol_violations += 1
                    self._stats.error_replies += 1
                    logger.info("%s: %s: %s", self._peer, event.method, event.message)
                    frame = _error_frame(f"{event.method}: {event.message}")
                else:
                    assert isinstance(event, Broken)
                    self._stats.protocol_violations += 1
                    logger.warning("%s: closing: %s", self._peer, event.message)
                    self._shutting_down = True
                    if not event.answer:
                        break  # always the last event: the reader gives nothing after it
                    # Answer the whole frames before the bad one, then close.
                    frame = _error_frame(event.message)
                if slots:
                    slots.append(_Slot(frame, len(frame)))
                    self._slot_bytes += len(frame)
                else:
                    out.append(frame)
            if len(events) < wanted:
                break  # no whole frame is left: no bytes arrive while we answer
        if out:
            self._flush()
        self._recharge()
        completed_any = quantum < _QUANTUM
        blocked = len(slots) >= limit or self._writing_paused or not quantum
        if completed_any or blocked or not reader.in_frame:
            self._budget.finished(self)  # a grant covers one frame, while reading
        if self._shutting_down:
            self._arm_frame_deadline(completed_any, waiting_for_bytes=False)
            if not self._peer_done:
                self._pause_reading(True)
            if not slots and not self._writing_paused and not self._flush_scheduled:
                self._close_lingering()  # every whole frame received is answered
            return
        if not blocked and (self._budget_wait or not self._budget.may_read(self)):
            if not self._budget_wait:
                self._budget_wait = True
                self._stats.budget_waits += 1
                self._server.reclaim()  # idle buffers go before anyone waits long
            # Still armed: a frame that never gets room gets an error, not a hang.
            self._arm_frame_deadline(completed_any, waiting_for_bytes=True)
            self._pause_reading(True)
            return
        self._arm_frame_deadline(completed_any, waiting_for_bytes=not blocked)
        self._pause_reading(blocked)

    def _pause_reading(self, pause: bool) -> None:
        if pause != self._reading_paused and self._transport is not None:
            self._reading_paused = pause
            if pause:
                self._transport.pause_reading()
                self._watch_peer()
            else:
                self._transport.resume_reading()

    def _watch_peer(self) -> None:
        # A paused transport does not see a reset: without this, procs whose
        # caller is gone would run on, holding the budget, as long as they like.
        if self._peer_check is None and self._tasks:
            self._peer_check = self._loop.call_later(_PEER_CHECK, self._check_peer)

    def _check_peer(self) -> None:
        self._peer_check = None
        transport = self._transport
        if transport is None or not self._reading_paused:
            return
        if _hung_up(transport):
            logger.info("%s: gone while not being read; cancelling its calls", self._peer)
            transport.abort()  # connection_lost cancels the orphans
            return
        self._watch_peer()

    def _dispatch(self, request: Request) -> bytes | None:
        """Return the reply frame now, or queue a slot and return ``None``."""
        stats = self._stats
        stats.requests += 1
        planned = self._plans.get(request.method)
        if planned is None:
            return self._dispatch_extension(request)
        method, answer = planned
        by_method = stats.by_method  # known names only: peers cannot grow it
        by_method[method.name] = by_method.get(method.name, 0) + 1
        try:
            outcome = answer(request.payload)
        except DecodeError as exc:
            stats.error_replies += 1
            stats.protocol_violations += 1
            logger.info("%s: %s", self._peer, exc)
            return _error_frame(str(exc))
        except CallError as exc:
            stats.error_replies += 1
            return _error_frame(exc.message)
        except Exception:
            stats.error_replies += 1
            logger.exception("%s: %s raised", self._peer, method.name)
            return _error_frame(f"{method.name}: internal error")
        if isinstance(outcome, bytes):
            if len(outcome) - _REPLY_HEAD > self._max_frame_size:
                return self._oversize(method, len(outcome) - _REPLY_HEAD)
            return outcome
        slot = self._open_slot(len(request.payload) + _IN_FLIGHT_COST)
        self._track(self._loop.create_task(self._finish(method, outcome, slot)))
        return None

    def _open_slot(self, charge: int) -> _Slot:
        """Keep a reply's place in order, charging ``charge`` bytes until it is filled."""
        slot = _Slot(None, charge)
        self._slots.append(slot)
        self._slot_bytes += charge
        return slot

    def _track(self, task: asyncio.Task[None]) -> None:
        # This connection cancels it if its peer goes; the server waits for it on close.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._server.tasks.add(task)
        task.add_done_callback(self._server.tasks.discard)

    def _fill(self, slot: _Slot, frame: bytes) -> None:
        """Put a finished reply in its place; replies go out once those before it are in."""
        if self._transport is None:
            return  # an orphan: its caller is gone, and so is the slot
        slot.frame = frame
        self._slot_bytes += len(frame) - slot.charge
        slot.charge = len(frame)
        self._slot_ready()

    def _reply_frame(self, method: Method[Any, Any], result: Any) -> bytes:
        frame = method.encode_frame(result)
        if len(frame) - _REPLY_HEAD > self._max_frame_size:
            return self._oversize(method, len(frame) - _REPLY_HEAD)
        return frame

    def _oversize(self, method: Method[Any, Any], size: int) -> bytes:
        # Never send what a client with the same limit must refuse.
        self._stats.oversize_replies += 1
        self._stats.error_replies += 1
        return _error_frame(
            f"{method.name}: reply of {size} bytes exceeds the limit of "
            f"{self._max_frame_size} bytes"
        )

    async def _finish(
        self, method: Method[Any, Any], suspended: _eager.Suspended, slot: _Slot
    ) -> None:
        try:
            result = await _eager.resume(suspended)
            frame = self._reply_frame(method, result)
        except CallError as exc:
            self._stats.error_replies += 1
            frame = _error_frame(exc.message)
        except asyncio.CancelledError:
            if self._transport is None:
                return  # an orphan: its caller is gone, and so is the slot
            self._stats.error_replies += 1
            frame = _error_frame(f"{method.name}: cancelled: the server is shutting down")
        except Exception:
            self._stats.error_replies += 1
            logger.exception("%s: %s raised", self._peer, method.name)
            frame = _error_frame(f"{method.name}: internal error")
        self._fill(slot, frame)

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
            names = decode_subscribe(payload, max_depth=self._max_depth)
        except DecodeError as exc:
            self._stats.error_replies += 1
            return _error_frame(str(exc))
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
        slot = self._open_slot(_IN_FLIGHT_COST)
        self._track(self._loop.create_task(self._reply_when(waiter, slot, reply)))
        return None

    async def _reply_when(self, waiter: Awaitable[None], slot: _Slot, reply: bytes) -> None:
        try:
            await asyncio.shield(waiter)  # shared by every subscription waiting
            frame = reply
        except asyncio.CancelledError:
            if self._transport is None:
                return
            self._stats.error_replies += 1
            frame = _error_frame(f"{SUBSCRIBE}: cancelled: the server is shutting down")
        self._fill(slot, frame)

    @property
    def events_paused(self) -> bool:
        """Whether event frames must wait: the peer is not reading."""
        return self._writing_paused

    def hold_event(self, event: EchoEvent) -> None:
        """Keep an event until the peer reads again; drop the oldest past the bounds."""
        backlog = self._backlog
        lost = backlog.hold(event)
        self._recharge()
        while self._budget.over() and backlog.drop_oldest():
            lost += 1  # the server as a whole is full: this backlog yields first
            self._recharge()
        self._stats.events_dropped += lost

    def note_dropped(self, count: int) -> None:
        """Tell the peer that ``count`` events were lost before they reached this server."""
        self._backlog.dropped += count  # sent first when the peer reads again
        if not self._writing_paused and self._transport is not None:
            notice = encode_events_dropped(self._backlog.take_dropped())
            self._out.append(encode_reply(RET_EVENTS_DROPPED, notice))
            self._schedule_flush()

    def refresh_charge(self) -> None:
        """Re-read what is still unsent: the peer may have read it since our last write."""
        transport = self._transport
        if transport is not None:
            unsent = transport.get_write_buffer_size()
            if unsent != self._write_buffered:
                self._write_buffered = unsent
                self._recharge()

    def shed_backlog(self) -> None:
        """Drop every event held for this subscriber: a reading peer needs the room more."""
        backlog = self._backlog
        lost = 0
        while backlog.drop_oldest():
            lost += 1
        if lost:
            self._stats.events_dropped += lost
            self._recharge()

    def send_event(self, frame: bytes) -> None:
        """Send an event frame with the next write."""
        if self._transport is not None:
            self._stats.events_sent += 1
            self._out.append(frame)
            self._schedule_flush()

    def drop_event(self) -> None:
        """Count an event this subscriber will never get, for its next drop notice."""
        self._stats.events_dropped += 1
        self.note_dropped(1)

    # --- replies ------------------------------------------------------------

    def _slot_ready(self) -> None:
        slots = self._slots
        out = self._out
        while slots and slots[0].frame is not None:
            slot = slots.popleft()
            self._slot_bytes -= slot.charge
            out.append(slot.frame)  # type: ignore[arg-type]
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
        transport = self._transport
        if transport is not None:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            self._write_buffered = transport.get_write_buffer_size()
        out.clear()

    def _recharge(self) -> None:
        """Tell the budget what this connection holds now."""
        received = 0
        if self._transport is not None and not self._lingering:
            received = self._reader.buffered
        held = self._slot_bytes + self._write_buffered + self._backlog.bytes + received
        before = self.held
        if held != before or received != self._received:
            self.held = held
            self._budget.update(before, held, received - self._received)
            self._received = received

    @property
    def frame_needs(self) -> int:
        """Bytes still to come of the request being received (the budget's grant)."""
        return self._reader.frame_needs if self._transport is not None else 0

    def budget_granted(self) -> None:
        """Room was freed for this connection: read again (next turn)."""
        self._budget_wait = False
        self._schedule_flush()

    # --- endings ------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop reading; answer the frames already received; then close."""
        if self._transport is None or self._shutting_down:
            return
        self._shutting_down = True
        self._process()

    def abort(self) -> None:
        """Close now; cancel the procs still running for this connection."""
        for task in self._tasks:
            task.cancel()
        if self._transport is not None:
            self._transport.abort()

    def _close_lingering(self) -> None:
        """Close after the last reply without destroying it, as nginx does.

        Closing with unread requests in the socket makes the kernel send RST,
        and a RST can discard replies the peer has not read yet. So send FIN
        first, then read and drop until the peer closes or ``_LINGER`` passes.
        """
        transport = self._transport
        assert transport is not None
        if self._peer_done or not transport.can_write_eof():
            transport.close()  # TLS has no half-close; a finished peer sends nothing
            return
        try:
            transport.write_eof()
        except OSError:  # the peer reset meanwhile: nobody is left to linger for
            transport.abort()
            return
        self._lingering = True
        self._cancel_timers()
        self._recharge()  # what is left unread is dropped, not held
        self._pause_reading(False)
        self._frame_deadline = self._loop.call_later(_LINGER, transport.close)

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
        if self._budget_wait:
            method = self._reader.abandon_frame()
            if method is not None:
                # Our fault, not the peer's: answer, skip the rest, stay in sync.
                self._stats.budget_timeouts += 1
                self._stats.error_replies += 1
                self._out.append(
                    _error_frame(
                        f"{method}: the server's memory budget stayed spent for "
                        f"{self._frame_timeout} s; the request was dropped, try again later"
                    )
                )
                self._budget_wait = False
                self._budget.forget(self)
                self._schedule_flush()
                return
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
        for handle in (self._frame_deadline, self._idle_handle, self._peer_check):
            if handle is not None:
                handle.cancel()
        self._frame_deadline = self._idle_handle = self._peer_check = None


def _hung_up(transport: asyncio.Transport) -> bool:
    """Whether the peer reset the connection or closed it both ways.

    A FIN alone is a half-close, which still gets every reply; only a reset
    (TCP) or a full close (Unix) means that nobody will read them.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), 0)  # POLLHUP and POLLERR are always reported
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


def _describe_peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "unix peer"
