"""The fast path and the reference strict path agree on every payload.

The reference is the API's own composition: ``Method.decode_params`` (a fresh
strict decode per call), the proc run as a coroutine, and
``encode_reply(RET_OK, Method.encode_result(result))``. The fast path is the
server's plan (plans.py). For hostile inputs, random mutations of valid
payloads and arbitrary CBOR, both must accept or refuse alike, with the same
error text, and answer with the same bytes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from timer_sdk import _eager
from timer_sdk.errors import CallError
from timer_sdk.models import EchoRequest, EchoResponse, TimerConfig
from timer_sdk.serving.plans import plan
from timer_sdk.timer import Timer
from timer_sdk.wire import api
from timer_sdk.wire.codec import DecodeError, StrictDecoder
from timer_sdk.wire.framing import RET_OK, encode_reply

from .vectors import ECHO_PAYLOAD

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = [(16, 4096), (3, 6)]  # the defaults, and small ones that many payloads cross
TIMER = Timer(TimerConfig(name="planned"))

VALID: dict[str, list[Any]] = {
    "version": [{}, None],
    "echo": [
        {"req": {"message": "hi", "delayMs": 0}},
        {"req": {"message": "x" * 300, "delayMs": -5}},
        {"req": {"message": "ünïcødé", "delayMs": -(2**63)}},
    ],
    "complex": [
        {"req": {"messages": [{"message": "a", "delayMs": 1}], "tags": ["t"], "note": "n",
                 "retries": 2}},
        {"req": {"messages": [], "tags": []}},
    ],
    "schedule": [
        {"job": {"name": "j", "payload": ["p"], "priority": 1},
         "retry": {"maxAttempts": 3, "backoffMs": 100, "retryOn": ["e"]},
         "schedule": {"startAtMs": 5, "intervalMs": 1000, "jitter": -3}},
        {"job": {"name": "", "payload": [], "priority": 0},
         "retry": {"maxAttempts": 1, "backoffMs": 0, "retryOn": []},
         "schedule": {"startAtMs": 2**63 - 1, "intervalMs": 0, "jitter": 1}},
    ],
}  # fmt: skip


def _payload(item: Any) -> bytes:
    return b"" if item is None else cbor2.dumps(item)


SEEDS = [(name, _payload(item)) for name, items in VALID.items() for item in items]


def _reference(method: api.Method[Any, Any], payload: bytes, depth: int, items: int) -> Any:
    try:
        params = method.decode_params(payload, max_depth=depth, max_items=items)
        outcome = _eager.start(method.invoke(TIMER, params))
        if type(outcome) is _eager.Suspended:
            outcome.coro.close()
            return "suspended"
        return encode_reply(RET_OK, method.encode_result(outcome))
    except (DecodeError, CallError) as exc:
        return (type(exc).__name__, str(exc))


def _fast(method: api.Method[Any, Any], payload: bytes, depth: int, items: int) -> Any:
    answer = plan(method, TIMER, StrictDecoder(depth), items)
    try:
        outcome = answer(payload)
    except (DecodeError, CallError) as exc:
        return (type(exc).__name__, str(exc))
    if type(outcome) is _eager.Suspended:
        outcome.coro.close()
        return "suspended"
    return outcome


def _agree(name: str, payload: bytes) -> None:
    method = api.METHODS[name]

    async def both() -> None:  # a proc that waits needs a running loop to start
        for depth, items in LIMITS:
            fast = _fast(method, payload, depth, items)
            assert fast == _reference(method, payload, depth, items)

    with asyncio.Runner() as runner:
        runner.run(both())


@pytest.mark.parametrize(("name", "payload"), SEEDS)
def test_valid_payloads_get_the_same_bytes(name: str, payload: bytes) -> None:
    reply = _fast(api.METHODS[name], payload, 16, 4096)
    assert isinstance(reply, bytes) or reply[0] == "CallError"  # these are all answered
    _agree(name, payload)


_mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "cut", "insert", "delete"]), st.integers(0, 10_000),
              st.integers(0, 255)),
    min_size=1, max_size=4,
)  # fmt: skip


def _mutate(payload: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(payload)
    for kind, where, value in edits:
        at = where % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << (value % 8)
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = bytes((value,))
        elif kind == "delete" and at < len(data):
            del data[at]
    return bytes(data)


@SETTINGS
@given(seed=st.sampled_from(SEEDS), edits=_mutations, method=st.sampled_from(list(api.METHODS)))
@example(seed=("echo", ECHO_PAYLOAD), edits=[("cut", 10, 0)], method="echo")
def test_mutated_payloads_get_the_same_answer(
    seed: tuple[str, bytes], edits: list[tuple[str, int, int]], method: str
) -> None:
    _agree(method, _mutate(seed[1], edits))


_keys = st.sampled_from(["req", "message", "delayMs", "delay_ms", "messages", "tags", "note",
                         "retries", "job", "retry", "schedule", "name", "x"])  # fmt: skip
_leaves = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8)
    | st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 3, 24, 258, 55799]), st.integers())
)  # fmt: skip
_items = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=30,
)


@SETTINGS
@given(item=_items, method=st.sampled_from(list(api.METHODS)))
def test_arbitrary_cbor_gets_the_same_answer(item: Any, method: str) -> None:
    _agree(method, cbor2.dumps(item))


@SETTINGS
@given(data=st.binary(max_size=64), method=st.sampled_from(list(api.METHODS)))
@example(data=b"\xa0\x00", method="version")
@example(data=b"\xa0", method="echo")
def test_arbitrary_bytes_get_the_same_answer(data: bytes, method: str) -> None:
    _agree(method, data)


async def test_a_proc_that_must_wait_suspends_on_both_paths() -> None:
    payload = cbor2.dumps({"req": {"message": "later", "delayMs": 5}})
    assert _fast(api.ECHO, payload, 16, 4096) == "suspended"
    assert _reference(api.ECHO, payload, 16, 4096) == "suspended"


async def test_a_subclass_override_is_called_not_bypassed() -> None:
    class Shouting(Timer):
        async def echo(self, req: EchoRequest) -> EchoResponse:
            await asyncio.sleep(0)
            return EchoResponse(echoed=req.message.upper(), timer_name=self.name)

    answer = plan(api.ECHO, Shouting(), StrictDecoder(), 4096)
    outcome = answer(cbor2.dumps({"req": {"message": "hi", "delayMs": 0}}))
    assert type(outcome) is _eager.Suspended  # the override ran, as a coroutine

    async def rest() -> EchoResponse:  # as the server awaits it: inside a coroutine
        assert type(outcome) is _eager.Suspended
        result: EchoResponse = await _eager.resume(outcome)
        return result

    result = await asyncio.get_running_loop().create_task(rest())
    assert result == EchoResponse(echoed="HI", timer_name="ipc-server")


# Every way a request can be wrong in shape, for every method, with the error text the
# caller reads: checked against the text itself, not only against the reference path.
_ECHO = {"message": "hi", "delayMs": 0}
_JOB = {"name": "", "payload": [], "priority": 0}
_RETRY = {"maxAttempts": 1, "backoffMs": 0, "retryOn": []}
_SCHEDULE = {"startAtMs": 0, "intervalMs": 0, "jitter": 1}
REFUSED: list[tuple[str, Any, str]] = [
    # wrong type (what a lax validator would coerce: "1", 1.0, True)
    ("version", [], "Input should be a valid dictionary or instance of VersionParams"),
    ("echo", {"req": {**_ECHO, "message": 1}}, "req.message: Input should be a valid string"),
    ("echo", {"req": {**_ECHO, "delayMs": "1"}}, "req.delayMs: Input should be a valid integer"),
    ("echo", {"req": {**_ECHO, "delayMs": 1.0}}, "req.delayMs: Input should be a valid integer"),
    ("echo", {"req": {**_ECHO, "delayMs": True}}, "req.delayMs: Input should be a valid integer"),
    ("complex", {"req": {"messages": "a", "tags": []}},
     "req.messages: Input should be a valid list"),
    ("complex", {"req": {"messages": [], "tags": [1]}},
     "req.tags.0: Input should be a valid string"),
    ("complex", {"req": {"messages": [], "tags": [], "retries": "2"}},
     "req.retries: Input should be a valid integer"),
    ("schedule", {"job": {**_JOB, "name": 1}, "retry": _RETRY, "schedule": _SCHEDULE},
     "job.name: Input should be a valid string"),
    ("schedule", {"job": _JOB, "retry": {**_RETRY, "maxAttempts": "1"}, "schedule": _SCHEDULE},
     "retry.maxAttempts: Input should be a valid integer"),
    # missing field
    ("echo", {}, "req: Field required"),
    ("echo", {"req": {"delayMs": 0}}, "req.message: Field required"),
    ("echo", {"req": {"message": "hi"}}, "req.delayMs: Field required"),
    ("complex", {"req": {"tags": []}}, "req.messages: Field required"),
    ("complex", {"req": {"messages": [{"message": "a"}], "tags": []}},
     "req.messages.0.delayMs: Field required"),
    ("schedule", {"job": _JOB, "retry": _RETRY}, "schedule: Field required"),
    ("schedule", {"job": _JOB, "retry": {"maxAttempts": 1, "backoffMs": 0},
                  "schedule": _SCHEDULE}, "retry.retryOn: Field required"),
    # extra field (a Python name instead of the wire's camelCase is one too)
    ("version", {"x": 1}, "x: Extra inputs are not permitted"),
    ("echo", {"req": _ECHO, "x": 1}, "x: Extra inputs are not permitted"),
    ("echo", {"req": {**_ECHO, "x": 1}}, "req.x: Extra inputs are not permitted"),
    ("echo", {"req": {"message": "hi", "delay_ms": 0}},
     "req.delayMs: Field required; req.delay_ms: Extra inputs are not permitted"),
    ("complex", {"req": {"messages": [], "tags": [], "x": 1}},
     "req.x: Extra inputs are not permitted"),
    ("schedule", {"job": {**_JOB, "x": 1}, "retry": _RETRY, "schedule": _SCHEDULE},
     "job.x: Extra inputs are not permitted"),
    ("schedule", {"job": _JOB, "retry": _RETRY, "schedule": _SCHEDULE, "x": 2},
     "x: Extra inputs are not permitted"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "item", "error"), REFUSED)
def test_a_request_of_the_wrong_shape_is_refused_with_what_is_wrong(
    name: str, item: Any, error: str
) -> None:
    expected = ("DecodeError", f"{name}: invalid request: {error}")
    payload = cbor2.dumps(item)
    assert _fast(api.METHODS[name], payload, 16, 4096) == expected
    assert _reference(api.METHODS[name], payload, 16, 4096) == expected


def test_every_method_has_each_kind_of_refusal() -> None:
    for name in api.METHODS:
        errors = [error for method, _, error in REFUSED if method == name]
        assert any("Extra inputs" in e for e in errors), name
        if api.METHODS[name].empty_params is None:  # a method with fields to get wrong
            assert any("Field required" in e for e in errors), name
            assert any("valid" in e for e in errors), name
