"""A server connection's parts, each alone: reply order, budget charges, endings, subscriber.

The end-to-end behaviour is tested against real servers elsewhere; these pin
each part's own contract against stand-ins for the connection it serves.
"""

from __future__ import annotations

import asyncio
from typing import Any

from timer_sdk.limits import ServerStats
from timer_sdk.models import EchoEvent
from timer_sdk.serving.charges import Charges
from timer_sdk.serving.endings import Endings
from timer_sdk.serving.replies import Replies, _Slot
from timer_sdk.serving.subscriber import Subscriber
from timer_sdk.wire.backlog import EventBacklog
from timer_sdk.wire.budget import EVENT_FLOOR, Budget
from timer_sdk.wire.framing import Request, RequestReader, encode_request


class _Transport:
    """As much of a transport as the parts read."""

    def __init__(self, unsent: int = 0) -> None:
        self.unsent = unsent
        self.closed = False

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def close(self) -> None:
        self.closed = True


class _Owner:
    """A connection as its parts see it: state, and a record of what they called."""

    def __init__(self, transport: Any = None) -> None:
        self._transport: Any = transport
        self._lingering = False
        self._peer = "peer"
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading_paused = False
        self._writing_paused = False
        self._shutting_down = False
        self._peer_done = False
        self._goaway = False
        self.calls: list[str] = []
        self.answered: list[bytes] = []
        self.processed = asyncio.Event()

    def _answer(self, frame: bytes) -> None:
        self.answered.append(frame)

    def _caught_up(self) -> None:
        self.calls.append("caught_up")

    def _stop_events(self) -> None:
        self.calls.append("stop_events")

    def _schedule_flush(self) -> None:
        self.calls.append("flush")

    def _process(self) -> None:
        self.processed.set()

    def _recharge(self) -> None:
        self.calls.append("recharge")

    def _pause_reading(self, pause: bool) -> None:
        self.calls.append(f"pause {pause}")

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)

    def _fill(self, slot: _Slot, frame: bytes) -> None:
        self.calls.append("fill")

    def _flush(self) -> None:
        self.calls.append("write")


def test_replies_leave_in_request_order_whatever_order_they_finish_in() -> None:
    replies = Replies()
    assert replies.answer(b"now")  # nothing before it: straight to out
    first = replies.open(100)
    second = replies.open(50)
    assert not replies.answer(b"after")  # waits behind the two running
    assert replies.held == 100 + 50 + len(b"after")
    replies.fill(second, b"2nd")
    assert replies.out == [b"now"]  # the first is still running
    assert replies.held == 100 + len(b"2nd") + len(b"after")
    replies.fill(first, b"1st")
    assert replies.out == [b"now", b"1st", b"2nd", b"after"]
    assert replies.held == 0
    assert not replies.slots


def test_charges_tell_the_budget_what_the_connection_holds() -> None:
    budget = Budget(10_000)
    replies = Replies()
    owner = _Owner(_Transport())
    backlog = EventBacklog(max_count=10, max_bytes=10_000)
    charges = Charges(
        owner, budget=budget, stats=ServerStats(), reader=RequestReader(), backlog=backlog,
        replies=replies, reclaim=lambda: None,
    )  # fmt: skip
    replies.open(300)
    charges.event_pending = 40
    charges.recharge()
    assert charges.held == budget.used == 340
    assert budget.events == 40
    owner._transport.unsent = 200  # written, not yet sent: held too
    charges.refresh_charge()
    assert charges.held == budget.used == 540
    owner._transport.unsent = 0  # the peer read it all
    charges.refresh_charge()
    assert budget.used == 340
    assert owner.calls == ["caught_up", "flush"]


def test_charges_refuse_a_frame_larger_than_the_whole_budget() -> None:
    budget = Budget(1000)
    owner = _Owner(_Transport())
    stats = ServerStats()
    reader = RequestReader()
    charges = Charges(
        owner, budget=budget, stats=stats, reader=reader,
        backlog=EventBacklog(max_count=1, max_bytes=1), replies=Replies(), reclaim=lambda: None,
    )  # fmt: skip
    reader.receive_data(encode_request(b"echo", b"x" * 5000)[:40])  # the head of a big frame
    assert charges.admitted()  # refused, and its rest skipped: reading goes on
    assert stats.budget_refusals == 1
    [frame] = owner.answered
    assert b"can never fit in the memory budget of 1000 bytes" in frame


async def test_endings_give_a_slow_frame_its_deadline_and_then_close() -> None:
    loop = asyncio.get_running_loop()
    owner = _Owner(_Transport())
    stats = ServerStats()
    reader = RequestReader()
    budget = Budget(10_000)
    endings = Endings(
        owner, loop=loop, stats=stats, reader=reader, replies=Replies(), budget=budget,
        holder=Charges(
            owner, budget=budget, stats=stats, reader=reader,
            backlog=EventBacklog(max_count=1, max_bytes=1), replies=Replies(),
            reclaim=lambda: None,
        ),
        frame_timeout=0.05, idle_timeout=None,
    )  # fmt: skip
    endings.frame_clock(True, False)
    assert endings.frame_deadline is None  # between frames: no deadline runs
    reader.receive_data(encode_request(b"echo", b"x" * 100)[:20])
    endings.frame_clock(False, False)
    assert endings.frame_deadline is None  # paused by our own choice: the clock stops
    endings.frame_clock(True, False)
    assert endings.frame_deadline is not None
    await asyncio.wait_for(owner.processed.wait(), 5)
    assert owner._shutting_down
    assert stats.frame_timeouts == 1
    assert not reader.in_frame  # the partial frame was given up


async def test_the_subscriber_answers_extensions_and_sends_events_in_the_next_write() -> None:
    owner = _Owner(_Transport())
    stats = ServerStats()
    budget = Budget(10_000)
    replies = Replies()
    backlog = EventBacklog(max_count=10, max_bytes=10_000)
    charges = Charges(
        owner, budget=budget, stats=stats, reader=RequestReader(), backlog=backlog,
        replies=replies, reclaim=lambda: None,
    )  # fmt: skip
    server: Any = type("Host", (), {"loop": asyncio.get_running_loop(), "bus": None})()
    sub = Subscriber(
        owner, server=server, stats=stats, budget=budget, backlog=backlog, replies=replies,
        charges=charges, max_depth=16,
    )  # fmt: skip
    frame = sub.dispatch(Request("no.such", b"\xa0"))
    assert frame is not None and b"unknown method: no.such" in frame
    assert stats.error_replies == 1
    assert not sub.events_paused
    sub.send_event(b"event-frame")
    assert replies.out == [b"event-frame"]
    assert charges.event_pending == len(b"event-frame")
    assert stats.events_sent == 1
    assert owner.calls == ["recharge", "flush"]


class _Peer(_Owner):
    """A subscriber's connection that charges for real; its writes all reach the peer."""

    def __init__(self, budget: Budget, stats: ServerStats) -> None:
        super().__init__(_Transport())
        self.replies = Replies()
        self.backlog = EventBacklog(max_count=10_000, max_bytes=10 << 20)
        self.charges = Charges(
            self, budget=budget, stats=stats, reader=RequestReader(), backlog=self.backlog,
            replies=self.replies, reclaim=lambda: None,
        )  # fmt: skip
        host: Any = type("Host", (), {"loop": None, "bus": None})()
        self.sub = Subscriber(
            self, server=host, stats=stats, budget=budget, backlog=self.backlog,
            replies=self.replies, charges=self.charges, max_depth=16,
        )  # fmt: skip
        self.written = 0

    def _recharge(self) -> None:
        self.charges.recharge()

    def _flush(self) -> None:
        self.written += len(self.replies.out)
        self.replies.out.clear()
        self.charges.event_pending = 0
        self.charges.recharge()

    def fire(self, event: EchoEvent) -> None:
        if self.sub.events_paused:
            self.sub.hold_event(event)
        else:
            self.sub.send_event(b"f" * 1064)


def test_past_the_share_only_subscribers_over_their_part_lose_events() -> None:
    budget = Budget(4 << 20)  # a share of 1 MiB
    stats = ServerStats()
    stalled, slow, reader = (_Peer(budget, stats) for _ in range(3))
    budget.split(3)
    part = budget.event_part
    assert part == (1 << 20) // 3
    stalled._writing_paused = slow._writing_paused = True  # neither reads
    event = EchoEvent(message="e" * 1000, echo_count=1)
    for n in range(3000):
        stalled.fire(event)
        if n < 200:  # about 200 KiB: under its part
            slow.fire(event)
        reader.fire(event)
    assert stalled.backlog.dropped > 2000  # its own oldest went
    assert slow.backlog.dropped == 0 and len(slow.backlog) == 200
    assert reader.backlog.dropped == 0 and reader.written + len(reader.replies.out) == 3000
    assert reader.written  # a burst went to the socket before its turn ended
    assert budget.events <= budget.event_share + 2 * 1064
    # A server that needs the room takes every backlog down to the floor, no further.
    for peer in (stalled, slow):
        peer.sub.shed_backlog()
        assert peer.charges.events_charged <= EVENT_FLOOR
    assert len(slow.backlog) == EVENT_FLOOR // 1064
    reader.sub.shed_backlog()  # nothing held: nothing to give
    assert stats.events_dropped == stalled.backlog.dropped + slow.backlog.dropped
    reader._transport = None  # gone: an event for it is sent nowhere
    sent = stats.events_sent
    reader.sub.send_event(b"f" * 1064)
    assert stats.events_sent == sent


def test_the_event_share_is_split_among_subscribers_down_to_a_floor() -> None:
    budget = Budget(64 << 20)
    assert budget.event_part == budget.event_share  # one subscriber, or none yet
    budget.split(40)
    assert budget.event_part == (16 << 20) // 40
    budget.split(1000)
    assert budget.event_part == EVENT_FLOOR
    budget.split(0)
    assert budget.event_part == budget.event_share
