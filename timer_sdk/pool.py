"""Several connections under one TimerClient: each call goes where it will wait least.

Replies come back in request order, so on one connection a slow call holds up
every call behind it. ``TimerClient.connect(address, connections=N)`` opens N
ordinary one-connection clients and sends each call on the one with the
fewest calls pending (an idle one when there is one), ties taken in turn.
Each connection keeps every guarantee of a one-connection client: in-order
pairing, cancellation safety, timeouts, reconnect and the errors. The wire is
the base protocol, unchanged, so any server that speaks it will do; each
connection only first asks for the close notice (``server.goaway``), which a
server without it refuses.

Fewest pending, not fewest bytes or shortest expected time: the client cannot
know how long a call will run, and a connection with nothing pending is the
only one where a new call certainly waits for nobody. Ties go in turn rather
than to the first connection, so every connection carries traffic: behind
``serve --workers N`` each may reach another worker, and a server's idle
timeout does not close the ones a lowest-index rule would leave unused.

A connection lost for good (``reconnect=False``) fails its own pending calls
with :class:`~timer_sdk.errors.ConnectionLost`, as one connection does today;
but when its server closes it gracefully and says which calls it never read,
those go to the other connections instead, with or without ``reconnect``;
new calls go to the others, as a gRPC channel routes around a failed
subchannel. The client is ``closed`` once none is left. With ``reconnect=True``
a lost connection is reopened in the background, prompted by the calls that
have to go elsewhere and never faster than its backoff, and takes calls again
once it has answered a ``version`` call: a server that accepts a connection
and drops it at once (a full one) then costs no call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from .calling.dialer import _BACKOFF_FIRST, _BACKOFF_MAX
from .calling.handover import send_now
from .calling.protocol import _Call, _ReplyDecoder
from .client import TimerClient, use_pool
from .errors import ClientClosedError, LoopError, TimerError
from .events import Subscription

__all__ = ["connect_pool"]


async def connect_pool(
    connections: int,
    connect: Callable[[], Awaitable[TimerClient]],
    *,
    timeout: float | None,
    reconnect: bool,
) -> TimerClient:
    """Open ``connections`` clients with ``connect()`` at once; all of them, or none."""
    tasks: list[asyncio.Future[TimerClient]] = [
        asyncio.ensure_future(connect()) for _ in range(connections)
    ]
    try:
        members = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.shield(_close_connected(tasks))
        raise
    return _PooledClient(members, timeout=timeout, reconnect=reconnect)


async def _close_connected(tasks: list[asyncio.Future[TimerClient]]) -> None:
    await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled() and task.exception() is None:
            await task.result().close()


class _PooledClient(TimerClient):
    """A :class:`TimerClient` over several one-connection clients (its members)."""

    def __init__(self, members: list[TimerClient], *, timeout: float | None, reconnect: bool):
        # No TimerClient set-up: every method that touches one connection is overridden.
        self._members = members
        self._address = members[0]._address
        self._loop = members[0]._loop
        self.timeout = timeout
        self._reconnect = reconnect
        self._closing = False
        self._next = 0  # where the next search for the least loaded connection starts
        self._healing: dict[TimerClient, asyncio.Task[None]] = {}
        self._heal_delay: dict[TimerClient, float] = {}
        self._events_member: TimerClient | None = None
        for member in members:
            member._carrier = self._rehome

    def _rehome(self, calls: list[_Call]) -> bool:
        """Send calls a closing connection never sent to its server on the others."""
        if self._closing or all(member.closed for member in self._members):
            return False  # they fail, safe to retry, as on one connection
        for frame, method, future in calls:
            member = self._pick()
            protocol = member._protocol
            if protocol.failure is None:
                send_now(protocol, frame, method, future)
            else:  # none is open: it reconnects first
                member._carry_later([(frame, method, future)])
        return True

    @property
    def reconnect(self) -> bool:
        """Whether a lost connection is reopened (never replaying old calls)."""
        return self._reconnect

    @reconnect.setter
    def reconnect(self, value: bool) -> None:
        self._reconnect = value
        for member in self._members:
            member.reconnect = value

    @property
    def closed(self) -> bool:
        """Whether this client can no longer carry calls on any of its connections."""
        return self._closing or all(member.closed for member in self._members)

    @property
    def pending(self) -> int:
        """Calls whose replies have not arrived yet, on all connections together."""
        return sum(member.pending for member in self._members)

    def __repr__(self) -> str:
        state = "closed" if self._closing else "broken" if self.closed else "open"
        usable = sum(m._protocol.failure is None for m in self._members)
        return (
            f"<TimerClient {self.address} {state}, {self.pending} pending, "
            f"{usable} of {len(self._members)} connections open>"
        )

    def _start(self, frame: bytes, method: _ReplyDecoder, timeout: float | None) -> Awaitable[Any]:
        if asyncio.get_running_loop() is not self._loop:
            raise LoopError(
                "this TimerClient belongs to another event loop; connect a new client on this one"
            )
        if self._closing:
            raise ClientClosedError(f"the client for {self.address} is closed")
        return self._pick()._start(frame, method, self.timeout if timeout is None else timeout)

    def _pick(self) -> TimerClient:
        """The open connection with the fewest calls pending, ties in turn."""
        members = self._members
        count = len(members)
        best = -1
        least = 0
        for step in range(count):
            at = (self._next + step) % count
            member = members[at]
            protocol = member._protocol
            if protocol.failure is not None:
                if not member.closed:
                    self._heal(member)
                continue
            if member in self._healing:
                continue  # reopened, not yet proven
            load = len(protocol.pending)
            if best < 0 or load < least:
                best, least = at, load
                if not load:
                    break  # nobody to wait for: no connection can beat it
        if best < 0:
            # None is open. One that may reconnect does so for this call, within
            # its timeout; if none may, the call raises why, as one connection would.
            best = next((i for i, m in enumerate(members) if not m.closed), self._next)
        self._next = (best + 1) % count
        return members[best]

    def _heal(self, member: TimerClient) -> None:
        if member not in self._healing:
            self._healing[member] = self._loop.create_task(self._reopen_member(member))

    async def _reopen_member(self, member: TimerClient) -> None:
        """Reopen a lost connection; it takes calls again once it has answered one."""
        delay = self._heal_delay.get(member, 0.0)
        try:
            await asyncio.sleep(delay)
            try:
                await member._reopen()  # waits out its backoff after a failed dial
            except TimerError:
                return  # the next call that has to go elsewhere tries again
            # A full server accepts, then drops: a call sent now would be lost with it.
            await member.version(timeout=member._dialer.connect_timeout)
            self._heal_delay.pop(member, None)
        except TimerError:
            # Dropped again and again: retried ever more slowly, as the others carry the calls.
            self._heal_delay[member] = min(max(delay * 2, _BACKOFF_FIRST), _BACKOFF_MAX)
        finally:
            del self._healing[member]

    def events(self, *, max_queue: int = 1024) -> Subscription:
        """Subscribe to the server's events; see the one-connection ``events``.

        Every subscription of this client uses one of its connections, the
        same one while it can carry calls; calls still go to any connection.
        """
        member = self._events_member
        if member is None or member.closed:
            member = next((m for m in self._members if not m.closed), self._members[0])
            self._events_member = member
        return member.events(max_queue=max_queue)

    async def close(self) -> None:
        """Close every connection; pending calls fail with ClientClosedError.

        Safe to call more than once; returns once every socket is closed.
        """
        self._closing = True
        healing = list(self._healing.values())
        for task in healing:
            task.cancel()
        await asyncio.gather(*healing, return_exceptions=True)
        await asyncio.gather(*(member.close() for member in self._members))


use_pool(connect_pool)  # TimerClient.connect(connections=N) opens pools through this
