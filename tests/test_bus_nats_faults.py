"""The NATS bus when things go wrong: a silent peer, a cut, a refused publish, odd messages."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client

from timer_sdk import EchoRequest, EventsDropped, Server, Timer, TimerClient, TimerConfig
from timer_sdk.bus import BusError
from timer_sdk.bus.nats_backend import PUBLISHER_HEADER, SEQ_HEADER, NatsBus
from timer_sdk.bus.natsd import NatsServer

from .conftest import wait_until
from .test_bus import Tally, _bus
from .test_bus_batch import SUBJECT, _body, _subscribed


class NatsProxy:
    """A loopback TCP relay to a nats-server, which can bend what passes through.

    ``max_payload`` rewrites the limit the server announces in its INFO line;
    ``cut_on`` closes the first connection whose client sends those bytes.
    """

    def __init__(
        self, upstream: NatsServer, *, max_payload: int | None = None, cut_on: bytes = b""
    ) -> None:
        self.upstream = upstream
        self.max_payload = max_payload
        self.cut_on = cut_on
        self.connections = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"nats://127.0.0.1:{port}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(self.upstream.host, self.upstream.port)
        down = asyncio.create_task(self._server_to_client(up_reader, writer))
        up = asyncio.create_task(self._client_to_server(reader, up_writer))
        self._tasks |= {down, up}
        try:
            await asyncio.wait((down, up), return_when=asyncio.FIRST_COMPLETED)
        finally:
            down.cancel()
            up.cancel()
            for w in (writer, up_writer):
                w.close()

    async def _server_to_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        info = await reader.readline()
        if self.max_payload is not None:
            fields = json.loads(info[len(b"INFO ") :])
            fields["max_payload"] = self.max_payload
            info = b"INFO " + json.dumps(fields).encode() + b"\r\n"
        writer.write(info)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def _client_to_server(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        seen = b""
        while data := await reader.read(65536):
            seen = seen[-len(self.cut_on) :] + data if self.cut_on else b""
            if self.cut_on and not self.cuts and self.cut_on in seen:
                self.cuts += 1
                return  # the relay closes both sides
            writer.write(data)
            await writer.drain()


@pytest.fixture
async def proxy(
    nats_server: NatsServer, request: pytest.FixtureRequest
) -> AsyncIterator[NatsProxy]:
    relay = NatsProxy(nats_server, **getattr(request, "param", {}))
    await relay.start()
    yield relay
    await relay.close()


async def _serve(bus: NatsBus) -> Server:
    return await Timer(TimerConfig(name="ipc-server")).serve("tcp:127.0.0.1:0", bus=bus)


async def test_a_peer_that_never_speaks_nats_times_out_and_close_is_then_harmless() -> None:
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # never a byte back; until the bus hangs up
        writer.close()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        bus = NatsBus(f"nats://127.0.0.1:{port}", connect_timeout=0.3)
        with pytest.raises(BusError, match=rf"at nats://127\.0\.0\.1:{port} within 0\.3 s"):
            await _serve(bus)
        assert accepted.is_set()  # it got a socket: the timeout was NATS's, not TCP's
        subject = "'timer_sdk.ipc-server.on_echo_fired'"
        assert repr(bus) == f"<NatsBus nats://127.0.0.1:{port} {subject} disconnected>"
        await bus.close()  # after a failed start: nothing to stop, nothing to raise
        await bus.close()
        assert not bus.connected
    finally:
        listener.close()
        await listener.wait_closed()


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[NatsBus]:
    """The bus of a server of timer ``ipc-server``, started on :func:`nats_server`."""
    served = NatsBus(nats_server.url)
    server = await _serve(served)
    yield served
    await server.close()


async def test_a_subscription_withdrawn_before_it_was_made_never_reaches_nats(
    bus: NatsBus,
) -> None:
    assert repr(bus).endswith("'timer_sdk.ipc-server.on_echo_fired' connected>")
    bus.listen(True)
    waiting = bus.ready()
    assert waiting is not None and not waiting.done()
    bus.listen(False)  # gone before the reconciler ran
    assert waiting.done()  # whoever waited is released
    assert bus.ready() is None
    await wait_until(lambda: bus._reconciler is None)
    assert bus._events_sub is None


async def test_closing_while_a_subscription_is_pending_cancels_it(bus: NatsBus) -> None:
    bus.listen(True)
    reconciler = bus._reconciler
    assert reconciler is not None and not reconciler.done()
    async with asyncio.timeout(10):
        await bus.close()  # as the server does when it stops
    assert reconciler.cancelled()
    assert bus._events_sub is None and not bus.connected


@pytest.mark.parametrize("proxy", [{"max_payload": 4096}], indirect=True)
async def test_an_event_too_large_for_nats_is_lost_and_the_sequence_says_so(
    proxy: NatsProxy, consumer: Client
) -> None:
    sub = await _subscribed(consumer)
    server = await _serve(NatsBus(proxy.url))
    try:
        async with await TimerClient.connect(server.address) as client:
            await client.echo(EchoRequest(message="x" * 5000, delay_ms=0))  # over 4096
            await client.echo(EchoRequest(message="small", delay_ms=0))
            msg = await sub.next_msg(timeout=10)
    finally:
        await server.close()
    assert msg.data == _body("small")
    assert msg.headers is not None and msg.headers[SEQ_HEADER] == "2"  # 1 never went out


@pytest.mark.parametrize("proxy", [{"cut_on": f"SUB {SUBJECT} ".encode()}], indirect=True)
async def test_a_subscription_cut_off_before_nats_confirmed_it_is_confirmed_after(
    proxy: NatsProxy, consumer: Client
) -> None:
    bus = NatsBus(proxy.url, reconnect_wait=0.05)
    server = await _serve(bus)
    try:
        bus.listen(True)
        waiting = bus.ready()
        assert waiting is not None
        await asyncio.wait_for(waiting, 15)  # released by the cut: a gap notice tells them
        assert proxy.cuts == 1
        async with asyncio.timeout(15):  # nats-py gives up on the lost PING after 5 s
            await bus.wait_connected()
            while (waiting := bus.ready()) is not None:
                await waiting
        assert (proxy.cuts, proxy.connections) == (1, 2)
        # The subscription NATS holds now is the one made again on the new connection.
        await consumer.publish(SUBJECT, b"", headers={PUBLISHER_HEADER: "cafe", SEQ_HEADER: "4"})
        await consumer.publish(
            SUBJECT, _body("5"), headers={PUBLISHER_HEADER: "cafe", SEQ_HEADER: "6"}
        )
        await wait_until(lambda: bus.gaps == 1)
    finally:
        await server.close()


async def test_messages_without_a_usable_sequence_are_ignored_and_publishers_are_bounded(
    nats_server: NatsServer, consumer: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="timer_sdk.bus_nats")
    server = await _serve(NatsBus(nats_server.url))

    async def publish(publisher: str, seq: str, payload: bytes) -> None:
        await consumer.publish(
            SUBJECT, payload, headers={PUBLISHER_HEADER: publisher, SEQ_HEADER: seq}
        )

    try:
        async with (
            await TimerClient.connect(server.address) as subscriber,
            subscriber.events() as events,
        ):
            await consumer.publish(SUBJECT, _body("no headers"))
            await consumer.publish(SUBJECT, _body("no seq"), headers={PUBLISHER_HEADER: "a"})
            await publish("a", "seven", _body("not a number"))
            await publish("first", "1", _body("first"))
            for i in range(4096):  # markers of as many other publishers: "first" is forgotten
                await publish(f"other {i}", "1", b"")
            await publish("first", "5", _body("again"))  # 2..4 missed, but no one remembers
            await publish("other 4095", "3", _body("last"))  # 2 missed: still remembered
            tally = Tally()
            await tally.read_until(events, 4)
    finally:
        await server.close()
    # "again" comes with no drop before it (its publisher was forgotten), "last" with one.
    assert tally.messages == ["first", "again", "last"]
    assert [i for i in tally.items if isinstance(i, EventsDropped)] == [EventsDropped(1)]
    assert _bus(server).gaps == 1
    ignored = [r for r in caplog.records if f"ignoring a message without {SEQ_HEADER}" in r.message]
    assert len(ignored) == 3
