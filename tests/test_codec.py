"""The strict CBOR edge: what the schema never uses is refused, with a clear message."""

from __future__ import annotations

import sys

import cbor2
import pytest

from timer_sdk.models import EchoParams, EchoRequest
from timer_sdk.wire import api
from timer_sdk.wire.codec import (
    _BUILTIN_TAGS,
    DecodeError,
    StrictDecoder,
    _decode_error,
    decode_item,
)

from .vectors import ECHO_PAYLOAD


def test_decodes_the_vector() -> None:
    params = api.ECHO.decode_params(ECHO_PAYLOAD)
    assert params == EchoParams(req=EchoRequest(message="hello over the wire", delay_ms=5))


def test_client_encoding_matches_the_vector() -> None:
    params = EchoParams(req=EchoRequest(message="hello over the wire", delay_ms=5))
    assert api.ECHO.encode_params(params) == ECHO_PAYLOAD


@pytest.mark.parametrize("tag", [*_BUILTIN_TAGS, 6, 99, 1000, 65536, 2**40])
def test_every_tag_is_refused(tag: int) -> None:
    with pytest.raises(DecodeError, match=f"CBOR tag {tag} is not allowed"):
        decode_item(cbor2.dumps(cbor2.CBORTag(tag, 5)))


def test_bignum_cannot_smuggle_a_small_int() -> None:
    payload = cbor2.dumps({"req": {"message": "x", "delayMs": cbor2.CBORTag(2, b"\x05")}})
    with pytest.raises(DecodeError, match=r"echo: invalid request: invalid CBOR: CBOR tag 2"):
        api.ECHO.decode_params(payload)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x9f\x01\xff", "indefinite"),
        (b"\x7f\x61a\xff", "indefinite"),
        (b"\xa2\x61a\x01\x61a\x02", "Duplicate map key"),
        (b"\xa1\x01\x02", "invalid CBOR"),  # non-string key
        (b"\x81" * 40 + b"\x01", "nesting depth"),
        (b"\xa0\x01", "exactly one CBOR item; 1 bytes follow"),
        (b"\x82\x01", "truncated"),
        (b"\x62\xff\xfe", "invalid CBOR"),  # invalid UTF-8 text
        (b"\x1c", "invalid CBOR"),  # reserved additional info
    ],
)
def test_malformed_cbor_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_item(data)


@pytest.mark.parametrize(
    ("envelope", "message"),
    [
        ({}, "echo: invalid request: req: Field required"),
        ({"req": {"message": "x"}}, "echo: invalid request: req.delayMs: Field required"),
        (
            {"req": {"message": "x", "delay_ms": 1}},
            "req.delay_ms: Extra inputs are not permitted",
        ),
        ({"req": {"message": "x", "delayMs": "5"}}, "req.delayMs: Input should be a valid int"),
        (
            {"req": {"message": "x", "delayMs": True}},
            "req.delayMs: Input should be a valid integer",
        ),
        ({"req": {"message": "x", "delayMs": 1.5}}, "req.delayMs: Input should be a valid integer"),
        ({"req": {"message": 7, "delayMs": 1}}, "req.message: Input should be a valid string"),
        (
            {"req": {"message": "x", "delayMs": 2**63}},
            "req.delayMs: Input should be less than or equal to 9223372036854775807",
        ),
        (
            {"req": {"message": "x", "delayMs": -(2**63) - 1}},
            "req.delayMs: Input should be greater than or equal to -9223372036854775808",
        ),
        ({"req": {"message": "x", "delayMs": 1}, "zz": 0}, "zz: Extra inputs are not permitted"),
    ],
)
def test_schema_violations_name_method_and_field(envelope: object, message: str) -> None:
    with pytest.raises(DecodeError) as info:
        api.ECHO.decode_params(cbor2.dumps(envelope))
    assert message in str(info.value)
    assert str(info.value).startswith("echo: invalid request")


def test_int64_bounds_are_accepted() -> None:
    for value in (2**63 - 1, -(2**63)):
        params = api.ECHO.decode_params(cbor2.dumps({"req": {"message": "", "delayMs": value}}))
        assert params.req.delay_ms == value


def test_non_minimal_encodings_from_other_languages_are_fine() -> None:
    # A 4-byte length for a 3-byte string and an 8-byte int: valid CBOR, not minimal.
    payload = b"\xa1\x63req\xa2\x7a\x00\x00\x00\x07message\x61x\x67delayMs\x1b" + (5).to_bytes(8)
    assert api.ECHO.decode_params(payload).req == EchoRequest(message="x", delay_ms=5)


def test_version_accepts_empty_map_and_empty_payload() -> None:
    assert api.VERSION.decode_params(b"\xa0") == api.VERSION.decode_params(b"")


def test_optionals_accept_absent_and_null_and_are_omitted_when_encoding() -> None:
    base: dict[str, object] = {"messages": [], "tags": []}
    absent = api.COMPLEX.decode_params(cbor2.dumps({"req": base}))
    null = api.COMPLEX.decode_params(cbor2.dumps({"req": {**base, "note": None, "retries": None}}))
    assert absent == null
    assert absent.req.note is None
    assert cbor2.loads(api.COMPLEX.encode_params(absent)) == {"req": base}


def test_bad_reply_is_a_decode_error_naming_the_method() -> None:
    with pytest.raises(DecodeError, match=r"echo: invalid reply: timerName: Field required"):
        api.ECHO.decode_result(cbor2.dumps({"echoed": "x"}))


def test_a_failed_decode_leaves_nothing_behind_for_the_next() -> None:
    # Decoders are reused per thread; an error mid-item must not leak depth or state.
    for bad in (b"\x81" * 40 + b"\x01", b"\x82\x81\xc2\x41\x05", b"\x82\x81\x9f", b"\xa1\x61a"):
        with pytest.raises(DecodeError):
            decode_item(bad)
    assert decode_item(b"\x81" * 16 + b"\x01") == [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]
    assert api.ECHO.decode_params(ECHO_PAYLOAD).req.delay_ms == 5


@pytest.mark.parametrize(
    "bad",
    [
        b"\x82\x01",  # truncated
        b"\x9f\x01\xff",  # refused partway
        b"\x82\x01\xc2\x41\x05",  # a tag after an item was read
        b"\x82" + cbor2.dumps("x" * 10_000)[:-1],  # truncated past the decoder's read-ahead
    ],
)
def test_a_reused_decoder_forgets_a_failed_item(bad: bytes) -> None:
    # The server reuses one decoder: read-ahead left by a failure must not leak
    # into the next payload, or the same bytes would decode differently.
    decoder = StrictDecoder()
    good = cbor2.dumps({"req": {"message": "hello", "delayMs": 1}})
    for _ in range(3):
        with pytest.raises(DecodeError):
            decoder.decode(bad)
        assert decoder.decode(good) == {"req": {"message": "hello", "delayMs": 1}}
        assert decoder.decode(b"\x01") == 1


def test_a_reused_decoder_keeps_no_large_payload_alive() -> None:
    # Small payloads may stay in its 4 KiB read-ahead until the next decode.
    decoder = StrictDecoder()
    payload = cbor2.dumps("x" * 100_000)
    decoder.decode(payload)
    assert sys.getrefcount(payload) == 2  # ours, and getrefcount's argument


def test_failures_outside_cbor_keep_their_own_type() -> None:
    # The decoder is reset whatever went wrong; only CBOR failures become DecodeError.
    assert str(_decode_error(RecursionError())) == "invalid CBOR: nested too deeply"
    interrupt = KeyboardInterrupt()
    assert _decode_error(interrupt) is interrupt
