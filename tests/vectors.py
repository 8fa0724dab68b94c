"""The byte vectors captured from the reference implementation (docs/protocol.md),
and a stand-in for the reference that answers a client with them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

VERSION_REQUEST = bytes.fromhex("0000000776657273696f6e00000001a0")
VERSION_REPLY_OF_REFERENCE = bytes.fromhex(
    "0000000000000011706e696d2d74696d65722076302e312e30"  # "nim-timer v0.1.0"
)
ECHO_PAYLOAD = bytes.fromhex(
    "a163726571a2676d6573736167657368656c6c6f206f7665722074686520776972656764656c61794d7305"
)
ECHO_REQUEST = bytes.fromhex("000000046563686f0000002b") + ECHO_PAYLOAD
ECHO_REPLY = bytes.fromhex(
    "0000000000000031"
    "a2666563686f6564736865"
    "6c6c6f206f7665722074686520776972"
    "656974696d65724e616d656a6970632d736572766572"
)

# The close notice, as a server without it (the reference) meets it: docs/protocol.md.
GOAWAY_REQUEST = bytes.fromhex("0000000d") + b"server.goaway" + bytes.fromhex("00000001a0")
GOAWAY_REFUSED = bytes.fromhex("000000010000001d") + b"unknown method: server.goaway"
STRAY_NOTICE = bytes.fromhex("0000001200000001a0")  # ret 18, {}: not for one that was refused

Exchanges = list[tuple[bytes, bytes]]
REFERENCE: Exchanges = [(VERSION_REQUEST, VERSION_REPLY_OF_REFERENCE), (ECHO_REQUEST, ECHO_REPLY)]
WITHOUT_CLOSE_NOTICE: Exchanges = [
    (GOAWAY_REQUEST, GOAWAY_REFUSED),
    (VERSION_REQUEST, STRAY_NOTICE + VERSION_REPLY_OF_REFERENCE),
    (ECHO_REQUEST, ECHO_REPLY),
    (ECHO_REQUEST, b""),  # read, never answered: the connection closes
]
"""A client that asks for the close notice, against a server without it."""


@contextlib.asynccontextmanager
async def reference_stand_in(
    exchanges: Exchanges = REFERENCE,
) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server that answers a version call, then an echo, with the reference's bytes.

    Yields its address and the list of frames the client sent, as received (a
    shorter frame whole, to compare). It writes its replies in pieces, as the
    reference does, so the client must reassemble them. ``exchanges`` are the
    requests it expects, each with its answer, in order.
    """
    received: list[bytes] = []

    async def reference(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for request, reply in exchanges:
            try:
                received.append(await reader.readexactly(len(request)))
            except asyncio.IncompleteReadError as exc:
                received.append(exc.partial)
                break
            for piece in (reply[:4], reply[4:8], reply[8:9], reply[9:]):
                writer.write(piece)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(reference, "127.0.0.1", 0)
    async with server:
        yield f"tcp:127.0.0.1:{server.sockets[0].getsockname()[1]}", received
