"""The NATS event bus: every server that shares a URL and a timer name sees all events.

Each server publishes its timer's events on the subject
:func:`~timer_sdk.bus.subject_for` gives (``timer_sdk.<name>.on_echo_fired``)
and subscribes to it; NATS does not echo a server's own messages back
(``no_echo``), since it has already delivered those in process.

Message layout, for consumers in any language (docs/scaling.md):

- payload: the body of a ``ret 16`` event frame, ``{event, data}`` in CBOR,
  for one event; for several, a CBOR array of such bodies (2 to 256, each
  encoded once and joined behind the array head); an empty payload is a
  *marker*, which carries no event;
- header ``Timer-Publisher``: a random id per server run, and
  ``Timer-Seq``: 1, 2, 3, ... for each event that server fired. A message
  carries consecutive events, and its ``Timer-Seq`` is that of its last one; a
  marker's is the publisher's latest (0 before its first event).

A message per event would cost each echo a publish in Python, about as much
as the echo itself; so the publisher sends what piled up since it last ran in
one message (:mod:`timer_sdk.bus.batch`).

A gap in a publisher's sequence is the exact count of its events lost on the
way: a message of *n* events with ``Timer-Seq`` *s*, after *last*, means
*s* - *last* - *n* lost (*n* = 0 for a marker). So a message never spans a
hole in the sequence, nor a marker. Lost means: not published while the
server was cut off from NATS or its outbox was full, dropped by NATS, missed
while the receiver was cut off, or refused by the receiver as malformed
(whole, with a log line). Each receiver turns gaps into drop notices
(``ret 17``). So that a gap is seen even when its publisher falls quiet, a
server publishes a marker after reconnecting and whenever another server asks
(on ``<subject>.sync``, which each sends after it reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..models import EchoEvent
from ..wire.codec import DecodeError
from .batch import (
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    batch_length,
    decode_batch,
    encode_echo_event,
    take_batch,
)
from .seam import BusError, EventBus, EventSink, EventSource, redact, subject_for

__all__ = ["MAX_BATCH_BYTES", "MAX_BATCH_EVENTS", "PUBLISHER_HEADER", "SEQ_HEADER", "NatsBus"]

logger = logging.getLogger("timer_sdk.bus_nats")

PUBLISHER_HEADER = "Timer-Publisher"
SEQ_HEADER = "Timer-Seq"
_MAX_PUBLISHERS = 4096  # remembered per receiver; the least recent is forgotten
_HEADER_ROOM = 1024  # NATS counts headers within its max_payload


class _FirstAttemptFailed(Exception):
    """Raised through nats-py's connect, which would otherwise retry forever."""


class NatsBus(EventBus):
    """Events of every server on ``url`` with the same timer name.

    ``max_outbox`` bounds the events waiting to be handed to the NATS client;
    past it they are dropped, and the gap reports them. While the connection
    is down, events are not buffered either: they would be stale when it is
    back. The bus reconnects forever, every ``reconnect_wait`` seconds.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 10.0,
        reconnect_wait: float = 0.5,
        max_outbox: int = 65536,
    ) -> None:
        self.url = url
        self.shown = redact(url)
        """The URL without its credentials, for messages."""
        self.subject = ""
        self.publisher = secrets.token_hex(8)
        self._connect_timeout = connect_timeout
        self._reconnect_wait = reconnect_wait
        self._max_outbox = max_outbox
        self._nc = Client()
        self._sink: EventSink | None = None
        self._stop_listening: list[Callable[[], None]] = []
        self._seq = 0  # events this server fired
        self._outbox: deque[tuple[int, bytes]] = deque()
        self._wake = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None
        self._seen: OrderedDict[str, int] = OrderedDict()  # publisher -> last seq
        self._wanted = False  # whether anyone here subscribes
        self._events_sub: Subscription | None = None
        self._listening: asyncio.Future[None] | None = None  # done once events flow in
        self._waiter: asyncio.Future[None] | None = None  # what subscriptions wait for meanwhile
        self._reconciler: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self.gaps = 0
        """Events of other servers this one knows it missed, in all."""

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<NatsBus {self.shown} {self.subject!r} {state}>"

    @property
    def connected(self) -> bool:
        """Whether the bus is connected to NATS right now."""
        return self._connected.is_set()

    @property
    def gap(self) -> str | None:
        return None if self._connected.is_set() else f"cut off from the event bus at {self.shown}"

    async def wait_connected(self) -> None:
        """Wait until the bus is connected (again)."""
        await self._connected.wait()

    async def start(self, timer: EventSource, sink: EventSink) -> None:
        self.subject = subject_for(timer.name)
        self._sink = sink
        connecting = True

        async def on_error(exc: Exception) -> None:
            if connecting:  # the first attempt failed: say so now, not after retrying for long
                raise _FirstAttemptFailed(exc)
            # Once per outage is enough: retries every reconnect_wait would flood the log.
            log = logger.warning if self._connected.is_set() else logger.debug
            log("event bus %s: %s", self.shown, exc)

        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._nc.connect(
                    self.url,
                    name=f"timer-sdk {timer.name} {self.publisher}",
                    no_echo=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=self._reconnect_wait,  # type: ignore[arg-type]
                    connect_timeout=max(1, int(self._connect_timeout)),
                    error_cb=on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
        except TimeoutError:
            await self._abandon()
            raise BusError(
                f"cannot reach the event bus at {self.shown} within {self._connect_timeout} s"
            ) from None
        except (OSError, nats.errors.Error, _FirstAttemptFailed) as exc:
            await self._abandon()
            cause = exc.args[0] if isinstance(exc, _FirstAttemptFailed) else exc
            raise BusError(f"cannot reach the event bus at {self.shown}: {cause}") from cause
        connecting = False
        await self._nc.subscribe(f"{self.subject}.sync", cb=self._on_sync)
        self._connected.set()
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())
        self._stop_listening.append(timer.add_echo_listener(self._on_local))
        logger.info(
            "events of timer %r travel on %s, subject %s", timer.name, self.shown, self.subject
        )

    async def _abandon(self) -> None:
        """Close after the first attempt failed, without waiting long for it.

        After a failed TLS handshake nats-py waits for a socket that asyncio has
        already closed, and would wait forever.
        """
        # The peer may have reset the socket already: nothing is left to close then.
        with contextlib.suppress(TimeoutError, OSError, nats.errors.Error, _FirstAttemptFailed):
            async with asyncio.timeout(1):
                await self._nc.close()

    async def close(self) -> None:
        self._closing = True
        for remove in self._stop_listening:
            remove()
        self._stop_listening.clear()
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
            self._pump_task = None
        self._connected.clear()
        if not self._nc.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._nc.flush(timeout=1)
            await self._nc.close()

    # --- publishing -----------------------------------------------------------

    def _on_local(self, event: EchoEvent) -> None:
        self._seq += 1
        if self._connected.is_set() and len(self._outbox) < self._max_outbox:
            self._outbox.append((self._seq, encode_echo_event(event)))
            self._wake.set()
        # Otherwise it is lost, and the next message's Timer-Seq says so.

    def _mark(self) -> None:
        """Publish the current sequence number, so that a trailing gap is seen."""
        self._outbox.append((self._seq, b""))
        self._wake.set()

    async def _pump(self) -> None:
        """Hand events to the NATS client in order; the only task that publishes."""
        nc, outbox, wake = self._nc, self._outbox, self._wake
        headers = {PUBLISHER_HEADER: self.publisher, SEQ_HEADER: ""}
        while True:
            await wake.wait()
            wake.clear()
            # What the server allows can change with a reconnect (to another server).
            max_bytes = min(MAX_BATCH_BYTES, nc.max_payload - _HEADER_ROOM)
            while outbox:
                seq, payload = take_batch(outbox, max_bytes)
                headers[SEQ_HEADER] = str(seq)
                try:
                    await nc.publish(self.subject, payload, headers=headers)
                except nats.errors.Error:
                    continue  # cut off meanwhile (or too large): lost, and the sequence shows it

    async def _on_disconnected(self) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._wake_waiters()  # answered now: the gap notice says what they may miss
        if was_connected and not self._closing:
            logger.warning("event bus %s: disconnected; reconnecting", self.shown)
            if self._sink is not None and (gap := self.gap) is not None:
                self._sink.deliver_gap(gap)  # the counts come after the reconnect, if ever

    async def _on_reconnected(self) -> None:
        self._connected.set()
        logger.warning("event bus %s: reconnected", self.shown)
        self._mark()  # so that the others see what we could not send
        with contextlib.suppress(nats.errors.Error):
            await self._nc.publish(f"{self.subject}.sync", b"")  # and we see what they did

    async def _on_sync(self, msg: Msg) -> None:
        self._mark()

    # --- receiving ------------------------------------------------------------

    def listen(self, wanted: bool) -> None:
        # Receive others' events only while someone here subscribes: with
        # workers, every worker would otherwise parse every other's events.
        self._wanted = wanted
        listening = self._listening
        settled = self._events_sub is not None and self._reconciler is None
        if wanted and not settled and (listening is None or listening.done()):
            self._listening = asyncio.get_running_loop().create_future()
        elif not wanted and listening is not None and not listening.done():
            listening.set_result(None)  # whoever waited has left
            self._wake_waiters()
        if self._reconciler is None:
            self._reconciler = asyncio.get_running_loop().create_task(self._reconcile())

    def ready(self) -> asyncio.Future[None] | None:
        listening = self._listening
        if listening is None or listening.done() or not self._connected.is_set():
            return None
        waiter = self._waiter
        if waiter is None or waiter.done():
            self._waiter = waiter = asyncio.get_running_loop().create_future()
        return waiter

    def _wake_waiters(self) -> None:
        """Answer the subscriptions waiting: events flow in, or the bus is cut off."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _reconcile(self) -> None:
        """Subscribe or unsubscribe until NATS matches what is wanted."""
        try:
            while True:
                if self._wanted and self._events_sub is None:
                    self._seen.clear()  # gaps from before are no one's loss
                    self._events_sub = await self._nc.subscribe(self.subject, cb=self._on_message)
                    await self._confirm()
                elif not self._wanted and self._events_sub is not None:
                    sub, self._events_sub = self._events_sub, None
                    with contextlib.suppress(nats.errors.Error):
                        await sub.unsubscribe()
                else:
                    break
            if self._wanted and self._listening is not None and not self._listening.done():
                self._listening.set_result(None)
                self._wake_waiters()
        finally:
            self._reconciler = None

    async def _confirm(self) -> None:
        """Wait until NATS has the subscription: a round trip, once connected."""
        while True:
            await self._connected.wait()
            try:
                # nats-py's flush() writes its PING at once, ahead of a SUB still
                # waiting in its buffer; push the buffer out first, then round-trip.
                await self._nc._flush_pending(force_flush=True)
                await self._nc.flush(timeout=5)
            except (nats.errors.Error, TimeoutError):
                continue  # cut off meanwhile: the client subscribes again on reconnect
            return

    async def _on_message(self, msg: Msg) -> None:
        sink = self._sink
        headers = msg.headers or {}
        publisher = headers.get(PUBLISHER_HEADER)
        try:
            seq = int(headers.get(SEQ_HEADER, ""))  # 0: a marker of one that fired nothing yet
        except ValueError:
            seq = -1
        if sink is None or publisher is None or seq < 0:
            logger.warning("event bus %s: ignoring a message without %s", self.shown, SEQ_HEADER)
            return
        events: list[EchoEvent] = []
        try:
            if msg.data and sink.subscribers:
                events = decode_batch(msg.data)
                n = len(events)
            else:
                n = batch_length(msg.data)  # no one here to tell: the count will do
            if n > seq:
                raise DecodeError(f"{n} events cannot end at {SEQ_HEADER} {seq}")
        except DecodeError as exc:
            # Refused whole: its events count as lost at the publisher's next message.
            logger.warning(
                "event bus %s: ignoring an invalid message of %s: %s", self.shown, publisher, exc
            )
            return
        seen = self._seen
        last = seen.pop(publisher, None)
        seen[publisher] = max(seq, last or 0)
        if len(seen) > _MAX_PUBLISHERS:
            seen.popitem(last=False)
        if last is not None:
            if seq <= last:
                return  # a marker for what was already seen, or a stale one
            # The message holds seq - n + 1 .. seq; a marker (n = 0) says "I fired up to seq".
            missed = seq - last - n
            if missed > 0:
                self.gaps += missed
                sink.deliver_dropped(missed)
            elif missed < 0:
                events = events[-missed:]  # some seen already (publishers never overlap)
        for event in events:
            sink.deliver_echo(event)
