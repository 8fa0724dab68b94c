"""docs/tls.md works as written: its certificates, servers, calls and error messages.

Each fenced block has a marker before it, ``<!-- tls-test: KIND -->``: ``certs``
runs in an empty folder and makes the PEM files; a ``serve`` or
``python-server`` block is started there (on a free port in place of the
guide's 9444) and the ``call`` and ``python-client`` blocks after it run
against it, until Ctrl-C stops it cleanly. Every row of the mistakes table is
run, and must print its message.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from timer_sdk.tools.cli import LISTENING

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "tls.md"
BIN = Path(sys.executable).parent  # where the timer-sdk script is
GUIDE_ADDRESS = "tls:127.0.0.1:9444"
KINDS = {"certs", "serve", "call", "python-server", "python-client"}


def blocks() -> list[tuple[str, str, str]]:
    """(kind, language, code) of every fenced block, in order."""
    text = GUIDE.read_text()
    found = re.findall(r"(?:<!-- tls-test: ([\w-]+) -->\n)?```(\w+)\n(.*?)```", text, re.DOTALL)
    return [(kind or "unmarked", lang, code) for kind, lang, code in found]


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def _run(argv: list[str], where: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=where, env=_env(), capture_output=True, text=True, timeout=60, check=False
    )


def _command(kind: str, code: str) -> list[str]:
    if kind.startswith("python"):
        return [sys.executable, "-c", code]
    [line] = code.strip().splitlines()
    return shlex.split(line)


@contextmanager
def serving(kind: str, code: str, where: Path) -> Iterator[str]:
    """Start a server block on a free port; yield its address; stop it with Ctrl-C."""
    argv = _command(kind, code.replace(GUIDE_ADDRESS, "tls:127.0.0.1:0"))
    proc = subprocess.Popen(
        argv, cwd=where, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = LISTENING.search(line)
        if match is None:
            pytest.fail(f"the server did not start: {line}{proc.communicate(timeout=30)[1]}")
        yield match.group(1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_every_block_is_marked() -> None:
    kinds = [kind for kind, _, _ in blocks()]
    assert set(kinds) <= KINDS, kinds
    assert kinds.count("certs") == 1
    assert kinds[0] == "certs"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("tls-guide")
    [code] = [code for kind, _, code in blocks() if kind == "certs"]
    done = _run([sys.executable, "-c", code], where)
    assert done.returncode == 0, done.stderr
    for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"):
        assert (where / name).is_file(), name
    return where


@pytest.mark.timeout(120)
def test_the_guides_servers_answer_its_clients(certs: Path) -> None:
    runs = 0
    todo = [b for b in blocks() if b[0] != "certs"]
    while todo:
        kind, _, code = todo.pop(0)
        assert kind in ("serve", "python-server"), f"a {kind} block with no server before it"
        with serving(kind, code, certs) as address:
            while todo and todo[0][0] in ("call", "python-client"):
                client_kind, _, client_code = todo.pop(0)
                argv = _command(client_kind, client_code.replace(GUIDE_ADDRESS, address))
                done = _run(argv, certs)
                assert done.returncode == 0, (client_code, done.stderr)
                assert "timer-sdk v" in done.stdout, done.stdout
                runs += 1
    assert runs == 3


def mistakes() -> list[tuple[str, str]]:
    rows = re.findall(r"^\| `(timer-sdk [^`]+)` \| `([^`]+)` \|$", GUIDE.read_text(), re.M)
    assert len(rows) >= 5
    return rows


@pytest.mark.parametrize(("command", "message"), mistakes())
def test_each_mistake_in_the_guide_says_what_it_says(
    certs: Path, command: str, message: str
) -> None:
    argv = shlex.split(command.replace(GUIDE_ADDRESS, "tls:127.0.0.1:0"))
    done = _run(argv, certs)
    assert done.returncode == 2, done.stderr
    said = done.stderr.replace("tls:127.0.0.1:0", GUIDE_ADDRESS)
    assert said.startswith(f"timer-sdk {argv[1]}: {message}"), said
