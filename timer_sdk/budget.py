"""The server-wide byte budget: one bound on everything held for peers.

Like gRPC's ResourceQuota, it counts bytes, not messages, across every
connection: partial frames being received, requests in flight, replies
waiting to be written and event backlogs. Each connection reports what it
holds; the budget only adds up and decides who may read next, and how much.

When the budget is spent, a connection stops *reading* (it never refuses
or drops work it has accepted) and waits in line. As bytes are freed, the
longest waiter is granted room for the rest of the frame it is receiving,
and keeps that grant until the frame is whole, as HTTP/2 grants a window
before the bytes are sent. So frames that were granted always finish and
free their bytes: waiters holding halves of frames cannot deadlock the
server. A connection holding more than its fair share yields to the others,
so one greedy peer cannot starve the rest. No I/O here: a holder is resumed
through its :meth:`Holder.budget_granted`.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["IN_FLIGHT_COST", "MIN_READ", "READ_HEADROOM", "Budget", "Holder"]

IN_FLIGHT_COST = 2048
"""Bytes charged per waiting reply over its payload: its Task, frame and slot."""

READ_HEADROOM = 64 * 1024
"""The most one socket read adds: connections read into buffers of this size at most."""

MIN_READ = 1024
"""What a read may take when the budget has no room left: a connection not yet
paused still gets a small buffer, so the overshoot is at most this per connection."""


class Holder(Protocol):
    """What the budget needs from a connection."""

    @property
    def held(self) -> int: ...

    @property
    def frame_needs(self) -> int:
        """Bytes still to come of the frame being received; 0 between frames."""
        ...

    def budget_granted(self) -> None: ...


class Budget:
    """Bytes held for all peers together, against one limit."""

    __slots__ = ("_granted", "_holders", "_waiting", "limit", "received", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.received = 0
        """The part of :attr:`used` that is partial requests, which only reading frees."""
        self._holders = 0  # connections holding anything: the fair share's divisor
        self._waiting: dict[Holder, None] = {}  # insertion-ordered: first come, first served
        self._granted: dict[Holder, None] = {}  # reading until their frame is whole

    @property
    def waiting(self) -> int:
        """Connections paused until bytes are freed."""
        return len(self._waiting)

    def update(self, before: int, after: int, received_change: int = 0) -> None:
        """Record that a holder's bytes went from ``before`` to ``after``.

        ``received_change`` is how much of the change is bytes of requests received.
        """
        self.used += after - before
        self.received += received_change
        if not before and after:
            self._holders += 1
        elif before and not after:
            self._holders -= 1
        if after < before and self._waiting:
            self._grant()

    def may_read(self, holder: Holder) -> bool:
        """Whether ``holder`` may read now; if not, it joins the line."""
        if holder in self._granted:
            return True
        if holder in self._waiting:
            return False
        if self._room() >= READ_HEADROOM and (
            not self._waiting or holder.held <= self.limit // max(self._holders, 1)
        ):
            return True
        self._waiting[holder] = None
        if not self._granted and self._stuck():
            self._grant()  # nothing else would free room: start finishing a frame
        return holder not in self._waiting

    def read_size(self, holder: Holder) -> int:
        """How many bytes ``holder`` may read now: the room left, within bounds."""
        if holder in self._granted:
            return min(max(holder.frame_needs, MIN_READ), READ_HEADROOM)
        return min(max(self._room(), MIN_READ), READ_HEADROOM)

    def finished(self, holder: Holder) -> None:
        """``holder``'s frame is whole, or it stopped reading: its grant ends."""
        if holder not in self._granted:
            return
        del self._granted[holder]
        if self._waiting:
            self._grant()

    def over(self) -> bool:
        """Whether more is held than the limit allows."""
        return self.used > self.limit

    def forget(self, holder: Holder) -> None:
        """Take a holder out of the line and its grant (its connection is gone)."""
        self._waiting.pop(holder, None)
        self._granted.pop(holder, None)

    def _stuck(self) -> bool:
        # Most of what is held is partial requests: only finishing one frees anything.
        return self.used - self.received <= self.limit // 4

    def _room(self) -> int:
        # What is free, less what granted frames are still owed.
        room = self.limit - self.used
        for holder in self._granted:
            room -= holder.frame_needs
        return room

    def _grant(self) -> None:
        room = self._room()
        for holder in list(self._waiting):
            needs = holder.frame_needs
            need = needs or READ_HEADROOM
            if need > room:
                if self._granted or not self._stuck():
                    return  # first come, first served: what is in progress will free room
                if not needs:
                    continue
                # No frame can finish, so nothing would ever be freed: this one may
                # overdraw (by less than one frame) to finish its own.
            del self._waiting[holder]
            room -= need
            if needs:
                self._granted[holder] = None
            holder.budget_granted()
