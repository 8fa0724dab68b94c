"""Scaling out from the command line: events across --workers and across hosts."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncGenerator, Sequence

import pytest

from timer_sdk import (
    EchoEvent,
    EchoRequest,
    EventsMayHaveBeenMissed,
    RemoteCallError,
    TimerClient,
)
from timer_sdk._extras import install_hint
from timer_sdk.bus.natsd import NatsServer
from timer_sdk.tools.cli import LISTENING

from .test_bus import Tally
from .test_workers import PIDS, _alive, _finish, _sockets_of

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="--workers uses SO_REUSEPORT")

# Simulates an install without the nats extra: "import nats" fails in this process.
WITHOUT_NATS = (
    "import sys; sys.modules['nats'] = None; from timer_sdk.tools.cli import main; sys.exit(main())"
)


async def _serve(
    *args: str, python: Sequence[str] = ("-m", "timer_sdk")
) -> AsyncGenerator[str, None]:
    """Run ``serve`` until the test is done; yield its address, its first line, then the next."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *python, "serve", "tcp:127.0.0.1:0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        match = LISTENING.search(line)
        assert match, line
        yield match.group(1)
        yield line
        yield (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    finally:
        if proc.returncode is None:
            proc.terminate()
        code, _, err = await _finish(proc)
        assert code == 0, err


async def _echo_everywhere(address: str, connections: int, per_connection: int) -> list[str]:
    """Echo from many connections at once (the kernel spreads them over the workers)."""
    clients = [await TimerClient.connect(address, timeout=60) for _ in range(connections)]
    try:
        replies = await asyncio.gather(
            *(
                client.echo(EchoRequest(message=f"{c}.{i}", delay_ms=i % 2))
                for c, client in enumerate(clients)
                for i in range(per_connection)
            )
        )
    finally:
        for client in clients:
            await client.close()
    return [reply.echoed for reply in replies]


@pytest.mark.parametrize("workers", [2, 4])
async def test_every_subscriber_sees_every_workers_echoes(workers: int) -> None:
    server = _serve("--workers", str(workers))
    address = await anext(server)
    try:
        subscribers = [await TimerClient.connect(address, timeout=60) for _ in range(2 * workers)]
        streams = [sub.events(max_queue=10_000) for sub in subscribers]
        for stream in streams:
            await stream.__aenter__()  # subscribed: every echo from here on is its business
        sent = await _echo_everywhere(address, connections=8 * workers, per_connection=25)
        for stream in streams:
            tally = Tally()
            await tally.read_until(stream, len(sent))
            # Every subscriber reads at once and has room for all: each echo arrives as an
            # event, none as a drop count or a gap.
            assert sorted(tally.messages) == sorted(sent), [
                i for i in tally.items if not isinstance(i, EchoEvent)
            ]
            await stream.aclose()
        for sub in subscribers:
            await sub.close()
        line = await anext(server)
    finally:
        await server.aclose()
    pids = PIDS.search(line)
    assert pids, line
    assert len(pids.group(1).split(", ")) == workers


@pytest.mark.parametrize("how", ["terminated", "killed"])
async def test_the_private_nats_server_stops_with_the_workers(how: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "timer_sdk", "serve", "tcp:127.0.0.1:0", "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 60)
        second = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert "private nats-server at nats://127.0.0.1:" in second, second
        natsd_pid = int(second.rsplit("pid ", 1)[1].rstrip(")\n"))
        assert _alive(natsd_pid)
        if how == "killed":  # no chance to clean up: the kernel tells nats-server (Linux)
            proc.kill()
        else:
            proc.terminate()
    finally:
        code, _, err = await _finish(proc)
    assert code == (0 if how == "terminated" else -9), err
    async with asyncio.timeout(30):
        while _alive(natsd_pid):
            await asyncio.sleep(0.05)


async def test_two_instances_on_one_events_url(nats_server: NatsServer) -> None:
    """Two servers on their own ports, as two hosts behind a load balancer would be."""
    # The first has workers of its own: they use the given URL (a private server
    # would cut them off from the second, and its subscriber would miss its echoes).
    first = _serve("--events-url", nats_server.url, "--name", "lb", "--workers", "2")
    second = _serve("--events-url", nats_server.url, "--name", "lb")
    try:
        addresses = [await anext(first), await anext(second)]
        subscribers = [await TimerClient.connect(a, timeout=60) for a in addresses]
        streams = [sub.events(max_queue=10_000) for sub in subscribers]
        for stream in streams:
            await stream.__aenter__()
        sent = [
            *await _echo_everywhere(addresses[0], connections=4, per_connection=25),
            *await _echo_everywhere(addresses[1], connections=4, per_connection=25),
        ]
        for stream in streams:  # each sees its own host's echoes and the other's
            tally = Tally()
            await tally.read_until(stream, len(sent))
            assert sorted(tally.messages) == sorted(sent)
            assert all(isinstance(item, EchoEvent) for item in tally.items)
            await stream.aclose()
        for sub in subscribers:
            await sub.close()
    finally:
        await first.aclose()
        await second.aclose()


async def test_without_the_nats_extra_workers_refuse_subscriptions_clearly() -> None:
    server = _serve("--workers", "2", python=("-c", WITHOUT_NATS))
    address = await anext(server)
    try:
        async with await TimerClient.connect(address, timeout=60) as client:
            with pytest.raises(RemoteCallError) as caught:
                async with client.events():
                    pass
            assert await client.version() == "timer-sdk v0.1.0"  # calls still work
        line = await anext(server)
        said = await anext(server)  # at start-up, before anyone subscribed
    finally:
        await server.aclose()
    assert said.startswith("timer-sdk: subscriptions will be refused: this server runs 2 worker")
    assert install_hint("nats") in said
    message = str(caught.value)
    assert "events.subscribe: this server runs 2 worker processes and no event bus" in message
    assert message.count("events.subscribe") == 1
    assert install_hint("nats") in message
    assert "--events-url nats://HOST:PORT" in message
    assert "nats-server" not in line


async def _clients_on_every_worker(address: str, pids: list[int]) -> list[TimerClient]:
    """Connect until every worker holds one of the connections (the kernel picks)."""
    clients: list[TimerClient] = []
    served: set[int] = set()
    while served != set(pids):
        assert len(clients) < 64, "the kernel gave every connection to one worker"
        before = {pid: _sockets_of(pid) for pid in pids}
        client = await TimerClient.connect(address, timeout=60)
        clients.append(client)
        await client.version()  # accepted and served, so its socket is in the worker now
        served |= {pid for pid in pids if _sockets_of(pid) > before[pid]}
    return clients


async def test_a_dead_private_nats_server_is_a_gap_then_restarted() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "timer_sdk", "serve", "tcp:127.0.0.1:0", "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    clients: list[TimerClient] = []
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        second = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        address, pids = LISTENING.search(first), PIDS.search(first)
        assert address and pids, first
        natsd = re.search(r"at (nats://\S+) \(pid (\d+)\)", second)
        assert natsd, second
        clients = await _clients_on_every_worker(
            address.group(1), [int(pid) for pid in pids.group(1).split(", ")]
        )
        streams = [client.events(max_queue=10_000) for client in clients]
        for stream in streams:
            await stream.__aenter__()
        tallies = [Tally() for _ in streams]
        n = len(clients)

        async def echo_round(tag: str) -> None:
            await asyncio.gather(
                *(
                    c.echo(EchoRequest(message=f"{tag} {i}", delay_ms=0))
                    for i, c in enumerate(clients)
                )
            )

        await echo_round("before")
        for stream, tally in zip(streams, tallies, strict=True):
            await tally.read_until(stream, n)  # every worker's echoes reach every subscriber
        os.kill(int(natsd.group(2)), signal.SIGKILL)
        for stream, tally in zip(streams, tallies, strict=True):
            async with asyncio.timeout(30):  # at once: nothing waits for a restart
                while not any(isinstance(i, EventsMayHaveBeenMissed) for i in tally.items):
                    tally.items.append(await anext(stream))
        await echo_round("around the restart")
        for stream, tally in zip(streams, tallies, strict=True):
            await tally.read_until(stream, 2 * n)  # counted: the workers are back on the bus
        await echo_round("after")
        for stream, tally in zip(streams, tallies, strict=True):
            await tally.read_until(stream, 3 * n)
            assert sorted(m for m in tally.messages if m.startswith("after")) == sorted(
                f"after {i}" for i in range(n)
            )
        again = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert f"events shared through a private nats-server at {natsd.group(1)} " in again
        assert again.rstrip().endswith(" again"), again
        proc.terminate()
    finally:
        for client in clients:
            await client.close()
        if proc.returncode is None:
            proc.terminate()
        code, _, err = await _finish(proc)
    assert code == 0, err
    assert f"the private nats-server (pid {natsd.group(2)}) exited with code -9" in err


async def _serve_process(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "timer_sdk", "serve", "tcp:127.0.0.1:0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


@pytest.mark.parametrize("workers", [(), ("--workers", "2")])
async def test_a_working_events_url_says_so(nats_server: NatsServer, workers: tuple[str]) -> None:
    proc = await _serve_process("--events-url", nats_server.url, *workers)
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        second = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        listening = LISTENING.search(first)
        assert listening, first
        async with await TimerClient.connect(listening.group(1), timeout=60) as client:
            await client.version()  # serving: its signal handlers are in place
    finally:
        if proc.returncode is None:
            proc.terminate()
        code, _, err = await _finish(proc)
    assert second == (
        f"timer-sdk: events shared through {nats_server.url}, "
        "subject timer_sdk.ipc-server.on_echo_fired\n"
    )
    assert code == 0, err


async def test_an_events_url_that_refuses_fails_at_once() -> None:
    with socket.socket() as held:  # bound, never listening: connecting is refused
        held.bind(("127.0.0.1", 0))
        url = f"nats://127.0.0.1:{held.getsockname()[1]}"
        code, out, err = await _finish(await _serve_process("--events-url", url))
    assert code == 1
    assert "listening" not in out
    # Not after a connect timeout, and with the reason.
    assert err.startswith(f"timer-sdk serve: cannot reach the event bus at {url}: "), err
    assert "within" not in err
    assert "refused" in err


async def test_a_silent_events_url_says_it_is_connecting_then_gives_up_after_10_s() -> None:
    with socket.socket() as silent:  # the kernel completes connects; no one says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        start = time.monotonic()
        proc = await _serve_process("--events-url", f"nats://user:secret@127.0.0.1:{port}")
        try:
            assert proc.stderr is not None
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
        finally:
            code, out, err = await _finish(proc)
        took = time.monotonic() - start
    shown = f"nats://127.0.0.1:{port}"
    assert line == f"timer-sdk: connecting to the event bus at {shown}...\n"
    assert code == 1 and "listening" not in out
    assert err == f"timer-sdk serve: cannot reach the event bus at {shown} within 10.0 s\n"
    assert took >= 10.0  # not sooner; _finish bounds the wait from above
