"""The wire API as schemas for other languages, generated from :mod:`timer_sdk.api`.

Everything here is derived from :data:`~timer_sdk.api.METHODS`,
:data:`~timer_sdk.api.EVENTS` and the Pydantic models, by wire (camelCase)
names, so it cannot drift from what the server accepts:

- :func:`cddl`: request envelopes, replies, events and the event extension;
- :func:`json_schema`: the same as JSON Schema (draft 2020-12), from the models;
- :func:`method_table`: the table of ``docs/protocol.md``;
- :func:`shape` and :func:`example`: what ``timer-sdk call --help`` and
  ``timer-sdk example`` print.

Sans-I/O: nothing here touches a socket or a loop.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo
from pydantic.json_schema import models_json_schema

from .api import EVENTS, METHODS, SUBSCRIBE, UNSUBSCRIBE
from .models import INT64_MAX, INT64_MIN

__all__ = ["cddl", "example", "json_schema", "method_table", "shape"]

_SCALARS_CDDL = {str: "tstr", int: "int64", bool: "bool", float: "float"}
_SCALARS_TABLE = {str: "text", int: "int", bool: "bool", float: "float"}


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """Return ``(type, nullable)`` for ``X`` or ``X | None``, without ``Annotated``."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])[0], True
    return annotation, False


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _fields(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    """The model's fields by wire name, in declaration order."""
    return [(info.alias or name, info) for name, info in model.model_fields.items()]


def _models(roots: list[Any]) -> list[type[BaseModel]]:
    """Every model reachable from ``roots``, each once, outermost first."""
    seen: list[type[BaseModel]] = []

    def visit(annotation: Any) -> None:
        annotation, _ = _unwrap(annotation)
        if typing.get_origin(annotation) is list:
            visit(typing.get_args(annotation)[0])
        elif _is_model(annotation) and annotation not in seen:
            seen.append(annotation)
            for _, info in _fields(annotation):
                visit(info.annotation)

    for root in roots:
        visit(root)
    return seen


# --- CDDL --------------------------------------------------------------------


def _cddl_type(annotation: Any) -> str:
    annotation, nullable = _unwrap(annotation)
    if typing.get_origin(annotation) is list:
        text = f"[* {_cddl_type(typing.get_args(annotation)[0])}]"
    elif _is_model(annotation):
        text = annotation.__name__
    else:
        text = _SCALARS_CDDL[annotation]
    return f"{text} / nil" if nullable else text


def _cddl_map(model: type[BaseModel]) -> str:
    members = [
        f"{'' if info.is_required() else '? '}{wire}: {_cddl_type(info.annotation)}"
        for wire, info in _fields(model)
    ]
    return "{ " + ", ".join(members) + " }" if members else "{ }"


def cddl() -> str:
    """Return the wire API in CDDL (RFC 8610)."""
    lines = [
        "; The timer wire API, generated from timer_sdk/api.py (`timer-sdk schema --format cddl`).",
        "; A request is [u32 method length][method][u32 payload length][payload], the payload",
        "; one CBOR map: <method>-request. A reply is [i32 ret][u32 body length][body]: ret 0",
        "; carries one CBOR item, <method>-reply; ret 1 carries the error as raw UTF-8 text.",
        "",
        f"int64 = {INT64_MIN}..{INT64_MAX}",
        "",
        "; --- methods",
    ]
    for method in METHODS.values():
        lines.append(f"{method.name}-request = {_cddl_map(method.params)}")
        lines.append(f"{method.name}-reply = {_cddl_type(method.result)}")
    lines += ["", "; --- types"]
    roots = [m.params for m in METHODS.values()] + [m.result for m in METHODS.values()]
    params = {m.params for m in METHODS.values()}
    for model in _models(roots + list(EVENTS.values())):
        if model not in params:  # envelopes are written inline above
            lines.append(f"{model.__name__} = {_cddl_map(model)}")
    names = " / ".join(f'"{name}"' for name in EVENTS)
    lines += [
        "",
        "; --- the event extension: only a connection that subscribed gets ret 16 and 17 frames",
        f"event-name = {names}",
        f"{SUBSCRIBE}-request = {{ ? events: [* event-name] }}",
        f"{SUBSCRIBE}-reply = {{ events: [* event-name] }}",
        f"{UNSUBSCRIBE}-request = {{ }}",
        f"{UNSUBSCRIBE}-reply = nil",
        "event-frame = "  # ret 16
        + " / ".join(f'{{ event: "{name}", data: {m.__name__} }}' for name, m in EVENTS.items())
        + "  ; ret 16",
        "events-dropped-frame = { dropped: 1..9223372036854775807 }"
        " / { dropped: 0, gap: text }  ; ret 17",
    ]
    return "\n".join(lines) + "\n"


# --- JSON Schema ---------------------------------------------------------------


def json_schema() -> dict[str, Any]:
    """Return the wire API as one JSON Schema document, by wire names.

    ``$defs`` holds ``<method>-request`` and ``<method>-reply`` for every
    method, the event payloads and the extension's frames, and every model
    they use. Validate a payload against ``#/$defs/echo-request``, say.
    """
    entries: list[tuple[type[BaseModel], Any]] = [
        (m.params, "validation") for m in METHODS.values()
    ]
    entries += [(m.result, "serialization") for m in METHODS.values() if _is_model(m.result)]
    entries += [(model, "serialization") for model in EVENTS.values()]
    refs, document = models_json_schema(entries, by_alias=True, ref_template="#/$defs/{model}")
    defs: dict[str, Any] = document["$defs"]
    for definition in defs.values():  # docstrings are reST; readers of a schema want text
        if "description" in definition:
            text = re.sub(r":\w+:`~?([^`]+)`", r"\1", definition["description"])
            definition["description"] = text.replace("``", "`")
    for method in METHODS.values():
        defs[f"{method.name}-request"] = refs[(method.params, "validation")]
        if _is_model(method.result):
            defs[f"{method.name}-reply"] = refs[(method.result, "serialization")]
        else:
            defs[f"{method.name}-reply"] = TypeAdapter(method.result).json_schema()
    names = {"enum": list(EVENTS)}
    defs[f"{SUBSCRIBE}-request"] = _object({"events": {"type": "array", "items": names}}, [])
    defs[f"{SUBSCRIBE}-reply"] = _object({"events": {"type": "array", "items": names}}, ["events"])
    defs[f"{UNSUBSCRIBE}-request"] = _object({}, [])
    defs[f"{UNSUBSCRIBE}-reply"] = {"type": "null"}
    defs["event-frame"] = {
        "oneOf": [
            _object(
                {"event": {"const": name}, "data": refs[(model, "serialization")]},
                ["event", "data"],
            )
            for name, model in EVENTS.items()
        ]
    }
    defs["events-dropped-frame"] = {
        "oneOf": [
            _object(
                {"dropped": {"type": "integer", "minimum": 1, "maximum": INT64_MAX}}, ["dropped"]
            ),
            _object({"dropped": {"const": 0}, "gap": {"type": "string"}}, ["dropped", "gap"]),
        ]
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "timer wire API",
        "description": "Generated from timer_sdk/api.py; CBOR payloads, by wire (camelCase) "
        "names. Validate a payload against #/$defs/<method>-request.",
        "$defs": dict(sorted(defs.items())),
    }


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    return schema


# --- human-readable shapes and examples ------------------------------------------


def _table_shape(annotation: Any) -> str:
    annotation, _ = _unwrap(annotation)
    if typing.get_origin(annotation) is list:
        inner = typing.get_args(annotation)[0]
        return f"[{inner.__name__ if _is_model(inner) else _SCALARS_TABLE[inner]}]"
    if _is_model(annotation):
        members = [
            f"{'' if info.is_required() else '? '}{wire}" for wire, info in _fields(annotation)
        ]
        return "{" + ", ".join(members) + "}"
    return _SCALARS_TABLE[annotation]


def _envelope_shape(model: type[BaseModel]) -> str:
    members = [f"{wire}: {_table_shape(info.annotation)}" for wire, info in _fields(model)]
    return "{" + ", ".join(members) + "}"


def method_table() -> str:
    """Return the Markdown table of methods in ``docs/protocol.md``."""
    rows = ["| method | payload | reply |", "| --- | --- | --- |"]
    for method in METHODS.values():
        rows.append(
            f"| `{method.name}` | `{_envelope_shape(method.params)}` "
            f"| `{_table_shape(method.result)}` |"
        )
    return "\n".join(rows) + "\n"


def _shape_value(annotation: Any) -> str:
    annotation, _ = _unwrap(annotation)
    if typing.get_origin(annotation) is list:
        return f"[{_shape_value(typing.get_args(annotation)[0])}, ...]"
    if _is_model(annotation):
        return shape(annotation)
    return _SCALARS_TABLE[annotation]


def shape(model: type[BaseModel]) -> str:
    """Return a model's JSON shape by wire names, ``?`` before optional fields.

    >>> shape(METHODS["echo"].params)
    '{"req": {"message": text, "delayMs": int}}'
    """
    members = [
        f'{"" if info.is_required() else "?"}"{wire}": {_shape_value(info.annotation)}'
        for wire, info in _fields(model)
    ]
    return "{" + ", ".join(members) + "}"


_EXAMPLE_SCALARS: dict[Any, Any] = {str: "text", int: 1, bool: True, float: 1.0}


def _example_value(annotation: Any) -> Any:
    annotation, _ = _unwrap(annotation)
    if typing.get_origin(annotation) is list:
        return [_example_value(typing.get_args(annotation)[0])]
    if _is_model(annotation):
        return example(annotation)
    return _EXAMPLE_SCALARS[annotation]


def example(model: type[BaseModel]) -> dict[str, Any]:
    """Return a valid payload for ``model`` by wire names, every optional field set.

    Integers are 1 and strings ``"text"``: valid for every method's checks.
    """
    return {wire: _example_value(info.annotation) for wire, info in _fields(model)}
