"""timer_sdk: the timer library, native in process and CBOR over sockets.

In process::

    timer = Timer()
    reply = await timer.echo(EchoRequest(message="hi", delay_ms=5))

Serve it, and call it from anywhere::

    server = await timer.serve("tcp:127.0.0.1:9099")
    client = await TimerClient.connect("tcp:127.0.0.1:9099")
    reply = await client.echo(EchoRequest(message="hi", delay_ms=5))
"""

from . import pool as _pool  # noqa: F401  # registers TimerClient.connect(connections=N)
from ._version import __version__
from .client import TimerClient
from .errors import (
    AddressError,
    CallError,
    CallNotStarted,
    CallTimeout,
    ClientClosedError,
    ConnectError,
    ConnectionLost,
    FrameTooLarge,
    LoopError,
    ProtocolError,
    RemoteCallError,
    TimerConnectionError,
    TimerError,
)
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
    TimerConfig,
)
from .server import Limits, Server, serve
from .timer import Timer
from .wire.address import Address
from .wire.served import ServerDescription

__all__ = [
    "Address",
    "AddressError",
    "CallError",
    "CallNotStarted",
    "CallTimeout",
    "ClientClosedError",
    "ComplexRequest",
    "ComplexResponse",
    "ConnectError",
    "ConnectionLost",
    "EchoEvent",
    "EchoRequest",
    "EchoResponse",
    "EventsDropped",
    "EventsMayHaveBeenMissed",
    "FrameTooLarge",
    "JobSpec",
    "Limits",
    "LoopError",
    "ProtocolError",
    "RemoteCallError",
    "RetryPolicy",
    "ScheduleConfig",
    "ScheduleResult",
    "Server",
    "ServerDescription",
    "Subscription",
    "Timer",
    "TimerClient",
    "TimerConfig",
    "TimerConnectionError",
    "TimerError",
    "UnknownEvent",
    "__version__",
    "serve",
]
