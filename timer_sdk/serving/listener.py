"""Accept connections on asyncio's selector loop without spinning when out of descriptors.

On EMFILE, CPython's selector loop (3.11 to 3.13) logs a traceback and
schedules a retry once for every connection still queued, up to the listen
backlog: a burst of connects past ``RLIMIT_NOFILE`` turns into a busy loop
that writes tracebacks for seconds. uvloop backs off by itself and keeps its
own accept path. On the selector loop we accept here instead: when out of
descriptors we stop watching the socket, log once per episode, retry every
``_RETRY`` seconds, and log how many attempts failed when accepting works again.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from collections.abc import Callable
from ssl import SSLContext

from ..limits import ServerStats

__all__ = ["Acceptor"]

logger = logging.getLogger("timer_sdk.listener")

_RETRY = 0.1  # seconds between tries while out of descriptors
_BATCH = 64  # connections accepted per wake-up, so a flood cannot hold the loop
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Acceptor:
    """Accepts on listening sockets and hands each connection to a protocol."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listening: list[socket.socket],
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        *,
        ssl: SSLContext | None,
        handshake_timeout: float | None,
        stats: ServerStats,
        backlog: int,
    ) -> None:
        self._loop = loop
        self._socks = listening
        self._factory = protocol_factory
        self._ssl = ssl
        self._handshake_timeout = handshake_timeout
        self._stats = stats
        self._setups: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._failed = 0  # accepts refused in the current episode; 0 when none is running
        for sock in listening:
            sock.listen(backlog)
            loop.add_reader(sock.fileno(), self._accept, sock)

    async def close(self) -> None:
        """Stop accepting; abandon connections still being set up."""
        if self._retry is not None:
            self._retry.cancel()
        for sock in self._socks:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._socks = []
        for task in self._setups:
            task.cancel()
        if self._setups:
            await asyncio.wait(self._setups)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE and the like; anything else, just as calmly
                self._back_off(exc)
                return
            if self._failed:
                logger.warning("accepting again after %d refused attempts", self._failed)
                self._failed = 0
            conn.setblocking(False)
            task = self._loop.create_task(self._set_up(conn))
            self._setups.add(task)
            task.add_done_callback(self._setups.discard)
            # Here, not in _set_up: a task cancelled before its first step never runs it.
            task.add_done_callback(functools.partial(_close_if_cancelled, conn))

    async def _set_up(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(
                self._factory, conn, ssl=self._ssl, ssl_handshake_timeout=self._handshake_timeout
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            logger.debug("connection setup failed: %s", exc)
            conn.close()

    def _back_off(self, exc: OSError) -> None:
        if not self._failed:
            self._stats.accept_pauses += 1
            what = "out of file descriptors" if exc.errno in _OUT_OF_RESOURCES else "accept failed"
            logger.warning("%s (%s): pausing accept, retrying every %s s", what, exc, _RETRY)
        self._failed += 1
        for sock in self._socks:
            self._loop.remove_reader(sock.fileno())
        self._retry = self._loop.call_later(_RETRY, self._resume)

    def _resume(self) -> None:
        self._retry = None
        for sock in self._socks:
            self._loop.add_reader(sock.fileno(), self._accept, sock)


def _close_if_cancelled(conn: socket.socket, task: asyncio.Task[None]) -> None:
    if task.cancelled():
        conn.close()
