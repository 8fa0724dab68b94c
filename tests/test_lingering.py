"""A server connection's last turns: fairness between connections, and the lingering close.

docs/limits.md promises both: a connection handles a bounded quantum of frames per
turn, and after its last reply the server half-closes (FIN) and reads and drops what
the peer still sends, until the peer closes or the linger passes, so that no RST can
destroy replies the peer has not read yet.
"""

from __future__ import annotations

import asyncio
from typing import Any

import cbor2
import pytest

from timer_sdk import Server, TimerConfig
from timer_sdk.serving import endings as connection_endings
from timer_sdk.serving.connection import _QUANTUM, Connection
from timer_sdk.wire.framing import encode_request

from .conftest import GatedTimer, RawConnection, Reads, wait_until

VERSION = encode_request(b"version", b"")


async def _shutting_down_with_a_held_call(
    address: str,
) -> tuple[GatedTimer, Server, RawConnection, Connection, bytes]:
    """A server closing while one echo of one raw connection is held."""
    timer = GatedTimer(TimerConfig(name="held"))
    server = await timer.serve(address)
    raw = await RawConnection.open(server.address)
    first = encode_request(b"echo", cbor2.dumps({"req": {"message": "held", "delayMs": 0}}))
    await raw.send(first)
    await wait_until(lambda: len(server.tasks) == 1)
    [conn] = server.connections
    return timer, server, raw, conn, first


async def test_the_last_reply_is_followed_by_fin_and_late_requests_are_drained(
    address: str, server_reads: Reads
) -> None:
    timer, server, raw, conn, first = await _shutting_down_with_a_held_call(address)
    closing = asyncio.create_task(server.close())
    try:
        await wait_until(lambda: conn._shutting_down)  # reading is paused from here on
        late = VERSION * 100
        await raw.send(late)  # arrives unread: left as is, a close would send RST
        timer.gate.set()
        ret, body = await raw.recv_reply()
        assert (ret, cbor2.loads(body)) == (0, {"echoed": "held", "timerName": "held"})
        # A FIN, not a RST, and no answer to the late requests.
        assert await raw.at_eof()
        # The server still reads, and drops, what the peer sends after its FIN.
        await server_reads.until(len(first) + len(late), timeout=10)
        await raw.send(VERSION * 10)
        await server_reads.until(len(first) + len(late) + len(VERSION) * 10, timeout=10)
        assert not closing.done()  # lingering: the peer has not closed yet
        await raw.close()
        await asyncio.wait_for(closing, 10)  # the peer closed: the linger ends with it
    finally:
        timer.gate.set()
        await raw.close()
        await server.close()


async def test_a_peer_that_never_closes_is_closed_when_the_linger_passes(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection_endings, "_LINGER", 0.1)
    timer, server, raw, _, _ = await _shutting_down_with_a_held_call(address)
    try:
        closing = asyncio.create_task(server.close())
        timer.gate.set()
        assert (await raw.recv_reply())[0] == 0
        assert await raw.at_eof()
        await asyncio.wait_for(closing, 10)  # the raw peer never closed
        assert not server.connections
    finally:
        await raw.close()
        await server.close()


@pytest.fixture
def turns(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The requests each turn of a connection dispatched: one list of connection ids per turn."""
    found: list[list[int]] = []
    real_process = Connection._process
    real_dispatch = Connection._dispatch
    depth = 0

    def process(self: Connection) -> None:
        nonlocal depth
        if not depth:
            found.append([])
        depth += 1
        try:
            real_process(self)
        finally:
            depth -= 1

    def dispatch(self: Connection, event: Any) -> Any:
        found[-1].append(id(self))
        return real_dispatch(self, event)

    monkeypatch.setattr(Connection, "_process", process)
    monkeypatch.setattr(Connection, "_dispatch", dispatch)
    return found


async def test_a_connection_yields_after_a_quantum_of_frames(
    server: Server, turns: list[list[int]]
) -> None:
    busy = await RawConnection.open(server.address)
    other = await RawConnection.open(server.address)
    try:
        await wait_until(lambda: len(server.connections) == 2)
        count = 10 * _QUANTUM
        # Both writes reach the sockets before the loop runs again: the server finds
        # all of busy's frames at once, and other's one frame in the same poll.
        busy.writer.write(VERSION * count)
        other.writer.write(VERSION)
        assert (await other.recv_reply())[0] == 0
        for _ in range(count):
            assert (await busy.recv_reply())[0] == 0
        sizes = [len(turn) for turn in turns if turn]
        assert sum(sizes) == count + 1
        assert max(sizes) == _QUANTUM  # a turn never handles more than its quantum
        # The other connection's frame was not kept waiting behind all of busy's.
        order = [conn for turn in turns for conn in turn]
        [other_id] = set(order) - {order[-1]}
        assert order.index(other_id) < len(order) - 1
    finally:
        await busy.close()
        await other.close()
