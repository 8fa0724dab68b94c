"""A subscriber's event backlog: bounded in count and in bytes, losses counted.

No I/O. A connection whose peer stops reading keeps events here instead of
encoding them; past either bound the oldest go, and :attr:`dropped` says how
many, for the next drop notice. The byte count is what the connection
charges to the server's budget.
"""

from __future__ import annotations

from collections import deque

from ..models import EchoEvent

__all__ = ["EVENT_OVERHEAD", "EventBacklog", "event_size"]

EVENT_OVERHEAD = 64
"""Bytes an event frame adds to its message: header, keys, the count, the name."""


def event_size(event: EchoEvent) -> int:
    """An event's frame size, closely enough to budget for without encoding it."""
    message = event.message
    return EVENT_OVERHEAD + (len(message) if message.isascii() else len(message.encode()))


class EventBacklog:
    """Events held for one subscriber, oldest first."""

    __slots__ = ("_events", "bytes", "dropped", "gap", "max_bytes", "max_count")

    def __init__(self, *, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.bytes = 0
        self.dropped = 0
        """Events lost since the last drop notice."""
        self.gap: str | None = None
        """Why events may be missing, how many unknown, if so since the last notice."""
        self._events: deque[tuple[EchoEvent, int]] = deque()

    def __len__(self) -> int:
        return len(self._events)

    def hold(self, event: EchoEvent) -> int:
        """Keep ``event``; drop the oldest past the bounds; return how many went."""
        size = event_size(event)
        self._events.append((event, size))
        self.bytes += size
        lost = 0
        while len(self._events) > self.max_count or self.bytes > self.max_bytes:
            lost += self.drop_oldest()
        return lost

    def drop_oldest(self) -> int:
        """Drop the oldest event, if any; return how many went (0 or 1)."""
        if not self._events:
            return 0
        _, size = self._events.popleft()
        self.bytes -= size
        self.dropped += 1
        return 1

    def take(self) -> list[EchoEvent]:
        """Hand over every event held, oldest first, and forget them."""
        events = [event for event, _ in self._events]
        self._events.clear()
        self.bytes = 0
        return events

    def take_dropped(self) -> int:
        """Return the count for a drop notice, and start counting afresh."""
        dropped, self.dropped = self.dropped, 0
        return dropped
