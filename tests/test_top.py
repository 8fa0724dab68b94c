"""``timer-sdk top`` in a real pseudo-terminal, watching a real server under load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fcntl import ioctl
from pathlib import Path

import pytest

from timer_sdk import EchoRequest, Timer, TimerClient

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")
# A table row: method, calls/s, p50, p99, errors/s, calls, errors.
ROW = re.compile(
    r"│ (\w+)\s+│\s+(\d+) │\s+(\S+(?: ms)?) │\s+(\S+(?: ms)?) │\s+(\d+) │\s+(\d+) │\s+(\d+) │"
)


Rows = dict[str, tuple[str, ...]]


class Terminal:
    """``timer-sdk top`` on the slave side of a pty; the screen is read from the master."""

    def __init__(self, *args: str) -> None:
        master, slave = pty.openpty()
        ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.master = master
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "timer_sdk", "top", *args],
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            env={**os.environ, "TERM": "xterm-256color"},
        )  # fmt: skip
        os.close(slave)
        self.screen = ""

    def read(self) -> None:
        with contextlib.suppress(OSError):  # EIO: the process closed the terminal
            self.screen += os.read(self.master, 65536).decode(errors="replace")

    def rows(self) -> Rows:
        """The last row shown of each method."""
        return {m.group(1): m.groups()[1:] for m in ROW.finditer(ANSI.sub("", self.screen))}

    async def until(self, predicate: str, check: Callable[[Rows], bool]) -> None:
        """Read the screen until ``check(rows)`` holds; the bound is generous."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 60
        while not check(self.rows()):
            assert self.proc.poll() is None, f"top exited: {self.screen[-2000:]}"
            assert time.monotonic() < deadline, f"{predicate}: {self.screen[-2000:]}"
            ready = asyncio.Event()
            loop.add_reader(self.master, ready.set)
            try:
                await ready.wait()
            finally:
                loop.remove_reader(self.master)
            self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


@contextmanager
def terminal(*args: str) -> Iterator[Terminal]:
    term = Terminal(*args)
    try:
        yield term
    finally:
        term.close()


async def test_top_shows_the_numbers_move_with_load(tmp_path: Path) -> None:
    async with (
        await Timer().serve(f"unix:{tmp_path / 's.sock'}") as server,
        await TimerClient.connect(server.address, timeout=30) as client,
    ):
        with terminal(server.address, "--interval", "0.2") as top:
            await top.until("an idle echo row", lambda rows: rows.get("echo", ())[4:5] == ("0",))
            for i in range(200):
                await client.echo(EchoRequest(message=str(i), delay_ms=0))
            # The total moves to what was called, with a rate and latencies on the way.
            await top.until("200 echo calls", lambda rows: rows["echo"][4] == "200")
            seen = ANSI.sub("", top.screen)
            assert re.search(r"│ echo\s+│\s+[1-9]\d* │\s+\d+\.\d\d ms │\s+\d+\.\d\d ms │", seen)
            assert top.rows()["version"][4] == "0"
            # Ctrl-C, as a terminal sends it to the foreground process group.
            os.killpg(top.proc.pid, signal.SIGINT)
            # Waited for off the loop: the server in this process keeps answering top.
            code = await asyncio.to_thread(top.proc.wait, 30)
            top.read()
            assert code == 0, top.screen  # what it said, if Ctrl-C was not a clean stop
            assert "Traceback" not in top.screen


async def test_top_into_a_pipe_prints_its_last_view_whole(tmp_path: Path) -> None:
    """Not a terminal: one last view, ended by a newline, with no Ctrl-C hint under --count."""
    async with await Timer().serve(f"unix:{tmp_path / 'top.sock'}") as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "timer_sdk", "top", server.address,
            "--count", "1", "--interval", "0.05",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert ROW.search(text), text
    assert text.endswith("\n")
    assert "Ctrl-C to stop" not in text
