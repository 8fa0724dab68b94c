"""The blocking portal: one event loop in one daemon thread, for every blocking client.

:func:`get_portal` starts it on first use, and again in a forked child.
:meth:`Portal.run` runs a coroutine there and blocks for its outcome; when the
caller is interrupted (Ctrl-C), the coroutine is cancelled on the loop, and a
result produced for it anyway is disposed of there, never dropped.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar, cast

from .errors import LoopError

__all__ = ["Portal", "get_portal"]

T = TypeVar("T")

_POLL: float | None = 0.25 if sys.platform == "win32" else None
"""How long one wait for an outcome lasts before it is renewed.

On Windows, Ctrl-C cannot interrupt an unbounded wait on a lock, so the wait
is cut into slices there. Elsewhere one unbounded wait is interruptible.
"""

_USE_AWAIT = (
    "timer_sdk.sync.TimerClient blocks, and this thread is running an event loop "
    "(a notebook cell or a coroutine), which it would freeze. Use the async client "
    "here: `client = await timer_sdk.TimerClient.connect(...)`, then "
    "`await client.echo(...)`."
)


class _Handoff(Generic[T]):
    """What the caller and the loop share about one call, under one lock.

    The caller may be interrupted at any point, even before it holds the
    call's future, so cancelling goes through here: the task is recorded as
    it starts, and whoever comes second acts (cancels it, or disposes of a
    result the caller will never receive).
    """

    __slots__ = ("abandoned", "delivered", "lock", "task", "value")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.task: asyncio.Task[T] | None = None
        self.delivered = False
        self.value: T | None = None


class Portal:
    """An event loop running in one daemon thread."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="timer-sdk-sync", daemon=True
        )
        self.thread.start()

    def check_caller(self) -> None:
        """Raise :class:`LoopError` if blocking this thread would deadlock or cannot work."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise LoopError(_USE_AWAIT)
        if self.pid != os.getpid():
            raise LoopError(
                "this timer_sdk.sync.TimerClient was connected in the parent process; "
                "connect a new one after fork"
            )

    def run(
        self,
        make: Callable[[], Coroutine[Any, Any, T]],
        dispose: Callable[[T], Coroutine[Any, Any, None]] | None = None,
    ) -> T:
        """Run the coroutine ``make()`` on the loop and block for its outcome.

        The coroutine is made on the loop, so a call cancelled before it
        started leaves no coroutine behind that was never awaited. If the
        caller is interrupted (Ctrl-C), the call is cancelled on the loop and
        the interruption propagates; a result that was produced for it
        anyway is handed to ``dispose`` on the loop, never dropped.
        """
        self.check_caller()
        handoff: _Handoff[T] = _Handoff()
        try:
            future = asyncio.run_coroutine_threadsafe(_produce(make, handoff, dispose), self.loop)
            while True:
                try:
                    return future.result(_POLL)
                except TimeoutError:
                    if future.done():
                        return future.result()  # its own outcome, CallTimeout included
        except BaseException:
            # The call's own error (nothing to undo), or the caller interrupted
            # (KeyboardInterrupt, or whatever else a signal handler raised).
            with handoff.lock:
                handoff.abandoned = True
                task = handoff.task
                orphan = handoff.delivered
            if task is not None and not task.done():
                self.loop.call_soon_threadsafe(task.cancel)
            if orphan and dispose is not None:
                # Produced before we left: cancelling cannot take it back.
                self._spawn(dispose(cast(T, handoff.value)))
            raise

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop)


async def _produce(
    make: Callable[[], Coroutine[Any, Any, T]],
    handoff: _Handoff[T],
    dispose: Callable[[T], Coroutine[Any, Any, None]] | None,
) -> T:
    with handoff.lock:
        if handoff.abandoned:  # the caller left before we started
            raise asyncio.CancelledError
        handoff.task = asyncio.current_task()
    value = await make()
    with handoff.lock:
        if not handoff.abandoned:
            handoff.value = value
            handoff.delivered = True
            return value
    if dispose is not None:
        # The task may be cancelled any moment now, as the caller asked.
        await asyncio.shield(dispose(value))
    return value


_portal: Portal | None = None
_portal_lock = threading.Lock()


def get_portal() -> Portal:
    """The process's portal, started now if it has none that runs."""
    global _portal  # noqa: PLW0603
    with _portal_lock:
        # A forked child inherits the object but not the thread that ran it.
        if _portal is None or _portal.pid != os.getpid() or not _portal.thread.is_alive():
            _portal = Portal()
        return _portal
