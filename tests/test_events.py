"""Events: in process, over the wire with the SDK, and with nothing but cbor2 and struct."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
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


async def _echo_run(client: TimerClient, n: int) -> float:
    started = time.perf_counter()
    for start in range(0, n, 500):
        await asyncio.gather(
            *(
                client.echo(EchoRequest(message=str(i), delay_ms=0))
                for i in range(start, start + 500)
            )
        )
    return time.perf_counter() - started


def _stalled_subscriber(path: str) -> socket.socket:
    """Subscribe on a socket that will never be read, with a tiny receive buffer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(path)
    sock.sendall(_frame("events.subscribe", {}))
    return sock


async def test_stalled_subscriber_costs_echo_callers_little_and_drops_are_reported(
    tmp_path: Path,
) -> None:
    # Two identical servers on this loop; only one has a subscriber that never reads.
    n = 10_000
    limits = Limits(max_event_queue=64)
    path = str(tmp_path / "stalled.sock")
    async with (
        await Timer().serve(f"unix:{tmp_path}/quiet.sock", limits=limits) as quiet,
        await Timer().serve(f"unix:{path}", limits=limits) as watched,
        await TimerClient.connect(quiet.address) as quiet_caller,
        await TimerClient.connect(watched.address) as watched_caller,
    ):
        stalled = _stalled_subscriber(path)
        await wait_until(lambda: watched.subscribers == 1)
        await _echo_run(watched_caller, n)  # fill every buffer: from here on it is stalled
        await _echo_run(quiet_caller, n)
        # Alternate the two so machine noise hits both alike; compare the best of each.
        with_sub, without = [], []
        for _ in range(5):
            without.append(await _echo_run(quiet_caller, n))
            with_sub.append(await _echo_run(watched_caller, n))
        ratio = min(without) / min(with_sub)
        print(f"echo throughput with a stalled subscriber: {ratio:.2f} of without")
        assert ratio >= 0.8
        # Now read: each of the 6 * n events was delivered or counted as dropped.
        stalled.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=stalled)
        assert (await _read_frame(reader))[0] == 0  # the subscribe reply
        fired = 6 * n
        delivered = dropped = 0
        while delivered + dropped < fired:
            ret, body = await _read_frame(reader)
            if ret == 16:
                delivered += 1
            else:
                assert ret == 17
                dropped += cbor2.loads(body)["dropped"]
        assert delivered + dropped == fired
        assert delivered > 0
        assert dropped == watched.stats.events_dropped > 0
        writer.close()
        await writer.wait_closed()
