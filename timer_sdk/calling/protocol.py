"""The connection under a TimerClient: the pending FIFO, backpressure, liveness.

The protocol has no request ids: the n-th reply answers the n-th request.
:class:`_ClientProtocol` keeps a FIFO of pending calls; :meth:`~_ClientProtocol.send`
queues a call's slot and writes its frame with nothing in between, so
concurrent calls cannot interleave wrongly. A slot whose caller gave up stays
in the FIFO; its reply is read and dropped in its place. Opening it is
``dialer.py``'s.

Over 400 lines: its read and write paths share the pending FIFO, and
splitting them would split its one invariant (the n-th reply answers the
n-th request) across files.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Protocol, cast

from ..errors import (
    CallNotStarted,
    ClientClosedError,
    ConnectionLost,
    ProtocolError,
    RemoteCallError,
    TimerConnectionError,
)
from ..events import Subscription
from ..wire import api
from ..wire.framing import (
    RET_ERROR,
    RET_EVENT,
    RET_EVENTS_DROPPED,
    RET_GOAWAY,
    RET_OK,
    Broken,
    ReplyReader,
    encode_request,
)
from .deadlines import Deadlines

__all__ = ["DEFAULT_MAX_PENDING"]

logger = logging.getLogger("timer_sdk.client_protocol")

_unpack_reply_head = struct.Struct(">iI").unpack_from


class _ReplyDecoder(Protocol):
    """What a pending call needs to turn its reply body into a result."""

    @property
    def name(self) -> str: ...

    def decode_result(self, body: bytes, /) -> Any: ...


class _Raw:
    """The decoder of :meth:`TimerClient.call_raw`: the body, as is."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def decode_result(self, body: bytes, /) -> bytes:
        return body


_Pending = tuple[_ReplyDecoder, "asyncio.Future[Any]", bytes]
"""A call written and not answered: its decoder, its future, and its frame, to
send again elsewhere if the server closes before reading it."""
_Call = tuple[bytes, _ReplyDecoder, "asyncio.Future[Any]"]
"""A call to send: its frame, its decoder, its future."""

DEFAULT_MAX_PENDING = 1024
"""Calls one connection keeps in flight; more wait for a slot (``max_pending``)."""
_CORK_LIMIT = 64 * 1024  # bytes of small frames batched into one write
_DRAIN_CHUNK = 256 * 1024


class _ClientProtocol(asyncio.Protocol):
    """The connection under a :class:`TimerClient`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        address: str,
        max_frame_size: int,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        dead_after: float | None = None,
        drainable: bool = True,
    ) -> None:
        self.loop = loop
        self.address = address
        self.reader = ReplyReader(max_frame_size=max_frame_size)
        self.pending: deque[_Pending] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = loop.create_future()
        self.failure: TimerConnectionError | ProtocolError | None = None
        self.subscriptions: list[Subscription] = []
        self.events_requested = False  # event frames are legal only once we asked
        # Set by the client: takes the subscriptions of a lost connection, or declines.
        self.adopt: Callable[[list[Subscription]], bool] | None = None
        # Set by the client: sends calls the server never read elsewhere, or declines.
        self.hand_over: Callable[[list[_Call]], bool] | None = None
        self.goaway = False  # the server will say before it closes (server.goaway)
        self._corked = False
        self._backlog: list[bytes] = []
        self._backlog_size = 0
        # Backpressure: a new call is written at once only while `blocked` is
        # false (writing not paused, no call queued before it) and a slot is
        # free; otherwise it queues, unsent, until both hold.
        self.max_pending = max_pending
        self.blocked = False
        self._paused = False
        self._queue: OrderedDict[asyncio.Future[Any], tuple[bytes, _ReplyDecoder]] = OrderedDict()
        # Liveness: one timer, armed while calls are pending.
        self.dead_after = dead_after
        self._progress_at = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._drainable = drainable  # a plain socket: bytes left in it are replies
        self._heard = False  # any byte from the server yet: a silent close hints at why
        self.deadlines = Deadlines(loop)  # the calls' timeouts, on one timer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.transport = transport

    def send(self, frame: bytes, method: _ReplyDecoder, future: asyncio.Future[Any]) -> None:
        """Queue the call's slot and write its frame, with nothing in between."""
        pending = self.pending
        if not pending and self.dead_after is not None:
            self._watch()
        pending.append((method, future, frame))
        if self._corked:
            self._backlog.append(frame)
            self._backlog_size += len(frame)
            if self._backlog_size > _CORK_LIMIT:
                self._uncork()  # write now, so that pause_writing can hold the next call
            return
        assert self.transport is not None
        self.transport.write(frame)
        # Calls made later in this loop iteration share one write.
        self._corked = True
        self.loop.call_soon(self._uncork)

    def _uncork(self) -> None:
        self._corked = False
        self._backlog_size = 0
        backlog = self._backlog
        if backlog and self.transport is not None:
            self.transport.write(b"".join(backlog))
        backlog.clear()

    def data_received(self, data: bytes) -> None:
        self._heard = True
        if self.dead_after is not None:
            self._progress_at = self.loop.time()
        reader = self.reader
        if reader.buffered or self.failure is not None:
            reader.receive_data(data)
        else:
            taken = self._take_replies(data)
            if taken < len(data):
                reader.receive_data(data[taken:] if taken else data)
        pending = self.pending
        while (event := reader.next_event()) is not None:
            if isinstance(event, Broken):
                self.fail(ProtocolError(f"{self.address}: {event.message}"))
                return
            ret = event.ret
            if ret > RET_ERROR or ret < RET_OK:  # never a reply (docs/protocol.md)
                if self.events_requested and ret in _EVENT_RETS:
                    if not self._on_event(ret, event.body):
                        return
                elif ret == RET_GOAWAY and self.goaway:
                    self._on_goaway(event.body)
                    return
                else:
                    logger.debug("%s: skipped a frame of unknown ret %d", self.address, ret)
                continue
            if not pending:
                self.fail(ProtocolError(f"{self.address}: a reply arrived with no call waiting"))
                return
            method, future, _ = pending.popleft()
            if future.done():
                continue  # its caller gave up; the reply is dropped in its place
            if ret == RET_OK:
                try:
                    future.set_result(method.decode_result(event.body))
                except ProtocolError as exc:
                    future.set_exception(exc)
            else:
                message = event.body.decode("utf-8", "replace")
                future.set_exception(RemoteCallError(method.name, message))
        if self._queue:
            self._admit()

    def _take_replies(self, data: bytes) -> int:
        """Settle the plain replies at the start of ``data``; return how many bytes they took.

        With nothing buffered, replies need no copy into the reader. This
        stops at the first frame that is partial, over the limit, not a reply
        (an event, an unknown code) or has no call waiting: the reader's loop
        takes those, and raises their errors or skips them.
        """
        pending = self.pending
        limit = self.reader.max_frame_size
        size = len(data)
        pos = 0
        while size - pos >= 8 and pending:
            ret, body_len = _unpack_reply_head(data, pos)
            end = pos + 8 + body_len
            if end > size or body_len > limit or not RET_OK <= ret <= RET_ERROR:
                break
            body = data[pos + 8 : end]
            pos = end
            method, future, _ = pending.popleft()
            if future.done():
                continue  # its caller gave up; the reply is dropped in its place
            if ret == RET_OK:
                try:
                    future.set_result(method.decode_result(body))
                except ProtocolError as exc:
                    future.set_exception(exc)
            else:
                message = body.decode("utf-8", "replace")
                future.set_exception(RemoteCallError(method.name, message))
        return pos

    def _on_event(self, ret: int, body: bytes) -> bool:
        try:
            if ret == RET_EVENT:
                event = api.decode_event(body)
                for sub in self.subscriptions:
                    sub.publish(event)
            else:
                notice = api.decode_events_dropped(body)
                for sub in self.subscriptions:
                    if isinstance(notice, str):  # a loss of unknown size, upstream
                        sub.note_gap(notice)
                    else:
                        sub.note_dropped(notice)
        except ProtocolError as exc:
            self.fail(ProtocolError(f"{self.address}: {exc}"))
            return False
        return True

    # --- the close notice ----------------------------------------------------

    def ask_goaway(self) -> None:
        """Ask the server to say before it closes (a server without it refuses: no harm)."""
        self.send_and_forget(_GOAWAY_FRAME, _GoawayAccepted(self))

    def _on_goaway(self, body: bytes) -> None:
        """The server read nothing after its last reply: hand the calls left over on."""
        reason = api.decode_goaway(body)
        self.failure = CallNotStarted(
            f"connection to {self.address} closed by the server ({reason}) before it read "
            "the calls still waiting: they never started, and are safe to send again"
        )
        calls: list[_Call] = [(f, m, fut) for m, fut, f in self.pending if not fut.done()]
        calls += [(f, m, fut) for fut, (f, m) in self._queue.items() if not fut.done()]
        self.pending.clear()
        self._queue.clear()
        # Their deadlines run on where they are; fail() forgets only this new, empty set.
        self.deadlines = Deadlines(self.loop)
        if calls and not (self.hand_over is not None and self.hand_over(calls)):
            for _, _, future in calls:
                future.set_exception(_copy(self.failure))
        self.fail(self.failure)  # subscriptions move over, and the socket closes

    def send_and_forget(self, frame: bytes, method: _ReplyDecoder) -> None:
        """Send a request whose reply nobody awaits; the reply is still consumed."""
        future: asyncio.Future[Any] = self.loop.create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.send(frame, method, future)

    # --- backpressure ------------------------------------------------------

    def pause_writing(self) -> None:
        self._paused = self.blocked = True

    def resume_writing(self) -> None:
        self._paused = False
        self.blocked = bool(self._queue)
        self._admit()

    def enqueue(self, frame: bytes, method: _ReplyDecoder, future: asyncio.Future[Any]) -> None:
        """Hold a call, unsent, until there is room for it (see :meth:`_admit`)."""
        self._queue[future] = (frame, method)
        self.blocked = True
        if not self._paused and len(self.pending) < self.max_pending:
            self._admit()  # otherwise it could send nothing

    def hold(self, frame: bytes, method: _ReplyDecoder, future: asyncio.Future[Any]) -> None:
        """Enqueue a call whose caller awaits ``future`` itself: if it gives up, the
        future's callback takes it out of the queue."""
        future.add_done_callback(self.unqueue)
        self.enqueue(frame, method, future)

    def unqueue(self, future: asyncio.Future[Any]) -> None:
        """Forget a call that gave up; if it was still queued, it sent nothing."""
        queue = self._queue
        if queue.pop(future, None) is not None and not queue:
            self.blocked = self._paused

    def _admit(self) -> None:
        """Send queued calls, first come first, while a slot is free and writing is on."""
        queue = self._queue
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # failing: the queued calls will fail with the rest
        room = self.max_pending - len(self.pending)
        while room > 0 and queue and not self._paused and self.failure is None:
            future, (frame, method) = queue.popitem(last=False)
            if future.done():
                continue  # it gave up, and its unqueue has not run yet: it sends nothing
            future.remove_done_callback(self.unqueue)  # if held: it is no longer queued
            self.send(frame, method, future)  # may pause writing
            room -= 1
        self.blocked = self._paused or bool(queue)

    # --- liveness ------------------------------------------------------------

    def _watch(self) -> None:
        """A call starts waiting on an idle connection: the silence starts now."""
        self._progress_at = now = self.loop.time()
        if self._watchdog is None:
            assert self.dead_after is not None
            self._watchdog = self.loop.call_at(now + self.dead_after, self._check_alive)

    def _check_alive(self) -> None:
        self._watchdog = None
        if not self.pending or self.failure is not None or self.dead_after is None:
            return  # disarmed until the next call
        due = self._progress_at + self.dead_after
        if self.loop.time() < due:
            self._watchdog = self.loop.call_at(due, self._check_alive)
            return
        count = len(self.pending)
        self.fail(
            ConnectionLost(
                f"connection to {self.address} declared dead: nothing received for "
                f"{self.dead_after} s while {count} calls waited (dead_after)"
            ),
            abort=True,
        )

    # --- the end -------------------------------------------------------------

    def fail(self, error: TimerConnectionError | ProtocolError, *, abort: bool = False) -> None:
        """Make the connection unusable: fail every pending call and close.

        Requests still in the write buffer are dropped with their calls (the
        socket is aborted) rather than left for a peer that may never read.
        """
        if self.failure is None:
            self.failure = error
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.deadlines.clear()  # every call fails here, in time or not
        while self.pending:
            _, future, _ = self.pending.popleft()
            if not future.done():
                future.set_exception(_copy(self.failure))
        queue = self._queue
        while queue:
            future, _ = queue.popitem(last=False)
            if not future.done():
                future.set_exception(_copy(self.failure))
        subscriptions, self.subscriptions = self.subscriptions, []
        lost = isinstance(self.failure, ConnectionLost)
        if lost and self.adopt is not None and self.adopt(subscriptions):
            subscriptions = []  # the client subscribes them again once it reconnects
        for sub in subscriptions:
            # Closing the client ends the streams; anything else is an error there.
            closed = isinstance(self.failure, ClientClosedError)
            sub.end(None if closed else _copy(self.failure))
        transport = self.transport
        if transport is not None:
            if abort or transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.pending and self.failure is None and self._drainable:
            self._drain()
        reason = f": {exc}" if exc else "" if self._heard else _silent_close(self)
        if self.failure is None:  # not closed by us: the server or the network ended it
            logger.info("connection to %s lost%s", self.address, reason)
        self.fail(ConnectionLost(f"connection to {self.address} lost{reason}"))
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(None)

    def _drain(self) -> None:
        """Deliver the replies that arrived before the connection broke.

        A write error (EPIPE, ECONNRESET: the server closed with requests of
        ours unread) stops the transport before it read what the server sent
        first. Those bytes are still in the socket, which is open until this
        callback returns: read them through a duplicate, up to EOF or reset.
        """
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is None:
            return
        try:
            dup = sock.dup()
        except OSError:
            return
        with dup:
            dup.setblocking(False)
            while self.pending and self.failure is None:
                try:
                    data = dup.recv(_DRAIN_CHUNK)
                except OSError:  # reset, or nothing more (EAGAIN)
                    return
                if not data:
                    return
                self.data_received(data)


_EVENT_RETS = (RET_EVENT, RET_EVENTS_DROPPED)
_GOAWAY_FRAME = encode_request(api.GOAWAY.encode(), b"\xa0")


class _GoawayAccepted:
    """The decoder of the ``server.goaway`` reply: a success turns the notice on."""

    __slots__ = ("_protocol",)
    name = api.GOAWAY

    def __init__(self, protocol: _ClientProtocol) -> None:
        self._protocol = protocol

    def decode_result(self, body: bytes, /) -> None:
        self._protocol.goaway = True  # whatever the body says: keys may be added


def _silent_close(protocol: _ClientProtocol) -> str:
    """Why a server may close a connection without sending a byte: the likely TLS mixups.

    Under TLS 1.3 a server that refuses the client's certificate does so after
    the client's side of the handshake, and asyncio's server closes without
    sending its alert; a TLS server that gets a plain frame closes silently too.
    """
    if not protocol._drainable:  # TLS
        return (
            ": the server closed it before any reply, right after the TLS handshake "
            "(is a client certificate required, or is yours from a CA it does not trust?)"
        )
    if protocol.address.startswith("tcp:"):
        return (
            ": the server closed it before any reply (if it serves TLS, use tls: instead of tcp:)"
        )
    return ""


def _copy(error: TimerConnectionError | ProtocolError) -> Exception:
    # One instance per caller, so tracebacks do not pile up on a shared one.
    return type(error)(*error.args)
