"""Faults between well-behaved peers: shutdown, descriptors, oversize frames, a busy loop.

Each test drives a real server over real sockets, most of them as a
``timer-sdk serve`` subprocess, so that its loop and its descriptors are its
own. Traffic goes to 127.0.0.1 and to Unix sockets only, and every flood is
bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import cbor2
import pytest
import uvloop

from timer_sdk import (
    ConnectionLost,
    EchoEvent,
    EchoRequest,
    EventsDropped,
    RemoteCallError,
    Server,
    Timer,
    TimerClient,
    TimerConfig,
)
from timer_sdk.tools.server_process import ServerProcess
from timer_sdk.wire.framing import DEFAULT_MAX_FRAME_SIZE

from .conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (USER_HZ)


# --- graceful shutdown loses no reply -----------------------------------------


CLIENTS, IN_FLIGHT = 25, 100


async def _shutdown_under_load(address: str) -> tuple[int, int, int]:
    """25 clients keep 100 echoes each in flight; close the server mid-way.

    Returns (replies delivered, calls failed with ConnectionLost, requests the
    server dispatched). The clients keep writing while the server closes, so
    requests are still unread in its sockets: the case where the kernel
    answered with RST and a client's next write destroyed delivered replies.
    Replies of 4 KB make more than one read's worth (400 KB) wait in each client.
    """
    server = await Timer(TimerConfig(name="ipc-server")).serve(address)
    clients = [await TimerClient.connect(server.address) for _ in range(CLIENTS)]
    delivered = lost = 0

    async def keep_calling(client: TimerClient) -> None:
        nonlocal delivered, lost
        while True:
            try:
                await client.echo(EchoRequest(message="x" * 4000, delay_ms=200))
            except ConnectionLost:
                lost += 1
                return
            delivered += 1

    workers = [asyncio.ensure_future(keep_calling(c)) for c in clients for _ in range(IN_FLIGHT)]
    await wait_until(lambda: delivered >= CLIENTS * IN_FLIGHT, timeout=60)
    await server.close()
    await asyncio.gather(*workers)
    for client in clients:
        await client.close()
    return delivered, lost, server.stats.requests


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_graceful_shutdown_delivers_every_reply_it_wrote(
    loop_name: str, kind: str, tmp_path: Path
) -> None:
    address = f"unix:{tmp_path / 's.sock'}" if kind == "unix" else "tcp:127.0.0.1:0"
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        delivered, lost, dispatched = runner.run(_shutdown_under_load(address))
    # Every request the server took was answered with a success, and every such
    # reply reached its caller; only requests it never read failed.
    assert delivered == dispatched
    assert lost == CLIENTS * IN_FLIGHT, "each worker ends at its first ConnectionLost"


# --- out of file descriptors ----------------------------------------------------


def _limited_server(address: str, nofile: int, *args: str) -> ServerProcess:
    server = ServerProcess(address, *args)
    run = (
        "import resource, runpy, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); "
        "sys.argv = ['timer-sdk', *sys.argv[1:]]; "
        "runpy.run_module('timer_sdk', run_name='__main__')"
    )
    server.argv = [sys.executable, "-c", run, *server.argv[3:]]
    return server


@pytest.mark.parametrize("loop_name", LOOPS)
async def test_out_of_descriptors_backs_off_and_recovers(loop_name: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    flood_size = min(1000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200)
    assert flood_size > 400, "the test needs several hundred descriptors of its own"
    async with _limited_server("tcp:127.0.0.1:0", 256, "--loop", loop_name) as server:
        host, port = server.address.removeprefix("tcp:").rsplit(":", 1)
        flood: list[socket.socket] = []
        try:
            for _ in range(flood_size):
                sock = socket.socket()
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect_ex((host, int(port)))
                flood.append(sock)
            # The server has run out of descriptors: now it must idle, not spin.
            before = cpu_seconds(server.pid)
            await asyncio.sleep(1.0)  # a measuring window, not a synchronisation
            busy = cpu_seconds(server.pid) - before
        finally:
            for sock in flood:
                sock.close()
        started = time.perf_counter()
        async with await TimerClient.connect(server.address, timeout=10) as client:
            await client.version()
        recovered = time.perf_counter() - started
        tracebacks = sum("Traceback" in line for line in server.lines)
        notices = [line for line in server.lines if "out of file descriptors" in line]
    assert busy < 0.5, f"the server burned {busy:.2f} s of CPU in 1 s while out of descriptors"
    assert tracebacks == 0, "\n".join(server.lines[-20:])
    if loop_name == "asyncio":
        # Once per episode (an accept that works ends one), not once per attempt.
        assert 1 <= len(notices) <= 10, notices
    assert recovered < 2.0, f"first call after the flood took {recovered:.2f} s"


async def test_connections_accepted_as_the_server_closes_are_closed_with_it(
    tmp_path: Path,
) -> None:
    """Accepted, not yet set up, when the server closes: each is closed, not left to the GC."""
    path = str(tmp_path / "s.sock")
    server = await Timer().serve(f"unix:{path}")
    opened = [await asyncio.open_unix_connection(path) for _ in range(8)]
    for _, writer in opened:
        writer.write_eof()  # nothing to send: a lingering close need not wait for us
    await server.close()  # some are accepted by now, their set-up not yet begun
    for reader, writer in opened:
        async with asyncio.timeout(30):  # a socket left open would never say EOF
            assert await reader.read() == b""
        writer.close()


# --- nothing sent that the client must refuse ---------------------------------


def _message_at_limit() -> str:
    """A message whose echo request payload is exactly the default frame limit."""
    envelope = {"req": {"message": "", "delayMs": 0}}
    overhead = len(cbor2.dumps(envelope)) + 4  # the string's length grows to 5 bytes
    return "x" * (DEFAULT_MAX_FRAME_SIZE - overhead)


async def test_a_reply_over_the_limit_is_an_error_reply(server: Server) -> None:
    message = _message_at_limit()
    payload = cbor2.dumps({"req": {"message": message, "delayMs": 0}})
    assert len(payload) == DEFAULT_MAX_FRAME_SIZE  # accepted: at the limit, not over
    async with await TimerClient.connect(server.address, timeout=30) as client:
        with pytest.raises(
            RemoteCallError, match=r"echo: reply of 1048582 bytes exceeds the limit"
        ):
            await client.echo(EchoRequest(message=message, delay_ms=0))
        with pytest.raises(RemoteCallError, match="exceeds the limit"):
            await client.echo(EchoRequest(message=message, delay_ms=1))  # the Task path
        assert (await client.echo(EchoRequest(message="after", delay_ms=0))).echoed == "after"
    assert server.stats.oversize_replies == 2


async def test_an_event_over_the_limit_is_dropped_and_counted_not_sent(server: Server) -> None:
    async with (
        await TimerClient.connect(server.address, timeout=30) as watcher,
        await TimerClient.connect(server.address, timeout=30) as caller,
        watcher.events() as events,
    ):
        with contextlib.suppress(RemoteCallError):  # its reply is over the limit too
            await caller.echo(EchoRequest(message=_message_at_limit(), delay_ms=0))
        await caller.echo(EchoRequest(message="small", delay_ms=0))
        items = [await anext(events), await anext(events)]
        # The subscriber stays connected, and its calls still work.
        assert (await watcher.echo(EchoRequest(message="still here", delay_ms=0))).echoed
    assert items[0] == EventsDropped(1)
    assert isinstance(items[1], EchoEvent) and items[1].message == "small"
    assert server.stats.oversize_events == 1


# --- a busy loop still answers a newcomer ----------------------------------------


async def _timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


@pytest.mark.parametrize("loop_name", LOOPS)
async def test_a_new_connection_is_answered_promptly_under_saturation(
    loop_name: str,
) -> None:
    async with ServerProcess("tcp:127.0.0.1:0", "--loop", loop_name) as server:
        idle = await TimerClient.connect(server.address, timeout=30)
        flood = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests._flood", server.address, "50", "200", "60",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        assert flood.stdin is not None and flood.stdout is not None
        try:
            assert await asyncio.wait_for(flood.stdout.readline(), 60) == b"ready\n"

            async def first_call() -> None:
                async with await TimerClient.connect(server.address, timeout=30) as fresh:
                    await fresh.version()

            newcomer = [await _timed(first_call) for _ in range(5)]
            old_timer = [await _timed(idle.version) for _ in range(5)]
        finally:
            flood.stdin.close()
            replies = int(await asyncio.wait_for(flood.stdout.readline(), 60))
            await flood.wait()
            await idle.close()
    assert replies > 50 * 200, "the flood did not keep the server busy"
    # Starved, a call would wait for the flood to end, which it never does while these
    # run: it would time out at 30 s. 3 s leaves room for a machine busy with the rest
    # of the suite (the second worker's tests share these two cores).
    assert max(newcomer) < 3.0, f"a new connection's first call took {newcomer}"
    assert max(old_timer) < 3.0, f"an idle connection's call took {old_timer}"
