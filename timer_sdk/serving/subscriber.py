"""A server connection as an event subscriber: subscribe, deliver, hold, drop.

:class:`Subscriber` is a part of :class:`~timer_sdk.serving.connection.Connection`,
apart because events are an extension beside the procs: the request loop only
hands it the methods that are not Timer procs (:meth:`Subscriber.dispatch`),
and the server's fan-out calls the rest on this object, not on the connection.
While the peer is not reading, events wait in a bounded
:class:`~timer_sdk.wire.backlog.EventBacklog`, charged to the budget like
everything else the connection holds. All subscribers' event bytes together
(held, or written and not yet sent) fill at most the budget's event share, so
stalled subscribers never take the room that requests need. Within the share
each subscriber is sure of its part (:attr:`~timer_sdk.wire.budget.Budget.event_part`):
when the share is full only those holding more than their part lose events,
their own oldest first, so a subscriber that keeps up loses none because
others stalled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol

from ..models import EchoEvent
from ..wire.api import (
    GOAWAY,
    SUBSCRIBE,
    UNSUBSCRIBE,
    decode_subscribe,
    encode_event,
    encode_events_dropped,
    encode_events_gap,
)
from ..wire.budget import EVENT_FLOOR, IN_FLIGHT_COST
from ..wire.codec import DecodeError, encode_item
from ..wire.framing import (
    RET_EVENT,
    RET_EVENTS_DROPPED,
    RET_OK,
    Request,
    encode_error,
    encode_reply,
)
from ..wire.served import DESCRIBE, describe_reply
from .stats import STATS, stats_reply

if TYPE_CHECKING:
    from ..limits import ServerStats
    from ..wire.backlog import EventBacklog
    from ..wire.budget import Budget
    from .charges import Charges
    from .host import Host
    from .replies import Replies, _Slot

__all__ = ["WRITE_HIGH", "Subscriber", "SubscriberOwner", "event_frame"]

WRITE_HIGH = 64 * 1024
"""Unsent bytes past which a connection handles no more requests until its peer reads."""


_GOAWAY_ACCEPTED = encode_reply(RET_OK, encode_item({}))


def event_frame(event: EchoEvent) -> bytes:
    return encode_reply(RET_EVENT, encode_event("on_echo_fired", event))


class SubscriberOwner(Protocol):
    """What :class:`Subscriber` needs of its connection."""

    _transport: asyncio.Transport | None
    _writing_paused: bool
    _goaway: bool

    def _recharge(self) -> None: ...
    def _schedule_flush(self) -> None: ...
    def _flush(self) -> None: ...
    def _track(self, task: asyncio.Task[None]) -> None: ...
    def _fill(self, slot: _Slot, frame: bytes) -> None: ...


class Subscriber:
    """One connection's side as an event subscriber; the server holds it while subscribed."""

    __slots__ = ("_backlog", "_budget", "_charges", "_loop", "_max_depth", "_owner", "_replies",
                 "_server", "_stats", "behind")  # fmt: skip

    def __init__(
        self,
        owner: SubscriberOwner,
        *,
        server: Host,
        stats: ServerStats,
        budget: Budget,
        backlog: EventBacklog,
        replies: Replies,
        charges: Charges,
        max_depth: int,
    ) -> None:
        self._owner = owner
        self._server = server
        self._loop = server.loop
        self._stats = stats
        self._budget = budget
        self._backlog = backlog
        self._replies = replies
        self._charges = charges
        self._max_depth = max_depth
        self.behind = False  # holding events while writing is not paused: told when caught up

    # --- its requests -----------------------------------------------------------

    def dispatch(self, request: Request) -> bytes | None:
        """Answer a method that is not a Timer proc: an extension, or unknown."""
        if request.method == GOAWAY:
            # Part of opening the connection, not a call: the requests counter skips it.
            self._owner._goaway = True
            return _GOAWAY_ACCEPTED
        self._stats.requests += 1
        if request.method == SUBSCRIBE:
            return self._subscribe(request.payload)
        if request.method == UNSUBSCRIBE:
            self._server._unsubscribe(self)
            return encode_reply(RET_OK, encode_item(None))
        if request.method == STATS:
            return stats_reply(self._server)
        if request.method == DESCRIBE:
            stats = (STATS,) if self._server.stats_enabled else ()
            return describe_reply((SUBSCRIBE, UNSUBSCRIBE, DESCRIBE, *stats))
        self._stats.error_replies += 1
        return encode_error(f"unknown method: {request.method}")

    def _subscribe(self, payload: bytes) -> bytes | None:
        try:
            names = decode_subscribe(payload, max_depth=self._max_depth)
        except DecodeError as exc:
            self._stats.error_replies += 1
            return encode_error(str(exc))
        bus = self._server.bus
        if bus is not None and bus.refusal is not None:
            self._stats.error_replies += 1
            return encode_error(f"{SUBSCRIBE}: {bus.refusal}")
        self._server._subscribe(self)
        reply = encode_reply(RET_OK, encode_item({"events": names}))
        if bus is None:
            return reply
        gap = bus.gap
        if gap is not None:  # cut off: answer now, the gap notice first of its items
            return reply + encode_reply(RET_EVENTS_DROPPED, encode_events_gap(gap))
        waiter = bus.ready()
        if waiter is None:
            return reply
        # The reply promises every event from here on: wait until the bus delivers them.
        slot = self._replies.open(IN_FLIGHT_COST)  # as for a proc: its Task and slot
        self._owner._track(self._loop.create_task(self._reply_when(waiter, slot, reply)))
        return None

    async def _reply_when(self, waiter: Awaitable[None], slot: _Slot, reply: bytes) -> None:
        try:
            await asyncio.shield(waiter)  # shared by every subscription waiting
            frame = reply
        except asyncio.CancelledError:
            if self._owner._transport is None:
                return
            self._stats.error_replies += 1
            frame = encode_error(f"{SUBSCRIBE}: cancelled: the server is shutting down")
        self._owner._fill(slot, frame)

    # --- delivery: what the server's fan-out calls --------------------------------

    @property
    def events_paused(self) -> bool:
        """Whether event frames must wait: the peer is not reading, or it holds more
        than its part while the event share is full (with one frame on its way at most)."""
        if self._owner._writing_paused:
            return True
        budget = self._budget
        charges = self._charges
        return (
            budget.events >= budget.event_share
            and charges.events_charged >= budget.event_part
            and (charges.event_pending + charges.event_unsent) > 0
        )

    def hold_event(self, event: EchoEvent) -> None:
        """Keep an event until the peer reads again; drop the oldest past the bounds.

        Past the share only a subscriber holding more than its part loses
        events; when the whole server is full, whatever it holds past
        :data:`~timer_sdk.wire.budget.EVENT_FLOOR`.
        """
        backlog = self._backlog
        budget = self._budget
        charges = self._charges
        owner = self._owner
        transport = owner._transport
        if not owner._writing_paused and not self.behind and transport is not None:
            # Held though writing: be told when what was written has gone.
            self.behind = True
            transport.set_write_buffer_limits(high=0, low=0)
        part = budget.event_part
        if not len(backlog) and budget.events_over() and charges.events_charged >= part:
            backlog.dropped += 1  # it would go at once: its part of the full share is spent
            self._stats.events_dropped += 1
            return
        lost = backlog.hold(event)
        owner._recharge()
        while self._over_part(part) and backlog.drop_oldest():
            lost += 1  # this backlog yields its oldest, not another subscriber's
            owner._recharge()
        self._stats.events_dropped += lost

    def _over_part(self, part: int) -> bool:
        """Whether this subscriber must give up events: it holds more than it is sure of."""
        held = self._charges.events_charged
        budget = self._budget
        return (held > part and budget.events_over()) or (held > EVENT_FLOOR and budget.over())

    def note_dropped(self, count: int) -> None:
        """Tell the peer that ``count`` events were lost before they reached this server."""
        self._backlog.dropped += count  # sent first when the peer reads again
        if not self._owner._writing_paused and self._owner._transport is not None:
            notice = encode_events_dropped(self._backlog.take_dropped())
            self._replies.out.append(encode_reply(RET_EVENTS_DROPPED, notice))
            self._owner._schedule_flush()

    def note_gap(self, reason: str) -> None:
        """Tell the peer that events may be missing here, how many unknown."""
        if self._owner._writing_paused:
            self._backlog.gap = reason  # sent first when the peer reads again
        elif self._owner._transport is not None:
            self._replies.out.append(encode_reply(RET_EVENTS_DROPPED, encode_events_gap(reason)))
            self._owner._schedule_flush()

    def shed_backlog(self) -> None:
        """Drop the events held for this subscriber past the floor: requests need the room."""
        backlog = self._backlog
        keep = EVENT_FLOOR - (self._charges.events_charged - backlog.bytes)  # less what was sent
        lost = 0
        while backlog.bytes > keep and backlog.drop_oldest():
            lost += 1
        if lost:
            self._stats.events_dropped += lost
            self._owner._recharge()

    def send_event(self, frame: bytes) -> None:
        """Send an event frame with the next write, or now if many are waiting for it."""
        owner = self._owner
        if owner._transport is not None:
            self._release_backlog()  # what was held for it is older, and goes first
            self._stats.events_sent += 1
            self._replies.out.append(frame)
            charges = self._charges
            charges.event_pending += len(frame)
            owner._recharge()  # counted at once: a fan-out to many sees its own share fill
            if charges.event_pending < EVENT_FLOOR:
                owner._schedule_flush()
            else:  # a burst: to the socket now, so that a reader never holds much
                owner._flush()

    def drop_event(self) -> None:
        """Count an event this subscriber will never get, for its next drop notice."""
        self._stats.events_dropped += 1
        self.note_dropped(1)

    def caught_up(self) -> None:
        """Everything written has been sent: back to the usual bound, and send what waited."""
        if self.behind:
            self.behind = False
            transport = self._owner._transport
            if transport is not None:
                transport.set_write_buffer_limits(high=WRITE_HIGH, low=0)
        self._release_backlog()

    def _release_backlog(self) -> None:
        """The peer reads again: queue the drop notice, if any, then the held events."""
        backlog = self._backlog
        if backlog.gap is not None:
            notice = encode_events_gap(backlog.gap)
            backlog.gap = None
            self._replies.out.append(encode_reply(RET_EVENTS_DROPPED, notice))
        if len(backlog) or backlog.dropped:
            events = backlog.take()
            frames = list(map(event_frame, events))  # each fits: oversize ones never got here
            if backlog.dropped:
                notice = encode_events_dropped(backlog.take_dropped())
                self._replies.out.append(encode_reply(RET_EVENTS_DROPPED, notice))
            self._stats.events_sent += len(frames)
            self._replies.out.extend(frames)
            self._charges.event_pending += sum(map(len, frames))
            self._owner._recharge()
