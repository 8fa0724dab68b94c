"""The event bus: servers of one timer sharing events through a real nats-server."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from dataclasses import dataclass, field

import cbor2
import nats
import pytest

from timer_sdk import (
    EchoEvent,
    EchoRequest,
    EventsDropped,
    EventsMayHaveBeenMissed,
    Server,
    Subscription,
    Timer,
    TimerClient,
    TimerConfig,
    UnknownEvent,
)
from timer_sdk._extras import install_hint
from timer_sdk.bus import BusError, subject_for
from timer_sdk.bus.nats_backend import PUBLISHER_HEADER, SEQ_HEADER, NatsBus
from timer_sdk.bus.natsd import NatsServer
from timer_sdk.wire.framing import RET_EVENT, RET_EVENTS_DROPPED, RET_OK, encode_request

from .conftest import RawConnection, wait_until
from .vectors import ECHO_REPLY, ECHO_REQUEST, VERSION_REQUEST


@dataclass
class Tally:
    """What one subscriber saw: events, and the counts of drop notices, in order."""

    items: list[EchoEvent | UnknownEvent | EventsDropped | EventsMayHaveBeenMissed] = field(
        default_factory=list
    )

    @property
    def accounted(self) -> int:
        return sum(
            1 if isinstance(i, EchoEvent) else i.count if isinstance(i, EventsDropped) else 0
            for i in self.items
        )

    @property
    def messages(self) -> list[str]:
        return [i.message for i in self.items if isinstance(i, EchoEvent)]

    async def read_until(self, events: Subscription, total: int) -> None:
        async with asyncio.timeout(60):
            while self.accounted < total:
                self.items.append(await anext(events))


async def _serve(url: str, name: str = "ipc-server") -> Server:
    return await Timer(TimerConfig(name=name)).serve("tcp:127.0.0.1:0", bus=url)


def _bus(server: Server) -> NatsBus:
    assert isinstance(server.bus, NatsBus)
    return server.bus


async def test_a_subscriber_on_one_server_sees_the_echoes_of_both(
    pair: tuple[Server, Server],
) -> None:
    first, second = pair
    n = 300
    async with (
        await TimerClient.connect(first.address) as subscriber,
        await TimerClient.connect(first.address) as local,
        await TimerClient.connect(second.address) as remote,
        subscriber.events(max_queue=2 * n) as events,
    ):
        # One publisher after the other: each one's events arrive in the order they fired.
        for i in range(n):
            await remote.echo(EchoRequest(message=f"remote {i}", delay_ms=0))
        for i in range(n):
            await local.echo(EchoRequest(message=f"local {i}", delay_ms=0))
        tally = Tally()
        await tally.read_until(events, 2 * n)
    assert not [i for i in tally.items if isinstance(i, EventsDropped)]
    assert [m for m in tally.messages if m.startswith("remote")] == [
        f"remote {i}" for i in range(n)
    ]
    assert [m for m in tally.messages if m.startswith("local")] == [f"local {i}" for i in range(n)]


async def test_other_languages_read_the_subject_as_documented(
    pair: tuple[Server, Server],
) -> None:
    first, _ = pair
    consumer = await nats.connect(_bus(first).url)
    try:
        sub = await consumer.subscribe("timer_sdk.ipc-server.on_echo_fired")
        # Our own message back means the server has processed our SUBs before it
        # (flush() alone does not: nats-py may send its PING ahead of a buffered SUB).
        probe = await consumer.subscribe("probe")
        await consumer.publish("probe", b"")
        await probe.next_msg(timeout=30)
        async with await TimerClient.connect(first.address) as client:
            await client.echo(EchoRequest(message="for everyone", delay_ms=0))
            await client.echo(EchoRequest(message="and again", delay_ms=0))
        msgs = [await sub.next_msg(timeout=30) for _ in range(2)]
    finally:
        await consumer.close()
    assert [cbor2.loads(m.data) for m in msgs] == [
        {"event": "on_echo_fired", "data": {"message": "for everyone", "echoCount": 1}},
        {"event": "on_echo_fired", "data": {"message": "and again", "echoCount": 1}},
    ]
    assert [m.headers and m.headers[SEQ_HEADER] for m in msgs] == ["1", "2"]
    assert msgs[0].headers and msgs[0].headers[PUBLISHER_HEADER] == _bus(first).publisher


async def test_a_sync_request_gets_a_marker_of_every_servers_latest_number(
    pair: tuple[Server, Server], caplog: pytest.LogCaptureFixture
) -> None:
    first, second = pair
    subject = "timer_sdk.ipc-server.on_echo_fired"
    consumer = await nats.connect(_bus(first).url)
    try:
        sub = await consumer.subscribe(subject)
        probe = await consumer.subscribe("probe")  # as above: our SUBs are in place
        await consumer.publish("probe", b"")
        await probe.next_msg(timeout=30)
        async with (
            await TimerClient.connect(first.address) as client,
            client.events() as _,  # both servers listen: each hears the other's marker
            await TimerClient.connect(second.address) as other,
            other.events() as events,
        ):
            for message in ("one", "two"):
                await client.echo(EchoRequest(message=message, delay_ms=0))
            await Tally().read_until(events, 2)
            await consumer.publish(f"{subject}.sync", b"")  # as any NATS client may
            markers: dict[str, str] = {}
            async with asyncio.timeout(30):
                while len(markers) < 2:
                    msg = await sub.next_msg(timeout=30)
                    assert msg.headers is not None
                    if not msg.data:  # the events' messages come first
                        markers[msg.headers[PUBLISHER_HEADER]] = msg.headers[SEQ_HEADER]
            await client.echo(EchoRequest(message="three", delay_ms=0))
            assert await asyncio.wait_for(anext(events), 30) == EchoEvent(
                message="three", echo_count=1
            )  # a marker is no event, and accounts for none
    finally:
        await consumer.close()
    # Each server's latest number: 0 for one that has fired nothing yet.
    assert markers == {_bus(first).publisher: "2", _bus(second).publisher: "0"}
    assert not [r for r in caplog.records if r.name == "timer_sdk.bus_nats"]


async def test_non_subscribers_see_the_base_protocol_byte_for_byte_with_nats(
    pair: tuple[Server, Server],
) -> None:
    first, second = pair
    raw = await RawConnection.open(first.address)
    try:
        async with (
            await TimerClient.connect(first.address) as subscriber,
            await TimerClient.connect(second.address) as remote,
            subscriber.events() as events,
        ):
            for i in range(5):
                await remote.echo(EchoRequest(message=f"remote {i}", delay_ms=0))
                await raw.send(ECHO_REQUEST)
                assert await raw.recv_exactly(len(ECHO_REPLY)) == ECHO_REPLY
            tally = Tally()
            await tally.read_until(events, 10)
            assert len(tally.messages) == 10  # events were flowing all along
        # Nothing else arrived in between: the next bytes are exactly the next reply.
        await raw.send(VERSION_REQUEST)
        ret, body = await raw.recv_reply()
        assert (ret, cbor2.loads(body)) == (0, "timer-sdk v0.1.0")
    finally:
        await raw.close()


async def test_nats_killed_and_restarted_calls_go_on_and_drops_are_counted(
    pair: tuple[Server, Server], nats_server: NatsServer
) -> None:
    first, second = pair
    fired = 0
    outage_fired = 0
    stop = asyncio.Event()

    async def echo_forever(client: TimerClient) -> None:
        nonlocal fired, outage_fired
        while not stop.is_set():  # any failed call fails the test
            cut_off = not _bus(second).connected
            reply = await client.echo(EchoRequest(message=str(fired), delay_ms=0))
            assert reply.echoed == str(fired)
            fired += 1
            if cut_off and not _bus(second).connected:  # so it was when the event fired
                outage_fired += 1
            await asyncio.sleep(0)

    async with (
        await TimerClient.connect(first.address) as subscriber,
        await TimerClient.connect(second.address) as caller,
        subscriber.events(max_queue=100_000) as events,
    ):
        tally = Tally()
        echoes = asyncio.create_task(echo_forever(caller))
        try:
            await wait_until(lambda: fired >= 50)
            nats_server.kill()
            await wait_until(lambda: not _bus(first).connected and not _bus(second).connected)
            await wait_until(lambda: outage_fired >= 20, timeout=30)  # surely not published
            await asyncio.to_thread(nats_server.start)  # the same port again
            async with asyncio.timeout(60):
                await _bus(first).wait_connected()
                await _bus(second).wait_connected()
            # The notice comes, and events flow again after it.
            async with asyncio.timeout(60):
                while True:
                    tally.items.append(await anext(events))
                    drops = [i for i, x in enumerate(tally.items) if isinstance(x, EventsDropped)]
                    if drops and any(isinstance(x, EchoEvent) for x in tally.items[drops[0] :]):
                        break
        finally:
            stop.set()
            await echoes
        # Every echo is accounted for, as an event or in a drop count, and nothing twice.
        await tally.read_until(events, fired)
        assert tally.accounted == fired
        dropped = sum(i.count for i in tally.items if isinstance(i, EventsDropped))
        assert dropped >= outage_fired
        assert _bus(first).gaps + first.stats.events_dropped == dropped
        assert len(set(tally.messages)) == len(tally.messages)


async def test_a_lost_bus_is_a_gap_notice_at_once_then_sharing_resumes(
    pair: tuple[Server, Server], nats_server: NatsServer
) -> None:
    first, second = pair
    async with (
        await TimerClient.connect(first.address) as client,
        client.events() as here,  # on the server that fires
        await TimerClient.connect(second.address) as other,
        other.events() as there,  # on the server that hears of it over the bus
    ):
        await client.echo(EchoRequest(message="before", delay_ms=0))
        for events in (here, there):
            assert await asyncio.wait_for(anext(events), 30) == EchoEvent(
                message="before", echo_count=1
            )
        nats_server.kill()
        # Both hear of the loss where it happened, without waiting for NATS to come back.
        for events in (here, there):
            gap = await asyncio.wait_for(anext(events), 30)
            assert isinstance(gap, EventsMayHaveBeenMissed), gap
            assert gap.reason == f"cut off from the event bus at {nats_server.url}"
        await client.echo(EchoRequest(message="in the gap", delay_ms=0))  # never published
        assert await asyncio.wait_for(anext(here), 30) == EchoEvent(
            message="in the gap", echo_count=1
        )
        await asyncio.to_thread(nats_server.start)  # the same port again
        # After the reconnect the loss is counted exactly, and events flow again.
        assert await asyncio.wait_for(anext(there), 60) == EventsDropped(1)
        await client.echo(EchoRequest(message="after", delay_ms=0))
        assert await asyncio.wait_for(anext(there), 30) == EchoEvent(message="after", echo_count=1)


async def test_a_subscribe_and_a_call_during_an_outage_are_answered_at_once(
    pair: tuple[Server, Server], nats_server: NatsServer
) -> None:
    first, second = pair
    third = await _serve(nats_server.url)  # no one has subscribed here yet
    subscribe = encode_request(b"events.subscribe", b"\xa0")
    gap = {"dropped": 0, "gap": f"cut off from the event bus at {nats_server.url}"}
    try:
        async with (
            await TimerClient.connect(first.address) as caller,
            await TimerClient.connect(second.address) as other,
            other.events() as there,  # from before the outage: its counts stay exact
        ):
            await caller.echo(EchoRequest(message="before", delay_ms=0))
            assert await asyncio.wait_for(anext(there), 30) == EchoEvent(
                message="before", echo_count=1
            )
            nats_server.kill()
            await wait_until(lambda: not any(_bus(s).connected for s in (first, second, third)))
            conn = await RawConnection.open(third.address)
            start = time.monotonic()
            await conn.send(subscribe + VERSION_REQUEST)  # a call pipelined behind it
            # Answered now, not once NATS is back (the test brings it back only later).
            async with asyncio.timeout(5):
                ret, body = await conn.recv_reply()
                assert (ret, cbor2.loads(body)) == (RET_OK, {"events": ["on_echo_fired"]})
                ret, body = await conn.recv_reply()  # the first of its items
                assert (ret, cbor2.loads(body)) == (RET_EVENTS_DROPPED, gap)
                ret, body = await conn.recv_reply()
                assert ret == RET_OK and cbor2.loads(body).startswith("timer-sdk v")
            print(f"subscribe and version answered in {time.monotonic() - start:.3f} s")
            assert isinstance(await asyncio.wait_for(anext(there), 30), EventsMayHaveBeenMissed)
            await caller.echo(EchoRequest(message="in the gap", delay_ms=0))  # never published
            await asyncio.to_thread(nats_server.start)  # the same port again
            # Counted exactly where it was subscribed before; flowing again everywhere.
            assert await asyncio.wait_for(anext(there), 60) == EventsDropped(1)
            # The subscription made in the outage reaches NATS once the third is back and
            # confirmed it (nothing left to wait for); an echo before then reaches no one.
            third_bus = _bus(third)
            await wait_until(
                lambda: _bus(first).connected and third_bus.connected and third_bus.ready() is None,
                60,
            )
            async with asyncio.timeout(60):
                while True:  # the first "after" that reaches it, usually the first of all
                    await caller.echo(EchoRequest(message="after", delay_ms=0))
                    ret, body = await conn.recv_reply()
                    if ret == RET_EVENT:
                        break
            for n in range(20):
                await caller.echo(EchoRequest(message=f"{n}", delay_ms=0))
            for n in range(20):  # complete and in order from then on
                ret, body = await conn.recv_reply()
                while ret == RET_EVENT and cbor2.loads(body)["data"]["message"] == "after":
                    ret, body = await conn.recv_reply()
                assert ret == RET_EVENT and cbor2.loads(body)["data"]["message"] == f"{n}"
            await conn.close()
    finally:
        await third.close()


async def test_serve_fails_clearly_when_nats_is_unreachable(nats_server: NatsServer) -> None:
    url = nats_server.url
    nats_server.stop()
    bus = NatsBus(url, connect_timeout=1)
    with pytest.raises(BusError, match=r"cannot reach the event bus at nats://127\.0\.0\.1:\d+"):
        await Timer().serve("tcp:127.0.0.1:0", bus=bus)


async def test_a_bus_url_that_is_not_nats_is_refused() -> None:
    with pytest.raises(BusError, match=r"expected nats://HOST:PORT"):
        await Timer().serve("tcp:127.0.0.1:0", bus="redis://127.0.0.1:6379")


async def test_without_the_nats_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nats", None)  # import nats now raises ImportError
    monkeypatch.delitem(sys.modules, "timer_sdk.bus.nats_backend")
    with pytest.raises(BusError, match=re.escape(install_hint("nats"))):
        await Timer().serve("tcp:127.0.0.1:0", bus="nats://127.0.0.1:4222")


def test_subjects_are_one_token_per_timer_name(pair: tuple[Server, Server]) -> None:
    assert _bus(pair[0]).subject == subject_for("ipc-server")
    assert subject_for("ipc-server") == "timer_sdk.ipc-server.on_echo_fired"
    assert subject_for("a b.c*>é") == "timer_sdk.a%20b%2Ec%2A%3E%C3%A9.on_echo_fired"
    assert subject_for("") == "timer_sdk.%.on_echo_fired"
