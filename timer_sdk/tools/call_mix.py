"""The soak's calls: random calls of every method whose outcome is known in advance.

Every request carries something unique (a message, a note, a job name, a field
name), so a reply delivered to the wrong caller is a mismatch, never a
coincidence. Expected replies are written by hand from the protocol, never
computed the way the library computes them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import cbor2

from .._version import __version__
from ..client import TimerClient
from ..errors import CallTimeout, RemoteCallError, TimerError
from ..models import (
    ComplexRequest,
    ComplexResponse,
    EchoRequest,
    EchoResponse,
    JobSpec,
    RetryPolicy,
    ScheduleConfig,
    ScheduleResult,
)

__all__ = ["Call", "LoadReport", "check", "make_call", "perform"]

TEXT = "aé☃日本𝄞 \u200b"  # multi-byte UTF-8 of every length, and a zero-width space
TIMEOUT_ECHO_MS = 250  # far beyond TIMEOUT_AFTER, so a loaded loop cannot win the race
TIMEOUT_AFTER = 0.005


@dataclass(slots=True)
class LoadReport:
    """What a load run did; :attr:`clean` says whether every reply was right."""

    connections: int = 0
    calls: int = 0
    ok: int = 0
    error_replies: int = 0
    timeouts: int = 0
    cancelled: int = 0
    mismatches: int = 0
    unexpected: int = 0
    connect_errors: int = 0
    seconds: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def calls_per_second(self) -> float:
        """Calls completed per second of the run."""
        return self.calls / self.seconds if self.seconds else 0.0

    @property
    def clean(self) -> bool:
        """Whether no reply was wrong and nothing failed unexpectedly."""
        return not (self.mismatches or self.unexpected or self.connect_errors)

    def note(self, problem: str) -> None:
        """Keep the first few problems for the report."""
        if len(self.problems) < 20:
            self.problems.append(problem)

    def summary(self) -> str:
        """Return the report as a few human lines."""
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.by_kind.items()))
        lines = [
            f"calls {self.calls} in {self.seconds:.1f} s ({self.calls_per_second:.0f}/s) "
            f"on {self.connections} connections",
            f"  ok {self.ok}, error replies {self.error_replies} (all expected), "
            f"timeouts {self.timeouts}, "
            f"cancelled {self.cancelled}",
            f"  mismatches {self.mismatches}, unexpected errors {self.unexpected}, "
            f"connect errors {self.connect_errors}",
            f"  by kind: {kinds}",
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


Outcome = object  # a reply, or the exception a call ended with


@dataclass(frozen=True, slots=True)
class Call:
    """One call of the load, with the outcome it must have."""

    kind: str
    run: Callable[[TimerClient, float | None], Awaitable[object]]
    expected: object  # a reply model, a str, or an exception to match
    timeout: float | None = None
    cancel: bool = False


INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

# Expected replies written by hand from docs/protocol.md, never computed the way the
# library computes them; ``{u}`` stands for the call's unique text.
COMPLEX_TABLE: tuple[tuple[int, str | None, int | None, str, bool], ...] = (
    # messages, note, retries -> summary, hasNote (itemCount is the number of messages)
    (0, None, None, "received 0 messages, note=<none>, retries=0", False),
    (2, "{u}", 3, "received 2 messages, note={u}, retries=3", True),
    (1, "{u}", 0, "received 1 messages, note={u}, retries=0", True),
    (3, None, INT64_MIN, "received 3 messages, note=<none>, retries=-9223372036854775808", False),
    (1, "{u}", INT64_MAX, "received 1 messages, note={u}, retries=9223372036854775807", True),
    (2, "", None, "received 2 messages, note=, retries=0", True),
)
SCHEDULE_TABLE: tuple[tuple[int, int, int | None, tuple[int, int] | str], ...] = (
    # startAtMs, intervalMs, jitter -> (willRunCount, firstRunAtMs), or the error message
    (1000, 500, 7, (120, 1007)),  # the reference's captured reply
    (0, 0, None, (1, 0)),
    (5, -5, 0, (1, 5)),
    (-3, 1, -3, (60000, -6)),
    (10**12, 7, None, (8571, 10**12)),
    (-(10**12), 60001, 7, (1, -(10**12) + 7)),
    (-(10**12), 60000, -1, (1, -(10**12) - 1)),
    (INT64_MAX - 7, 500, 7, (120, INT64_MAX)),
    (INT64_MIN, 30000, None, (2, INT64_MIN)),
    (INT64_MAX, 1, 1, "schedule.startAtMs + schedule.jitter overflows a signed 64-bit int"),
    (INT64_MIN, 1, -1, "schedule.startAtMs + schedule.jitter overflows a signed 64-bit int"),
)


def expect_error(method: str, message: str) -> RemoteCallError:
    return RemoteCallError(method, message)


def make_call(rng: random.Random, tag: str, timer_name: str) -> Call:
    """Build a random call whose outcome is known in advance."""
    text = "".join(rng.choice(TEXT) for _ in range(rng.randint(0, 6)))
    unique = f"{tag}{text}"
    roll = rng.random()
    if roll < 0.15:
        return Call("version", lambda c, t: c.version(timeout=t), f"timer-sdk v{__version__}")
    if roll < 0.40:
        req = EchoRequest(message=unique, delay_ms=rng.choice((0, 0, 0, 1, 2)))
        return Call(
            "echo",
            lambda c, t: c.echo(req, timeout=t),
            EchoResponse(echoed=unique, timer_name=timer_name),
        )
    if roll < 0.55:
        count, note, retries, summary, has_note = rng.choice(COMPLEX_TABLE)
        note = None if note is None else note.replace("{u}", unique)
        messages = [EchoRequest(message=f"{unique}/{i}", delay_ms=i) for i in range(count)]
        creq = ComplexRequest(messages=messages, tags=[unique], note=note, retries=retries)
        expected = ComplexResponse(
            summary=summary.replace("{u}", unique), item_count=count, has_note=has_note
        )
        return Call("complex", lambda c, t: c.complex(creq, timeout=t), expected)
    if roll < 0.72:
        start, interval, jitter, outcome = rng.choice(SCHEDULE_TABLE)
        job = JobSpec(name=unique or "j", payload=[unique], priority=rng.randint(-5, 5))
        retry = RetryPolicy(
            max_attempts=rng.randint(1, 9), backoff_ms=rng.randint(0, 10**6), retry_on=[unique]
        )
        when = ScheduleConfig(start_at_ms=start, interval_ms=interval, jitter=jitter)
        result: object = (
            expect_error("schedule", outcome)
            if isinstance(outcome, str)
            else ScheduleResult(
                job_id=f"{timer_name}:{job.name}",
                will_run_count=outcome[0],
                first_run_at_ms=outcome[1],
                effective_backoff_ms=retry.backoff_ms,
            )
        )
        kind = "schedule-overflow" if isinstance(outcome, str) else "schedule"
        return Call(kind, lambda c, t: c.schedule(job, retry, when, timeout=t), result)
    if roll < 0.78:
        job = JobSpec(name="", payload=[unique], priority=0)
        retry = RetryPolicy(max_attempts=1, backoff_ms=0, retry_on=[])
        when = ScheduleConfig(start_at_ms=0, interval_ms=0)
        return Call(
            "schedule-empty-name",
            lambda c, t: c.schedule(job, retry, when, timeout=t),
            expect_error("schedule", "job name must not be empty"),
        )
    if roll < 0.83:
        job = JobSpec(name=unique or "j", payload=[], priority=0)
        retry = RetryPolicy(max_attempts=-rng.randint(0, 3), backoff_ms=0, retry_on=[unique])
        when = ScheduleConfig(start_at_ms=0, interval_ms=0)
        return Call(
            "schedule-no-attempts",
            lambda c, t: c.schedule(job, retry, when, timeout=t),
            expect_error("schedule", "retry.maxAttempts must be positive"),
        )
    if roll < 0.88:
        name = f"nosuch.{unique}"
        return Call(
            "unknown-method",
            lambda c, t: c.call_raw(name, timeout=t),
            expect_error(name, f"unknown method: {name}"),
        )
    if roll < 0.93:
        extra = f"x{tag}"
        payload = cbor2.dumps({"req": {"message": unique, "delayMs": 0, extra: 1}})
        return Call(
            "unknown-field",
            lambda c, t: c.call_raw("echo", payload, timeout=t),
            expect_error(
                "echo", f"echo: invalid request: req.{extra}: Extra inputs are not permitted"
            ),
        )
    if roll < 0.995:
        req = EchoRequest(message=unique, delay_ms=rng.randint(0, 3))
        return Call("cancelled", lambda c, t: c.echo(req, timeout=t), None, cancel=True)
    req = EchoRequest(message=unique, delay_ms=TIMEOUT_ECHO_MS)
    echoed = EchoResponse(echoed=unique, timer_name=timer_name)
    return Call("timeout", lambda c, t: c.echo(req, timeout=t), echoed, timeout=TIMEOUT_AFTER)


async def perform(client: TimerClient, call: Call) -> Outcome:
    """Run one call and return its reply or the exception it ended with."""
    if call.cancel:
        task = asyncio.ensure_future(call.run(client, None))
        await asyncio.sleep(0)  # its request is written (or never will be); now cancel it
        task.cancel()
        try:
            return await task
        except asyncio.CancelledError as exc:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we were cancelled ourselves, not just the call
            return exc
        except Exception as exc:
            return exc
    try:
        return await call.run(client, call.timeout)
    except Exception as exc:
        return exc


def check(call: Call, outcome: Outcome, report: LoadReport, where: str) -> None:
    """Count ``outcome`` and record a mismatch if it is not what ``call`` must give."""
    report.calls += 1
    report.by_kind[call.kind] = report.by_kind.get(call.kind, 0) + 1
    if call.cancel:
        if isinstance(outcome, asyncio.CancelledError):
            report.cancelled += 1
        else:
            report.unexpected += 1
            report.note(f"{where}: cancelled {call.kind} ended with {outcome!r}")
        return
    if call.timeout is not None:
        if isinstance(outcome, CallTimeout):
            report.timeouts += 1
        elif outcome == call.expected:
            # Right too: a loop stalled past the deadline read the reply in the iteration
            # the deadline fired. Which of the two happens is up to the scheduler here;
            # tests/test_hostile.py builds that race and pins its one outcome.
            report.ok += 1
        else:
            report.unexpected += 1
            report.note(f"{where}: a call that must time out ended with {outcome!r}")
        return
    expected = call.expected
    if isinstance(expected, RemoteCallError):
        if (
            isinstance(outcome, RemoteCallError)
            and outcome.method == expected.method
            and outcome.message == expected.message
        ):
            report.error_replies += 1
        elif isinstance(outcome, TimerError) and not isinstance(outcome, RemoteCallError):
            report.unexpected += 1
            report.note(f"{where}: {call.kind}: {outcome!r}")
        else:
            report.mismatches += 1
            report.note(f"{where}: {call.kind}: expected {expected!r}, got {outcome!r}")
        return
    if isinstance(outcome, BaseException) and not isinstance(outcome, RemoteCallError):
        report.unexpected += 1
        report.note(f"{where}: {call.kind}: {outcome!r}")
    elif outcome == expected:
        report.ok += 1
    else:
        report.mismatches += 1
        report.note(f"{where}: {call.kind}: expected {expected!r}, got {outcome!r}")
