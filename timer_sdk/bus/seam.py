"""The seam between a server and its event bus: what a bus is, and what it needs.

A bus publishes the events of an :class:`EventSource` (a server's timer) and
hands the events of every other server to an :class:`EventSink` (the server).
Neither side knows the other's class: this module imports no higher layer.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Awaitable, Callable
from typing import Protocol

from .._extras import install_hint
from ..errors import TimerError
from ..models import EchoEvent

__all__ = [
    "NATS_EXTRA",
    "BusError",
    "EventBus",
    "EventSink",
    "EventSource",
    "Unshared",
    "redact",
    "subject_for",
]

NATS_EXTRA = install_hint("nats")
"""How to install what a ``nats://`` bus needs."""

_TOKEN_SAFE = re.compile(r"[^A-Za-z0-9_-]")


class BusError(TimerError):
    """The event bus cannot be used: its extra is missing, or it is unreachable."""


class EventSource(Protocol):
    """What a bus needs of the timer it serves: its name and its events (a ``Timer``)."""

    @property
    def name(self) -> str:
        """The timer's name: servers that share it share events."""

    def add_echo_listener(self, listener: Callable[[EchoEvent], None]) -> Callable[[], None]:
        """Call ``listener`` with each event the timer fires; return a remover."""


class EventSink(Protocol):
    """What a bus delivers other servers' events to."""

    @property
    def subscribers(self) -> int:
        """How many connections want events; with none, a bus need not decode them."""

    def deliver_echo(self, event: EchoEvent) -> None:
        """Fan out an event another server published."""

    def deliver_dropped(self, count: int) -> None:
        """Tell every subscriber that ``count`` events were lost on the bus."""

    def deliver_gap(self, reason: str) -> None:
        """Tell every subscriber that events may be missing here, how many unknown."""


class EventBus(abc.ABC):
    """Carries one server's events to the others that share it, and theirs back."""

    refusal: str | None = None
    """When set, ``events.subscribe`` is answered with this error instead."""

    @abc.abstractmethod
    async def start(self, timer: EventSource, sink: EventSink) -> None:
        """Publish ``timer``'s events; deliver the others' to ``sink``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop publishing and delivering. Safe to call more than once."""

    def listen(self, wanted: bool) -> None:  # noqa: B027 (most buses always listen)
        """Start or stop receiving others' events: whether anyone here subscribes."""

    def ready(self) -> Awaitable[None] | None:
        """What a new subscription must wait for to miss nothing; ``None``: nothing.

        Never the end of an outage: while cut off, :attr:`gap` says so instead.
        """
        return None

    @property
    def gap(self) -> str | None:
        """Why a subscription starting now may miss other servers' events, if it may."""
        return None


class Unshared(EventBus):
    """No bus, for one of several processes: subscriptions are refused.

    Each process would see only the events of the calls it served itself, a
    silent fraction; a clear error is better.
    """

    def __init__(self, reason: str) -> None:
        self.refusal = reason

    async def start(self, timer: EventSource, sink: EventSink) -> None:
        pass

    async def close(self) -> None:
        pass


def subject_for(timer_name: str) -> str:
    """The NATS subject of a timer's echo events: ``timer_sdk.<name>.on_echo_fired``.

    Characters of the name other than ASCII letters, digits, ``_`` and ``-``
    are written ``%XX`` (each UTF-8 byte in hex), so that any name is one token.
    """
    token = _TOKEN_SAFE.sub(
        lambda m: "".join(f"%{byte:02X}" for byte in m.group().encode()), timer_name
    )
    return f"timer_sdk.{token or '%'}.on_echo_fired"


def redact(url: str) -> str:
    """``url`` without its user and password, for messages others read."""
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rpartition("@")[2]
