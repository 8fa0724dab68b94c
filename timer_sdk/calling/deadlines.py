"""The per-call deadlines of one connection, on one loop timer.

A call with a timeout costs a tuple here, not a timer handle and a coroutine:
the timer is armed for the earliest deadline and re-armed when it fires. Calls
made with the same timeout expire in the order they were made (the loop's
clock never goes back), so each distinct timeout keeps a FIFO whose front is
its earliest deadline. A call that settles early leaves its entry behind; it is
dropped when it reaches the front, or by a sweep once the entries outnumber
twice the live ones, so memory stays bounded by the calls in flight.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Any, Protocol

from ..errors import CallTimeout

__all__ = ["Deadlines"]

_SWEEP_SLACK = 64  # entries allowed beyond twice the live ones before a sweep


class _Named(Protocol):
    @property
    def name(self) -> str: ...


# A FIFO holds each call as three items in a row: deadline, future, method.
# Flat, a call adds no object for the collector to track (a tuple would).
_Fifo = deque[Any]


class Deadlines:
    """Fail each call's future with :class:`CallTimeout` once its timeout passes.

    A future settled first (a reply, an error, a cancel) is left alone: a
    reply read in the iteration its deadline fires wins, as asyncio runs I/O
    callbacks before timers.
    """

    __slots__ = ("_armed_at", "_by_timeout", "_count", "_kept", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._by_timeout: dict[float, _Fifo] = {}
        self._count = 0  # calls in all FIFOs, settled ones included
        self._kept = 0  # entries left after the last sweep
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = math.inf

    def __len__(self) -> int:
        return self._count

    def add(self, timeout: float, future: asyncio.Future[Any], method: _Named) -> None:
        """Give ``future`` a deadline ``timeout`` seconds from now."""
        deadline = self._loop.time() + timeout
        fifo = self._by_timeout.get(timeout)
        if fifo is None:
            fifo = self._by_timeout[timeout] = deque()
        else:
            while fifo and fifo[1].done():  # settled calls, usually all of the front
                fifo.popleft()
                fifo.popleft()
                fifo.popleft()
                self._count -= 1
        fifo.append(deadline)
        fifo.append(future)
        fifo.append(method)
        self._count += 1
        if deadline < self._armed_at:
            self._arm(deadline)
        if self._count > 2 * self._kept + _SWEEP_SLACK:
            self._sweep()

    def clear(self) -> None:
        """Forget every deadline (the connection failed its calls itself)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_at = math.inf
        self._by_timeout.clear()
        self._count = self._kept = 0

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = when
        self._timer = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer = None
        # A loop may run a timer a little early (asyncio within its clock
        # resolution, uvloop to the millisecond): what it was armed for is due.
        due = max(self._loop.time(), self._armed_at)
        self._armed_at = math.inf
        earliest = math.inf
        expired: list[tuple[float, float, asyncio.Future[Any], _Named]] = []
        by_timeout = self._by_timeout
        for timeout, fifo in list(by_timeout.items()):
            while fifo:
                deadline, future = fifo[0], fifo[1]
                if not future.done():
                    if deadline > due:
                        earliest = min(earliest, deadline)
                        break
                    expired.append((deadline, timeout, future, fifo[2]))
                fifo.popleft()
                fifo.popleft()
                fifo.popleft()
                self._count -= 1
            if not fifo:
                del by_timeout[timeout]
        # A late timer may find several FIFOs due: fail them in deadline order.
        expired.sort(key=lambda item: item[0])
        for _, timeout, future, method in expired:
            future.set_exception(CallTimeout(f"{method.name}: no reply within {timeout} s"))
        if earliest < math.inf:
            self._arm(earliest)

    def _sweep(self) -> None:
        """Drop the entries of settled calls anywhere in the FIFOs."""
        by_timeout = self._by_timeout
        for timeout, fifo in list(by_timeout.items()):
            live: _Fifo = deque()
            items = iter(fifo)
            for deadline in items:
                future, method = next(items), next(items)
                if not future.done():
                    live.extend((deadline, future, method))
            if live:
                by_timeout[timeout] = live
            else:
                del by_timeout[timeout]
        self._count = self._kept = sum(len(fifo) for fifo in by_timeout.values()) // 3
