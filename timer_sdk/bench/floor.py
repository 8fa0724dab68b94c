"""The floor: the least an asyncio server and client can do to speak the protocol.

Every benchmark row runs beside this floor, so a row reads "ours costs this
much more than the bare minimum on the same loop, machine and load". The
floor frames exactly as protocol.md says, decodes and encodes CBOR with
cbor2, answers the same reply bytes as our server, keeps replies in order,
writes the replies of one read in one write and sets ``TCP_NODELAY``. What it
leaves out is what makes a server safe: limits, strict decoding, pydantic
validation, error accounting. It is not slowed down anywhere.

This module imports nothing from ``timer_sdk``: the benchmark starts it as a
script (``python floor.py ADDRESS ...``) so that its start-up does not pay for
pydantic, and imports it in process for the floor client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import stat
import struct
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Self, cast

import cbor2

__all__ = ["FloorClient", "FloorError", "FloorServer", "run_server", "serve_floor"]

_U32 = struct.Struct(">I")
_REPLY_HEAD = struct.Struct(">iI")
_unpack_u32 = _U32.unpack_from
_pack_u32 = _U32.pack
_unpack_reply_head = _REPLY_HEAD.unpack_from
_pack_reply_head = _REPLY_HEAD.pack


class FloorError(Exception):
    """An error reply (ret 1) or a lost connection, as seen by the floor client."""


def _error(message: str) -> bytes:
    body = message.encode()
    return _pack_reply_head(1, len(body)) + body


class FloorServer(asyncio.Protocol):
    """One connection of the floor server."""

    def __init__(self, version: str, timer_name: str) -> None:
        self._version = version
        self._timer_name = timer_name
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        # Replies still waiting for a delayed echo ahead of them, in request order.
        self._slots: deque[list[bytes | None]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        size = len(buf)
        pos = 0
        out: list[bytes] = []
        slots = self._slots
        while size - pos >= 4:
            (method_len,) = _unpack_u32(buf, pos)
            payload_at = pos + 8 + method_len
            if size < payload_at:
                break
            (payload_len,) = _unpack_u32(buf, payload_at - 4)
            end = payload_at + payload_len
            if size < end:
                break
            reply = self._answer(bytes(buf[pos + 4 : payload_at - 4]), bytes(buf[payload_at:end]))
            pos = end
            if reply is None:
                continue
            if slots:
                slots.append([reply])
            else:
                out.append(reply)
        if pos:
            del buf[:pos]
        if out and self._transport is not None:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _answer(self, method: bytes, payload: bytes) -> bytes | None:
        try:
            params = cbor2.loads(payload) if payload else {}
            if method == b"echo":
                req = params["req"]
                body = cbor2.dumps({"echoed": req["message"], "timerName": self._timer_name})
                delay = req["delayMs"]
                if delay > 0:
                    slot: list[bytes | None] = [None]
                    self._slots.append(slot)
                    loop = asyncio.get_running_loop()
                    frame = _pack_reply_head(0, len(body)) + body
                    loop.call_later(delay / 1000, self._fill, slot, frame)
                    return None
            elif method == b"version":
                body = cbor2.dumps(self._version)
            else:
                return _error(f"unknown method: {method.decode('utf-8', 'replace')}")
        except Exception as exc:
            return _error(f"{method.decode('utf-8', 'replace')}: {exc!r}")
        return _pack_reply_head(0, len(body)) + body

    def _fill(self, slot: list[bytes | None], frame: bytes) -> None:
        slot[0] = frame
        slots = self._slots
        out: list[bytes] = []
        while slots and slots[0][0] is not None:
            out.append(cast(bytes, slots.popleft()[0]))
        if out and self._transport is not None:
            self._transport.write(b"".join(out))


class FloorClient(asyncio.Protocol):
    """A floor client: a FIFO of futures, CBOR in and out, no validation."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buf = bytearray()
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.Transport | None = None
        self._corked = False
        self._backlog: list[bytes] = []
        self.closed: asyncio.Future[None] = loop.create_future()

    @classmethod
    async def connect(cls, address: str) -> Self:
        """Connect to ``tcp:HOST:PORT`` or ``unix:PATH``."""
        loop = asyncio.get_running_loop()
        client = cls(loop)
        scheme, _, rest = address.partition(":")
        if scheme == "unix":
            await loop.create_unix_connection(lambda: client, rest)
        else:
            host, _, port = rest.rpartition(":")
            await loop.create_connection(lambda: client, host.strip("[]"), int(port))
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def call(self, method: bytes, params: Any) -> Any:
        """Send one request and return its decoded reply body."""
        payload = cbor2.dumps(params)
        frame = b"".join((_pack_u32(len(method)), method, _pack_u32(len(payload)), payload))
        future = self._loop.create_future()
        self._pending.append(future)
        if self._corked:
            self._backlog.append(frame)
        else:
            if self._transport is None:
                raise FloorError("connection lost")
            self._transport.write(frame)
            # As our client does: calls made in the same loop iteration share one write.
            self._corked = True
            self._loop.call_soon(self._uncork)
        return await future

    def _uncork(self) -> None:
        self._corked = False
        if self._backlog and self._transport is not None:
            self._transport.write(b"".join(self._backlog))
        self._backlog.clear()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        size = len(buf)
        pos = 0
        pending = self._pending
        while size - pos >= 8:
            ret, body_len = _unpack_reply_head(buf, pos)
            end = pos + 8 + body_len
            if size < end:
                break
            body = bytes(buf[pos + 8 : end])
            pos = end
            future = pending.popleft()
            if future.done():
                continue
            if ret == 0:
                future.set_result(cbor2.loads(body))
            else:
                future.set_exception(FloorError(body.decode("utf-8", "replace")))
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(FloorError("connection lost"))
        if not self.closed.done():
            self.closed.set_result(None)

    async def close(self) -> None:
        """Close the connection and wait until it is closed."""
        if self._transport is not None:
            self._transport.close()
        await self.closed


async def serve_floor(
    address: str,
    version: str,
    timer_name: str,
    *,
    reuse_port: bool = False,
    factory: Callable[[], asyncio.Protocol] | None = None,
) -> tuple[asyncio.Server, str]:
    """Start a floor server on the running loop; return it and the address bound.

    ``factory`` makes each connection's protocol; the default is a :class:`FloorServer`.
    """
    loop = asyncio.get_running_loop()
    scheme, _, rest = address.partition(":")
    make = factory or (lambda: FloorServer(version, timer_name))
    if scheme == "unix":
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(rest).st_mode):
                os.unlink(rest)
        server = await loop.create_unix_server(make, rest)
        return server, address
    host, _, port = rest.rpartition(":")
    server = await loop.create_server(
        make, host.strip("[]"), int(port), reuse_address=True, reuse_port=reuse_port or None
    )
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    return server, f"tcp:{bound_host}:{bound_port}"


async def _serve_until_stopped(
    label: str, start: Callable[[], Awaitable[tuple[asyncio.Server, str]]]
) -> None:
    server, address = await start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"{label} listening on {address}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()
    if address.startswith("unix:"):
        with contextlib.suppress(OSError):
            os.unlink(address[5:])


def run_server(
    label: str, start: Callable[[], Awaitable[tuple[asyncio.Server, str]]], loop: str
) -> int:
    """Run the server that ``start`` starts until SIGTERM or SIGINT, on a new ``loop``."""
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve_until_stopped(label, start))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run a floor server until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description="the benchmark's floor server")
    parser.add_argument("address")
    parser.add_argument("--version", required=True, help="the version string to answer")
    parser.add_argument("--name", default="ipc-server", help="the timer name to answer")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--reuse-port", action="store_true")
    args = parser.parse_args(argv)
    return run_server(
        "floor",
        lambda: serve_floor(args.address, args.version, args.name, reuse_port=args.reuse_port),
        args.loop,
    )


if __name__ == "__main__":
    sys.exit(main())
