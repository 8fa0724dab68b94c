"""Batches on the event bus: many events per NATS message, gaps still counted exactly."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import cbor2
import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription as NatsSubscription

from timer_sdk import EchoEvent, EchoRequest, EventsDropped, Server, Timer, TimerClient, TimerConfig
from timer_sdk.bus.batch import (
    MAX_BATCH_EVENTS,
    batch_length,
    decode_batch,
    encode_echo_event,
    take_batch,
)
from timer_sdk.bus.nats_backend import PUBLISHER_HEADER, SEQ_HEADER, NatsBus
from timer_sdk.bus.natsd import NatsServer
from timer_sdk.wire.api import encode_event
from timer_sdk.wire.codec import DecodeError

from .test_bus import Tally, _bus, _serve

SUBJECT = "timer_sdk.ipc-server.on_echo_fired"


def _body(message: str) -> bytes:
    return encode_event("on_echo_fired", EchoEvent(message=message, echo_count=1))


def _item(message: str) -> dict[str, object]:
    return {"event": "on_echo_fired", "data": {"message": message, "echoCount": 1}}


# --- the payloads, without NATS ------------------------------------------------


def test_consecutive_events_go_as_one_cbor_array_of_their_bodies() -> None:
    outbox = deque((seq, _body(str(seq))) for seq in range(1, 4))
    seq, payload = take_batch(outbox, 1 << 20)
    assert seq == 3
    assert not outbox
    assert cbor2.loads(payload) == [_item("1"), _item("2"), _item("3")]
    assert batch_length(payload) == 3
    assert [e.message for e in decode_batch(payload)] == ["1", "2", "3"]


def test_one_event_goes_as_its_body_and_a_marker_alone() -> None:
    outbox = deque([(1, _body("1")), (1, b""), (2, _body("2"))])
    assert take_batch(outbox, 1 << 20) == (1, _body("1"))  # the marker ends it
    assert take_batch(outbox, 1 << 20) == (1, b"")
    assert take_batch(outbox, 1 << 20) == (2, _body("2"))
    assert batch_length(b"") == 0
    assert batch_length(_body("2")) == 1
    assert [e.message for e in decode_batch(_body("2"))] == ["2"]


def test_a_batch_never_spans_a_hole() -> None:
    outbox = deque([(1, _body("1")), (2, _body("2")), (5, _body("5")), (6, _body("6"))])
    first = take_batch(outbox, 1 << 20)
    second = take_batch(outbox, 1 << 20)
    assert (first[0], cbor2.loads(first[1])) == (2, [_item("1"), _item("2")])
    assert (second[0], cbor2.loads(second[1])) == (6, [_item("5"), _item("6")])


def test_a_batch_is_bounded_in_events_and_bytes() -> None:
    outbox = deque((seq, _body(str(seq))) for seq in range(1, MAX_BATCH_EVENTS + 2))
    seq, payload = take_batch(outbox, 1 << 20)
    assert (seq, batch_length(payload), len(outbox)) == (MAX_BATCH_EVENTS, MAX_BATCH_EVENTS, 1)
    assert len(cbor2.loads(payload)) == MAX_BATCH_EVENTS

    big = [(1, _body("a" * 100)), (2, _body("b" * 100)), (3, _body("c" * 100))]
    outbox = deque(big)
    limit = len(big[0][1]) + len(big[1][1])  # room for two bodies, not three
    assert take_batch(outbox, limit)[0] == 2
    assert take_batch(outbox, limit) == (3, big[2][1])
    outbox = deque(big)
    assert take_batch(outbox, 10) == (1, big[0][1])  # one too large still goes, alone


@pytest.mark.parametrize(
    "message", ["", "hello", "é" * 12, "x" * 23, "x" * 24, "x" * 256, "y" * 70000]
)
@pytest.mark.parametrize("count", [0, 1, 23, 24, 255, 65536, 2**32, 2**63 - 1, -1, -25, -(2**63)])
def test_the_bus_encodes_events_as_the_api_does(message: str, count: int) -> None:
    event = EchoEvent(message=message, echo_count=count)
    assert encode_echo_event(event) == encode_event("on_echo_fired", event)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\x80", "0 events"),
        (bytes((0x99, 0x01, 0x01)) + _body("1") * 257, "257 events"),
        (b"\x9f" + _body("1") + b"\xff", "array head 9f"),
        (b"\x98", "array head 98"),
        (b"\x83" + _body("1") * 2, "truncated"),
        (b"\x82" + _body("1") * 2 + b"\x00", "1 bytes follow"),
        (b"\x82" + _body("1") + b"\xa0", "event 2 of 2: invalid event frame"),
        (b"\x82" + _body("1") + cbor2.dumps({"event": "on_echo_fired", "data": {}}), "event 2"),
        (cbor2.dumps(["not an event", "at all"]), "event 1 of 2"),
        (cbor2.dumps({"event": "on_echo_fired"}), "on_echo_fired"),
    ],
)
def test_malformed_payloads_are_refused(payload: bytes, error: str) -> None:
    with pytest.raises(DecodeError, match=error):
        decode_batch(payload)


# --- through a real nats-server ------------------------------------------------


async def _subscribed(consumer: Client) -> NatsSubscription:
    sub = await consumer.subscribe(SUBJECT)
    # Our own message back: the server has our SUB (see test_bus.py).
    probe = await consumer.subscribe("probe")
    await consumer.publish("probe", b"")
    await probe.next_msg(timeout=30)
    return sub


async def test_a_burst_arrives_complete_and_in_order_in_few_messages(
    pair: tuple[Server, Server], consumer: Client
) -> None:
    first, second = pair
    n = 1000
    watcher = await _subscribed(consumer)
    async with (
        await TimerClient.connect(second.address) as subscriber,
        subscriber.events(max_queue=2 * n) as events,
    ):
        # A delay of 0 fires without yielding, so all of them are in the outbox
        # before the publisher runs, as the echoes of one pipelined read are.
        for i in range(n):
            await first.timer.echo(EchoRequest(message=f"burst {i}", delay_ms=0))
        tally = Tally()
        await tally.read_until(events, n)
    assert tally.messages == [f"burst {i}" for i in range(n)]
    seqs: list[int] = []
    while len(seqs) < 4:
        msg = await watcher.next_msg(timeout=30)
        assert msg.headers is not None
        seqs.append(int(msg.headers[SEQ_HEADER]))
    assert seqs == [256, 512, 768, 1000]  # full batches, then the rest
    assert _bus(second).gaps == 0


async def test_events_lost_to_a_full_outbox_are_counted_exactly(
    nats_server: NatsServer,
) -> None:
    timer = Timer(TimerConfig(name="ipc-server"))
    first = await timer.serve("tcp:127.0.0.1:0", bus=NatsBus(nats_server.url, max_outbox=10))
    second = await _serve(nats_server.url)
    try:
        async with (
            await TimerClient.connect(second.address) as subscriber,
            subscriber.events(max_queue=100) as events,
        ):

            async def fire(start: int, stop: int) -> None:
                for i in range(start, stop):  # without yielding: see the burst test
                    await timer.echo(EchoRequest(message=str(i), delay_ms=0))

            tally = Tally()
            await fire(1, 2)  # so that the receiver knows this publisher
            await tally.read_until(events, 1)
            await fire(2, 27)  # 2..11 fit in the outbox, 12..26 are lost
            await tally.read_until(events, 11)
            await fire(27, 32)  # the next batch shows the hole before it
            await tally.read_until(events, 31)
    finally:
        await first.close()
        await second.close()
    expected: list[EchoEvent | EventsDropped] = [
        *(EchoEvent(message=str(i), echo_count=1) for i in range(1, 12)),
        EventsDropped(15),
        *(EchoEvent(message=str(i), echo_count=1) for i in range(27, 32)),
    ]
    assert tally.items == expected
    assert _bus(second).gaps == 15


async def test_malformed_batches_are_ignored_with_a_log_and_counted_as_lost(
    pair: tuple[Server, Server], consumer: Client, caplog: pytest.LogCaptureFixture
) -> None:
    first, _ = pair
    malformed = [
        b"\x82" + _body("5") + b"\xa0",  # an element that is no event
        b"\x83" + _body("5") + _body("6"),  # truncated
        b"\x9f" + _body("5") + _body("6") + b"\xff",  # indefinite length
        b"\x82" + _body("5") + _body("6") + b"\x00",  # trailing bytes
        b"\x82" + _body("5") + _body("6"),  # valid, but with Timer-Seq 1 (below)
    ]

    async def publish(seq: int, payload: bytes) -> None:
        headers = {PUBLISHER_HEADER: "feedface", SEQ_HEADER: str(seq)}
        await consumer.publish(SUBJECT, payload, headers=headers)

    caplog.set_level(logging.WARNING, logger="timer_sdk.bus_nats")
    async with (
        await TimerClient.connect(first.address) as subscriber,
        subscriber.events() as events,
    ):
        await publish(1, _body("1"))
        await publish(3, cbor2.dumps([_item("2"), _item("3")]))
        await publish(4, cbor2.dumps([_item("3"), _item("4")]))  # 3 was seen already
        tally = Tally()
        await tally.read_until(events, 4)  # a client reports drops ahead of unread events
        for payload in malformed[:-1]:
            await publish(6, payload)
        await publish(1, malformed[-1])  # two events cannot end at 1
        await publish(7, _body("7"))  # 5 and 6 were refused: lost
        await tally.read_until(events, 7)
    assert tally.items == [
        EchoEvent(message="1", echo_count=1),
        EchoEvent(message="2", echo_count=1),
        EchoEvent(message="3", echo_count=1),
        EchoEvent(message="4", echo_count=1),
        EventsDropped(2),
        EchoEvent(message="7", echo_count=1),
    ]
    refused = [r for r in caplog.records if "ignoring an invalid message of feedface" in r.message]
    assert len(refused) == len(malformed)
    assert _bus(first).gaps == 2


async def test_a_gap_of_exactly_one_event_is_reported(
    pair: tuple[Server, Server], consumer: Client
) -> None:
    first, _ = pair
    headers = {PUBLISHER_HEADER: "0ddba11"}
    async with (
        await TimerClient.connect(first.address) as subscriber,
        subscriber.events() as events,
    ):
        for seq in (1, 3):  # 2 never comes
            await consumer.publish(
                SUBJECT, _body(str(seq)), headers={**headers, SEQ_HEADER: str(seq)}
            )
        items: list[object] = []
        while sum(isinstance(item, EchoEvent) for item in items) < 2:
            items.append(await asyncio.wait_for(anext(events), 30))
    # The client reports a drop ahead of the events it has not handed out yet.
    assert [i for i in items if isinstance(i, EventsDropped)] == [EventsDropped(1)]
    assert [i.message for i in items if isinstance(i, EchoEvent)] == ["1", "3"]
    assert _bus(first).gaps == 1
