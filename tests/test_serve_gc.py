"""Freezing the startup heap is the CLI server's choice; the library never makes it."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

from timer_sdk import Timer, TimerClient

# Runs `timer-sdk serve` with a spy on the freeze: it reports, then stops the server.
# A bare interpreter may start with some frozen already (375 objects on 3.12.1).
_SPY = """
import gc, sys
start = gc.get_freeze_count()
from timer_sdk.tools import cli, serve
freeze = serve.freeze_startup_heap
def spy():
    before = gc.get_freeze_count()
    freeze()
    print("froze", start, before, gc.get_freeze_count(), flush=True)
    raise SystemExit(0)
serve.freeze_startup_heap = spy
cli.main(["serve", sys.argv[1]])
"""


def test_the_cli_server_freezes_its_startup_heap(tmp_path: Path) -> None:
    address = f"unix:{tmp_path / 'gc.sock'}"
    argv = [sys.executable, "-c", _SPY, address]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    word, start, before, after = done.stdout.split()
    assert word == "froze"
    assert int(start) == int(before) < int(after)  # nothing froze before the server's choice


async def test_the_library_server_leaves_the_collector_alone(tmp_path: Path) -> None:
    before = (gc.get_freeze_count(), gc.get_threshold(), gc.isenabled())
    server = await Timer().serve(f"unix:{tmp_path / 'lib.sock'}")
    try:
        async with await TimerClient.connect(server.address, timeout=5) as client:
            assert await client.version()
    finally:
        await server.close()
    assert (gc.get_freeze_count(), gc.get_threshold(), gc.isenabled()) == before
