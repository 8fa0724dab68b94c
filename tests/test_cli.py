"""The ``timer-sdk`` command in real subprocesses: serve, call, demo."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from timer_sdk.tools.cli import LISTENING

from .conftest import port_9099


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "timer_sdk", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(params=["tcp", "unix"])
def served(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    where = "tcp:127.0.0.1:0" if request.param == "tcp" else f"unix:{tmp_path}/cli.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "timer_sdk", "serve", where, "--name", "cli-timer"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = LISTENING.search(line)
    assert match, line + (proc.stderr.read() if proc.stderr else "")
    try:
        yield match.group(1), proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_serve_and_call_every_method(served: tuple[str, subprocess.Popen[str]]) -> None:
    address, _ = served
    out = run("call", address, "version")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == "timer-sdk v0.1.0"

    out = run("call", address, "echo", '{"req": {"message": "hi", "delayMs": 5}}')
    assert json.loads(out.stdout) == {"echoed": "hi", "timerName": "cli-timer"}

    out = run("call", address, "complex", '{"req": {"messages": [], "tags": [], "note": "n"}}')
    assert json.loads(out.stdout)["summary"] == "received 0 messages, note=n, retries=0"

    schedule = {
        "job": {"name": "j", "payload": [], "priority": 1},
        "retry": {"maxAttempts": 1, "backoffMs": 5, "retryOn": []},
        "schedule": {"startAtMs": 10, "intervalMs": 0},
    }
    out = run("call", address, "schedule", json.dumps(schedule))
    assert json.loads(out.stdout) == {
        "jobId": "cli-timer:j",
        "willRunCount": 1,
        "firstRunAtMs": 10,
        "effectiveBackoffMs": 5,
    }


def test_call_errors_are_readable_and_exit_non_zero(
    served: tuple[str, subprocess.Popen[str]],
) -> None:
    address, _ = served
    bad_job = {
        "job": {"name": "", "payload": [], "priority": 1},
        "retry": {"maxAttempts": 1, "backoffMs": 5, "retryOn": []},
        "schedule": {"startAtMs": 10, "intervalMs": 0},
    }
    out = run("call", address, "schedule", json.dumps(bad_job))
    assert out.returncode == 1
    assert "error reply: schedule: job name must not be empty" in out.stderr

    out = run("call", address, "nosuch")
    assert out.returncode == 2  # refused before connecting: a usage error
    assert "unknown method 'nosuch'; the methods are: version, echo, complex, schedule" in (
        out.stderr
    )

    out = run("call", address, "nosuch", "--raw")  # sent as is: the server answers
    assert out.returncode == 1
    assert out.stderr == "timer-sdk call: error reply: unknown method: nosuch\n"

    out = run("call", address, "echo", "{not json")
    assert out.returncode == 2
    assert "not valid JSON" in out.stderr

    out = run("call", address, "echo", '{"req": {"message": 5}}')
    assert out.returncode == 2
    assert "echo: invalid request: req.message: Input should be a valid string" in out.stderr


def test_call_to_nothing_fails_cleanly(tmp_path: Path) -> None:
    out = run("call", f"unix:{tmp_path}/none.sock", "version")
    assert out.returncode == 1
    assert "cannot connect to unix:" in out.stderr
    assert "Traceback" not in out.stderr
    out = run("call", "nonsense", "version")
    assert out.returncode == 1
    assert "expected tcp:HOST:PORT" in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_shuts_down_gracefully(
    served: tuple[str, subprocess.Popen[str]], sig: signal.Signals
) -> None:
    address, proc = served
    assert run("call", address, "version").returncode == 0
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped" in out
    if address.startswith("unix:"):
        assert not Path(address[5:]).exists()


def test_serve_without_an_address_binds_loopback_port_9099() -> None:
    # Hold the port (or find it held), so the attempt fails at once and says where it was.
    with port_9099(), contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):
            stack.enter_context(socket.create_server(("127.0.0.1", 9099)))
        out = run("serve", timeout=30)
    assert out.returncode == 1
    assert "('127.0.0.1', 9099): address already in use" in out.stderr


def test_demo_round_trip() -> None:
    out = run("demo", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "echo()     -> EchoResponse(echoed='hello over the wire', timer_name='demo-timer')" in (
        out.stdout
    )
    assert "1000 pipelined echo calls" in out.stdout
    assert "all matched: True" in out.stdout
    assert "server process exited with code 0" in out.stdout
