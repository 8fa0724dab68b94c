"""The sans-I/O framing: whole, byte by byte, with trailing bytes, and at its limits."""

from __future__ import annotations

import pytest

from timer_sdk.wire.framing import (
    Broken,
    Rejected,
    Reply,
    ReplyReader,
    Request,
    RequestReader,
    encode_reply,
    encode_request,
)

from .vectors import ECHO_REQUEST


def drain(reader: RequestReader | ReplyReader) -> list[object]:
    events: list[object] = []
    while (event := reader.next_event()) is not None:
        events.append(event)
    return events


def test_encode_request_matches_vector() -> None:
    payload = ECHO_REQUEST[12:]
    assert encode_request(b"echo", payload) == ECHO_REQUEST


def test_whole_frame() -> None:
    reader = RequestReader()
    reader.receive_data(ECHO_REQUEST)
    assert drain(reader) == [Request("echo", ECHO_REQUEST[12:])]
    assert not reader.in_frame


def test_every_split_point() -> None:
    for cut in range(len(ECHO_REQUEST) + 1):
        reader = RequestReader()
        reader.receive_data(ECHO_REQUEST[:cut])
        first = drain(reader)
        reader.receive_data(ECHO_REQUEST[cut:])
        assert first + drain(reader) == [Request("echo", ECHO_REQUEST[12:])], cut


def test_one_byte_at_a_time() -> None:
    reader = RequestReader()
    events: list[object] = []
    for i in range(len(ECHO_REQUEST)):
        assert (reader.in_frame) == (i > 0)
        reader.receive_data(ECHO_REQUEST[i : i + 1])
        events += drain(reader)
    assert events == [Request("echo", ECHO_REQUEST[12:])]


def test_trailing_bytes_wait_for_the_next_frame() -> None:
    reader = RequestReader()
    reader.receive_data(ECHO_REQUEST * 3 + ECHO_REQUEST[:5])
    assert len(drain(reader)) == 3
    assert reader.in_frame
    assert reader.buffered == 5
    reader.receive_data(ECHO_REQUEST[5:])
    assert len(drain(reader)) == 1


def test_empty_payload_and_empty_method() -> None:
    reader = RequestReader()
    reader.receive_data(encode_request(b"version", b"") + encode_request(b"", b"\xa0"))
    assert drain(reader) == [Request("version", b""), Request("", b"\xa0")]


def test_oversized_payload_is_rejected_and_skipped_without_buffering() -> None:
    reader = RequestReader(max_frame_size=10)
    big = encode_request(b"echo", b"x" * 1000)
    reader.receive_data(big[:20])
    [event] = drain(reader)
    assert isinstance(event, Rejected)
    assert event.method == "echo"
    assert "1000 bytes exceeds the limit of 10" in event.message
    for i in range(20, len(big), 7):  # the rest streams in and is dropped
        reader.receive_data(big[i : i + 7])
        assert reader.buffered == 0
    reader.receive_data(encode_request(b"version", b"\xa0"))
    assert drain(reader) == [Request("version", b"\xa0")]


def test_huge_length_prefix_allocates_nothing() -> None:
    reader = RequestReader()
    reader.receive_data(b"\x00\x00\x00\x04echo\xff\xff\xff\xff")
    [event] = drain(reader)
    assert isinstance(event, Rejected)
    assert str(0xFFFFFFFF) in event.message
    assert reader.buffered == 0


def test_oversized_method_name_breaks_the_stream() -> None:
    reader = RequestReader()
    reader.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    [event] = drain(reader)
    assert isinstance(event, Broken)
    assert "exceeds the limit of 256" in event.message
    reader.receive_data(ECHO_REQUEST)
    assert drain(reader) == []  # nothing after a break is trusted


def test_invalid_utf8_method_keeps_the_stream_in_sync() -> None:
    reader = RequestReader()
    reader.receive_data(encode_request(b"\xff\xfe", b"\xa0") + ECHO_REQUEST)
    first, second = drain(reader)
    assert isinstance(first, Rejected)
    assert first.message == "method name is not valid UTF-8"
    assert second == Request("echo", ECHO_REQUEST[12:])


@pytest.mark.parametrize("ret", [0, 1, -1, 2**31 - 1])
def test_reply_round_trip_every_split(ret: int) -> None:
    frame = encode_reply(ret, b"\x66echoed")
    for cut in range(len(frame) + 1):
        reader = ReplyReader()
        reader.receive_data(frame[:cut])
        events = drain(reader)
        reader.receive_data(frame[cut:])
        assert events + drain(reader) == [Reply(ret, b"\x66echoed")]


def test_reply_over_limit_breaks() -> None:
    reader = ReplyReader(max_frame_size=4)
    reader.receive_data(encode_reply(0, b"12345"))
    [event] = drain(reader)
    assert isinstance(event, Broken)
