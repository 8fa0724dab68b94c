"""The server's lifetime and bounds: close with calls in flight, backpressure, unix sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import cbor2
import pytest

from timer_sdk import (
    EchoRequest,
    Limits,
    RemoteCallError,
    Server,
    Timer,
    TimerClient,
    TimerConnectionError,
)
from timer_sdk.wire.framing import encode_request

from .conftest import GatedTimer, RawConnection, wait_until


async def test_close_answers_calls_in_flight(address: str) -> None:
    server = await Timer().serve(address)
    client = await TimerClient.connect(server.address)
    calls = [
        asyncio.create_task(client.echo(EchoRequest(message=str(i), delay_ms=50 + i)))
        for i in range(50)
    ]
    await wait_until(lambda: len(server.tasks) == 50)
    await server.close()
    replies = await asyncio.gather(*calls)
    assert [r.echoed for r in replies] == [str(i) for i in range(50)]
    with pytest.raises(TimerConnectionError):
        await client.version()
    await client.close()
    with pytest.raises(TimerConnectionError):
        await TimerClient.connect(server.address)


async def test_close_timeout_cancels_with_an_error_reply(address: str) -> None:
    server = await Timer().serve(address)
    client = await TimerClient.connect(server.address)
    slow = asyncio.create_task(client.echo(EchoRequest(message="s", delay_ms=60_000)))
    await wait_until(lambda: len(server.tasks) == 1)
    await server.close(timeout=0.05)
    with pytest.raises(RemoteCallError, match="echo: cancelled: the server is shutting down"):
        await slow  # a clear error, never a hang
    with pytest.raises(TimerConnectionError):
        await client.version()
    await client.close()


async def test_in_flight_bound_pauses_reading(address: str) -> None:
    limits = Limits(max_in_flight=4)
    timer = GatedTimer()
    async with await timer.serve(address, limits=limits) as server:
        raw = await RawConnection.open(server.address)
        try:
            frames = [
                encode_request(b"echo", cbor2.dumps({"req": {"message": f"m{i}", "delayMs": 0}}))
                for i in range(10)
            ]
            await raw.send(b"".join(frames))
            await wait_until(lambda: len(server.tasks) == 4)
            [conn] = server.connections
            assert conn._reading_paused
            # The gate holds the four: a few loop turns later the other six are still not
            # dispatched, whatever the server read.
            for _ in range(20):
                await asyncio.sleep(0)
            assert server.stats.requests == 4
            timer.gate.set()
            for i in range(10):
                ret, body = await raw.recv_reply()
                assert (ret, cbor2.loads(body)["echoed"]) == (0, f"m{i}")
            assert server.stats.requests == 10
        finally:
            await raw.close()


async def test_max_connections(address: str) -> None:
    server = await Timer().serve(address, limits=Limits(max_connections=2))
    async with (
        server,
        await TimerClient.connect(server.address) as a,
        await TimerClient.connect(server.address) as b,
    ):
        await wait_until(lambda: len(server.connections) == 2)
        third = await RawConnection.open(server.address)
        assert await third.at_eof()
        await third.close()
        assert server.stats.connections_refused == 1
        assert await a.version() == await b.version()


async def test_unix_socket_mode_and_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    async with await Timer().serve(f"unix:{path}") as server:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(OSError, match="already listening"):
            await Timer().serve(f"unix:{path}")
        async with await TimerClient.connect(server.address) as client:
            assert await client.version()
    assert not path.exists()


async def test_unix_refuses_to_replace_a_file(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        await Timer().serve(f"unix:{path}")
    assert path.read_text() == "keep me"


async def test_port_zero_reports_the_bound_port() -> None:
    async with await Timer().serve("tcp:127.0.0.1:0") as server:
        port = int(server.address.rsplit(":", 1)[1])
        assert port > 0
        async with await TimerClient.connect(f"tcp:127.0.0.1:{port}") as client:
            assert await client.version()


async def test_serve_forever_ends_on_close(server: Server) -> None:
    forever = asyncio.create_task(server.serve_forever())
    await asyncio.sleep(0)
    await server.close()
    await asyncio.wait_for(forever, 5)
