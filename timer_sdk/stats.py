"""Per-method call timing, and one snapshot of everything a server counts.

Timing is off until someone reads it (``--metrics``, a registered collector,
or the first ``server.stats`` call): :func:`enable_timing` then wraps each
method's plan in place, so a server nobody observes runs its plans as they
are. A timed call costs two clock reads, a bisect and a few integer adds: no
locks, no metric objects. The collector (:mod:`timer_sdk.metrics`) and the
``server.stats`` extension turn the counts into metrics when they are read.

:func:`snapshot` may run on another thread (prometheus_client's HTTP server):
it copies plain ints, lists and dicts, each copy atomic under the GIL.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from . import _eager
from .codec import encode_item
from .framing import RET_OK, encode_error, encode_reply

if TYPE_CHECKING:
    from .plans import Plan
    from .server import Server

__all__ = [
    "BOUNDS",
    "STATS",
    "CallTiming",
    "MethodTiming",
    "enable_timing",
    "snapshot",
    "stats_reply",
]

STATS = "server.stats"
"""The extension method that answers with :func:`snapshot`."""

BOUNDS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Upper bounds of the duration buckets, in seconds; a last bucket holds the rest."""


class MethodTiming:
    """One method's completed calls: error count, and a duration histogram."""

    __slots__ = ("buckets", "errors", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BOUNDS) + 1)  # not cumulative; the last is +Inf
        self.sum = 0.0
        self.errors = 0

    def record(self, seconds: float) -> None:
        self.buckets[bisect_left(BOUNDS, seconds)] += 1
        self.sum += seconds


class CallTiming:
    """Every method's :class:`MethodTiming`, and when recording began."""

    def __init__(self, names: list[str]) -> None:
        self.methods = {name: MethodTiming() for name in names}
        self.since = time.time()

    def timed(self, name: str, answer: Plan) -> Plan:
        """``answer`` that records each call's duration and failure under ``name``."""
        into = self.methods[name]
        buckets = into.buckets
        clock = time.perf_counter
        bounds, where = BOUNDS, bisect_left  # closure cells: cheaper than globals

        def run(payload: bytes) -> bytes | _eager.Suspended:
            started = clock()
            try:
                outcome = answer(payload)
            except BaseException:
                into.errors += 1
                into.record(clock() - started)
                raise
            if isinstance(outcome, bytes):
                # MethodTiming.record, inlined: this runs for every call.
                took = clock() - started
                buckets[where(bounds, took)] += 1
                into.sum += took
                return outcome
            assert isinstance(outcome, _eager.Suspended)
            # Step the wrapper once, to where the proc suspended: the connection resumes it.
            return _eager.start(_finish(outcome, into, started))

        return run


async def _finish(suspended: _eager.Suspended, into: MethodTiming, started: float) -> Any:
    try:
        result = await _eager.resume(suspended)
    except BaseException:
        into.errors += 1  # the connection answers it with an error reply
        into.record(time.perf_counter() - started)
        raise
    into.record(time.perf_counter() - started)
    return result


def enable_timing(server: Server) -> CallTiming:
    """Start timing ``server``'s calls, once; return its :class:`CallTiming`."""
    if server.timing is None:
        timing = CallTiming(list(server.plans))
        plans = server.plans  # the dict every connection holds: changed in place
        for name, (method, answer) in list(plans.items()):
            plans[name] = (method, timing.timed(name, answer))
        server.timing = timing
    return server.timing


def snapshot(server: Server) -> dict[str, Any]:
    """Everything ``server`` counts, as plain data (the ``server.stats`` reply)."""
    stats = server.stats
    budget = server.budget
    by_method = dict(stats.by_method)
    timing = server.timing
    methods: dict[str, Any] = {}
    for name in server.plans:
        entry: dict[str, Any] = {"calls": by_method.get(name, 0)}
        if timing is not None:
            one = timing.methods[name]
            entry["errors"] = one.errors
            entry["buckets"] = list(one.buckets)
            entry["sum"] = one.sum
        methods[name] = entry
    counters = {
        name: getattr(stats, name)
        for name in type(stats).__dataclass_fields__
        if name != "by_method"
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


def stats_reply(server: Server) -> bytes:
    """The reply frame to a ``server.stats`` request: the snapshot, or a refusal."""
    if not server.stats_enabled:
        server.stats.error_replies += 1
        return encode_error(
            f"{STATS}: not enabled on this server: it reveals load, so a tcp: or tls: "
            "server answers it only if started with --stats (serve(..., stats=True))"
        )
    enable_timing(server)  # from now on: the first reader pays, nobody before
    return encode_reply(RET_OK, encode_item(snapshot(server)))
