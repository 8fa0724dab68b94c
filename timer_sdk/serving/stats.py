"""Per-method call timing, and one snapshot of everything a server counts.

Timing is off until someone reads it (``--metrics``, a registered collector,
or the first ``server.stats`` call): :func:`enable_timing` then wraps each
method's plan in place, so a server nobody observes runs its plans as they
are. A timed call costs two clock reads and a few integer operations: no
locks, no metric objects. The buckets are powers of two in nanoseconds (as
Prometheus' native histograms, factor 2), so a duration's bucket is its bit
length, with no search. The collector (:mod:`timer_sdk.metrics`) and the
``server.stats`` extension turn the counts into metrics when they are read.

:func:`snapshot` may run on another thread (prometheus_client's HTTP server):
it copies plain ints, lists and dicts, each copy atomic under the GIL.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from .. import _eager
from ..wire.codec import encode_item
from ..wire.framing import RET_OK, encode_error, encode_reply

if TYPE_CHECKING:
    from ..limits import ServerStats
    from ..wire.api import Method, Procs
    from ..wire.budget import Budget
    from .plans import Plan

__all__ = [
    "BOUNDS",
    "STATS",
    "CallTiming",
    "Counted",
    "MethodTiming",
    "enable_timing",
    "snapshot",
    "stats_reply",
]

STATS = "server.stats"
"""The extension method that answers with :func:`snapshot`."""

_LOW, _HIGH = 10, 34
"""Bounds from 2**_LOW ns (1.024 µs) to 2**_HIGH ns (17.2 s), doubling."""

BOUNDS: tuple[float, ...] = tuple(2**bits / 1e9 for bits in range(_LOW, _HIGH + 1))
"""Upper bounds of the duration buckets, in seconds; a last bucket holds the rest."""


class MethodTiming:
    """One method's completed calls: a duration histogram."""

    __slots__ = ("by_bits", "ns")

    def __init__(self) -> None:
        self.by_bits = [0] * 65  # calls by the bit length of (duration in ns - 1)
        self.ns = 0

    def record(self, took_ns: int) -> None:
        self.by_bits[(took_ns - 1).bit_length()] += 1  # took_ns <= 2**bits: le is inclusive
        self.ns += took_ns

    def buckets(self) -> list[int]:
        """Calls per bucket of :data:`BOUNDS`, then the rest; not cumulative."""
        by_bits = list(self.by_bits)  # one atomic copy: this may run on another thread
        return [sum(by_bits[: _LOW + 1]), *by_bits[_LOW + 1 : _HIGH + 1], sum(by_bits[_HIGH + 1 :])]


class CallTiming:
    """Every method's :class:`MethodTiming`, and when recording began."""

    def __init__(self, names: list[str]) -> None:
        self.methods = {name: MethodTiming() for name in names}
        self.since = time.time()

    def timed(self, name: str, answer: Plan) -> Plan:
        """``answer`` that records each call's duration and failure under ``name``."""
        into = self.methods[name]
        by_bits = into.by_bits
        clock = time.perf_counter_ns

        def run(payload: bytes) -> bytes | _eager.Suspended:
            started = clock()
            try:
                outcome = answer(payload)
            except BaseException:
                into.record(clock() - started)
                raise
            if isinstance(outcome, bytes):
                # MethodTiming.record, inlined: this runs for every call.
                took = clock() - started
                by_bits[(took - 1).bit_length()] += 1
                into.ns += took
                return outcome
            assert isinstance(outcome, _eager.Suspended)
            # Step the wrapper once, to where the proc suspended: the connection resumes it.
            wrapped = _eager.start(_finish(outcome, into, started))
            assert isinstance(wrapped, _eager.Suspended)
            wrapped.held = outcome.held
            return wrapped

        return run


async def _finish(suspended: _eager.Suspended, into: MethodTiming, started: int) -> Any:
    try:
        result = await _eager.resume(suspended)
    except BaseException:  # the connection answers it with an error reply
        into.record(time.perf_counter_ns() - started)
        raise
    into.record(time.perf_counter_ns() - started)
    return result


class Counted(Protocol):
    """What this module reads of a server (:class:`~timer_sdk.server.Server` is one)."""

    timer: Procs
    stats: ServerStats
    budget: Budget
    plans: dict[str, tuple[Method[Any, Any], Plan]]
    timing: CallTiming | None
    stats_enabled: bool
    connections: set[Any]  # its connections; only counted here

    @property
    def subscribers(self) -> int: ...

    @property
    def address(self) -> str: ...


def enable_timing(server: Counted) -> CallTiming:
    """Start timing ``server``'s calls, once; return its :class:`CallTiming`."""
    if server.timing is None:
        timing = CallTiming(list(server.plans))
        plans = server.plans  # the dict every connection holds: changed in place
        for name, (method, answer) in list(plans.items()):
            plans[name] = (method, timing.timed(name, answer))
        server.timing = timing
    return server.timing


def snapshot(server: Counted) -> dict[str, Any]:
    """Everything ``server`` counts, as plain data (the ``server.stats`` reply)."""
    stats = server.stats
    budget = server.budget
    by_method = dict(stats.by_method)
    errors = dict(stats.errors_by_method)
    timing = server.timing
    methods: dict[str, Any] = {}
    for name in server.plans:
        entry: dict[str, Any] = {"calls": by_method.get(name, 0), "errors": errors.get(name, 0)}
        if timing is not None:
            one = timing.methods[name]
            entry["buckets"] = one.buckets()
            entry["sum"] = one.ns / 1e9
        methods[name] = entry
    counters = {
        name: getattr(stats, name)
        for name in type(stats).__dataclass_fields__
        if name not in ("by_method", "errors_by_method")
    }
    return {
        "timer": server.timer.name,
        "time": time.time(),
        "timing_since": timing.since if timing is not None else None,
        "bounds": list(BOUNDS),
        "methods": methods,
        "counters": counters,
        "connections": len(server.connections),
        "subscribers": server.subscribers,
        "budget": {
            "used": budget.used,
            "limit": budget.limit,
            "waiting": budget.waiting,
        },
    }


def stats_reply(server: Counted) -> bytes:
    """The reply frame to a ``server.stats`` request: the snapshot, or a refusal."""
    if not server.stats_enabled:
        server.stats.error_replies += 1
        why = (
            "it was started with --no-stats (serve(..., stats=False))"
            if server.address.startswith("unix:")
            else "it reveals load, so a tcp: or tls: server answers it only if started "
            "with --stats (serve(..., stats=True))"
        )
        return encode_error(f"{STATS}: not enabled on this server: {why}")
    enable_timing(server)  # from now on: the first reader pays, nobody before
    return encode_reply(RET_OK, encode_item(snapshot(server)))
