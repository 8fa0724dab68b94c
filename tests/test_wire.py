"""protocol.md over real sockets: captured vectors byte for byte, every method, every error."""

from __future__ import annotations

import asyncio
from typing import Any

import cbor2
import pytest

from timer_sdk import EchoRequest, Server, TimerClient
from timer_sdk.wire.framing import encode_request

from .conftest import RawConnection, Reads
from .vectors import ECHO_REPLY, ECHO_REQUEST, VERSION_REPLY_OF_REFERENCE, VERSION_REQUEST

COMPLEX_FULL = {
    "req": {
        "messages": [{"message": "a", "delayMs": 1}, {"message": "b", "delayMs": 2}],
        "tags": ["x", "y"],
        "note": "n",
        "retries": 3,
    }
}
SCHEDULE: dict[str, dict[str, Any]] = {
    "job": {"name": "j", "payload": ["p"], "priority": 1},
    "retry": {"maxAttempts": 3, "backoffMs": 100, "retryOn": ["timeout"]},
    "schedule": {"startAtMs": 1000, "intervalMs": 500, "jitter": 7},
}


def frame(method: str, envelope: object) -> bytes:
    return encode_request(method.encode(), cbor2.dumps(envelope))


async def test_echo_vector_byte_for_byte(raw: RawConnection) -> None:
    await raw.send(ECHO_REQUEST)
    assert await raw.recv_exactly(len(ECHO_REPLY)) == ECHO_REPLY


async def test_version_vector_shape(raw: RawConnection) -> None:
    await raw.send(VERSION_REQUEST)
    ret, body = await raw.recv_reply()
    assert ret == 0
    assert cbor2.loads(body) == "timer-sdk v0.1.0"
    await raw.send(encode_request(b"version", b""))  # the empty payload is accepted too
    assert await raw.recv_reply() == (0, body)


async def test_client_request_bytes_match_the_vectors() -> None:
    """Capture what our client writes with a raw listener and compare with the reference."""
    received = bytearray()
    got_both = asyncio.Event()
    n = len(VERSION_REQUEST) + len(ECHO_REQUEST)

    async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while len(received) < n:
            received.extend(await reader.read(4096))
        got_both.set()
        writer.write(VERSION_REPLY_OF_REFERENCE + ECHO_REPLY)  # as the reference answers
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(capture, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]

    async with listener, await TimerClient.connect(f"tcp:127.0.0.1:{port}") as client:
        version, echo = await asyncio.gather(
            client.version(), client.echo(EchoRequest(message="hello over the wire", delay_ms=5))
        )
        await got_both.wait()
    assert bytes(received) == VERSION_REQUEST + ECHO_REQUEST
    assert version == "nim-timer v0.1.0"
    assert echo.timer_name == "ipc-server"


@pytest.mark.parametrize(
    ("method", "envelope", "expected"),
    [
        (
            "complex",
            COMPLEX_FULL,
            {"summary": "received 2 messages, note=n, retries=3", "itemCount": 2, "hasNote": True},
        ),
        (
            "complex",
            {"req": {"messages": [], "tags": [], "note": None, "retries": None}},
            {
                "summary": "received 0 messages, note=<none>, retries=0",
                "itemCount": 0,
                "hasNote": False,
            },
        ),
        (
            "schedule",
            SCHEDULE,
            {
                "jobId": "ipc-server:j",
                "willRunCount": 120,
                "firstRunAtMs": 1007,
                "effectiveBackoffMs": 100,
            },
        ),
    ],
)
async def test_decoded_replies_of_the_reference(
    raw: RawConnection, method: str, envelope: object, expected: object
) -> None:
    await raw.send(frame(method, envelope))
    ret, body = await raw.recv_reply()
    assert ret == 0
    assert cbor2.loads(body) == expected


ERRORS = [
    (frame("schedule", {**SCHEDULE, "job": {**SCHEDULE["job"], "name": ""}}),
     "job name must not be empty"),
    (frame("schedule", {**SCHEDULE, "retry": {**SCHEDULE["retry"], "maxAttempts": 0}}),
     "retry.maxAttempts must be positive"),
    (frame("nosuch", {}), "unknown method: nosuch"),
    (frame("echo", {}), "echo: invalid request: req: Field required"),
    (frame("echo", {"req": {"message": "m", "delayMs": 1, "x": 1}}),
     "echo: invalid request: req.x: Extra inputs are not permitted"),
    (frame("echo", {"req": {"message": "m", "delayMs": "1"}}),
     "echo: invalid request: req.delayMs: Input should be a valid integer"),
    (frame("echo", {"req": {"message": "m", "delayMs": 2**64 - 1}}),
     "echo: invalid request: req.delayMs: Input should be less than or equal to"),
    (encode_request(b"echo", cbor2.dumps({"req": {"message": "m", "delayMs": 1}}) + b"\x00"),
     "echo: invalid request: payload must be exactly one CBOR item"),
    (encode_request(b"echo", b""), "echo: invalid request: req: Field required"),
    (encode_request(b"version", b"\xc1\x00"), "version: invalid request: invalid CBOR: CBOR tag 1"),
    (encode_request(b"\xff", b"\xa0"), "method name is not valid UTF-8"),
    (frame("complex", {"req": {"messages": [{"message": "m"}], "tags": []}}),
     "complex: invalid request: req.messages.0.delayMs: Field required"),
]  # fmt: skip


@pytest.mark.parametrize(("request_bytes", "message"), ERRORS)
async def test_error_replies_keep_the_connection_and_others_alive(
    server: Server, raw: RawConnection, request_bytes: bytes, message: str
) -> None:
    other = await RawConnection.open(server.address)
    try:
        await raw.send(request_bytes + ECHO_REQUEST)
        ret, body = await raw.recv_reply()
        assert ret == 1
        assert message in body.decode()
        assert await raw.recv_exactly(len(ECHO_REPLY)) == ECHO_REPLY  # same connection
        await other.send(ECHO_REQUEST)
        assert await other.recv_exactly(len(ECHO_REPLY)) == ECHO_REPLY  # and another
    finally:
        await other.close()


async def test_frame_split_at_every_byte(
    server: Server, raw: RawConnection, server_reads: Reads
) -> None:
    # Two frames back to back, split into two writes at every position; the server
    # reads the first piece alone (it holds a partial frame) before the rest is sent.
    stream = VERSION_REQUEST + ECHO_REQUEST
    for cut in range(1, len(stream)):
        server_reads.sizes.clear()
        await raw.send(stream[:cut])
        await server_reads.until(cut)
        assert server_reads.sizes == [cut]
        [conn] = server.connections
        assert conn._reader.in_frame == (cut != len(VERSION_REQUEST))
        await raw.send(stream[cut:])
        assert (await raw.recv_reply())[0] == 0
        assert await raw.recv_exactly(len(ECHO_REPLY)) == ECHO_REPLY
        assert server_reads.total == len(stream)


async def test_byte_by_byte_writes(raw: RawConnection, server_reads: Reads) -> None:
    for sent, byte in enumerate(ECHO_REQUEST, 1):
        await raw.send(bytes([byte]))
        await server_reads.until(sent)
    assert await raw.recv_exactly(len(ECHO_REPLY)) == ECHO_REPLY
    assert server_reads.sizes == [1] * len(ECHO_REQUEST)  # one read per byte, as sent


async def test_oversized_frame_gets_an_error_and_the_stream_stays_in_sync(
    raw: RawConnection, server: Server
) -> None:
    limit = server.limits.max_frame_size
    await raw.send(encode_request(b"echo", b"\x00" * (limit + 1)) + ECHO_REQUEST)
    ret, body = await raw.recv_reply()
    assert ret == 1
    assert body.decode() == (
        f"echo: frame too large: payload of {limit + 1} bytes exceeds the limit of {limit} bytes"
    )
    assert await raw.recv_exactly(len(ECHO_REPLY)) == ECHO_REPLY


async def test_oversized_method_name_closes_cleanly(raw: RawConnection, server: Server) -> None:
    await raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await raw.at_eof()
    async with await TimerClient.connect(server.address) as client:
        assert await client.version()


@pytest.mark.parametrize("transport", ["tcp"])  # a TCP option: no Unix-socket run to skip
async def test_tcp_nodelay_is_set(server: Server, client: TimerClient) -> None:
    import socket

    assert server.address.startswith("tcp:")
    [conn] = server.connections
    transport = conn._transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
