"""The budget's rarer paths on an in-process server with a small budget.

Each test drives real sockets and reads ``server.stats`` for what the budget
did: backlogs that give way when the server is full, a wait that times out
before a frame's header is whole, procs that end after their caller left,
and the receive reader's arithmetic for grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from pathlib import Path

import cbor2
import pytest

from timer_sdk import (
    EchoEvent,
    EchoRequest,
    EchoResponse,
    Limits,
    Server,
    Timer,
    TimerClient,
)
from timer_sdk.bus import EventBus, EventSink, EventSource
from timer_sdk.server import _BusSink
from timer_sdk.serving.endings import _hung_up
from timer_sdk.wire.codec import DecodeError
from timer_sdk.wire.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    RET_ERROR,
    RET_EVENT,
    RET_EVENTS_DROPPED,
    RET_OK,
    RequestReader,
)
from timer_sdk.wire.framing import encode_request as request

from .conftest import GatedTimer, RawConnection, Reads, wait_until

KiB = 1024
MiB = 1024 * KiB


def echo(message: str, delay_ms: int) -> bytes:
    return request(b"echo", cbor2.dumps({"req": {"message": message, "delayMs": delay_ms}}))


def stalled_subscriber(path: str) -> socket.socket:
    """Subscribe on a socket that will not be read, with a tiny receive buffer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(path)
    sock.sendall(request(b"events.subscribe", b"\xa0"))
    return sock


async def fill_until_paused(server: Server, caller: TimerClient) -> int:
    """Fire echoes until the server pauses writing to the one subscriber; return how many."""
    await wait_until(lambda: server.subscribers == 1)
    fired = 0
    async with asyncio.timeout(30):
        while not any(c.events_paused for c in server.connections):
            await caller.echo(EchoRequest(message="x" * 8 * KiB, delay_ms=0))
            fired += 1
    return fired


# --- frame_needs: what a grant covers ------------------------------------------


@pytest.mark.parametrize(
    ("fed", "needs"),
    [
        (b"", 0),  # between frames
        (b"\0\0", 8 + 16 - 2),  # before the method length: the longest header
        (b"\0\0\0\4ec", 8 + 4 - 6),  # the rest of the header
        (b"\0\0\1\0", 0),  # a method name over the limit: the connection will close
        (b"\0\0\0\4echo\0\0\1\0", 0),  # a payload over the limit is skipped, never held
        (b"\0\0\0\4echo\0\0\0\x10abc", 16 - 3),  # the rest of the payload
        (b"\0\0\0\4echo\0\0\0\1\xa0", 0),  # whole: nothing to come
    ],
)
def test_frame_needs_counts_the_bytes_still_to_come(fed: bytes, needs: int) -> None:
    reader = RequestReader(max_frame_size=64, max_method_length=16)
    reader.receive_data(fed)
    assert reader.frame_needs == needs


def test_frame_needs_is_zero_while_a_refused_payload_is_skipped() -> None:
    reader = RequestReader(max_frame_size=4)
    reader.receive_data(request(b"echo", b"\xa0" * 10)[:12])
    assert reader.next_event() is not None  # refused: the rest is skipped as it comes
    assert reader.frame_needs == 0


def test_a_long_validation_message_is_cut_to_a_few_hundred_characters() -> None:
    from timer_sdk.wire.api import ECHO

    key = "k" * 1000
    payload = cbor2.dumps({"req": {"message": "m", "delayMs": 0, key: 1}})
    with pytest.raises(DecodeError) as caught:
        ECHO.decode_params(payload)
    assert len(str(caught.value)) < 400 and str(caught.value).endswith("...")


# --- a server that is full ------------------------------------------------------


async def test_held_events_give_way_when_the_server_is_full_then_are_reclaimed(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "s.sock")
    limits = Limits(memory_budget=1 * MiB, frame_timeout=30)
    async with (
        await Timer().serve(f"unix:{path}", limits=limits) as server,
        await TimerClient.connect(server.address, timeout=30) as caller,
    ):
        stalled = stalled_subscriber(path)
        try:
            await wait_until(lambda: server.subscribers == 1)
            # Large events fill the stalled subscriber's buffers, then its backlog: more
            # than the whole budget, so the backlog gives way as it grows.
            for n in range(40):
                await caller.echo(EchoRequest(message=f"{n}" * 60 * KiB, delay_ms=0))
            assert server.stats.events_dropped > 0
            assert server.budget.used <= limits.memory_budget + 64 * KiB
            assert server.budget.events <= server.budget.event_share + 64 * KiB
            held = sum(len(c._backlog) for c in server.connections)
            assert held > 0
            # A connection that must wait for room takes it from the backlog first.
            blocker = await RawConnection.open(server.address)
            try:
                await blocker.send(echo("b" * (300 * KiB), 2000) * 3)
                await wait_until(lambda: server.stats.budget_waits > 0)
                assert sum(len(c._backlog) for c in server.connections) == 0  # reclaimed
                waiter = await RawConnection.open(server.address)
                try:
                    await waiter.send(echo("w", 0))
                    ret, _ = await waiter.recv_reply()
                    assert ret == RET_OK
                finally:
                    await waiter.close()
            finally:
                await blocker.close()
        finally:
            stalled.close()


async def test_a_subscriber_that_falls_behind_briefly_gets_its_events_without_a_notice(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "s.sock")
    async with (
        await Timer().serve(f"unix:{path}") as server,
        await TimerClient.connect(server.address, timeout=30) as caller,
    ):
        sock = stalled_subscriber(path)
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        try:
            fired = await fill_until_paused(server, caller)
            for _ in range(3):  # held, far under every bound: none is dropped
                await caller.echo(EchoRequest(message="held", delay_ms=0))
                fired += 1
            rets: list[int] = []
            async with asyncio.timeout(30):
                while len([r for r in rets if r == RET_EVENT]) < fired:
                    head = await reader.readexactly(8)
                    await reader.readexactly(int.from_bytes(head[4:], "big"))
                    rets.append(int.from_bytes(head[:4], "big", signed=True))
            assert RET_EVENTS_DROPPED not in rets
            assert server.stats.events_dropped == 0
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def test_a_slow_peer_is_closed_only_after_its_whole_requests_are_answered() -> None:
    # As HTTP/2's GOAWAY: the frame deadline closes the connection, but the echo
    # received whole before the partial frame still gets its reply first.
    limits = Limits(frame_timeout=0.3)
    async with await Timer().serve(limits=limits) as server:
        conn = await RawConnection.open(server.address)
        try:
            await conn.send(echo("whole", 1000) + echo("partial", 0)[:10])
            assert await conn.recv_reply() == (
                RET_OK,
                cbor2.dumps({"echoed": "whole", "timerName": server.timer.name}),
            )
            assert await conn.at_eof()
            assert server.stats.frame_timeouts == 1
            assert server.stats.orphans_cancelled == 0
        finally:
            await conn.close()


async def test_the_frame_deadline_does_not_run_while_the_server_chooses_not_to_read() -> None:
    # Paused at max_in_flight by echoes that take 4 frame timeouts, with a frame
    # half-sent behind them: the peer is not slow, the server is not reading.
    limits = Limits(frame_timeout=0.3, max_in_flight=2)
    async with await Timer().serve(limits=limits) as server:
        conn = await RawConnection.open(server.address)
        try:
            last = echo("last", 0)
            await conn.send(echo("a", 1200) + echo("b", 1200) + last[:10])
            await wait_until(lambda: server.stats.requests == 2)
            await asyncio.sleep(0.1)  # the last frame's head is still in the socket
            await conn.send(last[10:])
            for message in ("a", "b", "last"):
                ret, body = await conn.recv_reply()
                assert (ret, cbor2.loads(body)["echoed"]) == (RET_OK, message)
            assert server.stats.frame_timeouts == 0
        finally:
            await conn.close()


FRAME_TIMEOUT = 1.0


async def test_the_frame_deadline_does_not_run_while_replies_wait_to_be_sent(
    tmp_path: Path, server_reads: Reads
) -> None:
    # A peer that leaves a large reply unread for three frame timeouts, a frame half-sent
    # behind it: past 64 KiB of unsent replies the server chooses not to read, and the
    # deadline, which is for slow peers only, stops with it.
    timer = GatedTimer()
    limits = Limits(frame_timeout=FRAME_TIMEOUT)
    large = "r" * (900 * KiB)  # far more than the socket buffers and the client's reader hold
    async with await timer.serve(f"unix:{tmp_path / 's.sock'}", limits=limits) as server:
        conn = await RawConnection.open(server.address)
        try:
            last = echo("last", 0)
            sent = echo(large, 0) + last[:10]
            await conn.send(sent)
            await server_reads.until(len(sent))  # the half frame is read: its clock runs
            timer.gate.set()  # the large reply is written, and most of it stays unsent
            await asyncio.sleep(3 * FRAME_TIMEOUT)
            ret, body = await conn.recv_reply()
            assert (ret, cbor2.loads(body)["echoed"]) == (RET_OK, large)
            await conn.send(last[10:])
            ret, body = await conn.recv_reply()
            assert (ret, cbor2.loads(body)["echoed"]) == (RET_OK, "last")
            assert server.stats.frame_timeouts == 0
        finally:
            await conn.close()


# --- frames that end a connection, and procs that outlive theirs ----------------


async def test_a_tls_hello_after_a_running_call_is_answered_in_order() -> None:
    async with await Timer().serve() as server:
        conn = await RawConnection.open(server.address)
        try:
            await conn.send(echo("first", 100) + b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc")
            assert await conn.recv_reply() == (
                RET_OK,
                cbor2.dumps({"echoed": "first", "timerName": server.timer.name}),
            )
            ret, body = await conn.recv_reply()
            assert ret == RET_ERROR and b"not TLS" in body
            assert await conn.at_eof()
        finally:
            await conn.close()


class _Stubborn(Timer):
    """A timer whose echo finishes its reply even when cancelled."""

    __slots__ = ("finished",)

    def __init__(self) -> None:
        super().__init__()
        self.finished = asyncio.Event()

    async def echo(self, req: EchoRequest) -> EchoResponse:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.finished.set()
        return EchoResponse(echoed=req.message, timer_name=self.name)


async def test_a_proc_that_ends_after_its_caller_left_sends_nothing() -> None:
    timer = _Stubborn()
    async with await timer.serve() as server:
        conn = await RawConnection.open(server.address)
        await conn.send(echo("gone", 1))
        await wait_until(lambda: len(server.tasks) == 1)
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        await conn.close()  # a reset: the caller is gone
        await asyncio.wait_for(timer.finished.wait(), 10)
        await wait_until(lambda: not server.tasks)
        assert server.stats.orphans_cancelled == 1
        assert server.budget.used == 0


# --- subscriptions waiting on a bus, drop notices while paused ------------------


class _GatedBus(EventBus):
    """A bus whose new subscriptions wait until the test opens the gate."""

    def __init__(self) -> None:
        self.gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sink: EventSink | None = None
        self.closed = 0

    async def start(self, timer: EventSource, sink: EventSink) -> None:
        self.sink = sink

    async def close(self) -> None:
        self.closed += 1

    def ready(self) -> asyncio.Future[None]:
        return self.gate


async def test_a_subscribe_waiting_on_the_bus_is_dropped_with_its_caller_or_the_server() -> None:
    bus = _GatedBus()
    server = await Timer().serve(bus=bus)
    try:
        gone = await RawConnection.open(server.address)
        await gone.send(request(b"events.subscribe", b"\xa0"))
        await wait_until(lambda: len(server.tasks) == 1)
        sock = gone.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        await gone.close()  # a reset while its subscribe reply waits
        await wait_until(lambda: not server.tasks)
        assert server.stats.orphans_cancelled == 1
        staying = await RawConnection.open(server.address)
        try:
            await staying.send(request(b"events.subscribe", b"\xa0"))
            await wait_until(lambda: len(server.tasks) == 1)
            closing = asyncio.ensure_future(server.close(timeout=0.1))
            ret, body = await staying.recv_reply()
            assert ret == RET_ERROR and b"shutting down" in body
            await closing
        finally:
            await staying.close()
    finally:
        await server.close()


async def test_a_bus_drop_or_gap_while_the_subscriber_is_not_reading_comes_with_its_next_read(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "s.sock")
    async with (
        await Timer().serve(f"unix:{path}") as server,
        await TimerClient.connect(server.address, timeout=30) as caller,
    ):
        sock = stalled_subscriber(path)
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        try:
            await fill_until_paused(server, caller)
            _BusSink(server).deliver_gap(
                "cut off"
            )  # the bus was lost while this subscriber is paused
            _BusSink(server).deliver_dropped(2)  # and then counted what it lost
            notices: list[object] = []
            async with asyncio.timeout(30):
                while len(notices) < 2:
                    head = await reader.readexactly(8)
                    body = await reader.readexactly(int.from_bytes(head[4:], "big"))
                    if int.from_bytes(head[:4], "big", signed=True) == RET_EVENTS_DROPPED:
                        notices.append(cbor2.loads(body))
            assert notices == [{"dropped": 0, "gap": "cut off"}, {"dropped": 2}]
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def test_more_than_three_validation_errors_are_counted_not_listed() -> None:
    from timer_sdk.wire.api import ECHO

    payload = cbor2.dumps({"req": {"message": 1, "delayMs": "x", "a": 1, "b": 2, "c": 3}})
    with pytest.raises(DecodeError, match=r"and 2 more errors$"):
        ECHO.decode_params(payload)


# --- edges of the server's own checks --------------------------------------------


async def test_an_event_near_the_limit_is_measured_exactly_and_still_sent() -> None:
    # Its estimate is over the limit, its frame is not: it must be delivered, not dropped.
    message = "n" * (DEFAULT_MAX_FRAME_SIZE - 60)
    async with (
        await Timer().serve() as server,
        await TimerClient.connect(server.address, timeout=30) as client,
        client.events() as events,
    ):
        await client.echo(EchoRequest(message=message, delay_ms=0))
        item = await anext(events)
    assert isinstance(item, EchoEvent) and item.message == message
    assert server.stats.oversize_events == 0


async def test_a_unix_address_with_tls_is_refused(tmp_path: Path) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with pytest.raises(ValueError, match="TLS is for tcp: and tls: addresses"):
        await Timer().serve(f"unix:{tmp_path / 's.sock'}", ssl=context)


async def test_a_cancelled_close_still_closes_the_bus() -> None:
    bus = _GatedBus()
    server = await Timer().serve(bus=bus)
    async with await TimerClient.connect(server.address) as client:
        slow = asyncio.ensure_future(client.echo(EchoRequest(message="s", delay_ms=5000)))
        await wait_until(lambda: len(server.tasks) == 1)
        closing = asyncio.ensure_future(server.close())
        await wait_until(lambda: server.closing)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        with contextlib.suppress(Exception):
            await slow
    assert not server.connections
    assert bus.closed == 1


def test_a_transport_without_a_socket_is_never_taken_for_a_hung_up_peer() -> None:
    class NoSocket(asyncio.Transport):
        def get_extra_info(self, name: str, default: object = None) -> object:
            return None

    assert _hung_up(NoSocket()) is False
