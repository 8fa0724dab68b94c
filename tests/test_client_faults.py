"""The client against faulty servers: resets, stalls, black holes, huge replies.

The servers here are fakes on loopback sockets, so each fault is exact: a
server that answers some requests and resets, one that never reads, one that
reads and never answers. Each test runs on a loop it makes itself, asyncio
and uvloop, because the two transports fail in different places.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import cbor2
import pytest
import uvloop

from timer_sdk import (
    ConnectionLost,
    TimerClient,
)
from timer_sdk.framing import encode_reply, encode_request

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
LOOPS: dict[str, LoopFactory] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


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
