"""Restarts under load, with real processes sharing one TCP port (SO_REUSEPORT).

A rolling restart (start a new server, SIGTERM an old one, twice) fails no
call: each server's close notice hands the calls it never read to the
client's other connections. A SIGKILL still fails the calls in flight, as
ConnectionLost that may have run, and nothing is sent again. Each server logs
every echo it runs (``tests/_restart_server.py``): that is the count of what
was processed.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from timer_sdk import CallNotStarted, ConnectionLost, TimerClient

from ._load import Load, processed

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT balancing")

ROOT = Path(__file__).resolve().parent.parent


class Servers:
    """Server processes on one port, each with its log."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.address = "tcp:127.0.0.1:0"
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    def log(self, name: str) -> str:
        return str(self.tmp_path / f"{name}.log")

    async def start(self, name: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests._restart_server", self.address, name, self.log(name),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self.procs[name] = proc
        assert proc.stdout is not None
        self.address = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
        assert self.address.startswith("tcp:"), self.address

    async def stop(self, name: str, sig: signal.Signals = signal.SIGTERM) -> int:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        return await asyncio.wait_for(proc.wait(), 60)

    async def stop_all(self) -> None:
        for name in list(self.procs):
            await self.stop(name, signal.SIGKILL)

    def processed(self, *names: str) -> dict[str, int]:
        return dict(processed(*(self.log(name) for name in names)))


@asynccontextmanager
async def servers(tmp_path: Path, *names: str) -> AsyncIterator[Servers]:
    started = Servers(tmp_path)
    try:
        for name in names:
            await started.start(name)
        yield started
    finally:
        await started.stop_all()


@asynccontextmanager
async def under_load(address: str) -> AsyncIterator[Load]:
    """16 tasks calling echo with delays of 0 to 50 ms, over 4 connections that reconnect."""
    client = await TimerClient.connect(address, connections=4, reconnect=True, timeout=5)
    load = Load()
    async with client:
        running = asyncio.create_task(load.run(client))
        try:
            await load.calls(100)
            yield load
        finally:
            load.stop()
            await running


async def test_a_rolling_restart_fails_no_call_and_runs_each_once(tmp_path: Path) -> None:
    async with servers(tmp_path, "a", "b") as procs:
        async with under_load(procs.address) as load:
            for old, new in (("a", "c"), ("b", "d")):
                await procs.start(new)
                assert await procs.stop(old) == 0
                await load.calls(200)
        ran = procs.processed("a", "b", "c", "d")
    assert load.failed == {}
    assert load.misrouted == 0
    assert set(load.answered.values()) & {"c", "d"}  # the new servers took over
    assert ran == dict.fromkeys(load.answered, 1)  # every call ran, and only once


async def test_a_crash_fails_the_calls_in_flight_and_sends_none_again(tmp_path: Path) -> None:
    async with servers(tmp_path, "a", "b") as procs:
        async with under_load(procs.address) as load:
            victim = next(iter(load.answered.values()))  # it serves some connection
            await procs.stop(victim, signal.SIGKILL)
            await load.calls(200)
        survivor = "b" if victim == "a" else "a"
        ran_on_survivor = procs.processed(survivor)
        ran = procs.processed("a", "b")
    assert load.failed, "a call was in flight on the killed server"
    for exc in load.failed.values():
        assert isinstance(exc, ConnectionLost) and not isinstance(exc, CallNotStarted), exc
    assert not set(load.failed) & set(ran_on_survivor)  # never sent again
    assert load.misrouted == 0
    assert all(ran[message] == 1 for message in load.answered)
    assert max(ran.values()) == 1
