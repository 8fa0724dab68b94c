"""The ``timer-sdk`` command explains itself: help texts, errors, hints and signals.

Most checks read what a user reads: the output of a real ``timer-sdk``
process, against real servers where one is involved.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import trustme

from timer_sdk import EchoEvent, EchoRequest, Limits, Server, Timer, TimerClient
from timer_sdk.errors import ConnectError, TimerConnectionError
from timer_sdk.tools import schema
from timer_sdk.tools.cli import LISTENING, _parser, main
from timer_sdk.tools.cli_help import _limit_type, limits_from_args
from timer_sdk.wire.api import METHODS


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "timer_sdk", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def arun(*args: str) -> tuple[int, str, str]:
    """Run the command without blocking the test's loop (it may serve the command)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "timer_sdk", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def flat(text: str) -> str:
    """Help text with argparse's line wrapping undone."""
    return re.sub(r"\s+", " ", text)


@pytest.fixture
async def plain_server() -> AsyncIterator[Server]:
    async with await Timer().serve("tcp:127.0.0.1:0") as server:
        yield server


# --- help --------------------------------------------------------------------


def test_top_level_help_is_plain_text_and_lists_every_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = run("--help")  # the real command, once; each command's help from the same parser
    assert out.returncode == 0
    assert "``" not in out.stdout and ":mod:" not in out.stdout
    for command in ("serve", "call", "example", "schema", "describe", "compat", "stubs", "demo",
                    "bench"):  # fmt: skip
        assert re.search(rf"^\s+{command}\s+\w", out.stdout, re.MULTILINE), command
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        assert exited.value.code == 0, command
        text = capsys.readouterr().out
        assert text.startswith(f"usage: timer-sdk {command}"), command
        assert not re.search(r"``|:(mod|class|func|meth):`", text), f"reST in {command} --help"


def test_the_soak_tools_help_is_for_users() -> None:
    # Its module docstring speaks to maintainers (module size, tests): not help text.
    done = subprocess.run(
        [sys.executable, "-m", "timer_sdk.tools.soak", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.startswith("usage: python -m timer_sdk.tools.soak")
    assert "mismatches (must be 0)" in done.stdout
    for internal in ("Over 400 lines", "tests/", "``", "CVE-", "imports it"):
        assert internal not in done.stdout, internal


def test_call_help_lists_every_method_with_its_json_shape() -> None:
    out = run("call", "--help")
    assert out.returncode == 0
    text = flat(out.stdout)
    for name, method in METHODS.items():
        assert f" {name} {flat(schema.shape(method.params))}" in text, name
    assert '"delayMs": int' in text  # wire names, not delay_ms
    assert "--timeout SECONDS time to wait for the reply (seconds; default 30)" in text
    assert "timer-sdk example METHOD" in text


def test_describe_and_compat_help_say_what_they_compare_and_how_they_exit() -> None:
    describe = flat(run("describe", "--help").stdout)
    assert "usage: timer-sdk describe [-h] [--format {cddl,json-schema}]" in describe
    assert "byte for byte" in describe and "server.describe" in describe
    compat = flat(run("compat", "--help").stdout)
    assert "0 when compatible both ways, 1 when something breaks, 2 when OLD or NEW" in compat
    assert "OLD the older API: a file written by `timer-sdk schema --format json-schema`" in compat
    assert "an older client against a newer server" in compat


def test_serve_help_gives_every_limit_a_flag_with_help_and_unit() -> None:
    text = flat(run("serve", "--help").stdout)
    for field in dataclasses.fields(Limits):
        flag = "--" + field.name.replace("_", "-")
        unit = field.metadata["unit"]
        assert f"{flag} {unit.upper()} {flat(field.metadata['help'])} ({unit}; default" in text
    assert "--idle-timeout SECONDS" in text and "default off; 0 or off: no limit" in text
    assert "--shutdown-timeout SECONDS" in text and "(seconds; default 10)" in text


def test_every_serve_and_call_option_has_help() -> None:
    subcommands = next(
        action for action in _parser()._actions if isinstance(action, argparse._SubParsersAction)
    )
    for name in ("serve", "call", "example", "schema", "describe", "compat"):
        for action in subcommands.choices[name]._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_limit_flags_reach_limits() -> None:
    args = _parser().parse_args(
        ["serve", "--max-depth", "3", "--idle-timeout", "2.5", "--frame-timeout", "off"]
    )
    assert limits_from_args(args) == Limits(max_depth=3, idle_timeout=2.5, frame_timeout=None)
    args = _parser().parse_args(["serve", "--frame-timeout", "0"])
    assert limits_from_args(args).frame_timeout is None
    assert limits_from_args(_parser().parse_args(["serve"])) == Limits()


def test_a_bad_limit_value_names_the_flag_and_the_unit() -> None:
    out = run("serve", "--max-depth", "lots")
    assert out.returncode == 2
    assert "--max-depth" in out.stderr and "expected a whole number of levels" in out.stderr
    out = run("serve", "--max-frame-size", "off")  # not switchable off
    assert "expected a whole number of bytes, got 'off'" in out.stderr
    out = run("serve", "--idle-timeout", "-1")
    assert "must not be negative" in out.stderr


def test_the_flag_generator_handles_every_kind_of_bound() -> None:
    assert _limit_type("a", int) == (int, False)
    assert _limit_type("b", float) == (float, False)
    assert _limit_type("c", int | None) == (int, True)
    assert _limit_type("d", float | None) == (float, True)
    with pytest.raises(TypeError, match=r"Limits\.e: no flag for type"):
        _limit_type("e", bool)


# --- errors --------------------------------------------------------------------
# Bad payloads are refused before connecting: these calls need no server.


def test_a_wrong_field_reads_like_the_server_and_names_the_wire_spelling() -> None:
    out = run("call", "tcp:127.0.0.1:9", "echo", '{"req": {"message": "hi", "delay_ms": 5}}')
    assert out.returncode == 2
    assert out.stderr.startswith(
        "timer-sdk call: echo: invalid request: req.delayMs: Field required; "
        "req.delay_ms: Extra inputs are not permitted\n"
    )
    assert "(req.delay_ms is spelled delayMs on the wire)" in out.stderr
    assert 'the payload of echo is {"req": {"message": text, "delayMs": int}}' in out.stderr
    for internal in ("EchoParams", "type=", "http", "Traceback", "pydantic"):
        assert internal not in out.stderr


def test_snake_case_is_refused_deep_inside_lists_too() -> None:
    payload = {"req": {"messages": [{"message": "m", "delay_ms": 1}], "tags": []}}
    out = run("call", "tcp:127.0.0.1:9", "complex", json.dumps(payload))
    assert out.returncode == 2
    assert "req.messages.0.delay_ms is spelled delayMs on the wire" in out.stderr


def test_a_payload_that_is_not_an_object_shows_the_shape() -> None:
    out = run("call", "tcp:127.0.0.1:9", "echo", "[1]")
    assert out.returncode == 2
    assert "echo: the payload must be a JSON object: {" in out.stderr


def test_an_unknown_method_lists_the_known_ones_and_guesses() -> None:
    out = run("call", "tcp:127.0.0.1:9", "Echo")
    assert out.returncode == 2
    assert out.stderr == (
        "timer-sdk call: unknown method 'Echo' (did you mean echo?); "
        "the methods are: version, echo, complex, schedule\n"
    )
    assert run("example", "nosuch").stderr.startswith("timer-sdk example: unknown method")
    # A name like none of them gets no guess: 'nope' is not a typo of 'complex'.
    assert "did you mean" not in run("example", "nope").stderr


async def test_every_example_is_accepted_by_a_real_server(plain_server: Server) -> None:
    for name in METHODS:
        code, payload, err = await arun("example", name)
        assert code == 0, err
        code, reply, err = await arun("call", plain_server.address, name, payload)
        assert code == 0, f"{name} {payload}: {err}"
        assert json.loads(reply) is not None


async def test_schema_command_prints_the_generated_schemas() -> None:
    code, out, _ = await arun("schema", "--format", "cddl")
    assert code == 0 and out == schema.cddl()
    code, out, _ = await arun("schema", "--format", "json-schema")
    assert code == 0 and json.loads(out) == schema.json_schema()


# --- TLS hints, against real servers --------------------------------------------------


async def test_tls_client_against_a_plain_server_is_told_so(plain_server: Server) -> None:
    port = plain_server.address.rsplit(":", 1)[1]
    code, _, err = await arun("call", f"tls:127.0.0.1:{port}", "version")
    assert code == 1
    assert "the server does not speak TLS" in err and "use tcp: instead of tls:" in err
    assert "certificate" not in err and "Traceback" not in err

    context = ssl.create_default_context()
    with pytest.raises(ConnectError, match="does not speak TLS") as caught:
        await TimerClient.connect(f"tls:127.0.0.1:{port}", ssl=context)
    assert "certificate" not in str(caught.value)


async def test_a_refused_client_certificate_is_hinted_at() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca.configure_trust(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.maximum_version = ssl.TLSVersion.TLSv1_2  # refused at the handshake
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with await Timer().serve("tcp:127.0.0.1:0", ssl=server_context) as server:
        with pytest.raises(
            ConnectError, match=r"is a client certificate required, or is yours from a CA"
        ):
            await TimerClient.connect(server.address, ssl=client_context)


# --- signals -------------------------------------------------------------------------


ONE_PROCESS = [
    "timer-sdk: shutting down, finishing 1 request in flight\n",
    "timer-sdk: still finishing 1 request in flight; signal once more to stop at once\n",
    "timer-sdk: stopping at once, abandoning 1 request in flight\n",
]
WORKERS = [
    "timer-sdk: shutting down 2 workers\n",  # once the idle worker has stopped
    "timer-sdk: still waiting for the workers to finish requests in flight; "
    "signal once more to stop at once\n",
    "timer-sdk: stopping at once\n",
]


@pytest.mark.parametrize(
    ("workers", "lines"), [("1", ONE_PROCESS), ("2", WORKERS)], ids=["one-process", "workers"]
)
async def test_second_ctrl_c_is_heard_and_a_third_stops_at_once(
    workers: str, lines: list[str]
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "timer_sdk", "serve", "tcp:127.0.0.1:0",
        "--shutdown-timeout", "100", "--workers", workers,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None

    async def line() -> str:
        assert proc.stdout is not None
        return (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()

    try:
        match = LISTENING.search(await line())
        assert match is not None
        if workers != "1":  # with the nats extra, the parent says where events are shared
            assert (await line()).startswith("timer-sdk: events shared through")
        client = await TimerClient.connect(match.group(1), timeout=60)
        async with client.events() as events:
            slow = asyncio.ensure_future(client.echo(EchoRequest(message="slow", delay_ms=100_000)))
            marker = asyncio.ensure_future(client.echo(EchoRequest(message="marker", delay_ms=0)))
            # The marker's event proves the server has read both requests.
            first = await asyncio.wait_for(anext(events), 30)
            assert isinstance(first, EchoEvent) and first.message == "marker"
            proc.send_signal(signal.SIGINT)
            assert await line() == lines[0]
            proc.send_signal(signal.SIGINT)
            assert await line() == lines[1]
            assert proc.returncode is None  # heard, and still finishing
            proc.send_signal(signal.SIGINT)
            assert await line() == lines[2]
            assert await line() == "timer-sdk: stopped at once\n"
            assert await asyncio.wait_for(proc.wait(), 30) == 1
            for call in (slow, marker):
                with pytest.raises(TimerConnectionError):
                    await call
        await client.close()
        assert "Traceback" not in (await proc.stderr.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
