"""How a server connection ends: shutdown, lingering close, deadlines, peer checks.

A mixin of :class:`~timer_sdk.serving.connection.Connection`, apart because none of
it runs per request: it decides when and how the connection stops, while
``connection.py`` keeps the request loop. The loop only runs and stops the
frame deadline (:meth:`_Endings._frame_clock`) and starts the peer watch
when it stops reading.

A violation ends a connection as HTTP/2's GOAWAY does: every request received
whole before it is answered first, then the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
import select
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..limits import ServerStats
    from ..wire.budget import Budget
    from ..wire.framing import RequestReader
    from .replies import _Slot

logger = logging.getLogger("timer_sdk.connection_endings")

_LINGER = 2.0
"""Seconds to drain a peer's unread requests after our last reply, before closing."""

_PEER_CHECK = 1.0
"""Seconds between looks at a peer we are not reading from, to see whether it is gone."""


class _Endings:
    """The endings of a :class:`~timer_sdk.serving.connection.Connection`, which holds the state."""

    if TYPE_CHECKING:  # provided by Connection
        _transport: asyncio.Transport | None
        _loop: asyncio.AbstractEventLoop
        _stats: ServerStats
        _budget: Budget
        _reader: RequestReader
        _slots: deque[_Slot]
        _tasks: set[asyncio.Task[None]]
        _out: list[bytes]
        _peer: str
        _frame_timeout: float | None
        _idle_timeout: float | None
        _reading_paused: bool
        _shutting_down: bool
        _peer_done: bool
        _lingering: bool
        _frame_deadline: asyncio.TimerHandle | None
        _frame_left: float
        _frame_started: float
        _idle_handle: asyncio.TimerHandle | None
        _peer_check: asyncio.TimerHandle | None
        _last_activity: float

        def _process(self) -> None: ...
        def _recharge(self) -> None: ...
        def _pause_reading(self, pause: bool) -> None: ...
        def _schedule_flush(self) -> None: ...

    def shutdown(self) -> None:
        """Stop reading; answer the frames already received; then close."""
        if self._transport is None or self._shutting_down:
            return
        self._shutting_down = True
        self._process()

    def abort(self) -> None:
        """Close now; cancel the procs still running for this connection."""
        for task in self._tasks:
            task.cancel()
        if self._transport is not None:
            self._transport.abort()

    def _close_lingering(self) -> None:
        """Close after the last reply without destroying it, as nginx does.

        Closing with unread requests in the socket makes the kernel send RST,
        and a RST can discard replies the peer has not read yet. So send FIN
        first, then read and drop until the peer closes or ``_LINGER`` passes.
        """
        transport = self._transport
        assert transport is not None
        if self._peer_done or not transport.can_write_eof():
            transport.close()  # TLS has no half-close; a finished peer sends nothing
            return
        try:
            transport.write_eof()
        except OSError:  # the peer reset meanwhile: nobody is left to linger for
            transport.abort()
            return
        self._lingering = True
        self._cancel_timers()
        self._recharge()  # what is left unread is dropped, not held
        self._pause_reading(False)
        self._frame_deadline = self._loop.call_later(_LINGER, transport.close)

    # --- deadlines --------------------------------------------------------------

    def _frame_clock(self, running: bool, restart: bool) -> None:
        """Run the frame deadline while we read a partial frame; stop it while we do not.

        ``restart``: a frame was completed, so the next one gets the whole
        ``frame_timeout``. Time paused by our own choice is not counted.
        """
        timeout = self._frame_timeout
        if timeout is None:
            return
        in_frame = self._reader.in_frame
        handle = self._frame_deadline
        if handle is not None and (restart or not running or not in_frame):
            handle.cancel()
            self._frame_deadline = handle = None
            if not restart and in_frame:  # paused: keep what is left of it
                self._frame_left -= self._loop.time() - self._frame_started
        if restart or not in_frame:
            self._frame_left = timeout
        if running and in_frame and handle is None:
            self._frame_started = self._loop.time()
            self._frame_deadline = self._loop.call_later(
                max(self._frame_left, 0.0), self._frame_timed_out
            )

    def _frame_timed_out(self) -> None:
        # A slow peer: answer what it sent whole, then close, as GOAWAY does.
        self._frame_deadline = None
        self._stats.frame_timeouts += 1
        self._stats.protocol_violations += 1
        reason = f"frame not finished within {self._frame_timeout} s"
        logger.warning("%s: closing: %s", self._peer, reason)
        self._reader.give_up()  # the partial frame is no request: nothing answers it
        self._budget.finished(self)  # type: ignore[arg-type]  # self is a Connection
        self._shutting_down = True
        self._process()

    def _check_idle(self) -> None:
        assert self._idle_timeout is not None
        quiet = self._loop.time() - self._last_activity
        if quiet >= self._idle_timeout and not self._slots and self._transport is not None:
            self._idle_handle = None
            self._stats.idle_timeouts += 1
            logger.info("%s: closing after %.1f s idle", self._peer, quiet)
            self._transport.close()
            return
        wait = max(self._idle_timeout - quiet, 0.01)
        self._idle_handle = self._loop.call_later(wait, self._check_idle)

    def _cancel_timers(self) -> None:
        for handle in (self._frame_deadline, self._idle_handle, self._peer_check):
            if handle is not None:
                handle.cancel()
        self._frame_deadline = self._idle_handle = self._peer_check = None

    # --- the peer ---------------------------------------------------------------

    def _watch_peer(self) -> None:
        # A paused transport does not see a reset: without this, procs whose
        # caller is gone would run on, holding the budget, as long as they like.
        if self._peer_check is None and self._tasks:
            self._peer_check = self._loop.call_later(_PEER_CHECK, self._check_peer)

    def _check_peer(self) -> None:
        self._peer_check = None
        transport = self._transport
        if transport is None or not self._reading_paused:
            return
        if _hung_up(transport):
            logger.info("%s: gone while not being read; cancelling its calls", self._peer)
            transport.abort()  # connection_lost cancels the orphans
            return
        self._watch_peer()


def _hung_up(transport: asyncio.Transport) -> bool:
    """Whether the peer reset the connection or closed it both ways.

    A FIN alone is a half-close, which still gets every reply; only a reset
    (TCP) or a full close (Unix) means that nobody will read them.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), 0)  # POLLHUP and POLLERR are always reported
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))
