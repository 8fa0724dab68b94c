"""Per-method client plans: each request frame and each reply decode, prepared once.

A plan does what ``encode_request(method.wire_name, method.encode_params(p))``
and ``method.decode_result(body)`` do, byte for byte and error for error
(``tests/test_client_plan.py`` checks both on generated and mutated input),
with fewer steps: the frame head is encoded once, and a request's CBOR is
written by an encoder generated per envelope (as ``encoders.py`` does for
replies), straight from the field values, so a typed proc such as ``echo``
never builds its envelope model just to take it apart again.

Whatever a fast path does not cover exactly, the plan hands to the reference
path: values of another type than declared (a subclass, ``model_construct``),
fields the generator does not know (lists), and every error. A reply that
fails to decode or validate is decoded again by ``Method.decode_result``,
which raises its own error; only success is fast.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import annotated_types
from pydantic import BaseModel

from ..wire import api, codec
from ..wire.encoders import SCALARS, cbor_bool, cbor_head, cbor_int, cbor_text, scalar_field
from ..wire.framing import encode_request

__all__ = ["Plan", "plan"]

P = TypeVar("P", bound=BaseModel)
R = TypeVar("R")

_pack_u32 = struct.Struct(">I").pack
_ENCODERS = {"cbor_text": cbor_text, "cbor_int": cbor_int, "cbor_bool": cbor_bool}


class _Decoders(threading.local):
    def __init__(self) -> None:
        self.decoder = codec.StrictDecoder()


_decoders = _Decoders()  # a plan serves clients on any thread


class Plan(Generic[P, R]):
    """A :class:`~timer_sdk.wire.api.Method` as the client uses it."""

    __slots__ = ("_empty_frame", "_encode", "_fields", "_head", "_is_str", "_validate", "method",
                 "name")  # fmt: skip

    def __init__(self, method: api.Method[P, R]) -> None:
        self.method = method
        self.name = method.name
        self._head = _pack_u32(len(method.wire_name)) + method.wire_name
        self._fields = tuple(method.params.model_fields)
        # An envelope without fields is always sent as {} (as Method.encode_params does).
        self._empty_frame = encode_request(method.wire_name, b"\xa0") if not self._fields else None
        self._encode = _generate(method.params, self._head)
        self._is_str = method.result is str
        self._validate = method.result_validator.validate_python

    def __repr__(self) -> str:
        return f"<Plan {self.name}>"

    def frame(self, params: P) -> bytes:
        """The whole request frame of ``params``."""
        if self._empty_frame is not None:
            return self._empty_frame
        encode = self._encode
        if encode is not None and type(params) is self.method.params:
            frame = encode(*[getattr(params, name) for name in self._fields])
            if frame is not None:
                return frame
        return self._head + _frame_tail(self.method.encode_params(params))

    def frame_of(self, *values: Any) -> bytes:
        """The request frame of the envelope with these field values, in field order.

        As ``frame(method.params(**fields))``, without building the envelope
        when the values are exactly of their declared types.
        """
        if self._empty_frame is not None:
            return self._empty_frame
        encode = self._encode
        if encode is not None:
            frame = encode(*values)
            if frame is not None:
                return frame
        return self.frame(self.method.params(**dict(zip(self._fields, values, strict=True))))

    def decode_result(self, body: bytes) -> R:
        """Decode and validate a success body, as :meth:`Method.decode_result`."""
        try:
            if self._is_str:
                # A short text (the version) is its head and UTF-8, as cbor2 decodes it.
                size = len(body) - 1
                if size < 24 and body[0] == 0x60 + size:
                    return body[1:].decode()  # type: ignore[return-value]
                if 24 <= size - 1 < 256 and body[0] == 0x78 and body[1] == size - 1:
                    return body[2:].decode()  # type: ignore[return-value]
            item = _decoders.decoder.decode(body)
            if self._is_str and type(item) is str:
                return item  # type: ignore[return-value]  # all a str validator would check
            result: R = self._validate(
                item, strict=True, by_alias=True, by_name=False, extra="ignore"
            )
        except Exception:
            return self.method.decode_result(body)  # raises the reference's own error
        return result


def _frame_tail(payload: bytes) -> bytes:
    return _pack_u32(len(payload)) + payload


_plans: dict[api.Method[Any, Any], Plan[Any, Any]] = {}
_MAX_PLANS = 64  # methods are declared once; a program that makes them per call gets no cache


def plan(method: api.Method[P, R]) -> Plan[P, R]:
    """The plan of ``method``, made once."""
    found = _plans.get(method)
    if found is None:
        found = Plan(method)
        if len(_plans) < _MAX_PLANS:
            _plans[method] = found
    return found


# --- generated request encoders ------------------------------------------------


class _Unsupported(Exception):
    pass


class _Writer:
    """Writes one envelope's encoder: checks, then the body's pieces in order."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"_pack_u32": _pack_u32, **_ENCODERS}
        self.lines: list[str] = []
        self.parts: list[str] = []
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def const(self, value: Any) -> str:
        key = self.name("_c")
        self.namespace[key] = value
        return key

    def model(self, var: str | None, model: type[BaseModel]) -> None:
        """The map of a ``model`` instance: in ``var``, or (the envelope) in the arguments."""
        decorators = model.__pydantic_decorators__
        if (
            decorators.field_serializers
            or decorators.model_serializers
            or model.__pydantic_computed_fields__
            or model.model_config.get("extra") == "allow"
        ):
            raise _Unsupported(model.__name__)  # its wire map is not just its fields
        if var is not None:
            self.lines.append(f"if type({var}) is not {self.const(model)}: return None")
        fields = model.model_fields
        count = self.name("n")
        self.lines.append(f"{count} = {len(fields)}")
        heads = self.const([cbor_head(0xA0, n) for n in range(len(fields) + 1)])
        self.parts.append(f"{heads}[{count}]")
        for name, info in fields.items():
            if (
                not name.isidentifier()
                or info.exclude
                or not all(isinstance(m, annotated_types.BaseMetadata) for m in info.metadata)
            ):
                raise _Unsupported(name)  # bounds (Int64) are fine; serializers are not
            key = cbor_text(info.serialization_alias or info.alias or name)
            value = self.name("v")
            self.lines.append(f"{value} = {var}.{name}" if var else f"{value} = {name}_")
            annotation = info.annotation
            kind = scalar_field(annotation)
            if kind is not None:
                scalar, optional = kind
                encoder = SCALARS[scalar]
                check = f"type({value}) is not {scalar.__name__}"
                if optional:
                    self.lines.append(f"if {value} is None: {count} -= 1")
                    self.lines.append(f"elif {check}: return None")
                    piece = f"b'' if {value} is None else {self.const(key)} + {encoder}({value})"
                    part = self.name("p")
                    self.lines.append(f"{part} = {piece}")
                    self.parts.append(part)
                else:
                    self.lines.append(f"if {check}: return None")
                    self.parts.extend((self.const(key), f"{encoder}({value})"))
            elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
                self.parts.append(self.const(key))
                self.model(value, annotation)
            else:
                raise _Unsupported(name)  # lists, unions of models: the generic path


def _generate(params: type[BaseModel], head: bytes) -> Callable[..., bytes | None] | None:
    """An encoder from the envelope's field values to the whole frame, or ``None``.

    It returns ``None`` for any value that is not exactly its declared type,
    and for any error: the caller then takes the generic path.
    """
    fields = params.model_fields
    if not fields:
        return None
    writer = _Writer()
    try:
        writer.model(None, params)
    except _Unsupported:
        return None
    writer.namespace["_frame_head"] = head
    args = ", ".join(f"{name}_" for name in fields)
    body = "\n".join(f"        {line}" for line in writer.lines)
    source = (
        f"def encode({args}):\n"
        f"    try:\n{body}\n"
        f"        payload = b''.join(({', '.join(writer.parts)},))\n"
        f"    except Exception:\n"
        f"        return None\n"
        f"    return b''.join((_frame_head, _pack_u32(len(payload)), payload))\n"
    )
    exec(source, writer.namespace)  # generated from field names only
    encode: Callable[..., bytes | None] = writer.namespace["encode"]
    encode.__qualname__ = f"plan.<{params.__name__}>"
    return encode
