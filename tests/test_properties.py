"""Property tests of the sans-I/O core: framing and codec, on generated and arbitrary bytes.

The framing properties compare the readers with a tiny reference model of the
wire format (what each frame must turn into under the configured limits), so
a round trip is checked event by event, split at arbitrary points. Arbitrary
bytes may produce any frames, but never an exception, never anything but the
reader's own event types, and never a buffer larger than one frame.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from timer_sdk.models import (
    INT64_MAX,
    INT64_MIN,
    ComplexParams,
    ComplexRequest,
    ComplexResponse,
    EchoParams,
    EchoRequest,
    EchoResponse,
    JobSpec,
    RetryPolicy,
    ScheduleConfig,
    ScheduleParams,
    ScheduleResult,
    VersionParams,
)
from timer_sdk.wire import api
from timer_sdk.wire.codec import DEFAULT_MAX_DEPTH, DecodeError, decode_item, encode_item
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

# No deadline: the machine is shared, and a slow example is not a wrong one.
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U32_MAX = 2**32 - 1


def feed(reader: RequestReader | ReplyReader, data: bytes, cuts: list[int]) -> list[object]:
    """Feed ``data`` in pieces split at ``cuts``, draining events after each piece."""
    events: list[object] = []
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        reader.receive_data(data[start:end])
        while (event := reader.next_event()) is not None:
            events.append(event)
    return events


def expected_requests(
    frames: list[tuple[bytes, bytes]], max_frame_size: int, max_method_length: int
) -> list[object]:
    """Return what a correct reader yields for ``frames``: the reference model."""
    events: list[object] = []
    for method, payload in frames:
        if len(method) > max_method_length:
            events.append("broken")
            return events  # nothing after a break is trusted
        shown = method.decode("utf-8", "replace")
        if len(payload) > max_frame_size:
            events.append(
                Rejected(
                    shown,
                    f"frame too large: payload of {len(payload)} bytes exceeds the limit of "
                    f"{max_frame_size} bytes",
                )
            )
            continue
        try:
            events.append(Request(method.decode(), payload))
        except UnicodeDecodeError:
            events.append(Rejected(shown, "method name is not valid UTF-8"))
    return events


def normalise(events: list[object]) -> list[object]:
    return ["broken" if isinstance(e, Broken) else e for e in events]


methods = st.one_of(
    st.sampled_from([b"version", b"echo", b"complex", b"schedule", b"", b"\xff\xfe"]),
    st.text(max_size=12).map(str.encode),
    st.binary(max_size=40),
)
payloads = st.binary(max_size=96)
cut_points = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


# --- framing: round trips under limits ----------------------------------------


@FAST
@given(frames=st.lists(st.tuples(methods, payloads), max_size=8), cuts=cut_points)
def test_request_round_trip_at_arbitrary_splits(
    frames: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    data = b"".join(encode_request(m, p) for m, p in frames)
    reader = RequestReader(max_frame_size=1 << 20, max_method_length=256)
    assert normalise(feed(reader, data, cuts)) == expected_requests(frames, 1 << 20, 256)
    assert reader.buffered == 0
    assert not reader.in_frame


@FAST
@given(
    frames=st.lists(st.tuples(methods, payloads), max_size=8),
    cuts=cut_points,
    max_frame_size=st.integers(min_value=0, max_value=64),
    max_method_length=st.integers(min_value=0, max_value=24),
)
def test_request_limits_match_the_model_at_arbitrary_splits(
    frames: list[tuple[bytes, bytes]],
    cuts: list[int],
    max_frame_size: int,
    max_method_length: int,
) -> None:
    data = b"".join(encode_request(m, p) for m, p in frames)
    reader = RequestReader(max_frame_size=max_frame_size, max_method_length=max_method_length)
    expected = expected_requests(frames, max_frame_size, max_method_length)
    assert normalise(feed(reader, data, cuts)) == expected
    if "broken" not in expected:
        # Refused payloads were skipped as they streamed in: the stream is in sync.
        assert reader.buffered == 0
        assert not reader.in_frame


@FAST
@given(
    replies=st.lists(
        st.tuples(st.integers(min_value=-(2**31), max_value=2**31 - 1), payloads), max_size=8
    ),
    cuts=cut_points,
)
def test_reply_round_trip_at_arbitrary_splits(
    replies: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    data = b"".join(encode_reply(ret, body) for ret, body in replies)
    reader = ReplyReader()
    assert feed(reader, data, cuts) == [Reply(ret, body) for ret, body in replies]
    assert reader.buffered == 0


@FAST
@given(
    replies=st.lists(st.tuples(st.integers(-5, 20), payloads), min_size=1, max_size=6),
    limit=st.integers(min_value=0, max_value=64),
    cuts=cut_points,
)
def test_reply_over_the_limit_breaks_and_nothing_follows(
    replies: list[tuple[int, bytes]], limit: int, cuts: list[int]
) -> None:
    data = b"".join(encode_reply(ret, body) for ret, body in replies)
    reader = ReplyReader(max_frame_size=limit)
    expected: list[object] = []
    for ret, body in replies:
        if len(body) > limit:
            expected.append("broken")
            break
        expected.append(Reply(ret, body))
    assert normalise(feed(reader, data, cuts)) == expected


# --- framing: arbitrary bytes ---------------------------------------------------


@FAST
@given(
    chunks=st.lists(st.binary(max_size=64), max_size=12),
    max_frame_size=st.integers(min_value=0, max_value=128),
    max_method_length=st.integers(min_value=0, max_value=32),
)
def test_request_reader_survives_arbitrary_bytes(
    chunks: list[bytes], max_frame_size: int, max_method_length: int
) -> None:
    reader = RequestReader(max_frame_size=max_frame_size, max_method_length=max_method_length)
    broken = False
    for chunk in chunks:
        reader.receive_data(chunk)
        while (event := reader.next_event()) is not None:
            assert not broken, "an event after Broken"
            assert type(event) in (Request, Rejected, Broken)
            if isinstance(event, Request):
                assert len(event.method.encode()) <= max_method_length
                assert len(event.payload) <= max_frame_size
            broken = isinstance(event, Broken)
        # What stays buffered is less than one whole frame: memory is bounded by the limits.
        assert reader.buffered < 8 + max_method_length + max_frame_size


@FAST
@given(
    chunks=st.lists(st.binary(max_size=64), max_size=12),
    max_frame_size=st.integers(min_value=0, max_value=128),
)
def test_reply_reader_survives_arbitrary_bytes(chunks: list[bytes], max_frame_size: int) -> None:
    reader = ReplyReader(max_frame_size=max_frame_size)
    broken = False
    for chunk in chunks:
        reader.receive_data(chunk)
        while (event := reader.next_event()) is not None:
            assert not broken, "an event after Broken"
            assert type(event) in (Reply, Broken)
            if isinstance(event, Reply):
                assert len(event.body) <= max_frame_size
            broken = isinstance(event, Broken)
        assert reader.buffered < 8 + max_frame_size


@FAST
@given(
    method_len=st.integers(min_value=0, max_value=U32_MAX),
    payload_len=st.integers(min_value=0, max_value=U32_MAX),
    tail=st.binary(max_size=32),
)
def test_hostile_length_prefixes_allocate_nothing(
    method_len: int, payload_len: int, tail: bytes
) -> None:
    reader = RequestReader(max_frame_size=1024, max_method_length=16)
    method = b"m" * min(method_len, 16)
    head = method_len.to_bytes(4, "big") + method + payload_len.to_bytes(4, "big")
    reader.receive_data(head + tail)
    events = []
    while (event := reader.next_event()) is not None:
        events.append(event)
    assert reader.buffered <= len(head) + len(tail)
    assert reader.buffered < 8 + 16 + 1024
    if method_len > 16:
        assert [type(e) for e in events] == [Broken]
    elif payload_len > 1024:
        assert isinstance(events[0], Rejected)
        assert "frame too large" in events[0].message


# --- codec: arbitrary bytes only ever raise DecodeError ------------------------


def _nested(depth: int) -> st.SearchStrategy[Any]:
    """Plain CBOR values nested at most ``depth`` containers deep."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**64), max_value=2**64 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=12),
        st.binary(max_size=12),
    )
    if depth == 0:
        return leaves
    inner = _nested(depth - 1)
    return st.one_of(
        leaves,
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=6), inner, max_size=4),
    )


cbor_values = _nested(4)


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply byte edits: 0 flips, 1 inserts, 2 deletes, 3 truncates."""
    buf = bytearray(data)
    for kind, where, value in edits:
        at = where % (len(buf) + 1)
        if kind == 0 and at < len(buf):
            buf[at] ^= value or 1
        elif kind == 1:
            buf.insert(at, value)
        elif kind == 2 and at < len(buf):
            del buf[at]
        elif kind == 3:
            del buf[at:]
    return bytes(buf)


edits = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 1000), st.integers(0, 255)), min_size=1, max_size=4
)
arbitrary_payloads = st.one_of(
    st.binary(max_size=200),
    st.builds(_mutate, cbor_values.map(cbor2.dumps), edits),
    # Tags, indefinite lengths and reserved bytes spliced into valid items.
    st.builds(
        lambda prefix, value: prefix + cbor2.dumps(value),
        st.sampled_from(
            [
                b"\xc0",
                b"\xc1",
                b"\xc2",
                b"\xd9\xd9\xf7",
                b"\x9f",
                b"\x7f",
                b"\xbf",
                b"\x1c",
                b"\xff",
                b"\xfc",
                b"\x81" * 40,
            ]
        ),
        cbor_values,
    ),
)


@SLOW
@given(data=arbitrary_payloads)
def test_decode_item_raises_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_item(data)


@SLOW
@given(data=arbitrary_payloads, method=st.sampled_from(sorted(api.METHODS)))
def test_decode_params_raises_only_decode_error(data: bytes, method: str) -> None:
    target = api.METHODS[method]
    try:
        target.decode_params(data)
    except DecodeError as exc:
        message = str(exc)
    else:
        return
    assert message.startswith(f"{method}: invalid request")


@SLOW
@given(data=arbitrary_payloads, method=st.sampled_from(sorted(api.METHODS)))
def test_decode_result_raises_only_decode_error(data: bytes, method: str) -> None:
    target = api.METHODS[method]
    try:
        target.decode_result(data)
    except DecodeError as exc:
        message = str(exc)
    else:
        return
    assert message.startswith(f"{method}: invalid reply")


@FAST
@given(value=cbor_values)
def test_plain_values_round_trip(value: object) -> None:
    assert decode_item(encode_item(value)) == value


@FAST
@given(depth=st.integers(min_value=1, max_value=40), as_map=st.booleans())
def test_nesting_deeper_than_the_limit_is_refused(depth: int, as_map: bool) -> None:
    data = (b"\xa1\x61k" if as_map else b"\x81") * depth + b"\x00"
    if depth <= DEFAULT_MAX_DEPTH:
        decode_item(data)
    else:
        with pytest.raises(DecodeError, match="nesting depth"):
            decode_item(data)


@FAST
@given(tag=st.integers(min_value=0, max_value=2**64 - 1), value=cbor_values)
def test_every_tag_is_refused(tag: int, value: object) -> None:
    with pytest.raises(DecodeError, match=f"CBOR tag {tag} is not allowed"):
        decode_item(cbor2.dumps(cbor2.CBORTag(tag, value)))


@FAST
@given(value=st.integers(min_value=-(2**64), max_value=2**64 - 1))
def test_int64_bounds_are_exact(value: int) -> None:
    payload = cbor2.dumps({"req": {"message": "m", "delayMs": value}})
    if INT64_MIN <= value <= INT64_MAX:
        assert api.ECHO.decode_params(payload).req.delay_ms == value
    else:
        with pytest.raises(DecodeError, match=r"req\.delayMs"):
            api.ECHO.decode_params(payload)


# --- codec: every model round trips --------------------------------------------

int64 = st.one_of(
    st.sampled_from([INT64_MIN, INT64_MIN + 1, -1, 0, 1, INT64_MAX - 1, INT64_MAX]),
    st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
)
texts = st.text(max_size=20)  # hypothesis's text has no lone surrogates, as UTF-8 needs
echo_requests = st.builds(lambda m, d: EchoRequest(message=m, delay_ms=d), texts, int64)
complex_requests = st.builds(
    lambda msgs, tags, note, retries: ComplexRequest(
        messages=msgs, tags=tags, note=note, retries=retries
    ),
    st.lists(echo_requests, max_size=4),
    st.lists(texts, max_size=4),
    st.none() | texts,
    st.none() | int64,
)
jobs = st.builds(
    lambda n, p, pr: JobSpec(name=n, payload=p, priority=pr),
    texts,
    st.lists(texts, max_size=3),
    int64,
)
retries = st.builds(
    lambda a, b, r: RetryPolicy(max_attempts=a, backoff_ms=b, retry_on=r),
    int64,
    int64,
    st.lists(texts, max_size=3),
)
schedules = st.builds(
    lambda s, i, j: ScheduleConfig(start_at_ms=s, interval_ms=i, jitter=j),
    int64,
    int64,
    st.none() | int64,
)

PARAMS: dict[str, st.SearchStrategy[Any]] = {
    "version": st.just(VersionParams()),
    "echo": st.builds(lambda r: EchoParams(req=r), echo_requests),
    "complex": st.builds(lambda r: ComplexParams(req=r), complex_requests),
    "schedule": st.builds(
        lambda j, r, s: ScheduleParams(job=j, retry=r, schedule=s), jobs, retries, schedules
    ),
}
RESULTS: dict[str, st.SearchStrategy[Any]] = {
    "version": texts,
    "echo": st.builds(lambda e, t: EchoResponse(echoed=e, timer_name=t), texts, texts),
    "complex": st.builds(
        lambda s, n, h: ComplexResponse(summary=s, item_count=n, has_note=h),
        texts,
        int64,
        st.booleans(),
    ),
    "schedule": st.builds(
        lambda j, w, f, e: ScheduleResult(
            job_id=j, will_run_count=w, first_run_at_ms=f, effective_backoff_ms=e
        ),
        texts,
        int64,
        int64,
        int64,
    ),
}


def test_every_method_has_strategies() -> None:
    assert set(PARAMS) == set(RESULTS) == set(api.METHODS)


@pytest.mark.parametrize("name", sorted(PARAMS))
@SLOW
@given(data=st.data())
def test_params_round_trip_through_a_frame(name: str, data: st.DataObject) -> None:
    method = api.METHODS[name]
    params = data.draw(PARAMS[name])
    frame = encode_request(method.wire_name, method.encode_params(params))
    reader = RequestReader()
    reader.receive_data(frame)
    event = reader.next_event()
    assert isinstance(event, Request)
    assert event.method == name
    decoded = method.decode_params(event.payload)
    assert decoded == params
    assert type(decoded) is type(params)
    # Optionals that are None are omitted, never sent as null.
    assert not _has_null(cbor2.loads(event.payload))


def _has_null(item: object) -> bool:
    if isinstance(item, dict):
        return any(_has_null(v) for v in item.values())
    if isinstance(item, list):
        return any(_has_null(v) for v in item)
    return item is None


@pytest.mark.parametrize("name", sorted(RESULTS))
@SLOW
@given(data=st.data())
def test_results_round_trip_through_a_frame(name: str, data: st.DataObject) -> None:
    method = api.METHODS[name]
    result = data.draw(RESULTS[name])
    reader = ReplyReader()
    reader.receive_data(encode_reply(0, method.encode_result(result)))
    event = reader.next_event()
    assert isinstance(event, Reply)
    assert method.decode_result(event.body) == result


@SLOW
@given(params=PARAMS["echo"], extra=st.text(min_size=1, max_size=8))
def test_an_unknown_field_is_refused_by_name(params: EchoParams, extra: str) -> None:
    assume(extra not in ("message", "delayMs"))
    wire = cbor2.loads(api.ECHO.encode_params(params))
    wire["req"][extra] = 1
    with pytest.raises(DecodeError, match="Extra inputs are not permitted"):
        api.ECHO.decode_params(cbor2.dumps(wire))


@FAST
@given(
    frames=st.lists(st.tuples(methods, payloads), max_size=10),
    cuts=cut_points,
    takes=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=14),
    max_frame_size=st.integers(min_value=0, max_value=64),
    max_method_length=st.integers(min_value=0, max_value=24),
)
def test_taking_a_few_frames_per_read_matches_the_model(
    frames: list[tuple[bytes, bytes]],
    cuts: list[int],
    takes: list[int],
    max_frame_size: int,
    max_method_length: int,
) -> None:
    # The server takes at most its quantum and in-flight room per read, so whole
    # frames may still be buffered when the next read lands on top of them.
    data = b"".join(encode_request(m, p) for m, p in frames)
    reader = RequestReader(max_frame_size=max_frame_size, max_method_length=max_method_length)
    events: list[object] = []
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        reader.receive_data(data[start:end])
        limit = takes[i % len(takes)]
        batch = reader.take(limit)
        assert len(batch) <= limit
        events.extend(batch)
    while batch := reader.take(3):
        events.extend(batch)
    assert normalise(events) == expected_requests(frames, max_frame_size, max_method_length)
