"""Calls under way while servers come and go: 16 tasks echoing unique messages.

Shared by the restart tests and ``tests/_restart_probe.py``. Each reply is
checked against its own message, so a reply given to the wrong caller is seen.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field

from timer_sdk import EchoRequest, TimerClient


@dataclass
class Load:
    """What the callers saw."""

    answered: dict[str, str] = field(default_factory=dict)
    """Message -> the timer name that answered it."""
    failed: dict[str, BaseException] = field(default_factory=dict)
    misrouted: int = 0
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: bool = False

    async def run(self, client: TimerClient, tasks: int = 16) -> None:
        await asyncio.gather(*(self._caller(client, n) for n in range(tasks)))

    async def _caller(self, client: TimerClient, n: int) -> None:
        rng = random.Random(n)
        i = 0
        while not self._stop:
            message = f"{n}-{i}"
            i += 1
            try:
                reply = await client.echo(EchoRequest(message=message, delay_ms=rng.randint(0, 50)))
            except Exception as exc:  # every failure is counted
                self.failed[message] = exc
                await asyncio.sleep(0)  # a client closed under us fails at once: yield
            else:
                if reply.echoed != message:
                    self.misrouted += 1
                self.answered[message] = reply.timer_name
            self.progress.set()

    async def calls(self, more: int) -> None:
        """Wait until ``more`` further calls have finished."""
        target = len(self.answered) + len(self.failed) + more
        while len(self.answered) + len(self.failed) < target:
            self.progress.clear()
            await self.progress.wait()

    def stop(self) -> None:
        self._stop = True


def processed(*logs: str) -> Counter[str]:
    """How many times the servers ran each message, by their logs."""
    counts: Counter[str] = Counter()
    for log in logs:
        with open(log) as lines:
            counts.update(line.rstrip("\n") for line in lines)
    return counts
