"""The event bus under a server: where its events go beyond its own process.

By default there is none: a server delivers the events its timer fires to its
own subscribers, in process, and this module is not even imported. Several
processes or hosts that serve one timer share a bus, so that a subscriber on
any of them sees the events of all of them. The bus behind a ``nats://`` URL
is :class:`~timer_sdk.bus.nats_backend.NatsBus` (the ``nats`` extra).

A bus publishes the events of this server's timer and hands the events of
every other server to :class:`EventSink` (the :class:`~timer_sdk.server.Server`),
which fans them out to its subscribers as it does its own.
"""

from __future__ import annotations

from .seam import (
    NATS_EXTRA,
    BusError,
    EventBus,
    EventSink,
    EventSource,
    Unshared,
    redact,
    subject_for,
)

__all__ = [
    "NATS_EXTRA",
    "BusError",
    "EventBus",
    "EventSink",
    "EventSource",
    "Unshared",
    "nats_available",
    "open_bus",
    "redact",
    "subject_for",
]


def nats_available() -> bool:
    """Whether the ``nats`` extra's client library can be imported."""
    try:
        import nats  # noqa: F401
    except ImportError:
        return False
    return True


def open_bus(bus: str | EventBus | None) -> EventBus | None:
    """Turn ``serve(bus=...)`` into a bus: ``None``, a ``nats://`` URL, or a bus."""
    if bus is None or isinstance(bus, EventBus):
        return bus
    scheme, sep, _ = bus.partition("://")
    if not sep or scheme not in ("nats", "tls"):
        raise BusError(f"event bus URL {bus!r}: expected nats://HOST:PORT (or tls://HOST:PORT)")
    try:
        from .nats_backend import NatsBus
    except ImportError as exc:
        raise BusError(f"event bus {bus}: NATS needs the nats extra: {NATS_EXTRA}") from exc
    return NatsBus(bus)
