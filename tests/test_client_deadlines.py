"""Call deadlines: one timer per connection, armed for the earliest deadline.

Scripted servers on loopback decide exactly when each reply comes, so every
test knows which calls must time out and which must not; a deadline is waited
for only where it is the thing under test.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest

from timer_sdk import CallTimeout, ConnectionLost, TimerClient
from timer_sdk.wire.framing import encode_reply, encode_request

from .conftest import wait_until
from .test_client_replies import VERSION_FRAME, ok, scripted

FRAME = len(VERSION_FRAME)


def _deadlines_idle(client: TimerClient) -> bool:
    deadlines = client._protocol.deadlines
    return len(deadlines) == 0 and deadlines._timer is None


async def test_calls_with_different_timeouts_expire_in_deadline_order() -> None:
    timeouts = [0.4, 0.1, 0.3, 0.1, 0.25, 0.05]
    answer = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(timeouts) * FRAME)
        await answer.wait()  # every call has timed out: the late replies, then a fresh one's
        await reader.readexactly(FRAME)
        writer.write(b"".join(ok(f"late{i}") for i in range(len(timeouts))) + ok("fresh"))

    async with scripted(script) as client:
        order: list[int] = []

        def record(i: int) -> Callable[[object], None]:
            return lambda _: order.append(i)

        calls = [asyncio.create_task(client.version(timeout=t)) for t in timeouts]
        for i, call in enumerate(calls):
            call.add_done_callback(record(i))
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result, timeout in zip(results, timeouts, strict=True):
            assert isinstance(result, CallTimeout), result
            assert str(result) == f"version: no reply within {timeout} s"
        # Ties (0.1) in call order; the timer re-armed for each next deadline.
        assert order == sorted(range(len(timeouts)), key=lambda i: (timeouts[i], i))
        assert _deadlines_idle(client)
        assert client.pending == len(timeouts)  # their replies are still owed
        answer.set()
        assert await client.version(timeout=5) == "fresh"
        assert client.pending == 0


class _Steps:
    """A server thread on a Unix socket: per step, read that many bytes, then send those.

    Nothing is sent before ``go`` is set (at once, unless ``wait_for_go``);
    ``replied`` is set once the first step's bytes are sent. After the last
    step it reads until the client closes.
    """

    def __init__(
        self, path: str, steps: list[tuple[int, bytes]], wait_for_go: bool = False
    ) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.steps = steps
        self.replied = threading.Event()
        self.go = threading.Event()
        if not wait_for_go:
            self.go.set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _read(self, conn: socket.socket, size: int) -> None:
        data = b""
        while len(data) < size:
            more = conn.recv(size - len(data))
            if not more:
                return
            data += more

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            for size, reply in self.steps:
                self._read(conn, size)
                self.go.wait(30)
                conn.sendall(reply)
                self.replied.set()
            while conn.recv(65536):
                pass

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


def _hold_the_loop(sock: socket.socket, until: float) -> None:
    """Return once ``sock`` is readable and the loop's clock reached ``until``, the loop held.

    In the next iteration asyncio reads first, then runs the timers that are due.
    """
    loop = asyncio.get_running_loop()
    readable, _, _ = select.select([sock], [], [], 30)
    assert readable
    while loop.time() < until:
        time.sleep(0.01)  # the point: nothing else may run


async def test_a_reply_due_with_its_deadline_wins_and_a_missing_one_times_out(
    tmp_path: Path,
) -> None:
    """Two calls share one deadline; at that instant the first's reply is in the socket.

    The loop is held (no await) until the reply is readable and the deadline has
    passed: in the next iteration asyncio reads first, then runs the timer.
    """
    path = str(tmp_path / "due.sock")
    # Two requests, the first answered; the rest answered once a third request comes.
    steps = [(2 * FRAME, ok("first")), (FRAME, ok("second, late") + ok("third"))]
    server = _Steps(path, steps, wait_for_go=True)
    try:
        async with await TimerClient.connect(f"unix:{path}") as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            first = asyncio.create_task(client.version(timeout=0.05))
            second = asyncio.create_task(client.version(timeout=0.05))
            protocol = client._protocol
            while client.pending < 2 or protocol._corked:  # both written, not yet answered
                await asyncio.sleep(0)
            # From here the loop is held: the reply cannot be read before the deadline.
            server.go.set()
            assert server.replied.wait(30)
            assert protocol.transport is not None
            _hold_the_loop(protocol.transport.get_extra_info("socket"), started + 0.1)
            outcomes = await asyncio.gather(first, second, return_exceptions=True)
            assert outcomes[0] == "first"
            assert isinstance(outcomes[1], CallTimeout)
            assert _deadlines_idle(client)
            # The second's late reply is dropped in its place.
            assert await client.version(timeout=5) == "third"
    finally:
        server.close()


async def test_cancelling_calls_while_their_deadlines_are_armed() -> None:
    answer = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(2 * FRAME)
        await answer.wait()
        writer.write(ok("cancelled") + ok("timed out"))
        # The held call was never sent: the next request is the fresh call's.
        third = await reader.readexactly(FRAME)
        writer.write(ok("fresh" if third == VERSION_FRAME else f"unexpected {third!r}"))

    async with scripted(script, max_pending=2) as client:
        cancelled = asyncio.create_task(client.version(timeout=1.0))
        timed_out = asyncio.create_task(client.version(timeout=1.0))
        await wait_until(lambda: client.pending == 2)
        held = asyncio.create_task(client.call_raw("held", timeout=1.0))
        await wait_until(lambda: bool(client._protocol._queue))  # no room: it waits unsent
        cancelled.cancel()
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        with pytest.raises(asyncio.CancelledError):
            await held
        assert not client._protocol._queue
        # The deadline still fires for the call that was not cancelled, and only for it.
        with pytest.raises(CallTimeout, match=r"version: no reply within 1\.0 s"):
            await timed_out
        assert _deadlines_idle(client)
        answer.set()
        assert await client.version(timeout=5) == "fresh"
        assert client.pending == 0


async def test_connection_loss_fails_calls_and_disarms_their_deadlines() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(3 * FRAME)
        writer.transport.abort()

    async with scripted(script) as client:
        calls = [asyncio.create_task(client.version(timeout=timeout)) for timeout in (5, 10, None)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, ConnectionLost) for r in results), results
        assert _deadlines_idle(client)


async def test_entries_of_settled_calls_stay_bounded(client: TimerClient) -> None:
    # Each call its own timeout (a deadline budget passed down): nothing shares a
    # FIFO front, so settled entries go only by the sweep.
    width, waves = 100, 20
    for wave in range(waves):
        replies = await asyncio.gather(
            *(client.version(timeout=5 + (wave * width + i) / 1000) for i in range(width))
        )
        assert len(set(replies)) == 1
    deadlines = client._protocol.deadlines
    assert len(deadlines) <= 2 * width + 64  # not width * waves
    assert deadlines._timer is not None  # still armed: the earliest deadline is seconds away


async def test_a_subscribe_reply_due_with_the_client_timeout_wins(tmp_path: Path) -> None:
    """A subscribe waits under the client's timeout; its reply and that deadline come at once."""
    path = str(tmp_path / "due.sock")
    subscribe = encode_request(b"events.subscribe", b"\xa0")
    reply = encode_reply(0, cbor2.dumps({"events": []}))
    server = _Steps(path, [(len(subscribe), reply)], wait_for_go=True)
    try:
        async with await TimerClient.connect(f"unix:{path}", timeout=0.1) as client:
            loop = asyncio.get_running_loop()
            opening = asyncio.create_task(client.events().__aenter__())
            protocol = client._protocol
            while client.pending < 1 or protocol._corked:  # written, not yet read
                await asyncio.sleep(0)
            # From here the loop is held: the reply cannot be read before the deadline.
            due = loop.time() + 0.1  # the deadline is no later: the call started before now
            server.go.set()
            assert server.replied.wait(30)
            assert protocol.transport is not None
            _hold_the_loop(protocol.transport.get_extra_info("socket"), due)
            events = await opening  # not CallTimeout: the server did subscribe it
            assert not events.closed
            assert protocol.subscriptions == [events]
            await events.aclose()
    finally:
        server.close()
