"""What a connection really holds stays within the bound docs/limits.md states.

A server process with a 1 MiB budget; 200 connections each pipeline three
15 KB echoes held 1 s, so that every one of them lives off the floor. Its
RSS growth over its idle state, less the budget, per connection, read from
``/proc`` once every connection has had its first reply, must be at most
:data:`PER_CONNECTION_KIB`. ``python -m tests._memory_probe`` runs the same
with 2,000 connections, 5 s holds and every reply.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import cbor2

from timer_sdk import Limits, Timer
from timer_sdk.wire.budget import FLOOR, IN_FLIGHT_COST
from timer_sdk.wire.framing import RET_OK

from ._memory_probe import echo as echo_frame
from ._memory_probe import measure
from .conftest import GatedTimer, RawConnection, wait_until
from .vectors import VERSION_REQUEST

KiB = 1024

PER_CONNECTION_KIB = 20
"""The bound docs/limits.md states (checked below), in KiB per connection."""

CONNECTIONS = 200  # the server before this bound held about 45 KiB each: 9 MB against 4


def test_the_documented_bound_is_the_one_tested() -> None:
    limits = (Path(__file__).parents[1] / "docs" / "limits.md").read_text()
    stated = re.search(r"budget plus (\d+) KiB per open connection", limits)
    assert stated is not None and int(stated.group(1)) == PER_CONNECTION_KIB


async def test_floor_connections_hold_what_the_limits_page_states() -> None:
    figures = await measure(CONNECTIONS, delay_ms=1000, replies=1, timeout=120)
    print(figures)
    assert figures["replies_ok"] == CONNECTIONS and figures["replies_bad"] == 0, figures
    assert figures["per_connection_kib"] <= PER_CONNECTION_KIB, figures


async def test_small_frames_in_one_read_start_only_what_the_floor_holds() -> None:
    # A hog's running echo and its next frame, waiting in line, leave no room. A
    # peer then sends 40 tiny held echoes in one write: one read under the floor.
    # Each becomes a running request (a Task and its coroutines), so only those
    # that keep the peer under the floor start; the rest wait as bytes, then all
    # are answered in order.
    timer = GatedTimer()
    limits = Limits(memory_budget=100 * KiB)
    async with await timer.serve(limits=limits) as server:
        hog = await RawConnection.open(server.address)
        small = await RawConnection.open(server.address)
        try:
            await hog.send(echo_frame("h" * 60 * KiB, 0) * 2)
            await wait_until(lambda: server.budget.waiting == 1)  # its second frame
            waits = server.stats.budget_waits
            await small.send(b"".join(echo_frame(f"s{i}", 0) for i in range(40)))
            await wait_until(
                lambda: server.stats.budget_waits > waits or server.stats.requests == 41
            )
            started = server.stats.requests - 1
            assert 0 < started < FLOOR // IN_FLIGHT_COST, server.stats
            assert sorted(c.held for c in server.connections)[0] <= FLOOR  # the small peer's
            timer.gate.set()
            for i in range(40):
                ret, body = await small.recv_reply()
                assert (ret, cbor2.loads(body)["echoed"]) == (RET_OK, f"s{i}")
            for _ in range(2):
                assert (await hog.recv_reply())[0] == RET_OK
        finally:
            await hog.close()
            await small.close()


async def test_a_running_request_is_charged_its_decoded_size() -> None:
    # One character past U+FFFF makes the whole text 4 bytes a character once
    # decoded: an 8 KB payload holds about 32 KB while its proc runs.
    timer = GatedTimer()
    async with await timer.serve() as server:
        conn = await RawConnection.open(server.address)
        try:
            message = "a" * 8000 + "\U0001d11e"
            await conn.send(echo_frame(message, 0))
            await wait_until(lambda: server.stats.requests == 1)
            (held,) = (c.held for c in server.connections)
            assert held >= 4 * len(message) + IN_FLIGHT_COST, held
            timer.gate.set()
            ret, body = await conn.recv_reply()
            assert (ret, cbor2.loads(body)["echoed"]) == (RET_OK, message)
            await wait_until(lambda: server.budget.used == 0)
        finally:
            await conn.close()


class _SlowVersion(Timer):
    """A timer whose version waits: a proc without arguments that suspends."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def version(self) -> str:
        await self.gate.wait()
        return "slow"


async def test_a_running_request_without_arguments_is_charged_for_itself() -> None:
    timer = _SlowVersion()
    async with await timer.serve() as server:
        conn = await RawConnection.open(server.address)
        try:
            await conn.send(VERSION_REQUEST)
            await wait_until(lambda: server.stats.requests == 1)
            assert [c.held for c in server.connections] == [1 + IN_FLIGHT_COST]  # its 0xa0
            timer.gate.set()
            assert await conn.recv_reply() == (RET_OK, cbor2.dumps("slow"))
        finally:
            await conn.close()
