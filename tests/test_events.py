"""Events: in process, over the wire with the SDK, and with nothing but cbor2 and struct."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from pathlib import Path

import cbor2
import pytest

from timer_sdk import (
    ConnectionLost,
    EchoEvent,
    EchoRequest,
    EventsDropped,
    Limits,
    Server,
    Timer,
    TimerClient,
)
from timer_sdk.serving.connection import event_frame

from .conftest import RawConnection, wait_until
from .vectors import ECHO_REPLY, ECHO_REQUEST


async def test_in_process_subscription_and_drop_notice() -> None:
    timer = Timer()
    async with timer.events(max_queue=3) as events:
        for i in range(5):
            await timer.echo(EchoRequest(message=str(i), delay_ms=0))
        items = [await anext(events) for _ in range(4)]
    assert items == [
        EventsDropped(2),
        EchoEvent(message="2", echo_count=1),
        EchoEvent(message="3", echo_count=1),
        EchoEvent(message="4", echo_count=1),
    ]
    assert events.dropped == 2
    assert events.closed
    await timer.echo(EchoRequest(message="after", delay_ms=0))
    assert [item async for item in events] == []  # unsubscribed: the stream is over


async def test_events_from_another_client_arrive_in_order(server: Server) -> None:
    n = 500
    async with (
        await TimerClient.connect(server.address) as listener,
        await TimerClient.connect(server.address) as caller,
        listener.events(max_queue=n) as events,
    ):
        await asyncio.gather(
            *(caller.echo(EchoRequest(message=f"m{i}", delay_ms=i % 3)) for i in range(n))
        )
        got = [await anext(events) for _ in range(n)]
        # echo fires when its delay ends, so order follows completion; compare as a set
        # of messages, and check exact order for the undelayed subset in a second pass.
        assert sorted(e.message for e in got if isinstance(e, EchoEvent)) == sorted(
            f"m{i}" for i in range(n)
        )
        for i in range(20):
            await caller.echo(EchoRequest(message=f"seq{i}", delay_ms=0))
        ordered = [await anext(events) for _ in range(20)]
        assert ordered == [EchoEvent(message=f"seq{i}", echo_count=1) for i in range(20)]
        # The subscriber's own calls still work, and its own echoes are events too.
        assert (await listener.echo(EchoRequest(message="own", delay_ms=0))).echoed == "own"
        assert await anext(events) == EchoEvent(message="own", echo_count=1)


async def test_two_subscriptions_on_one_client_and_unsubscribe(server: Server) -> None:
    async with await TimerClient.connect(server.address) as client:
        first = client.events()
        second = client.events()
        async with first, second:
            await client.echo(EchoRequest(message="both", delay_ms=0))
            assert await anext(first) == await anext(second)
            await first.aclose()
            await client.echo(EchoRequest(message="second only", delay_ms=0))
            assert (await anext(second)).message == "second only"  # type: ignore[union-attr]
        await wait_until(lambda: server.subscribers == 0)  # the last one unsubscribed
        assert await client.version()


async def test_closing_the_client_ends_the_stream(server: Server) -> None:
    client = await TimerClient.connect(server.address)
    async with client.events() as events:
        reader = asyncio.create_task(anext(events))
        await asyncio.sleep(0)
        await client.close()
        with pytest.raises(StopAsyncIteration):
            await reader


async def test_server_shutdown_raises_a_clear_connection_error(address: str) -> None:
    server = await Timer().serve(address)
    async with await TimerClient.connect(server.address) as client, client.events() as events:
        await server.close()
        with pytest.raises(ConnectionLost):
            await anext(events)


async def test_subscribing_to_a_server_without_events_fails_clearly() -> None:
    async def reference_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4 + len("events.subscribe") + 4 + 1)
        message = b"unknown method: events.subscribe"
        writer.write(struct.pack(">iI", 1, len(message)) + message)
        await writer.drain()
        await reader.read()
        writer.close()

    listener = await asyncio.start_server(reference_like, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with listener, await TimerClient.connect(f"tcp:127.0.0.1:{port}") as client:
        from timer_sdk import RemoteCallError

        with pytest.raises(RemoteCallError, match=r"unknown method: events\.subscribe"):
            async with client.events():
                pass


async def test_non_subscribers_see_the_base_protocol_byte_for_byte(server: Server) -> None:
    raw = await RawConnection.open(server.address)
    try:
        async with await TimerClient.connect(server.address) as sub, sub.events() as events:
            for _ in range(5):
                await raw.send(ECHO_REQUEST)
                assert await raw.recv_exactly(len(ECHO_REPLY)) == ECHO_REPLY
            assert [(await anext(events)).message for _ in range(5)] == [  # type: ignore[union-attr]
                "hello over the wire"
            ] * 5
    finally:
        await raw.close()


def _frame(method: str, item: object) -> bytes:
    payload = cbor2.dumps(item)
    name = method.encode()
    return struct.pack(">I", len(name)) + name + struct.pack(">I", len(payload)) + payload


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    ret, size = struct.unpack(">iI", await reader.readexactly(8))
    return ret, await reader.readexactly(size)


async def test_raw_subscriber_with_only_cbor2_following_the_doc(server: Server) -> None:
    """Subscribe as docs/protocol.md says, with struct and cbor2 and no SDK code."""
    kind, _, rest = server.address.partition(":")
    if kind == "unix":
        reader, writer = await asyncio.open_unix_connection(rest)
    else:
        host, _, port = rest.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(_frame("events.subscribe", {"events": ["on_echo_fired"]}))
        assert await _read_frame(reader) == (0, cbor2.dumps({"events": ["on_echo_fired"]}))
        async with await TimerClient.connect(server.address) as caller:
            await caller.echo(EchoRequest(message="to a raw subscriber", delay_ms=0))
        ret, body = await _read_frame(reader)
        assert ret == 16
        assert cbor2.loads(body) == {
            "event": "on_echo_fired",
            "data": {"message": "to a raw subscriber", "echoCount": 1},
        }
        writer.write(_frame("events.unsubscribe", {}))
        assert await _read_frame(reader) == (0, cbor2.dumps(None))
        writer.write(_frame("events.subscribe", {"events": ["nope"]}))
        ret, body = await _read_frame(reader)
        assert ret == 1
        assert body.decode().startswith("events.subscribe: invalid request")
    finally:
        writer.close()
        await writer.wait_closed()


async def _echo_batch(client: TimerClient, start: int, n: int = 500) -> None:
    await asyncio.gather(
        *(client.echo(EchoRequest(message=str(i), delay_ms=0)) for i in range(start, start + n))
    )


def _stalled_subscriber(path: str) -> socket.socket:
    """Subscribe on a socket that will not be read, with a tiny receive buffer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(path)
        sock.sendall(_frame("events.subscribe", {}))
    except BaseException:
        sock.close()
        raise
    return sock


async def test_a_stalled_subscriber_costs_no_encoding_and_bounded_memory_and_drops_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Count what the server does for a subscriber that stopped reading; no speed ratio.

    Throughput with and without such a subscriber is the benchmark's business.
    """
    encoded: list[EchoEvent] = []

    def counting_event_frame(event: EchoEvent) -> bytes:
        encoded.append(event)
        return event_frame(event)

    monkeypatch.setattr("timer_sdk.server.event_frame", counting_event_frame)
    bound = 64
    path = str(tmp_path / "stalled.sock")
    async with (
        await Timer().serve(f"unix:{path}", limits=Limits(max_event_queue=bound)) as server,
        await TimerClient.connect(server.address, timeout=60) as caller,
    ):
        await wait_until(lambda: len(server.connections) == 1)  # the caller's
        callers = set(server.connections)
        stalled = _stalled_subscriber(path)
        writer: asyncio.StreamWriter | None = None
        try:
            await wait_until(lambda: server.subscribers == 1)
            [conn] = server.connections - callers
            fired = 0
            # Fill the socket buffers and the transport's: the connection pauses writing.
            async with asyncio.timeout(60):
                while not conn.events_paused:
                    await _echo_batch(caller, fired)
                    fired += 500
            transport = conn._transport
            assert transport is not None
            buffered = transport.get_write_buffer_size()
            dropped_before = server.stats.events_dropped
            held_before = len(conn._backlog)
            encoded.clear()
            # While it stays stalled, events cost it no encoding and no memory past the bound,
            # and the reading subscriber gets each one encoded once.
            async with caller.events(max_queue=10_000) as live:
                for _ in range(6):
                    await _echo_batch(caller, fired)
                    fired += 500
                    assert conn.events_paused
                    assert transport.get_write_buffer_size() == buffered
                    assert len(conn._backlog) == bound
                got = [await anext(live) for _ in range(3000)]
            assert got == [
                EchoEvent(message=str(i), echo_count=1) for i in range(fired - 3000, fired)
            ]
            assert encoded == got  # once each, for the reader; never for the stalled one
            assert server.stats.events_dropped - dropped_before == 3000 - (bound - held_before)
            # Now read: each event fired was delivered or counted in a drop notice.
            stalled.setblocking(False)
            reader, writer = await asyncio.open_unix_connection(sock=stalled)
            assert (await _read_frame(reader))[0] == 0  # the subscribe reply
            delivered = dropped = 0
            notices = []
            seen: list[int | None] = []  # each event's number; None for the drop notice
            async with asyncio.timeout(60):
                while delivered + dropped < fired:
                    ret, body = await _read_frame(reader)
                    if ret == 16:
                        delivered += 1
                        seen.append(int(cbor2.loads(body)["data"]["message"]))
                    else:
                        assert ret == 17
                        notices.append(cbor2.loads(body)["dropped"])
                        dropped += notices[-1]
                        seen.append(None)
            assert delivered + dropped == fired
            assert dropped == server.stats.events_dropped == sum(notices) > 0
            assert len(notices) == 1  # one notice, sent when the subscriber read again
            # What was sent before the stall, the notice, then the held events, newest last:
            # the notice stands where the lost events would have been.
            gap = seen.index(None)
            assert seen[:gap] == list(range(gap))
            assert seen[gap + 1 :] == list(range(gap + dropped, fired))
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            else:
                stalled.close()
