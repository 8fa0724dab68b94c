"""The API reference: built from the docstrings, strictly, and covering every public name.

``python -m sphinx -W -n`` fails on any warning, and on any name in a
signature or a cross-reference that has no entry. The site is read as a user
opens it, from disk: its links lead to files, it loads nothing from elsewhere,
and it shows none of the plumbing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html as html_lib
import inspect
import os
import pydoc
import re
import subprocess
import sys
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from sphinx.pycode import ModuleAnalyzer

import timer_sdk
from timer_sdk import bus, metrics
from timer_sdk.limits import ServerStats
from timer_sdk.sync import TimerClient as SyncTimerClient

ROOT = Path(__file__).resolve().parent.parent

PAGES = ("client", "sync", "server", "models", "errors", "limits", "cli")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference, built as the README says (into a temporary folder)."""
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-n", "-q", "-b", "html", "docs", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert "WARNING" not in built.stderr, built.stderr
    return out


def _pages(site: Path) -> dict[str, str]:
    return {p.relative_to(site).as_posix(): p.read_text() for p in site.rglob("*.html")}


def _text(html: str) -> str:
    """What a reader sees of a page: no tags, entities decoded."""
    return html_lib.unescape(re.sub(r"<[^>]+>", "", html))


def _entry(html: str, anchor: str) -> str:
    """The text of one entry: from its anchor to the next entry's."""
    start = html.index(f'id="{anchor}"')
    end = html.find('<dt class="sig', start + 1)
    return _text(html[start : end if end > 0 else len(html)])


def test_every_public_name_and_member_has_a_docstring() -> None:
    missing = []
    for name in timer_sdk.__all__:
        obj = getattr(timer_sdk, name)
        if name != "__version__" and not inspect.getdoc(obj):
            missing.append(name)
        if not inspect.isclass(obj):
            continue
        for member_name, member in inspect.getmembers(obj):
            own = getattr(member, "__module__", "") or ""
            public = not member_name.startswith("_") and own.startswith("timer_sdk")
            documented = bool(member.__doc__)
            if public and (callable(member) or isinstance(member, property)) and not documented:
                missing.append(f"{name}.{member_name}")
    assert missing == []


@pytest.mark.timeout(120)
def test_the_reference_builds_strictly_and_covers_every_public_name(site: Path) -> None:
    html = {page: (site / "reference" / f"{page}.html").read_text() for page in PAGES}
    everything = "\n".join(html.values()) + (site / "index.html").read_text()
    for name in timer_sdk.__all__:
        if name != "__version__":
            assert f'id="timer_sdk.{name}"' in everything, name
    assert timer_sdk.__version__ in _text((site / "index.html").read_text())
    assert 'id="timer_sdk.sync.TimerClient"' in html["sync"]
    assert not re.search(r":(class|meth|func|attr|exc|data):", _text(everything))  # no raw reST
    for command in ("serve", "call", "example", "schema", "demo", "bench", "top"):
        assert f"usage: timer-sdk {command}" in html["cli"], command
    # The plumbing stays out of the reference.
    assert "deliver_echo" not in html["client"] + html["sync"] + html["models"]
    assert "reclaim" not in everything


def test_the_site_opens_from_disk_and_loads_nothing_from_outside(site: Path) -> None:
    # Plain html pages: every link names a file (a folder would open as a listing).
    pages = _pages(site)
    assert "index.html" in pages and "reference/client.html" in pages
    checked = 0
    for page, html in pages.items():
        here = (site / page).parent
        for url in re.findall(r'(?:href|src)="([^"]*)"', html):
            if url.startswith(("#", "mailto:")) or url.startswith("http://www.w3.org/"):
                continue
            assert not re.match(r"(https?:)?//", url), f"{page}: {url}"
            target = (here / url.split("#")[0].split("?")[0]).resolve()
            assert target.is_file(), f"{page}: {url} is no file"
            checked += 1
    assert checked > 100
    # Nor do the stylesheets and scripts fetch fonts or code from elsewhere.
    for path in [*site.rglob("*.css"), *site.rglob("*.html")]:
        text = path.read_text()
        assert not re.search(r"@import|url\((['\"]?)(https?:)?//", text), path
        loads = re.findall(r"https?://(?!www\.w3\.org/2000/svg|HOST\b)[^\s\"'<>)]+", text)
        assert loads == [], (path, loads)


def test_the_reference_shows_no_internals(site: Path) -> None:
    models = (site / "reference" / "models.html").read_text()
    subscription = _entry(models, "timer_sdk.Subscription")
    assert "Subscription()" not in subscription and "Subscription(" not in subscription
    assert "attach" not in subscription and "opener" not in subscription
    for producer_side in ("publish", "note_gap", "note_dropped", "end"):
        assert f'id="timer_sdk.Subscription.{producer_side}"' not in models, producer_side
    assert 'id="timer_sdk.Subscription.aclose"' in models
    everything = "\n".join(_text(html) for html in _pages(site).values())
    assert "config or TimerConfig()" not in everything
    assert "field(default" not in everything and "metadata=" not in everything
    assert "<< 20" not in everything and "= 384" not in everything
    assert "unix_mode: int = 0o600" in everything  # as the README writes it
    limits = _text((site / "reference" / "limits.html").read_text())
    assert "Default: 64 MiB." in limits and "Default: 1 MiB." in limits
    assert "Default: off; a number of seconds switches it on." in limits
    # Classes users never construct show no constructor (a loop, attach, opener...).
    for page, anchor in (
        ("client", "timer_sdk.TimerClient"),
        ("client", "timer_sdk.calling.connecting.Connecting"),
        ("sync", "timer_sdk.sync.TimerClient"),
        ("server", "timer_sdk.Server"),
        ("limits", "timer_sdk.limits.ServerStats"),
    ):
        entry = _entry((site / "reference" / f"{page}.html").read_text(), anchor)
        heading = entry.strip().splitlines()[0]
        assert "(" not in heading, (anchor, heading)
    # The blocking client documents the events() it has, and what it yields.
    sync = (site / "reference" / "sync.html").read_text()
    assert 'id="timer_sdk.sync.TimerClient.events"' in sync
    assert 'id="timer_sdk.sync.Events"' in sync
    assert hasattr(SyncTimerClient, "events")


def _public_callables() -> list[tuple[str, Callable[..., Any]]]:
    """Every function and method a user calls, by the name the reference gives it."""
    owners: list[tuple[str, Any]] = [
        (name, getattr(timer_sdk, name)) for name in timer_sdk.__all__ if name != "__version__"
    ]
    owners += [("sync.TimerClient", SyncTimerClient), ("bus.EventBus", bus.EventBus)]
    owners += [("metrics.register", metrics.register)]
    found: list[tuple[str, Callable[..., Any]]] = []
    for name, obj in owners:
        if not inspect.isclass(obj):
            found.append((name, obj))
            continue
        if not issubclass(obj, BaseException) and "__init__" in vars(obj):
            found.append((name, obj.__init__))
        elif issubclass(obj, BaseModel):
            found.append((name, obj))  # its fields are its constructor's parameters
        for member in dir(obj):
            value = getattr(obj, member, None)
            if member.startswith("_") or not callable(value):
                continue
            if getattr(value, "__module__", "").startswith("timer_sdk"):
                found.append((f"{name}.{member}", value))
    return found


def _named_types(fn: Callable[..., Any]) -> set[str]:
    """Our types that ``fn``'s signature names, as written (``Procs``, ``api.Method``)."""
    written = " ".join(str(a) for a in getattr(fn, "__annotations__", {}).values())
    if inspect.isclass(fn):  # a model: its fields, in its module
        scope = vars(sys.modules[fn.__module__])
    else:
        scope = getattr(inspect.unwrap(fn), "__globals__", {})
    ours = set()
    for dotted in set(re.findall(r"\b[A-Za-z_][\w.]*", written)):
        head, *rest = dotted.split(".")
        obj = scope.get(head)
        for part in rest:
            obj = getattr(obj, part, None)
        if obj is None or (not rest and not head[0].isupper()):
            continue
        home = getattr(obj, "__module__", "") or ""
        alias = typing.get_origin(obj) in (typing.Annotated, typing.Literal)  # Int64, Scheme
        if home.startswith("timer_sdk") or alias:
            ours.add(dotted.rsplit(".", 1)[-1])
    return ours


def test_every_type_in_a_public_signature_has_an_entry(site: Path) -> None:
    ids = set(re.findall(r'id="(timer_sdk\.[\w.]+)"', "\n".join(_pages(site).values())))
    short = {i.rsplit(".", 1)[-1] for i in ids}
    named = set().union(*(_named_types(fn) for _, fn in _public_callables()))
    named -= {"P", "R", "T", "C"}  # type variables: the types at the call
    assert {"Procs", "EventSource", "EventSink", "Method", "Scheme", "Int64"} <= named
    assert named - short == set()


@pytest.mark.parametrize(
    "fn",
    [
        timer_sdk.TimerClient.connect,
        timer_sdk.TimerClient.events,
        timer_sdk.Timer.events,
        timer_sdk.serve,
        timer_sdk.Server.close,
        timer_sdk.Server.serve_until_signal,
        SyncTimerClient.call,
    ],
    ids=lambda fn: fn.__qualname__,
)
def test_every_parameter_is_described(fn: Callable[..., Any]) -> None:
    doc = inspect.getdoc(fn) or ""
    for name in list(inspect.signature(fn).parameters)[1 if "." in fn.__qualname__ else 0 :]:
        if name not in ("self", "cls", "method", "params"):
            assert f"``{name}``" in doc or f"``{name}=" in doc, f"{fn.__qualname__}: {name}"


def test_every_model_field_and_counter_is_described() -> None:
    undescribed = []
    for module, classes in (
        ("timer_sdk.models", [getattr(timer_sdk, n) for n in timer_sdk.models.__all__
                              if n in timer_sdk.__all__]),
        ("timer_sdk.limits", [ServerStats]),
    ):  # fmt: skip
        docs = ModuleAnalyzer.for_module(module).find_attr_docs()
        for cls in classes:
            fields = (
                cls.model_fields if hasattr(cls, "model_fields")
                else {f.name: f for f in dataclasses.fields(cls)}
            )  # fmt: skip
            undescribed += [f"{cls.__name__}.{f}" for f in fields if (cls.__name__, f) not in docs]
    assert undescribed == []


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


def _mypy_cache() -> str:
    """mypy's cache for this venv, kept between runs on this machine like the npm install.

    Most of a check is reading pydantic and the package; mypy re-reads what changed.
    """
    key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:16]
    return str(Path(tempfile.gettempdir()) / f"timer-sdk-mypy-{os.getuid()}-{key}")


@pytest.mark.timeout(180)
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
    for guide in ("scaling.md", "limits.md", "protocol.md", "tls.md"):
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


def test_public_signatures_name_no_private_types() -> None:
    leaking = []
    for name, obj in _public_callables():
        try:
            signature = str(inspect.signature(obj))
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
