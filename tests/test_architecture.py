"""The package's layers, read from its imports: no circle, and no arrow upward.

Every import counts: at module level, inside functions, and under
``TYPE_CHECKING`` (a type-only import still means one module knows the other).
README.md's Layout lists the same layers in the same order.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "timer_sdk"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # lowest first: each imports only its own layer and those before it
    ("base", ("_version", "_eager", "_extras", "_portal", "errors", "models", "logs", "events")),
    ("wire", ("wire",)),  # the sans-I/O core
    ("limits", ("limits",)),
    ("calling", ("calling",)),
    ("client", ("client",)),
    ("pool", ("pool",)),  # subclasses TimerClient; registers itself with client.py
    ("bus", ("bus",)),
    ("serving", ("serving",)),
    ("server", ("server",)),
    ("library", ("timer",)),  # serves itself through server.serve, knowing no more of it
    ("faces", ("sync", "metrics", "")),  # "": the package's __init__
    ("tools", ("tools", "bench", "__main__")),
)
"""Each layer's modules and folders, as names under ``timer_sdk``."""


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name under ``timer_sdk`` ("" for the package)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module that ``name`` (a module, or a name inside one) lives in."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that module ``name`` imports, anywhere in its text."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [part for part in package if part]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "timer_sdk" or alias.name.startswith("timer_sdk."):
                    found.add(_resolve(alias.name.removeprefix("timer_sdk").lstrip(".")))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module == "timer_sdk" or (node.module or "").startswith("timer_sdk."):
                source = (node.module or "").removeprefix("timer_sdk").lstrip(".")
            else:
                continue
            for alias in node.names:
                inner = f"{source}.{alias.name}".lstrip(".")
                found.add(inner if inner in MODULES else _resolve(source))
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    for rank, (_, members) in enumerate(LAYERS):
        for member in members:
            if name == member or (member and name.startswith(member + ".")):
                return rank
    raise AssertionError(f"timer_sdk.{name} is in no layer: add it to LAYERS")


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        _layer(name)


def test_the_graph_sees_the_imports_it_must() -> None:
    # The reader itself can fail: these arrows exist, of each kind it reads.
    assert "wire.framing" in GRAPH["wire.encoders"]  # from .framing import ...
    assert "_eager" in GRAPH["serving.plans"]  # from .. import _eager
    assert "server" in GRAPH["timer"]  # inside Timer.serve, and under TYPE_CHECKING
    assert "bus.nats_backend" in GRAPH["bus"]  # inside open_bus
    assert "tools.cli" in GRAPH["__main__"]


def test_no_arrow_runs_upward() -> None:
    upward = [
        f"timer_sdk.{name} ({LAYERS[_layer(name)][0]}) imports "
        f"timer_sdk.{target} ({LAYERS[_layer(target)][0]})"
        for name, targets in sorted(GRAPH.items())
        for target in sorted(targets)
        if _layer(target) > _layer(name)
    ]
    assert upward == []


def test_the_wire_core_imports_only_the_base_and_itself() -> None:
    base = LAYERS[0][1]
    for name, targets in GRAPH.items():
        if name.startswith("wire."):
            assert {t for t in targets if not t.startswith("wire")} <= set(base), name


CLAIMS = {
    "import no layer": (),
    "imports only the base": ("base",),
    "the base, wire/": ("base", "wire"),
}
"""What README.md's Layout says a layer may import besides itself, in its words."""


def readme_claims(text: str) -> dict[str, set[str]]:
    """Each layer that the Layout restricts more than "the layers above": what it may import."""
    block = text.split("\n## Layout\n", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    entries: list[tuple[str, str]] = []  # (first name of the entry, its description)
    for line in block.splitlines():
        entry = re.match(r"  (\S+)\s*(.*)", line)
        if entry:
            entries.append((entry.group(1), entry.group(2)))
        elif entries and line.startswith("   "):
            entries[-1] = (entries[-1][0], f"{entries[-1][1]} {line.strip()}")
    claims = {}
    for name, description in entries:
        said = [layers for words, layers in CLAIMS.items() if words in description]
        if said:
            layer = LAYERS[_layer(name.removesuffix("/").removesuffix(".py"))][0]
            claims[layer] = {layer, *said[0]}
    return claims


def test_the_readme_claims_are_read() -> None:
    claims = readme_claims((ROOT / "README.md").read_text())
    # The README's stricter claims: if one is reworded, this says so rather than passing.
    assert claims == {
        "base": {"base"},
        "wire": {"base", "wire"},
        "limits": {"base", "wire", "limits"},
        "calling": {"base", "wire", "calling"},
        "bus": {"base", "wire", "bus"},
    }


def test_each_layer_imports_only_what_the_readme_says() -> None:
    claims = readme_claims((ROOT / "README.md").read_text())
    broken = [
        f"timer_sdk.{name} ({LAYERS[_layer(name)][0]}) imports timer_sdk.{target} "
        f"({LAYERS[_layer(target)][0]}); README.md allows only {sorted(allowed)}"
        for name, targets in sorted(GRAPH.items())
        if (allowed := claims.get(LAYERS[_layer(name)][0])) is not None
        for target in sorted(targets)
        if LAYERS[_layer(target)][0] not in allowed
    ]
    assert broken == []


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_import_circle() -> None:
    assert _circles(GRAPH) == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ],
)
def test_the_circle_finder_finds_circles(
    graph: dict[str, set[str]], expected: list[list[str]]
) -> None:
    assert _circles(graph) == expected
