"""``connect(..., connections=N)``: calls spread over connections, never behind a slow one."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import struct
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import cbor2
import pytest

from timer_sdk import (
    CallTimeout,
    ClientClosedError,
    ConnectError,
    ConnectionLost,
    EchoEvent,
    EchoRequest,
    EchoResponse,
    EventsMayHaveBeenMissed,
    Limits,
    LoopError,
    Server,
    Timer,
    TimerClient,
    TimerConfig,
    sync,
)
from timer_sdk.pool import _PooledClient, connect_pool

from .conftest import wait_until
from .test_sync import ThreadServer

T = TypeVar("T")


class _GatedTimer(Timer):
    """Holds each echo named ``gated...`` until its own gate opens."""

    def __init__(self) -> None:
        super().__init__(TimerConfig(name="ipc-server"))
        self.gates: dict[str, asyncio.Event] = {}

    async def echo(self, req: EchoRequest) -> EchoResponse:
        if req.message.startswith("gated"):
            await self.gates.setdefault(req.message, asyncio.Event()).wait()
        return await super().echo(req)


async def test_a_quick_call_does_not_wait_behind_a_slow_one(address: str) -> None:
    timer = _GatedTimer()
    async with (
        await timer.serve(address) as server,
        await TimerClient.connect(server.address, connections=2, timeout=30) as client,
    ):
        assert isinstance(client, TimerClient)
        slow = asyncio.create_task(client.echo(EchoRequest(message="gated", delay_ms=0)))
        await wait_until(lambda: len(server.tasks) == 1)  # the echo is held on the server
        # version returns while the echo is still held: it did not wait behind it.
        assert (await asyncio.wait_for(client.version(), 30)).startswith("timer-sdk v")
        assert not slow.done()
        assert len(server.connections) == 2
        timer.gates["gated"].set()
        assert (await slow).echoed == "gated"
        # The control: on one connection, version waits for the echo's reply.
        async with await TimerClient.connect(server.address, timeout=30) as one:
            slow = asyncio.create_task(one.echo(EchoRequest(message="gated1", delay_ms=0)))
            quick = asyncio.create_task(one.version())
            await wait_until(lambda: len(server.tasks) == 1)
            done, _ = await asyncio.wait({quick}, timeout=0.2)
            assert not done
            timer.gates["gated1"].set()
            assert (await slow).echoed == "gated1"
            assert (await quick).startswith("timer-sdk v")


async def test_concurrent_calls_land_on_different_connections(address: str) -> None:
    # Replies leave a connection in request order, so a call released while an
    # earlier one on the same connection is held cannot return. Released last
    # first, each returning at once shows that none shares a connection.
    timer = _GatedTimer()
    n = 4
    async with (
        await timer.serve(address) as server,
        await TimerClient.connect(server.address, connections=n, timeout=30) as client,
    ):
        names = [f"gated{i}" for i in range(n)]
        tasks = [
            asyncio.create_task(client.echo(EchoRequest(message=m, delay_ms=0))) for m in names
        ]
        await wait_until(lambda: len(server.tasks) == n)  # all n are held on the server
        for i in reversed(range(n)):
            timer.gates[names[i]].set()
            assert (await asyncio.wait_for(tasks[i], 30)).echoed == names[i]
            assert not any(t.done() for t in tasks[:i])
        assert client.pending == 0


async def test_a_call_goes_to_the_connection_with_fewest_pending_not_the_next_in_turn(
    address: str,
) -> None:
    timer = _GatedTimer()
    async with (
        await timer.serve(address) as server,
        await TimerClient.connect(server.address, connections=2, timeout=30) as client,
    ):
        assert isinstance(client, _PooledClient)
        first, second = client._members
        tasks: dict[str, asyncio.Task[EchoResponse]] = {}

        async def held(name: str) -> None:
            tasks[name] = asyncio.create_task(client.echo(EchoRequest(message=name, delay_ms=0)))
            await wait_until(lambda: client.pending == len(tasks))

        def loads() -> tuple[int, int]:
            return first.pending, second.pending

        await held("gated-a")
        await held("gated-b")
        assert loads() == (1, 1)  # ties go in turn; the first is next again
        await held("gated-c")
        await held("gated-d")
        assert loads() == (2, 2)
        timer.gates["gated-b"].set()
        await tasks.pop("gated-b")
        # The first connection is next in turn, but the second has fewer calls waiting.
        assert loads() == (2, 1)
        await held("gated-e")
        assert loads() == (2, 2)
        timer.gates["gated-d"].set()
        timer.gates["gated-e"].set()
        await tasks.pop("gated-d")
        await tasks.pop("gated-e")
        # An idle connection while the next in turn is busy: the call waits for nobody.
        assert loads() == (2, 0)
        await held("gated-f")
        assert loads() == (2, 1)
        for name in list(tasks):
            timer.gates[name].set()
            assert (await tasks.pop(name)).echoed == name


async def test_cancellations_and_timeouts_never_shift_replies_on_any_connection(
    server: Server,
) -> None:
    rng = random.Random(12)
    async with await TimerClient.connect(server.address, connections=3, timeout=30) as client:
        tasks = [
            asyncio.create_task(
                client.echo(EchoRequest(message=f"c{i}", delay_ms=rng.randint(0, 15)))
            )
            for i in range(600)
        ]
        await asyncio.sleep(0)  # every request is on the wire now
        doomed = set(rng.sample(range(len(tasks)), 300))
        for i in doomed:
            tasks[i].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, result in enumerate(results):
            if i in doomed:
                assert isinstance(result, asyncio.CancelledError)
            else:
                assert isinstance(result, EchoResponse) and result.echoed == f"c{i}", result
        for round_ in range(9):  # a late reply owed on each connection in turn
            with pytest.raises(CallTimeout):
                await client.echo(EchoRequest(message="late", delay_ms=300), timeout=0.01)
            fresh = await client.echo(EchoRequest(message=f"fresh{round_}", delay_ms=0))
            assert fresh.echoed == f"fresh{round_}"
        await wait_until(lambda: client.pending == 0)


async def test_a_lost_connection_fails_only_its_own_calls(address: str) -> None:
    timer = _GatedTimer()
    async with (
        await timer.serve(address) as server,
        await TimerClient.connect(server.address, connections=2, timeout=30) as client,
    ):
        held = asyncio.create_task(client.echo(EchoRequest(message="gated", delay_ms=0)))
        await wait_until(lambda: len(server.tasks) == 1)
        [carrier] = [m for m in client._members if m.pending]  # type: ignore[attr-defined]
        carrier._protocol.transport.abort()  # the connection that carries the held call is lost
        with pytest.raises(ConnectionLost):
            await held
        for _ in range(4):  # every new call goes to the connection that is left
            assert await client.version()
        assert not client.closed
        assert "1 of 2 connections open" in repr(client)
        for conn in list(server.connections):
            conn.abort()
        await wait_until(lambda: client.closed)
        with pytest.raises(ConnectionLost):
            await client.version()
        assert "broken" in repr(client)
        timer.gates["gated"].set()


async def test_with_reconnect_a_lost_connection_is_reopened(server: Server) -> None:
    async with await TimerClient.connect(
        server.address, connections=2, reconnect=True, timeout=30
    ) as client:
        assert await client.version()
        next(iter(server.connections)).abort()
        await wait_until(lambda: "1 of 2" in repr(client))
        for _ in range(4):
            assert await client.version()
        await wait_until(lambda: "2 of 2 connections open" in repr(client))
        await wait_until(lambda: len(server.connections) == 2)
    assert client.closed
    with pytest.raises(ClientClosedError):
        await client.version()


async def test_a_connection_dropped_again_and_again_is_reopened_ever_more_slowly() -> None:
    # A full server accepts the second connection and drops it at once, every time.
    async with await Timer().serve("tcp:127.0.0.1:0", limits=Limits(max_connections=1)) as server:
        client = await TimerClient.connect(
            server.address, connections=2, reconnect=True, timeout=30
        )
        async with client:
            await wait_until(lambda: server.stats.connections_refused == 1)
            started = time.perf_counter()
            for _ in range(300):  # every call goes to the one that is left
                assert await client.version()
            elapsed = time.perf_counter() - started
            # Pauses of 50 ms doubling to 5 s between attempts bound them by elapsed time.
            bound = 3 + math.log2(1 + elapsed / 0.05) + elapsed / 5
            assert server.stats.connections_refused <= bound, (elapsed, server.stats)


async def test_events_use_one_connection(server: Server) -> None:
    async with (
        await TimerClient.connect(server.address, connections=3, timeout=30) as client,
        client.events() as first,
        client.events() as second,
    ):
        await wait_until(lambda: server.subscribers == 1)
        await asyncio.gather(
            *(client.echo(EchoRequest(message=str(i), delay_ms=0)) for i in range(6))
        )
        for events in (first, second):
            got = [await anext(events) for _ in range(6)]
            assert sorted(got, key=str) == sorted(
                (EchoEvent(message=str(i), echo_count=1) for i in range(6)), key=str
            )
        assert server.subscribers == 1


async def test_a_subscription_on_several_connections_survives_a_restart(address: str) -> None:
    timer = Timer()
    server = await timer.serve(address)
    try:
        client = await TimerClient.connect(
            server.address, connections=2, reconnect=True, timeout=30
        )
        async with client, client.events() as events:
            await server.close()
            await wait_until(lambda: client.pending == 0 and "0 of 2" in repr(client))
            server = await timer.serve(server.address)
            assert isinstance(await anext(events), EventsMayHaveBeenMissed)
            await wait_until(lambda: server.subscribers == 1)
            assert (await client.echo(EchoRequest(message="back", delay_ms=0))).echoed == "back"
            assert await anext(events) == EchoEvent(message="back", echo_count=1)
    finally:
        await server.close()


async def test_bad_connection_counts_are_refused(server: Server) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="connections must be an int of at least 1"):
            await TimerClient.connect(server.address, connections=bad)  # type: ignore[arg-type]


async def test_connect_is_all_or_nothing() -> None:
    server = await Timer().serve("tcp:127.0.0.1:0")
    address = server.address
    await server.close()
    with pytest.raises(ConnectError, match=f"cannot connect to {address}"):
        await TimerClient.connect(address, connections=3)


async def test_connect_closes_the_connections_it_made_when_another_fails(server: Server) -> None:
    made: list[TimerClient] = []
    calls = 0

    async def connect() -> TimerClient:
        nonlocal calls
        calls += 1
        if calls == 3:
            await wait_until(lambda: len(made) == 2)  # fails after the others are open
            raise ConnectError("cannot connect: the third refused")
        client = await TimerClient.connect(server.address)
        made.append(client)
        return client

    with pytest.raises(ConnectError, match="the third refused"):
        await connect_pool(3, connect, timeout=None, reconnect=False)
    assert len(made) == 2
    assert all(client.closed for client in made)
    await wait_until(lambda: not server.connections)


async def test_reconnect_is_set_on_every_connection(server: Server) -> None:
    async with await TimerClient.connect(server.address, connections=2) as client:
        assert isinstance(client, _PooledClient)
        assert client.reconnect is False
        client.reconnect = True
        assert client.reconnect is True
        assert all(member.reconnect for member in client._members)


async def test_a_pool_used_from_another_loop_says_so(server: Server) -> None:
    async with await TimerClient.connect(server.address, connections=2) as client:
        with pytest.raises(LoopError, match="belongs to another event loop"):
            await asyncio.to_thread(asyncio.run, client.version())


async def test_a_reopen_that_fails_leaves_the_calls_to_the_next_attempt(tmp_path: Path) -> None:
    server = await Timer().serve(f"unix:{tmp_path / 'gone.sock'}")
    client = await TimerClient.connect(server.address, connections=2, reconnect=True)
    assert isinstance(client, _PooledClient)
    try:
        await server.close()  # nobody listens: every reopen fails
        await wait_until(lambda: all(m._protocol.failure is not None for m in client._members))
        with pytest.raises(ConnectError):
            await client.version()
        await wait_until(lambda: not client._healing)  # each reopen gave up, quietly
        assert not client.closed
    finally:
        await client.close()


def test_blocking_client_one_threads_slow_call_does_not_stall_another() -> None:
    served = ThreadServer("tcp:127.0.0.1:0")
    try:
        with sync.TimerClient.connect(served.address, connections=2, timeout=30) as client:
            slow: list[str] = []
            thread = threading.Thread(
                target=lambda: slow.append(
                    client.echo(EchoRequest(message="gated", delay_ms=0)).echoed
                )
            )
            thread.start()
            assert served.timer.started.get(timeout=30) == "gated"  # held on the server
            # This thread's call returns while the other thread's is still held.
            assert client.echo(EchoRequest(message="mine", delay_ms=0)).echoed == "mine"
            assert thread.is_alive() and not slow
            served.open_gate()
            thread.join(30)
            assert slow == ["gated"]
    finally:
        served.stop()


# --- against a server that speaks only the base protocol ------------------------


class _BaseProtocolServer:
    """The base protocol by hand (struct + cbor2): in-order replies, one id per connection."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, str, Any]] = []  # (connection, method, payload)
        self.held: dict[str, asyncio.Event] = {}
        self._ids = itertools.count()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = next(self._ids)
        replies: asyncio.Queue[asyncio.Task[bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send_in_order(replies, writer))
        try:
            while True:
                (size,) = struct.unpack(">I", await reader.readexactly(4))
                method = (await reader.readexactly(size)).decode()
                (size,) = struct.unpack(">I", await reader.readexactly(4))
                payload = cbor2.loads(await reader.readexactly(size))
                self.requests.append((conn, method, payload))
                replies.put_nowait(asyncio.create_task(self._answer(method, payload)))
        except asyncio.IncompleteReadError:
            pass
        replies.put_nowait(None)
        await sender
        writer.close()

    async def _answer(self, method: str, payload: Any) -> bytes:
        if method == "version":
            body = cbor2.dumps("fake v1")
        elif method == "echo":
            message = payload["req"]["message"]
            if message in self.held:
                await self.held[message].wait()
            body = cbor2.dumps({"echoed": message, "timerName": "fake"})
        else:
            error = f"unknown method: {method}".encode()
            return struct.pack(">iI", 1, len(error)) + error
        return struct.pack(">iI", 0, len(body)) + body

    async def _send_in_order(
        self, replies: asyncio.Queue[asyncio.Task[bytes] | None], writer: asyncio.StreamWriter
    ) -> None:
        while (task := await replies.get()) is not None:
            writer.write(await task)


@pytest.fixture
async def base_server() -> AsyncIterator[tuple[_BaseProtocolServer, str]]:
    fake = _BaseProtocolServer()
    listener = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    async with listener:
        yield fake, f"tcp:127.0.0.1:{listener.sockets[0].getsockname()[1]}"


async def test_a_base_protocol_server_sees_nothing_new(
    base_server: tuple[_BaseProtocolServer, str],
) -> None:
    fake, address = base_server
    fake.held["held"] = asyncio.Event()
    async with await TimerClient.connect(address, connections=3, timeout=30) as client:
        held = asyncio.create_task(client.echo(EchoRequest(message="held", delay_ms=0)))
        await wait_until(lambda: len(fake.requests) == 4)  # three asks for the notice, the echo
        assert await client.version() == "fake v1"  # not behind the held echo
        # 30 at once: all three connections busy, some behind the held echo.
        replies = asyncio.gather(
            *(client.echo(EchoRequest(message=f"m{i}", delay_ms=0)) for i in range(30))
        )
        fake.held["held"].set()
        assert [r.echoed for r in await replies] == [f"m{i}" for i in range(30)]
        assert (await held).echoed == "held"
    # Each connection first asks for the close notice, which a base-protocol server
    # refuses as an unknown method; then only base-protocol requests, exactly as the
    # one-connection client sends them, spread over all three connections.
    asks = [request for request in fake.requests if request[1] == "server.goaway"]
    assert sorted(asks) == [(conn, "server.goaway", {}) for conn in range(3)]
    fake.requests = [request for request in fake.requests if request not in asks]
    assert {method for _, method, _ in fake.requests} == {"version", "echo"}
    assert fake.requests[0][1:] == ("echo", {"req": {"message": "held", "delayMs": 0}})
    assert {conn for conn, _, _ in fake.requests} == {0, 1, 2}
    held_on = fake.requests[0][0]
    assert all(conn != held_on for conn, method, _ in fake.requests if method == "version")
