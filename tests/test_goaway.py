"""The close notice: a graceful close says which calls it never read, and clients send them on.

In process, on real sockets. A call is held in flight on the closing server
(:class:`GatedTimer`); a second one is written after the server stopped reading,
so it sits unread in the socket when the server closes. Processes and signals
are in ``test_restart.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import cbor2
import pytest

from timer_sdk import (
    CallNotStarted,
    CallTimeout,
    ClientClosedError,
    ConnectionLost,
    EchoEvent,
    EchoRequest,
    EchoResponse,
    EventsMayHaveBeenMissed,
    Limits,
    Server,
    Timer,
    TimerClient,
    TimerConfig,
)
from timer_sdk.calling.dialer import _BACKOFF_FIRST
from timer_sdk.pool import connect_pool
from timer_sdk.wire.framing import encode_request

from ._dialers import SettlingDialer
from .conftest import GatedTimer, RawConnection, echoed, stop_reading, wait_until
from .vectors import ECHO_REQUEST

GOAWAY = encode_request(b"server.goaway", b"\xa0")


@pytest.fixture
async def closing() -> AsyncIterator[tuple[GatedTimer, Server]]:
    """A server whose echoes wait for the gate, on a TCP port others may share."""
    timer = GatedTimer(TimerConfig(name="old"))
    server = await timer.serve("tcp:127.0.0.1:0", reuse_port=True)
    yield timer, server
    timer.gate.set()
    await server.close(timeout=0)


async def test_the_notice_follows_the_last_reply_and_nothing_unread_runs(
    closing: tuple[GatedTimer, Server],
) -> None:
    timer, server = closing
    ran = echoed(timer)
    raw = await RawConnection.open(server.address)
    await raw.send(GOAWAY)
    assert await raw.recv_reply() == (0, b"\xa0")  # {}: asked and granted
    await raw.send(encode_request(b"echo", cbor2.dumps({"req": {"message": "in", "delayMs": 0}})))
    await wait_until(lambda: len(server.tasks) == 1)
    close = await stop_reading(server)
    await raw.send(ECHO_REQUEST)  # arrives after the server stopped reading
    timer.gate.set()
    ret, body = await raw.recv_reply()
    assert (ret, cbor2.loads(body)) == (0, {"echoed": "in", "timerName": "old"})
    assert await raw.recv_reply() == (18, cbor2.dumps({"reason": "the server is shutting down"}))
    await raw.close()
    await close
    assert ran == ["in"]  # the request after the notice never ran
    assert server.stats.requests == 1  # the ask is part of opening, not a call


async def test_a_connection_that_did_not_ask_sees_todays_bytes(
    closing: tuple[GatedTimer, Server],
) -> None:
    timer, server = closing
    raw = await RawConnection.open(server.address)
    await raw.send(ECHO_REQUEST)
    await wait_until(lambda: len(server.tasks) == 1)
    close = await stop_reading(server)
    timer.gate.set()
    head = await raw.recv_exactly(8)
    body = await raw.recv_exactly(int.from_bytes(head[4:], "big"))
    assert head[:4] == b"\0\0\0\0" and cbor2.loads(body)["echoed"] == "hello over the wire"
    assert await raw.at_eof()  # and nothing else: no notice
    await raw.close()
    await close


async def test_without_reconnect_an_unread_call_fails_as_never_started(
    closing: tuple[GatedTimer, Server],
) -> None:
    timer, server = closing
    ran = echoed(timer)
    client = await TimerClient.connect(server.address, handover=True, timeout=30)
    async with client:
        first = asyncio.create_task(client.echo(EchoRequest(message="first", delay_ms=0)))
        await wait_until(lambda: len(server.tasks) == 1)
        close = await stop_reading(server)
        second = asyncio.create_task(client.echo(EchoRequest(message="second", delay_ms=0)))
        await wait_until(lambda: client.pending == 2)  # written, and never to be read
        timer.gate.set()
        assert (await first).echoed == "first"
        with pytest.raises(CallNotStarted, match=r"never started, and are safe to send again"):
            await second
        with pytest.raises(ConnectionLost):  # what existing code catches still catches it
            await client.version()
        await close
    assert ran == ["first"]


async def test_with_reconnect_an_unread_call_runs_once_on_the_next_server(
    closing: tuple[GatedTimer, Server],
) -> None:
    old_timer, old = closing
    client = await TimerClient.connect(old.address, reconnect=True, timeout=30)
    new_timer = Timer(TimerConfig(name="new"))
    new = await new_timer.serve(old.address, reuse_port=True)  # the port, shared
    ran_old, ran_new = echoed(old_timer), echoed(new_timer)
    async with new, client, client.events() as events:
        first = asyncio.create_task(client.echo(EchoRequest(message="first", delay_ms=0)))
        await wait_until(lambda: len(old.tasks) == 1)
        close = await stop_reading(old)
        second = asyncio.create_task(client.echo(EchoRequest(message="second", delay_ms=0)))
        await wait_until(lambda: client.pending == 2)
        old_timer.gate.set()
        assert (await first).timer_name == "old"
        assert (await second).timer_name == "new"  # sent again, where it ran
        await close
        # The subscription moved over too, with the gap marked.
        assert await anext(events) == EchoEvent(message="first", echo_count=1)
        gap = await asyncio.wait_for(anext(events), 30)
        assert isinstance(gap, EventsMayHaveBeenMissed)
        assert "closed by the server (the server is shutting down)" in gap.reason
        await wait_until(lambda: new.subscribers == 1)
        await client.echo(EchoRequest(message="third", delay_ms=0))
        assert await asyncio.wait_for(anext(events), 30) == EchoEvent(message="third", echo_count=1)
    assert ran_old == ["first"]
    assert ran_new == ["second", "third"]


async def test_a_pool_sends_unread_calls_on_its_other_connections(
    closing: tuple[GatedTimer, Server],
) -> None:
    old_timer, old = closing
    new_timer = Timer(TimerConfig(name="new"))
    ran_new = echoed(new_timer)
    async with await new_timer.serve("tcp:127.0.0.1:0") as new:
        addresses = iter([old.address, new.address])

        def connect_next() -> asyncio.Future[TimerClient]:
            address = next(addresses)
            return asyncio.ensure_future(TimerClient.connect(address, handover=True))

        async with await connect_pool(2, connect_next, timeout=30, reconnect=False) as pool:
            # Held on the old server: the pool's first connection.
            first = asyncio.create_task(pool.echo(EchoRequest(message="first", delay_ms=0)))
            await wait_until(lambda: len(old.tasks) == 1)
            close = await stop_reading(old)
            on_old = pool._members[0]  # type: ignore[attr-defined]
            second = asyncio.create_task(
                on_old.echo(EchoRequest(message="second", delay_ms=0))  # unread there
            )
            await wait_until(lambda: on_old.pending == 2)
            old_timer.gate.set()
            assert (await first).timer_name == "old"
            assert (await second).timer_name == "new"
            await close
            assert (await pool.echo(EchoRequest(message="third", delay_ms=0))).timer_name == "new"
    assert ran_new == ["second", "third"]


async def test_a_crash_is_no_notice_and_nothing_is_sent_again(
    closing: tuple[GatedTimer, Server],
) -> None:
    old_timer, old = closing
    client = await TimerClient.connect(old.address, reconnect=True, timeout=30)
    new_timer = Timer(TimerConfig(name="new"))
    ran = echoed(old_timer), echoed(new_timer)
    async with await new_timer.serve(old.address, reuse_port=True), client:
        call = asyncio.create_task(client.echo(EchoRequest(message="in flight", delay_ms=0)))
        await wait_until(lambda: len(old.tasks) == 1)
        for conn in list(old.connections):
            conn.abort()  # as a crash: the socket closes, no notice
        with pytest.raises(ConnectionLost) as lost:
            await call
        assert not isinstance(lost.value, CallNotStarted)  # it may have run
        old_timer.gate.set()  # the next connection may reach either server
        assert (await client.echo(EchoRequest(message="next", delay_ms=0))).echoed == "next"
    assert sorted(ran[0] + ran[1]) == ["next"]  # "in flight" never sent again


async def left_unread(
    client: TimerClient, closing: tuple[GatedTimer, Server], timeout: float | None = None
) -> asyncio.Task[EchoResponse]:
    """Close the server gracefully with a call of ``client``'s left unread: that call."""
    (second,) = await leave_unread(client, closing, ["second"], timeout)
    return second


async def leave_unread(
    client: TimerClient,
    closing: tuple[GatedTimer, Server],
    messages: list[str],
    timeout: float | None = None,
) -> list[asyncio.Task[EchoResponse]]:
    """Close the server gracefully with calls of ``client``'s left unread: those calls.

    A first call, held in flight, is answered; the others were made after the
    server stopped reading (written, or waiting for a slot). Returns once the
    server has closed.
    """
    timer, server = closing
    first = asyncio.create_task(client.echo(EchoRequest(message="first", delay_ms=0)))
    await wait_until(lambda: len(server.tasks) == 1)
    close = await stop_reading(server)
    unread = [
        asyncio.create_task(
            client.echo(EchoRequest(message=message, delay_ms=0), timeout=timeout or 30)
        )
        for message in messages
    ]
    waiting = 1 + len(messages)
    await wait_until(lambda: client.pending + len(client._protocol._queue) == waiting)
    timer.gate.set()
    assert (await first).echoed == "first"
    await close  # nobody listens on the port any more: every reconnect is refused
    return unread


async def test_with_no_server_to_reconnect_to_an_unread_call_fails_as_never_started(
    closing: tuple[GatedTimer, Server],
) -> None:
    ran = echoed(closing[0])
    client = await TimerClient.connect(
        closing[1].address, reconnect=True, connect_timeout=0.5, timeout=30
    )
    async with client:
        second = await left_unread(client, closing)
        with pytest.raises(CallNotStarted, match=r"never started, and could not be sent again"):
            await second
    assert ran == ["first"]


async def test_a_client_closed_while_it_hands_calls_over_fails_them_as_closed(
    closing: tuple[GatedTimer, Server],
) -> None:
    client = await TimerClient.connect(
        closing[1].address, reconnect=True, connect_timeout=30, timeout=30
    )
    second = await left_unread(client, closing)  # the hand-over retries a refused port
    await client.close()
    with pytest.raises(ClientClosedError, match="the client was closed"):
        await second


async def test_a_handed_over_call_that_times_out_is_dropped_not_sent(
    closing: tuple[GatedTimer, Server],
) -> None:
    ran = echoed(closing[0])
    client = await TimerClient.connect(
        closing[1].address, reconnect=True, connect_timeout=30, timeout=30
    )
    async with client:
        second = await left_unread(client, closing, timeout=0.5)
        with pytest.raises(CallTimeout):  # its own deadline, while no server takes it
            await second
        late = Timer(TimerConfig(name="late"))
        ran_late = echoed(late)
        async with await late.serve(closing[1].address, reuse_port=True):
            assert await client.version() == await late.version()
        assert ran_late == []  # the timed-out call was never sent to the next server
    assert ran == ["first"]


async def test_unread_calls_beyond_max_pending_wait_for_a_slot_on_the_next_connection(
    closing: tuple[GatedTimer, Server],
) -> None:
    client = await TimerClient.connect(closing[1].address, reconnect=True, max_pending=1)
    new_timer = GatedTimer(TimerConfig(name="new"))
    ran_new = echoed(new_timer)
    async with client:
        unread = await leave_unread(client, closing, ["second", "third"])
        async with await new_timer.serve(closing[1].address, reuse_port=True) as new:
            await wait_until(lambda: len(new.tasks) > 0)
            assert client.pending == 1  # the other waits for the slot, unsent
            new_timer.gate.set()
            assert [(await call).timer_name for call in unread] == ["new", "new"]
    assert ran_new == ["second", "third"]


async def test_a_reconnect_refused_at_once_is_tried_again_a_moment_later(
    closing: tuple[GatedTimer, Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await TimerClient.connect(closing[1].address, reconnect=True, timeout=30)
    new_timer = Timer(TimerConfig(name="new"))
    servers: list[Server] = []
    opened = asyncio.Event()
    dialer = SettlingDialer(client._dialer, lambda: servers[0], opened)
    monkeypatch.setattr(client, "_dialer", dialer)
    async with client:
        second = await left_unread(client, closing)
        # Back, but full: one connection allowed, and someone else holds it.
        limits = Limits(max_connections=1)
        new = await new_timer.serve(closing[1].address, reuse_port=True, limits=limits)
        servers.append(new)
        async with new:
            holder = await RawConnection.open(new.address)
            await wait_until(lambda: new.stats.connections_accepted == 1)
            opened.set()
            await wait_until(lambda: len(dialer.dialed) == 3)  # after two refused at once
            await holder.close()
            assert (await second).timer_name == "new"  # not lost with a refused connection
    assert new.stats.connections_refused >= 2
    first, refused, again = dialer.dialed[:3]
    assert min(refused - first, again - refused) >= _BACKOFF_FIRST - 0.001  # not at once


async def test_a_handed_over_call_cancelled_before_the_client_closes_stays_cancelled(
    closing: tuple[GatedTimer, Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await TimerClient.connect(closing[1].address, reconnect=True, timeout=30)
    never = asyncio.Event()  # every reconnect is still dialing when the client closes
    dialer = SettlingDialer(client._dialer, lambda: closing[1], never)
    monkeypatch.setattr(client, "_dialer", dialer)
    second, third = await leave_unread(client, closing, ["second", "third"])
    await wait_until(lambda: client._redial is not None)  # the hand-over waits for it
    second.cancel()
    await client.close()
    with pytest.raises(asyncio.CancelledError):
        await second
    with pytest.raises(ClientClosedError, match="the client was closed"):
        await third
