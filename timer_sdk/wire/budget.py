"""The server-wide byte budget: one bound on everything held for peers.

Like gRPC's ResourceQuota, it counts bytes, not messages, across every
connection: partial frames being received, requests in flight, replies
waiting to be written and event backlogs. Each connection reports what it
holds; the budget only adds up and decides who may read next, and how much.

Admission is at the frame head, as HTTP/2 grants a window before the bytes
are sent. Between frames a connection reads at most the room left (and
never less than :data:`MIN_READ`, enough for a header). Once a frame's
length is known, the rest of it is either reserved, so that it always
finishes, or the connection stops reading and leaves it in the socket,
where it costs nothing. Nothing is refused that could ever fit.

Waiters are served fairly by bytes held, as a fair queue would: whoever
holds least goes first, arrival order breaking ties, so a small caller never
waits behind greedy ones. What waiters hold under the floor does not count
against the room they wait for, so a line of partial frames cannot block
itself. A connection holding under :data:`FLOOR` may
always read a frame, and start it, if that keeps it under, so a 20-byte call
is answered even while stuck work holds the whole budget. A whole frame
becomes a running request only with room for what that holds
(:meth:`Budget.startable`), so many small frames in one read cannot hold
more than they were charged. Event bytes count against the
room requests need only up to their share (:data:`EVENT_SHARE`), so stalled
subscribers cannot keep calls from being answered. Within that share each
subscriber is sure of its part (:attr:`Budget.event_part`), as each connection
is of the floor: when the share is full, only subscribers holding more than
their part lose events, so stalled ones never cost a reader its events.
No I/O here: a holder is resumed through its :meth:`Holder.budget_granted`.
"""

from __future__ import annotations

from typing import Protocol

__all__ = [
    "EVENT_FLOOR",
    "EVENT_SHARE",
    "FLOOR",
    "IN_FLIGHT_COST",
    "MIN_READ",
    "READ_HEADROOM",
    "Budget",
]

IN_FLIGHT_COST = 4096
"""Bytes charged per running request over its payload: its Task, coroutines, timer
and slot (a held ``echo`` takes about 3.7 KB of the server's RSS besides its text)."""

READ_HEADROOM = 64 * 1024
"""The most one socket read adds: connections read into buffers of this size at most."""

MIN_READ = 1024
"""The smallest read: a frame's head, when the budget has no room left."""

FLOOR = 12 * 1024
"""What any connection may hold whatever the budget says: small callers are never stuck.

With the connection's own 4 KiB or so, a server holds at most the budget plus
about 16 KiB per connection."""

EVENT_SHARE = 4
"""Event bytes count against the room requests need up to ``limit // EVENT_SHARE``."""

EVENT_FLOOR = 64 * 1024
"""The least part of the event share each subscriber is sure of, however many there are."""


class Holder(Protocol):
    """What the budget needs from a connection."""

    @property
    def held(self) -> int: ...

    def budget_granted(self) -> None: ...


class Budget:
    """Bytes held for all peers together, against one limit."""

    __slots__ = ("_granted", "_reserved", "_tickets", "_waiting", "event_part", "events", "limit",
                 "used")  # fmt: skip

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.events = 0
        """The part of :attr:`used` that is event frames, held or not yet sent."""
        self.event_part = 0
        """Event bytes each subscriber may hold while the share is full (see :meth:`split`)."""
        self.split(1)
        self._reserved = 0  # owed to admitted frames still arriving
        self._granted: dict[Holder, int] = {}  # admitted: the bytes reserved (0: a head read)
        self._waiting: dict[Holder, tuple[int, int, bool]] = {}  # (arrival, need, start)
        self._tickets = 0

    @property
    def waiting(self) -> int:
        """Connections paused until bytes are freed."""
        return len(self._waiting)

    @property
    def event_share(self) -> int:
        """The most event bytes that count against the room requests need."""
        return self.limit // EVENT_SHARE

    def split(self, subscribers: int) -> None:
        """Share the event bytes among ``subscribers``: each is sure of an equal part.

        The parts add up to the share, or to :data:`EVENT_FLOOR` each when
        there are too many subscribers for that.
        """
        self.event_part = max(EVENT_FLOOR, self.limit // EVENT_SHARE // max(subscribers, 1))

    def room(self) -> int:
        """Bytes requests may still take: events count only up to their share."""
        excess = self.events - self.limit // EVENT_SHARE
        return self.limit - self.used - self._reserved + (excess if excess > 0 else 0)

    def update(self, before: int, after: int, events_change: int = 0) -> None:
        """Record that a holder's bytes went from ``before`` to ``after``.

        ``events_change`` is how much of the change is event bytes.
        """
        self.used += after - before
        if events_change:
            self.events += events_change
        if after < before and self._waiting:
            self._grant()

    def admit(self, holder: Holder, need: int, *, start: bool = False) -> bool:
        """Whether ``holder`` may read on; if not, it waits until granted.

        ``need`` is what is still to come of the frame it is receiving, or 0
        between frames (a head read, of :data:`MIN_READ` at most). With
        ``start``, a whole frame waits to become a request: ``need`` is what
        that request holds (see :meth:`startable`).
        """
        granted = self._granted.get(holder)
        room = self.limit - self.used - self._reserved
        if granted is None and not need and not self._waiting and room >= MIN_READ:
            return True  # the common case: a head read with room, nobody waiting
        if granted is not None:
            if need <= granted:
                return True
            self._release(holder)  # the head arrived: now the frame is known
            if self._fits(holder, need, self._own_room(holder), start):
                return True
        elif holder in self._waiting:
            return False
        elif not self._waiting and self._fits(holder, need, self._own_room(holder), start):
            return True
        elif self._fits(holder, need, 0, start):
            return True  # under the floor
        self._tickets += 1
        self._waiting[holder] = (self._tickets, need, start)
        return False

    def read_size(self, holder: Holder) -> int:
        """How many bytes ``holder`` may read now: what its frame reserved, or the room left."""
        room = self._granted.get(holder) or self.limit - self.used - self._reserved
        if room >= READ_HEADROOM:
            return READ_HEADROOM
        room = max(room, self.room())  # events past their share are not the requests'
        return room if room > MIN_READ else MIN_READ

    def startable(self, holder: Holder) -> int:
        """How many whole frames ``holder`` may start now, at :data:`IN_FLIGHT_COST` each.

        Its grant and the room left count (the room only with nobody waiting for
        it); failing those, one if it stays under the floor.
        """
        room = self.limit - self.used - self._reserved
        if room >= IN_FLIGHT_COST and not self._waiting:
            return room // IN_FLIGHT_COST  # the common case: room, nobody waiting
        room = self._granted.get(holder, 0)
        if not self._waiting:
            room += max(self.room(), 0)
        if room >= IN_FLIGHT_COST:
            return room // IN_FLIGHT_COST
        return 1 if holder.held + IN_FLIGHT_COST <= FLOOR else 0

    def finished(self, holder: Holder) -> None:
        """``holder``'s frame is whole, or it stopped reading: its grant ends."""
        if holder in self._granted:
            self._release(holder)
            if self._waiting:
                self._grant()

    def over(self) -> bool:
        """Whether more is held than the limit allows (events past their share aside)."""
        return self.room() + self._reserved < 0

    def events_over(self) -> bool:
        """Whether event bytes fill more than their share."""
        return self.events > self.limit // EVENT_SHARE

    def forget(self, holder: Holder) -> None:
        """Take a holder out of the line and its grant (its connection is gone)."""
        self._waiting.pop(holder, None)
        if holder in self._granted:
            self._release(holder)
            if self._waiting:
                self._grant()

    def _own_room(self, holder: Holder) -> int:
        # As for waiters (see _grant): what it holds under the floor is not the budget's.
        held = holder.held
        return self.room() + (held if held < FLOOR else FLOOR)

    def _fits(self, holder: Holder, need: int, room: int, start: bool) -> bool:
        size = need or MIN_READ
        # Under the floor, room is kept for the request a frame read becomes.
        if size > room and holder.held + size + (0 if start else IN_FLIGHT_COST) > FLOOR:
            return False
        self._granted[holder] = need
        self._reserved += need
        return True

    def _release(self, holder: Holder) -> None:
        self._reserved -= self._granted.pop(holder)

    def _grant(self) -> None:
        # Least held first, then first come: a fair queue by bytes, never skipping the
        # head, so a large frame gets the room it waits for as it is freed.
        waiting = self._waiting
        # What waiters hold under the floor is the floor's, not the budget's: counted,
        # enough partial frames waiting in line would keep the room from them forever.
        room = self.room() + sum(min(h.held, FLOOR) for h in waiting)
        while waiting:
            holder = min(waiting, key=lambda h: (h.held, waiting[h][0]))
            _, need, start = waiting[holder]
            if not self._fits(holder, need, room, start):
                return
            del waiting[holder]
            room -= need or MIN_READ
            holder.budget_granted()
