"""The processes of a run: the servers under test and the load generator."""

from __future__ import annotations

import contextlib
import json
import re
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .. import _eager
from ..timer import Timer
from . import floor as floor_module
from . import loadgen as loadgen_module

__all__ = ["Foreign", "LoadGen", "ServerProcess", "UnderTest", "servers", "start"]

TIMER_NAME = "ipc-server"
LISTENING = re.compile(rb"listening on (\S+)")


def _read_line(stream: IO[bytes], timeout: float) -> bytes:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no answer within {timeout} s")
    return stream.readline()


class ServerProcess:
    """A server process that prints ``listening on ADDRESS`` once it is ready."""

    def __init__(self, label: str, argv: list[str]) -> None:
        self.label = label
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        try:
            line = _read_line(self.proc.stdout, 60)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{label}: did not start within 60 s") from None
        match = LISTENING.search(line)
        if match is None:
            self.stop()
            raise RuntimeError(f"{label}: did not start: {line!r}")
        self.address = match.group(1).decode()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def rss_kib(self) -> int:
        """Return the resident set size of the server process (Linux only)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match is not None
        return int(match.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


class Foreign:
    """A server someone else started (``--against``): an address and nothing more."""

    label = "against"
    pid: int | None = None

    def __init__(self, address: str) -> None:
        self.address = address

    def check(self) -> None:
        """Raise :class:`ValueError` unless something accepts connections at the address."""
        scheme, _, rest = self.address.partition(":")
        host, _, port = rest.rpartition(":")
        try:
            if scheme == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                target: Any = rest
            else:
                host = host.strip("[]")
                sock = socket.socket(loadgen_module.LOOPBACK[host], socket.SOCK_STREAM)
                target = (host, int(port))
            with sock:
                sock.settimeout(10)
                sock.connect(target)
        except OSError as exc:
            raise ValueError(f"--against {self.address}: cannot connect: {exc}") from None

    def stop(self) -> None:
        """Not ours to stop."""


UnderTest = ServerProcess | Foreign


def start(kind: str, address: str, loop: str, *, workers: int = 1) -> ServerProcess:
    """Start ``ours``, ``models floor`` or ``floor`` on ``address``, on event loop ``loop``.

    ``workers`` > 1: ours runs that many processes on one TCP port; a floor
    process instead sets SO_REUSEPORT, so that others can share its port.
    """
    if kind == "ours":
        argv = [sys.executable, "-m", "timer_sdk", "serve", address, "--loop", loop]
        argv += ["--name", TIMER_NAME]
        if workers > 1:
            argv += ["--workers", str(workers)]
    elif kind == "models floor":
        # Not ``-m``: the bench package imports models_floor, and runpy warns about that.
        run = "import sys; from timer_sdk.bench.models_floor import main; sys.exit(main())"
        argv = [sys.executable, "-c", run, address, "--loop", loop]
        argv += ["--name", TIMER_NAME]
    elif kind == "floor":
        argv = [sys.executable, floor_module.__file__, address, "--loop", loop]
        argv += ["--version", version_string(), "--name", TIMER_NAME]
    else:
        raise ValueError(f"unknown server kind {kind!r}")
    if workers > 1 and kind != "ours":
        argv.append("--reuse-port")
    return ServerProcess(kind, argv)


def version_string() -> str:
    """Return the version our Timer answers (the floor is told to answer the same)."""
    version = _eager.start(Timer().version())
    assert isinstance(version, str)
    return version


@contextlib.contextmanager
def servers(*starters: Callable[[], list[ServerProcess]]) -> Iterator[list[ServerProcess]]:
    """Start servers in turn (each starter may start several); stop them all on exit."""
    started: list[ServerProcess] = []
    try:
        for starter in starters:
            started.extend(starter())
        yield started
    finally:
        for server in started:
            server.stop()


class LoadGen:
    """The load generator process: one JSON job per line, one JSON answer."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, loadgen_module.__file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def run(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job).encode() + b"\n")
        self.proc.stdin.flush()
        try:
            line = _read_line(self.proc.stdout, timeout)
        except TimeoutError:
            self.proc.kill()
            raise RuntimeError(f"the load generator hung on {job['mode']}") from None
        if not line:
            raise RuntimeError("the load generator exited")
        result: dict[str, Any] = json.loads(line)
        if not result.pop("ok"):
            raise RuntimeError(f"load generator: {result['error']}")
        return result

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
