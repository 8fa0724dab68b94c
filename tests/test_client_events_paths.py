"""A client's event streams across losses (refused reconnects, refused subscribes, no
streams), subscribes that wait for a slot like any call, and a call whose reconnect is
refused at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from timer_sdk import (
    CallError,
    ConnectionLost,
    EchoEvent,
    EchoRequest,
    EchoResponse,
    EventsMayHaveBeenMissed,
    Limits,
    Server,
    Subscription,
    Timer,
    TimerClient,
)
from timer_sdk.bus import Unshared

from ._dialers import SettlingDialer
from .conftest import GatedTimer, RawConnection, wait_until


class _HangUp:
    """A peer that reads the first request on each connection, then aborts the connection."""

    def __init__(self) -> None:
        self.heard = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in ("method", "params"):  # a request frame: two length-prefixed parts
            await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big"))
        self.heard.set()
        writer.transport.abort()


async def test_a_subscribe_lost_with_its_connection_is_not_kept_for_later() -> None:
    hang_up = _HangUp()
    listener = await asyncio.start_server(hang_up.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        client = await TimerClient.connect(f"tcp:127.0.0.1:{port}", reconnect=True, timeout=30)
        async with client:
            events = client.events()
            with pytest.raises(ConnectionLost):
                await events.__aenter__()
            assert hang_up.heard.is_set()
            # The stream never started: the client does not keep it to subscribe again.
            assert client._orphans == []
            resubscriber = client._resubscriber
            assert resubscriber is not None
            await wait_until(resubscriber.done)
    finally:
        listener.close()
        await listener.wait_closed()


class _Restartable:
    """A server on a Unix socket that the test stops and serves again, otherwise set up."""

    def __init__(self, address: str) -> None:
        self.timer = Timer()
        self.address = address
        self.server: Server | None = None

    @property
    def current(self) -> Server:
        assert self.server is not None
        return self.server

    async def serve(self, **options: Any) -> Server:
        self.server = await self.timer.serve(self.address, **options)
        return self.server

    def settle(self, client: TimerClient, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
        """Give ``client`` a :class:`SettlingDialer` here; its dials wait for the event."""
        opened = asyncio.Event()
        dialer = SettlingDialer(client._dialer, lambda: self.current, opened)
        monkeypatch.setattr(client, "_dialer", dialer)
        return opened

    async def serve_full(self) -> tuple[Server, RawConnection]:
        """Serve again, but full: one connection allowed, and a raw connection holds it."""
        server = await self.serve(limits=Limits(max_connections=1))
        holder = await RawConnection.open(self.address)
        await wait_until(lambda: server.stats.connections_accepted == 1)
        return server, holder

    async def stop_under(self, client: TimerClient) -> None:
        """Stop the server, and wait until ``client`` saw its connection go."""
        await self.current.close()
        await wait_until(lambda: client._protocol.failure is not None)

    @contextlib.asynccontextmanager
    async def stream_cut_off(self) -> AsyncIterator[tuple[TimerClient, Subscription]]:
        """A reconnecting client's stream, whose connection the server's stop just cut."""
        async with (
            await TimerClient.connect(self.address, reconnect=True, timeout=30) as client,
            client.events() as events,
        ):
            await self.stop_under(client)
            yield client, events


@pytest.fixture
async def restartable(tmp_path: Path) -> AsyncIterator[_Restartable]:
    served = _Restartable(f"unix:{tmp_path}/timer.sock")
    await served.serve()
    yield served
    await served.current.close()


async def test_a_lost_connection_without_streams_starts_no_resubscriber(
    restartable: _Restartable,
) -> None:
    async with await TimerClient.connect(restartable.address, reconnect=True) as client:
        assert await client.version()
        await restartable.stop_under(client)
        assert client._resubscriber is None  # nothing to subscribe again
        await restartable.serve()
        assert await client.version()  # calls reconnect by themselves
        assert client._resubscriber is None


async def test_streams_wait_out_a_full_server_then_subscribe_again(
    restartable: _Restartable, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await TimerClient.connect(restartable.address, reconnect=True, timeout=30)
    opened = restartable.settle(client, monkeypatch)
    async with client, client.events() as events:
        await restartable.stop_under(client)
        server, holder = await restartable.serve_full()  # someone else holds the one slot
        opened.set()
        # A new stream meanwhile fails at once: its connection was refused.
        with pytest.raises(ConnectionLost):
            await client.events().__aenter__()
        assert server.stats.connections_refused >= 1
        await holder.close()
        # The kept stream gets through once there is room, with the gap marked.
        gap = await asyncio.wait_for(anext(events), 30)
        assert isinstance(gap, EventsMayHaveBeenMissed)
        await wait_until(lambda: server.subscribers == 1)
        await client.echo(EchoRequest(message="after", delay_ms=0))
        assert await asyncio.wait_for(anext(events), 30) == EchoEvent(message="after", echo_count=1)


async def test_a_call_whose_reconnect_is_refused_at_once_fails_as_lost(
    restartable: _Restartable, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await TimerClient.connect(restartable.address, reconnect=True, timeout=30)
    opened = restartable.settle(client, monkeypatch)
    async with client:
        assert await client.version()
        await restartable.stop_under(client)
        server, holder = await restartable.serve_full()
        opened.set()
        with pytest.raises(ConnectionLost, match="lost"):  # never sent on it
            await client.version()
        assert server.stats.connections_refused == 1
        await holder.close()
        assert await client.version()  # the next call reconnects, to a server with room


async def test_a_stream_refused_on_the_new_connection_ends_with_that_error(
    restartable: _Restartable,
) -> None:
    async with restartable.stream_cut_off() as (client, events):
        # Back as one of several processes without a bus: subscriptions are refused.
        await restartable.serve(bus=Unshared("no bus between the workers"))
        gap = await asyncio.wait_for(anext(events), 30)
        assert isinstance(gap, EventsMayHaveBeenMissed)
        with pytest.raises(CallError, match="no bus between the workers"):
            await asyncio.wait_for(anext(events), 30)
        resubscriber = client._resubscriber
        assert resubscriber is not None
        await wait_until(resubscriber.done)
        assert client._orphans == []
        assert await client.version()  # the connection itself is fine


async def test_a_new_connection_lost_at_the_subscribe_is_followed_by_another(
    restartable: _Restartable,
) -> None:
    async with restartable.stream_cut_off() as (client, events):
        # Something else answers at the address for a while, and hangs up on the subscribe.
        hang_up = _HangUp()
        impostor = await asyncio.start_unix_server(
            hang_up.handle, restartable.address.removeprefix("unix:")
        )
        try:
            await asyncio.wait_for(hang_up.heard.wait(), 30)
        finally:
            impostor.close()
            await impostor.wait_closed()
        server = await restartable.serve()  # the real one is back: the stream subscribes there
        await wait_until(lambda: server.subscribers == 1)
        await client.echo(EchoRequest(message="after", delay_ms=0))
        items = [await asyncio.wait_for(anext(events), 30)]
        while not isinstance(items[-1], EchoEvent):
            items.append(await asyncio.wait_for(anext(events), 30))
    # A gap for each new connection (one, if both were noted before the first was read).
    assert items[-1] == EchoEvent(message="after", echo_count=1)
    assert 1 <= len(items) - 1 <= 2
    assert all(isinstance(item, EventsMayHaveBeenMissed) for item in items[:-1])


@contextlib.asynccontextmanager
async def slot_taken(
    timeout: float | None,
) -> AsyncIterator[tuple[GatedTimer, Server, TimerClient, asyncio.Task[EchoResponse]]]:
    """A ``max_pending=1`` client whose one slot a call holds, in flight on the server."""
    timer = GatedTimer()
    async with (
        await timer.serve("tcp:127.0.0.1:0") as server,
        await TimerClient.connect(server.address, max_pending=1, timeout=timeout) as client,
    ):
        held = asyncio.create_task(client.echo(EchoRequest(message="held", delay_ms=0)))
        await wait_until(lambda: len(server.tasks) == 1)
        yield timer, server, client, held


@pytest.mark.parametrize("timeout", [None, 30.0])
async def test_a_subscribe_waits_for_a_free_slot_like_any_call(timeout: float | None) -> None:
    async with slot_taken(timeout) as (timer, server, client, held):
        opening = asyncio.create_task(client.events().__aenter__())
        await wait_until(lambda: client._protocol.blocked or client.pending > 1)
        assert client.pending == 1  # the subscribe waits, unsent
        timer.gate.set()
        assert (await held).echoed == "held"
        async with await opening as events:
            assert server.subscribers == 1
            await client.echo(EchoRequest(message="after", delay_ms=0))
            event = await asyncio.wait_for(anext(events), 30)
            assert event == EchoEvent(message="after", echo_count=1)


async def test_a_subscribe_given_up_while_it_waits_for_a_slot_is_never_sent() -> None:
    async with slot_taken(None) as (timer, server, client, held):
        opening = asyncio.create_task(client.events().__aenter__())
        await wait_until(lambda: client._protocol.blocked)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        assert not client._protocol._queue  # it left nothing behind to send
        timer.gate.set()
        assert (await held).echoed == "held"
        assert await client.version()  # answered after anything written before it
        assert server.subscribers == 0
