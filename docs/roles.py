"""A griffe extension for the API reference: the docstrings' reST, read as Markdown.

The docstrings are written for ``help()`` and editors, in reST: roles such as
``:class:`~timer_sdk.errors.ConnectError```, ``>>>`` examples and ``::``
before a literal block. mkdocstrings reads Markdown, so each role becomes an
autorefs cross-reference (a target that is not in the reference fails the
strict build), each example a ``pycon`` block, and ``::`` a colon.
"""

from __future__ import annotations

import builtins
import re
import sys
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|attr|exc|data|mod|obj):`(~?)([\w.]+?)(?:\(\))?`")
_PACKAGE = "timer_sdk"


def _resolve(obj: griffe.Object, name: str) -> str | None:
    """The full path of ``name`` as written in ``obj``'s docstring, or None if not ours."""
    if name.startswith(f"{_PACKAGE}."):
        return name
    scope: griffe.Object | None = obj
    while scope is not None:
        path = f"{scope.path}.{name}"
        try:
            scope.modules_collection[path]
        except (KeyError, ValueError, griffe.AliasResolutionError):
            scope = scope.parent
        else:
            return path
    head = name.split(".", maxsplit=1)[0]
    if hasattr(builtins, head) or head in sys.stdlib_module_names:
        return None  # the standard library's: shown as code
    return f"{_PACKAGE}.{name}"  # meant as ours but not found: the strict build says so


def _markdown(obj: griffe.Object, text: str) -> str:
    def role(match: re.Match[str]) -> str:
        short, name = match.groups()
        shown = name.rsplit(".", 1)[-1] if short else name
        target = _resolve(obj, name)
        return f"`{shown}`" if target is None else f"[`{shown}`][{target}]"

    text = _ROLE.sub(role, text)
    text = re.sub(r"::\n", ":\n", text)
    lines, out, in_example = text.split("\n"), [], False
    for line in lines:
        starts = line.startswith(">>> ")
        if starts and not in_example:
            out.append("```pycon")
            in_example = True
        elif in_example and not line.strip():
            out.append("```")
            in_example = False
        out.append(line)
    if in_example:
        out.append("```")
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[str] = set()
        todo: list[griffe.Object] = [pkg]
        while todo:
            obj = todo.pop()
            if obj.path in seen:
                continue
            seen.add(obj.path)
            if obj.docstring is not None:
                obj.docstring.value = _markdown(obj, obj.docstring.value)
            todo.extend(m for m in obj.members.values() if not m.is_alias)  # type: ignore[misc]
