"""Client plans do exactly what Method.encode_params and Method.decode_result do.

Frames are compared byte for byte with ``encode_request(wire_name,
encode_params(params))``; reply decoding is compared outcome for outcome with
``decode_result``: the same value, or the same exception with the same text,
on generated, arbitrary and mutated bodies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import (
    BaseModel,
    Field,
    PlainSerializer,
    ValidationError,
    field_serializer,
)

from timer_sdk.calling import plans as client_plan
from timer_sdk.calling.plans import Plan, plan
from timer_sdk.models import (
    INT64_MAX,
    INT64_MIN,
    ComplexParams,
    EchoParams,
    EchoRequest,
    EchoResponse,
    Int64,
    TimerModel,
)
from timer_sdk.wire import api
from timer_sdk.wire.codec import DecodeError
from timer_sdk.wire.framing import encode_request

from .test_properties import PARAMS, RESULTS, SLOW, _mutate, arbitrary_payloads, edits


def reference_frame(method: api.Method[Any, Any], params: BaseModel) -> bytes:
    return encode_request(method.wire_name, method.encode_params(params))


def outcome(fn: Callable[[], object]) -> tuple[str, object]:
    """What ``fn`` did: its value with its type, or its exception's type and text."""
    try:
        value = fn()
    except Exception as exc:
        return ("raised", (type(exc), str(exc)))
    return ("returned", (type(value), value))


def test_plans_are_made_once() -> None:
    assert plan(api.ECHO) is plan(api.ECHO)
    assert repr(plan(api.ECHO)) == "<Plan echo>"


def test_methods_made_per_call_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cache of its own: filling the process's cache would leave later tests uncached.
    monkeypatch.setattr(client_plan, "_plans", {})
    made = [api.Method(f"m{i}", EchoParams, EchoResponse, api.ECHO.invoke) for i in range(100)]
    for method in made:
        assert plan(method).name == method.name
    assert len(client_plan._plans) == client_plan._MAX_PLANS
    assert plan(made[-1]) is not plan(made[-1])  # past the bound: made, never kept


# --- request frames --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PARAMS))
@SLOW
@given(data=st.data())
def test_frames_are_the_reference_bytes(name: str, data: st.DataObject) -> None:
    method = api.METHODS[name]
    params = data.draw(PARAMS[name])
    expected = reference_frame(method, params)
    assert plan(method).frame(params) == expected
    values = [getattr(params, field) for field in method.params.model_fields]
    assert plan(method).frame_of(*values) == expected


def test_echo_frames_are_generated() -> None:
    # The one fast path the benchmark measures: it must not quietly fall back.
    assert plan(api.ECHO)._encode is not None
    assert plan(api.VERSION)._empty_frame == encode_request(b"version", b"\xa0")


class _SubRequest(EchoRequest):
    pass


def _odd_requests() -> list[Any]:
    """Values of the wrong type, or models whose fields were never validated."""
    return [
        _SubRequest(message="sub", delay_ms=1),
        EchoRequest.model_construct(message=5, delay_ms=0),  # type: ignore[arg-type]
        EchoRequest.model_construct(message="m", delay_ms=True),
        EchoRequest.model_construct(message="m", delay_ms=2**70),
        EchoRequest.model_construct(message="m", delay_ms=None),  # type: ignore[arg-type]
        EchoRequest(message="\ud800", delay_ms=0),  # not encodable as UTF-8
        {"message": "m", "delayMs": 0},
        None,
    ]


@pytest.mark.parametrize("req", _odd_requests(), ids=repr)
def test_odd_values_take_the_reference_path(req: Any) -> None:
    def reference() -> bytes:
        return reference_frame(api.ECHO, EchoParams(req=req))

    expected = outcome(reference)
    assert outcome(lambda: plan(api.ECHO).frame_of(req)) == expected
    if isinstance(req, EchoRequest):  # an envelope can hold it
        params = EchoParams.model_construct(req=req)
        expected = outcome(lambda: reference_frame(api.ECHO, params))
        assert outcome(lambda: plan(api.ECHO).frame(params)) == expected


def test_a_wrong_envelope_type_is_encoded_as_before() -> None:
    other = ComplexParams.model_construct(req=EchoRequest(message="m", delay_ms=0))  # type: ignore[arg-type]
    assert plan(api.ECHO).frame(other) == reference_frame(api.ECHO, other)  # type: ignore[arg-type]


def test_a_missing_value_is_the_envelope_s_error() -> None:
    with pytest.raises(ValueError, match="shorter"):
        plan(api.SCHEDULE).frame_of(None)


# A made-up method with every shape the generator writes: nested models,
# optional scalars present and absent, booleans.
class _Leaf(TimerModel):
    text: str
    count: Int64
    flag: bool | None = None


class _Branch(TimerModel):
    leaf: _Leaf
    note: str | None = None
    size_hint: Int64


class _Envelope(TimerModel):
    branch: _Branch
    other: _Leaf


_CUSTOM = api.Method("custom", _Envelope, str, api.VERSION.invoke)  # type: ignore[arg-type]
_ints = st.integers(INT64_MIN, INT64_MAX)
# Through lambdas: builds() would fill in the camelCase names of the signature too.
_leaves = st.builds(
    lambda t, c, f: _Leaf(text=t, count=c, flag=f),
    st.text(max_size=30),
    _ints,
    st.none() | st.booleans(),
)
_branches = st.builds(
    lambda leaf, note, size: _Branch(leaf=leaf, note=note, size_hint=size),
    _leaves,
    st.none() | st.text(max_size=30),
    _ints,
)


@SLOW
@given(branch=_branches, other=_leaves)
def test_generated_frames_of_nested_optional_fields(branch: _Branch, other: _Leaf) -> None:
    assert plan(_CUSTOM)._encode is not None
    envelope = _Envelope(branch=branch, other=other)
    assert plan(_CUSTOM).frame_of(branch, other) == reference_frame(_CUSTOM, envelope)
    assert plan(_CUSTOM).frame(envelope) == reference_frame(_CUSTOM, envelope)


def test_an_optional_field_of_the_wrong_type_takes_the_reference_path() -> None:
    leaf = _Leaf.model_construct(text="t", count=3, flag="no")  # type: ignore[arg-type]
    envelope = _Envelope.model_construct(branch=_Branch(leaf=leaf, size_hint=1), other=leaf)
    with pytest.warns(UserWarning, match="serializ"):
        expected = reference_frame(_CUSTOM, envelope)
    with pytest.warns(UserWarning, match="serializ"):
        assert plan(_CUSTOM).frame(envelope) == expected


class _Shouted(TimerModel):
    text: str

    @field_serializer("text")
    def _shout(self, value: str) -> str:
        return value.upper()


class _Excluded(TimerModel):
    text: str
    secret: str = Field(default="s", exclude=True)


class _Serialized(TimerModel):
    count: Annotated[int, PlainSerializer(lambda v: v * 2)]


class _Either(TimerModel):
    value: str | int


class _EitherEnvelope(TimerModel):
    inner: _Either


class _ShoutedEnvelope(TimerModel):
    inner: _Shouted


class _ExcludedEnvelope(TimerModel):
    inner: _Excluded


class _SerializedEnvelope(TimerModel):
    inner: _Serialized


class _ShoutingEnvelope(TimerModel):
    inner: _Leaf

    @field_serializer("inner")
    def _shout(self, value: _Leaf) -> dict[str, Any]:
        return {"text": value.text.upper()}


@pytest.mark.parametrize(
    "params",
    [
        _ShoutingEnvelope(inner=_Leaf(text="t", count=1)),
        _ShoutedEnvelope(inner=_Shouted(text="t")),
        _ExcludedEnvelope(inner=_Excluded(text="t")),
        _SerializedEnvelope(inner=_Serialized(count=2)),
        _EitherEnvelope(inner=_Either(value=3)),
    ],
    ids=lambda params: type(params).__name__,
)
def test_fields_the_generator_does_not_know_take_the_reference_path(params: Any) -> None:
    method = api.Method("odd", type(params), str, api.VERSION.invoke)
    assert plan(method)._encode is None
    assert plan(method).frame(params) == reference_frame(method, params)
    assert plan(method).frame_of(params.inner) == reference_frame(method, params)


def test_the_envelope_is_validated_when_it_must_be_built() -> None:
    with pytest.raises(ValidationError) as expected:
        EchoParams(req=3)  # type: ignore[arg-type]
    with pytest.raises(ValidationError) as got:
        plan(api.ECHO).frame_of(3)
    assert str(got.value) == str(expected.value)


# --- reply decoding --------------------------------------------------------------


def _same_decode(method: api.Method[Any, Any], body: bytes) -> None:
    ours: Plan[Any, Any] = plan(method)
    assert outcome(lambda: ours.decode_result(body)) == outcome(lambda: method.decode_result(body))


@pytest.mark.parametrize("name", sorted(RESULTS))
@SLOW
@given(data=st.data())
def test_valid_replies_decode_as_the_reference(name: str, data: st.DataObject) -> None:
    method = api.METHODS[name]
    body = method.encode_result(data.draw(RESULTS[name]))
    _same_decode(method, body)
    assert plan(method).decode_result(body) == method.decode_result(body)


@pytest.mark.parametrize("name", sorted(RESULTS))
@SLOW
@given(data=st.data(), changes=edits)
def test_mutated_replies_decode_or_fail_as_the_reference(
    name: str, data: st.DataObject, changes: list[tuple[int, int, int]]
) -> None:
    method = api.METHODS[name]
    _same_decode(method, _mutate(method.encode_result(data.draw(RESULTS[name])), changes))


@SLOW
@given(body=arbitrary_payloads, name=st.sampled_from(sorted(api.METHODS)))
def test_arbitrary_replies_decode_or_fail_as_the_reference(body: bytes, name: str) -> None:
    _same_decode(api.METHODS[name], body)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        cbor2.dumps({"echoed": "e", "timerName": "t"}) + b"\x00",  # two items
        cbor2.dumps(cbor2.CBORTag(1, 0)),  # a tag: cbor2 would make a datetime
        cbor2.dumps({"echoed": "e", "timer_name": "t"}),  # by name, not by alias
        cbor2.dumps({"echoed": b"e", "timerName": "t", "x": 1}),  # known fields still checked
        b"\xa2\x66echoed\x61e\x66echoed\x61e",  # a duplicate key
        b"\xbf\xff",  # an indefinite map
    ],
)
@pytest.mark.parametrize("name", ["echo", "version"])
def test_refused_replies_fail_with_the_reference_text(body: bytes, name: str) -> None:
    method = api.METHODS[name]
    with pytest.raises(DecodeError) as expected:
        method.decode_result(body)
    with pytest.raises(DecodeError) as got:
        plan(method).decode_result(body)
    assert str(got.value) == str(expected.value)
    assert str(got.value).startswith(f"{name}: invalid reply")


def test_reply_fields_a_newer_server_added_are_ignored_by_both() -> None:
    body = cbor2.dumps({"echoed": "e", "timerName": "t", "x": 1, "y": {"z": [1]}})
    expected = EchoResponse(echoed="e", timer_name="t")
    assert api.ECHO.decode_result(body) == expected
    assert plan(api.ECHO).decode_result(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        *(cbor2.dumps("v" * n) for n in (0, 1, 23, 24, 25, 255, 256, 1000)),
        cbor2.dumps("é" * 12),  # 24 bytes of UTF-8 in 12 characters
        b"\x63\xff\xfe\xfd",  # a short text that is not UTF-8
        b"\x78\x18" + b"\xed\xa0\x80" * 8,  # encoded surrogates: not UTF-8 either
        b"\x78\x19" + b"v" * 24,  # a length one more than the bytes
        b"\x78\x17" + b"v" * 23,  # 23 in the long form: cbor2 takes it, exactly one item
        b"\x61",  # truncated
        b"\x78",
        b"\x62vvv",  # a byte after the item
    ],
)
def test_text_replies_decode_as_the_reference(body: bytes) -> None:
    _same_decode(api.VERSION, body)
