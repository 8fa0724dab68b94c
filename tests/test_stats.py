"""The server.stats extension, per-method timing, and what top computes from them."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import cbor2
import pytest

from timer_sdk import EchoRequest, EchoResponse, RemoteCallError, Timer, TimerClient
from timer_sdk.logs import JsonFormatter
from timer_sdk.serving.stats import BOUNDS, STATS, MethodTiming, snapshot
from timer_sdk.tools.top import quantile, rows
from timer_sdk.wire.codec import decode_item, encode_item
from timer_sdk.wire.framing import RET_OK, encode_request

from .conftest import RawConnection


async def _stats(client: TimerClient) -> dict[str, Any]:
    reply = decode_item(await client.call_raw(STATS))
    assert isinstance(reply, dict)
    return reply


async def test_a_tcp_server_refuses_stats_unless_enabled() -> None:
    async with (
        await Timer().serve("tcp:127.0.0.1:0") as server,
        await TimerClient.connect(server.address, timeout=30) as client,
    ):
        with pytest.raises(RemoteCallError) as info:
            await client.call_raw(STATS)
        assert info.value.message == (
            "server.stats: not enabled on this server: it reveals load, so a tcp: or tls: "
            "server answers it only if started with --stats (serve(..., stats=True))"
        )
        assert server.stats.error_replies == 1
        assert server.timing is None  # a refusal starts no timing
        # The connection carries on.
        assert (await client.echo(EchoRequest(message="after", delay_ms=0))).echoed == "after"


async def test_a_unix_server_answers_stats_by_default(tmp_path: Path) -> None:
    async with (
        await Timer().serve(f"unix:{tmp_path / 's.sock'}") as server,
        await TimerClient.connect(server.address, timeout=30) as client,
    ):
        assert server.stats_enabled
        await client.version()
        first = await _stats(client)
        # Timing starts with the first read: the version call before it is counted, not timed.
        assert first["methods"]["version"] == {
            "calls": 1, "errors": 0, "buckets": [0] * (len(BOUNDS) + 1), "sum": 0.0,
        }  # fmt: skip
        for i in range(5):
            await client.echo(EchoRequest(message=str(i), delay_ms=i % 2))  # sync and async
        with pytest.raises(RemoteCallError):
            await client.call_raw("echo", encode_item({"req": {"message": 5, "delayMs": 0}}))
        now = await _stats(client)
    echo = now["methods"]["echo"]
    assert echo["calls"] == 6
    assert sum(echo["buckets"]) == 6
    assert echo["errors"] == 1
    assert echo["sum"] > 0.002  # two calls waited at least 1 ms each
    assert now["counters"]["requests"] == 1 + 1 + 6 + 1  # two of them server.stats
    assert now["counters"]["error_replies"] == 1
    assert now["connections"] == 1
    assert now["budget"]["limit"] == server.limits.memory_budget
    assert now["time"] >= now["timing_since"] >= first["time"] - 1


async def test_per_method_errors_count_from_start_up_as_calls_do(tmp_path: Path) -> None:
    # A failed call before anyone watched: its row and the server's total agree.
    async with (
        await Timer().serve(f"unix:{tmp_path / 's.sock'}") as server,
        await TimerClient.connect(server.address, timeout=30) as client,
    ):
        with pytest.raises(RemoteCallError):
            await client.call_raw("echo", encode_item({"req": {"message": 5, "delayMs": 0}}))
        first = await _stats(client)
    assert first["methods"]["echo"]["calls"] == first["methods"]["echo"]["errors"] == 1
    assert first["counters"]["error_replies"] == 1
    assert server.stats.errors_by_method == {"echo": 1}
    assert "errors_by_method" not in first["counters"]  # per method, under "methods"


async def test_stats_enabled_on_tcp_and_timing_off_until_read() -> None:
    async with await Timer().serve("tcp:127.0.0.1:0", stats=True) as server:
        plans = {name: answer for name, (_, answer) in server.plans.items()}
        async with await TimerClient.connect(server.address, timeout=30) as client:
            await client.echo(EchoRequest(message="untimed", delay_ms=0))
            # Nobody has read anything: the plans are the very ones the server built.
            assert all(server.plans[name][1] is plans[name] for name in plans)
            await _stats(client)
            assert all(server.plans[name][1] is not plans[name] for name in plans)
            await client.echo(EchoRequest(message="timed", delay_ms=0))
            assert sum((await _stats(client))["methods"]["echo"]["buckets"]) == 1


async def test_a_reference_client_never_gets_a_frame_it_did_not_ask_for(
    tmp_path: Path,
) -> None:
    async with await Timer().serve(f"unix:{tmp_path / 's.sock'}") as server:
        reference = await RawConnection.open(server.address)
        try:
            await reference.send(encode_request(b"version", b"\xa0"))
            assert (await reference.recv_reply())[0] == RET_OK
            async with await TimerClient.connect(server.address, timeout=30) as watcher:
                for _ in range(3):
                    await _stats(watcher)
                await watcher.echo(EchoRequest(message="seen by stats", delay_ms=0))
            # The next frame the reference client reads is the reply to its next request.
            request = {"req": {"message": "mine", "delayMs": 0}}
            await reference.send(encode_request(b"echo", cbor2.dumps(request)))
            ret, body = await reference.recv_reply()
            assert ret == RET_OK
            assert cbor2.loads(body)["echoed"] == "mine"
        finally:
            await reference.close()


def test_quantiles_interpolate_within_a_bucket() -> None:
    bounds = [0.001, 0.01, 0.1]
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
    # 10 calls under 1 ms, 10 between 1 and 10 ms: the median is the 1 ms bound.
    assert quantile(0.5, bounds, [10, 10, 0, 0]) == pytest.approx(0.001)
    assert quantile(0.75, bounds, [10, 10, 0, 0]) == pytest.approx(0.0055)
    assert quantile(0.99, bounds, [0, 0, 0, 3]) == 0.1  # past the last bound


def test_rows_are_rates_between_two_samples() -> None:
    def sample(t: float, calls: int, errors: int, buckets: list[int]) -> dict[str, Any]:
        method = {"calls": calls, "errors": errors, "buckets": buckets, "sum": 0.0}
        return {"time": t, "bounds": [0.001, 0.01], "methods": {"echo": method}}

    (row,) = rows(sample(10.0, 100, 1, [50, 50, 0]), sample(12.0, 300, 5, [250, 50, 0]))
    assert (row.name, row.calls, row.errors) == ("echo", 300, 5)
    assert row.rate == 100.0
    assert row.error_rate == 2.0
    assert row.p50 == pytest.approx(0.0005)  # every new call was under 1 ms
    assert row.p99 == pytest.approx(0.00099)


def test_json_log_lines_carry_the_logger_name() -> None:
    logger = logging.getLogger("timer_sdk.connection")
    record = logger.makeRecord(logger.name, logging.WARNING, "f.py", 1, "peer %s: %s",
                               ("1.2.3.4:5", "bad"), None)  # fmt: skip
    line = json.loads(JsonFormatter().format(record))
    assert line["logger"] == "timer_sdk.connection"
    assert line["level"] == "warning"
    assert line["message"] == "peer 1.2.3.4:5: bad"
    assert line["time"].endswith("Z")


def test_a_duration_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() -> None:
    timing = MethodTiming()
    first, last = round(BOUNDS[0] * 1e9), round(BOUNDS[-1] * 1e9)  # 1024 ns, 2**34 ns
    for ns in (0, 1, first, first + 1, 2 * first, 3000, last, last + 1, 10**12):
        timing.record(ns)
    buckets = timing.buckets()
    assert len(buckets) == len(BOUNDS) + 1
    assert buckets[:3] == [3, 2, 1]  # <= 1.024 µs; <= 2.048 µs; 3000 ns <= 4.096 µs
    assert buckets[-2:] == [1, 2]  # exactly the last bound; over it
    assert sum(buckets) == 9
    assert timing.ns == sum((0, 1, first, first + 1, 2 * first, 3000, last, last + 1, 10**12))


class _FailsLater(Timer):
    async def echo(self, req: EchoRequest) -> EchoResponse:
        await asyncio.sleep(0)  # suspended first: the timing wrapper sees it end later
        raise RuntimeError("after suspending")


async def test_a_proc_that_fails_after_suspending_is_timed_as_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        await _FailsLater().serve(f"unix:{tmp_path / 's.sock'}") as server,
        await TimerClient.connect(server.address, timeout=30) as client,
    ):
        await _stats(client)  # timing starts
        with caplog.at_level(logging.ERROR), pytest.raises(RemoteCallError, match="internal error"):
            await client.echo(EchoRequest(message="x", delay_ms=0))
        echo = (await _stats(client))["methods"]["echo"]
    assert echo["calls"] == echo["errors"] == sum(echo["buckets"]) == 1
    assert "echo raised" in caplog.text


async def test_a_snapshot_before_anyone_read_one_has_counts_only() -> None:
    async with await Timer().serve("tcp:127.0.0.1:0") as server:
        snap = snapshot(server)
    assert snap["timing_since"] is None
    assert snap["methods"]["echo"] == {"calls": 0, "errors": 0}  # both count from start-up
