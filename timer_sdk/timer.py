"""The timer library itself: :class:`Timer`, its async procs and its events.

In process, call the procs directly: models in, models out, no
serialization. :meth:`Timer.serve` puts the same object behind a socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from ssl import SSLContext
from typing import TYPE_CHECKING

from ._version import __version__
from .errors import CallError
from .models import (
    INT64_MAX,
    INT64_MIN,
    ComplexRequest,
    ComplexResponse,
    EchoEvent,
    EchoRequest,
    EchoResponse,
    JobSpec,
    RetryPolicy,
    ScheduleConfig,
    ScheduleResult,
    TimerConfig,
)
from .wire.address import Address
from .wire.api import native_procs

if TYPE_CHECKING:
    from .bus import EventBus
    from .events import Subscription
    from .limits import Limits
    from .server import Server

__all__ = ["EchoListener", "Timer"]

logger = logging.getLogger(__name__)

_VERSION = f"timer-sdk v{__version__}"

EchoListener = Callable[[EchoEvent], None]
"""A synchronous callback for ``on_echo_fired``; it must not block."""


@native_procs
class Timer:
    """The timer: one name, four async procs, one event.

    >>> timer = Timer(TimerConfig(name="kitchen"))
    >>> reply = await timer.echo(EchoRequest(message="hi", delay_ms=10))
    """

    __slots__ = ("_listeners", "config")

    def __init__(self, config: TimerConfig | None = None) -> None:
        self.config = config or TimerConfig()
        """The timer's configuration: ``TimerConfig()`` unless one was given."""
        self._listeners: list[EchoListener] = []

    @property
    def name(self) -> str:
        """The timer's name; ``ipc-server`` by default, as in the reference."""
        return self.config.name

    def __repr__(self) -> str:
        return f"Timer(name={self.name!r})"

    # --- procs ---------------------------------------------------------

    async def version(self) -> str:
        """Return the library's version string."""
        return self._version()

    async def echo(self, req: EchoRequest) -> EchoResponse:
        """Wait ``req.delay_ms`` ms, fire ``on_echo_fired``, and echo the message.

        Cancelling it during the wait fires no event.
        """
        if req.delay_ms > 0:
            await asyncio.sleep(req.delay_ms / 1000)
        return self._echo_now(req)

    async def complex(self, req: ComplexRequest) -> ComplexResponse:
        """Summarise a batch of messages."""
        return self._complex(req)

    async def schedule(
        self, job: JobSpec, retry: RetryPolicy, schedule: ScheduleConfig
    ) -> ScheduleResult:
        """Plan a job; raise :class:`CallError` for an empty name or no attempts."""
        return self._schedule(job, retry, schedule)

    # The procs' bodies, for the server to call without a coroutine when the
    # proc would not wait (api.Method.call_now). The procs above are the API.

    def _version(self) -> str:
        return _VERSION

    def _echo_now(self, req: EchoRequest) -> EchoResponse:
        """The echo once its wait is over."""
        if self._listeners:
            self._fire_echo(EchoEvent(message=req.message, echo_count=1))
        return EchoResponse(echoed=req.message, timer_name=self.config.name)

    def _complex(self, req: ComplexRequest) -> ComplexResponse:
        note = "<none>" if req.note is None else req.note
        retries = 0 if req.retries is None else req.retries
        count = len(req.messages)
        return ComplexResponse(
            summary=f"received {count} messages, note={note}, retries={retries}",
            item_count=count,
            has_note=req.note is not None,
        )

    def _schedule(
        self, job: JobSpec, retry: RetryPolicy, schedule: ScheduleConfig
    ) -> ScheduleResult:
        if not job.name:
            raise CallError("job name must not be empty")
        if retry.max_attempts <= 0:
            raise CallError("retry.maxAttempts must be positive")
        interval = schedule.interval_ms
        first_run = schedule.start_at_ms + (schedule.jitter or 0)
        if not INT64_MIN <= first_run <= INT64_MAX:
            raise CallError("schedule.startAtMs + schedule.jitter overflows a signed 64-bit int")
        return ScheduleResult(
            job_id=f"{self.name}:{job.name}",
            will_run_count=max(1, 60000 // interval) if interval > 0 else 1,
            first_run_at_ms=first_run,
            effective_backoff_ms=retry.backoff_ms,
        )

    # --- events --------------------------------------------------------

    def add_echo_listener(self, listener: EchoListener) -> Callable[[], None]:
        """Call ``listener`` with every ``on_echo_fired`` event; return a remover.

        The listener runs inside ``echo`` and must not block. An exception it
        raises is logged and does not reach the echo's caller.
        """
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def events(self, *, max_queue: int = 1024) -> Subscription:
        """Subscribe to ``on_echo_fired``: ``async for item in timer.events():``.

        Each subscriber has a queue of ``max_queue`` events; when it falls
        behind, the oldest waiting events are dropped and an
        :class:`~timer_sdk.events.EventsDropped` notice says how many.
        """
        from .events import Subscription

        return Subscription(self.add_echo_listener, max_queue=max_queue)

    def _fire_echo(self, event: EchoEvent) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(event)
            except Exception:
                logger.exception("an on_echo_fired listener raised")

    # --- serving -------------------------------------------------------

    async def serve(
        self,
        address: str | Address = "tcp:127.0.0.1:0",
        *,
        limits: Limits | None = None,
        ssl: SSLContext | None = None,
        unix_mode: int = 0o600,
        reuse_port: bool = False,
        bus: str | EventBus | None = None,
        stats: bool | None = None,
    ) -> Server:
        """Serve this timer at ``address`` on the running loop; return once listening.

        See :func:`timer_sdk.server.serve` for the arguments.
        """
        from .server import serve

        return await serve(
            self,
            address,
            limits=limits,
            ssl=ssl,
            unix_mode=unix_mode,
            reuse_port=reuse_port,
            bus=bus,
            stats=stats,
        )
