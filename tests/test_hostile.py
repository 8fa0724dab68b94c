"""Hostile clients, faults and floods against a live server.

Every case ends the same way: a well-formed call on a fresh connection still
succeeds; in most, a bystander connection also kept calling throughout and got
every one of its own replies. Most cases run an in-process server (so its counters
and logs can be read); the memory cases run ``python -m timer_sdk serve`` in a
subprocess and read its resident set size from ``/proc``.

All traffic goes to 127.0.0.1 or to Unix sockets in the test's temporary
directory, and every flood is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import re
import resource
import select
import signal
import socket
import stat
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import NamedTuple

import cbor2
import pytest

from timer_sdk import (
    CallError,
    ClientClosedError,
    ConnectError,
    ConnectionLost,
    EchoRequest,
    EchoResponse,
    Limits,
    ProtocolError,
    Server,
    Timer,
    TimerClient,
    TimerConfig,
    TimerConnectionError,
)
from timer_sdk._version import __version__
from timer_sdk.tools.server_process import ServerProcess
from timer_sdk.wire.framing import (
    Broken,
    ReplyReader,
    encode_reply,
    encode_request,
)

from .conftest import RawConnection, wait_until
from .vectors import ECHO_REPLY, ECHO_REQUEST, VERSION_REQUEST

SERVER_LOG = "timer_sdk"  # the connection modules log each under its own name
MiB = 1024  # in KiB, the unit of /proc/PID/status


def frame(method: str, envelope: object) -> bytes:
    return encode_request(method.encode(), cbor2.dumps(envelope))


def echo_frame(message: str, delay_ms: int) -> bytes:
    return frame("echo", {"req": {"message": message, "delayMs": delay_ms}})


def peer_of(conn: RawConnection) -> str:
    """Return the peer as the server names it in its logs."""
    name = conn.writer.get_extra_info("sockname")
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) else "unix peer"


async def closed_by_server(conn: RawConnection, timeout: float = 10.0) -> bytes:
    """Read until the server closes; return what it sent first."""
    data = bytearray()
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await conn.reader.read(65536)
            except ConnectionResetError:
                return bytes(data)  # an abort, not a FIN: closed all the same
            if not chunk:
                return bytes(data)
            data += chunk


def replies_in(data: bytes) -> list[tuple[int, bytes]]:
    reader = ReplyReader(max_frame_size=1 << 30)
    reader.receive_data(data)
    out = []
    while (event := reader.next_event()) is not None:
        assert not isinstance(event, Broken), event
        out.append((event.ret, event.body))
    assert reader.buffered == 0, "a partial reply frame"
    return out


async def assert_serves(address: str) -> None:
    """Assert that a well-formed call on a fresh connection succeeds."""
    async with await TimerClient.connect(address, timeout=20) as client:
        reply = await client.echo(EchoRequest(message="still serving", delay_ms=0))
        assert reply.echoed == "still serving"


@contextlib.asynccontextmanager
async def bystander(address: str) -> AsyncIterator[None]:
    """Keep another connection busy with calls; fail if any reply is wrong or missing."""
    client = await TimerClient.connect(address, timeout=20)
    done = 0
    stop = asyncio.Event()

    async def keep_calling() -> None:
        nonlocal done
        while not stop.is_set():
            replies = await asyncio.gather(
                *(client.echo(EchoRequest(message=f"b{done}.{i}", delay_ms=i)) for i in range(3))
            )
            assert [r.echoed for r in replies] == [f"b{done}.{i}" for i in range(3)]
            done += 1

    task = asyncio.create_task(keep_calling())
    try:
        await wait_until(lambda: done >= 1 or task.done())
        yield
        calls_before = done
        await wait_until(lambda: done >= calls_before + 2 or task.done())
    finally:
        stop.set()
        try:
            await task
        finally:
            await client.close()


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=SERVER_LOG)
    return caplog


def logged(caplog: pytest.LogCaptureFixture, *parts: str) -> bool:
    return any(
        r.name.startswith(f"{SERVER_LOG}.") and all(p in r.getMessage() for p in parts)
        for r in caplog.records
    )


def fd_budget(needed: int) -> int:
    """Raise the soft open-file limit toward ``needed`` as far as the hard limit allows.

    Return the limit now in force: a test scales its flood down to it instead of skipping.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def flood_size(wanted: int, fds_each: int) -> int:
    """How many connections of ``fds_each`` descriptors fit, up to ``wanted``."""
    budget = fd_budget(wanted * fds_each + 200)
    size = min(wanted, (budget - 200) // fds_each)
    assert size >= 50, f"an open-file limit of {budget} is too low for any flood"
    return size


# --- malformed frames, one per case -------------------------------------------

DEEP_ARRAYS = b"\x81" * 200_000 + b"\x00"
DEEP_MAPS = b"\xa1\x61k" * 100_000 + b"\x00"
LIMIT = Limits().max_frame_size


class Case:
    """A hostile input and what the server must do with it."""

    def __init__(
        self,
        data: bytes,
        *,
        reply: str | None = None,
        closes: bool = False,
        in_sync: bool = True,
        violation: bool = True,
        log: str | None = None,
    ) -> None:
        self.data = data
        self.reply = reply  # text the error reply must contain; None: no reply
        self.closes = closes
        self.in_sync = in_sync  # the same connection still answers the next frame
        self.violation = violation
        self.log = log


CASES = {
    "method length 0xFFFFFFFF": Case(
        b"\xff\xff\xff\xff" + b"x" * 100, closes=True, log="exceeds the limit of 256 bytes"
    ),
    "method length 257": Case(
        encode_request(b"m" * 257, b"\xa0"), closes=True, log="257 bytes exceeds the limit"
    ),
    "method length 256 is fine": Case(
        encode_request(b"m" * 256, b"\xa0"), reply=f"unknown method: {'m' * 256}", violation=False
    ),
    "empty method": Case(encode_request(b"", b""), reply="unknown method: ", violation=False),
    "payload length 0xFFFFFFFF": Case(
        b"\x00\x00\x00\x04echo\xff\xff\xff\xff",
        reply="echo: frame too large: payload of 4294967295 bytes exceeds the limit",
        in_sync=False,  # the server now drops 4 GiB as it arrives
        log="frame too large",
    ),
    "payload one byte over the limit": Case(
        encode_request(b"version", b"\x00" * (LIMIT + 1)),
        reply=f"payload of {LIMIT + 1} bytes exceeds the limit of {LIMIT} bytes",
        log="frame too large",
    ),
    "payload at the limit, all junk": Case(
        encode_request(b"version", b"\xff" * LIMIT), reply="version: invalid request"
    ),
    "invalid UTF-8 in method": Case(
        encode_request(b"ver\xc3\x28sion", b"\xa0"), reply="method name is not valid UTF-8"
    ),
    "UTF-8 surrogate in method": Case(
        encode_request(b"\xed\xa0\x80", b"\xa0"), reply="method name is not valid UTF-8"
    ),
    "overlong UTF-8 in method": Case(
        encode_request(b"\xc0\xaf", b"\xa0"), reply="method name is not valid UTF-8"
    ),
    "code point over U+10FFFF in method": Case(
        encode_request(b"\xf4\x90\x80\x80", b"\xa0"), reply="method name is not valid UTF-8"
    ),
    "arrays nested 200,000 deep": Case(
        encode_request(b"version", DEEP_ARRAYS), reply="nesting depth", log="nesting depth"
    ),
    "maps nested 100,000 deep": Case(
        encode_request(b"echo", DEEP_MAPS), reply="nesting depth", log="nesting depth"
    ),
    "indefinite-length map": Case(
        encode_request(b"version", b"\xbf\xff"), reply="indefinite", log="indefinite"
    ),
    "duplicate map keys": Case(
        encode_request(b"echo", b"\xa2\x63req\xa0\x63req\xa0"), reply="Duplicate map key"
    ),
    "bignum where an int goes": Case(
        frame("echo", {"req": {"message": "m", "delayMs": cbor2.CBORTag(2, b"\x01")}}),
        reply="CBOR tag 2 is not allowed",
    ),
    "self-describe tag around the payload": Case(
        encode_request(b"version", b"\xd9\xd9\xf7\xa0"), reply="CBOR tag 55799 is not allowed"
    ),
    "truncated CBOR": Case(encode_request(b"echo", b"\xa1\x63re"), reply="truncated"),
    "two items in one payload": Case(
        encode_request(b"version", b"\xa0\xa0"), reply="exactly one CBOR item"
    ),
    "TLS ClientHello": Case(  # told in plain bytes, so that a TLS client says "not TLS"
        bytes.fromhex("16030100f4010000f00303") + b"\x00" * 64, reply="not TLS", closes=True
    ),
    "HTTP/2 preface": Case(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", closes=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_malformed_input(
    name: str, server: Server, raw: RawConnection, server_log: pytest.LogCaptureFixture
) -> None:
    case = CASES[name]
    stats = server.stats
    violations = stats.protocol_violations
    async with bystander(server.address):
        await raw.send(case.data)
        if case.reply is not None:
            ret, body = await raw.recv_reply()
            assert ret == 1
            assert case.reply in body.decode()
        if case.closes:
            assert await closed_by_server(raw) == b""
        elif case.in_sync:
            await raw.send(ECHO_REQUEST)
            assert await raw.recv_exactly(len(ECHO_REPLY)) == ECHO_REPLY
    assert stats.protocol_violations == violations + case.violation
    if case.log is not None:
        assert logged(server_log, peer_of(raw), case.log)
    await assert_serves(server.address)


async def test_counters_add_up(server: Server, raw: RawConnection) -> None:
    stats = server.stats
    await raw.send(
        VERSION_REQUEST
        + ECHO_REQUEST
        + frame("nosuch", {})  # an error reply, not a violation
        + encode_request(b"echo", b"\xa0")  # a schema violation: an error reply, counted
        + encode_request(b"\xff", b"\xa0")  # refused in sync: counted
    )
    rets = [(await raw.recv_reply())[0] for _ in range(5)]
    assert rets == [0, 0, 1, 1, 1]
    await raw.send(b"\xff\xff\xff\xff")  # breaks the stream: counted
    assert await closed_by_server(raw) == b""
    assert stats.connections_accepted == 1
    assert stats.requests == 4  # whole frames dispatched; the refused one never was
    assert stats.error_replies >= 2
    assert stats.protocol_violations == 3
    assert (stats.frame_timeouts, stats.idle_timeouts, stats.connections_refused) == (0, 0, 0)


async def test_requests_are_counted_by_known_method_only(
    server: Server, client: TimerClient
) -> None:
    await client.version()
    await client.version()
    await client.echo(EchoRequest(message="m", delay_ms=0))
    for i in range(100):  # names a client chooses must not grow the server's memory
        with pytest.raises(CallError):
            await client.call_raw(f"nosuch{i}")
    assert server.stats.by_method == {"version": 2, "echo": 1}


# --- truncated frames and half-closed sockets ---------------------------------

CUTS = [1, 3, 4, 5, 8, 11, 12, 13, len(ECHO_REQUEST) - 1]


@pytest.mark.parametrize("cut", CUTS)
async def test_truncated_frame_then_close(server: Server, cut: int) -> None:
    async with bystander(server.address):
        conn = await RawConnection.open(server.address)
        await conn.send(ECHO_REQUEST[:cut])
        await wait_until(lambda: len(server.connections) == 2)
        await conn.close()
        await wait_until(lambda: len(server.connections) == 1)  # only the bystander
    await assert_serves(server.address)


@pytest.mark.parametrize("cut", CUTS)
async def test_truncated_frame_then_half_close(server: Server, cut: int) -> None:
    conn = await RawConnection.open(server.address)
    try:
        await conn.send(VERSION_REQUEST + ECHO_REQUEST[:cut])
        conn.writer.write_eof()
        data = await closed_by_server(conn)
        [(ret, _)] = replies_in(data)  # the whole frame is answered, the partial one is not
        assert ret == 0
    finally:
        await conn.close()
    await assert_serves(server.address)


async def test_half_close_answers_everything_read_then_closes(server: Server) -> None:
    # Slow first, fast after: the server must wait for the slow ones before closing.
    frames = [echo_frame(f"h{i}", delay_ms=max(0, 60 - 10 * i)) for i in range(10)]
    conn = await RawConnection.open(server.address)
    try:
        await conn.send(b"".join(frames) + VERSION_REQUEST)
        conn.writer.write_eof()
        replies = replies_in(await closed_by_server(conn))
    finally:
        await conn.close()
    assert len(replies) == 11
    assert [cbor2.loads(body)["echoed"] for _, body in replies[:10]] == [f"h{i}" for i in range(10)]
    assert replies[10][0] == 0
    await assert_serves(server.address)


async def test_half_close_with_reading_paused_at_the_in_flight_bound(address: str) -> None:
    async with await Timer().serve(address, limits=Limits(max_in_flight=2)) as server:
        conn = await RawConnection.open(server.address)
        try:
            await conn.send(b"".join(echo_frame(f"p{i}", 30) for i in range(12)))
            conn.writer.write_eof()
            replies = replies_in(await closed_by_server(conn))
        finally:
            await conn.close()
        assert [cbor2.loads(b)["echoed"] for _, b in replies] == [f"p{i}" for i in range(12)]
        await assert_serves(server.address)


async def test_immediate_half_close(server: Server) -> None:
    conn = await RawConnection.open(server.address)
    try:
        conn.writer.write_eof()
        assert await closed_by_server(conn) == b""
    finally:
        await conn.close()
    await wait_until(lambda: not server.connections)
    await assert_serves(server.address)


async def test_client_vanishes_with_calls_in_flight(server: Server) -> None:
    for _ in range(20):
        conn = await RawConnection.open(server.address)
        before = server.stats.requests
        await conn.send(b"".join(echo_frame("gone", 50) for _ in range(5)))
        await wait_until(lambda: server.stats.requests == before + 5)  # noqa: B023
        assert server.tasks  # the echoes are running as the client leaves
        await conn.close()
    await wait_until(lambda: not server.connections)
    await wait_until(lambda: not server.tasks)  # orphaned procs finish; nothing leaks
    await assert_serves(server.address)


# --- random mutations of valid frames -----------------------------------------

SEEDS = [
    VERSION_REQUEST,
    ECHO_REQUEST,
    echo_frame("zz", 0),
    frame(
        "complex",
        {
            "req": {
                "messages": [{"message": "a", "delayMs": 1}, {"message": "b", "delayMs": 2}],
                "tags": ["x", "y"],
                "note": "n",
                "retries": 3,
            }
        },
    ),
    frame(
        "schedule",
        {
            "job": {"name": "j", "payload": ["p"], "priority": 1},
            "retry": {"maxAttempts": 3, "backoffMs": 100, "retryOn": ["timeout"]},
            "schedule": {"startAtMs": 1000, "intervalMs": 500, "jitter": 7},
        },
    ),
    frame("nosuch", {}),
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(buf) + 1)
        match rng.randrange(7):
            case 0 if at < len(buf):
                buf[at] ^= 1 << rng.randrange(8)
            case 1 if at < len(buf):
                buf[at] = rng.randrange(256)
            case 2:
                buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            case 3 if at < len(buf):
                del buf[at : at + rng.randint(1, 4)]
            case 4:
                piece = buf[at : at + rng.randint(1, 16)]
                buf[at:at] = piece
            case 5:
                del buf[at:]
            case _:  # rewrite a length prefix
                where = rng.choice([0, max(0, len(buf) - 4)])
                value = rng.choice([0, 1, 255, 256, 257, 0x7FFFFFFF, 0xFFFFFFFF])
                buf[where : where + 4] = value.to_bytes(4, "big")
    return bytes(buf)


class Expected(NamedTuple):
    """What one reply must be: ``body`` exactly, or a body that ``check`` accepts."""

    ret: int | None  # None: either, as ``check`` decides
    body: bytes | None = None
    check: Callable[[int, bytes], bool] | None = None

    def matches(self, ret: int, body: bytes) -> bool:
        if self.check is not None:
            return self.check(ret, body)
        return (ret, body) == (self.ret, self.body)


def _map(body: bytes) -> object:
    try:
        return cbor2.loads(body)
    except Exception:
        return None


# The seeds' replies, from the reference's captured replies (docs/protocol.md).
SEED_REPLIES = {
    VERSION_REQUEST: Expected(0, cbor2.dumps(f"timer-sdk v{__version__}")),  # ours, not nim's
    ECHO_REQUEST: Expected(0, ECHO_REPLY[8:]),
    SEEDS[2]: Expected(
        0, bytes.fromhex("a2666563686f6564627a7a6974696d65724e616d656a6970632d736572766572")
    ),
    SEEDS[3]: Expected(
        None,
        check=lambda ret, body: (
            ret == 0
            and _map(body)
            == {
                "summary": "received 2 messages, note=n, retries=3",
                "itemCount": 2,
                "hasNote": True,
            }
        ),
    ),
    SEEDS[4]: Expected(
        None,
        check=lambda ret, body: (
            ret == 0
            and _map(body)
            == {
                "jobId": "ipc-server:j",
                "willRunCount": 120,
                "firstRunAtMs": 1007,
                "effectiveBackoffMs": 100,
            }
        ),
    ),
    SEEDS[5]: Expected(1, b"unknown method: nosuch"),
}
REPLY_KEYS = {
    "complex": {"summary", "itemCount", "hasNote"},
    "schedule": {"jobId", "willRunCount", "firstRunAtMs", "effectiveBackoffMs"},
}


def _mutated_call(method: str, payload: bytes) -> Expected | None:
    """A known method with a changed payload: an error naming it, or a reply that fits.

    None for an echo that may be valid and would keep the test waiting.
    """
    request = _map(payload)
    req = request.get("req") if isinstance(request, dict) else None
    delay = req.get("delayMs") if isinstance(req, dict) else None
    if method == "echo" and isinstance(delay, int) and delay > 20:
        return None

    def check(ret: int, body: bytes) -> bool:
        if ret == 1:
            return body.startswith(f"{method}: invalid request: ".encode()) or (
                method == "schedule"
                and body in (b"job name must not be empty", b"retry.maxAttempts must be positive")
            )
        reply = _map(body)
        if ret != 0 or reply is None:
            return False
        if method == "version":
            return reply == f"timer-sdk v{__version__}"
        if method == "echo":
            assert isinstance(req, dict)
            return reply == {"echoed": req["message"], "timerName": "ipc-server"}
        return isinstance(reply, dict) and set(reply) == REPLY_KEYS[method]

    return Expected(None, check=check)


def oracle(stream: bytes, limits: Limits) -> tuple[list[Expected], bool] | None:
    """Return the replies a correct server sends for ``stream``, and whether it breaks.

    Written from docs/protocol.md with struct and cbor2 alone, never with the library's
    reader, decoder or Timer. Returns None for a stream that would keep the test waiting.
    """
    out: list[Expected] = []
    pos = 0
    while len(stream) - pos >= 4:
        method_len = int.from_bytes(stream[pos : pos + 4], "big")
        if method_len > limits.max_method_length:
            return out, True
        payload_at = pos + 8 + method_len
        if len(stream) < payload_at:
            break
        raw_method = stream[pos + 4 : payload_at - 4]
        method = raw_method.decode("utf-8", "replace")
        payload_len = int.from_bytes(stream[payload_at - 4 : payload_at], "big")
        end = payload_at + payload_len
        if payload_len > limits.max_frame_size:
            message = (
                f"{method}: frame too large: payload of {payload_len} bytes exceeds "
                f"the limit of {limits.max_frame_size} bytes"
            )
            out.append(Expected(1, message.encode()))
            pos = end
            continue
        if len(stream) < end:
            break  # a truncated frame: no reply, the server closes at our EOF
        whole = stream[pos:end]
        pos = end
        try:
            raw_method.decode()
        except UnicodeDecodeError:
            out.append(Expected(1, f"{method}: method name is not valid UTF-8".encode()))
            continue
        if method.startswith("events."):
            return None  # the event extension; not what this test is about
        if whole in SEED_REPLIES:
            out.append(SEED_REPLIES[whole])
        elif method not in ("version", "echo", "complex", "schedule"):
            out.append(Expected(1, f"unknown method: {method}".encode()))
        else:
            expected = _mutated_call(method, stream[payload_at:end])
            if expected is None:
                return None
            out.append(expected)
    return out, False


async def test_random_mutations_of_valid_frames(server: Server) -> None:
    rng = random.Random(20240521)
    cases = broken = 0
    async with bystander(server.address):
        while cases < 150:
            stream = b"".join(mutate(rng, rng.choice(SEEDS)) for _ in range(rng.randint(1, 3)))
            stream += rng.choice([b"", VERSION_REQUEST])
            predicted = oracle(stream, server.limits)
            if predicted is None:
                continue
            expected, breaks = predicted
            cases += 1
            conn = await RawConnection.open(server.address)
            try:
                await conn.send(stream)
                conn.writer.write_eof()  # so the server answers what it can, then closes
                got = replies_in(await closed_by_server(conn))
            finally:
                await conn.close()
            # A break closes the stream only after the whole frames before it are answered.
            assert len(got) == len(expected), stream.hex()
            for (ret, body), want in zip(got, expected, strict=True):
                assert want.matches(ret, body), (stream.hex(), ret, body, want)
            broken += breaks
    assert 10 < broken < 140  # both kinds of stream were exercised
    await assert_serves(server.address)


@pytest.mark.parametrize("half_close", [False, True])
async def test_frames_before_a_broken_one_are_answered(server: Server, half_close: bool) -> None:
    conn = await RawConnection.open(server.address)
    try:
        # One write, so the server reads the good frames and the bad prefix together;
        # the slow echo is still running when the server meets the bad prefix.
        good = [VERSION_REQUEST, echo_frame("slow", 50), ECHO_REQUEST, echo_frame("fast", 0)]
        await conn.send(b"".join(good) + b"\xff\xff\xff\xff")
        if half_close:
            conn.writer.write_eof()
        replies = replies_in(await closed_by_server(conn))
    finally:
        await conn.close()
    assert [ret for ret, _ in replies] == [0, 0, 0, 0]
    assert [cbor2.loads(body)["echoed"] for _, body in replies[1:]] == [
        "slow",
        "hello over the wire",
        "fast",
    ]
    assert server.stats.protocol_violations == 1
    await assert_serves(server.address)


# --- slowloris and the frame deadline ------------------------------------------


async def slowloris(address: str, data: bytes, interval: float) -> int:
    """Send ``data`` a byte at a time until the server closes; return the bytes sent."""
    conn = await RawConnection.open(address)
    closed = asyncio.ensure_future(conn.reader.read(1))
    sent = 0
    try:
        while not closed.done() and sent < len(data):
            try:
                await conn.send(data[sent : sent + 1])
            except OSError:
                break  # the server closed first
            sent += 1
            await asyncio.wait({closed}, timeout=interval)  # the attack's own pace
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(closed, 10) == b""
    finally:
        closed.cancel()
        await conn.close()
    return sent


@pytest.fixture
async def strict_server(address: str) -> AsyncIterator[Server]:
    """A server with a short frame deadline and idle timeout."""
    limits = Limits(frame_timeout=0.3, idle_timeout=0.6, max_in_flight=2)
    async with await Timer(TimerConfig(name="ipc-server")).serve(address, limits=limits) as srv:
        yield srv


async def test_slowloris_clients_are_cut_off_at_the_frame_deadline(
    strict_server: Server, server_log: pytest.LogCaptureFixture
) -> None:
    slow_frame = echo_frame("s" * 100, 0)  # ~130 bytes: 5 s at this pace
    async with bystander(strict_server.address):
        sent = await asyncio.gather(
            *(slowloris(strict_server.address, slow_frame, 0.04) for _ in range(20))
        )
    assert all(n < len(slow_frame) for n in sent), sent
    assert strict_server.stats.frame_timeouts == 20
    assert strict_server.stats.protocol_violations == 20
    assert logged(server_log, "closing: frame not finished within 0.3 s")
    await assert_serves(strict_server.address)


async def test_frame_deadline_covers_an_announced_payload(
    strict_server: Server, server_log: pytest.LogCaptureFixture
) -> None:
    conn = await RawConnection.open(strict_server.address)
    try:
        await conn.send(b"\x00\x00\x00\x04echo\x00\x00\x01\x00" + b"x" * 10)  # 246 bytes owed
        assert await closed_by_server(conn) == b""
        assert logged(server_log, peer_of(conn), "frame not finished")
    finally:
        await conn.close()
    assert strict_server.stats.frame_timeouts == 1
    await assert_serves(strict_server.address)


async def test_frame_deadline_covers_a_refused_payload_being_skipped(strict_server: Server) -> None:
    conn = await RawConnection.open(strict_server.address)
    try:
        await conn.send(b"\x00\x00\x00\x04echo\xff\xff\xff\xff")
        ret, body = await conn.recv_reply()
        assert (ret, b"frame too large" in body) == (1, True)
        assert await closed_by_server(conn) == b""  # not 4 GiB later
    finally:
        await conn.close()
    assert strict_server.stats.frame_timeouts == 1


async def test_no_deadline_while_the_in_flight_bound_holds_whole_frames(
    strict_server: Server,
) -> None:
    # Four frames, two handled at a time, each 0.4 s: the last two wait past the deadline.
    conn = await RawConnection.open(strict_server.address)
    try:
        await conn.send(b"".join(echo_frame(f"w{i}", 400) for i in range(4)))
        for i in range(4):
            ret, body = await conn.recv_reply()
            assert (ret, cbor2.loads(body)["echoed"]) == (0, f"w{i}")
    finally:
        await conn.close()
    assert strict_server.stats.frame_timeouts == 0


async def test_no_deadline_between_frames(address: str) -> None:
    limits = Limits(frame_timeout=0.1)
    async with await Timer().serve(address, limits=limits) as server:
        async with await TimerClient.connect(server.address) as client:
            await client.version()
            # Proving something does not happen takes waiting: three deadlines, quiet.
            await asyncio.sleep(0.3)
            await client.version()
        assert server.stats.frame_timeouts == 0


# --- idle timeout ----------------------------------------------------------------


async def test_idle_connection_is_closed_and_counted(
    strict_server: Server, server_log: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    conn = await RawConnection.open(strict_server.address)
    try:
        await conn.send(VERSION_REQUEST)
        await conn.recv_reply()
        quiet_since = loop.time()
        assert await closed_by_server(conn) == b""
        assert loop.time() - quiet_since >= 0.6 - 0.05  # never before the timeout
        assert logged(server_log, peer_of(conn), "idle")
    finally:
        await conn.close()
    assert strict_server.stats.idle_timeouts == 1
    await assert_serves(strict_server.address)


async def test_idle_timeout_spares_a_connection_with_a_call_in_flight(
    strict_server: Server,
) -> None:
    async with await TimerClient.connect(strict_server.address) as client:
        reply = await client.echo(EchoRequest(message="long", delay_ms=1500))
        assert reply.echoed == "long"
        await wait_until(lambda: client.closed)  # then idle: closed after all
        with pytest.raises(ConnectionLost):
            await client.version()
    assert strict_server.stats.idle_timeouts == 1


# --- connection floods -------------------------------------------------------------


async def test_flood_above_max_connections_is_refused_at_once(
    address: str, server_log: pytest.LogCaptureFixture
) -> None:
    limits = Limits(max_connections=8)
    async with await Timer().serve(address, limits=limits) as server:
        clients = [await TimerClient.connect(server.address, timeout=20) for _ in range(8)]
        try:
            await asyncio.gather(*(c.version() for c in clients))
            flood = await asyncio.gather(*(RawConnection.open(server.address) for _ in range(200)))
            try:
                seen = await asyncio.gather(*(closed_by_server(c) for c in flood))
                assert seen == [b""] * 200
            finally:
                await asyncio.gather(*(c.close() for c in flood))
            assert server.stats.connections_refused == 200
            assert logged(server_log, "refusing", "8 connections open")
            replies = await asyncio.gather(*(c.version() for c in clients))
            assert len(set(replies)) == 1
            for c in clients[:4]:
                await c.close()
            await wait_until(lambda: len(server.connections) == 4)
            more = [await TimerClient.connect(server.address) for _ in range(4)]
            assert len(set(await asyncio.gather(*(c.version() for c in more)))) == 1
            clients += more
        finally:
            await asyncio.gather(*(c.close() for c in clients))


async def flood(address: str, count: int) -> list[TimerClient | BaseException]:
    """Open ``count`` clients at once and make one call on each; keep them open."""

    async def one(i: int) -> TimerClient:
        client = await TimerClient.connect(address, timeout=60, connect_timeout=60)
        try:
            reply = await client.echo(EchoRequest(message=f"f{i}", delay_ms=0))
        except BaseException:
            await client.close()
            raise
        assert reply.echoed == f"f{i}"
        return client

    return await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)


async def close_all(results: list[TimerClient | BaseException]) -> None:
    await asyncio.gather(*(r.close() for r in results if isinstance(r, TimerClient)))


@pytest.mark.timeout(90)
async def test_thousand_connection_flood_at_default_limits() -> None:
    size = flood_size(1000, 1)  # the server process has a limit of its own; it inherits ours
    async with ServerProcess() as server:
        await assert_serves(server.address)
        rss_before, _ = server.rss_kib()
        results = await flood(server.address, size)
        try:
            failures = [r for r in results if not isinstance(r, TimerClient)]
            assert not failures, failures[:3]
            rss_during, _ = server.rss_kib()
        finally:
            await close_all(results)
        await assert_serves(server.address)
        # ~10 KiB per connection is expected; a leak or a preallocation shows as far more.
        assert rss_during - rss_before < 48 * MiB, (rss_before, rss_during)
        assert await server.stop() == 0


@pytest.mark.timeout(60)
async def test_burst_of_connections_on_a_unix_socket(tmp_path: Path) -> None:
    size = flood_size(500, 2)  # both ends are in this process
    # In process, the whole burst connects before the server accepts any: asyncio's
    # default backlog of 100 overflowed every time, and CPython's sock_connect takes a
    # unix connect() that got EAGAIN for success (then ENOTCONN on the first call).
    async with await Timer().serve(f"unix:{tmp_path}/burst.sock") as server:
        results = await flood(server.address, size)
        try:
            failures = [r for r in results if not isinstance(r, TimerClient)]
            assert not failures, f"{len(failures)} of {size} failed, e.g. {failures[0]!r}"
        finally:
            await close_all(results)


@pytest.mark.timeout(90)
async def test_flood_above_the_limit_of_a_server_process() -> None:
    size = flood_size(300, 1)
    cap = size // 3
    async with ServerProcess("tcp:127.0.0.1:0", "--max-connections", str(cap)) as server:
        clients = await asyncio.gather(
            *(TimerClient.connect(server.address, timeout=30) for _ in range(size))
        )
        try:
            outcomes = await asyncio.gather(*(c.version() for c in clients), return_exceptions=True)
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        served = [o for o in outcomes if isinstance(o, str)]
        refused = [o for o in outcomes if isinstance(o, ConnectionLost)]
        assert (len(served), len(refused)) == (cap, size - cap), {type(o) for o in outcomes}
        await assert_serves(server.address)
        assert any("refusing" in line for line in server.lines)


# --- memory stays bounded ------------------------------------------------------------


async def hostile_round(address: str) -> None:
    """One pass of every hostile input, on fresh connections, against ``address``."""
    conns = [await RawConnection.open(address) for _ in CASES]
    try:
        for conn, case in zip(conns, CASES.values(), strict=True):
            await conn.send(case.data)
            conn.writer.write_eof()
        await asyncio.gather(*(closed_by_server(c, 30) for c in conns))
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    rng = random.Random(len(address))
    for _ in range(20):
        conn = await RawConnection.open(address)
        try:
            await conn.send(b"".join(mutate(rng, rng.choice(SEEDS[2:])) for _ in range(3)))
            conn.writer.write_eof()
            await closed_by_server(conn, 30)
        finally:
            await conn.close()
    await close_all(await flood(address, 200))
    await assert_serves(address)


@pytest.mark.timeout(120)
async def test_server_memory_stays_bounded_under_repeated_attack() -> None:
    async with ServerProcess("tcp:127.0.0.1:0", "--frame-timeout", "2") as server:
        await hostile_round(server.address)  # the first round warms every cache
        warmed, _ = server.rss_kib()
        for _ in range(4):
            await hostile_round(server.address)
        with contextlib.suppress(TimeoutError):  # the closes may still be in its queue
            await wait_until(lambda: server.rss_kib()[0] - warmed < 8 * MiB, timeout=5)
        after, peak = server.rss_kib()
        assert after - warmed < 8 * MiB, (warmed, after, peak)
        assert await server.stop() == 0


@pytest.mark.timeout(60)
async def test_announced_payloads_allocate_nothing_before_they_arrive() -> None:
    async with ServerProcess("tcp:127.0.0.1:0", "--frame-timeout", "30") as server:
        await assert_serves(server.address)
        before, _ = server.rss_kib()
        # 200 frames announce the largest allowed payload (1 MiB) and send 16 bytes of it;
        # 200 more announce 4 GiB. Allocating on the prefix alone would take 200 MiB.
        limit = Limits().max_frame_size
        owed = b"\x00\x00\x00\x04echo" + limit.to_bytes(4, "big") + b"x" * 16
        huge = b"\x00\x00\x00\x04echo\xff\xff\xff\xff"
        conns = [await RawConnection.open(server.address) for _ in range(400)]
        try:
            for i, conn in enumerate(conns):
                await conn.send(owed if i % 2 else huge)
            for conn in conns[::2]:
                ret, _ = await conn.recv_reply()
                assert ret == 1
            await assert_serves(server.address)  # ordered after all 400 writes
            during, _ = server.rss_kib()
        finally:
            await asyncio.gather(*(c.close() for c in conns))
        assert during - before < 24 * MiB, (before, during)


@pytest.mark.timeout(60)
async def test_whole_max_size_frames_are_freed_after_use() -> None:
    async with ServerProcess() as server:
        await assert_serves(server.address)
        before, _ = server.rss_kib()
        junk = encode_request(b"version", b"\xff" * Limits().max_frame_size)
        for _ in range(3):
            conns = [await RawConnection.open(server.address) for _ in range(20)]
            try:
                for conn in conns:
                    await conn.send(junk)
                for conn in conns:
                    assert (await conn.recv_reply())[0] == 1
            finally:
                await asyncio.gather(*(c.close() for c in conns))
        await assert_serves(server.address)
        # 20 frames of 1 MiB may be resident at once (~30 MiB at the peak); they must be
        # returned once their connections are gone, which the server may not have seen yet.
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: server.rss_kib()[0] - before < 16 * MiB, timeout=5)
        after, peak = server.rss_kib()
        assert after - before < 16 * MiB, (before, after, peak)


@pytest.mark.timeout(120)
async def test_a_client_that_never_reads_cannot_grow_the_server() -> None:
    async with ServerProcess() as server:
        await assert_serves(server.address)
        before, _ = server.rss_kib()
        chunk = echo_frame("x" * 1000, 0) * 1000  # ~1 MiB of requests, ~1 MiB of replies
        cap = 48  # MiB of requests per connection, if the server never pushed back

        async def pipeline_without_reading(conn: RawConnection) -> int:
            for sent in range(cap):
                conn.writer.write(chunk)
                try:
                    await asyncio.wait_for(conn.writer.drain(), 2)
                except TimeoutError:
                    return sent  # the server stopped reading: backpressure
            return cap

        conns = [await RawConnection.open(server.address) for _ in range(8)]
        try:
            sent = await asyncio.gather(*(pipeline_without_reading(c) for c in conns))
            during, _ = server.rss_kib()
            await assert_serves(server.address)  # the others are still served meanwhile
        finally:
            for conn in conns:
                conn.writer.transport.abort()  # unread replies would make close() wait
            await asyncio.gather(*(c.close() for c in conns))
        assert all(n < cap for n in sent), sent
        # Replies for the requests sent would need ~sum(sent) MiB if they were buffered.
        assert during - before < 48 * MiB, (before, during, sent)


# --- faults: the server goes away, shuts down, restarts ------------------------


@pytest.mark.timeout(60)
async def test_server_killed_mid_call_fails_every_pending_call_promptly() -> None:
    async with ServerProcess() as server:
        clients = [await TimerClient.connect(server.address) for _ in range(3)]
        try:
            for c in clients:
                await c.version()
            calls = [
                asyncio.create_task(c.echo(EchoRequest(message="never", delay_ms=30_000)))
                for c in clients
                for _ in range(20)
            ]
            await wait_until(lambda: all(c.pending == 20 for c in clients))
            server.send_signal(signal.SIGKILL)
            async with asyncio.timeout(5):  # promptly, not at the 30 s echo
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(o, ConnectionLost) for o in outcomes), outcomes[:3]
            assert all(c.closed for c in clients)
        finally:
            await asyncio.gather(*(c.close() for c in clients))


LINE_SHUTTING_DOWN = re.compile("shutting down")


@pytest.mark.timeout(60)
async def test_sigterm_finishes_requests_read_and_refuses_new_connections() -> None:
    async with ServerProcess() as server:
        conn = await RawConnection.open(server.address)
        try:
            # One write: the first reply proves the server has read the whole batch.
            await conn.send(
                echo_frame("first", 0) + b"".join(echo_frame(f"t{i}", 300) for i in range(10))
            )
            _, body = await conn.recv_reply()
            assert cbor2.loads(body)["echoed"] == "first"
            server.send_signal(signal.SIGTERM)
            await server.wait_for_line(LINE_SHUTTING_DOWN)

            async def refused() -> bool:
                try:
                    probe = await TimerClient.connect(server.address, connect_timeout=2)
                except ConnectError:
                    return True
                async with probe:  # accepted in the moment before the listener closed
                    with contextlib.suppress(TimerConnectionError):
                        await probe.version()
                return False

            async with asyncio.timeout(10):
                while not await refused():
                    pass
            replies = replies_in(await closed_by_server(conn))
        finally:
            await conn.close()
        assert [cbor2.loads(b)["echoed"] for _, b in replies] == [f"t{i}" for i in range(10)]
        assert await server.stop() == 0
        assert any("stopped" in line for line in server.lines)


@pytest.mark.timeout(60)
async def test_shutdown_timeout_bounds_a_slow_call() -> None:
    async with ServerProcess("tcp:127.0.0.1:0", "--shutdown-timeout", "0.3") as server:
        conn = await RawConnection.open(server.address)
        try:
            # One write: the version reply proves the server has read the slow echo too.
            await conn.send(VERSION_REQUEST + echo_frame("slow", 60_000))
            assert (await conn.recv_reply())[0] == 0
            server.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):  # the echo alone would take 60 s
                replies = replies_in(await closed_by_server(conn))
                assert await server.stop() == 0
        finally:
            await conn.close()
        assert replies == [(1, b"echo: cancelled: the server is shutting down")]


async def test_client_close_leaks_no_task_and_no_socket(server: Server) -> None:
    tasks_before = asyncio.all_tasks()

    async def call_and_close() -> None:
        client = await TimerClient.connect(server.address)
        calls = [
            asyncio.create_task(client.echo(EchoRequest(message=str(i), delay_ms=50)))
            for i in range(50)
        ]
        await wait_until(lambda: client.pending == 50)
        await client.close()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(o, ClientClosedError) for o in outcomes)

    await call_and_close()
    await wait_until(lambda: not server.connections)
    await wait_until(lambda: not server.tasks)
    assert asyncio.all_tasks() == tasks_before
    # The client is garbage now: an unclosed socket or transport would warn here.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


class ThreadServer:
    """A server in a thread, with blocking sockets: it answers while the test's loop is stalled.

    It reads one request, writes ``reply`` and sets :attr:`replied`; then it answers the
    requests that follow with ``later`` until the client hangs up.
    """

    def __init__(self, path: str, request_size: int, reply: bytes, later: bytes) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.request_size = request_size
        self.reply = reply
        self.later = later
        self.replied = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data = b""
            while len(data) < self.request_size:
                data += conn.recv(self.request_size - len(data))
            conn.sendall(self.reply)
            self.replied.set()
            while conn.recv(65536):
                conn.sendall(self.later)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


async def test_a_reply_read_in_the_iteration_its_deadline_fires_wins(tmp_path: Path) -> None:
    """The reply and the deadline become due together, by construction: the reply wins.

    The loop is held while the server thread replies and the deadline passes; in the
    next iteration asyncio runs the read (I/O callbacks first), then the deadline.
    """
    path = str(tmp_path / "race.sock")
    request = echo_frame("r", 0)
    later = ECHO_REPLY
    reply = encode_reply(0, cbor2.dumps({"echoed": "r", "timerName": "ipc-server"}))
    server = ThreadServer(path, len(request), reply, later)
    try:
        async with await TimerClient.connect(f"unix:{path}") as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            call = asyncio.create_task(
                client.echo(EchoRequest(message="r", delay_ms=0), timeout=0.05)
            )
            await asyncio.sleep(0)  # the task's first step writes the request and arms the deadline
            assert client.pending == 1
            # Hold the loop (no await) until the reply is in our socket and the deadline is past.
            assert server.replied.wait(30)
            transport = client._protocol.transport
            assert transport is not None
            readable, _, _ = select.select([transport.get_extra_info("socket")], [], [], 30)
            assert readable
            while loop.time() < started + 0.1:
                time.sleep(0.01)  # noqa: ASYNC251  (the point: nothing else may run)
            [outcome] = await asyncio.gather(call, return_exceptions=True)
            assert outcome == EchoResponse(echoed="r", timer_name="ipc-server")
            # The connection stayed in step: the next call gets the next reply.
            reply_next = await client.echo(EchoRequest(message="hello over the wire", delay_ms=5))
            assert reply_next.echoed == "hello over the wire"
    finally:
        server.close()


@pytest.mark.timeout(60)
async def test_reconnect_never_replays_a_call_that_may_have_run(tmp_path: Path) -> None:
    path = tmp_path / "re.sock"
    async with ServerProcess(f"unix:{path}") as server:
        client = await TimerClient.connect(server.address, reconnect=True, timeout=20)
        try:
            in_flight = asyncio.create_task(
                client.echo(EchoRequest(message="once", delay_ms=30_000))
            )
            await wait_until(lambda: client.pending == 1)
            server.send_signal(signal.SIGKILL)
            with pytest.raises(ConnectionLost):
                await in_flight
            assert path.exists()  # a stale socket file: nobody listens on it
            # A stand-in server at the same path records every byte the client sends next.
            received = bytearray()

            # A reconnecting client first asks for the close notice, refused as unknown here.
            ask = encode_request(b"server.goaway", b"\xa0")

            async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                received.extend(await reader.readexactly(len(ask) + len(VERSION_REQUEST)))
                writer.write(encode_reply(1, b"unknown method: server.goaway"))
                writer.write(encode_reply(0, cbor2.dumps("stand-in")))
                await writer.drain()
                writer.close()

            async with await asyncio.start_unix_server(record, str(path)):
                assert await client.version() == "stand-in"
            assert bytes(received) == ask + VERSION_REQUEST  # the echo "once" was not sent again
            # The real server comes back on the same path, replacing the stale socket.
            async with ServerProcess(f"unix:{path}") as again:
                reply = await client.echo(EchoRequest(message="new", delay_ms=0))
                assert reply.echoed == "new"
                assert await again.stop() == 0
        finally:
            await client.close()


async def test_hostile_server_cannot_make_the_client_allocate_or_hang() -> None:
    async def liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"\x00\x00\x00\x00\xff\xff\xff\xff")  # a 4 GiB reply body
        await writer.drain()
        await reader.read()  # until the client hangs up
        writer.close()

    listener = await asyncio.start_server(liar, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with listener, await TimerClient.connect(f"tcp:127.0.0.1:{port}") as client:
        async with asyncio.timeout(5):
            with pytest.raises(ProtocolError, match="exceeds the limit"):
                await client.version()
        assert client.closed


# --- local security ------------------------------------------------------------


def test_the_cli_binds_loopback_by_default() -> None:
    from timer_sdk.tools.cli import _parser

    address = _parser().parse_args(["serve"]).address
    assert address.startswith("tcp:127.0.0.1:")


async def test_unix_socket_mode_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    async with await Timer().serve(f"unix:{path}", unix_mode=0o660):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    async with ServerProcess(f"unix:{path}", "--unix-mode", "640") as server:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        await assert_serves(server.address)
    async with ServerProcess(f"unix:{path}"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_unix_refuses_to_replace_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "link.sock"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        await Timer().serve(f"unix:{link}")
    assert link.is_symlink()
    assert target.read_text() == "keep me"


async def test_unix_refuses_to_replace_a_live_socket_of_another_process(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    async with ServerProcess(f"unix:{path}") as server:
        with pytest.raises(OSError, match="already listening"):
            await Timer().serve(f"unix:{path}")
        await assert_serves(server.address)
