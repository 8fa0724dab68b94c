"""Calls a closing server never read: sent again on another connection.

A server that closes gracefully answers every request it has read, then
sends a close notice (``server.goaway``, docs/protocol.md). The calls still
waiting for a reply then never started, so they may be sent again anywhere,
even those with effects, as a gRPC client does after GOAWAY. The connection
(``protocol.py``) hands them to its client here, with their futures: their
callers keep waiting on the same future, under the same deadline, and see only
a later reply. A client without ``reconnect`` or a pool declines, and its
callers get :class:`~timer_sdk.errors.CallNotStarted`.

A mixin of :class:`~timer_sdk.client.TimerClient`, apart because no call
touches it until a server closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import CallNotStarted, ClientClosedError, ConnectError
from .dialer import _BACKOFF_FIRST

if TYPE_CHECKING:
    from .dialer import _Dialer
    from .protocol import _Call, _ClientProtocol, _ReplyDecoder

_FIND_ANOTHER = 10.0
"""Seconds to find another connection for calls without a timeout of their own."""


class _Handover:
    """The hand-over side of a :class:`~timer_sdk.client.TimerClient`, which holds the state."""

    _carrier: Callable[[list[_Call]], bool] | None
    """Where this client's calls go instead, when it is one connection of a pool."""

    if TYPE_CHECKING:  # provided by TimerClient
        _protocol: _ClientProtocol
        _loop: asyncio.AbstractEventLoop
        _closing: bool
        _dialer: _Dialer
        reconnect: bool

        async def _reopen(self) -> _ClientProtocol: ...

    def _hand_over(self, calls: list[_Call]) -> bool:
        """Take the calls a closing connection never sent to its server; ``False``: declined."""
        if self._carrier is not None:
            return self._carrier(calls)
        if not self.reconnect or self._closing:
            return False
        self._carry_later(calls)
        return True

    def _carry_later(self, calls: list[_Call]) -> None:
        task = self._loop.create_task(self._carry(calls))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _carry(self, calls: list[_Call]) -> None:
        """Send ``calls`` on this client's next connection, reopening it if need be."""
        why = "no connection could be opened"
        give_up_at = self._loop.time() + (self._dialer.connect_timeout or _FIND_ANOTHER)
        while True:
            calls = [call for call in calls if not call[2].done()]  # timed out, cancelled
            if not calls:
                return
            protocol = self._protocol  # maybe reopened meanwhile by another call
            if protocol.failure is None:
                for frame, method, future in calls:
                    send_now(protocol, frame, method, future)
                return
            if self._loop.time() >= give_up_at or self._closing:
                break
            try:
                protocol = await self._reopen()  # shared with calls made meanwhile
            except ClientClosedError:
                break
            except ConnectError as exc:
                why = str(exc)
                continue  # the next attempt waits out the backoff
            if protocol.failure is not None:  # lost at once: try again a moment later
                await asyncio.sleep(_BACKOFF_FIRST)
        for _, method, future in calls:
            if future.done():
                continue
            if self._closing:
                future.set_exception(ClientClosedError(f"{method.name}: the client was closed"))
            else:
                message = f"{method.name}: never started, and could not be sent again: {why}"
                future.set_exception(CallNotStarted(message))


def send_now(
    protocol: _ClientProtocol, frame: bytes, method: _ReplyDecoder, future: asyncio.Future[Any]
) -> None:
    """Send a call whose caller already awaits ``future``, as a new call is sent."""
    if not protocol.blocked and len(protocol.pending) < protocol.max_pending:
        protocol.send(frame, method, future)
    else:
        protocol.hold(frame, method, future)  # until there is room
