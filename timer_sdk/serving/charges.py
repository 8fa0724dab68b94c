"""A server connection's part in the memory budget: what it holds, and when it reads.

:class:`Charges` is the budget's holder for one connection (see
:class:`~timer_sdk.wire.budget.Holder`): the budget sees this object, never
the connection. The request loop needs two answers from it: what to charge
after a turn (:meth:`Charges.recharge`) and whether to read on
(:meth:`Charges.admitted`). Admission is at the frame head (see
:mod:`timer_sdk.wire.budget`): a frame that does not fit waits, unread, in the
socket; only one that could never fit, being larger than the whole budget, is
refused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..wire.budget import IN_FLIGHT_COST
from ..wire.framing import encode_error

if TYPE_CHECKING:
    from ..limits import ServerStats
    from ..wire.backlog import EventBacklog
    from ..wire.budget import Budget
    from ..wire.framing import RequestReader
    from .replies import Replies

__all__ = ["ChargeOwner", "Charges"]

logger = logging.getLogger("timer_sdk.server")


class ChargeOwner(Protocol):
    """What :class:`Charges` needs of its connection."""

    _transport: asyncio.Transport | None
    _lingering: bool
    _peer: str

    def _answer(self, frame: bytes) -> None: ...
    def _caught_up(self) -> None: ...
    def _schedule_flush(self) -> None: ...


class Charges:
    """What one connection holds against the server's budget, and whether it may read."""

    __slots__ = ("_backlog", "_budget", "_owner", "_reader", "_reclaim", "_replies", "_stats",
                 "budget_wait", "event_pending", "event_unsent", "events_charged", "held",
                 "write_buffered")  # fmt: skip

    def __init__(
        self,
        owner: ChargeOwner,
        *,
        budget: Budget,
        stats: ServerStats,
        reader: RequestReader,
        backlog: EventBacklog,
        replies: Replies,
        reclaim: Callable[[], None],
    ) -> None:
        self._owner = owner
        self._budget = budget
        self._stats = stats
        self._reader = reader
        self._backlog = backlog
        self._replies = replies
        self._reclaim = reclaim  # the server frees idle buffers before anyone waits long
        self.held = 0
        """Bytes this connection has charged to the server's budget."""
        self.events_charged = 0  # the part of held that is events, as last told
        self.write_buffered = 0  # sampled while writing is paused; 0 once drained
        self.event_pending = 0  # bytes of event frames in the replies' out
        self.event_unsent = 0  # the part of write_buffered that is event frames
        self.budget_wait = False

    def recharge(self) -> None:
        """Tell the budget what this connection holds now."""
        owner = self._owner
        received = 0
        if owner._transport is not None and not owner._lingering:
            received = self._reader.buffered
        backlog = self._backlog.bytes
        pending = self.event_pending
        held = self._replies.held + self.write_buffered + backlog + pending + received
        events = backlog + pending + self.event_unsent  # the unsent part is in write_buffered
        before = self.held
        if held != before or events != self.events_charged:
            self.held = held
            change = events - self.events_charged
            self.events_charged = events
            self._budget.update(before, held, change)

    def refresh_charge(self) -> None:
        """Re-read what is still unsent: the peer may have read it since our last write."""
        transport = self._owner._transport
        assert transport is not None  # asked of open connections only (Server._reclaim)
        unsent = transport.get_write_buffer_size()
        if unsent != self.write_buffered:
            self.write_buffered = unsent
            self.event_unsent = min(self.event_unsent, unsent)
            if not unsent:
                self._owner._caught_up()  # without ever pausing
                self._owner._schedule_flush()
            self.recharge()

    def budget_granted(self) -> None:
        """Room was freed for this connection: read again (next turn)."""
        self.budget_wait = False
        self._owner._schedule_flush()

    def admitted(self, held_back: bool = False) -> bool:
        """Whether to read on; if not, this connection waits for the budget's grant.

        ``held_back``: a whole frame waits to be started, for want of room for
        the request it becomes (:data:`~timer_sdk.wire.budget.IN_FLIGHT_COST`).
        """
        if self.budget_wait:
            return False
        reader = self._reader
        need = reader.frame_needs if reader.in_frame else 0
        budget = self._budget
        if held_back:
            need = IN_FLIGHT_COST
        elif need and reader.buffered + need > budget.limit:
            self._refuse_frame(reader.buffered + need)
            need = 0  # its rest is skipped as it arrives
        if budget.admit(self, need, start=held_back):
            return True
        self.budget_wait = True
        self._stats.budget_waits += 1
        self._reclaim()  # idle buffers go before anyone waits long
        return False

    def _refuse_frame(self, size: int) -> None:
        # The one refusal: waiting would never make room for it.
        method = self._reader.abandon_frame()
        limit = self._budget.limit
        self._stats.budget_refusals += 1
        self._stats.error_replies += 1
        message = f"request of {size} bytes can never fit in the memory budget of {limit} bytes"
        logger.info("%s: %s: %s", self._owner._peer, method, message)
        self._owner._answer(encode_error(f"{method}: {message}"))
