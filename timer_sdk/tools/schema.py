"""The wire API as schemas for other languages, generated from :mod:`timer_sdk.wire.api`.

Everything here is rendered from the description of :mod:`timer_sdk.wire.description`
(itself built from :data:`~timer_sdk.wire.api.METHODS`, :data:`~timer_sdk.wire.api.EVENTS`
and the Pydantic models), by wire (camelCase) names, so it cannot drift from
what the server accepts; the client stubs of :mod:`timer_sdk.tools.stubs` read the same:

- :func:`cddl`: request envelopes, replies, events and the event extension;
- :func:`json_schema`: the same as JSON Schema (draft 2020-12), from the models;
- :func:`method_table`: the table of ``docs/protocol.md``;
- :func:`shape` and :func:`example`: what ``timer-sdk call --help`` and
  ``timer-sdk example`` print.

Sans-I/O: nothing here touches a socket or a loop.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from ..wire.description import (
    ApiDescription,
    ModelDescription,
    TypeRef,
    describe,
    describe_model,
    spell,
)

__all__ = ["cddl", "example", "json_schema", "method_table", "shape"]

_SCALARS_TABLE = {"text": "text", "int64": "int", "bool": "bool", "float": "float"}
_SCALARS_CDDL = {"text": "tstr", "int64": "int64", "bool": "bool", "float": "float"}


# --- CDDL --------------------------------------------------------------------


def _cddl_type(ref: TypeRef) -> str:
    return spell(ref, _SCALARS_CDDL, lambda t: f"[* {t}]", lambda t: f"{t} / nil")


def _cddl_map(model: ModelDescription) -> str:
    members = [
        f"{'' if field.required else '? '}{field.wire}: {_cddl_type(field.type)}"
        for field in model.fields
    ]
    return "{ " + ", ".join(members) + " }" if members else "{ }"


def cddl(api: ApiDescription | None = None) -> str:
    """Return the wire API in CDDL (RFC 8610), by default the SDK's own."""
    api = api or describe()
    lines = [
        "; The timer wire API, generated from timer_sdk/wire/api.py"
        " (`timer-sdk schema --format cddl`).",
        "; A request is [u32 method length][method][u32 payload length][payload], the payload",
        "; one CBOR map: <method>-request. A reply is [i32 ret][u32 body length][body]: ret 0",
        "; carries one CBOR item, <method>-reply; ret 1 carries the error as raw UTF-8 text.",
        "",
        f"int64 = {api.int64_min}..{api.int64_max}",
        "",
        "; --- methods",
    ]
    for proc in api.procs:
        lines.append(f"{proc.name}-request = {_cddl_map(proc.params)}")
        lines.append(f"{proc.name}-reply = {_cddl_type(proc.result)}")
    lines += ["", "; --- types"]
    lines += [f"{model.name} = {_cddl_map(model)}" for model in api.models]
    names = " / ".join(f'"{event.name}"' for event in api.events)
    lines += [
        "",
        "; --- the event extension: only a connection that subscribed gets ret 16 and 17 frames",
        f"event-name = {names}",
        f"{api.subscribe}-request = {{ ? events: [* event-name] }}",
        f"{api.subscribe}-reply = {{ events: [* event-name] }}",
        f"{api.unsubscribe}-request = {{ }}",
        f"{api.unsubscribe}-reply = nil",
        "event-frame = "  # ret 16
        + " / ".join(f'{{ event: "{e.name}", data: {e.data.name} }}' for e in api.events)
        + "  ; ret 16",
        f"events-dropped-frame = {{ dropped: 1..{api.int64_max} }}"
        " / { dropped: 0, gap: text }  ; ret 17",
    ]
    return "\n".join(lines) + "\n"


# --- JSON Schema ---------------------------------------------------------------


def json_schema(api: ApiDescription | None = None) -> dict[str, Any]:
    """Return the wire API as one JSON Schema document, by wire names.

    ``$defs`` holds ``<method>-request`` and ``<method>-reply`` for every
    method, the event payloads and the extension's frames, and every model
    they use. Validate a payload against ``#/$defs/echo-request``, say.
    Pydantic writes the models' schemas (with their bounds and docs) when
    the description is made: see :attr:`ApiDescription.json_schema`.
    """
    return copy.deepcopy(dict((api or describe()).json_schema))


# --- human-readable shapes and examples ------------------------------------------


def _table_shape(ref: TypeRef) -> str:
    if ref.item is not None:
        inner = ref.item
        return f"[{inner.model.name if inner.model else _SCALARS_TABLE[inner.scalar]}]"
    if ref.model is not None:
        members = [f"{'' if f.required else '? '}{f.wire}" for f in ref.model.fields]
        return "{" + ", ".join(members) + "}"
    return _SCALARS_TABLE[ref.scalar]


def _envelope_shape(model: ModelDescription) -> str:
    members = [f"{field.wire}: {_table_shape(field.type)}" for field in model.fields]
    return "{" + ", ".join(members) + "}"


def method_table(api: ApiDescription | None = None) -> str:
    """Return the Markdown table of methods in ``docs/protocol.md``."""
    rows = ["| method | payload | reply |", "| --- | --- | --- |"]
    for proc in (api or describe()).procs:
        rows.append(
            f"| `{proc.name}` | `{_envelope_shape(proc.params)}` | `{_table_shape(proc.result)}` |"
        )
    return "\n".join(rows) + "\n"


def _shape_value(ref: TypeRef) -> str:
    if ref.item is not None:
        return f"[{_shape_value(ref.item)}, ...]"
    if ref.model is not None:
        return _shape(ref.model)
    return _SCALARS_TABLE[ref.scalar]


def _shape(model: ModelDescription) -> str:
    members = [
        f'{"" if field.required else "?"}"{field.wire}": {_shape_value(field.type)}'
        for field in model.fields
    ]
    return "{" + ", ".join(members) + "}"


def shape(model: type[BaseModel]) -> str:
    """Return a model's JSON shape by wire names, ``?`` before optional fields.

    >>> from timer_sdk.wire.api import METHODS
    >>> shape(METHODS["echo"].params)
    '{"req": {"message": text, "delayMs": int}}'
    """
    return _shape(describe_model(model))


_EXAMPLE_SCALARS: dict[str, Any] = {"text": "text", "int64": 1, "bool": True, "float": 1.0}


def _example_value(ref: TypeRef) -> Any:
    if ref.item is not None:
        return [_example_value(ref.item)]
    if ref.model is not None:
        return _example(ref.model)
    return _EXAMPLE_SCALARS[ref.scalar]


def _example(model: ModelDescription) -> dict[str, Any]:
    return {field.wire: _example_value(field.type) for field in model.fields}


def example(model: type[BaseModel]) -> dict[str, Any]:
    """Return a valid payload for ``model`` by wire names, every optional field set.

    Integers are 1 and strings ``"text"``: valid for every method's checks.
    """
    return _example(describe_model(model))
