"""A blocking facade over the async client, for scripts and REPLs.

>>> from timer_sdk.sync import TimerClient
>>> with TimerClient.connect("tcp:127.0.0.1:9099", timeout=5) as client:
...     client.echo(EchoRequest(message="hi", delay_ms=5))
EchoResponse(echoed='hi', timer_name='ipc-server')

Every method is one ``run_coroutine_threadsafe(...).result()`` on the async
:class:`timer_sdk.client.TimerClient`, so the two cannot behave differently.
The coroutines run on one event loop in one daemon thread, started on first
use and shared by every blocking client of the process: a client is a socket
and a few callbacks on that loop, not a thread of its own, and no user code
ever runs there, so one client cannot hold up another.

Timeouts are the async client's (``timeout=``, raising
:class:`~timer_sdk.errors.CallTimeout`). When the caller stops waiting
(Ctrl-C), the call is cancelled on the loop, exactly as cancelling the async
call: a request already written stays on the wire and its reply is read and
dropped, so the next call still gets its own reply.

The loop's thread and the hand-over of each call are :mod:`timer_sdk._portal`'s.
Nothing here patches asyncio or starts a loop in the caller's thread. Called
from a thread that runs an event loop (a notebook cell, a coroutine), every
method raises :class:`~timer_sdk.errors.LoopError` instead of freezing that
loop: use ``await`` and the async client there.
"""

from __future__ import annotations

import os
import warnings
import weakref
from ssl import SSLContext
from types import TracebackType

from ._portal import Portal, get_portal
from .client import DEFAULT_MAX_PENDING, P, R
from .client import TimerClient as AsyncTimerClient
from .events import EventsDropped, EventsMayHaveBeenMissed, Subscription, UnknownEvent
from .models import (
    ComplexRequest,
    ComplexResponse,
    EchoEvent,
    EchoRequest,
    EchoResponse,
    JobSpec,
    RetryPolicy,
    ScheduleConfig,
    ScheduleResult,
)
from .wire import api
from .wire.address import Address
from .wire.framing import DEFAULT_MAX_FRAME_SIZE
from .wire.served import ServerDescription

__all__ = ["Events", "TimerClient"]


async def _close(client: AsyncTimerClient) -> None:
    await client.close()


def _finalize(portal: Portal, client: AsyncTimerClient) -> None:
    if portal.pid == os.getpid() and portal.thread.is_alive():
        portal._spawn(_close(client))
    warnings.warn(f"unclosed {client!r}", ResourceWarning, stacklevel=1)


class TimerClient:
    """A blocking connection to a timer server, with one typed method per proc.

    >>> with TimerClient.connect("tcp:127.0.0.1:9099") as client:
    ...     client.version()
    'timer-sdk v0.1.0'

    Safe to use from several threads at once: their calls are pipelined on
    the one connection, as concurrent calls of the async client are, or
    spread over several with ``connect(..., connections=N)``.
    """

    def __init__(self) -> None:
        """Not called directly: ``TimerClient.connect(address)`` returns a client."""
        raise TypeError("a TimerClient is made by: TimerClient.connect(address)")

    def _set_up(self, client: AsyncTimerClient, portal: Portal) -> None:
        self._client = client
        self._portal = portal
        self._finalizer = weakref.finalize(self, _finalize, portal, client)
        self._finalizer.atexit = False

    @classmethod
    def connect(
        cls,
        address: str | Address,
        *,
        timeout: float | None = None,
        connect_timeout: float | None = 10.0,
        reconnect: bool = False,
        ssl: SSLContext | None = None,
        server_hostname: str | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        connections: int = 1,
        max_pending: int = DEFAULT_MAX_PENDING,
        dead_after: float | None = None,
        handover: bool | None = None,
    ) -> TimerClient:
        """Connect to the server at ``address``; see the async ``TimerClient.connect``.

        Raises :class:`~timer_sdk.errors.ConnectError` if the connection cannot
        be made. Interrupting it leaves no connection open. With
        ``connections=N``, one thread's slow call holds up another's only when
        all N connections are busy.
        """
        portal = get_portal()

        async def open_client() -> AsyncTimerClient:
            return await AsyncTimerClient.connect(
                address,
                timeout=timeout,
                connect_timeout=connect_timeout,
                reconnect=reconnect,
                ssl=ssl,
                server_hostname=server_hostname,
                max_frame_size=max_frame_size,
                connections=connections,
                max_pending=max_pending,
                dead_after=dead_after,
                handover=handover,
            )

        client = portal.run(open_client, _close)
        blocking = cls.__new__(cls)
        blocking._set_up(client, portal)
        return blocking

    @property
    def address(self) -> str:
        """The address this client connected to."""
        return self._client.address

    @property
    def closed(self) -> bool:
        """Whether the connection can no longer carry calls."""
        return self._client.closed

    @property
    def pending(self) -> int:
        """Calls written whose replies have not arrived yet, abandoned ones included."""
        return self._client.pending

    @property
    def timeout(self) -> float | None:
        """The default per-call timeout in seconds; ``None`` waits forever."""
        return self._client.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._client.timeout = value

    def __repr__(self) -> str:
        return f"<sync.{repr(self._client)[1:]}"

    # --- the typed procs -----------------------------------------------------

    def version(self, *, timeout: float | None = None) -> str:
        """Return the server library's version string."""
        return self._portal.run(lambda: self._client.version(timeout=timeout))

    def echo(self, req: EchoRequest, *, timeout: float | None = None) -> EchoResponse:
        """Echo ``req.message`` after ``req.delay_ms`` ms; fires ``on_echo_fired``."""
        return self._portal.run(lambda: self._client.echo(req, timeout=timeout))

    def complex(self, req: ComplexRequest, *, timeout: float | None = None) -> ComplexResponse:
        """Summarise a batch of messages."""
        return self._portal.run(lambda: self._client.complex(req, timeout=timeout))

    def schedule(
        self,
        job: JobSpec,
        retry: RetryPolicy,
        schedule: ScheduleConfig,
        *,
        timeout: float | None = None,
    ) -> ScheduleResult:
        """Plan a job; an empty name or ``max_attempts <= 0`` is refused."""
        return self._portal.run(
            lambda: self._client.schedule(job, retry, schedule, timeout=timeout)
        )

    def describe(self, *, timeout: float | None = None) -> ServerDescription:
        """Ask the server what it is: its version, its extensions and its whole API."""
        return self._portal.run(lambda: self._client.describe(timeout=timeout))

    # --- events ----------------------------------------------------------------

    def events(self, *, max_queue: int = 1024) -> Events:
        """Subscribe to the server's events; see the async ``events``.

        ``with client.events() as events: for item in events:`` yields what
        the async subscription yields, each ``next`` blocking until an item
        comes. The subscription starts on entering ``with``.
        """
        return Events(self._portal, self._client.events(max_queue=max_queue))

    # --- the generic call ----------------------------------------------------

    def call(self, method: api.Method[P, R], params: P, *, timeout: float | None = None) -> R:
        """Call ``method`` with its request envelope and return its typed reply.

        ``timeout`` (seconds) overrides the client's default.
        Raises as the async ``call`` does. Interrupting it (Ctrl-C) cancels
        the call: a request already written still runs on the server, and
        its reply is discarded.
        """
        return self._portal.run(lambda: self._client.call(method, params, timeout=timeout))

    def call_raw(
        self, method: str, payload: bytes = b"\xa0", *, timeout: float | None = None
    ) -> bytes:
        """Send any method with a CBOR ``payload``; return the reply's raw CBOR body."""
        return self._portal.run(lambda: self._client.call_raw(method, payload, timeout=timeout))

    # --- lifetime ------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; pending calls fail with ClientClosedError.

        Safe to call more than once; returns once the socket is closed.
        """
        self._portal.run(self._client.close)
        self._finalizer.detach()

    def __enter__(self) -> TimerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Events:
    """A blocking event subscription, from :meth:`TimerClient.events`.

    Iterating it blocks for each item (Ctrl-C interrupts the wait and loses
    nothing queued); it ends when the subscription is closed.
    """

    def __init__(self, portal: Portal, subscription: Subscription) -> None:
        """Not called directly: ``client.events()`` returns one."""
        self._portal = portal
        self._subscription = subscription

    def __iter__(self) -> Events:
        return self

    def __next__(self) -> EchoEvent | UnknownEvent | EventsDropped | EventsMayHaveBeenMissed:
        try:
            return self._portal.run(self._subscription.__anext__)
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Unsubscribe; events queued but not read are discarded."""
        self._portal.run(self._subscription.aclose)

    def __enter__(self) -> Events:
        """Start the subscription, so that no event is missed from here on."""
        self._portal.run(self._subscription.__aenter__)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
