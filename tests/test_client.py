"""The typed client over real sockets: methods, errors, pipelining, cancellation."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from timer_sdk import (
    CallError,
    CallTimeout,
    ClientClosedError,
    ComplexRequest,
    ComplexResponse,
    ConnectError,
    ConnectionLost,
    EchoEvent,
    EchoRequest,
    EchoResponse,
    JobSpec,
    LoopError,
    RemoteCallError,
    RetryPolicy,
    ScheduleConfig,
    ScheduleResult,
    Server,
    Timer,
    TimerClient,
    TimerConfig,
    TimerConnectionError,
    TimerError,
)

from .conftest import wait_until

JOB = JobSpec(name="j", payload=["p"], priority=1)
RETRY = RetryPolicy(max_attempts=3, backoff_ms=100, retry_on=["timeout"])
WHEN = ScheduleConfig(start_at_ms=1000, interval_ms=500, jitter=7)


async def test_every_method(client: TimerClient) -> None:
    assert await client.version() == "timer-sdk v0.1.0"
    assert await client.echo(EchoRequest(message="hi", delay_ms=3)) == EchoResponse(
        echoed="hi", timer_name="ipc-server"
    )
    reply = await client.complex(
        ComplexRequest(messages=[EchoRequest(message="a", delay_ms=0)], tags=["t"], retries=2)
    )
    assert reply == ComplexResponse(
        summary="received 1 messages, note=<none>, retries=2", item_count=1, has_note=False
    )
    assert await client.schedule(JOB, RETRY, WHEN) == ScheduleResult(
        job_id="ipc-server:j", will_run_count=120, first_run_at_ms=1007, effective_backoff_ms=100
    )


async def test_remote_and_local_errors_share_a_base(client: TimerClient) -> None:
    bad = JOB.model_copy(update={"name": ""})
    with pytest.raises(RemoteCallError) as remote:
        await client.schedule(bad, RETRY, WHEN)
    with pytest.raises(CallError) as local:
        await Timer().schedule(bad, RETRY, WHEN)
    assert remote.value.message == local.value.message == "job name must not be empty"
    assert remote.value.method == "schedule"
    assert type(local.value) is CallError
    assert await client.version()  # still usable


async def test_call_raw_reaches_unknown_methods(client: TimerClient) -> None:
    with pytest.raises(RemoteCallError, match="unknown method: nosuch"):
        await client.call_raw("nosuch")
    assert await client.call_raw("version") == b"\x70timer-sdk v0.1.0"


async def test_concurrent_calls_within_one_connection(client: TimerClient) -> None:
    started = time.perf_counter()
    replies = await asyncio.gather(
        *(client.echo(EchoRequest(message=str(i), delay_ms=20)) for i in range(100))
    )
    elapsed = time.perf_counter() - started
    assert [r.echoed for r in replies] == [str(i) for i in range(100)]
    # Sequential handling would take 2 s; anything near that means no concurrency.
    assert elapsed < 1.5


async def test_replies_keep_request_order_when_procs_finish_out_of_order(
    client: TimerClient,
) -> None:
    delays = [40, 0, 20, 0, 30, 10, 0]
    finished: list[str] = []

    async def call(i: int, delay: int) -> None:
        reply = await client.echo(EchoRequest(message=f"m{i}", delay_ms=delay))
        assert reply.echoed == f"m{i}"
        finished.append(reply.echoed)

    await asyncio.gather(*(call(i, d) for i, d in enumerate(delays)))
    assert finished == [f"m{i}" for i in range(len(delays))]


async def test_pipelined_thousand_mixed_calls(client: TimerClient) -> None:
    calls: list[Coroutine[Any, Any, object]] = []
    for i in range(1000):
        match i % 4:
            case 0:
                calls.append(client.echo(EchoRequest(message=f"e{i}", delay_ms=i % 3)))
            case 1:
                calls.append(client.version())
            case 2:
                note = f"n{i}"
                calls.append(client.complex(ComplexRequest(messages=[], tags=[], note=note)))
            case _:
                job = JOB.model_copy(update={"name": f"j{i}"})
                calls.append(client.schedule(job, RETRY, WHEN))
    replies = await asyncio.gather(*calls)
    for i, reply in enumerate(replies):
        match i % 4:
            case 0:
                assert isinstance(reply, EchoResponse) and reply.echoed == f"e{i}"
            case 1:
                assert reply == "timer-sdk v0.1.0"
            case 2:
                assert isinstance(reply, ComplexResponse) and reply.summary.endswith(
                    f"note=n{i}, retries=0"
                )
            case _:
                assert isinstance(reply, ScheduleResult) and reply.job_id == f"ipc-server:j{i}"


async def test_random_cancellation_never_shifts_replies(client: TimerClient) -> None:
    rng = random.Random(1234)
    tasks = [
        asyncio.create_task(client.echo(EchoRequest(message=f"c{i}", delay_ms=rng.randint(0, 15))))
        for i in range(600)
    ]
    await asyncio.sleep(0)  # every request is on the wire now
    doomed = set(rng.sample(range(len(tasks)), 300))
    for i in doomed:
        tasks[i].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    survivors = 0
    for i, result in enumerate(results):
        if isinstance(result, asyncio.CancelledError):
            assert i in doomed
            continue
        assert isinstance(result, EchoResponse), result
        assert result.echoed == f"c{i}"
        survivors += 1
    assert survivors >= 300
    # Interleave more cancellations with new calls while abandoned replies are in flight.
    for round_ in range(20):
        slow = asyncio.create_task(client.echo(EchoRequest(message="slow", delay_ms=5)))
        await asyncio.sleep(0)
        slow.cancel()
        fresh = await client.echo(EchoRequest(message=f"fresh{round_}", delay_ms=0))
        assert fresh.echoed == f"fresh{round_}"
    assert client.pending == 0


async def test_timeout_then_next_call_gets_its_own_reply(client: TimerClient) -> None:
    with pytest.raises(CallTimeout, match=r"echo: no reply within 0.05 s"):
        await client.echo(EchoRequest(message="late", delay_ms=400), timeout=0.05)
    assert client.pending == 1  # the late reply is still owed and will be dropped
    reply = await client.echo(EchoRequest(message="mine", delay_ms=0))
    assert reply.echoed == "mine"
    assert client.pending == 0


async def test_client_default_timeout(server: Server) -> None:
    async with await TimerClient.connect(server.address, timeout=0.05) as client:
        with pytest.raises(CallTimeout):
            await client.echo(EchoRequest(message="x", delay_ms=400))
        assert isinstance(CallTimeout("x"), TimeoutError)
        assert (await client.echo(EchoRequest(message="y", delay_ms=0), timeout=5)).echoed == "y"


async def test_async_with_connect_needs_no_await(server: Server) -> None:
    # As with aiohttp and httpx: the block gets the client and closes it on the way out.
    async with TimerClient.connect(server.address, timeout=5) as client:
        reply: EchoResponse = await client.echo(EchoRequest(message="no await", delay_ms=0))
        assert reply.echoed == "no await"
    assert client.closed
    async with TimerClient.connect(server.address, connections=2) as pooled:
        assert await pooled.version() == "timer-sdk v0.1.0"
    assert pooled.closed
    with pytest.raises(ConnectError):  # a failed connect leaves nothing to close
        async with TimerClient.connect("unix:/nonexistent/timer.sock"):
            pass  # pragma: no cover - never entered


async def test_connect_refused_is_a_connect_error() -> None:
    server = await Timer().serve("tcp:127.0.0.1:0")
    address = server.address
    await server.close()
    with pytest.raises(ConnectError, match=f"cannot connect to {address}"):
        await TimerClient.connect(address)


async def test_connect_to_missing_unix_socket(tmp_path: object) -> None:
    with pytest.raises(ConnectError) as info:
        await TimerClient.connect(f"unix:{tmp_path}/nope.sock")
    assert isinstance(info.value, ConnectionError)
    assert isinstance(info.value, TimerConnectionError)


async def test_dropped_connection_fails_pending_calls(address: str) -> None:
    server = await Timer().serve(address)
    client = await TimerClient.connect(server.address)
    try:
        pending = asyncio.create_task(client.echo(EchoRequest(message="x", delay_ms=5000)))
        await wait_until(lambda: len(server.tasks) == 1)  # the echo is running on the server
        for conn in list(server.connections):
            conn.abort()  # the server's side of the socket goes away mid-call
        with pytest.raises(ConnectionLost, match="lost"):
            await pending
        with pytest.raises(ConnectionLost):
            await client.version()
        assert client.closed
    finally:
        await client.close()
        await server.close()


async def test_close_fails_pending_calls(server: Server) -> None:
    client = await TimerClient.connect(server.address)
    # The server lets the orphaned echo finish before it closes, so keep it short.
    pending = asyncio.create_task(client.echo(EchoRequest(message="x", delay_ms=1000)))
    await asyncio.sleep(0)
    await client.close()
    with pytest.raises(ClientClosedError, match="closed with 1 calls pending"):
        await pending
    with pytest.raises(ClientClosedError):
        await client.version()
    await client.close()  # idempotent
    assert "closed" in repr(client)


async def test_bad_reply_is_a_protocol_error_not_a_struct_error() -> None:
    async def liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"\x00\x00\x00\x00\x00\x00\x00\x01\x05")  # ret 0, body: int 5
        await writer.drain()
        await reader.read(100)
        writer.write(b"\x00\x00\x00\x00\x00\x00")  # half a header, then EOF
        writer.close()

    listener = await asyncio.start_server(liar, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with listener, await TimerClient.connect(f"tcp:127.0.0.1:{port}") as client:
        invalid = r"version: invalid reply: Input should be a valid string"
        with pytest.raises(TimerError, match=invalid):
            await client.version()
        with pytest.raises(ConnectionLost):
            await client.version()


async def test_client_refuses_another_loop(client: TimerClient) -> None:
    def other_thread() -> None:
        async def use() -> str:
            return await client.version()

        with pytest.raises(LoopError, match="another event loop"):
            asyncio.run(use())

    await asyncio.to_thread(other_thread)


async def test_repr_is_readable(client: TimerClient, server: Server) -> None:
    assert repr(client) == f"<TimerClient {server.address} open, 0 pending>"
    assert "serving" in repr(server) and "ipc-server" in repr(server)


async def test_in_process_procs_need_no_server() -> None:
    timer = Timer(TimerConfig(name="local"))
    seen: list[EchoEvent] = []
    remove = timer.add_echo_listener(seen.append)
    reply = await timer.echo(EchoRequest(message="m", delay_ms=0))
    remove()
    await timer.echo(EchoRequest(message="n", delay_ms=0))
    assert reply.timer_name == "local"
    assert [e.message for e in seen] == ["m"]


async def test_reconnect_is_off_by_default_and_never_replays(tmp_path: object) -> None:
    address = f"unix:{tmp_path}/re.sock"
    timer = Timer()
    server = await timer.serve(address)
    seen: list[str] = []
    timer.add_echo_listener(lambda e: seen.append(e.message))
    plain = await TimerClient.connect(address)
    client = await TimerClient.connect(address, reconnect=True)
    in_flight = asyncio.create_task(client.echo(EchoRequest(message="once", delay_ms=10_000)))
    await wait_until(lambda: len(server.tasks) == 1)
    await server.close(timeout=0)  # cancels the echo: it never completes
    with pytest.raises((ConnectionLost, RemoteCallError)):
        await in_flight
    with pytest.raises(ConnectionLost):
        await plain.version()
    await wait_until(lambda: client._protocol.failure is not None)  # it saw the close
    # While the server is down, each new call makes one attempt and backs off.
    with pytest.raises(ConnectError):
        await client.version()
    # The backoff before the next attempt counts against a call's own timeout.
    with pytest.raises(CallTimeout):
        await client.version(timeout=0.001)
    assert not client.closed
    server = await timer.serve(address)
    try:
        reply = await client.echo(EchoRequest(message="new", delay_ms=0))
        assert reply.echoed == "new"
        assert seen == ["new"]  # "once" was never replayed
    finally:
        await plain.close()
        await client.close()
        await server.close()


async def test_close_finishes_then_passes_on_its_callers_cancellation(tmp_path: object) -> None:
    address = f"unix:{tmp_path}/gone.sock"
    server = await Timer().serve(address)
    client = await TimerClient.connect(address, reconnect=True)
    await server.close()
    await wait_until(lambda: client._protocol.failure is not None)
    with pytest.raises(ConnectError):
        await client.version()  # now the next attempt waits out a backoff
    waiting = asyncio.create_task(client.version())
    await wait_until(lambda: client._redial is not None)
    closing = asyncio.create_task(client.close())
    await asyncio.sleep(0)  # one turn: close cancelled the redial, and waits for it to end
    assert client._redial is not None and not client._redial.done()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing  # not swallowed: a task group cancelling its tasks must see it
    assert client.closed
    with pytest.raises(ClientClosedError):
        await waiting
