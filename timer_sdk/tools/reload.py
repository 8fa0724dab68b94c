"""``serve --workers N`` reloads on SIGHUP, as gunicorn does: new workers first.

The parent holds the port and the private nats-server throughout. On SIGHUP
it starts N new workers (a fresh interpreter each: new code, certificates
read again) on the same port, waits until every one of them serves, and
only then stops the old ones with SIGTERM: each closes gracefully, answering
what it has read and telling clients that asked which calls it never read
(docs/protocol.md), so that they send those to the new workers. A reload
whose new workers do not all come up stops them and keeps the old ones.

The signal handler only writes a byte to a pipe that the parent's wait
watches (:class:`Hangup`); the reload itself runs in the parent's loop.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

__all__ = ["Hangup", "reload_workers"]

Worker = multiprocessing.process.BaseProcess
Pipe = multiprocessing.connection.Connection


class Hangup:
    """SIGHUP, as a readable pipe for the parent's wait and a flag to take."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._heard = False

    def fileno(self) -> int:
        return self._read

    def handle(self, _signum: int, _frame: FrameType | None) -> None:
        self._heard = True
        with contextlib.suppress(BlockingIOError):  # one byte waiting is enough
            os.write(self._write, b"\0")

    def take(self) -> bool:
        """Whether SIGHUP came since the last look (and forget it)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._read, 64)
        heard, self._heard = self._heard, False
        return heard

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


def _pids(procs: list[Worker]) -> str:
    return ", ".join(str(proc.pid) for proc in procs)


def _stop(procs: list[Worker], timeout: float) -> None:
    for proc in procs:
        if proc.pid is not None and proc.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()


def reload_workers(
    start: Callable[[], str | None],
    workers: list[Worker],
    pipes: list[Pipe],
    *,
    stopping: Callable[[], bool],
    shutdown_timeout: float,
) -> bool:
    """Replace ``workers`` by as many new ones that ``start()`` appends; ``True`` if done.

    ``start`` starts them, appending each to ``workers`` and its pipe to
    ``pipes``, and returns the address they serve once all do, or ``None``
    if one failed. Either way, the lists hold only the workers that serve
    afterwards.
    """
    count = len(workers)
    old, old_pipes = workers[:], pipes[:]
    print(f"timer-sdk: reloading: starting {count} new workers", flush=True)
    served = start()
    fresh, fresh_pipes = workers[count:], pipes[count:]
    if served is None or stopping():
        _stop(fresh, shutdown_timeout + 10)
        del workers[count:]
        del pipes[count:]
        for pipe in fresh_pipes:
            pipe.close()
        if not stopping():
            codes = ", ".join(str(proc.exitcode) for proc in fresh)
            print(
                f"timer-sdk: reload failed: a new worker stopped before it served "
                f"(exit codes {codes}; its error is above); still serving with the "
                f"{count} workers from before (pids {_pids(old)})",
                file=sys.stderr,
                flush=True,
            )
        return False
    print(
        f"timer-sdk: reloaded: {len(fresh)} new workers serve (pids {_pids(fresh)}); "
        f"closing the old ones gracefully",
        flush=True,
    )
    _stop(old, shutdown_timeout + 10)
    del workers[:count]
    del pipes[:count]
    for pipe in old_pipes:
        pipe.close()
    codes = ", ".join(str(proc.exitcode) for proc in old)
    print(f"timer-sdk: the old workers stopped (pids {_pids(old)}, exit codes {codes})", flush=True)
    return True
