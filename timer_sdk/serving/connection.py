"""One client connection: an :class:`asyncio.Protocol`, in-order replies.

The connection feeds a sans-I/O :class:`~timer_sdk.wire.framing.RequestReader`,
dispatches whole frames, and keeps an ordered queue of reply slots: handlers
run concurrently, replies leave in request order. A proc that finishes
without suspending never gets a Task. Replies that are ready together go out
in one write, and ``TCP_NODELAY`` is set.

Everything it holds for its peer (the receive buffer, requests in flight,
replies not yet written, held events) is charged to the server's
:class:`~timer_sdk.wire.budget.Budget`; a frame that does not fit waits unread
until bytes are freed. It handles at most ``_QUANTUM`` frames per loop turn,
so a busy peer cannot keep the loop from everyone else.

A connection is assembled from parts, each an object with its own state and a
small interface that can be read and tested alone: its reply order
(:class:`~.replies.Replies`), its part in the budget (:class:`~.charges.Charges`,
the budget's holder), how it ends (:class:`~.endings.Endings`: deadlines,
lingering close, peer checks) and its side as an event subscriber
(:class:`~.subscriber.Subscriber`). Each part reaches back through a protocol
naming what it needs of the connection.

The hot path stays one tight loop here, in :meth:`Connection._process`: it
binds the reader, the reply queue and its output list to locals once per turn
and appends replies itself (what :meth:`~.replies.Replies.answer` does,
inlined), so that a frame costs what it cost before the parts were split.

Over 400 lines: the asyncio callbacks and the request loop share the
connection's state; its parts are in their own modules beside it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any, cast

from .. import _eager
from ..errors import CallError
from ..wire.api import Method
from ..wire.backlog import EventBacklog
from ..wire.budget import IN_FLIGHT_COST, READ_HEADROOM
from ..wire.codec import DecodeError
from ..wire.framing import Broken, Rejected, Request, RequestReader, encode_error
from .charges import Charges
from .endings import Endings
from .replies import Replies, _Slot
from .subscriber import WRITE_HIGH, Subscriber, event_frame

if TYPE_CHECKING:
    from ..limits import ServerStats
    from .host import Host

__all__ = ["Connection", "event_frame"]

logger = logging.getLogger("timer_sdk.connection")

_QUANTUM = 64
"""Frames one connection handles per loop turn before the others get theirs."""

_REPLY_HEAD = 8
"""Bytes of a reply frame before its body: ``ret`` and the body's length."""


# Every read lands here first: reads happen one at a time on the loop, and each is
# handed over (copied into its connection's reader) before the next starts.
_SCRATCH = memoryview(bytearray(READ_HEADROOM))


class Connection(asyncio.BufferedProtocol):
    """One client connection.

    A BufferedProtocol, so that the size of each read is the budget's to
    choose: a read never takes more than the room left, give or take
    :data:`~timer_sdk.wire.budget.MIN_READ`.
    """

    def __init__(self, server: Host) -> None:
        self._server = server
        self._timer = server.timer
        self._stats = stats = server.stats
        self._loop = server.loop
        self._budget = budget = server.budget
        limits = server.limits
        self._max_in_flight = limits.max_in_flight
        self._max_frame_size = limits.max_frame_size
        self._idle_timeout = limits.idle_timeout
        self._backlog = EventBacklog(
            max_count=limits.max_event_queue, max_bytes=limits.max_event_backlog
        )
        self._plans = server.plans
        self._reader = RequestReader(
            max_frame_size=limits.max_frame_size, max_method_length=limits.max_method_length
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._flush_scheduled = False
        self._reading_paused = False
        self._writing_paused = False
        self._shutting_down = False
        self._peer_done = False  # the peer half-closed: nothing unread can follow
        self._lingering = False
        self._goaway = False  # the peer asked for the close notice (server.goaway)
        # The parts: each holds its own state.
        self._replies = replies = Replies()
        self._charges = charges = Charges(
            self, budget=budget, stats=stats, reader=self._reader, backlog=self._backlog,
            replies=replies, reclaim=server._reclaim,
        )  # fmt: skip
        self._endings = Endings(
            self, loop=self._loop, stats=stats, reader=self._reader, replies=replies,
            budget=budget, holder=charges, frame_timeout=limits.frame_timeout,
            idle_timeout=limits.idle_timeout,
        )  # fmt: skip
        self._subscriber = Subscriber(
            self, server=server, stats=stats, budget=budget, backlog=self._backlog,
            replies=replies, charges=charges, max_depth=limits.max_depth,
        )  # fmt: skip

    @property
    def held(self) -> int:
        """Bytes this connection has charged to the server's budget."""
        return self._charges.held

    @property
    def events_paused(self) -> bool:
        """Whether event frames must wait (see :attr:`Subscriber.events_paused`)."""
        return self._subscriber.events_paused

    def shutdown(self) -> None:
        """Stop reading; answer the frames already received; then close."""
        if self._transport is None or self._shutting_down:
            return
        self._shutting_down = True
        self._endings.reason = "the server is shutting down"
        self._process()

    def abort(self) -> None:
        """Close now; cancel the procs still running for this connection."""
        for task in self._tasks:
            task.cancel()
        if self._transport is not None:
            self._transport.abort()

    def refresh_charge(self) -> None:
        """Re-read what is still unsent (see :meth:`Charges.refresh_charge`)."""
        self._charges.refresh_charge()

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
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=0)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # The reference leaves Nagle on and pays ~40 ms per call for it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._endings.start_idle_clock()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SCRATCH[: self._budget.read_size(self._charges)]

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_SCRATCH[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self._lingering:
            return  # requests after our last reply: drained, never answered
        if self._idle_timeout is not None:
            self._endings.last_activity = self._loop.time()
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
        charges = self._charges
        charges.write_buffered = charges.event_unsent = 0
        self._subscriber.caught_up()
        self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        server = self._server
        if self._transport is None:  # refused in connection_made
            server.refused.discard(self)
            server._connection_gone()
            return
        self._transport = None
        server.connections.discard(self)  # at once: _reclaim asks only those with a transport
        self._endings.cancel_timers()
        self._replies.clear()
        self._backlog.take()
        charges = self._charges
        charges.write_buffered = charges.event_pending = charges.event_unsent = 0
        self._budget.forget(charges)
        charges.recharge()
        # Nobody can receive these replies: cancel the work, as gRPC does.
        orphans = [task for task in self._tasks if not task.done()]
        for task in orphans:
            task.cancel()
        self._stats.orphans_cancelled += len(orphans)
        server._unsubscribe(self._subscriber)
        server._connection_gone()

    # --- requests -----------------------------------------------------------

    def _process(self) -> None:
        """Handle the whole frames buffered, within the in-flight bound and a quantum."""
        transport = self._transport
        if transport is None or self._lingering:
            return
        reader = self._reader
        replies = self._replies
        slots = replies.slots
        out = replies.out
        limit = self._max_in_flight
        quantum = _QUANTUM
        charges = self._charges
        # Each frame may become a running request: start no more than the budget holds.
        startable = self._budget.startable(charges)
        held_back = False
        # Each frame adds at most one slot, so a batch within the in-flight room fits.
        while len(slots) < limit and not self._writing_paused:
            if not quantum:
                self._schedule_flush()  # the rest next turn, after everyone else
                break
            if not startable:
                held_back = reader.buffered > 0 and not reader.frame_needs  # a whole frame
                break
            wanted = min(quantum, limit - len(slots), startable)
            events = reader.take(wanted)
            if not events:
                break
            quantum -= len(events)
            startable -= len(events)
            for event in events:
                if type(event) is Request:
                    frame = self._dispatch(event)
                    if frame is None:
                        continue  # a slot was queued; the proc is running
                elif type(event) is Rejected:
                    self._stats.protocol_violations += 1
                    self._stats.error_replies += 1
                    logger.info("%s: %s: %s", self._peer, event.method, event.message)
                    frame = encode_error(f"{event.method}: {event.message}")
                else:
                    assert isinstance(event, Broken)
                    self._stats.protocol_violations += 1
                    logger.warning("%s: closing: %s", self._peer, event.message)
                    self._shutting_down = True
                    self._endings.reason = event.message
                    if not event.answer:
                        break  # always the last event: the reader gives nothing after it
                    # Answer the whole frames before the bad one, then close.
                    frame = encode_error(event.message)
                if slots:  # Replies.answer, inlined
                    slots.append(_Slot(frame, len(frame)))
                    replies.held += len(frame)
                else:
                    out.append(frame)
            if len(events) < wanted:
                break  # no whole frame is left: no bytes arrive while we answer
        if out:
            self._flush()
        charges.recharge()
        completed_any = quantum < _QUANTUM
        blocked = len(slots) >= limit or self._writing_paused or not quantum
        if completed_any or blocked:
            self._budget.finished(charges)  # a grant covers one frame, while reading
        endings = self._endings
        if self._shutting_down:
            endings.frame_clock(False, completed_any)
            if not self._peer_done:
                self._pause_reading(True)
            if not slots and not self._writing_paused and not self._flush_scheduled:
                endings.close_lingering()  # every whole frame received is answered
            return
        # Paused by our own choice (in-flight bound, unsent replies, budget):
        # the frame deadline stops too, as it is for slow peers only.
        reading = not blocked and charges.admitted(held_back)
        if reading and held_back:
            self._schedule_flush()  # room for the next request now: start it next turn
        endings.frame_clock(reading, completed_any)
        self._pause_reading(not reading)

    def _pause_reading(self, pause: bool) -> None:
        if pause != self._reading_paused and self._transport is not None:
            self._reading_paused = pause
            if pause:
                self._transport.pause_reading()
                self._endings.watch_peer()
            else:
                self._transport.resume_reading()

    def _dispatch(self, request: Request) -> bytes | None:
        """Return the reply frame now, or queue a slot and return ``None``."""
        stats = self._stats
        planned = self._plans.get(request.method)
        if planned is None:
            return self._subscriber.dispatch(request)  # it counts the request, or not
        stats.requests += 1
        method, answer = planned
        by_method = stats.by_method  # known names only: peers cannot grow it
        by_method[method.name] = by_method.get(method.name, 0) + 1
        try:
            outcome = answer(request.payload)
        except DecodeError as exc:
            _count_error(stats, method.name)
            stats.protocol_violations += 1
            logger.info("%s: %s", self._peer, exc)
            return encode_error(str(exc))
        except CallError as exc:
            _count_error(stats, method.name)
            return encode_error(exc.message)
        except Exception:
            _count_error(stats, method.name)
            logger.exception("%s: %s raised", self._peer, method.name)
            return encode_error(f"{method.name}: internal error")
        if isinstance(outcome, bytes):
            if len(outcome) - _REPLY_HEAD > self._max_frame_size:
                return self._oversize(method, len(outcome) - _REPLY_HEAD)
            return outcome
        # Charged what it holds while it runs: its decoded arguments (text can take up to
        # 4 bytes a character), never less than its payload.
        slot = self._replies.open(max(len(request.payload), outcome.held) + IN_FLIGHT_COST)
        self._track(self._loop.create_task(self._finish(method, outcome, slot)))
        return None

    def _answer(self, frame: bytes) -> None:
        """Send ``frame`` as the reply to the next request, after those before it."""
        if self._replies.answer(frame):
            self._schedule_flush()

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
        self._replies.fill(slot, frame)
        self._schedule_flush()

    def _reply_frame(self, method: Method[Any, Any], result: Any) -> bytes:
        frame = method.encode_frame(result)
        if len(frame) - _REPLY_HEAD > self._max_frame_size:
            return self._oversize(method, len(frame) - _REPLY_HEAD)
        return frame

    def _oversize(self, method: Method[Any, Any], size: int) -> bytes:
        # Never send what a client with the same limit must refuse.
        self._stats.oversize_replies += 1
        _count_error(self._stats, method.name)
        return encode_error(
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
            _count_error(self._stats, method.name)
            frame = encode_error(exc.message)
        except asyncio.CancelledError:
            if self._transport is None:
                return  # an orphan: its caller is gone, and so is the slot
            _count_error(self._stats, method.name)
            frame = encode_error(f"{method.name}: cancelled: the server is shutting down")
        except Exception:
            _count_error(self._stats, method.name)
            logger.exception("%s: %s raised", self._peer, method.name)
            frame = encode_error(f"{method.name}: internal error")
        self._fill(slot, frame)

    # --- replies ------------------------------------------------------------

    def _schedule_flush(self) -> None:
        # Frames that become ready in the same loop iteration share one write.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._after_completions)

    def _after_completions(self) -> None:
        self._flush_scheduled = False
        if self._replies.out:
            self._flush()
        self._process()

    def _flush(self) -> None:
        out = self._replies.out
        charges = self._charges
        transport = self._transport
        if transport is not None:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            charges.write_buffered = transport.get_write_buffer_size()
            if charges.event_pending or charges.event_unsent:
                written = charges.event_unsent + charges.event_pending
                charges.event_unsent = min(written, charges.write_buffered)
        charges.event_pending = 0
        out.clear()
        subscriber = self._subscriber
        if subscriber.behind and not charges.write_buffered:
            subscriber.caught_up()  # all sent at once: no pause, so no resume either
            self._schedule_flush()

    # --- what the parts call back -------------------------------------------

    def _recharge(self) -> None:
        self._charges.recharge()

    def _stop_events(self) -> None:
        self._server._unsubscribe(self._subscriber)

    def _caught_up(self) -> None:
        self._subscriber.caught_up()


def _describe_peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "unix peer"


def _count_error(stats: ServerStats, name: str) -> None:
    """An error reply to a call of ``name`` (a method this server knows)."""
    stats.error_replies += 1
    errors = stats.errors_by_method
    errors[name] = errors.get(name, 0) + 1
