"""A TimerClient's event streams: subscribing, and subscribing again after a reconnect.

A mixin of :class:`~timer_sdk.client.TimerClient`, apart because calls never
touch it: a stream is a :class:`~timer_sdk.events.Subscription` fed by the
connection (``protocol.py``). When that connection is lost, the
client adopts its subscriptions and, with ``reconnect``, subscribes them
again on the next one, marking the gap in each stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ClientClosedError, ConnectError, ConnectionLost, TimerError
from ..events import Subscription
from ..wire import api
from ..wire.framing import encode_request
from .dialer import _BACKOFF_FIRST, _BACKOFF_MAX
from .protocol import _copy, _Raw

if TYPE_CHECKING:
    from .protocol import _ClientProtocol, _ReplyDecoder


class _Events:
    """The event side of a :class:`~timer_sdk.client.TimerClient`, which holds the state."""

    if TYPE_CHECKING:  # provided by TimerClient
        _protocol: _ClientProtocol
        _loop: asyncio.AbstractEventLoop
        _closing: bool
        _orphans: list[Subscription]
        _resubscriber: asyncio.Task[None] | None
        reconnect: bool

        async def _send(
            self, frame: bytes, method: _ReplyDecoder, timeout: float | None
        ) -> Any: ...
        async def _reopen(self) -> _ClientProtocol: ...

    def events(self, *, max_queue: int = 1024) -> Subscription:
        """Subscribe to the server's ``on_echo_fired`` events, from any of its clients.

        ``async with client.events() as events: async for item in events:``
        yields :class:`~timer_sdk.models.EchoEvent` and, where events were
        lost because this subscriber fell behind (here or on the server),
        :class:`~timer_sdk.events.EventsDropped`; an event of a kind this
        client does not know (a newer server's) comes as an
        :class:`~timer_sdk.events.UnknownEvent`. The subscription starts on
        entering ``async with`` (or at the first iteration). The stream ends
        when it is closed or the client is closed, and raises
        :class:`~timer_sdk.errors.ConnectionLost` if the connection drops.
        With ``reconnect=True`` it survives that instead: the client
        reconnects (with the backoff of :meth:`~timer_sdk.TimerClient.connect`,
        until it succeeds or the client is closed), subscribes again, and the
        stream carries an
        :class:`~timer_sdk.events.EventsMayHaveBeenMissed` notice at the gap.
        Calls keep working on the same client meanwhile.
        """
        return Subscription(max_queue=max_queue, opener=self._open_events)

    async def _open_events(self, sub: Subscription) -> Callable[[], None]:
        protocol = self._protocol
        failure = protocol.failure
        if isinstance(failure, ConnectionLost) and self.reconnect and not self._closing:
            protocol = await self._reopen()  # not the lost one: its events would never come
            if protocol.failure is not None:
                raise _copy(protocol.failure)
        first = not protocol.subscriptions
        protocol.subscriptions.append(sub)  # before the request: no event is missed
        protocol.events_requested = True
        if first:
            try:
                frame = encode_request(api.SUBSCRIBE.encode(), b"\xa0")
                await self._send(frame, _Raw(api.SUBSCRIBE), None)
            except BaseException:
                if sub in protocol.subscriptions:
                    protocol.subscriptions.remove(sub)
                if sub in self._orphans:  # lost before it ever started: not ours to keep
                    self._orphans.remove(sub)
                raise

        def detach() -> None:
            if sub in self._orphans:
                self._orphans.remove(sub)
            protocol = self._protocol  # after a reconnect, not the one it started on
            if sub in protocol.subscriptions:
                protocol.subscriptions.remove(sub)
                if not protocol.subscriptions and protocol.failure is None and not self._closing:
                    frame = encode_request(api.UNSUBSCRIBE.encode(), b"\xa0")
                    protocol.send_and_forget(frame, _Raw(api.UNSUBSCRIBE))

        return detach

    # --- after a lost connection -------------------------------------------------

    def _adopt(self, subscriptions: list[Subscription]) -> bool:
        """Keep the subscriptions of a lost connection, if this client reconnects."""
        if not self.reconnect or self._closing:
            return False
        self._orphans.extend(subscriptions)
        if self._orphans and (self._resubscriber is None or self._resubscriber.done()):
            reason = str(self._protocol.failure)
            self._resubscriber = self._loop.create_task(self._resubscribe(reason))
        return True

    async def _resubscribe(self, reason: str) -> None:
        """Reconnect until the kept subscriptions are subscribed again, or none is left."""
        delay = 0.0  # grows while new connections are lost again before they subscribe
        while self._orphans:
            if delay:
                await asyncio.sleep(delay)
            try:
                protocol = await self._reopen()  # with the backoff after each failed dial
            except ConnectError:
                continue
            except ClientClosedError:
                return  # close() ends the streams
            if protocol.failure is not None or protocol is not self._protocol:
                delay = min(max(delay * 2, _BACKOFF_FIRST), _BACKOFF_MAX)
                continue  # lost again already
            subs, self._orphans = [s for s in self._orphans if not s.closed], []
            for sub in subs:
                sub.note_gap(f"{reason}; subscribed again on a new connection")
            first = not protocol.subscriptions
            protocol.subscriptions.extend(subs)
            protocol.events_requested = True
            if not (first and subs):
                continue
            try:
                frame = encode_request(api.SUBSCRIBE.encode(), b"\xa0")
                await self._send(frame, _Raw(api.SUBSCRIBE), None)
            except ConnectionLost:  # the new connection is gone too: its subs came back here
                delay = min(max(delay * 2, _BACKOFF_FIRST), _BACKOFF_MAX)
            except TimerError as exc:  # refused, timed out or closed: the stream ends with it
                for sub in subs:
                    sub.end(exc)
