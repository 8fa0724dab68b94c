"""Generated reply encoders write exactly the bytes of the generic path."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from timer_sdk import models
from timer_sdk.models import INT64_MAX, INT64_MIN
from timer_sdk.wire import codec
from timer_sdk.wire.encoders import _generic, frame_encoder, scalar_field
from timer_sdk.wire.framing import RET_OK, encode_reply

FLAT = [
    model
    for model in vars(models).values()
    if isinstance(model, type)
    and issubclass(model, models.TimerModel)
    and model.model_fields
    and all(scalar_field(f.annotation) for f in model.model_fields.values())
]

_VALUES = {
    str: st.text(max_size=300),
    int: st.integers(INT64_MIN, INT64_MAX),
    bool: st.booleans(),
}


def _instances(model: type[BaseModel]) -> st.SearchStrategy[BaseModel]:
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, info in model.model_fields.items():
        kind = scalar_field(info.annotation)
        assert kind is not None
        values = _VALUES[kind[0]]
        fields[name] = st.none() | values if kind[1] else values
    return st.fixed_dictionaries(fields).map(lambda kwargs: model(**kwargs))


def test_the_results_of_the_api_get_generated_encoders() -> None:
    assert {models.EchoResponse, models.ComplexResponse, models.ScheduleResult} <= set(FLAT)
    assert models.ScheduleConfig in FLAT  # an optional, bounded int: Int64 | None
    for model in FLAT:
        assert frame_encoder(model) is not _generic, model


@pytest.mark.parametrize("model", FLAT, ids=lambda m: m.__name__)
@given(data=st.data())
def test_generated_frames_are_the_generic_frames(model: type[BaseModel], data: Any) -> None:
    value = data.draw(_instances(model))
    expected = encode_reply(RET_OK, codec.encode_model(value))
    assert frame_encoder(model)(value) == expected


@given(st.text(max_size=100_000))
def test_a_str_result_is_a_cbor_text(value: str) -> None:
    assert frame_encoder(str)(value) == encode_reply(RET_OK, codec.encode_item(value))


@pytest.mark.parametrize(
    "n", [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, 2**64, 2**80]
)
@pytest.mark.parametrize("sign", [1, -1])
def test_every_integer_width_and_bignums_match_cbor2(n: int, sign: int) -> None:
    # Models bound ints to 64 bits; a result built without validation may not be.
    event = models.EchoEvent.model_construct(message="m", echo_count=sign * n)
    assert frame_encoder(models.EchoEvent)(event) == _generic(event)


def test_models_with_nested_fields_take_the_generic_path() -> None:
    assert frame_encoder(models.ComplexRequest) is _generic
    request = models.ComplexRequest(messages=[], tags=["a"], note=None, retries=3)
    assert frame_encoder(models.ComplexRequest)(request) == encode_reply(
        RET_OK, codec.encode_model(request)
    )


class _Choice(BaseModel):
    either: int | str


def test_other_types_take_the_generic_path() -> None:
    assert frame_encoder(_Choice) is _generic  # a union of two kinds
    assert frame_encoder(list[int]) is _generic  # neither a scalar nor a model
    assert frame_encoder(list[int])([1, 2]) == encode_reply(RET_OK, codec.encode_item([1, 2]))
    assert frame_encoder(_Choice)(_Choice(either="x")) == encode_reply(
        RET_OK, codec.encode_model(_Choice(either="x"))
    )
