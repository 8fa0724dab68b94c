"""A bounded load: hundreds of connections, every method and error, every reply checked.

The load itself lives in :mod:`timer_sdk.tools.soak`, which also runs it for longer
(``python -m timer_sdk.tools.soak --seconds 60 --connections 200``). Here it runs
briefly: against an in-process server over TCP and a Unix socket, and against
a server process, where the server has a core of its own.
"""

from __future__ import annotations

import pytest

from timer_sdk import Server
from timer_sdk.tools.server_process import ServerProcess
from timer_sdk.tools.soak import main, run_load

KINDS = {
    "version",
    "echo",
    "complex",
    "schedule",
    "schedule-empty-name",
    "schedule-overflow",
    "schedule-no-attempts",
    "unknown-method",
    "unknown-field",
    "cancelled",
    "timeout",
}


@pytest.mark.timeout(60)
async def test_load_in_process(server: Server) -> None:
    report = await run_load(server.address, connections=200, calls=20, seed=1)
    assert report.clean, report.summary()
    assert report.calls == 200 * 20
    assert report.mismatches == 0
    counted = report.ok + report.error_replies + report.timeouts
    assert counted + report.cancelled == report.calls
    assert set(report.by_kind) >= KINDS - {"timeout"}, report.by_kind  # timeouts are rare
    # The server counted what the client saw: every expected error reply came from it.
    assert server.stats.error_replies >= report.error_replies
    assert not server.connections or all(c._transport is None for c in server.connections)


@pytest.mark.timeout(90)
async def test_load_against_a_server_process() -> None:
    async with ServerProcess() as server:
        rss_start, _ = server.rss_kib()
        # Bounded by count, not time: a loaded machine (or coverage in the server
        # process) makes fewer calls in 4 s, and speed is the benchmark's business.
        report = await run_load(server.address, connections=250, calls=12, seed=2)
        rss_end, _ = server.rss_kib()
        assert report.clean, report.summary()
        assert report.calls == 250 * 12, report.summary()
        assert set(report.by_kind) == KINDS, report.by_kind
        assert rss_end - rss_start < 64 * 1024, (rss_start, rss_end)
        assert await server.stop() == 0


def test_a_wrong_reply_is_caught() -> None:
    """Make sure the checker can fail: feed it a reply meant for another call."""
    import asyncio
    import random

    from timer_sdk.tools.call_mix import LoadReport, check, make_call

    rng = random.Random(7)
    calls = [make_call(rng, f"{i}.", "ipc-server") for i in range(200)]
    plain = [c for c in calls if c.kind in ("echo", "complex", "schedule")]
    report = LoadReport()
    for call, other in zip(plain, plain[1:] + plain[:1], strict=True):
        check(call, other.expected, report, "swap")
    assert report.mismatches == len(plain)
    report = LoadReport()
    for call in plain:
        check(call, call.expected, report, "same")
    assert (report.ok, report.mismatches) == (len(plain), 0)
    cancelled = next(c for c in calls if c.cancel)
    check(cancelled, asyncio.CancelledError(), report, "cancel")
    assert report.cancelled == 1


@pytest.mark.timeout(60)
def test_soak_command_runs_briefly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seconds", "1", "--connections", "20", "--transport", "unix"]) == 0
    out = capsys.readouterr().out
    assert "mismatches 0, unexpected errors 0, connect errors 0" in out
    assert "server RSS: start" in out
    assert "server exited with status 0" in out
