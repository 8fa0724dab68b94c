"""Event subscriptions: bounded queues that say how much they dropped.

A :class:`Subscription` is what ``timer.events()`` and ``client.events()``
return. Publishing never blocks and never waits for the subscriber: when its
queue is full the oldest waiting event is dropped, and the next item the
subscriber gets is an :class:`EventsDropped` notice with the count. Where
the count cannot be known (a client's connection was lost and reopened), the
stream carries an :class:`EventsMayHaveBeenMissed` notice at the gap instead.
An event of a kind this client does not know (a newer server's) arrives as
an :class:`UnknownEvent`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .models import EchoEvent

__all__ = ["EventsDropped", "EventsMayHaveBeenMissed", "Subscription", "UnknownEvent"]


@dataclass(frozen=True, slots=True)
class EventsDropped:
    """``count`` events were dropped here because the subscriber fell behind."""

    count: int


@dataclass(frozen=True, slots=True)
class EventsMayHaveBeenMissed:
    """Events fired in a gap may be missing here; how many, nobody knows.

    A client's subscription yields this where its connection was lost and,
    with ``reconnect=True``, reopened and subscribed again: events before it
    came over the old connection, events after it over the new one. Unlike
    :class:`EventsDropped` it has no count, and it is not added to
    :attr:`Subscription.dropped`. ``reason`` says what happened, for logs.
    """

    reason: str


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event of a kind this client does not know, from a newer server.

    ``name`` is its wire name and ``data`` its payload as decoded, unchecked.
    It is delivered, not dropped, so that a program can log or forward it;
    one that only handles the events it knows passes over it by its type.
    It takes a place in the queue like any event.
    """

    name: str
    data: Any


_Item = EchoEvent | UnknownEvent | EventsMayHaveBeenMissed


class Subscription:
    """An async iterator of :class:`EchoEvent` and the notices about gaps in it.

    The notices are :class:`EventsDropped` and :class:`EventsMayHaveBeenMissed`;
    an event of a kind this client does not know is an :class:`UnknownEvent`.
    Use it as ``async with timer.events() as events: async for item in events:``.
    The iteration ends when the subscription is closed (by :meth:`aclose`,
    by closing its client, or by the server shutting down); a lost connection
    raises :class:`~timer_sdk.errors.ConnectionLost` instead, unless the client
    reconnects (``reconnect=True``), which subscribes again by itself.
    """

    __slots__ = (
        "_closed",
        "_dropped",
        "_error",
        "_gaps",
        "_on_close",
        "_opener",
        "_queue",
        "_waiter",
        "dropped",
        "max_queue",
    )

    def __init__(
        self,
        attach: Callable[[Callable[[EchoEvent], None]], Callable[[], None]] | None = None,
        *,
        max_queue: int = 1024,
        opener: Callable[[Subscription], Awaitable[Callable[[], None]]] | None = None,
    ) -> None:
        """Not called directly: ``timer.events()`` and ``client.events()`` return one.

        It subscribes now through ``attach``, or on first use through
        ``opener``; each returns the function that detaches it again.
        """
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.max_queue = max_queue
        self.dropped = 0
        """How many events this subscription has dropped in all."""
        self._queue: deque[_Item] = deque()
        self._gaps = 0  # gap notices in the queue; they do not count against max_queue
        self._dropped = 0  # dropped since the last notice
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._error: BaseException | None = None
        self._opener = opener
        self._on_close = attach(self.publish) if attach is not None else None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Subscription {state}, {len(self._queue)} queued, {self.dropped} dropped>"

    @property
    def closed(self) -> bool:
        """Whether the stream has ended."""
        return self._closed

    def publish(self, event: EchoEvent | UnknownEvent) -> None:
        """Queue ``event``; drop the oldest waiting one if the queue is full."""
        if self._closed:
            return
        if len(self._queue) - self._gaps >= self.max_queue:
            self._drop_oldest_event()
            self.note_dropped(1)
        self._queue.append(event)
        self._wake()

    def _drop_oldest_event(self) -> None:
        queue = self._queue
        head = queue.popleft()
        if isinstance(head, EventsMayHaveBeenMissed):  # a gap notice is never dropped
            queue.popleft()  # notices are never adjacent, so this is an event
            if queue and isinstance(queue[0], EventsMayHaveBeenMissed):
                queue.popleft()  # now they would be: one gap
                self._gaps -= 1
            queue.appendleft(head)

    def note_gap(self, reason: str) -> None:
        """Mark a gap in the stream here: events may have been missed, how many is unknown."""
        if self._closed:
            return
        queue = self._queue
        if queue and isinstance(queue[-1], EventsMayHaveBeenMissed):
            return  # two gaps with nothing between them are one gap
        queue.append(EventsMayHaveBeenMissed(reason))
        self._gaps += 1
        self._wake()

    def note_dropped(self, count: int) -> None:
        """Record ``count`` events lost upstream (for example, by the server)."""
        self._dropped += count
        self.dropped += count
        self._wake()

    def end(self, error: BaseException | None = None) -> None:
        """End the stream once what is queued is read; ``error`` is raised then."""
        if self._closed:
            return
        self._closed = True
        self._error = error
        if self._on_close is not None:
            self._on_close()
        self._wake()

    async def aclose(self) -> None:
        """Unsubscribe. Events queued but not read are discarded."""
        self._opener = None
        self._queue.clear()
        self._gaps = 0
        self._dropped = 0
        self.end()

    async def _open(self) -> None:
        opener, self._opener = self._opener, None
        if opener is not None and not self._closed:
            self._on_close = await opener(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(
        self,
    ) -> EchoEvent | UnknownEvent | EventsDropped | EventsMayHaveBeenMissed:
        """Return the next item; cancelling this loses nothing queued."""
        if self._opener is not None:
            await self._open()
        while True:
            if self._dropped:
                count, self._dropped = self._dropped, 0
                return EventsDropped(count)
            if self._queue:
                item = self._queue.popleft()
                if type(item) is EventsMayHaveBeenMissed:
                    self._gaps -= 1
                return item
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def __aenter__(self) -> Subscription:
        """Start the subscription, so that no event is missed from here on."""
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
