"""The API reference's own Sphinx extension: generated sections, and no internals shown.

- ``.. cli-help::`` becomes each command's ``--help``, from the parser itself.
- ``.. limits-fields::`` becomes an entry per :class:`~timer_sdk.Limits` field:
  its type, what it bounds and its default in words (``64 MiB``, not
  ``64 << 20``), from the field's own metadata.
- Classes that users never construct show no constructor signature (its
  parameters are plumbing: ``attach``, ``opener``, a loop).
- A short name in a signature (``Procs``, ``Int64``) links to its one entry
  wherever it is documented; a name with no entry still fails the build.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
import types
import typing
from typing import Any

from docutils import nodes
from pydantic import BaseModel
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util.nodes import make_refnode

import timer_sdk
from timer_sdk import Limits
from timer_sdk.calling.connecting import Connecting
from timer_sdk.sync import TimerClient as BlockingClient
from timer_sdk.tools.cli_help import help_texts

NOT_CONSTRUCTED = (
    timer_sdk.TimerClient,
    BlockingClient,
    timer_sdk.Server,
    timer_sdk.Subscription,
    Connecting,  # made by TimerClient.connect
    timer_sdk.limits.ServerStats,
    Limits,  # by keyword: Limits(max_frame_size=...); the fields below say the rest
)
"""Classes whose constructor signature says nothing a user can use."""


def _cli_help() -> str:
    sections = []
    for command, text in help_texts().items():
        title = f"``{command}``"
        body = "\n".join(f"   {line}" if line else "" for line in text.rstrip().splitlines())
        sections.append(f"{title}\n{'-' * len(title)}\n\n.. code-block:: text\n\n{body}\n")
    return "\n".join(sections)


def _amount(value: object, unit: str) -> str:
    """A default as people write it: ``64 MiB``, ``10 s``, ``off``."""
    if value is None:
        return "off"
    if unit == "bytes" and isinstance(value, int):
        for size, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if value >= size and value % size == 0:
                return f"{value // size} {name}"
        return f"{value} bytes"
    if unit == "seconds":
        return f"{value:g} s"
    return f"{value} {unit}"


def _type_name(annotation: object) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")


def _limits_fields() -> str:
    hints = typing.get_type_hints(Limits)
    entries = []
    for field in dataclasses.fields(Limits):
        unit = field.metadata["unit"]
        hint = hints[field.name]
        type_name = " | ".join(
            "None" if arg is type(None) else _type_name(arg)
            for arg in (hint.__args__ if isinstance(hint, types.UnionType) else (hint,))
        )
        default = _amount(field.default, unit)
        if field.default is None:
            default += f"; a number of {unit} switches it on"
        entries.append(
            f".. py:attribute:: {field.name}\n"
            f"   :type: {type_name}\n\n"
            f"   {field.metadata['help'][0].upper()}{field.metadata['help'][1:]}. "
            f"Default: **{default}**.\n"
        )
    return "\n".join(entries)


MARKERS = {".. cli-help::": _cli_help, ".. limits-fields::": _limits_fields}


def _expand_markers(app: Sphinx, docname: str, source: list[str]) -> None:
    for marker, make in MARKERS.items():
        for match in re.finditer(rf"^( *){re.escape(marker)}$", source[0], re.M):
            indented = textwrap.indent(make(), match[1])
            source[0] = source[0].replace(match[0], indented, 1)


def _hide_plumbing(  # noqa: PLR0917 (the event's arguments)
    app: Sphinx,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str, str | None] | None:
    if what == "class" and obj in NOT_CONSTRUCTED:
        return "", None
    if what == "class" and isinstance(obj, type) and issubclass(obj, BaseModel):
        return _model_signature(obj), None
    return None


def _model_signature(model: type[BaseModel]) -> str:
    """``(*, message: str, delay_ms: Int64)``: Python's names and types as written.

    Pydantic's own signature spells fields by their wire aliases and expands
    ``Int64`` into its bounds.
    """
    written: dict[str, str] = {}
    for klass in reversed(model.__mro__):
        written.update(getattr(klass, "__annotations__", {}))
    params = []
    for name, field in model.model_fields.items():
        default = "" if field.is_required() else f" = {field.default!r}"
        params.append(f"{name}: {written[name]}{default}")
    return f"(*, {', '.join(params)})" if params else "()"


def _resolve_short_name(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: nodes.TextElement
) -> nodes.reference | None:
    """Link ``Procs`` to ``timer_sdk.wire.api.Procs`` when that is its only entry."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    objects = {
        name: obj
        for name, obj in env.get_domain("py").objects.items()  # type: ignore[attr-defined]
        if not obj.aliased
    }
    public = f"timer_sdk.{target.rsplit('.', 1)[-1]}"  # timer_sdk.server.serve: timer_sdk.serve
    if public in objects:
        found = [(public, objects[public])]
    else:
        found = [(n, obj) for n, obj in objects.items() if n == target or n.endswith(f".{target}")]
    if len({obj.node_id for _, obj in found}) != 1:
        return None  # unknown, or ambiguous: the strict build says so
    name, obj = found[0]
    builder = app.builder
    assert builder is not None
    return make_refnode(builder, node["refdoc"], obj.docname, obj.node_id, contnode, name)


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("source-read", _expand_markers)
    app.connect("autodoc-process-signature", _hide_plumbing)
    app.connect("missing-reference", _resolve_short_name)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
