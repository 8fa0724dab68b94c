"""How a server connection ends: shutdown, lingering close, deadlines, peer checks.

:class:`Endings` is a part of :class:`~timer_sdk.serving.connection.Connection`,
apart because none of it runs per request: it decides when and how the
connection stops, while ``connection.py`` keeps the request loop. The loop
only runs and stops the frame deadline (:meth:`Endings.frame_clock`) and
starts the peer watch when it stops reading.

A violation ends a connection as HTTP/2's GOAWAY does: every request received
whole before it is answered first, then the connection closes. A peer that
asked for it (``server.goaway``) is told so after the last reply: every request
it sent that has no reply then was never read, and may go elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import select
from typing import TYPE_CHECKING, Protocol

from ..wire.api import encode_goaway
from ..wire.framing import RET_GOAWAY, encode_reply

if TYPE_CHECKING:
    from ..limits import ServerStats
    from ..wire.budget import Budget, Holder
    from ..wire.framing import RequestReader
    from .replies import Replies

__all__ = ["EndingOwner", "Endings"]

logger = logging.getLogger("timer_sdk.connection_endings")

_LINGER = 2.0
"""Seconds to drain a peer's unread requests after our last reply, before closing."""

_PEER_CHECK = 1.0
"""Seconds between looks at a peer we are not reading from, to see whether it is gone."""


class EndingOwner(Protocol):
    """What :class:`Endings` needs of its connection: its state, and three steps."""

    _transport: asyncio.Transport | None
    _peer: str
    _tasks: set[asyncio.Task[None]]
    _reading_paused: bool
    _shutting_down: bool
    _peer_done: bool
    _lingering: bool
    _goaway: bool

    def _process(self) -> None: ...
    def _stop_events(self) -> None: ...
    def _recharge(self) -> None: ...
    def _pause_reading(self, pause: bool) -> None: ...


class Endings:
    """The deadlines of one connection, and how it closes.

    ``frame_deadline``, ``idle_handle`` and ``peer_check`` are its timers;
    the connection keeps the flags its request loop reads (``_shutting_down``,
    ``_lingering``, ``_peer_done``) and this object sets them.
    """

    __slots__ = ("_budget", "_holder", "_loop", "_owner", "_reader", "_replies", "_stats",
                 "frame_deadline", "frame_left", "frame_started", "frame_timeout",
                 "idle_handle", "idle_timeout", "last_activity", "peer_check",
                 "reason")  # fmt: skip

    def __init__(
        self,
        owner: EndingOwner,
        *,
        loop: asyncio.AbstractEventLoop,
        stats: ServerStats,
        reader: RequestReader,
        replies: Replies,
        budget: Budget,
        holder: Holder,
        frame_timeout: float | None,
        idle_timeout: float | None,
    ) -> None:
        self._owner = owner
        self._loop = loop
        self._stats = stats
        self._reader = reader
        self._replies = replies
        self._budget = budget
        self._holder = holder  # the connection's charges, as the budget knows them
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.frame_deadline: asyncio.TimerHandle | None = None
        self.frame_left = frame_timeout or 0.0  # what is left while we do not read
        self.frame_started = 0.0
        self.idle_handle: asyncio.TimerHandle | None = None
        self.peer_check: asyncio.TimerHandle | None = None
        self.last_activity = 0.0
        self.reason = "the server is closing this connection"
        """Why it closes, for the close notice."""

    def start_idle_clock(self) -> None:
        """The connection is open: close it after ``idle_timeout`` s without a byte."""
        if self.idle_timeout is not None:
            self.last_activity = self._loop.time()
            self.idle_handle = self._loop.call_later(self.idle_timeout, self._check_idle)

    def close_lingering(self) -> None:
        """Close after the last reply without destroying it, as nginx does.

        Closing with unread requests in the socket makes the kernel send RST,
        and a RST can discard replies the peer has not read yet. So send FIN
        first, then read and drop until the peer closes or ``_LINGER`` passes.
        """
        owner = self._owner
        transport = owner._transport
        assert transport is not None
        if owner._goaway and not owner._peer_done:
            # After the last reply, and the last frame: no event may follow it.
            owner._stop_events()
            transport.write(encode_reply(RET_GOAWAY, encode_goaway(self.reason)))
        if owner._peer_done or not transport.can_write_eof():
            transport.close()  # TLS has no half-close; a finished peer sends nothing
            return
        try:
            transport.write_eof()
        except OSError:  # the peer reset meanwhile: nobody is left to linger for
            transport.abort()
            return
        owner._lingering = True
        self.cancel_timers()
        owner._recharge()  # what is left unread is dropped, not held
        owner._pause_reading(False)
        self.frame_deadline = self._loop.call_later(_LINGER, transport.close)

    # --- deadlines --------------------------------------------------------------

    def frame_clock(self, running: bool, restart: bool) -> None:
        """Run the frame deadline while we read a partial frame; stop it while we do not.

        ``restart``: a frame was completed, so the next one gets the whole
        ``frame_timeout``. Time paused by our own choice is not counted.
        """
        timeout = self.frame_timeout
        if timeout is None:
            return
        in_frame = self._reader.in_frame
        handle = self.frame_deadline
        if handle is not None and (restart or not running or not in_frame):
            handle.cancel()
            self.frame_deadline = handle = None
            if not restart and in_frame:  # paused: keep what is left of it
                self.frame_left -= self._loop.time() - self.frame_started
        if restart or not in_frame:
            self.frame_left = timeout
        if running and in_frame and handle is None:
            self.frame_started = self._loop.time()
            self.frame_deadline = self._loop.call_later(
                max(self.frame_left, 0.0), self._frame_timed_out
            )

    def _frame_timed_out(self) -> None:
        # A slow peer: answer what it sent whole, then close, as GOAWAY does.
        self.frame_deadline = None
        self._stats.frame_timeouts += 1
        self._stats.protocol_violations += 1
        self.reason = reason = f"frame not finished within {self.frame_timeout} s"
        owner = self._owner
        logger.warning("%s: closing: %s", owner._peer, reason)
        self._reader.give_up()  # the partial frame is no request: nothing answers it
        self._budget.finished(self._holder)
        owner._shutting_down = True
        owner._process()

    def _check_idle(self) -> None:
        assert self.idle_timeout is not None
        quiet = self._loop.time() - self.last_activity
        transport = self._owner._transport
        if quiet >= self.idle_timeout and not self._replies.slots and transport is not None:
            self.idle_handle = None
            self._stats.idle_timeouts += 1
            logger.info("%s: closing after %.1f s idle", self._owner._peer, quiet)
            transport.close()
            return
        wait = max(self.idle_timeout - quiet, 0.01)
        self.idle_handle = self._loop.call_later(wait, self._check_idle)

    def cancel_timers(self) -> None:
        for handle in (self.frame_deadline, self.idle_handle, self.peer_check):
            if handle is not None:
                handle.cancel()
        self.frame_deadline = self.idle_handle = self.peer_check = None

    # --- the peer ---------------------------------------------------------------

    def watch_peer(self) -> None:
        """Look at a peer we stopped reading now and then: procs whose caller is gone stop."""
        # A paused transport does not see a reset: without this, procs whose
        # caller is gone would run on, holding the budget, as long as they like.
        if self.peer_check is None and self._owner._tasks:
            self.peer_check = self._loop.call_later(_PEER_CHECK, self._check_peer)

    def _check_peer(self) -> None:
        self.peer_check = None
        owner = self._owner
        transport = owner._transport
        if transport is None or not owner._reading_paused:
            return
        if _hung_up(transport):
            logger.info("%s: gone while not being read; cancelling its calls", owner._peer)
            transport.abort()  # connection_lost cancels the orphans
            return
        self.watch_peer()


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
