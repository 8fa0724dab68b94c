"""How a server connection ends: shutdown, lingering close, deadlines, peer checks.

A mixin of :class:`~timer_sdk.connection.Connection`, apart because none of
it runs per request: it decides when and how the connection stops, while
``connection.py`` keeps the request loop. The loop only arms and disarms the
frame deadline (:meth:`_Endings._arm_frame_deadline`) and starts the peer
watch when it stops reading.
"""

from __future__ import annotations

import asyncio
import logging
import select
from collections import deque
from typing import TYPE_CHECKING

from .framing import encode_error

if TYPE_CHECKING:
    from .budget import Budget
    from .connection import _Slot
    from .framing import RequestReader
    from .limits import ServerStats

logger = logging.getLogger(__name__)

_LINGER = 2.0
"""Seconds to drain a peer's unread requests after our last reply, before closing."""

_PEER_CHECK = 1.0
"""Seconds between looks at a peer we are not reading from, to see whether it is gone."""


class _Endings:
    """The endings of a :class:`~timer_sdk.connection.Connection`, which holds the state."""

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
        _budget_wait: bool
        _shutting_down: bool
        _peer_done: bool
        _lingering: bool
        _frame_deadline: asyncio.TimerHandle | None
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

    def _fail(self, reason: str) -> None:
        self._stats.protocol_violations += 1
        logger.warning("%s: closing: %s", self._peer, reason)
        if self._transport is not None:
            self._transport.close()

    # --- deadlines --------------------------------------------------------------

    def _arm_frame_deadline(self, completed_any: bool, *, waiting_for_bytes: bool) -> None:
        timeout = self._frame_timeout
        if timeout is None:
            return
        handle = self._frame_deadline
        if waiting_for_bytes and self._reader.in_frame:
            if handle is None or completed_any:
                if handle is not None:
                    handle.cancel()
                self._frame_deadline = self._loop.call_later(timeout, self._frame_timed_out)
        elif handle is not None:
            handle.cancel()
            self._frame_deadline = None

    def _frame_timed_out(self) -> None:
        self._frame_deadline = None
        if self._budget_wait:
            method = self._reader.abandon_frame()
            if method is not None:
                # Our fault, not the peer's: answer, skip the rest, stay in sync.
                self._stats.budget_timeouts += 1
                self._stats.error_replies += 1
                self._out.append(
                    encode_error(
                        f"{method}: the server's memory budget stayed spent for "
                        f"{self._frame_timeout} s; the request was dropped, try again later"
                    )
                )
                self._budget_wait = False
                self._budget.forget(self)  # type: ignore[arg-type]  # self is a Connection
                self._schedule_flush()
                return
        self._stats.frame_timeouts += 1
        self._fail(f"frame not finished within {self._frame_timeout} s")

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
