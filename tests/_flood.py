"""A saturating load in its own process: ``python -m tests._flood ADDRESS CONNS DEPTH SECONDS``.

Opens CONNS connections, keeps DEPTH echo requests (no delay, so the server
answers each one inline, the costliest case for fairness) in flight on each, and
prints ``ready`` once every connection has had a reply. It stops when its
standard input closes or after SECONDS, whichever comes first, then prints
the number of replies. Loopback and Unix sockets only.
"""

from __future__ import annotations

import asyncio
import sys
import threading

import cbor2

_PAYLOAD = cbor2.dumps({"req": {"message": "flood", "delayMs": 0}})
_BODY = cbor2.dumps({"echoed": "flood", "timerName": "ipc-server"})
ECHO_REQUEST = b"\0\0\0\4echo" + len(_PAYLOAD).to_bytes(4, "big") + _PAYLOAD
ECHO_REPLY = b"\0\0\0\0" + len(_BODY).to_bytes(4, "big") + _BODY


class _Flood(asyncio.Protocol):
    def __init__(self, depth: int, first: asyncio.Event, replied: list[int]) -> None:
        self.depth = depth
        self.first = first
        self.replied = replied
        self.pending = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(ECHO_REQUEST * self.depth)

    def data_received(self, data: bytes) -> None:
        data = self.pending + data
        whole = len(data) // len(ECHO_REPLY)
        self.pending = data[whole * len(ECHO_REPLY) :]
        if whole and self.transport is not None:
            assert data.startswith(ECHO_REPLY), "wrong reply"
            self.replied[0] += whole
            self.first.set()
            self.transport.write(ECHO_REQUEST * whole)  # keep DEPTH in flight


async def _main(address: str, conns: int, depth: int, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    replied = [0]
    firsts = [asyncio.Event() for _ in range(conns)]
    transports = []
    kind, _, rest = address.partition(":")
    for first in firsts:
        factory = lambda first=first: _Flood(depth, first, replied)  # noqa: E731
        if kind == "unix":
            transport, _ = await loop.create_unix_connection(factory, rest)
        else:
            host, _, port = rest.rpartition(":")
            assert host in ("127.0.0.1", "[::1]", "localhost"), "loopback only"
            transport, _ = await loop.create_connection(factory, host.strip("[]"), int(port))
        transports.append(transport)
    await asyncio.gather(*(first.wait() for first in firsts))
    print("ready", flush=True)
    stdin_closed = loop.create_future()

    def watch_stdin() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(stdin_closed.set_result, None)

    threading.Thread(target=watch_stdin, daemon=True).start()
    await asyncio.wait([stdin_closed], timeout=seconds)
    for transport in transports:
        transport.abort()
    print(replied[0], flush=True)


if __name__ == "__main__":
    address, conns, depth, seconds = sys.argv[1:5]
    asyncio.run(_main(address, int(conns), int(depth), float(seconds)))
