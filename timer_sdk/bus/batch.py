"""The NATS bus's message payloads: several events in one message.

Publishing costs the same per message whatever it holds, so the publisher
sends the events that piled up since it last ran as one message: a CBOR array
of event frame bodies, each encoded once when its event fired and joined
behind the array head here, never decoded and encoded again. One event alone
goes as its body, and a marker as an empty payload (see
:mod:`timer_sdk.bus.nats_backend` for the headers and the sequence).
"""

from __future__ import annotations

from collections import deque

from ..models import EchoEvent
from ..wire.api import validate_event
from ..wire.codec import DecodeError, decode_item
from ..wire.encoders import cbor_head, cbor_int, cbor_text

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_EVENTS",
    "batch_length",
    "decode_batch",
    "encode_echo_event",
    "take_batch",
]

MAX_BATCH_EVENTS = 256
"""Events in one message at most."""
MAX_BATCH_BYTES = 512 * 1024
"""Bytes of event bodies in one message at most (less if the NATS server allows less)."""
_ARRAY = 0x80  # CBOR major type 4
_EVENT_HEAD = b"".join(
    (b"\xa2", cbor_text("event"), cbor_text("on_echo_fired"), cbor_text("data"), b"\xa2")
)
_MESSAGE_KEY = cbor_text("message")
_COUNT_KEY = cbor_text("echoCount")


def encode_echo_event(event: EchoEvent) -> bytes:
    """``api.encode_event("on_echo_fired", event)``, byte for byte, at a third of its cost.

    Every echo of a worker pays it; the generic path builds two dicts first.
    """
    return b"".join(
        (
            _EVENT_HEAD,
            _MESSAGE_KEY,
            cbor_text(event.message),
            _COUNT_KEY,
            cbor_int(event.echo_count),
        )
    )


def take_batch(outbox: deque[tuple[int, bytes]], max_bytes: int) -> tuple[int, bytes]:
    """Pop the next message off a non-empty outbox: its ``Timer-Seq`` and payload.

    It takes the events that follow one another in the sequence, up to
    :data:`MAX_BATCH_EVENTS` and ``max_bytes`` of bodies (the first one goes
    even if larger); a hole or a marker ends it. A marker goes alone.
    """
    seq, body = outbox.popleft()
    if not body or not outbox:
        return seq, body
    parts = [b"", body]  # parts[0]: the array head, once the count is known
    size = len(body)
    while outbox and len(parts) <= MAX_BATCH_EVENTS:
        next_seq, next_body = outbox[0]
        if next_seq != seq + 1 or not next_body or size + len(next_body) > max_bytes:
            break
        outbox.popleft()
        parts.append(next_body)
        size += len(next_body)
        seq = next_seq
    if len(parts) == 2:
        return seq, body  # one event: its body alone, as before batches
    parts[0] = cbor_head(_ARRAY, len(parts) - 1)
    return seq, b"".join(parts)


def batch_length(payload: bytes) -> int:
    """How many events a payload carries, from its first bytes alone.

    For a receiver with no one to hand the events to: the sequence needs the
    count, not the events. Raises :class:`~timer_sdk.wire.codec.DecodeError`.
    """
    if not payload:
        return 0  # a marker
    if payload[0] >> 5 != _ARRAY >> 5:
        return 1  # not an array: one event body
    info = payload[0] & 0x1F
    if info < 24:
        n = info
    elif info == 24 and len(payload) > 1:
        n = payload[1]
    elif info == 25 and len(payload) > 2:
        n = int.from_bytes(payload[1:3], "big")
    else:
        raise DecodeError(f"invalid batch: array head {payload[:3].hex()}")
    if not 0 < n <= MAX_BATCH_EVENTS:
        raise DecodeError(f"invalid batch: {n} events, expected 1 to {MAX_BATCH_EVENTS}")
    return n


def decode_batch(payload: bytes) -> list[EchoEvent]:
    """Decode a non-empty payload strictly: one event body, or an array of them.

    Raises :class:`~timer_sdk.wire.codec.DecodeError` for anything else, so that
    the message is refused whole.
    """
    n = batch_length(payload)
    item = decode_item(payload)
    if not isinstance(item, list):
        return [validate_event(item)]
    events = []
    for i, body in enumerate(item):
        try:
            events.append(validate_event(body))
        except DecodeError as exc:
            raise DecodeError(f"event {i + 1} of {n}: {exc}") from None
    return events
