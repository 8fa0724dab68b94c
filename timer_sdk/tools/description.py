"""A small, language-neutral description of the wire API, built from :mod:`timer_sdk.wire.api`.

Every generator of text for other languages reads this and nothing else: the
CDDL, the method table and the shapes of :mod:`timer_sdk.tools.schema`, and the
client stubs of :mod:`timer_sdk.tools.stubs`. A new target language is one more
renderer of :class:`ApiDescription`, not a second walk over the Pydantic models.

Names are wire names (camelCase); scalars are ``text``, ``int64``, ``bool`` and
``float``. Sans-I/O.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from ..models import INT64_MAX, INT64_MIN
from ..wire.api import EVENTS, METHODS, SUBSCRIBE, UNSUBSCRIBE

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
    source: type[BaseModel] = dataclasses.field(compare=False, repr=False)
    """The Pydantic class, for JSON Schema, which Pydantic writes itself."""


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
    described = _DESCRIBED[model] = ModelDescription(model.__name__, doc, fields, model)
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
    procs = tuple(
        ProcDescription(m.name, describe_model(m.params), _type(m.result))
        for m in (METHODS.values() if methods is None else methods)
    )
    event_list = tuple(
        EventDescription(name, describe_model(model))
        for name, model in (EVENTS if events is None else events).items()
    )
    roots = [TypeRef("model", model=p.params) for p in procs] + [p.result for p in procs]
    roots += [TypeRef("model", model=e.data) for e in event_list]
    envelopes = {p.params for p in procs}
    models = tuple(m for m in _reachable(roots) if m not in envelopes)
    return ApiDescription(procs, models, event_list)


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
