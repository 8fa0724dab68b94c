"""Run a coroutine's first step inline, and pay for a Task only if it suspends.

Most procs finish without awaiting anything (``version``, ``complex``,
``echo`` with no delay). Creating a Task for each costs more than the proc
itself, so the server steps the coroutine by hand first. Python 3.12 has
``eager_start`` for this; 3.11 does not.
"""

from __future__ import annotations

import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

__all__ = ["Suspended", "resume", "start"]

T = TypeVar("T")


class Suspended:
    """A coroutine that suspended in its first step, and what it yielded."""

    __slots__ = ("coro", "held", "yielded")

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self.coro = coro
        self.yielded = yielded
        self.held = 0
        """Bytes its arguments hold while it runs, for a caller that counts memory (0: unknown)."""


def start(coro: Coroutine[Any, Any, T]) -> T | Suspended:
    """Run ``coro`` until it first suspends; return its result or a :class:`Suspended`.

    Exceptions from the first step propagate. The caller must hand a
    :class:`Suspended` to :func:`resume` inside a Task.
    """
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    return Suspended(coro, yielded)


@types.coroutine
def resume(suspended: Suspended) -> Generator[Any, Any, Any]:
    """Await the rest of a coroutine that :func:`start` ran partway.

    The Task running this sees exactly what the coroutine yields, so futures
    and cancellation behave as if the Task had run it from the start.
    """
    coro = suspended.coro
    yielded = suspended.yielded
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # thrown in by the Task, e.g. CancelledError
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value
