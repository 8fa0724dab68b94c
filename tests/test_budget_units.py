"""The sans-I/O pieces of the server-wide budget: Budget, EventBacklog, abandon_frame,
check_items."""

from __future__ import annotations

import cbor2
import pytest

from timer_sdk.models import EchoEvent
from timer_sdk.serving.plans import plan
from timer_sdk.timer import Timer
from timer_sdk.wire.api import COMPLEX
from timer_sdk.wire.backlog import EVENT_OVERHEAD, EventBacklog, event_size
from timer_sdk.wire.budget import FLOOR, IN_FLIGHT_COST, MIN_READ, READ_HEADROOM, Budget
from timer_sdk.wire.codec import DecodeError, StrictDecoder, check_items
from timer_sdk.wire.framing import Rejected, Request, RequestReader, encode_request

KiB = 1024
MiB = 1024 * KiB


class Peer:
    """A holder: reports its bytes to the budget and records its grants."""

    def __init__(self, budget: Budget, granted: list[Peer], name: str) -> None:
        self.budget = budget
        self.held = 0
        self.granted = granted
        self.name = name

    def hold(self, n: int) -> None:
        before, self.held = self.held, n
        self.budget.update(before, n)

    def budget_granted(self) -> None:
        self.granted.append(self)

    def __repr__(self) -> str:
        return self.name


def peers(budget: Budget, n: int) -> tuple[list[Peer], list[Peer]]:
    granted: list[Peer] = []
    return [Peer(budget, granted, f"p{i}") for i in range(n)], granted


# --- Budget ------------------------------------------------------------------


def test_between_frames_a_holder_reads_the_room_left_and_never_less_than_a_head() -> None:
    budget = Budget(4 * MiB)
    (a, b), _ = peers(budget, 2)
    assert budget.admit(a, 0) and budget.read_size(a) == READ_HEADROOM
    a.hold(4 * MiB - 5000)
    assert budget.admit(b, 0) and budget.read_size(b) == 5000
    a.hold(4 * MiB)
    assert budget.read_size(b) == MIN_READ  # enough for a frame's head, past the room
    assert budget.waiting == 0


def test_a_frame_that_fits_is_reserved_until_it_is_whole() -> None:
    budget = Budget(MiB)
    (a, b), _ = peers(budget, 2)
    assert budget.admit(a, 600 * KiB)  # its head arrived: 600 KiB still to come
    assert budget.room() == MiB - 600 * KiB
    assert budget.read_size(a) == READ_HEADROOM
    assert not budget.admit(b, 500 * KiB)  # what a's frame is owed is not b's
    assert budget.admit(a, 300 * KiB)  # half of it arrived: still covered
    budget.finished(a)  # whole: its reservation goes to the waiter
    assert budget.waiting == 0 and budget.room() == MiB - 500 * KiB
    budget.finished(b)
    assert budget.room() == MiB


def test_a_frame_that_does_not_fit_waits_and_is_granted_as_bytes_are_freed() -> None:
    budget = Budget(MiB)
    (hog, waiter), granted = peers(budget, 2)
    hog.hold(MiB - 100 * KiB)
    assert not budget.admit(waiter, 200 * KiB)
    assert budget.waiting == 1
    assert not budget.admit(waiter, 200 * KiB)  # asking again keeps its place, once
    assert budget.waiting == 1
    hog.hold(MiB - 150 * KiB)
    assert granted == []  # nothing is granted until the whole frame fits
    hog.hold(MiB - 200 * KiB)
    assert granted == [waiter]
    assert budget.admit(waiter, 200 * KiB) and budget.read_size(waiter) == READ_HEADROOM


def test_a_small_frame_never_waits_for_a_read_of_headroom() -> None:
    # The budget is all but spent: a 20-byte request is still read at once.
    budget = Budget(MiB)
    (hog, small), _ = peers(budget, 2)
    hog.hold(MiB - 100)
    assert budget.admit(small, 0)  # between frames: a head read
    assert budget.admit(small, 20)


def test_under_the_floor_a_holder_reads_even_when_stuck_work_holds_everything() -> None:
    budget = Budget(MiB)
    (hog, small, big), _ = peers(budget, 3)
    hog.hold(2 * MiB)  # past the limit: only work that ends can free it
    assert budget.admit(small, 0)
    # It stays under the floor, with room for the request the frame becomes.
    assert budget.admit(small, FLOOR - IN_FLIGHT_COST)
    budget.finished(small)
    small.hold(FLOOR - IN_FLIGHT_COST - 100)
    assert not budget.admit(small, 200)  # it would not
    big.hold(FLOOR)
    assert not budget.admit(big, 0)
    assert budget.waiting == 2


def test_whole_frames_start_within_the_room_or_the_floor() -> None:
    budget = Budget(MiB)
    (hog, small, other), granted = peers(budget, 3)
    assert budget.startable(small) == MiB // IN_FLIGHT_COST
    hog.hold(MiB - 3 * IN_FLIGHT_COST)
    assert budget.startable(small) == 3
    hog.hold(2 * MiB)  # no room: one start while it stays under the floor
    small.hold(FLOOR - IN_FLIGHT_COST)
    assert budget.startable(small) == 1
    small.hold(FLOOR - IN_FLIGHT_COST + 1)
    assert budget.startable(small) == 0
    # Waiting to start: granted room for one request once it is freed.
    assert not budget.admit(small, IN_FLIGHT_COST, start=True)
    hog.hold(MiB - IN_FLIGHT_COST - small.held)
    assert granted == [small]
    assert budget.admit(small, IN_FLIGHT_COST, start=True)
    assert budget.startable(small) == 1  # its grant
    other.hold(0)
    assert not budget.admit(other, MiB, start=False)  # a waiter: the room is not small's now
    assert budget.startable(small) == 1
    budget.finished(small)
    assert budget.startable(small) == 0


def test_a_start_under_the_floor_needs_room_for_its_request_only() -> None:
    budget = Budget(MiB)
    (hog, small), _ = peers(budget, 2)
    hog.hold(2 * MiB)
    small.hold(FLOOR - IN_FLIGHT_COST)  # a whole frame read: only its request is to come
    assert budget.admit(small, IN_FLIGHT_COST, start=True)
    budget.finished(small)
    assert not budget.admit(small, 1)  # a frame read would also need room for its request


def test_partial_frames_waiting_in_line_never_keep_the_room_from_themselves() -> None:
    # 20 connections each read a frame's first 4 KiB, under the floor, and wait for
    # room for its rest: 80 KiB of a 64 KiB budget. Once the hog's bytes are freed,
    # the line is served; counted against the room, its own bytes would block it.
    budget = Budget(64 * KiB)
    (hog, *line), granted = peers(budget, 21)
    hog.hold(60 * KiB)
    for peer in line:
        peer.hold(4 * KiB)
        assert not budget.admit(peer, 20 * KiB)  # larger than the floor allows
    hog.hold(0)
    assert granted == line[:3]  # 64 KiB of room: three frames of 20 KiB


def test_waiters_are_granted_least_held_first_then_in_arrival_order() -> None:
    budget = Budget(MiB)
    (hog, *line), granted = peers(budget, 5)
    holds = [400 * KiB, 50 * KiB, 200 * KiB, 50 * KiB]
    hog.hold(MiB)
    for peer, held in zip(line, holds, strict=True):
        peer.hold(held)  # over the limit: held bytes that end later
        assert not budget.admit(peer, 100 * KiB)
    hog.hold(MiB - 250 * KiB)
    assert granted == []  # still over: nothing is free
    hog.hold(0)
    # Room for three frames of 100 KiB after what the line holds itself: the two that
    # hold 50 KiB (in arrival order), then 200 KiB; the one holding 400 KiB waits.
    assert granted == [line[1], line[3], line[2]]
    line[0].hold(0)
    assert granted == [line[1], line[3], line[2], line[0]]


def test_the_head_of_the_line_is_never_skipped_for_a_smaller_frame() -> None:
    budget = Budget(MiB)
    (hog, large, small), granted = peers(budget, 3)
    small.hold(FLOOR)  # past the floor: it waits like anyone
    hog.hold(MiB)
    assert not budget.admit(large, 600 * KiB)  # holds least: the head
    assert not budget.admit(small, 10 * KiB)
    hog.hold(MiB - 200 * KiB)
    assert granted == []  # room for small, but large came first and holds less
    hog.hold(0)
    assert granted == [large, small]


def test_a_holder_that_is_gone_leaves_the_line_and_its_reservation() -> None:
    budget = Budget(MiB)
    (hog, gone, stays), granted = peers(budget, 3)
    assert budget.admit(gone, 900 * KiB)
    assert not budget.admit(stays, 500 * KiB)
    budget.forget(gone)
    budget.forget(gone)  # twice is harmless
    assert granted == [stays]
    hog.hold(MiB)
    assert not budget.admit(gone, 500 * KiB)
    budget.forget(gone)
    assert budget.waiting == 0


def test_event_bytes_count_against_requests_only_up_to_their_share() -> None:
    budget = Budget(4 * MiB)
    (_subscribers, caller), _ = peers(budget, 2)
    budget.update(0, 3 * MiB, events_change=3 * MiB)  # stalled subscribers' events
    assert budget.events_over() and budget.event_share == MiB
    assert budget.room() == 3 * MiB  # the requests' part is untouched
    assert budget.admit(caller, 2 * MiB)
    assert not budget.over()
    budget.update(3 * MiB, MiB // 2, events_change=-(5 * MiB // 2))
    assert not budget.events_over()
    assert budget.room() == 4 * MiB - MiB // 2 - 2 * MiB


def test_used_follows_every_update_and_over_says_when_past_the_limit() -> None:
    budget = Budget(MiB)
    (a, b), _ = peers(budget, 2)
    a.hold(600 * KiB)
    b.hold(500 * KiB)
    assert budget.used == 1100 * KiB and budget.over()
    b.hold(0)
    a.hold(100)
    assert budget.used == 100 and not budget.over()


# --- EventBacklog ------------------------------------------------------------


def event(i: int, size: int = 10) -> EchoEvent:
    return EchoEvent(message=str(i).rjust(size, "x"), echo_count=1)


def test_event_size_counts_utf8_bytes() -> None:
    assert event_size(EchoEvent(message="abc", echo_count=1)) == EVENT_OVERHEAD + 3
    assert event_size(EchoEvent(message="é☃", echo_count=1)) == EVENT_OVERHEAD + 5


def test_backlog_drops_the_oldest_past_the_count() -> None:
    backlog = EventBacklog(max_count=3, max_bytes=MiB)
    lost = [backlog.hold(event(i)) for i in range(5)]
    assert lost == [0, 0, 0, 1, 1]
    assert len(backlog) == 3 and backlog.dropped == 2
    assert backlog.bytes == 3 * event_size(event(0))
    assert [e.message[-1] for e in backlog.take()] == ["2", "3", "4"]
    assert backlog.bytes == 0 and len(backlog) == 0
    assert backlog.take_dropped() == 2
    assert backlog.take_dropped() == 0


def test_backlog_drops_the_oldest_past_the_bytes() -> None:
    size = event_size(event(0, 1000))
    backlog = EventBacklog(max_count=1000, max_bytes=5 * size)
    for i in range(12):
        backlog.hold(event(i, 1000))
    assert len(backlog) == 5 and backlog.bytes == 5 * size
    assert backlog.dropped == 7
    # One event bigger than the whole byte bound cannot be kept either.
    assert backlog.hold(event(99, 10 * size)) == 6
    assert len(backlog) == 0 and backlog.bytes == 0 and backlog.dropped == 13


def test_every_event_is_either_taken_or_counted_as_dropped() -> None:
    backlog = EventBacklog(max_count=7, max_bytes=40 * event_size(event(0)))
    taken = dropped = 0
    for i in range(1000):
        backlog.hold(event(i, 1 + i % 97))
        if i % 13 == 0:
            backlog.drop_oldest()
        if i % 101 == 0:
            taken += len(backlog.take())
            dropped += backlog.take_dropped()
    taken += len(backlog.take())
    dropped += backlog.take_dropped()
    assert taken + dropped == 1000
    assert backlog.drop_oldest() == 0  # empty: nothing to drop, nothing counted
    assert backlog.dropped == 0


# --- RequestReader.abandon_frame ---------------------------------------------


def test_abandon_frame_skips_the_rest_and_keeps_the_stream_in_sync() -> None:
    big = encode_request(b"echo", b"\xa0" * 1000)
    reader = RequestReader()
    reader.receive_data(big[:300])
    assert reader.next_event() is None and reader.buffered == 300
    assert reader.abandon_frame() == "echo"
    assert reader.buffered == 0 and reader.in_frame  # still skipping what is owed
    after = encode_request(b"version", b"\xa0")
    rest = big[300:] + after
    for i in range(0, len(rest), 97):  # the skip spans many reads
        reader.receive_data(rest[i : i + 97])
    assert reader.next_event() == Request("version", b"\xa0")
    assert reader.next_event() is None and not reader.in_frame


def test_abandon_frame_with_nothing_to_abandon() -> None:
    reader = RequestReader()
    assert reader.abandon_frame() is None  # empty
    whole = encode_request(b"version", b"\xa0")
    reader.receive_data(whole)
    assert reader.abandon_frame() is None  # whole: the driver's to take
    assert reader.next_event() == Request("version", b"\xa0")
    reader.receive_data(whole[:6])  # the header is not all here: no method to name
    assert reader.abandon_frame() is None
    reader.receive_data(whole[6:])
    assert reader.next_event() == Request("version", b"\xa0")


def test_abandon_frame_keeps_whole_frames_before_the_partial_one() -> None:
    first = encode_request(b"version", b"\xa0")
    partial = encode_request(b"complex", b"\x00" * 500)[:100]
    reader = RequestReader()
    reader.receive_data(first + partial)
    assert reader.next_event() == Request("version", b"\xa0")
    assert reader.abandon_frame() == "complex"
    reader.receive_data(b"\x00" * (4 + 7 + 4 + 500 - 100) + first)
    assert reader.next_event() == Request("version", b"\xa0")


def test_abandon_frame_of_a_refused_frame_is_nothing() -> None:
    reader = RequestReader(max_frame_size=10)
    reader.receive_data(encode_request(b"echo", b"\x00" * 50)[:30])
    assert isinstance(reader.next_event(), Rejected)
    assert reader.abandon_frame() is None  # already being skipped and answered


# --- check_items: max_items on the bytes, before cbor2 builds anything ----------


def entries(item: object) -> int:
    """The reference count: array and map entries at every level."""
    if isinstance(item, dict):
        return len(item) + sum(entries(k) + entries(v) for k, v in item.items())
    if isinstance(item, list):
        return len(item) + sum(map(entries, item))
    return 0


@pytest.mark.parametrize(
    "item",
    [
        {"req": {"messages": [{"a": [1, 2.5, None]}] * 40, "tags": ["t" * 300] * 30}},
        [[[]] * 9] * 9,
        {"k" * 5000: [True, False, -(2**63), 2**64 - 1, b"b" * 70000, 1.0e300]},
        [cbor2.CBORSimpleValue(99)] * 50,
    ],
    ids=["nested", "lists of lists", "long strings and wide ints", "simple values"],
)
def test_check_items_counts_what_the_decoded_item_holds(item: object) -> None:
    payload = cbor2.dumps(item)
    count = entries(cbor2.loads(payload))
    check_items(payload, count)  # exactly at the bound: accepted
    if len(payload) > count - 1:
        with pytest.raises(DecodeError, match=f"more than {count - 1} array and map entries"):
            check_items(payload, count - 1)


@pytest.mark.parametrize("item", [0, {}, []], ids=["ints", "empty maps", "empty lists"])
def test_check_items_refuses_a_million_entries_from_their_header(item: object) -> None:
    payload = cbor2.dumps({"req": {"messages": [item] * 1_000_000}})
    with pytest.raises(DecodeError, match="more than 4096"):
        check_items(payload, 4096)


def test_check_items_leaves_what_it_cannot_read_to_the_decoder() -> None:
    check_items(b"\x9f" + b"\x00" * 5000 + b"\xff", 10)  # indefinite: the decoder refuses
    check_items(cbor2.dumps([["a" * 100] * 3])[:150], 10)  # truncated: the decoder refuses
    with pytest.raises(DecodeError):
        check_items(b"\x9a\x00\x01\x00\x00" + b"\x00" * 20, 10)  # 65536 announced
    check_items(b"\xc1" + cbor2.dumps("s" * 100), 10)  # a tag: the decoder refuses it


class _Recording(StrictDecoder):
    """A decoder that records each payload it is asked to build."""

    __slots__ = ("decoded",)

    def __init__(self) -> None:
        super().__init__()
        self.decoded: list[int] = []

    def decode(self, data: bytes) -> object:
        self.decoded.append(len(data))
        return super().decode(data)


@pytest.mark.parametrize("build", ["decode_params", "plan"])
def test_a_payload_over_max_items_is_refused_before_cbor2_builds_it(build: str) -> None:
    payload = cbor2.dumps({"req": {"messages": [{}] * 1_000_000, "tags": []}})
    decoder = _Recording()
    call = (
        plan(COMPLEX, Timer(), decoder, 4096)
        if build == "plan"
        else lambda p: COMPLEX.decode_params(p, max_items=4096, decoder=decoder)
    )
    with pytest.raises(DecodeError, match="complex: invalid request: more than 4096"):
        call(payload)
    assert decoder.decoded == []
    small = cbor2.dumps({"req": {"messages": [], "tags": []}})
    COMPLEX.decode_params(small, max_items=4096, decoder=decoder)
    assert decoder.decoded == [len(small)]  # the recorder does record


def test_give_up_drops_the_partial_frame_and_everything_after() -> None:
    reader = RequestReader()
    reader.receive_data(encode_request(b"echo", b"\xa0" * 100)[:50])
    assert reader.in_frame and reader.buffered == 50
    reader.give_up()
    assert not reader.in_frame and reader.buffered == 0
    reader.receive_data(encode_request(b"version", b"\xa0"))
    assert reader.next_event() is None  # nothing after a violation is taken
