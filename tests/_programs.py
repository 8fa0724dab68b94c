"""Drive a test program of a generated client (Go or Node) through steps, as a real process.

A program prints a line when it reaches a step and waits for a line on stdin;
the test does what the step needs (fire events, close the server) and answers.
Its last line is what it saw, as JSON.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from timer_sdk import TimerConfig

from .conftest import GatedTimer, echoed, stop_reading, wait_until

Steps = Mapping[str, Callable[[], Awaitable[None]]]


async def run_program(command: list[str], steps: Steps | None = None) -> Any:
    """Run ``command``; answer each line it prints with ``steps[line]()``; its JSON."""
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, limit=1 << 20,  # a long JSON line
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(60):
            while (line := (await proc.stdout.readline()).decode().strip()) in (steps or {}):
                await (steps or {})[line]()
                proc.stdin.write(b"go on\n")
                await proc.stdin.drain()
            err = await proc.stderr.read()
            assert await proc.wait() == 0, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return json.loads(line)


async def close_under(address: str, command: list[str]) -> tuple[Any, list[str]]:
    """Run a program while its server closes gracefully; what it saw, and what the server ran.

    The program says "running" once it has sent an echo, which the server holds;
    the server then stops reading. The program sends a second echo, which is
    never read, and says "unread"; the first echo then ends, and the server closes.
    """
    timer = GatedTimer(TimerConfig(name="ipc-server"))
    ran = echoed(timer)
    server = await timer.serve(address)
    closing: list[asyncio.Task[None]] = []

    async def running() -> None:
        await wait_until(lambda: len(server.tasks) == 1)
        closing.append(await stop_reading(server))

    async def unread() -> None:
        timer.gate.set()

    try:
        seen = await run_program(command, {"running": running, "unread": unread})
        await closing[0]
    finally:
        timer.gate.set()
        await server.close(timeout=0)
    return seen, ran
