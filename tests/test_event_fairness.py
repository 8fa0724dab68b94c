"""Stalled subscribers cost only themselves: a reading subscriber gets its events.

A server subprocess, real loopback sockets. Thirty subscribers stop reading (a
small receive buffer, so that the server soon holds their events), ten read
all the time, and pipelined echoes fire bursts of events. Each reading
subscriber must receive at least 99% of the events fired, and every event
anyone missed must be counted in a drop notice.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import cbor2
import pytest

from timer_sdk.tools.server_process import ServerProcess
from timer_sdk.wire.framing import RET_EVENT, RET_EVENTS_DROPPED, RET_OK, encode_request

STALLED = 30
READING = 10
PIPELINERS = 4
PER_BURST = 256  # per pipeliner: 4 x 256 x 10 bursts = 10,240 events
MESSAGE = "e" * 1000  # 10 MB of events for each subscriber: far more than sockets buffer
KiB = 1024


def request(method: str, envelope: object) -> bytes:
    return encode_request(method.encode(), cbor2.dumps(envelope))


SUBSCRIBE = request("events.subscribe", {})
ECHO = request("echo", {"req": {"message": MESSAGE, "delayMs": 0}})


class Peer(asyncio.BufferedProtocol):
    """Counts the frames the server sends: replies, events, and what drop notices say."""

    def __init__(self) -> None:
        self.replies = 0
        self.events = 0
        self.dropped = 0
        self.notices: list[dict[str, object]] = []
        self.changed = asyncio.Event()
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray(256 * KiB)
        self._pending = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)

    def buffer_updated(self, nbytes: int) -> None:
        data = self._pending
        data += self._buffer[:nbytes]
        pos, end = 0, len(data)
        while end - pos >= 8:
            ret, size = struct.unpack_from(">iI", data, pos)
            if end - pos - 8 < size:
                break
            if ret == RET_EVENT:
                self.events += 1
            elif ret == RET_EVENTS_DROPPED:
                notice = cbor2.loads(data[pos + 8 : pos + 8 + size])
                self.notices.append(notice)
                self.dropped += notice["dropped"]
            else:
                assert ret == RET_OK, bytes(data[pos : pos + 8 + size])
                self.replies += 1
            pos += 8 + size
        del data[:pos]
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.changed.set()

    async def until(self, done: object, what: str, timeout: float = 60) -> None:
        assert callable(done)
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"{what}: {self.events} events, {self.dropped} dropped, {self.replies} replies"
            ) from None

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


async def connect(address: str, *, rcvbuf: int | None = None) -> Peer:
    host, _, port = address.removeprefix("tcp:").rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connecting, so that the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    _, peer = await loop.create_connection(Peer, sock=sock)
    return peer


async def subscriber(address: str, *, stalled: bool) -> Peer:
    peer = await connect(address, rcvbuf=4 * KiB if stalled else None)
    peer.send(SUBSCRIBE)
    await peer.until(lambda: peer.replies == 1, "the subscribe reply")
    if stalled:
        assert peer.transport is not None
        peer.transport.pause_reading()
    return peer


async def fire_bursts(address: str, bursts: int) -> None:
    """Pipelined echoes, a burst at a time: each burst is sent whole, then its replies read."""
    pipeliners = [await connect(address) for _ in range(PIPELINERS)]
    try:
        for burst in range(1, bursts + 1):
            for peer in pipeliners:
                peer.send(ECHO * PER_BURST)
            for peer in pipeliners:
                await peer.until(lambda p=peer, n=burst: p.replies == n * PER_BURST, "echoes")
    finally:
        for peer in pipeliners:
            assert peer.transport is not None
            peer.transport.abort()


@pytest.mark.parametrize(
    ("budget", "bursts"),
    [(64 << 20, 10), (1 << 20, 3)],
    ids=["default budget", "1 MiB budget"],
)
async def test_stalled_subscribers_cost_reading_subscribers_no_events(
    budget: int, bursts: int
) -> None:
    fired = PIPELINERS * PER_BURST * bursts

    def accounted(peer: Peer) -> bool:
        return peer.events + peer.dropped >= fired

    async with ServerProcess("tcp:127.0.0.1:0", "--memory-budget", str(budget)) as server:
        stalled = [await subscriber(server.address, stalled=True) for _ in range(STALLED)]
        reading = [await subscriber(server.address, stalled=False) for _ in range(READING)]
        try:
            await fire_bursts(server.address, bursts)
            for peer in reading:
                await peer.until(lambda p=peer: accounted(p), "a reading subscriber")
            for peer in stalled:  # they read again: each is told what it lost
                assert peer.transport is not None
                peer.transport.resume_reading()
            for peer in stalled:
                await peer.until(lambda p=peer: accounted(p), "a stalled subscriber")
        finally:
            for peer in stalled + reading:
                assert peer.transport is not None
                peer.transport.abort()
    got = sorted(peer.events for peer in reading)
    lost = sorted(peer.dropped for peer in stalled)
    print(f"budget {budget >> 20} MiB, {fired} fired: reading subscribers got {got[0]}-{got[-1]}")
    print(f"stalled subscribers got {sorted(p.events for p in stalled)}, dropped {lost}")
    for peer in stalled + reading:  # nothing lost silently, nothing twice
        assert peer.events + peer.dropped == fired, (peer.events, peer.dropped)
        assert all(set(n) == {"dropped"} for n in peer.notices), peer.notices
    assert lost[0] > 0  # the stalled ones did lose: the share was full
    assert got[0] >= fired * 0.99, f"a reading subscriber got {got[0]} of {fired} events"
