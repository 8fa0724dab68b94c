"""Every code block of the README runs, exactly as printed.

Blocks are extracted from README.md, never copied. An HTML comment on the line
before each fence says how the block runs, ``<!-- readme-test: KIND: why -->``:

- ``server``: a Python script that serves on the address it names; started
  first, it serves the ``client`` and ``shell-client`` blocks, and then a
  real SIGINT must stop it with exit code 0 and nothing on stderr.
- ``client``: a Python script run against the ``server`` block's server.
- ``shell-client``: shell commands run against it; they print the ``output``
  block after them, or else the echo reply.
- ``shell``: shell commands on their own.
- ``node-client``: an ES module run by Node, with the generated TypeScript
  client installed, against a server named like the ``server`` block's.
- ``go-client``: a Go main package run with ``go run``, in a module that
  requires the generated Go client as the README says, against a server named
  like the ``server`` block's.
- ``kernel``: a cell of a real Jupyter kernel (top-level ``await``).
- ``output``: what the block before printed, compared exactly.
- ``parse-only``: a long-running command; its arguments are parsed by the
  command's own parser, and it is not run.
- ``skip``: not run, on purpose (installs packages, runs this suite, not code).

A block without a comment fails the suite, so a new one cannot go untested.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

from timer_sdk import Limits, Timer, TimerConfig, __version__
from timer_sdk.tools import cli, soak, stubs
from timer_sdk.wire import api

from . import _go, _node
from ._kernel import Kernel
from .conftest import port_9099

README = Path(__file__).resolve().parent.parent / "README.md"
KINDS = {"server", "client", "shell-client", "shell", "kernel", "output", "parse-only", "skip"}
KINDS.add("node-client")  # Node ES modules, with the generated TypeScript client
KINDS.add("go-client")  # Go programs, with the generated Go client
BIN = str(Path(sys.executable).parent)  # where the timer-sdk script is


@dataclasses.dataclass
class Block:
    kind: str
    lang: str
    code: str
    line: int

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.kind})"


def blocks() -> list[Block]:
    """Every fenced block of the README with the marker before it."""
    found = []
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w*)", lines[i])
        if fence is None:
            i += 1
            continue
        end = lines.index("```", i + 1)
        marker = re.fullmatch(r"<!-- readme-test: ([\w-]+)(?::.*)? -->", lines[i - 1])
        kind = marker.group(1) if marker else "unmarked"
        found.append(Block(kind, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n", i + 1))
        i = end + 1
    return found


def of(kind: str) -> list[Block]:
    return [block for block in blocks() if block.kind == kind]


def output_after(block: Block) -> str | None:
    """The ``output`` block right after ``block``, if there is one."""
    found = blocks()
    following = found[found.index(block) + 1 :]
    if following and following[0].kind == "output":
        return following[0].code
    return None


# What blocks without an ``output`` block print: a version, or a value shown by the kernel.
UNPRINTED = {
    "print(client.version())": (
        f"timer-sdk v{__version__}\nechoed='hi' timer_name='kitchen'\n"  # the sync quickstart
    ),
    'await client.echo(EchoRequest(message="hi", delay_ms=50))': (
        "EchoResponse(echoed='hi', timer_name='ipc-server')"  # the first kernel block
    ),
}


def expected_output(block: Block) -> str:
    """What ``block`` must print: its ``output`` block, or its entry in UNPRINTED."""
    expected = output_after(block)
    if expected is not None:
        return expected
    known = [text for line, text in UNPRINTED.items() if line in block.code]
    assert len(known) == 1, f"{block}: add an output block after it"
    return known[0]


def shell(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_block_is_marked_with_a_known_kind() -> None:
    for block in blocks():
        assert block.kind in KINDS, f"{block}: mark it with <!-- readme-test: KIND: why -->"
    assert len(of("server")) == 1
    assert of("client") and of("kernel") and of("shell-client") and of("shell")


def test_the_limits_table_lists_every_field() -> None:
    text = README.read_text()
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| [^|]+ \|$", text, re.MULTILINE)
    assert sorted(rows) == sorted(f.name for f in dataclasses.fields(Limits))


def test_the_quickstarts_run_and_ctrl_c_stops_cleanly(tmp_path: Path) -> None:
    (server_block,) = of("server")
    script = tmp_path / "kitchen.py"
    script.write_text(server_block.code)
    with port_9099():
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            first = proc.stdout.readline()
            assert first == "listening on tcp:127.0.0.1:9099\n", (
                f"{server_block}: {first!r}; port 9099 taken? {proc.stderr.read()}"
            )
            # A reply from the server also proves its signal handlers are in place:
            # they are set in the same step of the main task as the print.
            for i, block in enumerate(of("client")):
                path = tmp_path / f"client{i}.py"
                path.write_text(block.code)
                out = subprocess.run(
                    [sys.executable, str(path)],
                    cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
                )  # fmt: skip
                assert out.returncode == 0, f"{block}:\n{out.stderr}"
                assert out.stdout == expected_output(block), block
            for block in of("shell-client"):
                out = shell(block.code, tmp_path)
                assert out.returncode == 0, f"{block}:\n{out.stderr}"
                expected = output_after(block)
                if expected is not None:
                    assert out.stdout == expected, block
                else:
                    assert json.loads(out.stdout) == {"echoed": "hi", "timerName": "kitchen"}, block
            proc.send_signal(signal.SIGINT)
            rest, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    assert err == "", f"Ctrl-C printed on stderr:\n{err}"
    assert rest == "stopped\n"


def test_the_shell_blocks_run(tmp_path: Path) -> None:
    schema_block, stubs_block, go_block = of("shell")
    out = shell(stubs_block.code, tmp_path)
    assert out.returncode == 0, f"{stubs_block}:\n{out.stderr}"
    assert json.loads((tmp_path / "timer-client" / "package.json").read_text())["dependencies"]
    out = shell(go_block.code, tmp_path)
    assert out.returncode == 0, f"{go_block}:\n{out.stderr}"
    assert (tmp_path / "timer-go" / "go.mod").read_text().startswith("module example.com/timer\n")
    out = shell(schema_block.code, tmp_path)
    assert out.returncode == 0, f"{schema_block}:\n{out.stderr}"
    assert (tmp_path / "timer.cddl").read_text().startswith("; The timer wire API")
    # The example it prints is a valid request by the schema it writes.
    schema = json.loads((tmp_path / "timer.schema.json").read_text())
    example = json.loads(out.stdout)
    validator = Draft202012Validator({"$ref": "#/$defs/schedule-request", "$defs": schema["$defs"]})
    validator.validate(example)
    assert api.METHODS["schedule"].params.model_validate(example)


def test_the_kernel_blocks_run_in_a_real_kernel(tmp_path: Path) -> None:
    with Kernel(tmp_path) as kernel:
        for block in of("kernel"):
            cell = kernel.run(block.code)
            assert cell.stderr == "", f"{block}:\n{cell.stderr}"
            assert cell.text == expected_output(block), block


async def test_the_node_blocks_run_with_the_generated_client(tmp_path: Path) -> None:
    node, _ = _node.require_node()
    assert of("node-client")
    compiled = _node.build(tmp_path / "timer-client", programs=False)
    assert compiled.returncode == 0, compiled.stdout
    app = tmp_path / "app"  # a Node project that installed the client, as the README says
    (app / "node_modules").mkdir(parents=True)
    (app / "node_modules" / "timer-sdk-client").symlink_to(tmp_path / "timer-client")
    with port_9099():
        async with await Timer(TimerConfig(name="kitchen")).serve("tcp:127.0.0.1:9099"):
            for i, block in enumerate(of("node-client")):
                (app / f"block{i}.mjs").write_text(block.code)
                proc = await asyncio.create_subprocess_exec(
                    node, f"block{i}.mjs", cwd=app,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, err = await asyncio.wait_for(proc.communicate(), 60)
                assert proc.returncode == 0, f"{block}:\n{err.decode()}"
                assert out, block
                expected = output_after(block)
                if expected is not None:
                    assert out.decode() == expected, block


async def test_the_go_blocks_run_with_the_generated_client(tmp_path: Path) -> None:
    assert of("go-client")
    stubs.generate("go", tmp_path / "timer-go", module="example.com/timer")
    app = tmp_path / "app"  # a module that requires the client, as the README says
    app.mkdir()
    for command in (
        ["mod", "init", "app"],
        ["mod", "edit", "-require=example.com/timer@v0.0.0",
         "-replace=example.com/timer=../timer-go"],
    ):  # fmt: skip
        done = _go.run(command, app)
        assert done.returncode == 0, done.stderr
    with port_9099():
        async with await Timer(TimerConfig(name="kitchen")).serve("tcp:127.0.0.1:9099"):
            for block in of("go-client"):
                (app / "main.go").write_text(block.code)
                proc = await asyncio.create_subprocess_exec(
                    _go.require_go(), "run", ".", cwd=app, env=_go.ENV,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, err = await asyncio.wait_for(proc.communicate(), 300)
                assert proc.returncode == 0, f"{block}:\n{err.decode()}"
                assert out.decode() == output_after(block), block


class _Parsed(Exception):
    """The arguments parsed: stop before anything runs."""


def test_the_long_commands_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    parse = argparse.ArgumentParser.parse_args

    def parse_only(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        parse(self, *args, **kwargs)  # exits with status 2 on a bad argument
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    mains = {("timer-sdk",): cli.main, ("python", "-m", "timer_sdk.tools.soak"): soak.main}
    commands = lines = 0
    for block in of("parse-only"):
        for line in block.code.splitlines():
            words = shlex.split(line, comments=True)
            lines += bool(words)
            for prefix, main in mains.items():
                if tuple(words[: len(prefix)]) == prefix:
                    with pytest.raises(_Parsed):
                        main(words[len(prefix) :])
                    commands += 1
                    break
            else:
                pytest.fail(f"{block}: no parser for {line!r}")
    assert commands == lines > 0
