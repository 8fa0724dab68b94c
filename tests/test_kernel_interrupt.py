"""Interrupting a notebook cell that awaits a call leaves the client and server usable.

ipykernel turns an interrupt into the cancellation of the running cell. The
cancelled call's request is already on the wire, so its reply still comes;
the client must drop it, and the next cell's call must get its own reply.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from timer_sdk import EchoRequest
from timer_sdk.sync import TimerClient as SyncTimerClient

from ._kernel import Kernel

# The slow call waits on a gate the test opens, not on a clock: the proof holds however
# long the interrupt takes to land, and costs no waiting.
SETUP = """
import asyncio
from timer_sdk import EchoRequest, Timer, TimerClient

gate = asyncio.Event()

class GatedTimer(Timer):
    async def echo(self, req):
        if req.message == "slow":
            await gate.wait()
        return await super().echo(req)

server = await GatedTimer().serve("tcp:127.0.0.1:0")
client = await TimerClient.connect(server.address, timeout=60)
print("serving on", server.address)
"""

# The marker is printed before the await and nothing in between yields to the
# loop, so once it is out the request is written before the cell can be cancelled.
SLOW = """
print("calling", flush=True)
reply = await client.echo(EchoRequest(message="slow", delay_ms=0))
print("the slow call returned", reply)
"""

NEXT = """
print("pending before:", client.pending)
gate.set()  # the slow reply is sent now, ahead of this call's
reply = await client.echo(EchoRequest(message="fresh", delay_ms=0))
print("echoed:", reply.echoed)
print("pending after:", client.pending)
"""


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    with Kernel(tmp_path) as k:
        yield k


@pytest.mark.timeout(90)
def test_interrupted_call_leaves_client_and_server_usable(kernel: Kernel) -> None:
    setup = kernel.run(SETUP)
    match = re.search(r"serving on (\S+)", setup.stdout)
    assert match is not None, setup.stdout
    address = match.group(1)

    # stop_on_error=False: the cell is meant to fail, and must not abort the next one.
    slow = kernel.start(SLOW, stop_on_error=False)
    kernel.wait_for_output(slow, "calling")
    kernel.interrupt()
    # The embedded server answers while the cell waits. This also wakes the
    # kernel's loop: ipykernel queues the interrupt's cancellation without
    # waking the loop (ipython/ipykernel#881), so it would otherwise wait for
    # the slow reply (here: for ever, as the gate stays shut).
    with SyncTimerClient.connect(address, timeout=30) as probe:
        assert probe.version().startswith("timer-sdk v")

    cell = kernel.finish(slow)
    assert cell.error is not None
    assert cell.error[0] == "CancelledError"
    assert "the slow call returned" not in cell.stdout

    after = kernel.run(NEXT)
    # The slow request was still being served, its slot abandoned: its reply
    # came first and must be dropped, not handed to this call.
    assert "pending before: 1" in after.stdout
    assert "echoed: fresh" in after.stdout
    assert "pending after: 0" in after.stdout

    again = kernel.run(
        "print(await client.version())\n"
        "other = await TimerClient.connect(server.address)\n"
        "print((await other.echo(EchoRequest(message='second client', delay_ms=0))).echoed)\n"
        "await other.close()\n"
        "client"
    )
    assert "timer-sdk v" in again.stdout
    assert "second client" in again.stdout
    assert again.results == [f"<TimerClient {address} open, 0 pending>"]

    with SyncTimerClient.connect(address, timeout=30) as probe:
        assert probe.echo(EchoRequest(message="from outside", delay_ms=0)).echoed == "from outside"

    closed = kernel.run("await client.close()\nawait server.close()\nprint(client, server)")
    assert f"<TimerClient {address} closed, 0 pending>" in closed.stdout
    assert "closed, 0 connections" in closed.stdout
