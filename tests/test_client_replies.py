"""Reply dispatch: whole reads, and reads that end or start inside a frame, settle alike.

A scripted server on loopback sends exactly the bytes each test needs. Replies
that arrive with nothing buffered are settled straight from the read; a read
that leaves part of a frame behind sends everything after it through the
reader. Both must give every call its own reply, error or refusal.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import cbor2
import pytest

from timer_sdk import ConnectionLost, ProtocolError, RemoteCallError, TimerClient
from timer_sdk.wire.codec import DecodeError
from timer_sdk.wire.framing import RET_EVENT, encode_reply, encode_request

from .conftest import wait_until

VERSION_FRAME = encode_request(b"version", b"\xa0")

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def ok(text: str) -> bytes:
    return encode_reply(0, cbor2.dumps(text))


@asynccontextmanager
async def scripted(script: Script, *, max_pending: int = 1024) -> AsyncIterator[TimerClient]:
    """A client connected to a server that runs ``script`` on its one connection."""
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
            await reader.read()  # until the client closes
        finally:
            writer.close()
            done.set()

    async with await asyncio.start_server(handle, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        address = f"tcp:127.0.0.1:{port}"
        async with await TimerClient.connect(address, max_pending=max_pending) as client:
            yield client
        await done.wait()


def start_calls(client: TimerClient, count: int) -> list[asyncio.Task[str]]:
    """Start ``count`` version calls; tasks run in order, so they are written in order."""
    return [asyncio.create_task(client.version()) for _ in range(count)]


async def test_replies_after_a_partial_frame_go_through_the_reader() -> None:
    first = ok("v1")
    error = encode_reply(1, b"boom")
    tail = encode_reply(0, cbor2.dumps(5)) + ok("dropped") + ok("v5")
    partial = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5 * len(VERSION_FRAME))
        writer.write(first + error[:3])  # ends three bytes into the second reply
        await partial.wait()
        writer.write(error[3:] + tail)

    async with scripted(script) as client:
        calls = start_calls(client, 5)
        assert await calls[0] == "v1"
        await wait_until(lambda: client._protocol.reader.buffered == 3)
        calls[3].cancel()  # its reply arrives, and is dropped in its place
        partial.set()
        with pytest.raises(RemoteCallError, match="boom"):
            await calls[1]
        with pytest.raises(DecodeError, match="version: invalid reply"):
            await calls[2]
        with pytest.raises(asyncio.CancelledError):
            await calls[3]
        assert await calls[4] == "v5"


TEXTS = ["a", "bb", "ccc"]
REPLIES = b"".join(ok(text) for text in TEXTS)


@pytest.mark.parametrize("cut", range(1, len(REPLIES)))
async def test_a_read_split_anywhere_in_the_heads_and_bodies(cut: int) -> None:
    ends = [len(b"".join(map(ok, TEXTS[: i + 1]))) for i in range(len(TEXTS))]
    settled = sum(end <= cut for end in ends)
    held = cut - max([0, *(end for end in ends if end <= cut)])
    step = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(TEXTS) * len(VERSION_FRAME))
        writer.write(REPLIES[:cut])
        await step.wait()
        writer.write(REPLIES[cut:])

    async with scripted(script) as client:
        calls = start_calls(client, len(TEXTS))
        await wait_until(
            lambda: (
                sum(call.done() for call in calls) == settled
                and client._protocol.reader.buffered == held
            )
        )
        step.set()
        assert await asyncio.gather(*calls) == TEXTS


async def test_a_return_code_the_client_does_not_know_is_skipped() -> None:
    # nim-ffi's "still running" (3) before a reply, a code of nobody's (7), a negative one.
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(3 * len(VERSION_FRAME))
        writer.write(ok("v1") + encode_reply(7, b"") + ok("v2") + encode_reply(3, b"still"))
        writer.write(encode_reply(-2, b"?") + ok("v3"))

    async with scripted(script) as client:
        assert await asyncio.gather(*start_calls(client, 3)) == ["v1", "v2", "v3"]
        assert not client.closed


async def test_a_reply_nobody_waits_for_fails_the_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(VERSION_FRAME))
        writer.write(ok("v1") + ok("extra"))

    async with scripted(script) as client:
        assert await client.version() == "v1"
        await wait_until(lambda: client._protocol.failure is not None)
        with pytest.raises(ProtocolError, match="a reply arrived with no call waiting"):
            await client.version()


async def test_an_event_nobody_asked_for_is_skipped_as_an_unknown_code() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(2 * len(VERSION_FRAME))
        writer.write(ok("v1") + encode_reply(RET_EVENT, b"\xa0") + ok("v2"))

    async with scripted(script) as client:
        assert await asyncio.gather(*start_calls(client, 2)) == ["v1", "v2"]
        assert not client.closed


async def test_a_connection_lost_mid_frame_fails_the_rest() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(2 * len(VERSION_FRAME))
        writer.write(ok("v1") + ok("v2")[:5])
        writer.close()

    async with scripted(script) as client:
        calls = start_calls(client, 2)
        assert await calls[0] == "v1"
        with pytest.raises(ConnectionLost):
            await calls[1]


async def test_a_held_call_that_gave_up_is_not_sent_when_room_comes() -> None:
    received = bytearray()
    answer = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.readexactly(len(VERSION_FRAME)))
        await answer.wait()
        writer.write(ok("v1"))
        received.extend(await reader.read())  # anything more, until the client closes

    async with scripted(script, max_pending=1) as client:
        first, second = start_calls(client, 2)
        protocol = client._protocol
        await wait_until(lambda: len(protocol.pending) == len(protocol._queue) == 1)
        second.cancel()  # its future is done now; its unqueue callback runs later
        protocol.max_pending = 2
        protocol._admit()  # room comes before that callback: the call must not go
        assert not protocol._queue and len(protocol.pending) == 1
        answer.set()
        assert await first == "v1"
        with pytest.raises(asyncio.CancelledError):
            await second
    assert bytes(received) == VERSION_FRAME
