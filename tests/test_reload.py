"""``serve --workers N`` reloads on SIGHUP: new workers first, then the old ones close.

Real processes: the parent, its workers and its private nats-server. Calls
under load see no failure, subscribers see a gap notice where their
connection moved, and a reload whose new workers cannot start keeps the old.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trustme

from timer_sdk import EchoEvent, EchoRequest, EventsMayHaveBeenMissed, TimerClient
from timer_sdk.tools.cli import LISTENING

from ._load import Load

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT balancing")

PIDS = re.compile(r"pids ([\d, ]+)\)")


class Parent:
    """A ``serve --workers 2`` parent: its address, and its output line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, address: str, pids: set[int]) -> None:
        self.proc = proc
        self.address = address
        self.pids = pids

    async def line_with(self, words: str, *, stream: str = "stdout") -> str:
        """Read lines until one contains ``words``; return them all, that one last."""
        reader = self.proc.stdout if stream == "stdout" else self.proc.stderr
        assert reader is not None
        read = ""
        while True:
            line = (await asyncio.wait_for(reader.readline(), 60)).decode()
            assert line, f"the parent ended before saying {words!r}: {read}"
            read += line
            if words in line:
                return read

    async def reload(self) -> set[int]:
        """SIGHUP, then wait until it has reloaded; return the new workers' pids."""
        self.proc.send_signal(signal.SIGHUP)
        line = (await self.line_with("reloaded:")).splitlines()[-1]
        pids = PIDS.search(line)
        assert pids, line
        stopped = (await self.line_with("the old workers stopped")).splitlines()[-1]
        assert "exit codes 0, 0" in stopped, stopped  # each closed gracefully
        return {int(pid) for pid in pids.group(1).split(", ")}


@asynccontextmanager
async def parent(*args: str) -> AsyncIterator[Parent]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "timer_sdk", "serve", *args, "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        listening, pids = LISTENING.search(line), PIDS.search(line)
        assert listening and pids, line
        yield Parent(proc, listening.group(1), {int(p) for p in pids.group(1).split(", ")})
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


async def test_two_reloads_under_load_fail_no_call_and_keep_serving() -> None:
    async with parent("tcp:127.0.0.1:0") as served:
        client = await TimerClient.connect(served.address, connections=4, reconnect=True, timeout=5)
        watcher = await TimerClient.connect(served.address, reconnect=True, timeout=30)
        load = Load()
        async with client, watcher, watcher.events() as events:
            running = asyncio.create_task(load.run(client))
            await load.calls(100)
            old = served.pids
            for _ in range(2):
                new = await served.reload()
                assert not new & old
                assert all(gone(pid) for pid in old)  # the parent waited for them
                await load.calls(200)
                old = new
            load.stop()
            await running
            # Still serving, and the subscriber was told where it may have missed events.
            await watcher.echo(EchoRequest(message="after", delay_ms=0))
            gaps = 0
            while (item := await asyncio.wait_for(anext(events), 30)) != EchoEvent(
                message="after", echo_count=1
            ):
                gaps += isinstance(item, EventsMayHaveBeenMissed)
            assert gaps >= 2  # each reload closed the subscriber's connection
    assert load.failed == {}
    assert load.misrouted == 0


async def test_a_reload_that_cannot_start_keeps_the_old_workers(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with parent("tls:127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)) as served:
        os.unlink(cert)  # a broken deploy: the new workers cannot load it
        served.proc.send_signal(signal.SIGHUP)
        said = await served.line_with("reload failed", stream="stderr")
        assert f"--tls-cert {cert}: no such file" in said  # each new worker's own reason
        assert "still serving with the 2 workers from before" in said.splitlines()[-1]
        assert not any(gone(pid) for pid in served.pids)
        async with await TimerClient.connect(served.address, ssl=context, timeout=30) as client:
            assert (await client.echo(EchoRequest(message="x", delay_ms=0))).echoed == "x"
