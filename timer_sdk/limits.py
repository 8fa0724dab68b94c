"""What a server bounds, and what it counts.

:class:`Limits` is the one place every bound lives; the CLI's ``serve``
flags and the README's table follow it. :class:`ServerStats` counts what
the bounds did, for operators and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .codec import DEFAULT_MAX_DEPTH, DEFAULT_MAX_ITEMS
from .framing import DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_METHOD_LENGTH

__all__ = ["Limits", "ServerStats"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound the server enforces. All are per server."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    """Largest request payload in bytes; a larger one gets an error reply."""
    max_method_length: int = DEFAULT_MAX_METHOD_LENGTH
    """Longest method name in bytes; a longer prefix closes the connection."""
    max_in_flight: int = 128
    """Requests per connection being handled at once; reading pauses at this bound."""
    max_connections: int = 1024
    """Open connections; one more is closed as soon as it is accepted."""
    max_depth: int = DEFAULT_MAX_DEPTH
    """Deepest CBOR nesting in a payload."""
    frame_timeout: float | None = 10.0
    """Seconds to finish a frame once its first byte arrived (defeats slowloris)."""
    idle_timeout: float | None = None
    """Close a connection with nothing in flight after this many quiet seconds."""
    max_event_queue: int = 1024
    """Events queued per remote subscriber before the oldest are dropped."""
    memory_budget: int = 64 << 20
    """Bytes held for all peers together: partial frames, requests in flight, unsent
    replies, event backlogs. When it is spent, connections stop reading until bytes
    are freed, taking turns."""
    max_items: int = DEFAULT_MAX_ITEMS
    """Array and map entries in one request, all levels together; checked before validation."""
    max_event_backlog: int = 4 << 20
    """Bytes of events held per subscriber that is not reading; the oldest go first."""


@dataclass(slots=True)
class ServerStats:
    """Counters since the server started."""

    connections_accepted: int = 0
    connections_refused: int = 0
    requests: int = 0
    error_replies: int = 0
    protocol_violations: int = 0
    frame_timeouts: int = 0
    idle_timeouts: int = 0
    events_sent: int = 0
    events_dropped: int = 0
    budget_waits: int = 0
    """Times a connection stopped reading because the memory budget was spent."""
    budget_timeouts: int = 0
    """Requests dropped, with an error reply, after waiting a frame_timeout for budget."""
    orphans_cancelled: int = 0
    """Procs cancelled because their connection was gone."""
    oversize_replies: int = 0
    """Replies over max_frame_size, sent as error replies instead."""
    oversize_events: int = 0
    """Events over max_frame_size, dropped for every subscriber and counted."""
    accept_pauses: int = 0
    """Times accepting paused because the process was out of file descriptors."""
    by_method: dict[str, int] = field(default_factory=dict)
