"""The full-scale restart runs: 12 s of load through a rolling restart, and through
two SIGHUP reloads of ``serve --workers 2``; prints what the callers and servers saw.

    python -m tests._restart_probe [RUNS]

The tests (test_restart.py, test_reload.py) run the same steps briefly.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from timer_sdk import TimerClient

from ._load import Load
from .test_reload import parent
from .test_restart import servers

SECONDS = 12.0


def report(what: str, load: Load, ran: dict[str, int] | None) -> None:
    calls = len(load.answered) + len(load.failed)
    kinds = sorted({type(exc).__name__ for exc in load.failed.values()})
    once = "n/a" if ran is None else ran == dict.fromkeys(load.answered, 1)
    print(
        f"{what}: {calls} calls, {len(load.failed)} failed {kinds}, "
        f"{load.misrouted} misrouted, each processed exactly once: {once}",
        flush=True,
    )


async def rolling(tmp: Path) -> None:
    async with servers(tmp, "a", "b") as procs:
        client = await TimerClient.connect(procs.address, connections=4, reconnect=True, timeout=5)
        load = Load()
        async with client:
            running = asyncio.create_task(load.run(client))
            await asyncio.sleep(SECONDS / 4)
            for old, new in (("a", "c"), ("b", "d")):
                await procs.start(new)
                await procs.stop(old)
                await asyncio.sleep(SECONDS / 3)
            load.stop()
            await running
        ran = procs.processed("a", "b", "c", "d")
    report("rolling restart", load, ran)


async def reloads() -> None:
    async with parent("tcp:127.0.0.1:0") as served:
        client = await TimerClient.connect(served.address, connections=4, reconnect=True, timeout=5)
        load = Load()
        async with client:
            running = asyncio.create_task(load.run(client))
            await asyncio.sleep(SECONDS / 4)
            for _ in range(2):
                await served.reload()
                await asyncio.sleep(SECONDS / 3)
            load.stop()
            await running
            await client.version()  # still serving
    report("two SIGHUP reloads", load, None)


async def main(runs: int) -> None:
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            await rolling(Path(tmp))
        await reloads()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1))
