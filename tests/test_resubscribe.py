"""Subscriptions that outlive a lost connection (``reconnect=True``), and the gap notice."""

from __future__ import annotations

import asyncio

import pytest

from timer_sdk import (
    ConnectionLost,
    EchoEvent,
    EchoRequest,
    EventsDropped,
    EventsMayHaveBeenMissed,
    Server,
    Subscription,
    Timer,
    TimerClient,
    TimerConfig,
)

from .conftest import wait_until


def _event(message: str) -> EchoEvent:
    return EchoEvent(message=message, echo_count=1)


async def _echo(address: str, message: str) -> None:
    async with await TimerClient.connect(address, timeout=30) as caller:
        await caller.echo(EchoRequest(message=message, delay_ms=0))


async def _subscribers(server: Server, count: int) -> None:
    await wait_until(lambda: server.subscribers == count)


async def _restart(server: Server, timer: Timer) -> Server:
    """Stop ``server`` and serve ``timer`` again on the very same address."""
    address = server.address  # tcp: the port it got, so the new one takes the same
    await server.close()
    return await timer.serve(address)


async def test_a_subscription_survives_a_server_restart(address: str) -> None:
    timer = Timer(TimerConfig(name="ipc-server"))
    server = await timer.serve(address)
    try:
        async with (
            await TimerClient.connect(server.address, reconnect=True, timeout=30) as client,
            client.events() as events,
        ):
            await _echo(server.address, "before")
            assert await anext(events) == _event("before")

            await server.close()
            waiting = asyncio.create_task(anext(events))
            await wait_until(lambda: client._protocol.failure is not None)  # it saw the loss
            assert not waiting.done()  # no error, no end: it waits for the server to be back
            server = await timer.serve(server.address)

            gap = await asyncio.wait_for(waiting, 30)
            assert isinstance(gap, EventsMayHaveBeenMissed)
            assert f"connection to {server.address} closed by the server" in gap.reason
            assert events.dropped == 0  # a gap is not a count
            await _subscribers(server, 1)  # subscribed again, by itself
            await _echo(server.address, "after")
            assert await anext(events) == _event("after")
            assert await client.version()  # calls use the new connection as well
        await _subscribers(server, 0)  # and leaving unsubscribes there
    finally:
        await server.close()


async def test_several_restarts_and_a_subscription_opened_after_a_loss(tmp_path: object) -> None:
    timer = Timer()
    server = await timer.serve(f"unix:{tmp_path}/re.sock")
    try:
        client = await TimerClient.connect(server.address, reconnect=True, timeout=30)
        async with client, client.events() as events:
            for round_ in range(3):
                server = await _restart(server, timer)
                assert isinstance(await anext(events), EventsMayHaveBeenMissed)
                await _subscribers(server, 1)
                await _echo(server.address, f"round {round_}")
                assert await anext(events) == _event(f"round {round_}")
            # A new subscription while the connection is down opens on a new one.
            await server.close()
            await wait_until(lambda: client._protocol.failure is not None)
            server = await timer.serve(server.address)
            async with client.events() as late:
                await _echo(server.address, "late")
                assert await anext(late) == _event("late")
            items = [await anext(events), await anext(events)]
            assert isinstance(items[0], EventsMayHaveBeenMissed)
            assert items[1] == _event("late")
    finally:
        await server.close()


async def test_closing_the_client_in_the_gap_ends_the_stream(tmp_path: object) -> None:
    timer = Timer()
    server = await timer.serve(f"unix:{tmp_path}/gap.sock")
    client = await TimerClient.connect(server.address, reconnect=True)
    async with client.events() as events:
        await server.close()
        waiting = asyncio.create_task(anext(events))
        await wait_until(lambda: client._protocol.failure is not None)
        await client.close()  # while it retries against nothing
        with pytest.raises(StopAsyncIteration):
            await waiting
        assert client._resubscriber is not None and client._resubscriber.done()


async def test_a_subscription_closed_in_the_gap_is_not_renewed(tmp_path: object) -> None:
    timer = Timer()
    server = await timer.serve(f"unix:{tmp_path}/gone.sock")
    try:
        async with await TimerClient.connect(server.address, reconnect=True) as client:
            events = client.events()
            await events.__aenter__()
            await server.close()
            await wait_until(lambda: client._protocol.failure is not None)
            await events.aclose()  # nobody wants it any more
            server = await timer.serve(server.address)
            assert await client.version()  # the client is back on a new connection
            resubscriber = client._resubscriber
            await wait_until(lambda: resubscriber is not None and resubscriber.done())
            assert server.stats.requests == 1  # the version call, and no subscribe
            assert server.subscribers == 0
    finally:
        await server.close()


async def test_without_reconnect_the_stream_still_ends_with_connection_lost(
    tmp_path: object,
) -> None:
    timer = Timer()
    server = await timer.serve(f"unix:{tmp_path}/plain.sock")
    async with await TimerClient.connect(server.address) as client, client.events() as events:
        await server.close()
        with pytest.raises(ConnectionLost):
            await anext(events)


async def test_a_gap_notice_keeps_its_place_and_is_never_dropped() -> None:
    sub = Subscription(max_queue=2)
    sub.publish(_event("a"))
    sub.note_gap("lost")
    sub.note_gap("lost again")  # nothing between: still one gap
    sub.publish(_event("b"))
    sub.publish(_event("c"))  # full: "a" goes, the notice stays
    sub.publish(_event("d"))  # full: "b" goes
    assert [await anext(sub) for _ in range(4)] == [
        EventsDropped(2),
        EventsMayHaveBeenMissed("lost"),
        _event("c"),
        _event("d"),
    ]
    assert sub.dropped == 2


async def test_gaps_merge_when_the_events_between_them_are_dropped() -> None:
    sub = Subscription(max_queue=1)
    sub.publish(_event("a"))
    sub.note_gap("first")
    sub.publish(_event("b"))  # "a" goes
    sub.note_gap("second")
    sub.publish(_event("c"))  # "b" goes: nothing is left between the two gaps
    sub.publish(_event("d"))  # "c" goes
    assert [await anext(sub) for _ in range(3)] == [
        EventsDropped(3),
        EventsMayHaveBeenMissed("first"),
        _event("d"),
    ]
    sub.publish(_event("e"))
    assert await anext(sub) == _event("e")
    assert sub._gaps == 0
