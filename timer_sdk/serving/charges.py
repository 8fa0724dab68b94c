"""A server connection's part in the memory budget: what it holds, and when it reads.

A mixin of :class:`~timer_sdk.serving.connection.Connection`, apart because the
request loop needs only two answers from it: what to charge after a turn
(:meth:`_Charges._recharge`) and whether to read on (:meth:`_Charges._admitted`).
Admission is at the frame head (see :mod:`timer_sdk.wire.budget`): a frame that
does not fit waits, unread, in the socket; only one that could never fit,
being larger than the whole budget, is refused.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..wire.framing import encode_error

if TYPE_CHECKING:
    from ..limits import ServerStats
    from ..wire.backlog import EventBacklog
    from ..wire.budget import Budget
    from ..wire.framing import RequestReader
    from .host import Host

logger = logging.getLogger("timer_sdk.server")


class _Charges:
    """The budget side of a :class:`~.connection.Connection`, which holds the state."""

    if TYPE_CHECKING:  # provided by Connection
        _server: Host
        _transport: asyncio.Transport | None
        _stats: ServerStats
        _budget: Budget
        _reader: RequestReader
        _backlog: EventBacklog
        _peer: str
        _slot_bytes: int
        _write_buffered: int
        _lingering: bool
        _budget_wait: bool
        held: int
        _events_charged: int
        _event_pending: int
        _event_unsent: int

        def _answer(self, frame: bytes) -> None: ...
        def _caught_up(self) -> None: ...
        def _schedule_flush(self) -> None: ...

    def _recharge(self) -> None:
        """Tell the budget what this connection holds now."""
        received = 0
        if self._transport is not None and not self._lingering:
            received = self._reader.buffered
        backlog = self._backlog.bytes
        pending = self._event_pending
        held = self._slot_bytes + self._write_buffered + backlog + pending + received
        events = backlog + pending + self._event_unsent  # the unsent part is in _write_buffered
        before = self.held
        if held != before or events != self._events_charged:
            self.held = held
            change = events - self._events_charged
            self._events_charged = events
            self._budget.update(before, held, change)

    def refresh_charge(self) -> None:
        """Re-read what is still unsent: the peer may have read it since our last write."""
        transport = self._transport
        if transport is not None:
            unsent = transport.get_write_buffer_size()
            if unsent != self._write_buffered:
                self._write_buffered = unsent
                self._event_unsent = min(self._event_unsent, unsent)
                if not unsent:
                    self._caught_up()  # without ever pausing
                    self._schedule_flush()
                self._recharge()

    def budget_granted(self) -> None:
        """Room was freed for this connection: read again (next turn)."""
        self._budget_wait = False
        self._schedule_flush()

    def _admitted(self) -> bool:
        """Whether to read on; if not, this connection waits for the budget's grant."""
        if self._budget_wait:
            return False
        reader = self._reader
        need = reader.frame_needs if reader.in_frame else 0
        budget = self._budget
        if need and reader.buffered + need > budget.limit:
            self._refuse_frame(reader.buffered + need)
            need = 0  # its rest is skipped as it arrives
        if budget.admit(self, need):
            return True
        self._budget_wait = True
        self._stats.budget_waits += 1
        self._server._reclaim()  # idle buffers go before anyone waits long
        return False

    def _refuse_frame(self, size: int) -> None:
        # The one refusal: waiting would never make room for it.
        method = self._reader.abandon_frame()
        limit = self._budget.limit
        self._stats.budget_refusals += 1
        self._stats.error_replies += 1
        message = f"request of {size} bytes can never fit in the memory budget of {limit} bytes"
        logger.info("%s: %s: %s", self._peer, method, message)
        self._answer(encode_error(f"{method}: {message}"))
