"""The ``server.describe`` extension: a server's API, version and extensions, as plain data.

A server answers ``server.describe`` with one CBOR map (``docs/protocol.md``
says which keys): the package version, the extension methods it answers, and
its :class:`~timer_sdk.wire.description.ApiDescription`, models by name. A
client reads it back into a :class:`ServerDescription` and can render it as
the server would render itself (``timer-sdk describe``). Readers ignore keys
they do not know, so a newer server may add some. Sans-I/O.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .._version import __version__
from . import codec
from .description import (
    ApiDescription,
    EventDescription,
    FieldDescription,
    ModelDescription,
    ProcDescription,
    TypeRef,
    describe,
)
from .framing import RET_OK, encode_reply

__all__ = ["DESCRIBE", "ServerDescription", "decode_description", "describe_reply", "encode"]

DESCRIBE = "server.describe"
"""The extension method that answers with the server's :class:`ServerDescription`."""

_MAX_DEPTH = 64  # JSON Schemas nest deeper than requests may; the frame size still bounds it


@dataclasses.dataclass(frozen=True)
class ServerDescription:
    """What a server says of itself: ``await client.describe()``.

    ``version`` is the server's package version, ``extensions`` the extension
    methods it answers besides the procs (``server.stats`` only where it is
    enabled), and ``api`` its whole API, which ``timer_sdk.tools.schema.cddl``
    and ``json_schema`` render.
    """

    version: str
    extensions: tuple[str, ...]
    api: ApiDescription

    @property
    def methods(self) -> tuple[str, ...]:
        """The procs the server answers, by wire name."""
        return tuple(proc.name for proc in self.api.procs)


# --- the CBOR form -------------------------------------------------------------


class _Data(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class _TypeData(_Data):
    scalar: str | None = None
    item: _TypeData | None = Field(None, alias="list")
    model: str | None = None
    nullable: bool = False


class _FieldData(_Data):
    name: str
    type: _TypeData
    required: bool


class _ModelData(_Data):
    name: str
    doc: str
    fields: list[_FieldData]


class _ProcData(_Data):
    name: str
    request: str
    reply: _TypeData


class _EventData(_Data):
    name: str
    data: str


class _ApiData(_Data):
    methods: list[_ProcData]
    models: list[_ModelData]
    events: list[_EventData]
    subscribe: str
    unsubscribe: str
    int64_min: int = Field(alias="int64Min")
    int64_max: int = Field(alias="int64Max")
    json_schema: dict[str, Any] = Field(alias="jsonSchema")


class _ServerData(_Data):
    version: str
    extensions: list[str]
    api: _ApiData


_READER: TypeAdapter[_ServerData] = TypeAdapter(_ServerData)


def _type_data(ref: TypeRef) -> dict[str, Any]:
    if ref.item is not None:
        data: dict[str, Any] = {"list": _type_data(ref.item)}
    elif ref.model is not None:
        data = {"model": ref.model.name}
    else:
        data = {"scalar": ref.scalar}
    if ref.nullable:
        data["nullable"] = True
    return data


def _model_data(model: ModelDescription) -> dict[str, Any]:
    fields = [
        {"name": f.wire, "type": _type_data(f.type), "required": f.required} for f in model.fields
    ]
    return {"name": model.name, "doc": model.doc, "fields": fields}


def encode(description: ServerDescription) -> bytes:
    """The body of a ``server.describe`` reply."""
    api = description.api
    envelopes = [proc.params for proc in api.procs]
    data = {
        "version": description.version,
        "extensions": list(description.extensions),
        "api": {
            "methods": [
                {"name": p.name, "request": p.params.name, "reply": _type_data(p.result)}
                for p in api.procs
            ],
            "models": [_model_data(m) for m in [*envelopes, *api.models]],
            "events": [{"name": e.name, "data": e.data.name} for e in api.events],
            "subscribe": api.subscribe,
            "unsubscribe": api.unsubscribe,
            "int64Min": api.int64_min,
            "int64Max": api.int64_max,
            "jsonSchema": api.json_schema,
        },
    }
    return codec.encode_item(data)


@functools.cache
def describe_reply(extensions: tuple[str, ...]) -> bytes:
    """The whole ``ret 0`` frame answering ``server.describe``, for a server with ``extensions``."""
    return encode_reply(RET_OK, encode(ServerDescription(__version__, extensions, describe())))


class _Models:
    """The models of a description by name, each built once, after those it uses."""

    def __init__(self, models: list[_ModelData]) -> None:
        self._data = {model.name: model for model in models}
        self._built: dict[str, ModelDescription] = {}
        self._building: set[str] = set()

    def get(self, name: str) -> ModelDescription:
        if name in self._built:
            return self._built[name]
        if name not in self._data:
            raise codec.DecodeError(f"{DESCRIBE}: invalid reply: no model named {name!r}")
        if name in self._building:
            raise codec.DecodeError(f"{DESCRIBE}: invalid reply: model {name!r} contains itself")
        self._building.add(name)
        data = self._data[name]
        fields = tuple(FieldDescription(f.name, self.type(f.type), f.required) for f in data.fields)
        built = self._built[name] = ModelDescription(data.name, data.doc, fields)
        return built

    def type(self, data: _TypeData) -> TypeRef:
        kinds = [kind for kind in (data.scalar, data.item, data.model) if kind is not None]
        if len(kinds) != 1:
            raise codec.DecodeError(
                f"{DESCRIBE}: invalid reply: a type is one of scalar, list or model: {data!r}"
            )
        if data.item is not None:
            return TypeRef("list", item=self.type(data.item), nullable=data.nullable)
        if data.model is not None:
            return TypeRef("model", model=self.get(data.model), nullable=data.nullable)
        return TypeRef("scalar", scalar=str(data.scalar), nullable=data.nullable)


def decode_description(body: bytes) -> ServerDescription:
    """Read the body of a ``server.describe`` reply.

    Raises :class:`~timer_sdk.wire.codec.DecodeError` naming what is wrong.
    """
    try:
        item = codec.decode_item(body, max_depth=_MAX_DEPTH)
    except codec.DecodeError as exc:
        raise codec.DecodeError(f"{DESCRIBE}: invalid reply: {exc}") from None
    data: _ServerData = codec.validate(_READER, item, f"{DESCRIBE}: invalid reply")
    api = data.api
    models = _Models(api.models)
    procs = tuple(ProcDescription(p.name, models.get(p.request), models.type(p.reply))
                  for p in api.methods)  # fmt: skip
    events = tuple(EventDescription(e.name, models.get(e.data)) for e in api.events)
    envelopes = {p.request for p in api.methods}
    described = ApiDescription(
        procs,
        tuple(models.get(m.name) for m in api.models if m.name not in envelopes),
        events,
        subscribe=api.subscribe,
        unsubscribe=api.unsubscribe,
        int64_min=api.int64_min,
        int64_max=api.int64_max,
        json_schema=api.json_schema,
    )
    return ServerDescription(data.version, tuple(data.extensions), described)
