"""What a server bounds, and what it counts.

:class:`Limits` is the one place every bound lives. Each field says what it
bounds in its ``metadata``: ``help`` (one line, what happens over it) and
``unit``. The CLI makes a ``timer-sdk serve`` flag of every field from that
(``--max-frame-size`` for ``max_frame_size``), and a test checks that the
README's table lists every field. A field typed ``X | None`` can be switched
off: ``None`` in Python, ``off`` (or ``0``) on the command line.
:class:`ServerStats` counts what the bounds did, for operators and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .wire.codec import DEFAULT_MAX_DEPTH, DEFAULT_MAX_ITEMS
from .wire.framing import DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_METHOD_LENGTH

__all__ = ["Limits", "ServerStats"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound the server enforces. All are per server.

    Give the bounds to change by keyword, ``Limits(max_frame_size=4 * 1024 * 1024)``;
    the others keep their defaults. A bound typed ``X | None`` is switched off
    by ``None``.
    """

    max_frame_size: int = field(
        default=DEFAULT_MAX_FRAME_SIZE,
        metadata={
            "help": "largest request payload; a larger one gets an error reply",
            "unit": "bytes",
        },
    )
    max_method_length: int = field(
        default=DEFAULT_MAX_METHOD_LENGTH,
        metadata={
            "help": "longest method name; a longer length prefix closes the connection",
            "unit": "bytes",
        },
    )
    max_in_flight: int = field(
        default=128,
        metadata={
            "help": "requests per connection handled at once; reading pauses at this bound",
            "unit": "requests",
        },
    )
    max_connections: int = field(
        default=1024,
        metadata={
            "help": "open connections; one more is closed as soon as it is accepted",
            "unit": "connections",
        },
    )
    max_depth: int = field(
        default=DEFAULT_MAX_DEPTH,
        metadata={
            "help": "deepest CBOR nesting in a payload; deeper gets an error reply",
            "unit": "levels",
        },
    )
    frame_timeout: float | None = field(
        default=10.0,
        metadata={
            "help": "time a frame may take to arrive while the server reads it, against slowloris",
            "unit": "seconds",
        },
    )
    idle_timeout: float | None = field(
        default=None,
        metadata={
            "help": "close a connection with nothing in flight after this long quiet",
            "unit": "seconds",
        },
    )
    max_event_queue: int = field(
        default=1024,
        metadata={
            "help": "events held per remote subscriber that is not reading; oldest dropped",
            "unit": "events",
        },
    )
    memory_budget: int = field(
        default=64 << 20,
        metadata={
            "help": "bytes held for all peers together (partial frames, requests in flight, "
            "unsent replies, event backlogs); when spent, connections stop reading and take turns",
            "unit": "bytes",
        },
    )
    max_items: int = field(
        default=DEFAULT_MAX_ITEMS,
        metadata={
            "help": "array and map entries in one request, all levels together; more gets an "
            "error reply before validation",
            "unit": "entries",
        },
    )
    max_event_backlog: int = field(
        default=4 << 20,
        metadata={
            "help": "bytes of events held per subscriber that is not reading; oldest dropped",
            "unit": "bytes",
        },
    )


@dataclass(slots=True)
class ServerStats:
    """Counters since the server started: :attr:`Server.stats <timer_sdk.Server.stats>`."""

    connections_accepted: int = 0
    """Connections accepted."""
    connections_refused: int = 0
    """Connections closed at once: over ``max_connections``, or while shutting down."""
    requests: int = 0
    """Requests received, of every method, known or not."""
    error_replies: int = 0
    """Error replies sent for any reason: failed calls, bad frames, unknown methods."""
    protocol_violations: int = 0
    """Frames or payloads that broke the protocol."""
    frame_timeouts: int = 0
    """Frames not finished within ``frame_timeout``."""
    idle_timeouts: int = 0
    """Connections closed after ``idle_timeout`` with nothing in flight."""
    events_sent: int = 0
    """Event frames sent to subscribers."""
    events_dropped: int = 0
    """Events a subscriber lost: it was not reading, or the memory budget was spent."""
    budget_waits: int = 0
    """Times a connection stopped reading because the memory budget was spent."""
    budget_refusals: int = 0
    """Requests larger than the whole memory budget, refused with an error reply."""
    orphans_cancelled: int = 0
    """Procs cancelled because their connection was gone."""
    oversize_replies: int = 0
    """Replies over max_frame_size, sent as error replies instead."""
    oversize_events: int = 0
    """Events over max_frame_size, dropped for every subscriber and counted."""
    accept_pauses: int = 0
    """Times accepting paused because the process was out of file descriptors."""
    by_method: dict[str, int] = field(default_factory=dict)
    """Requests per method, for the methods the server knows."""
    errors_by_method: dict[str, int] = field(default_factory=dict)
    """Error replies per method, for the methods the server knows."""
