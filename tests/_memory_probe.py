"""A probe of what floor connections really hold, at full scale.

A ``timer-sdk serve`` with a 1 MiB budget; 2,000 connections each pipeline
three echoes of 15 KB held 5 s (``delayMs`` 5000) and read their replies.
Prints the replies' outcomes, the server's RSS growth over its idle state
(VmHWM after the load less VmRSS before any connection opened) and, less
the budget, per connection::

    python -m tests._memory_probe [CONNECTIONS]

``test_budget_memory.py`` checks the same bound with fewer connections.
"""

from __future__ import annotations

import asyncio
import sys
import time

import cbor2

from timer_sdk.tools.server_process import ServerProcess
from timer_sdk.wire.framing import encode_request

BUDGET = 1 << 20
MESSAGE = 15_000
PIPELINED = 3
DELAY_MS = 5000
KiB = 1024


def echo(message: str, delay_ms: int) -> bytes:
    return encode_request(b"echo", cbor2.dumps({"req": {"message": message, "delayMs": delay_ms}}))


async def reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(8)
    body = await reader.readexactly(int.from_bytes(head[4:], "big"))
    return int.from_bytes(head[:4], "big", signed=True), body


async def dial(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.removeprefix("tcp:").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def pipeline(
    stream: tuple[asyncio.StreamReader, asyncio.StreamWriter], n: int, delay_ms: int, replies: int
) -> tuple[int, list[str]]:
    """Send this connection's echoes at once; read and check its first ``replies``."""
    reader, writer = stream
    messages = [f"{n}.{i}.".ljust(MESSAGE, "m") for i in range(PIPELINED)]
    writer.write(b"".join(echo(message, delay_ms) for message in messages))
    ok, bad = 0, []
    for message in messages[:replies]:
        ret, body = await reply(reader)
        if ret == 0 and cbor2.loads(body)["echoed"] == message:
            ok += 1
        else:
            bad.append(body[:100].decode("utf-8", "replace"))
    return ok, bad


async def measure(
    connections: int, delay_ms: int = DELAY_MS, replies: int = PIPELINED, timeout: float = 1800
) -> dict[str, float]:
    """Run the load; return the replies' outcomes and the RSS growth in KiB.

    The baseline is taken after one warm-up echo and before the connections
    open, so the growth counts the connections themselves as well as what
    their requests hold. The peak is read once every connection has its
    first ``replies`` replies; then the connections are closed.
    """
    args = ("--memory-budget", str(BUDGET), "--max-connections", str(connections + 16))
    async with ServerProcess("tcp:127.0.0.1:0", *args) as server:
        warm = await dial(server.address)
        warm[1].write(echo("w" * MESSAGE, 0))
        await reply(warm[0])  # the echo path's code and caches are in before we measure
        base, _ = server.rss_kib()
        streams = [warm] + [await dial(server.address) for _ in range(connections)]
        try:
            started = time.monotonic()
            async with asyncio.timeout(timeout):
                results = await asyncio.gather(
                    *(pipeline(s, n, delay_ms, replies) for n, s in enumerate(streams[1:]))
                )
            took = time.monotonic() - started
            _, peak = server.rss_kib()
        finally:
            for _, writer in streams:
                writer.transport.abort()
    growth = peak - base
    return {
        "connections": connections,
        "replies_ok": sum(good for good, _ in results),
        "replies_bad": sum(len(bad) for _, bad in results),
        "seconds": took,
        "growth_kib": growth,
        "per_connection_kib": (growth - BUDGET / KiB) / connections,
    }


async def main(connections: int) -> None:
    figures = await measure(connections)
    print(
        f"{figures['connections']:.0f} connections x {PIPELINED} echoes of {MESSAGE} bytes held "
        f"{DELAY_MS} ms, budget {BUDGET >> 20} MiB: replies ok {figures['replies_ok']:.0f}, "
        f"bad {figures['replies_bad']:.0f}, {figures['seconds']:.0f} s; server RSS growth "
        f"{figures['growth_kib'] / 1024:.1f} MiB, (growth - budget) per connection "
        f"{figures['per_connection_kib']:.1f} KiB"
    )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
