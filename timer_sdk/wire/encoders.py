"""Success frames straight from results: one encoder generated per result type.

The generic way to answer is four steps: the model to a dict (pydantic's
``to_python``), the dict to CBOR (cbor2), a frame head, and a concatenation.
The API's results are flat maps of text, integers and booleans, so for each
result type an encoder is generated once, as :mod:`dataclasses` generates
``__init__``, that writes the whole frame, head included, in one join. The
bytes are exactly cbor2's (``tests/test_encoders.py`` checks them); a type
with any other kind of field gets the generic path.
"""

from __future__ import annotations

import struct
import types
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from . import codec
from .framing import RET_OK, encode_reply

__all__ = [
    "SCALARS",
    "FrameEncoder",
    "cbor_bool",
    "cbor_head",
    "cbor_int",
    "cbor_text",
    "frame_encoder",
    "scalar_field",
]

FrameEncoder = Callable[[Any], bytes]
"""A result in, its whole success frame (head and body) out."""

_frame_head = struct.Struct(">iI").pack
SCALARS = {str: "cbor_text", int: "cbor_int", bool: "cbor_bool"}
"""The field types written without the generic path, and the function that writes each."""
_U64 = 1 << 64


def cbor_head(major: int, n: int) -> bytes:
    """A CBOR head: major type and argument, in the shortest form, as cbor2 writes it."""
    if n < 24:
        return bytes((major | n,))
    if n < 0x100:
        return bytes((major | 24, n))
    if n < 0x10000:
        return struct.pack(">BH", major | 25, n)
    if n < 0x100000000:
        return struct.pack(">BI", major | 26, n)
    return struct.pack(">BQ", major | 27, n)


_SHORT_TEXT = [bytes((0x60 | n,)) for n in range(24)]


def cbor_text(value: str) -> bytes:
    data = value.encode()
    n = len(data)
    return (_SHORT_TEXT[n] if n < 24 else cbor_head(0x60, n)) + data


def cbor_int(value: int) -> bytes:
    if 0 <= value < 24:
        return bytes((value,))
    if 0 <= value < _U64:
        return cbor_head(0x00, value)
    if -_U64 <= value < 0:
        return cbor_head(0x20, -1 - value)
    return codec.encode_item(value)  # a bignum; models bound ints to 64 bits


def cbor_bool(value: bool) -> bytes:
    return b"\xf5" if value else b"\xf4"


def scalar_field(annotation: Any) -> tuple[type, bool] | None:
    """A field's scalar type (a key of :data:`SCALARS`) and whether it may be ``None``.

    ``None`` if the field is not a scalar. Bounds (``Int64``) are left to validation.
    """
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            return None
        annotation, optional = members[0], True
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return (annotation, optional) if annotation in SCALARS else None


def frame_encoder(result_type: type[Any]) -> FrameEncoder:
    """Return an encoder from ``result_type`` values to success frames."""
    if result_type in SCALARS:
        scalar = globals()[SCALARS[result_type]]
        return lambda value: encode_reply(RET_OK, scalar(value))
    if isinstance(result_type, type) and issubclass(result_type, BaseModel):
        generated = _generate(result_type)
        if generated is not None:
            return generated
    return _generic


def _generic(result: Any) -> bytes:
    if isinstance(result, BaseModel):
        return encode_reply(RET_OK, codec.encode_model(result))
    return encode_reply(RET_OK, codec.encode_item(result))


def _generate(model: type[BaseModel]) -> FrameEncoder | None:
    """Generate a model's encoder: its wire map, key by key, in field order.

    Fields that are ``None`` are left out, as ``exclude_none`` does.
    """
    fields = []
    for name, info in model.model_fields.items():
        kind = scalar_field(info.annotation)
        if kind is None or not name.isidentifier():
            return None
        fields.append((name, info.alias or name, SCALARS[kind[0]], kind[1]))
    namespace: dict[str, Any] = {
        "cbor_text": cbor_text, "cbor_int": cbor_int, "cbor_bool": cbor_bool,
        "_frame_head": _frame_head, "_short": _SHORT_TEXT, "cbor_head": cbor_head,
        "_map_head": [cbor_head(0xA0, n) for n in range(len(fields) + 1)],
    }  # fmt: skip
    lines = ["def encode(m):"]
    parts = []  # the body's pieces, in order, after the map head
    fixed = 1  # bytes of the map head and of the keys always present
    count = [str(len(fields))]
    for i, (name, alias, encoder, optional) in enumerate(fields):
        key = f"_k{i}"
        namespace[key] = cbor_text(alias)
        value = f"v{i}" if optional else f"m.{name}"
        if optional:
            lines.append(f"    v{i} = m.{name}")
        if encoder == "cbor_text" and not optional:
            # Inlined: text is most of what the API answers, and a call costs more.
            lines.append(f"    t{i} = {value}.encode()")
            lines.append(f"    n{i} = len(t{i})")
            lines.append(
                f"    p{i} = (_short[n{i}] if n{i} < 24 else cbor_head(0x60, n{i})) + t{i}"
            )
        elif optional:
            lines.append(f"    p{i} = b'' if v{i} is None else {key} + {encoder}(v{i})")
            count.append(f"(v{i} is None)")
        else:
            lines.append(f"    p{i} = {encoder}({value})")
        if not optional:
            parts.append(key)
            fixed += len(namespace[key])
        parts.append(f"p{i}")
    size = " + ".join([str(fixed), *(f"len(p{i})" for i in range(len(fields)))])
    lines.append(f"    head = _frame_head({RET_OK}, {size})")
    lines.append(f"    return b''.join((head, _map_head[{' - '.join(count)}], {', '.join(parts)}))")
    exec("\n".join(lines), namespace)  # generated from field names only
    encode: FrameEncoder = namespace["encode"]
    encode.__qualname__ = f"frame_encoder.<{model.__name__}>"
    return encode
