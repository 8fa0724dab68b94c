"""The sans-I/O pieces of the server-wide budget: Budget, EventBacklog, abandon_frame,
check_items."""

from __future__ import annotations

import cbor2
import pytest

from timer_sdk.api import COMPLEX
from timer_sdk.backlog import EVENT_OVERHEAD, EventBacklog, event_size
from timer_sdk.budget import READ_HEADROOM, Budget
from timer_sdk.codec import DecodeError, StrictDecoder, check_items
from timer_sdk.framing import Rejected, Request, RequestReader, encode_request
from timer_sdk.models import EchoEvent
from timer_sdk.plans import plan
from timer_sdk.timer import Timer

KiB = 1024
MiB = 1024 * KiB


class Peer:
    """A holder: reports its bytes to the budget and records its grants."""

    def __init__(self, budget: Budget, granted: list[Peer], name: str) -> None:
        self.budget = budget
        self.held = 0
        self.granted = granted
        self.name = name
        self.frame_needs = 0  # between frames: a grant is one read

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


def test_a_holder_may_read_while_a_read_fits() -> None:
    budget = Budget(4 * MiB)
    (a, b), _ = peers(budget, 2)
    a.hold(4 * MiB - READ_HEADROOM)
    assert budget.may_read(a) and budget.may_read(b)  # exactly one read still fits
    assert budget.waiting == 0
    a.hold(4 * MiB - READ_HEADROOM + 1)
    assert not budget.may_read(b)
    assert budget.waiting == 1
    assert not budget.may_read(b)  # asking again keeps its place, once
    assert budget.waiting == 1


def test_used_follows_every_update_and_over_says_when_past_the_limit() -> None:
    budget = Budget(MiB)
    (a, b), _ = peers(budget, 2)
    a.hold(600 * KiB)
    b.hold(500 * KiB)
    assert budget.used == 1100 * KiB and budget.over()
    b.hold(0)
    a.hold(100)
    assert budget.used == 100 and not budget.over()


def test_freed_bytes_go_to_the_longest_waiter_first() -> None:
    budget = Budget(2 * MiB)
    (hog, *line), granted = peers(budget, 5)
    hog.hold(2 * MiB)
    for peer in line:
        assert not budget.may_read(peer)
    assert budget.waiting == 4
    hog.hold(2 * MiB - READ_HEADROOM)  # room for exactly one read
    assert granted == line[:1]
    # Grants reserve nothing: room for two reads, counted afresh, goes to the next two.
    hog.hold(2 * MiB - 2 * READ_HEADROOM)
    assert granted == line[:3]
    hog.hold(0)
    assert granted == line
    assert budget.waiting == 0


def test_nothing_is_granted_until_a_whole_read_fits() -> None:
    budget = Budget(MiB)
    (hog, waiter), granted = peers(budget, 2)
    hog.hold(MiB)
    assert not budget.may_read(waiter)
    hog.hold(MiB - READ_HEADROOM + 1)
    assert granted == []
    hog.hold(MiB - READ_HEADROOM)
    assert granted == [waiter]


def test_a_holder_over_its_fair_share_yields_while_others_wait() -> None:
    budget = Budget(4 * MiB)
    (greedy, modest, *line), granted = peers(budget, 10)
    modest.hold(100 * KiB)
    greedy.hold(3 * MiB)
    assert budget.may_read(greedy)  # room remains and nobody waits: anyone may read
    greedy.hold(4 * MiB - 100 * KiB)
    for peer in line:
        peer.hold(1)
        assert not budget.may_read(peer)
    greedy.hold(4 * MiB - 100 * KiB - 8 - READ_HEADROOM)  # room for one read: the first has it
    assert granted == line[:1]
    # Room remains for one read, but others wait: the fair share (4 MiB / 10) decides.
    assert not budget.may_read(greedy)
    assert budget.may_read(modest)
    assert budget.waiting == len(line) - 1 + 1  # the greedy one joined the line


def test_a_holder_that_is_gone_leaves_the_line() -> None:
    budget = Budget(MiB)
    (hog, gone, stays), granted = peers(budget, 3)
    hog.hold(MiB)
    assert not budget.may_read(gone)
    assert not budget.may_read(stays)
    budget.forget(gone)
    budget.forget(gone)  # twice is harmless
    assert budget.waiting == 1
    hog.hold(0)
    assert granted == [stays]


def test_holders_are_counted_once_each_for_the_fair_share() -> None:
    budget = Budget(MiB)
    (a, b), _ = peers(budget, 2)
    a.hold(10)
    a.hold(20)
    b.hold(10)
    b.hold(0)
    assert budget._holders == 1  # only a holds anything
    a.hold(0)
    assert budget._holders == 0 and budget.used == 0


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
