"""A probe of overload at full scale, against ``timer-sdk serve`` with its defaults.

Three greedy clients each pipeline 128 echoes of about 500 KB with ``delayMs``
20000-30000 and read their replies (with ``half-close``: they shut down their
sending side once all is sent, then read); a small caller makes sequential
echoes on one open connection meanwhile. Prints the greedy replies' outcomes,
the small caller's worst time and the server's peak RSS (VmHWM). About 90 s::

    python -m tests._overload_probe [half-close]

The tests in ``test_budget_overload.py`` prove the same at a small scale.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

import cbor2

from timer_sdk.tools.soak import ServerProcess
from timer_sdk.wire.framing import encode_request

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def dial(address: str) -> Stream:
    host, port = address.removeprefix("tcp:").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(8)
    body = await reader.readexactly(int.from_bytes(head[4:], "big"))
    return int.from_bytes(head[:4], "big", signed=True), body


def echo(message: str, delay_ms: int) -> bytes:
    return encode_request(b"echo", cbor2.dumps({"req": {"message": message, "delayMs": delay_ms}}))


async def greedy(address: str, n: int, half_close: bool) -> tuple[int, list[str]]:
    reader, writer = await dial(address)
    messages = [f"{n}.{i}.".ljust(500_000, "g") for i in range(128)]

    async def send() -> None:
        for message in messages:
            writer.write(echo(message, random.randint(20_000, 30_000)))
            await writer.drain()
        if half_close:
            writer.write_eof()

    sending = asyncio.create_task(send())
    ok, bad = 0, []
    try:
        for message in messages:
            ret, body = await reply(reader)
            if ret == 0 and cbor2.loads(body)["echoed"] == message:
                ok += 1
            else:
                bad.append(body[:100].decode("utf-8", "replace"))
    except (OSError, asyncio.IncompleteReadError) as exc:
        bad.append(repr(exc))
    await sending
    writer.close()
    return ok, bad


async def main(half_close: bool) -> None:
    async with ServerProcess() as server:
        reader, writer = await dial(server.address)
        writer.write(echo("hello", 0))
        await reply(reader)  # the small caller's connection exists before the load
        times: list[float] = []
        stop = asyncio.Event()

        async def small() -> None:
            while not stop.is_set():
                started = time.monotonic()
                writer.write(echo("small", 0))
                assert (await reply(reader))[0] == 0
                times.append(time.monotonic() - started)
                await asyncio.sleep(0.05)

        caller = asyncio.create_task(small())
        started = time.monotonic()
        results = await asyncio.gather(*(greedy(server.address, n, half_close) for n in range(3)))
        stop.set()
        await caller
        _, peak = server.rss_kib()
        print(
            f"half_close={half_close}: {time.monotonic() - started:.0f} s; "
            f"greedy replies ok {[ok for ok, _ in results]} of 128 each, "
            f"failed {[bad[:2] for _, bad in results if bad]}; "
            f"small calls {len(times)}, worst {max(times):.3f} s; "
            f"peak server RSS {peak / 1024:.0f} MiB"
        )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:] == ["half-close"]))
