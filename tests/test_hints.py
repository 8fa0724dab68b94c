"""What a newcomer reads when something is missing or stopping: install hints, stop notices."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from timer_sdk import EchoRequest, RemoteCallError, Timer, TimerClient, _extras
from timer_sdk._extras import EXTRAS, install_hint
from timer_sdk.bench.rows import Row, Target
from timer_sdk.bench.table import LEGEND, TARGET_NOTE
from timer_sdk.bus import NATS_EXTRA
from timer_sdk.tools.cli_help import help_texts

from .conftest import wait_until

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _names(requirements: list[str]) -> tuple[str, ...]:
    return tuple(re.match(r"[A-Za-z0-9._-]+", r).group() for r in requirements)  # type: ignore[union-attr]


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_install_hints_name_the_packages_the_extra_brings(extra: str) -> None:
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert EXTRAS[extra] == _names(declared[extra])
    # This suite runs from an editable clone: the extra is installed into it.
    assert install_hint(extra) == f"pip install -e '{PYPROJECT.parent}[{extra}]'"


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_from_a_wheel_the_hint_names_the_packages(
    extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 'timer-sdk[...]' would need the project on an index; a wheel has no clone.
    monkeypatch.setattr(_extras, "editable_clone", lambda: None)
    assert install_hint(extra) == "pip install " + " ".join(EXTRAS[extra])


def test_the_nats_hint_is_the_one_the_bus_gives() -> None:
    assert install_hint("nats") == NATS_EXTRA


def test_an_error_reply_names_its_method_once() -> None:
    assert str(RemoteCallError("echo", "echo: invalid request")) == "echo: invalid request"
    assert str(RemoteCallError("schedule", "job name must not be empty")) == (
        "schedule: job name must not be empty"
    )
    assert str(RemoteCallError("echo", "")) == "echo"


async def _stop_with_sigint(*, slow_call: bool, caplog: pytest.LogCaptureFixture) -> list[str]:
    """Serve with serve_until_signal, send SIGINT, return what it logged and at which level."""
    caplog.set_level(logging.INFO, logger="timer_sdk.shutdown")
    server = await Timer().serve("tcp:127.0.0.1:0")
    async with await TimerClient.connect(server.address, timeout=30) as client:
        call = None
        if slow_call:
            call = asyncio.ensure_future(client.echo(EchoRequest(message="slow", delay_ms=300)))
            await wait_until(lambda: len(server.tasks) == 1)
        serving = asyncio.ensure_future(server.serve_until_signal())
        await asyncio.sleep(0)  # its first step installs the signal handlers
        os.kill(os.getpid(), signal.SIGINT)
        assert await asyncio.wait_for(serving, 30) is True
        if call is not None:
            assert (await call).echoed == "slow"  # finished, not cut off
    return [
        f"{r.levelname} {r.getMessage()}" for r in caplog.records if r.name == "timer_sdk.shutdown"
    ]


async def test_an_embedded_stop_with_work_in_flight_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # WARNING: shown by an app that never set up logging, as the CLI shows it.
    logged = await _stop_with_sigint(slow_call=True, caplog=caplog)
    assert logged == ["WARNING shutting down, finishing 1 request in flight"]


async def test_an_immediate_embedded_stop_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    logged = await _stop_with_sigint(slow_call=False, caplog=caplog)
    assert logged == ["INFO shutting down, finishing 0 requests in flight"]


def test_help_texts_are_plain_words() -> None:
    for name, text in help_texts().items():
        assert "``" not in text and ":class:" not in text, name  # no raw reST
        assert not re.search(r"\bissue\b", text, re.IGNORECASE), name  # no tracker numbers


def test_bench_words_name_no_tracker() -> None:
    words = " ".join([TARGET_NOTE, LEGEND, *(t.__doc__ or "" for t in (Target, Row))])
    assert not re.search(r"\bissues?\b", words, re.IGNORECASE)


@pytest.mark.timeout(120)
def test_running_one_test_prints_no_coverage_table(tmp_path: Path) -> None:
    # Its total (say 14%) says nothing about the suite; the whole run prints the table.
    root = PYPROJECT.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    # Its own data file: starting, pytest-cov erases the data files where it writes, and
    # those of this run's finished child processes are in the project's directory.
    env["COVERAGE_FILE"] = str(tmp_path / ".coverage")
    one = "tests/test_hints.py::test_an_error_reply_names_its_method_once"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", one, "-p", "no:randomly", "-p", "no:cacheprovider"],
        cwd=root, env=env, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert "TOTAL" not in done.stdout and "Missing" not in done.stdout, done.stdout


class _Installed:
    """What importlib.metadata gives for an installation: its direct_url.json, or none."""

    def __init__(self, recorded: str | None) -> None:
        self.recorded = recorded

    def read_text(self, name: str) -> str | None:
        assert name == "direct_url.json"
        return self.recorded


@pytest.mark.parametrize(
    "installed",
    [
        None,  # not installed at all: run from a source tree on sys.path
        _Installed(None),  # from an index or a wheel file without a record
        _Installed('{"url": "file:///tmp/timer_sdk-0.1.0-py3-none-any.whl", "archive_info": {}}'),
        _Installed('{"url": "file:///src/timer", "dir_info": {}}'),  # pip install . (not -e)
    ],
)
def test_only_an_editable_install_has_a_clone(
    installed: _Installed | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def distribution(name: str) -> _Installed:
        assert name == "timer-sdk"
        if installed is None:
            raise metadata.PackageNotFoundError(name)
        return installed

    _extras.editable_clone.cache_clear()
    try:
        with monkeypatch.context() as patched:
            patched.setattr(metadata, "distribution", distribution)
            assert _extras.editable_clone() is None
    finally:
        _extras.editable_clone.cache_clear()
    assert _extras.editable_clone() == PYPROJECT.parent  # this suite's own clone
