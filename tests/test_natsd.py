"""The private nats-server's lifecycle: found, started, stopped, restarted, and its failures.

Failures are made by real programs in the binary's place: one that exits at once
with an error, one that never says it listens, one that ignores SIGTERM.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import stat
import time
from pathlib import Path

import pytest

from timer_sdk.bus import BusError
from timer_sdk.bus.natsd import NatsServer, nats_server_binary

LISTENS = 'echo "[INF] Listening for client connections on 127.0.0.1:4222" >&2'


def fake(tmp_path: Path, body: str) -> str:
    """A shell script standing in for nats-server."""
    path = tmp_path / "nats-server"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_without_the_package_there_is_no_binary_and_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    assert nats_server_binary() is None
    with pytest.raises(BusError, match=r"no nats-server binary: .*nats"):
        NatsServer()


def test_only_an_executable_named_nats_server_is_the_binary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other = tmp_path / "LICENSE"
    other.write_text("")
    plain = tmp_path / "bin" / "nats-server"
    plain.parent.mkdir()
    plain.write_text("")  # not executable
    files = [importlib.metadata.PackagePath(p.name) for p in (other, plain)]
    for file, path in zip(files, (other, plain), strict=True):
        file.locate = lambda path=path: path  # type: ignore[method-assign,misc]
    monkeypatch.setattr(importlib.metadata, "files", lambda name: files)
    assert nats_server_binary() is None
    plain.chmod(0o755)
    assert nats_server_binary() == os.path.realpath(plain)


def test_a_binary_that_exits_at_once_fails_the_start_and_its_error_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    natsd = NatsServer(binary=fake(tmp_path, 'echo "[FTL] cannot listen" >&2; exit 1'))
    failed = pytest.raises(BusError, match=r"nats-server \(.*\) did not start on 127.0.0.1")
    with caplog.at_level(logging.WARNING, "timer_sdk.bus"), failed:
        natsd.start()
    assert "nats-server: [FTL] cannot listen" in caplog.text
    assert natsd.pid is None and natsd.sentinel is None


def test_a_binary_that_never_listens_fails_the_start_at_the_timeout(tmp_path: Path) -> None:
    natsd = NatsServer(binary=fake(tmp_path, "exec sleep 60"))
    started = time.monotonic()
    with pytest.raises(BusError, match="did not start"):
        natsd.start(timeout=0.2)
    assert time.monotonic() - started < 30  # stopped, not waited for
    assert natsd.pid is None


def test_a_server_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    natsd = NatsServer(binary=fake(tmp_path, f"trap '' TERM\n{LISTENS}\nexec sleep 60"))
    assert natsd.start() == "nats://127.0.0.1:4222"
    proc = natsd._proc
    assert proc is not None
    natsd.stop(timeout=0.1)
    assert proc.returncode == -9  # SIGKILL, once SIGTERM was ignored


def test_a_crash_soon_after_the_start_waits_a_second_before_the_restart() -> None:
    natsd = NatsServer()
    natsd.kill()  # not started: nothing to kill
    with natsd:
        url = natsd.url
        natsd.kill()
        assert natsd.exit_code is None  # forgotten once killed
        started = time.monotonic()
        assert natsd.restart() == url  # the same port: its clients reconnect there
        assert time.monotonic() - started >= 1.0
        with socket.create_connection((natsd.host, natsd.port), timeout=10) as sock:
            assert sock.recv(4).startswith(b"INFO")
    assert natsd.pid is None
