"""The typed async client: one connection, pipelined calls, replies matched in order.

The protocol has no request ids: the n-th reply answers the n-th request.
The connection (``calling/protocol.py``) keeps a FIFO of pending calls;
writing a request and queueing its slot happen with no ``await`` between
them, so concurrent calls cannot interleave wrongly. A call that is cancelled
or times out after its request was written leaves its slot in the FIFO; its
reply is read and dropped, and every later call still gets its own reply.

Backpressure: a call that finds ``max_pending`` slots taken, or the socket's
write buffer full, waits unsent in a queue; if it gives up there, it sent
nothing. A write error does not lose replies that had already arrived.

Event streams, and subscribing them again after a reconnect, are a mixin
(``calling/events.py``); dialing and its backoff are ``calling/dialer.py``'s.

Over 400 lines: it is the public face, a typed method per proc with its
docstring; the connection, dialing, plans, deadlines and event streams are
in calling/.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as _ssl
from collections.abc import Awaitable, Callable
from ssl import SSLContext
from types import TracebackType
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from .calling import plans as client_plan
from .calling.connecting import Connecting
from .calling.dialer import _BACKOFF_FIRST, _BACKOFF_MAX, _Dialer
from .calling.events import _Events
from .calling.handover import _Handover
from .calling.protocol import DEFAULT_MAX_PENDING, _ClientProtocol, _copy, _Raw, _ReplyDecoder
from .errors import (
    CallTimeout,
    ClientClosedError,
    ConnectError,
    ConnectionLost,
    LoopError,
    TimerError,
)
from .events import Subscription
from .models import (
    ComplexRequest,
    ComplexResponse,
    EchoRequest,
    EchoResponse,
    JobSpec,
    RetryPolicy,
    ScheduleConfig,
    ScheduleResult,
)
from .wire import api
from .wire.address import Address
from .wire.framing import DEFAULT_MAX_FRAME_SIZE, encode_request
from .wire.served import DESCRIBE, ServerDescription, decode_description

__all__ = ["DEFAULT_MAX_PENDING", "TimerClient"]

logger = logging.getLogger(__name__)


class OpenPool(Protocol):
    """How ``connections=N`` opens its pool: :func:`timer_sdk.pool.connect_pool`."""

    def __call__(
        self,
        connections: int,
        connect: Callable[[], Awaitable[TimerClient]],
        *,
        timeout: float | None,
        reconnect: bool,
    ) -> Awaitable[TimerClient]: ...


_open_pool: OpenPool | None = None
"""Set by :mod:`timer_sdk.pool` when imported (the package imports it): the pool
subclasses :class:`TimerClient`, so it sits above this module, not below it."""


def use_pool(open_pool: OpenPool) -> None:
    """Register how ``connections=N`` opens a pool (called once, by :mod:`timer_sdk.pool`)."""
    global _open_pool  # noqa: PLW0603
    _open_pool = open_pool


P = TypeVar("P", bound=BaseModel)
R = TypeVar("R")

_VERSION = client_plan.plan(api.VERSION)
_ECHO = client_plan.plan(api.ECHO)
_COMPLEX = client_plan.plan(api.COMPLEX)
_SCHEDULE = client_plan.plan(api.SCHEDULE)


class TimerClient(_Events, _Handover):
    """A connection to a timer server, with one typed method per proc.

    >>> client = await TimerClient.connect("tcp:127.0.0.1:9099")
    >>> await client.echo(EchoRequest(message="hi", delay_ms=5))
    EchoResponse(echoed='hi', timer_name='ipc-server')

    Calls may run concurrently (``asyncio.gather``); they are pipelined on the
    one connection, or spread over several (``connect(..., connections=N)``).
    A client belongs to the event loop it connected on.
    """

    timeout: float | None
    """The default per-call timeout in seconds; ``None`` waits forever."""
    reconnect: bool
    """Whether a new call reopens a lost connection (never replaying old calls)."""

    def __init__(self) -> None:
        """Not called directly: ``await TimerClient.connect(address)`` returns a client."""
        raise TypeError("a TimerClient is made by: await TimerClient.connect(address)")

    def _set_up(
        self,
        dialer: _Dialer,
        protocol: _ClientProtocol,
        *,
        timeout: float | None,
        reconnect: bool,
    ) -> None:
        self._dialer = dialer
        self._address = dialer.address
        self._protocol = protocol
        self._loop = protocol.loop
        self.timeout = timeout
        self.reconnect = reconnect
        self._closing = False
        self._redial: asyncio.Task[_ClientProtocol] | None = None
        self._backoff = 0.0
        self._next_dial_at = 0.0
        protocol.adopt = self._adopt
        protocol.hand_over = self._hand_over
        self._carrier = None
        self._orphans: list[Subscription] = []  # kept across a lost connection
        self._resubscriber: asyncio.Task[None] | None = None

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
    ) -> Connecting[TimerClient]:
        """Connect to the server at ``address`` (``tcp:``, ``tls:`` or ``unix:``).

        ``client = await TimerClient.connect(address)``, or ``async with
        TimerClient.connect(address) as client:`` to close it when the block ends.

        ``timeout`` is the default for every call, in seconds (``None`` waits
        forever). ``connect_timeout`` bounds the connect itself, the TLS
        handshake included (``None`` waits forever). ``server_hostname`` is the
        name a ``tls:`` server's certificate must match, when it is not the
        address's host (say, an IP address with a certificate for a name).
        With ``reconnect``, a call
        made after the connection was lost first reconnects, waiting a backoff
        (50 ms, doubling to 5 s) after each failed attempt; calls that were in
        flight when it was lost fail with ConnectionLost and are never
        replayed. A ``tls:`` address uses ``ssl`` or, without it, the system's
        default trust store. Raises :class:`~timer_sdk.errors.ConnectError` if
        the connection cannot be made; cancelling this leaves no connection open.

        ``connections=N`` opens N connections and sends each call on the one
        with the fewest calls pending, so a call never waits behind a slow one
        while another connection is idle. Each keeps every guarantee above;
        a connection lost for good fails only its own calls, and new calls go
        to the others. The default is one: it costs the server one connection
        per client, a burst of pipelined calls to one server process is no
        faster on more, and concurrent calls start on the server in the order
        they were made. Use 2 to 4 when slow and quick calls share a client
        (a notebook, threads on the blocking client), or to reach several
        ``--workers`` of one server.

        ``max_frame_size`` caps the body of a reply or event, 1 MiB by default
        (a default server never sends more than its own 1 MiB limit).
        Backpressure: at most ``max_pending`` calls (1024 by default) are in
        flight, abandoned ones included until their replies arrive, and while
        the socket's write buffer is full a new call writes nothing; either
        way it waits its turn, and the wait counts against its timeout.
        ``dead_after`` (seconds, off by default) declares the connection dead
        when nothing arrives for that long while calls wait: they fail with
        ConnectionLost, and ``reconnect`` applies. It is off because silence
        can be a slow call; set it above your longest call.

        ``handover`` asks the server, with one extension call per connection,
        to say when it closes gracefully which calls it will not read (a
        server without the extension refuses the call, and nothing changes).
        Those never started, so they go out again on a new or another
        connection, within their own timeouts, and their callers see only a
        later reply; subscriptions move over with a gap notice, as on a
        reconnect. Where no connection can take them, they fail with
        :class:`~timer_sdk.errors.CallNotStarted`, safe to retry. It is on
        by default with ``reconnect`` or ``connections`` above one; a plain
        client sends the base protocol only, as the reference's does.
        """
        return Connecting(
            cls._open(
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
        )

    @classmethod
    async def _open(
        cls,
        address: str | Address,
        *,
        timeout: float | None,
        connect_timeout: float | None,
        reconnect: bool,
        ssl: SSLContext | None,
        server_hostname: str | None,
        max_frame_size: int,
        connections: int,
        max_pending: int,
        dead_after: float | None,
        handover: bool | None,
    ) -> TimerClient:
        if isinstance(connections, bool) or not isinstance(connections, int) or connections < 1:
            raise ValueError(f"connections must be an int of at least 1, not {connections!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive int, not {max_pending!r}")
        if dead_after is not None and not dead_after > 0:
            raise ValueError(
                f"dead_after must be a positive number of seconds or None, not {dead_after!r}"
            )
        if handover is None:
            handover = reconnect or connections > 1
        parsed = Address.parse(address)
        if parsed.scheme == "tls" and ssl is None:
            ssl = _ssl.create_default_context()
        if connections > 1:
            assert _open_pool is not None, "timer_sdk.pool registers itself on import"

            def one() -> Awaitable[TimerClient]:
                return TimerClient.connect(
                    parsed,
                    connect_timeout=connect_timeout,
                    reconnect=reconnect,
                    ssl=ssl,
                    server_hostname=server_hostname,
                    max_frame_size=max_frame_size,
                    max_pending=max_pending,
                    dead_after=dead_after,
                    handover=handover,
                )

            return await _open_pool(connections, one, timeout=timeout, reconnect=reconnect)
        dialer = _Dialer(
            parsed, ssl, server_hostname, max_frame_size, connect_timeout, max_pending, dead_after,
            handover,
        )  # fmt: skip
        protocol = await dialer.dial(asyncio.get_running_loop())
        client = cls.__new__(cls)
        client._set_up(dialer, protocol, timeout=timeout, reconnect=reconnect)
        return client

    @property
    def address(self) -> str:
        """The address this client connected to."""
        return str(self._address)

    @property
    def closed(self) -> bool:
        """Whether this client can no longer carry calls (it may reconnect if asked to)."""
        failure = self._protocol.failure
        lost_for_good = failure is not None and not (
            self.reconnect and isinstance(failure, ConnectionLost)
        )
        return self._closing or lost_for_good

    @property
    def pending(self) -> int:
        """Calls written whose replies have not arrived yet, abandoned ones included.

        At most ``max_pending``; calls waiting for room are not counted.
        """
        return len(self._protocol.pending)

    def __repr__(self) -> str:
        failure = self._protocol.failure
        state = "closed" if self._closing else f"broken ({failure})" if failure else "open"
        return f"<TimerClient {self.address} {state}, {self.pending} pending>"

    # --- the typed procs -----------------------------------------------------

    async def version(self, *, timeout: float | None = None) -> str:
        """Return the server library's version string."""
        result: str = await self._start(_VERSION.frame_of(), _VERSION, timeout)
        return result

    async def echo(self, req: EchoRequest, *, timeout: float | None = None) -> EchoResponse:
        """Echo ``req.message`` after ``req.delay_ms`` ms; fires ``on_echo_fired``."""
        result: EchoResponse = await self._start(_ECHO.frame_of(req), _ECHO, timeout)
        return result

    async def complex(
        self, req: ComplexRequest, *, timeout: float | None = None
    ) -> ComplexResponse:
        """Summarise a batch of messages."""
        result: ComplexResponse = await self._start(_COMPLEX.frame_of(req), _COMPLEX, timeout)
        return result

    async def schedule(
        self,
        job: JobSpec,
        retry: RetryPolicy,
        schedule: ScheduleConfig,
        *,
        timeout: float | None = None,
    ) -> ScheduleResult:
        """Plan a job; an empty name or ``max_attempts <= 0`` is refused."""
        frame = _SCHEDULE.frame_of(job, retry, schedule)
        result: ScheduleResult = await self._start(frame, _SCHEDULE, timeout)
        return result

    async def describe(self, *, timeout: float | None = None) -> ServerDescription:
        """Ask the server what it is: its version, its extensions and its whole API.

        A server without the ``server.describe`` extension (the reference, or
        an older timer-sdk) answers with an error reply:
        :class:`~timer_sdk.errors.RemoteCallError`, ``unknown method: server.describe``.
        """
        return decode_description(await self.call_raw(DESCRIBE, timeout=timeout))

    # --- the generic call ----------------------------------------------------

    async def call(self, method: api.Method[P, R], params: P, *, timeout: float | None = None) -> R:
        """Call ``method`` with its request envelope and return its typed reply.

        ``timeout`` (seconds) overrides the client's default. Raises
        :class:`~timer_sdk.errors.RemoteCallError` for an error reply,
        :class:`~timer_sdk.errors.CallTimeout`, or a
        :class:`~timer_sdk.errors.TimerConnectionError`.

        Cancelling it before the request is written sends nothing; after that
        the request is on the wire and may run, and its reply is discarded.
        """
        plan = client_plan.plan(method)
        result: R = await self._start(plan.frame(params), plan, timeout)
        return result

    async def call_raw(
        self, method: str, payload: bytes = b"\xa0", *, timeout: float | None = None
    ) -> bytes:
        """Send any method with a CBOR ``payload``; return the reply's raw CBOR body.

        For methods this SDK does not declare, and for testing other servers.
        Errors and cancellation behave as in :meth:`call`.
        """
        frame = encode_request(method.encode(), payload)
        result: bytes = await self._start(frame, _Raw(method), timeout)
        return result

    def _start(self, frame: bytes, method: _ReplyDecoder, timeout: float | None) -> Awaitable[Any]:
        """Start a call; return what its caller awaits for the reply.

        A call on an open connection is written now (or held until there is
        room), and its caller awaits the reply's future itself: no coroutine in
        between. Its timeout is a deadline on the connection's one timer, which
        fails the future with CallTimeout; held or written, the wait counts.
        A reconnect, a closed client or another loop take :meth:`_send`.
        """
        protocol = self._protocol
        if timeout is None:
            timeout = self.timeout
        if (
            protocol.failure is None
            and not self._closing
            and asyncio.get_running_loop() is self._loop
        ):
            future = self._loop.create_future()
            if timeout is not None:
                protocol.deadlines.add(timeout, future, method)
            if not protocol.blocked and len(protocol.pending) < protocol.max_pending:
                protocol.send(frame, method, future)
            else:
                protocol.hold(frame, method, future)  # until there is room
            return future
        return self._send(frame, method, timeout)

    async def _send(self, frame: bytes, method: _ReplyDecoder, timeout: float | None) -> Any:
        protocol = self._protocol
        if asyncio.get_running_loop() is not self._loop:
            raise LoopError(
                "this TimerClient belongs to another event loop; connect a new client on this one"
            )
        if self._closing:
            raise ClientClosedError(f"the client for {self.address} is closed")
        if timeout is None:
            timeout = self.timeout
        failure = protocol.failure
        if failure is not None and not (self.reconnect and isinstance(failure, ConnectionLost)):
            raise _copy(failure)
        future: asyncio.Future[Any] | None = None
        if timeout is None and failure is None:
            future = self._loop.create_future()
            if not protocol.blocked and len(protocol.pending) < protocol.max_pending:
                protocol.send(frame, method, future)  # the hot path
                return await future
            return await self._queued(protocol, frame, method, future)
        try:
            # A reconnect and a wait for room count against the timeout too.
            async with asyncio.timeout(timeout):
                if failure is not None:
                    protocol = await self._reopen()
                    if protocol.failure is not None:  # lost at once, say by a full server
                        raise _copy(protocol.failure)
                future = self._loop.create_future()
                if not protocol.blocked and len(protocol.pending) < protocol.max_pending:
                    protocol.send(frame, method, future)
                    return await future
                return await self._queued(protocol, frame, method, future)
        except TimeoutError:
            if future is not None and future.done() and not future.cancelled():
                return future.result()  # the reply won the race with the deadline
            raise CallTimeout(f"{method.name}: no reply within {timeout} s") from None

    @staticmethod
    async def _queued(
        protocol: _ClientProtocol, frame: bytes, method: _ReplyDecoder, future: asyncio.Future[Any]
    ) -> Any:
        """Wait for room (backpressure), then for the reply, as one wait."""
        protocol.enqueue(frame, method, future)
        try:
            return await future
        except BaseException:
            protocol.unqueue(future)  # timed out or cancelled: send nothing
            raise

    async def _reopen(self) -> _ClientProtocol:
        """Reconnect once, after the backoff; concurrent callers share the attempt."""
        if self._redial is None or self._redial.done():
            self._redial = self._loop.create_task(self._dial_after_backoff())
            # Callers that gave up must not leave its failure unretrieved.
            self._redial.add_done_callback(lambda t: t.cancelled() or t.exception())
        redial = self._redial
        try:
            return await asyncio.shield(redial)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if redial.cancelled() and (task is None or not task.cancelling()):
                # close() cancelled the redial, not our caller: say so, not CancelledError.
                raise ClientClosedError(f"the client for {self.address} is closed") from None
            raise
        finally:
            if redial.done() and self._redial is redial:
                self._redial = None

    async def _dial_after_backoff(self) -> _ClientProtocol:
        await asyncio.sleep(max(0.0, self._next_dial_at - self._loop.time()))
        try:
            protocol = await self._dialer.dial(self._loop)
        except ConnectError:
            self._backoff = min(max(self._backoff * 2, _BACKOFF_FIRST), _BACKOFF_MAX)
            self._next_dial_at = self._loop.time() + self._backoff
            logger.info("reconnect to %s failed; next try in %.1f s", self.address, self._backoff)
            raise
        self._backoff = 0.0
        logger.info("reconnected to %s", self.address)
        protocol.adopt = self._adopt
        protocol.hand_over = self._hand_over
        self._protocol = protocol
        return protocol

    # --- lifetime ------------------------------------------------------------

    async def close(self) -> None:
        """Close the connection; pending calls fail with ClientClosedError.

        Requests still in the write buffer are dropped, not left for a
        server that may never read them. Safe to call more than once;
        returns once the socket is closed.
        """
        first = not self._closing
        # From here on nothing reopens the connection: every caller of _reopen checks
        # _closing first, and the tasks that reopen are cancelled before any await.
        self._closing = True
        tasks = [task for task in (self._resubscriber, self._redial) if task is not None]
        for task in tasks:
            task.cancel()
        interrupted = False  # our caller was cancelled: finish closing, then say so
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                interrupted = interrupted or bool(current and current.cancelling())
            except TimerError:
                pass
        if first:
            orphans, self._orphans = self._orphans, []
            for sub in orphans:
                sub.end()
            count = len(self._protocol.pending)
            self._protocol.fail(
                ClientClosedError(
                    f"the client for {self.address} closed with {count} calls pending"
                )
            )
        await asyncio.shield(self._protocol.lost)
        if interrupted:
            raise asyncio.CancelledError

    async def __aenter__(self) -> TimerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
