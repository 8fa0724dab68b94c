"""The generated TypeScript client: it type-checks, speaks the wire byte for byte, and works.

The client is generated into a temporary folder, compiled with ``tsc --strict``
together with the programs in ``tests/node/``, and run by Node against real
servers. Without node or npm these tests skip, except on CI (``CI`` set),
where they fail.
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import cbor2
import pytest

from timer_sdk import Timer
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
from timer_sdk.wire.api import METHODS
from timer_sdk.wire.description import describe_model

from . import _apis, _node, vectors
from ._newer_server import running
from ._programs import close_under, run_program


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh client with the test programs, compiled; the folder it is in."""
    out = tmp_path_factory.mktemp("ts-client")
    compiled = _node.build(out)
    assert compiled.returncode == 0, f"tsc --strict:\n{compiled.stdout}{compiled.stderr}"
    return out


def node_program(built: Path, program: str, *args: str) -> list[str]:
    """The command that runs a compiled test program with ``args``."""
    node, _ = _node.require_node()
    return [node, str(built / "test-build" / f"{program}.js"), *args]


async def run_node(built: Path, program: str, *args: str) -> Any:
    """Run a compiled test program with ``args`` (its addresses); what it printed, as JSON."""
    return await run_program(node_program(built, program, *args))


def item(message: str) -> dict[str, Any]:
    """An event as the client's stream yields it."""
    data = {"message": message, "echoCount": 1}
    return {"kind": "event", "event": "on_echo_fired", "data": data}


def test_the_fresh_client_type_checks_under_strict(built: Path) -> None:
    # The fixture compiled it; here, that the compile produced the whole client.
    compiled = {path.name for path in (built / "dist").glob("*.js")}
    assert compiled == {
        "client.js", "connection.js", "index.js", "readers.js", "types.js", "wire.js"
    }  # fmt: skip


async def test_every_method_end_to_end(built: Path, server: Server) -> None:
    timer = server.timer
    job = JobSpec(name="j", payload=["p"], priority=1)
    retry = RetryPolicy(max_attempts=3, backoff_ms=100, retry_on=["timeout"])
    when = ScheduleConfig(start_at_ms=1000, interval_ms=500, jitter=7)
    two = [EchoRequest(message="a", delay_ms=0), EchoRequest(message="b", delay_ms=0)]
    # What the Python procs answer to the same inputs, by wire names.
    expected = {
        "version": await timer.version(),
        "complex": (
            await timer.complex(ComplexRequest(messages=two, tags=["x", "y"], note="n", retries=3))
        ).model_dump(by_alias=True),
        "complexBare": (await timer.complex(ComplexRequest(messages=[], tags=[]))).model_dump(
            by_alias=True
        ),
        "schedule": (await timer.schedule(job, retry, when)).model_dump(by_alias=True),
    }

    seen = await run_node(built, "e2e", server.address)

    assert {key: seen[key] for key in expected} == expected
    assert seen["echo"] == {"echoed": "hello over the wire", "timerName": "ipc-server"}
    assert seen["error"] == ["RemoteCallError", "schedule", "job name must not be empty"]
    assert seen["unsafeRequest"] == (
        "RangeError: req.delayMs: 1152921504606847000 "
        "is beyond Number.MAX_SAFE_INTEGER, so not exact"
    )
    assert seen["unsafeReply"] == (
        "InvalidReplyError: schedule: invalid reply: "
        "firstRunAtMs: 9007199254740993 is beyond Number.MAX_SAFE_INTEGER"
    )
    assert seen["wide"] == -(2**40)
    assert seen["afterUnsafe"] == "still in step"
    assert seen["burst"] == [f"burst {i}" for i in range(1000)]
    assert seen["timeout"] == "CallTimeoutError echo"
    assert seen["afterTimeout"] == "next"  # not "slow": the late reply was consumed

    assert seen["events"] == [item(f"event {i}") for i in range(5)]
    assert seen["smallEvents"] == [
        {"kind": "dropped", "count": 3},
        item("event 3"),
        item("event 4"),
    ]
    assert seen["afterUnsubscribe"] == expected["version"]
    assert seen["lateReply"] == "late"
    assert seen["afterClose"] == "ConnectionClosedError"
    schedule, echo = seen["errorMessages"]
    assert schedule == "schedule: job name must not be empty"
    assert echo.startswith("echo: invalid request: ")
    assert "echo: echo:" not in echo
    refused, bad = seen["connectErrors"]
    assert refused.startswith("ConnectError unix:/nonexistent/timer.sock: "), refused
    assert bad == (
        "ConnectError nats://x:1: expected tcp:HOST:PORT or unix:PATH (this client has no TLS)"
    )


async def test_the_frames_are_the_captured_vectors_byte_for_byte(built: Path) -> None:
    async with vectors.reference_stand_in() as (address, received):
        seen = await run_node(built, "vectors", address)

    assert received == [vectors.VERSION_REQUEST, vectors.ECHO_REQUEST]
    assert seen == {
        "version": "nim-timer v0.1.0",
        "echo": {"echoed": "hello over the wire", "timerName": "ipc-server"},
    }


async def test_event_frames_never_take_a_reply_s_place(built: Path) -> None:
    """Events before the subscribe reply, drop and gap notices, events between replies."""
    methods: list[str] = []

    def frame(ret: int, item: object) -> bytes:
        body = item if isinstance(item, bytes) else cbor2.dumps(item)
        return struct.pack(">iI", ret, len(body)) + body

    def event(message: str) -> bytes:
        return frame(16, {"event": item(message)["event"], "data": item(message)["data"]})

    answers = [
        event("before the reply")
        + frame(17, {"dropped": 5})
        + frame(17, {"dropped": 0, "gap": "event bus lost"})
        + frame(0, {"events": ["on_echo_fired"]}),
        event("before the error") + frame(1, b"boom"),
        event("before the echo") + vectors.ECHO_REPLY,
    ]

    async def stand_in(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            name = await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big"))
            await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big"))
            methods.append(name.decode())
            writer.write(answer)
        await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(stand_in, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        seen = await run_node(built, "frames", f"tcp:127.0.0.1:{port}")

    assert methods == ["events.subscribe", "version", "echo"]
    assert seen == {
        "error": ["RemoteCallError", "version: boom"],
        "echo": {"echoed": "hello over the wire", "timerName": "ipc-server"},
        "items": [
            item("before the reply"),
            {"kind": "dropped", "count": 5},
            {"kind": "gap", "reason": "event bus lost"},
            item("before the error"),
            item("before the echo"),
        ],
        "ended": True,
    }


NOT_STARTED = (
    "CallNotStartedError: closed by the server (the server is shutting down) before it read "
    "this call: it never started, and is safe to send again"
)
LOST = "ConnectionClosedError: the connection closed"


@pytest.mark.parametrize("transport", ["unix"])
async def test_with_the_close_notice_an_unread_call_fails_as_never_started(
    built: Path, address: str
) -> None:
    seen, ran = await close_under(address, node_program(built, "notice", "notice", address))

    assert ran == ["first"]  # the second was never read, so never ran
    assert seen["before"] == await Timer().version()  # answered before the close
    assert seen["first"] == "first"
    assert seen["second"] == seen["after"] == NOT_STARTED  # a ConnectionClosedError too
    assert seen["events"] == [
        item("first"),
        "ConnectionClosedError: closed by the server (the server is shutting down)",
    ]


@pytest.mark.parametrize("transport", ["unix"])
async def test_without_the_close_notice_an_unread_call_may_have_run(
    built: Path, address: str
) -> None:
    seen, ran = await close_under(address, node_program(built, "notice", "no-notice", address))

    assert ran == ["first"]
    assert seen["first"] == "first"
    assert seen["second"] == seen["after"] == LOST  # as ever: it may have run
    assert seen["events"] == [item("first"), LOST]


async def test_the_close_notice_is_harmless_against_a_server_without_it(built: Path) -> None:
    """The ask is refused; a ret 18 frame is then no notice but a code to skip."""
    async with vectors.reference_stand_in(vectors.WITHOUT_CLOSE_NOTICE) as (address, received):
        seen = await run_node(built, "notice", "older", address)

    assert received == [request for request, _ in vectors.WITHOUT_CLOSE_NOTICE]  # the ask first
    assert seen == {
        "version": "nim-timer v0.1.0",
        "echo": {"echoed": "hello over the wire", "timerName": "ipc-server"},
        "unanswered": LOST,  # no promise was made: it may have run
    }


async def test_every_call_and_event_from_a_newer_server_and_an_older_one(built: Path) -> None:
    with running() as newer, running("--older") as older:
        seen = await run_node(built, "newer", newer, older)

    job = {"jobId": "ipc-server:j", "willRunCount": 120}
    assert seen["calls"] == [  # the fields this client knows, and no others
        "nim-timer v0.2.0",
        {"echoed": "one", "timerName": "ipc-server"},
        {"summary": "received 2 messages, note=n, retries=0", "itemCount": 2, "hasNote": True},
        {**job, "firstRunAtMs": 1007, "effectiveBackoffMs": 100},
        {"echoed": "two", "timerName": "ipc-server"},
    ]
    assert seen["items"] == [
        item("one"),
        {"kind": "unknown", "event": "on_job_scheduled", "data": job},
        item("two"),
    ]
    assert seen["wrongType"] == (
        "InvalidReplyError: echo: invalid reply: echoed: expected text, got number"
    )
    assert seen["after"] == "nim-timer v0.2.0"  # the connection is kept
    assert seen["olderComplex"] == "received 2 messages, note=n, retries=0"
    assert seen["olderSchedule"] == 1000
    assert seen["olderRefuses"].startswith("RemoteCallError: complex: unknown field")


def _interface(types_ts: str, name: str) -> str:
    return types_ts.split(f"export interface {name} {{\n", 1)[1].split("}", 1)[0]


def test_a_changed_model_changes_the_generated_types() -> None:
    changed = _apis.changed_echo()  # one field changed, one added
    before = _interface(stubs.render("typescript")["src/types.ts"], "EchoRequest")
    after = stubs.render("typescript", changed)["src/types.ts"]

    assert before == "  message: string;\n  delayMs: Int64;\n"
    assert _interface(after, "EchoRequest") == (
        "  message: string[];\n  delayMs: Int64;\n  replyTo?: string | null;\n"
    )
    assert "ComplexRequest" not in after  # only what the copied declaration uses
    client_ts = stubs.render("typescript", changed)["src/client.ts"]
    assert "echo(req: EchoRequest, options?: CallOptions): Promise<EchoResponse>" in client_ts
    assert "schedule(" not in client_ts


def test_a_field_without_a_wire_type_is_named() -> None:
    class Odd(TimerModel):
        when: dict[str, int]

    with pytest.raises(TypeError, match=r"no wire type for dict\[str, int\]"):
        describe_model(Odd)


def test_every_proc_gets_one_typed_method() -> None:
    client_ts = stubs.render("typescript")["src/client.ts"]
    for name in METHODS:
        assert client_ts.count(f'this.call("{name}", ') == 1, name
    assert (
        "schedule(job: JobSpec, retry: RetryPolicy, schedule: ScheduleConfig, "
        "options?: CallOptions): Promise<ScheduleResult>"
    ) in client_ts


def test_the_stubs_command_writes_the_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["stubs", "--lang", "typescript", "--out", str(tmp_path / "ts")]) == 0
    files = stubs.render("typescript")
    assert {
        str(path.relative_to(tmp_path / "ts")) for path in (tmp_path / "ts").rglob("*.*")
    } == set(files)
    assert (tmp_path / "ts" / "src" / "types.ts").read_text() == files["src/types.ts"]
    assert "wrote 9 files of the typescript client" in capsys.readouterr().out
    package = json.loads(files["package.json"])
    # Pinned exactly: the same install on every machine.
    for version in {**package["dependencies"], **package["devDependencies"]}.values():
        assert version[0].isdigit(), package


def test_an_unknown_language_is_named() -> None:
    languages = "the languages are: go, typescript"
    with pytest.raises(ValueError, match=f"unknown language 'cobol'; {languages}"):
        stubs.render("cobol")
    with pytest.raises(SystemExit):
        cli.main(["stubs", "--lang", "cobol", "--out", "x"])


def test_node_is_found_or_ci_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("TIMER_SDK_REQUIRE_TOOLS", raising=False)  # .ci/run sets it
    with pytest.raises(pytest.skip.Exception, match="node and npm not found on PATH"):
        _node.require_node()
    for variable in ("CI", "TIMER_SDK_REQUIRE_TOOLS"):
        monkeypatch.setenv(variable, "true")
        with pytest.raises(pytest.fail.Exception, match="CI or TIMER_SDK_REQUIRE_TOOLS is set"):
            _node.require_node()
        monkeypatch.delenv(variable)


def test_tsc_reports_a_type_error_in_a_program(built: Path) -> None:
    """The type check is real: a call with a wrong field type does not compile."""
    bad = built / "bad"
    bad.mkdir()
    (bad / "bad.ts").write_text(
        'import { TimerClient } from "../dist/index.js";\n'
        "declare const client: TimerClient;\n"
        'await client.echo({ message: "hi", delayMs: "5" });\n'
    )
    (bad / "tsconfig.json").write_text((built / "test" / "tsconfig.json").read_text())
    tsc = built / "node_modules" / ".bin" / "tsc"
    out = subprocess.run(
        [str(tsc), "-p", "bad", "--strict", "--noEmit"],
        cwd=built, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert "Type 'string' is not assignable to type 'number'" in out.stdout


@pytest.mark.timeout(300)
def test_installing_the_package_as_its_readme_says_warns_of_no_install_script(
    tmp_path: Path,
) -> None:
    # npm lists dependencies whose install scripts no allowScripts entry covers.
    _, npm = _node.require_node()
    version = subprocess.run([npm, "--version"], capture_output=True, text=True, check=True)
    if tuple(map(int, version.stdout.split(".")[:2])) < (11, 16):
        pytest.skip(f"npm {version.stdout.strip()} predates allowScripts")
    for name, text in stubs.render("typescript").items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund"],
        cwd=tmp_path, capture_output=True, text=True, timeout=280, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "install-scripts" not in done.stdout + done.stderr
    assert "cbor-extract" in (tmp_path / "README.md").read_text()  # and why it is safe
