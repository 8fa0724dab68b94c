"""A small, language-neutral description of the wire API, built from :mod:`timer_sdk.wire.api`.

Every generator of text for other languages reads this and nothing else: the
CDDL, the method table and the shapes of :mod:`timer_sdk.tools.schema`, and the
client stubs of :mod:`timer_sdk.tools.stubs`. A new target language is one more
renderer of :class:`ApiDescription`, not a second walk over the Pydantic models.
It is plain data, so a server can send it (the ``server.describe`` extension,
:mod:`timer_sdk.wire.served`) and a client can render it as the server would.

The JSON Schema is the one rendering that needs the Pydantic classes (Pydantic
writes it, with every bound and doc), so it is made here, where the classes
are, and travels with the description as data.

Names are wire names (camelCase); scalars are ``text``, ``int64``, ``bool`` and
``float``. Sans-I/O.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Protocol

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema

from ..models import INT64_MAX, INT64_MIN
from .api import EVENTS, METHODS, SUBSCRIBE, UNSUBSCRIBE

__all__ = [
    "ApiDescription",
    "EventDescription",
    "FieldDescription",
    "MethodLike",
    "ModelDescription",
    "ProcDescription",
    "TypeRef",
    "describe",
    "describe_model",
    "spell",
    "unwrap",
]

_SCALARS = {str: "text", int: "int64", bool: "bool", float: "float"}


@dataclasses.dataclass(frozen=True)
class TypeRef:
    """A field's or a reply's type: a scalar, a list of a type, or a model."""

    kind: Literal["scalar", "list", "model"]
    scalar: str = ""
    item: TypeRef | None = None
    model: ModelDescription | None = None
    nullable: bool = False


@dataclasses.dataclass(frozen=True)
class FieldDescription:
    """One member of a map, by wire name."""

    wire: str
    type: TypeRef
    required: bool


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """A CBOR map with named members: a model, or a method's request envelope."""

    name: str
    doc: str
    fields: tuple[FieldDescription, ...]


@dataclasses.dataclass(frozen=True)
class ProcDescription:
    """One method: its wire name, its request envelope and its reply type."""

    name: str
    params: ModelDescription
    result: TypeRef


@dataclasses.dataclass(frozen=True)
class EventDescription:
    """One event of the event extension, with its payload model."""

    name: str
    data: ModelDescription


@dataclasses.dataclass(frozen=True)
class ApiDescription:
    """The whole wire API."""

    procs: tuple[ProcDescription, ...]
    models: tuple[ModelDescription, ...]
    """Every model the procs and events use, envelopes excepted, outermost first."""
    events: tuple[EventDescription, ...]
    subscribe: str = SUBSCRIBE
    unsubscribe: str = UNSUBSCRIBE
    int64_min: int = INT64_MIN
    int64_max: int = INT64_MAX
    json_schema: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    """The same API as one JSON Schema (draft 2020-12) document, as Pydantic writes it."""


class MethodLike(Protocol):
    """What :func:`describe` reads of a method: :class:`~timer_sdk.wire.api.Method` has it."""

    @property
    def name(self) -> str: ...
    @property
    def params(self) -> type[BaseModel]: ...
    @property
    def result(self) -> Any: ...


def unwrap(annotation: Any) -> tuple[Any, bool]:
    """Return ``(type, nullable)`` for ``X`` or ``X | None``, without ``Annotated``."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return unwrap(args[0])[0], True
    return annotation, False


def _type(annotation: Any) -> TypeRef:
    annotation, nullable = unwrap(annotation)
    if typing.get_origin(annotation) is list:
        return TypeRef("list", item=_type(typing.get_args(annotation)[0]), nullable=nullable)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return TypeRef("model", model=describe_model(annotation), nullable=nullable)
    if annotation not in _SCALARS:
        raise TypeError(f"no wire type for {annotation!r}")
    return TypeRef("scalar", scalar=_SCALARS[annotation], nullable=nullable)


_DESCRIBED: dict[type[BaseModel], ModelDescription] = {}


def describe_model(model: type[BaseModel]) -> ModelDescription:
    """Describe one Pydantic model by its wire names, in declaration order."""
    if model in _DESCRIBED:  # one description per class: models compare by identity
        return _DESCRIBED[model]
    fields = tuple(
        FieldDescription(info.alias or name, _type(info.annotation), info.is_required())
        for name, info in model.model_fields.items()
    )
    doc = " ".join((model.__doc__ or "").split())
    described = _DESCRIBED[model] = ModelDescription(model.__name__, doc, fields)
    return described


def _reachable(roots: Iterable[TypeRef]) -> list[ModelDescription]:
    seen: list[ModelDescription] = []

    def visit(ref: TypeRef) -> None:
        if ref.item is not None:
            visit(ref.item)
        elif ref.model is not None and ref.model not in seen:
            seen.append(ref.model)
            for field in ref.model.fields:
                visit(field.type)

    for root in roots:
        visit(root)
    return seen


def describe(
    methods: Iterable[MethodLike] | None = None,
    events: Mapping[str, type[BaseModel]] | None = None,
) -> ApiDescription:
    """Describe ``methods`` and ``events``, by default the SDK's own (``api.py``)."""
    method_list = list(METHODS.values() if methods is None else methods)
    event_models = dict(EVENTS if events is None else events)
    procs = tuple(
        ProcDescription(m.name, describe_model(m.params), _type(m.result)) for m in method_list
    )
    event_list = tuple(
        EventDescription(name, describe_model(model)) for name, model in event_models.items()
    )
    roots = [TypeRef("model", model=p.params) for p in procs] + [p.result for p in procs]
    roots += [TypeRef("model", model=e.data) for e in event_list]
    envelopes = {p.params for p in procs}
    models = tuple(m for m in _reachable(roots) if m not in envelopes)
    api = ApiDescription(procs, models, event_list)
    return dataclasses.replace(api, json_schema=_json_schema(api, method_list, event_models))


# --- JSON Schema, written by Pydantic ------------------------------------------


def _json_schema(
    api: ApiDescription, methods: list[MethodLike], events: Mapping[str, type[BaseModel]]
) -> dict[str, Any]:
    """``api`` as one JSON Schema document; ``$defs`` keyed by method, frame and model."""
    entries: list[tuple[type[BaseModel], Any]] = [(m.params, "validation") for m in methods]
    entries += [(m.result, "serialization") for m in methods if _is_model(m.result)]
    entries += [(model, "serialization") for model in events.values()]
    refs, document = models_json_schema(entries, by_alias=True, ref_template="#/$defs/{model}")
    defs: dict[str, Any] = document["$defs"]
    for definition in defs.values():  # docstrings are reST; readers of a schema want text
        if "description" in definition:
            text = re.sub(r":\w+:`~?([^`]+)`", r"\1", definition["description"])
            definition["description"] = text.replace("``", "`")
    for m in methods:
        defs[f"{m.name}-request"] = refs[(m.params, "validation")]
        if _is_model(m.result):
            defs[f"{m.name}-reply"] = refs[(m.result, "serialization")]
        else:
            defs[f"{m.name}-reply"] = TypeAdapter(m.result).json_schema()
    names = {"enum": [event.name for event in api.events]}
    defs[f"{api.subscribe}-request"] = _object({"events": {"type": "array", "items": names}}, [])
    defs[f"{api.subscribe}-reply"] = _object(
        {"events": {"type": "array", "items": names}}, ["events"]
    )
    defs[f"{api.unsubscribe}-request"] = _object({}, [])
    defs[f"{api.unsubscribe}-reply"] = {"type": "null"}
    defs["event-frame"] = {
        "oneOf": [
            _object(
                {"event": {"const": name}, "data": refs[(model, "serialization")]},
                ["event", "data"],
            )
            for name, model in events.items()
        ]
    }
    defs["events-dropped-frame"] = {
        "oneOf": [
            _object(
                {"dropped": {"type": "integer", "minimum": 1, "maximum": api.int64_max}},
                ["dropped"],
            ),
            _object({"dropped": {"const": 0}, "gap": {"type": "string"}}, ["dropped", "gap"]),
        ]
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "timer wire API",
        "description": "Generated from timer_sdk/wire/api.py; CBOR payloads, by wire (camelCase) "
        "names. Validate a payload against #/$defs/<method>-request.",
        "$defs": dict(sorted(defs.items())),
    }


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    return schema


def spell(
    ref: TypeRef,
    scalars: Mapping[str, str],
    array: Callable[[str], str],
    nullable: Callable[[str], str],
) -> str:
    """A type in a target's syntax: its scalar names, list form and nullable form.

    Models are spelled by name.
    """
    if ref.item is not None:
        text = array(spell(ref.item, scalars, array, nullable))
    elif ref.model is not None:
        text = ref.model.name
    else:
        text = scalars[ref.scalar]
    return nullable(text) if ref.nullable else text
