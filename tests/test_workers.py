"""``timer-sdk serve --workers N``: N processes on one TCP port, stopped together."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import termios
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from timer_sdk import EchoEvent, EchoRequest, TimerClient
from timer_sdk.tools.cli import LISTENING

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="SO_REUSEPORT balancing and /proc are Linux's"
)

PIDS = re.compile(r"pids ([\d, ]+)\)")


@dataclass
class Workers:
    """A ``serve --workers`` parent process and what it said when it was ready."""

    proc: asyncio.subprocess.Process
    address: str
    pids: list[int]


def _sockets_of(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


async def _start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "timer_sdk", "serve", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _finish(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def workers() -> AsyncIterator[Workers]:
    """Two workers on a port the parent picked (port 0)."""
    proc = await _start("tcp:127.0.0.1:0", "--workers", "2")
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        match = LISTENING.search(line)
        pids = PIDS.search(line)
        assert match, line
        assert pids, line
        yield Workers(proc, match.group(1), [int(pid) for pid in pids.group(1).split(", ")])
    finally:
        if proc.returncode is None:
            proc.terminate()
        await _finish(proc)


async def test_every_worker_serves_the_one_port(workers: Workers) -> None:
    assert not workers.address.endswith(":0")
    assert len(workers.pids) == 2
    assert workers.proc.pid not in workers.pids
    before = {pid: _sockets_of(pid) for pid in workers.pids}
    clients = [await TimerClient.connect(workers.address, timeout=30) for _ in range(32)]
    try:
        versions = await asyncio.gather(*(client.version() for client in clients))
        assert set(versions) == {"timer-sdk v0.1.0"}
        # The kernel spreads 32 connections over both listeners; that one gets
        # none of them has odds of 2 in 2**32.
        after = {pid: _sockets_of(pid) for pid in workers.pids}
        assert all(after[pid] > before[pid] for pid in workers.pids), (before, after)
    finally:
        for client in clients:
            await client.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_to_the_parent_stops_every_worker(
    workers: Workers, sig: signal.Signals
) -> None:
    async with await TimerClient.connect(workers.address, timeout=30) as client:
        assert await client.version() == "timer-sdk v0.1.0"
    workers.proc.send_signal(sig)
    code, out, err = await _finish(workers.proc)
    assert code == 0, err
    assert "shutting down 2 workers" in out
    assert "stopped" in out
    assert not any(_alive(pid) for pid in workers.pids)


class Terminal:
    """A pseudo-terminal whose foreground process group is one child's session."""

    def __init__(self) -> None:
        self.master, self._slave = pty.openpty()
        self.output = bytearray()
        self._grew = asyncio.Event()
        self._eof = False
        asyncio.get_running_loop().add_reader(self.master, self._read)

    async def run(self, *argv: str) -> asyncio.subprocess.Process:
        slave = self._slave
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )  # fmt: skip
        os.close(slave)  # the child's copies are the last: EOF when it and its children exit
        return proc

    def _read(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every process on the terminal has closed it
            data = b""
        if data:
            self.output += data
        else:
            self._eof = True
            asyncio.get_running_loop().remove_reader(self.master)
        self._grew.set()

    async def until(self, predicate: Callable[[str], bool], timeout: float = 60) -> str:
        async with asyncio.timeout(timeout):
            while not predicate(self.text) and not self._eof:
                self._grew.clear()
                await self._grew.wait()
        return self.text

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace").replace("\r\n", "\n")

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")  # the line discipline sends SIGINT to the group

    def close(self) -> None:
        if not self._eof:
            asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)


async def test_ctrl_c_in_a_terminal_stops_them_all_cleanly() -> None:
    terminal = Terminal()
    proc = await terminal.run(
        sys.executable, "-m", "timer_sdk", "serve", "tcp:127.0.0.1:0", "--workers", "2"
    )
    try:
        text = await terminal.until(lambda text: "events shared through" in text)
        listening, pids = LISTENING.search(text), PIDS.search(text)
        assert listening and pids, text
        async with (
            await TimerClient.connect(listening.group(1), timeout=30) as client,
            client.events() as events,
        ):
            # The marker fires while the slow echo, read before it, is still running:
            # Ctrl-C comes while a worker is busy and still needs the bus.
            replies = asyncio.gather(
                client.echo(EchoRequest(message="slow", delay_ms=1500)),
                client.echo(EchoRequest(message="marker", delay_ms=0)),
            )
            async with asyncio.timeout(30):
                async for item in events:
                    if isinstance(item, EchoEvent) and item.message == "marker":
                        break
            terminal.ctrl_c()
            slow, _ = await replies
            assert slow.echoed == "slow"  # finished before the stop
        text = await terminal.until(lambda text: "timer-sdk: stopped" in text)
    finally:
        if proc.returncode is None and "timer-sdk: stopped" not in terminal.text:
            proc.kill()
        async with asyncio.timeout(60):
            code = await proc.wait()
        terminal.close()
    assert code == 0, text
    assert not any(_alive(int(pid)) for pid in pids.group(1).split(", "))
    # Only what the parent says: no worker complains that the event bus went away.
    said = [line for line in text.replace("^C", "").splitlines() if line.strip()]
    assert said[2:] == ["timer-sdk: shutting down 2 workers", "timer-sdk: stopped"], text


async def test_workers_stop_when_the_parent_is_killed(workers: Workers) -> None:
    workers.proc.kill()  # no signal to forward: the workers see their pipe close
    await _finish(workers.proc)  # returns once the workers closed the inherited stdout
    async with asyncio.timeout(30):
        while any(_alive(pid) for pid in workers.pids):
            await asyncio.sleep(0.05)


async def test_a_worker_that_cannot_start_takes_the_others_down(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"  # each worker loads it, and fails
    proc = await _start("tls:127.0.0.1:0", "--workers", "2", "--tls-cert", str(missing))
    code, out, err = await _finish(proc)
    assert code == 1
    assert "listening" not in out
    assert f"--tls-cert {missing}: no such file" in err
    assert "workers exited with codes" in err


async def test_a_taken_port_fails_before_any_worker_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await _start(f"tcp:127.0.0.1:{port}", "--workers", "2")
        code, out, err = await _finish(proc)
    assert code == 1
    assert "listening" not in out
    assert "address already in use" in err
    assert "worker" not in err


async def test_workers_need_a_tcp_address(tmp_path: Path) -> None:
    proc = await _start(f"unix:{tmp_path / 'w.sock'}", "--workers", "2")
    code, _, err = await _finish(proc)
    assert code == 1
    assert "--workers needs a tcp: or tls: address" in err


async def test_workers_must_be_positive() -> None:
    proc = await _start("tcp:127.0.0.1:0", "--workers", "0")
    code, _, err = await _finish(proc)
    assert code == 1
    assert "--workers must be at least 1" in err


def test_a_fixed_port_is_used_as_given() -> None:
    # Held meanwhile, so that no one else can take it: a bound socket that does
    # not listen, with SO_REUSEADDR, lets a SO_REUSEADDR server listen there,
    # and the kernel never hands a held port out for port 0.
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        argv = [
            sys.executable,
            "-m",
            "timer_sdk",
            "serve",
            f"tcp:127.0.0.1:{port}",
            "--workers",
            "2",
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert f"listening on tcp:127.0.0.1:{port} (2 workers" in line, line
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.mark.parametrize("second", [("--workers", "2"), ()])
async def test_the_port_of_workers_is_theirs_alone(
    workers: Workers, second: tuple[str, ...]
) -> None:
    # As for a one-process serve: a second server on the port fails, whatever its workers.
    proc = await _start(workers.address, "--name", "second", *second)
    code, out, err = await _finish(proc)
    assert code == 1, out
    assert "address already in use" in err
    assert "listening" not in out
    async with await TimerClient.connect(workers.address, timeout=30) as client:
        assert await client.version() == "timer-sdk v0.1.0"  # the first still serves
