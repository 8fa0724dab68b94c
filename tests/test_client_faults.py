"""The client against faulty servers: resets, stalls, black holes, huge replies.

The servers here are fakes on loopback sockets, so each fault is exact: a
server that answers some requests and resets, one that never reads, one that
reads and never answers. Each test runs on a loop it makes itself, asyncio
and uvloop, because the two transports fail in different places.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import cbor2
import pytest

from timer_sdk import (
    CallTimeout,
    ConnectionLost,
    EchoRequest,
    ProtocolError,
    Timer,
    TimerClient,
)
from timer_sdk.client import DEFAULT_MAX_PENDING
from timer_sdk.wire.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    RequestReader,
    encode_reply,
    encode_request,
)

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
LOOPS: dict[str, LoopFactory] = {"asyncio": asyncio.new_event_loop}
with contextlib.suppress(ImportError):  # the fast extra
    import uvloop

    LOOPS["uvloop"] = uvloop.new_event_loop


@pytest.fixture(params=sorted(LOOPS))
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def run(loop_name: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    """Run a test body on a fresh loop of the requested kind."""
    factory = LOOPS[loop_name]

    def runner(body: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as r:
            r.run(body)

    return runner


def listener(transport: str, tmp_path: Path) -> tuple[socket.socket, str]:
    """A listening socket of the requested kind, and its address for the client."""
    if transport == "unix":
        path = str(tmp_path / "fake.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen()
        return sock, f"unix:{path}"
    sock = socket.create_server(("127.0.0.1", 0))
    return sock, f"tcp:127.0.0.1:{sock.getsockname()[1]}"


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 65536))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def request_payload(i: int) -> bytes:
    return cbor2.dumps(f"q{i:06d}")  # every request frame has the same size


def reply_body(i: int) -> bytes:
    return cbor2.dumps(f"r{i:06d}")


# --- item 5: a write error does not lose replies that arrived -------------------


def test_replies_before_a_reset_are_delivered(
    run: Callable[[Coroutine[Any, Any, None]], None], transport: str, tmp_path: Path
) -> None:
    calls, answered = 1000, 600
    frame_len = len(encode_request(b"echo", request_payload(0)))
    server, address = listener(transport, tmp_path)
    read_them = threading.Event()
    go = threading.Event()
    written: list[int] = []

    def answer_some_then_reset() -> None:
        conn, _ = server.accept()
        with conn:
            recv_exactly(conn, answered * frame_len)
            read_them.set()
            go.wait(30)
            conn.sendall(b"".join(encode_reply(0, reply_body(i)) for i in range(answered)))
            written.append(answered)
            # Requests we never read are still queued: closing now resets.
            assert conn.recv(1, socket.MSG_PEEK)

    async def body() -> None:
        thread = threading.Thread(target=answer_some_then_reset)
        thread.start()
        client = await TimerClient.connect(address)
        try:
            tasks = [
                asyncio.create_task(client.call_raw("echo", request_payload(i)))
                for i in range(calls)
            ]
            assert await asyncio.to_thread(read_them.wait, 30)
            # Block this loop while the server answers and resets, so the
            # replies sit unread when the next call's write fails.
            go.set()
            thread.join(30)
            fd = client._protocol.transport.get_extra_info("socket").fileno()  # type: ignore[union-attr]
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            assert any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(10_000))
            # This call's write fails in this very step, before the loop reads.
            with pytest.raises(ConnectionLost):
                await client.call_raw("echo", request_payload(calls))
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await client.close()
        assert written == [answered]
        delivered = [r for r in results if isinstance(r, bytes)]
        assert delivered == [reply_body(i) for i in range(answered)]
        lost = results[answered:]
        assert all(isinstance(r, ConnectionLost) for r in lost), {type(r) for r in lost}

    with server:
        run(body())


# --- item 9: backpressure ---------------------------------------------------------


@contextlib.asynccontextmanager
async def deaf_server(transport: str, tmp_path: Path) -> AsyncIterator[tuple[str, Any]]:
    """A server that accepts one connection and reads nothing until asked.

    Yields the address and ``drain()``, which reads to EOF and returns the
    number of bytes the client wrote in all.
    """
    server, address = listener(transport, tmp_path)
    server.setblocking(False)
    loop = asyncio.get_running_loop()
    accepted: asyncio.Task[tuple[socket.socket, Any]] = asyncio.create_task(
        loop.sock_accept(server)
    )

    async def drain() -> int:
        conn, _ = await accepted
        total = 0
        while chunk := await loop.sock_recv(conn, 1 << 20):
            total += len(chunk)
        return total

    try:
        yield address, drain
    finally:
        if accepted.done():
            accepted.result()[0].close()
        accepted.cancel()
        server.close()


async def flood(
    client: TimerClient, payload: bytes, *, waves: int, per_wave: int
) -> tuple[int, int]:
    """Make waves of 1 ms calls to a server that does not read.

    Return the most pending calls and write-buffer bytes seen after any
    wave; fail fast, in the wave where either grows past what the test allows.
    """
    transport = client._protocol.transport
    assert transport is not None
    most_pending = most_buffered = 0
    for _ in range(waves):
        results = await asyncio.gather(
            *(client.call_raw("echo", payload, timeout=0.001) for _ in range(per_wave)),
            return_exceptions=True,
        )
        assert all(isinstance(r, CallTimeout) for r in results), {type(r) for r in results}
        assert not client._protocol._queue  # calls that gave up left nothing queued
        most_pending = max(most_pending, client.pending)
        most_buffered = max(most_buffered, transport.get_write_buffer_size())
        assert most_pending <= client._protocol.max_pending
        assert most_buffered <= 1 << 20, f"{most_buffered} bytes buffered"
    return most_pending, most_buffered


def test_calls_to_a_stopped_server_hold_bounded_slots(
    run: Callable[[Coroutine[Any, Any, None]], None],
    loop_name: str,
    transport: str,
    tmp_path: Path,
) -> None:
    payload = request_payload(0)
    frame_len = len(encode_request(b"echo", payload))
    # The bound is reached in the first wave; the later ones show it holds while calls
    # keep timing out. 20,000 calls on one pair, 10,000 on the others.
    waves = 20 if (loop_name, transport) == ("asyncio", "tcp") else 10

    async def body() -> None:
        async with deaf_server(transport, tmp_path) as (address, drain):
            client = await TimerClient.connect(address)
            assert client._protocol.max_pending == DEFAULT_MAX_PENDING
            most_pending, _ = await flood(client, payload, waves=waves, per_wave=1000)
            assert most_pending == DEFAULT_MAX_PENDING  # it filled up, and no further
            # Every request the server will ever see holds a slot; the calls
            # that timed out waiting for one wrote nothing.
            held = client.pending
            received = asyncio.create_task(drain())
            await client.close()
            assert await received == held * frame_len

    run(body())


def test_a_full_write_buffer_holds_new_calls(
    run: Callable[[Coroutine[Any, Any, None]], None], transport: str, tmp_path: Path
) -> None:
    payload = cbor2.dumps(b"x" * 16384)
    frame_len = len(encode_request(b"echo", payload))

    async def body() -> None:
        async with deaf_server(transport, tmp_path) as (address, drain):
            # Slots do not bind here: only the write buffer does.
            client = await TimerClient.connect(address, max_pending=200_000)
            most_pending, _ = await flood(client, payload, waves=20, per_wave=500)
            assert client._protocol.blocked  # paused by a full buffer
            # The kernel's socket buffers hold some MB; without backpressure
            # these 10,000 calls would have queued 160 MB.
            assert most_pending * frame_len < 64 << 20
            held = client.pending
            received = asyncio.create_task(drain())
            while client._protocol.transport.get_write_buffer_size():  # type: ignore[union-attr]
                await asyncio.sleep(0.001)
            await client.close()
            assert await received == held * frame_len

    run(body())


async def test_waiting_calls_take_free_slots_in_order() -> None:
    timer = Timer()
    seen: list[str] = []
    timer.add_echo_listener(lambda e: seen.append(e.message))
    async with (
        await timer.serve("tcp:127.0.0.1:0") as server,
        await TimerClient.connect(server.address, max_pending=2) as client,
    ):
        calls = [
            asyncio.create_task(client.echo(EchoRequest(message=f"m{i}", delay_ms=20)))
            for i in range(10)
        ]
        await asyncio.sleep(0)
        assert client.pending == 2
        for i in (3, 5, 7):  # cancelled while waiting for a slot: never sent
            calls[i].cancel()
        results = await asyncio.gather(*calls, return_exceptions=True)
        kept = [i for i in range(10) if i not in (3, 5, 7)]
        assert [r.echoed for r in results if not isinstance(r, BaseException)] == [
            f"m{i}" for i in kept
        ]
        assert seen == [f"m{i}" for i in kept]
        assert client.pending == 0


async def test_connect_refuses_bad_backpressure_settings() -> None:
    with pytest.raises(ValueError, match="max_pending must be a positive int, not 0"):
        await TimerClient.connect("tcp:127.0.0.1:1", max_pending=0)
    with pytest.raises(ValueError, match="dead_after must be a positive number"):
        await TimerClient.connect("tcp:127.0.0.1:1", dead_after=-1)


# --- item 9: liveness ---------------------------------------------------------------


def test_a_black_holed_connection_is_declared_dead(
    run: Callable[[Coroutine[Any, Any, None]], None], transport: str, tmp_path: Path
) -> None:
    async def body() -> None:
        path = str(tmp_path / "hole.sock")
        connections = 0
        hole_closed = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            if connections == 1:  # the black hole: reads everything, answers nothing
                with contextlib.suppress(ConnectionError):
                    while await reader.read(65536):
                        pass
                hole_closed.set()
            else:  # the reconnection: answers every request
                frames = RequestReader()
                while data := await reader.read(65536):
                    frames.receive_data(data)
                    while frames.next_event() is not None:
                        writer.write(encode_reply(0, cbor2.dumps("alive")))
            writer.close()

        if transport == "unix":
            srv = await asyncio.start_unix_server(serve, path)
            address = f"unix:{path}"
        else:
            srv = await asyncio.start_server(serve, "127.0.0.1", 0)
            address = f"tcp:127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        async with srv:
            client = await TimerClient.connect(
                address, dead_after=0.2, reconnect=True, max_pending=2
            )
            started = time.monotonic()
            # Two calls are written; the third waits for a slot and fails with them.
            calls = [asyncio.create_task(client.version()) for _ in range(3)]
            for call in calls:
                with pytest.raises(ConnectionLost, match=r"declared dead: nothing received"):
                    await call
            waited = time.monotonic() - started
            assert 0.15 <= waited < 10  # uvloop's clock ticks in ms
            await asyncio.wait_for(hole_closed.wait(), 10)  # the socket was aborted
            assert await client.version() == "alive"  # reconnected
            await client.close()
            srv.close()

    run(body())


async def test_a_slow_connection_that_makes_progress_lives(tmp_path: Path) -> None:
    async with (
        await Timer().serve(f"unix:{tmp_path}/t.sock") as server,
        await TimerClient.connect(server.address, dead_after=0.4) as client,
    ):
        # Each reply comes 40 ms after the last one: 0.8 s in all, never 0.4 s of silence.
        replies = await asyncio.gather(
            *(client.echo(EchoRequest(message=str(i), delay_ms=40 * i)) for i in range(21))
        )
        assert [r.echoed for r in replies] == [str(i) for i in range(21)]
        await asyncio.sleep(0.6)  # idle: no call waits, so no silence counts
        assert await client.version()
        assert not client.closed


# --- item 7: the reply size limit --------------------------------------------------


async def test_reply_body_limit_is_the_default_frame_size() -> None:
    sizes = [DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_FRAME_SIZE + 1]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = RequestReader()
        while data := await reader.read(65536):
            frames.receive_data(data)
            while frames.next_event() is not None:
                writer.write(encode_reply(0, b"\x00" * sizes.pop(0)))
        writer.close()

    async with await asyncio.start_server(serve, "127.0.0.1", 0) as srv:
        address = f"tcp:127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        async with await TimerClient.connect(address) as client:
            body = await client.call_raw("version", timeout=30)
            assert len(body) == DEFAULT_MAX_FRAME_SIZE  # the most a default server sends
            with pytest.raises(
                ProtocolError, match=r"reply body of 1048577 bytes exceeds the limit of 1048576"
            ):
                await client.call_raw("version", timeout=30)
