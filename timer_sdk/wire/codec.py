"""Models to CBOR and back, strict at the edge.

Decoding refuses what the schema never uses before any model sees it:
indefinite lengths, duplicate map keys, non-string map keys, nesting deeper
than ``max_depth``, every CBOR tag (so none of cbor2's tag decoders runs on
untrusted input), and anything but exactly one item. Pydantic then refuses
missing, unknown and mistyped fields and integers outside the signed 64-bit
range. Every failure is a :class:`DecodeError` whose message names the method
and the field.
"""

from __future__ import annotations

import io
import threading
from typing import Any, Literal, NoReturn

import cbor2
from pydantic import BaseModel, TypeAdapter, ValidationError

from ..errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_ITEMS",
    "DecodeError",
    "StrictDecoder",
    "check_items",
    "decode_item",
    "describe_validation",
    "dump_model",
    "encode_item",
    "encode_model",
    "validate",
]

DEFAULT_MAX_DEPTH = 16
DEFAULT_MAX_ITEMS = 4096

_MAX_ERRORS = 3  # an error reply names this many problems, then counts the rest
_MAX_ERROR_TEXT = 200  # characters of each

# cbor2 decodes these tags itself, bypassing tag_hook; each is overridden to refuse.
_BUILTIN_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261,
                 1004, 43000, 55799)  # fmt: skip


class DecodeError(ProtocolError):
    """Bytes that are not a valid payload for what was expected."""


class _TagRefused(Exception):
    def __init__(self, tag: int) -> None:
        super().__init__(f"CBOR tag {tag} is not allowed")


def _refuse_tag_hook(tag: cbor2.CBORTag, _immutable: bool) -> NoReturn:
    raise _TagRefused(tag.tag)


def _refuse(tag: int) -> Any:
    def refuse(*_decoder_state: object) -> NoReturn:
        raise _TagRefused(tag)

    return refuse


_REFUSE_BUILTIN = {tag: _refuse(tag) for tag in _BUILTIN_TAGS}


_READ_AHEAD = 4096  # what cbor2's decoder reads at once, and keeps until its next item


class StrictDecoder:
    """One strict decoder, reused: building a ``CBORDecoder`` costs as much as a decode.

    Not thread-safe and not re-entrant: keep one per thread (a server keeps
    one per loop). Between items it keeps at most its last read-ahead (4 KiB)
    alive: a larger payload is released with the decode.
    """

    __slots__ = ("_decode", "_decoder", "_reset_stream", "_stream", "_tell", "max_depth")

    def __init__(self, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self.max_depth = max_depth
        self._stream = io.BytesIO()
        self._decoder = cbor2.CBORDecoder(
            self._stream,
            tag_hook=_refuse_tag_hook,
            semantic_decoders=_REFUSE_BUILTIN,
            max_depth=max_depth,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
        # Re-initialising the BytesIO in place keeps the decoder's bound ``read``.
        self._reset_stream = self._stream.__init__  # type: ignore[misc]  # an exact BytesIO
        self._decode = self._decoder.decode
        self._tell = self._stream.tell

    def decode(self, data: bytes) -> Any:
        """Decode exactly one strict CBOR item; raise :class:`DecodeError` otherwise."""
        self._reset_stream(data)
        try:
            item = self._decode()
        except BaseException as exc:
            # A decode that failed partway may leave read-ahead bytes in the
            # decoder; setting its stream again discards them.
            self._reset_stream(b"")
            self._decoder.fp = self._stream
            raise _decode_error(exc) from None
        end = self._tell()
        if end > _READ_AHEAD:
            self._reset_stream(b"")  # smaller ones stay in the decoder's read-ahead anyway
        if end != len(data):
            raise DecodeError(
                f"payload must be exactly one CBOR item; {len(data) - end} bytes follow it"
            )
        return item


def _decode_error(exc: BaseException) -> BaseException:
    if isinstance(exc, cbor2.CBORDecodeEOF):
        return DecodeError("truncated CBOR item")
    if isinstance(exc, cbor2.CBORDecodeError):
        cause = exc.__cause__ or exc.__context__
        reason = str(cause) if isinstance(cause, _TagRefused) else str(exc)
        return DecodeError(f"invalid CBOR: {reason}")
    if isinstance(exc, RecursionError):  # a defensive net; max_depth stops nesting first
        return DecodeError("invalid CBOR: nested too deeply")
    return exc


class _Decoders(threading.local):
    def __init__(self) -> None:
        self.by_depth: dict[int, StrictDecoder] = {}


_decoders = _Decoders()


def decode_item(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Decode exactly one strict CBOR item; raise :class:`DecodeError` otherwise."""
    decoder = _decoders.by_depth.get(max_depth)
    if decoder is None:
        decoder = _decoders.by_depth[max_depth] = StrictDecoder(max_depth)
    return decoder.decode(data)


def check_items(payload: bytes, max_items: int, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """Refuse a payload with more than ``max_items`` array and map entries in all.

    Runs on the bytes, before cbor2 builds anything: building a million empty
    maps blocks the loop for a tenth of a second or more. Each container's
    count is taken from its head, so the walk visits at most about
    ``2 * max_items`` heads, whatever the payload. Anything it cannot judge
    (indefinite lengths, tags, nesting past ``max_depth``, truncation) is left
    for the decoder to refuse.
    """
    if len(payload) <= max_items:
        return  # each entry takes at least one byte
    left = max_items
    open_items = [1]  # items still to visit in each open container; the root first
    pos = 0
    size = len(payload)
    while pos < size:
        while not open_items[-1]:
            open_items.pop()
            if not open_items:
                return
        open_items[-1] -= 1
        head = payload[pos]
        major = head >> 5
        info = head & 31
        pos += 1
        if info < 24:
            arg = info
        elif info < 28:
            width = 1 << (info - 24)
            arg = int.from_bytes(payload[pos : pos + width])
            pos += width
        else:
            return  # indefinite or reserved
        if major in {4, 5}:
            left -= arg
            if left < 0:
                raise DecodeError(f"more than {max_items} array and map entries in the payload")
            if len(open_items) > max_depth:
                return
            open_items.append(arg if major == 4 else 2 * arg)
        elif major in {2, 3}:
            pos += arg  # a string's bytes
        elif major == 6:
            return


def encode_item(item: object) -> bytes:
    """Encode one plain Python value (dicts, lists, str, int, bool, None)."""
    return cbor2.dumps(item)


def encode_model(model: BaseModel) -> bytes:
    """Encode a model as its wire map, in one call (it is on the hot path)."""
    return cbor2.dumps(
        model.__pydantic_serializer__.to_python(model, by_alias=True, exclude_none=True)
    )


def dump_model(model: BaseModel) -> dict[str, Any]:
    """Return a model as its wire map: camelCase keys, no ``None`` optionals."""
    return model.__pydantic_serializer__.to_python(model, by_alias=True, exclude_none=True)  # type: ignore[no-any-return]


def validate(
    adapter: TypeAdapter[Any], item: object, what: str, *, extra: Literal["ignore"] | None = None
) -> Any:
    """Validate a decoded item by its wire (camelCase) names only.

    ``what`` prefixes the error, for example ``"echo: invalid request"``.
    ``extra="ignore"`` is how a client reads a reply or an event: map keys
    the models do not declare (a newer server's) are ignored, at any depth,
    and every declared field is checked as strictly as ever. Without it
    they are refused, as the models say (``extra="forbid"``).
    """
    try:
        # The core validator, not TypeAdapter.validate_python: same result, less Python.
        return adapter.validator.validate_python(
            item, strict=True, by_alias=True, by_name=False, extra=extra
        )
    except ValidationError as exc:
        raise DecodeError(f"{what}: {describe_validation(exc)}") from None


def describe_validation(exc: ValidationError) -> str:
    """The first few errors, then how many more: an error reply stays small."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    parts = []
    for error in errors[:_MAX_ERRORS]:
        where = ".".join(str(part) for part in error["loc"])
        text = f"{where}: {error['msg']}" if where else error["msg"]
        parts.append(text if len(text) <= _MAX_ERROR_TEXT else text[:_MAX_ERROR_TEXT] + "...")
    if len(errors) > _MAX_ERRORS:
        parts.append(f"and {len(errors) - _MAX_ERRORS} more errors")
    return "; ".join(parts)
