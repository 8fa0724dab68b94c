"""The API reference: built from the docstrings, strictly, and covering every public name.

``mkdocs build --strict`` fails on any warning, a cross-reference to nothing
included (docs/roles.py turns the docstrings' reST roles into checked links).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import pydoc
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import griffe
import pytest

import timer_sdk
from timer_sdk.sync import TimerClient as SyncTimerClient

ROOT = Path(__file__).resolve().parent.parent


def _roles() -> Any:
    """docs/roles.py, the griffe extension (docs/ is no package)."""
    spec = importlib.util.spec_from_file_location("docs_roles", ROOT / "docs" / "roles.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAGES = ("client", "sync", "server", "models", "errors", "limits", "cli")


def _load() -> griffe.Module:
    package = griffe.load("timer_sdk", search_paths=[str(ROOT)])
    assert isinstance(package, griffe.Module)
    return package


def test_every_public_name_and_member_has_a_docstring() -> None:
    package = _load()
    missing = []
    for name in timer_sdk.__all__:
        obj = package[name].final_target if package[name].is_alias else package[name]
        if not obj.docstring:
            missing.append(name)
        if not obj.is_class:
            continue
        for member_name, found in obj.all_members.items():
            member = found.final_target if found.is_alias else found
            public = not member_name.startswith("_")
            callable_ = member.is_function or "property" in member.labels
            if public and callable_ and not member.docstring:
                missing.append(f"{name}.{member_name}")
    assert missing == []


def test_roles_become_checked_links() -> None:
    obj = _load()["TimerClient"].final_target
    text = _roles()._markdown(
        obj,
        "See :meth:`connect`, :class:`~timer_sdk.errors.ConnectError`, :class:`OSError` "
        "and :class:`~timer_sdk.nothing.Here`::\n\n>>> 1 + 1\n2\n",
    )
    assert "[`connect`][timer_sdk.client.TimerClient.connect]" in text
    assert "[`ConnectError`][timer_sdk.errors.ConnectError]" in text
    assert "`OSError`" in text and "][OSError]" not in text  # the standard library's: no link
    assert "[`Here`][timer_sdk.nothing.Here]" in text  # a link to nothing: the build fails
    assert "nothing.Here]:\n\n```pycon\n>>> 1 + 1\n2\n```" in text


@pytest.mark.timeout(120)
def test_the_reference_builds_strictly_and_covers_every_public_name(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert "WARNING" not in built.stderr, built.stderr
    html = {page: (site / "reference" / page / "index.html").read_text() for page in PAGES}
    everything = "\n".join(html.values()) + (site / "index.html").read_text()
    for name in timer_sdk.__all__:
        assert f'id="timer_sdk.{name}"' in everything, name
    assert 'id="timer_sdk.sync.TimerClient"' in html["sync"]
    assert not re.search(r":(class|meth|func|attr|exc|data):", everything)  # no raw reST
    for command in ("serve", "call", "example", "schema", "demo", "bench"):
        assert f"usage: timer-sdk {command}" in html["cli"], command
    # The plumbing stays out of the reference.
    assert "deliver_echo" not in everything and "reclaim" not in everything


def _readme_blocks(*kinds: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    pattern = r"<!-- readme-test: ([\w-]+)[^\n]*-->\n```\w*\n(.*?)\n```"
    return [code for kind, code in re.findall(pattern, text, re.DOTALL) if kind in kinds]


def _layout_modules(layout: str) -> set[str]:
    """Each ``*.py`` of the Layout as a path under ``timer_sdk/``.

    A line that starts with ``folder/`` opens that folder; the lines indented
    below it name its modules, and a ``sub/`` among them opens a subfolder for
    the rest of its line. A line at the top indent naming files is the package's own.
    """
    listed: set[str] = set()
    folder = ""
    for line in layout.splitlines()[1:]:
        if not line.startswith("  "):
            break  # the package's block ends where the repository's other folders begin
        tokens = line.split()
        if not line.startswith("   "):  # a top-level line: a folder, or the package's own files
            folder = tokens[0] if tokens[0].endswith("/") else ""
            if folder:
                continue  # its description names no modules
        where = folder
        for token in tokens:
            if re.fullmatch(r"\w+/", token):
                where = folder + token
            elif match := re.fullmatch(r"\(?(\w+\.py):?", token):
                listed.add(where + match[1])
    return listed


def test_the_readme_layout_lists_every_module() -> None:
    [layout] = [b for b in _readme_blocks("skip") if b.startswith("timer_sdk/\n")]
    listed = _layout_modules(layout)
    package = ROOT / "timer_sdk"
    modules = {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    assert modules - listed == set()
    assert listed - modules == set()


def test_the_readme_error_tree_has_every_error() -> None:
    [tree] = [b for b in _readme_blocks("skip") if b.startswith("TimerError\n")]
    named = set(re.findall(r"\b([A-Z]\w+)\b", tree)) - {"ConnectionError", "TimeoutError"}
    named -= {"ValueError", "RuntimeError"}
    assert named == set(timer_sdk.errors.__all__)


@pytest.mark.timeout(180)
def _mypy_cache() -> str:
    """mypy's cache for this venv, kept between runs on this machine like the npm install.

    Most of a check is reading pydantic and the package; mypy re-reads what changed.
    """
    key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:16]
    return str(Path(tempfile.gettempdir()) / f"timer-sdk-mypy-{os.getuid()}-{key}")


def test_the_readme_python_scripts_pass_mypy_strict(tmp_path: Path) -> None:
    # The typed-event example exists so that users' code passes this too.
    scripts = _readme_blocks("server", "client")
    for i, code in enumerate(scripts):
        (tmp_path / f"readme_{i}.py").write_text(code)
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", _mypy_cache(), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=170, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout
    assert len(scripts) >= 4


def test_the_guides_give_commands_that_work() -> None:
    # Addresses need their scheme, and extras are installed without a package index.
    for guide in ("scaling.md", "limits.md", "protocol.md"):
        text = (ROOT / "docs" / guide).read_text()
        assert not re.search(r"timer-sdk call (?!(tcp|tls|unix):)", text), guide
        assert "timer-sdk[" not in text, guide
    assert "timer-sdk[" not in (ROOT / "README.md").read_text()


def test_the_changelog_has_this_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n")
    assert re.search(
        rf"^## \[{re.escape(timer_sdk.__version__)}\] - \d{{4}}-\d\d-\d\d$", text, re.M
    )


def _public_callables() -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = []
    for name, obj in [(n, getattr(timer_sdk, n)) for n in timer_sdk.__all__] + [
        ("sync.TimerClient", SyncTimerClient)
    ]:
        found.append((name, obj))
        if inspect.isclass(obj):
            found += [
                (f"{name}.{member}", getattr(obj, member))
                for member in dir(obj)
                if not member.startswith("_")
                and callable(getattr(obj, member, None))
                and getattr(getattr(obj, member), "__module__", "").startswith("timer_sdk")
            ]
    return found


def test_public_signatures_name_no_private_types() -> None:
    leaking = []
    for name, obj in _public_callables():
        try:
            signature = str(inspect.signature(obj))  # type: ignore[arg-type]
        except (TypeError, ValueError):  # builtins without one
            continue
        if re.search(r"\b_[A-Za-z]", signature):
            leaking.append(f"{name}{signature}")
    assert leaking == []


def test_constructors_users_never_call_point_to_the_factory() -> None:
    with pytest.raises(TypeError, match=r"await TimerClient\.connect\(address\)"):
        timer_sdk.TimerClient()
    with pytest.raises(TypeError, match=r"TimerClient\.connect\(address\)"):
        SyncTimerClient()
    shown = pydoc.plain(pydoc.render_doc(timer_sdk.Server))
    for plumbing in ("deliver_echo", "deliver_dropped", "reclaim", "subscribe("):
        assert plumbing not in shown, plumbing


def test_no_user_visible_text_names_a_tracker_issue() -> None:
    # Users have no access to the project's tracker: its numbers mean nothing to them.
    shipped = [*(ROOT / "timer_sdk").rglob("*.py"), *(ROOT / "docs").rglob("*.md")]
    shipped += [ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "notebooks").glob("*.ipynb")]
    naming = [p.name for p in shipped if re.search(r"\bissues? #?\d+", p.read_text(), re.I)]
    assert naming == []
