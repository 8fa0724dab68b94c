"""``python -m timer_sdk serve`` as a child process, for the soak, the benchmark's
memory checks and the tests: started, read as it speaks, and stopped.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path
from types import TracebackType

__all__ = ["LISTENING", "ServerProcess", "read_rss_kib"]

LISTENING = re.compile(r"listening on (\S+)")
"""What ``serve`` prints once it listens; group 1 is the address."""


def read_rss_kib(pid: int) -> tuple[int, int]:
    """Return (VmRSS, VmHWM) of a process in KiB, from ``/proc/PID/status``."""
    values = {"VmRSS": 0, "VmHWM": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in values:
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


class ServerProcess:
    """A ``python -m timer_sdk serve`` child, stopped on exit from ``async with``.

    Its output is read as it comes (never left to fill a pipe and block the
    server) and kept in :attr:`lines`.
    """

    def __init__(self, address: str = "tcp:127.0.0.1:0", *args: str) -> None:
        self.argv = [sys.executable, "-m", "timer_sdk", "serve", address, *args]
        self.address = ""
        self.lines: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._sent: set[signal.Signals] = set()

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self._proc is not None
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, once the process has ended."""
        assert self._proc is not None
        return self._proc.returncode

    def rss_kib(self) -> tuple[int, int]:
        """Return the server's (resident, peak resident) memory in KiB."""
        return read_rss_kib(self.pid)

    async def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start the server and wait until it says where it listens."""
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        assert self._proc.stdout is not None
        self._pumps.append(asyncio.create_task(self._pump(self._proc.stdout)))
        try:
            line = await self.wait_for_line(LISTENING, timeout)
        except BaseException:
            await self.stop(signal.SIGKILL)
            raise
        match = LISTENING.search(line)
        assert match is not None
        self.address = match.group(1)
        return self

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def wait_for_line(self, pattern: re.Pattern[str], timeout: float = 30.0) -> str:
        """Wait until the server prints a line matching ``pattern``; return it."""
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines[seen:]:
                    if pattern.search(line):
                        return line
                seen = len(self.lines)
                if self._pumps and self._pumps[0].done():
                    raise RuntimeError(f"server exited without {pattern.pattern!r}: {self.lines}")
                self._changed.clear()
                await self._changed.wait()

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the server if it still runs."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(sig)
            self._sent.add(sig)

    async def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig``, wait for the exit (killing it after ``timeout``); return its status."""
        proc = self._proc
        if proc is None:
            return 0
        if sig not in self._sent:
            # Only once: a second SIGTERM during the shutdown's last steps, after the
            # server removed its handler, would kill it and hide its real status.
            self.send_signal(sig)
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        for pump in self._pumps:
            await pump
        return proc.returncode if proc.returncode is not None else -1

    async def __aenter__(self) -> ServerProcess:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
