"""Valid clients pushing hard: overload is felt as delay, never as starvation,
a refusal, a closed connection or a lost reply.

Three greedy pipeliners fill a small budget with long echoes and read their
replies as a real client does, while a small caller makes sequential calls on
a connection it opened before. Real loopback sockets, an in-process server
so that ``server.stats`` shows what the budget did; the scale (a 3 MiB
budget, 1-3 s delays) keeps each run to a few seconds. One test runs the same
at full scale against ``timer-sdk serve`` and its default 64 MiB budget.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest

from timer_sdk import Limits, Timer
from timer_sdk.tools.server_process import ServerProcess
from timer_sdk.wire.framing import RET_OK, encode_request

from .conftest import RawConnection

KiB = 1024
MiB = 1024 * KiB
GREEDY = 3
PER_GREEDY = 24
GREEDY_SIZE = 64 * KiB
SMALL_WITHIN = 1.0  # seconds for each of the small caller's calls


def echo(message: str, delay_ms: int) -> bytes:
    return encode_request(b"echo", cbor2.dumps({"req": {"message": message, "delayMs": delay_ms}}))


def echoed(message: str) -> bytes:
    return cbor2.dumps({"echoed": message, "timerName": "ipc-server"})


async def greedy(
    address: str, n: int, delay_ms: int, *, half_close: bool, count: int, size: int
) -> list[tuple[int, bytes, str]]:
    """Pipeline ``count`` long echoes and read every reply, as a real client does."""
    conn = await RawConnection.open(address)
    messages = [f"{n}.{i}.".ljust(size, "g") for i in range(count)]
    try:

        async def send() -> None:
            for i, message in enumerate(messages):
                conn.writer.write(echo(message, delay_ms + 40 * i))
                await conn.writer.drain()  # the server's pushback is felt here
            if half_close:
                conn.writer.write_eof()  # all sent: only replies are to come

        sending = asyncio.create_task(send())
        replies = [(*await conn.recv_reply(), message) for message in messages]
        await sending
        if half_close:
            assert await conn.at_eof()  # closed by the server only after the last reply
        return replies
    finally:
        await conn.close()


async def small_caller(conn: RawConnection, stop: asyncio.Event) -> list[float]:
    """Sequential small echoes on an open connection; each one's time."""
    times: list[float] = []
    while not stop.is_set():
        started = time.monotonic()
        await conn.send(echo("small", 0))
        ret, body = await asyncio.wait_for(conn.recv_reply(), 30)
        times.append(time.monotonic() - started)
        assert (ret, body) == (RET_OK, echoed("small"))
        await asyncio.sleep(0.02)
    return times


async def overload(
    address: str,
    delay_ms: int,
    *,
    half_close: bool = False,
    count: int = PER_GREEDY,
    size: int = GREEDY_SIZE,
) -> list[float]:
    """Run the greedy clients and the small caller; assert every greedy reply."""
    small = await RawConnection.open(address)
    try:
        await small.send(echo("hello", 0))
        assert (await small.recv_reply())[0] == RET_OK  # an existing connection
        stop = asyncio.Event()
        caller = asyncio.create_task(small_caller(small, stop))
        try:
            replies = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        greedy(address, n, delay_ms, half_close=half_close, count=count, size=size)
                        for n in range(GREEDY)
                    )
                ),
                60,
            )
        finally:
            stop.set()
        times = await caller
    finally:
        await small.close()
    bad = [(ret, body[:100]) for per in replies for ret, body, m in per if body != echoed(m)]
    assert not bad, (len(bad), bad[:3])
    assert all(ret == RET_OK for per in replies for ret, _, _ in per)
    return times


def limits(frame_timeout: float) -> Limits:
    # The greedy clients want 4.5 MiB in flight, half as much again as the budget.
    return Limits(memory_budget=3 * MiB, frame_timeout=frame_timeout)


async def test_a_small_caller_is_answered_promptly_behind_greedy_pipeliners() -> None:
    async with await Timer().serve(limits=limits(frame_timeout=30)) as server:
        # Before, the small caller waited for a greedy echo to end: 2 s and more.
        times = await overload(server.address, delay_ms=2000)
        stats = server.stats
    print(f"small calls: {len(times)}, slowest {max(times):.3f} s, waits {stats.budget_waits}")
    assert stats.budget_waits > 0  # the budget was spent: the greedy clients waited
    assert len(times) >= 10, times
    assert max(times) < SMALL_WITHIN, sorted(times)[-5:]


@pytest.mark.parametrize("half_close", [False, True], ids=["reading", "half-closed"])
async def test_every_valid_request_is_answered_and_no_valid_connection_closed(
    half_close: bool,
) -> None:
    # A frame's wait for room is far past frame_timeout, which is for slow peers only.
    async with await Timer().serve(limits=limits(frame_timeout=0.5)) as server:
        await overload(server.address, delay_ms=1000, half_close=half_close)
        stats = server.stats
    assert stats.budget_waits > 0
    assert stats.error_replies == 0
    assert stats.frame_timeouts == 0 and stats.budget_refusals == 0
    assert stats.protocol_violations == 0


async def server_stats(address: str) -> dict[str, Any]:
    """The ``server.stats`` snapshot, which a unix: server answers by default."""
    conn = await RawConnection.open(address)
    try:
        await conn.send(encode_request(b"server.stats", cbor2.dumps({})))
        ret, body = await conn.recv_reply()
    finally:
        await conn.close()
    assert ret == RET_OK, body
    snapshot: dict[str, Any] = cbor2.loads(body)
    return snapshot


@pytest.mark.timeout(180)
async def test_the_default_budget_holds_a_full_scale_overload(tmp_path: Path) -> None:
    # timer-sdk serve as shipped: three greedy clients want 96 MB of 500 KB echoes in
    # flight, half as much again as the 64 MiB budget.
    async with ServerProcess(f"unix:{tmp_path / 's.sock'}") as server:
        times = await overload(server.address, delay_ms=1000, count=64, size=500_000)
        stats = await server_stats(server.address)
        _, peak_kib = server.rss_kib()
    counters = stats["counters"]
    print(f"small calls: {len(times)}, slowest {max(times):.3f} s, peak {peak_kib >> 10} MiB")
    assert stats["budget"]["limit"] == 64 * MiB
    assert counters["budget_waits"] > 0  # the budget was spent: the greedy clients waited
    assert counters["error_replies"] == counters["budget_refusals"] == 0
    assert counters["frame_timeouts"] == counters["protocol_violations"] == 0
    assert max(times) < SMALL_WITHIN, sorted(times)[-5:]
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib >> 10} MiB"
