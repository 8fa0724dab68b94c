"""The server-wide byte budget: one bound on everything held for peers.

Like gRPC's ResourceQuota, it counts bytes, not messages, across every
connection: partial frames being received, requests in flight, replies
waiting to be written and event backlogs. Each connection reports what it
holds; the budget only adds up and decides who may read next.

When the budget is spent, a connection stops *reading* (it never refuses
or drops work it has accepted) and waits in line. Freed bytes go to the
longest waiter first, and a connection holding more than its fair share
yields to the others, so one greedy peer cannot starve the rest. No I/O
here: a holder is resumed through its :meth:`Holder.budget_granted`.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["READ_HEADROOM", "Budget", "Holder"]

READ_HEADROOM = 256 * 1024
"""The most one socket read adds (asyncio's recv size): the room a reader needs."""


class Holder(Protocol):
    """What the budget needs from a connection."""

    @property
    def held(self) -> int: ...

    def budget_granted(self) -> None: ...


class Budget:
    """Bytes held for all peers together, against one limit."""

    __slots__ = ("_holders", "_waiting", "limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._holders = 0  # connections holding anything: the fair share's divisor
        self._waiting: dict[Holder, None] = {}  # insertion-ordered: first come, first served

    @property
    def waiting(self) -> int:
        """Connections paused until bytes are freed."""
        return len(self._waiting)

    def update(self, before: int, after: int) -> None:
        """Record that a holder's bytes went from ``before`` to ``after``."""
        self.used += after - before
        if not before and after:
            self._holders += 1
        elif before and not after:
            self._holders -= 1
        if after < before and self._waiting:
            self._grant()

    def may_read(self, holder: Holder) -> bool:
        """Whether ``holder`` may read now; if not, it joins the line."""
        if holder in self._waiting:
            return False
        if self.used + READ_HEADROOM <= self.limit and (
            not self._waiting or holder.held <= self.limit // max(self._holders, 1)
        ):
            return True
        self._waiting[holder] = None
        return False

    def over(self) -> bool:
        """Whether more is held than the limit allows."""
        return self.used > self.limit

    def forget(self, holder: Holder) -> None:
        """Take a holder out of the line (its connection is gone)."""
        self._waiting.pop(holder, None)

    def _grant(self) -> None:
        # Each grantee may read up to READ_HEADROOM before it checks again.
        room = self.limit - self.used
        while self._waiting and room >= READ_HEADROOM:
            holder = next(iter(self._waiting))
            del self._waiting[holder]
            room -= READ_HEADROOM
            holder.budget_granted()
