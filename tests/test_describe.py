"""``server.describe``: a server says what it is, and ``timer-sdk describe`` prints it.

Real servers on real sockets; the command runs as a real process. A server
without the extension is a small fake that refuses unknown methods as the
reference does (``docs/protocol.md``: ret 1, ``unknown method: <name>``).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import cbor2
import pytest

from timer_sdk import RemoteCallError, Timer, TimerClient, __version__
from timer_sdk import sync as sync_client
from timer_sdk.tools import schema
from timer_sdk.wire import served
from timer_sdk.wire.api import METHODS, SUBSCRIBE, UNSUBSCRIBE
from timer_sdk.wire.codec import DecodeError
from timer_sdk.wire.description import describe
from timer_sdk.wire.framing import RET_OK, encode_request

from .test_cli_help import arun
from .vectors import VERSION_REPLY_OF_REFERENCE, VERSION_REQUEST


@contextlib.asynccontextmanager
async def reference_like() -> AsyncIterator[str]:
    """A server that answers as the reference: ``version``, and ret 1 for any other method."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (size,) = struct.unpack(">I", await reader.readexactly(4))
                method = await reader.readexactly(size)
                (size,) = struct.unpack(">I", await reader.readexactly(4))
                payload = await reader.readexactly(size)
                if encode_request(method, payload) == VERSION_REQUEST:
                    writer.write(VERSION_REPLY_OF_REFERENCE)
                else:
                    message = b"unknown method: " + method
                    writer.write(struct.pack(">iI", 1, len(message)) + message)
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with listener:
        yield f"tcp:127.0.0.1:{listener.sockets[0].getsockname()[1]}"


# --- the command -------------------------------------------------------------------


@pytest.mark.parametrize("form", ["cddl", "json-schema"])
async def test_describe_prints_byte_for_byte_what_schema_prints(form: str) -> None:
    local = await arun("schema", "--format", form)
    async with await Timer().serve("tcp:127.0.0.1:0") as server:
        code, out, err = await arun("describe", server.address, "--format", form)
    assert (code, err) == (0, "")
    assert out == local[1]
    assert out.count("echo-request") >= 1  # a whole API, not an empty one


async def test_describe_against_a_server_without_it_says_so_in_one_line() -> None:
    async with reference_like() as address:
        async with await TimerClient.connect(address) as client:
            assert await client.version() == "nim-timer v0.1.0"  # the fake is reference-like
        code, out, err = await arun("describe", address)
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"timer-sdk describe: {address} does not describe its API")
    assert "unknown method: server.describe" in err


async def test_describe_of_nothing_listening_is_one_line_too(tmp_path: Path) -> None:
    code, out, err = await arun("describe", f"unix:{tmp_path / 'none.sock'}")
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "cannot connect" in err


# --- the client --------------------------------------------------------------------


async def test_the_client_gets_a_typed_description(tmp_path: Path) -> None:
    timer = Timer()
    async with (
        await timer.serve(f"unix:{tmp_path / 's.sock'}") as on_unix,  # stats on by default
        await timer.serve("tcp:127.0.0.1:0") as on_tcp,
        await TimerClient.connect(on_unix.address) as client,
        await TimerClient.connect(on_tcp.address) as other,
    ):
        about = await client.describe(timeout=10)
        assert about.version == __version__
        assert about.methods == tuple(METHODS)
        assert about.extensions == (SUBSCRIBE, UNSUBSCRIBE, served.DESCRIBE, "server.stats")
        assert (await other.describe()).extensions == (SUBSCRIBE, UNSUBSCRIBE, served.DESCRIBE)
        assert about.api == describe()
        assert schema.cddl(about.api) == schema.cddl()
        assert schema.json_schema(about.api) == schema.json_schema()
        # A plain call on the same connection still gets its own reply.
        assert await client.version() == f"timer-sdk v{__version__}"


async def test_the_blocking_client_describes_too() -> None:
    async with await Timer().serve("tcp:127.0.0.1:0") as server:

        def call() -> served.ServerDescription:
            with sync_client.TimerClient.connect(server.address, timeout=10) as client:
                return client.describe()

        about = await asyncio.to_thread(call)
    assert about.methods == tuple(METHODS)


async def test_the_client_names_a_server_without_the_extension() -> None:
    async with reference_like() as address, await TimerClient.connect(address) as client:
        with pytest.raises(RemoteCallError, match=r"unknown method: server\.describe"):
            await client.describe()
        assert await client.version() == "nim-timer v0.1.0"  # the connection is fine


async def test_the_reply_is_one_plain_frame() -> None:
    frame = served.describe_reply((SUBSCRIBE,))
    ret, size = struct.unpack(">iI", frame[:8])
    assert (ret, size) == (RET_OK, len(frame) - 8)
    item = cbor2.loads(frame[8:])
    assert item["version"] == __version__ and item["extensions"] == [SUBSCRIBE]
    assert {"methods", "models", "events", "jsonSchema"} <= set(item["api"])


# --- reading a reply tolerantly, and refusing a wrong one --------------------------


def _data() -> dict[str, object]:
    body = served.encode(served.ServerDescription("9.9", ("x",), describe()))
    item: dict[str, object] = cbor2.loads(body)
    return item


def test_keys_a_reader_does_not_know_are_skipped() -> None:
    item = _data()
    item["future"] = {"anything": 1}
    api = item["api"]
    assert isinstance(api, dict)
    api["models"][0]["since"] = "10.0"
    about = served.decode_description(cbor2.dumps(item))
    assert about.version == "9.9" and about.api == describe()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda api: api["methods"][1].update(request="Nowhere"), "no model named 'Nowhere'"),
        (
            lambda api: api["methods"][0].update(reply={"scalar": "text", "model": "EchoRequest"}),
            "a type is one of scalar, list or model",
        ),
        (
            lambda api: api["models"][0]["fields"].append(
                {"name": "me", "type": {"model": api["models"][0]["name"]}, "required": True}
            ),
            "contains itself",
        ),
        (lambda api: api.pop("methods"), "api.methods: Field required"),
    ],
)
def test_a_wrong_description_is_named(change: object, message: str) -> None:
    item = _data()
    change(item["api"])  # type: ignore[operator]
    with pytest.raises(DecodeError, match=rf"server\.describe: invalid reply: .*{message}"):
        served.decode_description(cbor2.dumps(item))


def test_a_reply_that_is_not_cbor_is_named() -> None:
    with pytest.raises(DecodeError, match=r"server\.describe: invalid reply"):
        served.decode_description(b"\xff")
