"""The server's hot path: one plan per method, built once per server.

A plan answers one request payload with its whole reply frame. It does what
the reference path does, step for step and with the same strictness:
``Method.decode_params``, then the proc, then ``encode_reply(RET_OK,
Method.encode_result(result))``. It is that path with the layers folded into
one closure: the server's own reused decoder, pydantic's core validator
called directly, a proc that will not wait called as a plain function (no
coroutine), and the generated frame encoder of :mod:`~timer_sdk.wire.encoders`.

``tests/test_plans.py`` runs hostile and mutated payloads through both and
demands the same accept or refuse, the same error text and the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from .. import _eager
from ..wire.api import Method, Procs, is_native
from ..wire.codec import (
    DecodeError,
    StrictDecoder,
    check_items,
    decoded_size,
    describe_validation,
)

__all__ = ["Plan", "plan"]

Plan = Callable[[bytes], "bytes | _eager.Suspended"]
"""A payload in; its success frame, or a proc that suspended (to finish in a Task).

Raises :class:`DecodeError` for a bad request, and whatever the proc raises.
"""


def plan(method: Method[Any, Any], timer: Procs, decoder: StrictDecoder, max_items: int) -> Plan:
    """Build ``method``'s plan for ``timer``, decoding with ``decoder``."""
    name = method.name
    empty = method.empty_params
    decode = decoder.decode
    depth = decoder.max_depth
    validate = method.params_validator.validate_python
    encode = method.encode_frame
    invoke = method.invoke
    # A subclass that overrides a proc gets its override, called as a coroutine.
    call_now = method.call_now if is_native(timer, name) else None

    def answer(payload: bytes) -> bytes | _eager.Suspended:
        item: Any = None
        if empty is not None and (not payload or payload == b"\xa0"):
            params = empty
        else:
            try:
                if len(payload) > max_items:  # each entry takes a byte at least
                    check_items(payload, max_items, depth)  # before cbor2 builds the item
                item = decode(payload) if payload else {}
                params = validate(item, strict=True, by_alias=True, by_name=False)
            except DecodeError as exc:
                raise DecodeError(f"{name}: invalid request: {exc}") from None
            except ValidationError as exc:
                raise DecodeError(f"{name}: invalid request: {describe_validation(exc)}") from None
        if call_now is not None:
            result = call_now(timer, params)
            if result is not None:
                return encode(result)
        outcome = _eager.start(invoke(timer, params))
        if type(outcome) is not _eager.Suspended:
            return encode(outcome)
        if item is not None:
            outcome.held = decoded_size(item)  # what it holds while it runs, not its bytes
        return outcome

    answer.__qualname__ = f"plan.<{name}>"
    return answer
