"""Sans-I/O framing: bytes in, frames out, and frames to bytes.

No I/O and no asyncio here. A reader owns one receive buffer (a
``bytearray``); a driver feeds it with :meth:`receive_data` and takes whole
frames out with :meth:`next_event` until it returns ``None``. A reader never
raises on bad input: it returns :class:`Broken` once and ignores everything
after it, and the driver closes the connection.

Wire format (protocol.md, all integers big-endian)::

    request:  [u32 method_len][method: UTF-8][u32 payload_len][payload: one CBOR item]
    reply:    [i32 ret][u32 body_len][body]

Each length is checked against its limit *before* the bytes it announces are
buffered, so a hostile prefix of ``0xFFFFFFFF`` allocates nothing. The frames
of the hot path are NamedTuples: as immutable as a frozen dataclass, and
several times cheaper to create.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_METHOD_LENGTH",
    "RET_ERROR",
    "RET_EVENT",
    "RET_EVENTS_DROPPED",
    "RET_GOAWAY",
    "RET_OK",
    "Broken",
    "Rejected",
    "Reply",
    "ReplyReader",
    "Request",
    "RequestReader",
    "encode_error",
    "encode_reply",
    "encode_request",
]

RET_OK = 0
RET_ERROR = 1
# 2 and 3 are reserved by the reference family. The event extension uses these,
# only on connections that asked for events (docs/protocol.md).
RET_EVENT = 16
RET_EVENTS_DROPPED = 17
# The close notice: only on connections that asked for it with ``server.goaway``.
RET_GOAWAY = 18

DEFAULT_MAX_FRAME_SIZE = 1 << 20
DEFAULT_MAX_METHOD_LENGTH = 256

_U32 = struct.Struct(">I")
_REPLY_HEAD = struct.Struct(">iI")
_unpack_u32 = _U32.unpack_from
_unpack_reply_head = _REPLY_HEAD.unpack_from
_pack_u32 = _U32.pack
_pack_reply_head = _REPLY_HEAD.pack
_new_request = tuple.__new__  # a NamedTuple's own __new__ is a Python function


def encode_request(method: bytes, payload: bytes) -> bytes:
    """Return one request frame, ready for a single write."""
    return b"".join((_pack_u32(len(method)), method, _pack_u32(len(payload)), payload))


def encode_reply(ret: int, body: bytes) -> bytes:
    """Return one reply frame, ready for a single write."""
    return _pack_reply_head(ret, len(body)) + body


def encode_error(message: str) -> bytes:
    """Return one error reply frame: the message as UTF-8 text."""
    return encode_reply(RET_ERROR, message.encode())


NOT_TLS = "this server speaks the plain timer protocol, not TLS: use tcp:, not tls:"
"""Why a plain listener closes a connection that opened with a TLS handshake."""


class Request(NamedTuple):
    """A whole request frame."""

    method: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """A request frame that cannot be served but leaves the stream in sync.

    The driver answers it with an error reply carrying ``message``, in order.
    """

    method: str
    message: str


class Reply(NamedTuple):
    """A whole reply frame (or an extension frame with another ``ret``)."""

    ret: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Broken:
    """The stream can no longer be trusted; the driver closes the connection."""

    message: str
    answer: bool = False
    """Send ``message`` to the peer as an error reply before closing."""


class _Reader:
    """The receive buffer shared by both readers."""

    __slots__ = ("_broken", "_buf", "_pos", "_skip", "max_frame_size")

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        # bytes when a read began with nothing kept (frames slice out with one copy);
        # a bytearray while a partial frame grows, so appends stay amortised O(1).
        self._buf: bytes | bytearray = b""
        self._pos = 0  # start of the first unread frame in _buf
        self._skip = 0  # bytes of a refused frame still to drop as they arrive
        self._broken = False

    def receive_data(self, data: bytes | memoryview) -> None:
        """Append bytes read from the peer."""
        if self._broken:
            return
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        buf = self._buf
        pos = self._pos
        if pos == len(buf):
            self._buf = bytes(data)
        elif isinstance(buf, bytes):
            self._buf = bytearray(buf[pos:]) + data
        else:
            del buf[:pos]
            buf += data
        self._pos = 0

    @property
    def in_frame(self) -> bool:
        """Whether part of a frame has arrived and the rest has not."""
        return not self._broken and (self._skip > 0 or len(self._buf) > self._pos)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buf) - self._pos

    def _break(self, message: str, *, answer: bool = False) -> Broken:
        self._broken = True
        self._buf = b""
        self._pos = 0
        return Broken(message, answer)


class RequestReader(_Reader):
    """Server side: split the receive buffer into request frames."""

    __slots__ = ("max_method_length",)

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_method_length: int = DEFAULT_MAX_METHOD_LENGTH,
    ) -> None:
        super().__init__(max_frame_size)
        self.max_method_length = max_method_length

    def next_event(self) -> Request | Rejected | Broken | None:
        """Return the next whole frame, or ``None`` until more bytes arrive."""
        events = self.take(1)
        return events[0] if events else None

    def take(self, limit: int) -> list[Request | Rejected | Broken]:
        """Return up to ``limit`` whole frames, in order; a :class:`Broken` ends them.

        One call per batch, not per frame: a read of pipelined requests is
        split in one loop.
        """
        events: list[Request | Rejected | Broken] = []
        if self._broken:
            return events
        buf = self._buf
        pos = self._pos
        size = len(buf)
        copy = type(buf) is not bytes  # a bytearray's slices are bytearrays
        max_method_length = self.max_method_length
        while size - pos >= 4 and len(events) < limit:
            (method_len,) = _unpack_u32(buf, pos)
            if method_len > max_method_length:
                events.append(self._bad_method_length(method_len))
                return events
            payload_at = pos + 8 + method_len
            if size < payload_at:
                break
            (payload_len,) = _unpack_u32(buf, payload_at - 4)
            if payload_len > self.max_frame_size:
                method = bytes(buf[pos + 4 : payload_at - 4]).decode("utf-8", "replace")
                # Drop the payload as it streams in instead of buffering it.
                here = min(size - payload_at, payload_len)
                pos = payload_at + here
                self._skip = payload_len - here
                events.append(
                    Rejected(
                        method,
                        f"frame too large: payload of {payload_len} bytes exceeds the limit "
                        f"of {self.max_frame_size} bytes",
                    )
                )
                continue
            end = payload_at + payload_len
            if size < end:
                break
            raw_method = buf[pos + 4 : payload_at - 4]
            payload = buf[payload_at:end]
            pos = end
            if copy:
                raw_method = bytes(raw_method)
                payload = bytes(payload)
            try:
                events.append(_new_request(Request, (raw_method.decode(), payload)))
            except UnicodeDecodeError:
                method = raw_method.decode("utf-8", "replace")
                events.append(Rejected(method, "method name is not valid UTF-8"))
        if pos == size:
            # All taken: free the buffer now, not at the next read. A connection that
            # waits holds nothing uncharged (its requests are copies).
            self._buf = b""
            pos = 0
        self._pos = pos
        return events

    def _bad_method_length(self, method_len: int) -> Broken:
        if method_len >> 16 == 0x1603:  # a TLS record: handshake (22), version 3.x
            # Answered in plain bytes, so that the client's TLS layer fails with
            # "wrong version number" rather than a reset it cannot tell apart.
            return self._break(NOT_TLS, answer=True)
        # Nothing past this can be trusted: an HTTP client's "GET " lands here.
        return self._break(
            f"method name of {method_len} bytes exceeds the limit of {self.max_method_length} bytes"
        )

    @property
    def frame_needs(self) -> int:
        """Bytes still to come of the frame at the head of the buffer; 0 if none is partial.

        Before its header is whole, what the longest header could still need.
        """
        buf = self._buf
        pos = self._pos
        have = len(buf) - pos
        if self._broken or self._skip or not have:
            return 0
        if have < 4:
            return 8 + self.max_method_length - have
        (method_len,) = _unpack_u32(buf, pos)
        payload_at = 8 + method_len
        if have < payload_at:
            return payload_at - have if method_len <= self.max_method_length else 0
        (payload_len,) = _unpack_u32(buf, pos + payload_at - 4)
        if payload_len > self.max_frame_size:
            return 0  # refused when taken; its payload is skipped, not held
        needs: int = payload_at + payload_len - have
        return max(needs, 0)

    def abandon_frame(self) -> str | None:
        """Give up the partial frame: free what is buffered of it, skip the rest.

        Returns its method name, for an error reply that keeps the stream in
        sync, or ``None`` (nothing abandoned) when its header has not all
        arrived or no frame is partial.
        """
        buf = self._buf
        pos = self._pos
        size = len(buf)
        if self._broken or size - pos < 4:
            return None
        (method_len,) = _unpack_u32(buf, pos)
        payload_at = pos + 8 + method_len
        if size < payload_at:
            return None
        (payload_len,) = _unpack_u32(buf, payload_at - 4)
        have = size - payload_at
        if have >= payload_len:
            return None  # whole: it is the driver's to take, not to abandon
        method = bytes(buf[pos + 4 : payload_at - 4]).decode("utf-8", "replace")
        self._buf = b""
        self._pos = 0
        self._skip = payload_len - have
        return method

    def give_up(self) -> None:
        """Take nothing more: drop what is buffered, and everything that arrives."""
        self._skip = 0
        self._break("")


class ReplyReader(_Reader):
    """Client side: split the receive buffer into reply frames."""

    __slots__ = ()

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        super().__init__(max_frame_size)

    def next_event(self) -> Reply | Broken | None:
        """Return the next whole frame, or ``None`` until more bytes arrive."""
        if self._broken:
            return None
        buf = self._buf
        pos = self._pos
        size = len(buf)
        if size - pos < 8:
            return None
        ret, body_len = _unpack_reply_head(buf, pos)
        if body_len > self.max_frame_size:
            return self._break(
                f"reply body of {body_len} bytes exceeds the limit of {self.max_frame_size} bytes"
            )
        end = pos + 8 + body_len
        if size < end:
            return None
        self._pos = end
        return Reply(ret, bytes(buf[pos + 8 : end]))
