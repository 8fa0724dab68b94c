"""The suite's own machinery: the coverage floor, and the skips it shouts about."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .conftest import CORE_MODULES, PACKAGE, floor_verdict, missing_core_modules

ROOT = PACKAGE.parent


def readme_core_modules() -> set[str]:
    """The core modules as README.md lists them: "wire/ address, api and budget; client"."""
    text = " ".join((ROOT / "README.md").read_text().split())
    listed = re.search(r"The core modules: (.+?)\.", text)
    assert listed, "README.md no longer lists the core modules"
    names = set()
    for group in listed.group(1).split("; "):
        folder, _, rest = group.rpartition("/ ")
        for name in re.split(r", | and ", rest):
            names.add(f"{folder}/{name}" if folder else name)
    return names


def test_the_readme_lists_the_core_modules_of_the_floor() -> None:
    assert readme_core_modules() == set(CORE_MODULES)


def test_every_core_module_exists() -> None:
    # The floor fails a whole run on this too; here it fails any run of this file.
    assert missing_core_modules() == []


def test_the_floor_holds_each_module_on_its_own() -> None:
    # 97 of 100 together, but one module at 12 of 14: the run fails, and says which.
    line, failed = floor_verdict({"client": (85, 86), "calling/dialer": (12, 14)}, [])
    assert failed
    assert "below it: calling/dialer 12/14" in line and "client" not in line.split("below")[1]
    line, failed = floor_verdict({"client": (19, 20), "calling/dialer": (14, 14)}, [])
    assert not failed, line


def test_a_renamed_core_module_fails_the_floor() -> None:
    line, failed = floor_verdict({"client": (20, 20)}, ["serving/gone"])
    assert failed
    assert "no such module (renamed? fix CORE_MODULES): serving/gone" in line


def _pytest_without_node(tmp_path: Path, *env: tuple[str, str]) -> subprocess.CompletedProcess[str]:
    """Run one TypeScript test where node and npm cannot be found."""
    bin_dir = tmp_path / "bin"  # python alone on PATH: no node, no npm
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    environ = {"PATH": str(bin_dir), "HOME": str(tmp_path), **dict(env)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", "--no-cov",
         "tests/test_stubs.py::test_the_fresh_client_type_checks_under_strict"],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_a_skip_for_a_missing_tool_is_loud(tmp_path: Path) -> None:
    done = _pytest_without_node(tmp_path)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "1 skipped" in done.stdout
    assert "1 test did not run: a tool is missing" in done.stdout
    assert "node and npm not found on PATH" in done.stdout


def test_a_missing_tool_fails_where_tools_are_required(tmp_path: Path) -> None:
    done = _pytest_without_node(tmp_path, ("TIMER_SDK_REQUIRE_TOOLS", "1"))
    assert done.returncode == 1, done.stdout[-2000:]
    assert re.search(r"\b1 (failed|error)\b", done.stdout), done.stdout[-2000:]
    assert "TIMER_SDK_REQUIRE_TOOLS is set, so this test must run here" in done.stdout
