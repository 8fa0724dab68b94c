"""Build the generated TypeScript client for tests: npm install once, tsc, node.

The npm install of the client's pinned dependencies is shared by every run on
the machine: it lives under the system temp dir in a folder keyed by the hash
of the generated package.json, behind a file lock (xdist workers and parallel
runs may race for it). Each build links that ``node_modules`` in.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from timer_sdk.tools import stubs
from timer_sdk.wire.description import ApiDescription

from .conftest import missing_tool

HERE = Path(__file__).resolve().parent
PROGRAMS = HERE / "node"  # the test programs, compiled with the client


def require_node() -> tuple[str, str]:
    """Paths of node and npm; skip loudly without them, or fail where tools are required."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if not path)
        missing_tool(f"{missing} not found on PATH: the TypeScript client cannot be built or run")
    return node, npm


def node_modules() -> Path:
    """The client's dependencies, installed once per package.json on this machine."""
    _, npm = require_node()
    package_json = stubs.render("typescript")["package.json"]
    key = hashlib.sha256(package_json.encode()).hexdigest()[:16]
    root = Path(tempfile.gettempdir()) / f"timer-sdk-stubs-npm-{os.getuid()}-{key}"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / "node_modules" / ".timer-sdk-installed"
        if not done.exists():
            (root / "package.json").write_text(package_json)
            out = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--omit=optional", "--ignore-scripts"],
                cwd=root, capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            assert out.returncode == 0, f"npm install failed:\n{out.stdout}\n{out.stderr}"
            done.touch()
    return root / "node_modules"


def build(
    out: Path, api: ApiDescription | None = None, *, programs: bool = True
) -> subprocess.CompletedProcess[str]:
    """Generate the client into ``out`` and build it as its README says, with tsc --strict.

    The client compiles to ``out/dist``; with ``programs``, the test programs
    are compiled against it (its ``.d.ts``, as a user's code is) to ``out/test-build``.
    The first failing compile is returned, else the last.
    """
    modules = node_modules()
    stubs.generate("typescript", out, api)
    (out / "node_modules").symlink_to(modules, target_is_directory=True)
    tsc = str(modules / ".bin" / "tsc")
    compiled = _run([tsc, "-p", ".", "--strict"], out)
    if compiled.returncode == 0 and programs:
        shutil.copytree(PROGRAMS, out / "test")
        compiled = _run([tsc, "-p", "test", "--strict"], out)
    return compiled


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
