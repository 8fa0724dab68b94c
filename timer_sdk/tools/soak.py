"""A bounded load and soak run: many connections, every method, every reply checked.

``python -m timer_sdk.tools.soak --seconds 60 --connections 200`` starts a server
process (``python -m timer_sdk serve``) on ``127.0.0.1`` or a Unix socket in a
temporary directory, runs the load against it, and prints calls per second,
error counts, mismatches (must be 0) and the server's resident memory at the
start and the end. It exits non-zero if any reply was wrong or any call failed
unexpectedly. ``tests/test_load.py`` runs the same load, briefly.

Each connection makes batches of concurrent calls that mix every method with
calls that must fail (empty job name, no attempts, unknown method, unknown
field), calls that time out and calls that are cancelled. Every request
carries something unique (a message, a note, a job name, a field name), so a
reply delivered to the wrong caller is a mismatch, never a coincidence. This is
the check that catches the desync of redis-py's CVE-2023-28858/28859.

Over 400 lines: one self-contained tool (a server process, the load, the
checks, the report) that the load test shares; nothing else imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import signal
import ssl as _ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

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

__all__ = ["LoadReport", "ServerProcess", "main", "read_rss_kib", "run_load"]

LISTENING = re.compile(r"listening on (\S+)")
TEXT = "aé☃日本𝄞 \u200b"  # multi-byte UTF-8 of every length, and a zero-width space
TIMEOUT_ECHO_MS = 250  # far beyond TIMEOUT_AFTER, so a loaded loop cannot win the race
TIMEOUT_AFTER = 0.005


def read_rss_kib(pid: int) -> tuple[int, int]:
    """Return (VmRSS, VmHWM) of a process in KiB, from ``/proc/PID/status``."""
    values = {"VmRSS": 0, "VmHWM": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in values:
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


class ServerProcess:
    """A ``python -m timer_sdk serve`` child, stopped on exit from ``async with``.

    Its output is read as it comes (never left to fill a pipe and block the
    server) and kept in :attr:`lines`.
    """

    def __init__(self, address: str = "tcp:127.0.0.1:0", *args: str) -> None:
        self.argv = [sys.executable, "-m", "timer_sdk", "serve", address, *args]
        self.address = ""
        self.lines: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._sent: set[signal.Signals] = set()

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self._proc is not None
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, once the process has ended."""
        assert self._proc is not None
        return self._proc.returncode

    def rss_kib(self) -> tuple[int, int]:
        """Return the server's (resident, peak resident) memory in KiB."""
        return read_rss_kib(self.pid)

    async def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start the server and wait until it says where it listens."""
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        assert self._proc.stdout is not None
        self._pumps.append(asyncio.create_task(self._pump(self._proc.stdout)))
        try:
            line = await self.wait_for_line(LISTENING, timeout)
        except BaseException:
            await self.stop(signal.SIGKILL)
            raise
        match = LISTENING.search(line)
        assert match is not None
        self.address = match.group(1)
        return self

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def wait_for_line(self, pattern: re.Pattern[str], timeout: float = 30.0) -> str:
        """Wait until the server prints a line matching ``pattern``; return it."""
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines[seen:]:
                    if pattern.search(line):
                        return line
                seen = len(self.lines)
                if self._pumps and self._pumps[0].done():
                    raise RuntimeError(f"server exited without {pattern.pattern!r}: {self.lines}")
                self._changed.clear()
                await self._changed.wait()

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the server if it still runs."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(sig)
            self._sent.add(sig)

    async def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig``, wait for the exit (killing it after ``timeout``); return its status."""
        proc = self._proc
        if proc is None:
            return 0
        if sig not in self._sent:
            # Only once: a second SIGTERM during the shutdown's last steps, after the
            # server removed its handler, would kill it and hide its real status.
            self.send_signal(sig)
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        for pump in self._pumps:
            await pump
        return proc.returncode if proc.returncode is not None else -1

    async def __aenter__(self) -> ServerProcess:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


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
class _Call:
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


def _expect_error(method: str, message: str) -> RemoteCallError:
    return RemoteCallError(method, message)


def _make_call(rng: random.Random, tag: str, timer_name: str) -> _Call:
    """Build a random call whose outcome is known in advance."""
    text = "".join(rng.choice(TEXT) for _ in range(rng.randint(0, 6)))
    unique = f"{tag}{text}"
    roll = rng.random()
    if roll < 0.15:
        return _Call("version", lambda c, t: c.version(timeout=t), f"timer-sdk v{__version__}")
    if roll < 0.40:
        req = EchoRequest(message=unique, delay_ms=rng.choice((0, 0, 0, 1, 2)))
        return _Call(
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
        return _Call("complex", lambda c, t: c.complex(creq, timeout=t), expected)
    if roll < 0.72:
        start, interval, jitter, outcome = rng.choice(SCHEDULE_TABLE)
        job = JobSpec(name=unique or "j", payload=[unique], priority=rng.randint(-5, 5))
        retry = RetryPolicy(
            max_attempts=rng.randint(1, 9), backoff_ms=rng.randint(0, 10**6), retry_on=[unique]
        )
        when = ScheduleConfig(start_at_ms=start, interval_ms=interval, jitter=jitter)
        result: object = (
            _expect_error("schedule", outcome)
            if isinstance(outcome, str)
            else ScheduleResult(
                job_id=f"{timer_name}:{job.name}",
                will_run_count=outcome[0],
                first_run_at_ms=outcome[1],
                effective_backoff_ms=retry.backoff_ms,
            )
        )
        kind = "schedule-overflow" if isinstance(outcome, str) else "schedule"
        return _Call(kind, lambda c, t: c.schedule(job, retry, when, timeout=t), result)
    if roll < 0.78:
        job = JobSpec(name="", payload=[unique], priority=0)
        retry = RetryPolicy(max_attempts=1, backoff_ms=0, retry_on=[])
        when = ScheduleConfig(start_at_ms=0, interval_ms=0)
        return _Call(
            "schedule-empty-name",
            lambda c, t: c.schedule(job, retry, when, timeout=t),
            _expect_error("schedule", "job name must not be empty"),
        )
    if roll < 0.83:
        job = JobSpec(name=unique or "j", payload=[], priority=0)
        retry = RetryPolicy(max_attempts=-rng.randint(0, 3), backoff_ms=0, retry_on=[unique])
        when = ScheduleConfig(start_at_ms=0, interval_ms=0)
        return _Call(
            "schedule-no-attempts",
            lambda c, t: c.schedule(job, retry, when, timeout=t),
            _expect_error("schedule", "retry.maxAttempts must be positive"),
        )
    if roll < 0.88:
        name = f"nosuch.{unique}"
        return _Call(
            "unknown-method",
            lambda c, t: c.call_raw(name, timeout=t),
            _expect_error(name, f"unknown method: {name}"),
        )
    if roll < 0.93:
        extra = f"x{tag}"
        payload = cbor2.dumps({"req": {"message": unique, "delayMs": 0, extra: 1}})
        return _Call(
            "unknown-field",
            lambda c, t: c.call_raw("echo", payload, timeout=t),
            _expect_error(
                "echo", f"echo: invalid request: req.{extra}: Extra inputs are not permitted"
            ),
        )
    if roll < 0.995:
        req = EchoRequest(message=unique, delay_ms=rng.randint(0, 3))
        return _Call("cancelled", lambda c, t: c.echo(req, timeout=t), None, cancel=True)
    req = EchoRequest(message=unique, delay_ms=TIMEOUT_ECHO_MS)
    echoed = EchoResponse(echoed=unique, timer_name=timer_name)
    return _Call("timeout", lambda c, t: c.echo(req, timeout=t), echoed, timeout=TIMEOUT_AFTER)


async def _perform(client: TimerClient, call: _Call) -> Outcome:
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


def _check(call: _Call, outcome: Outcome, report: LoadReport, where: str) -> None:
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


async def _connection(
    index: int,
    address: str,
    report: LoadReport,
    *,
    deadline: float,
    calls: int | None,
    seed: int,
    timer_name: str,
    ssl: _ssl.SSLContext | None,
) -> None:
    rng = random.Random(seed * 1_000_003 + index)
    try:
        client = await TimerClient.connect(address, timeout=60, connect_timeout=30, ssl=ssl)
    except TimerError as exc:
        report.connect_errors += 1
        report.note(f"connection {index}: {exc!r}")
        return
    made = 0
    async with client:
        while (calls is None or made < calls) and time.monotonic() < deadline:
            size = rng.randint(1, 8) if calls is None else min(rng.randint(1, 8), calls - made)
            batch = [_make_call(rng, f"{index}.{made + i}.", timer_name) for i in range(size)]
            made += size
            outcomes = await asyncio.gather(*(_perform(client, call) for call in batch))
            for i, (call, outcome) in enumerate(zip(batch, outcomes, strict=True)):
                _check(call, outcome, report, f"connection {index} call {made - size + i}")
            if client.closed:
                report.unexpected += 1
                report.note(f"connection {index}: the client broke: {client!r}")
                return


async def run_load(
    address: str,
    *,
    connections: int,
    seconds: float | None = None,
    calls: int | None = None,
    seed: int = 0,
    timer_name: str = "ipc-server",
    ssl: _ssl.SSLContext | None = None,
) -> LoadReport:
    """Run the load on ``connections`` connections for ``seconds`` or ``calls`` each.

    Returns a :class:`LoadReport`; it raises only if the run itself is cancelled.
    """
    if seconds is None and calls is None:
        raise ValueError("give seconds, calls, or both")
    report = LoadReport(connections=connections)
    started = time.monotonic()
    deadline = started + seconds if seconds is not None else float("inf")
    await asyncio.gather(
        *(
            _connection(
                i,
                address,
                report,
                deadline=deadline,
                calls=calls,
                seed=seed,
                timer_name=timer_name,
                ssl=ssl,
            )
            for i in range(connections)
        )
    )
    report.seconds = time.monotonic() - started
    return report


def _check_target(address: str) -> None:
    if not (address.startswith("tcp:127.0.0.1:") or address.startswith("unix:")):
        raise SystemExit(f"soak: refusing to load {address}: only 127.0.0.1 and unix: sockets")


async def _soak(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        if args.transport == "unix":
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="timer-soak-"))
            where = f"unix:{directory}/soak.sock"
        else:
            where = "tcp:127.0.0.1:0"
        serve_args = ["--max-connections", str(max(1024, args.connections + 16))]
        async with ServerProcess(where, *serve_args) as server:
            _check_target(server.address)
            # Warm up: the first calls import and allocate what every later call reuses.
            await run_load(server.address, connections=min(args.connections, 20), calls=50)
            rss_start, _ = server.rss_kib()
            print(
                f"soak: {args.connections} connections for {args.seconds:g} s against "
                f"{server.address} (server pid {server.pid}), seed {args.seed}",
                flush=True,
            )
            report = await run_load(
                server.address,
                connections=args.connections,
                seconds=args.seconds,
                seed=args.seed,
            )
            rss_end, rss_peak = server.rss_kib()
            print(report.summary())
            print(
                f"server RSS: start {rss_start / 1024:.1f} MiB, end {rss_end / 1024:.1f} MiB, "
                f"peak {rss_peak / 1024:.1f} MiB"
            )
        print(f"server exited with status {server.returncode}")
    return 0 if report.clean and server.returncode == 0 else 1


DESCRIPTION = """\
A bounded load and soak run: many connections, every method, every reply checked.

Starts a server process on 127.0.0.1 (or on a Unix socket in a temporary
directory), runs the load against it, and prints calls per second, error counts,
mismatches (must be 0) and the server's resident memory at the start and the end.
Each connection mixes every method with calls that must fail, time out or be
cancelled; every request carries something unique, so a reply delivered to the
wrong caller counts as a mismatch. Exits non-zero if any reply was wrong or any
call failed unexpectedly.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak from the command line; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m timer_sdk.tools.soak",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run the load")
    parser.add_argument("--connections", type=int, default=200, help="concurrent connections")
    parser.add_argument("--transport", choices=("tcp", "unix"), default="tcp")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.connections <= 5000 or not 0 < args.seconds <= 24 * 3600:
        parser.error("--connections must be 1..5000 and --seconds 0..86400")
    return asyncio.run(_soak(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
