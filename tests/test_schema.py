"""The exported schemas agree with the docs, the captured vectors and the server."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cbor2
import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

from timer_sdk.tools import schema
from timer_sdk.wire.api import METHODS

from . import vectors

PROTOCOL = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


def validator(name: str) -> Draft202012Validator:
    """A validator for ``#/$defs/<name>`` of the exported JSON Schema."""
    document = schema.json_schema()
    Draft202012Validator.check_schema(document)
    return Draft202012Validator({**document, "$ref": f"#/$defs/{name}"})


def doc_vectors() -> dict[str, bytes]:
    """The hex vectors of docs/protocol.md, by label ("echo request", ...)."""
    block = PROTOCOL.split("## Test vectors", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    found: dict[str, bytes] = {}
    label = ""
    for line in block.splitlines():
        match = re.fullmatch(r"(\w+ (?:request|response))?\s+((?:[0-9a-f]{2} ?)+)", line)
        if match is None:
            continue  # a decoded note in parentheses
        label = match.group(1) or label
        found[label] = found.get(label, b"") + bytes.fromhex(match.group(2))
    return found


def split_request(frame: bytes) -> tuple[str, bytes]:
    size = int.from_bytes(frame[:4], "big")
    method = frame[4 : 4 + size].decode()
    payload_size = int.from_bytes(frame[4 + size : 8 + size], "big")
    payload = frame[8 + size :]
    assert len(payload) == payload_size
    return method, payload


def test_the_docs_vectors_are_the_tests_vectors() -> None:
    assert doc_vectors() == {
        "version request": vectors.VERSION_REQUEST,
        "version response": vectors.VERSION_REPLY_OF_REFERENCE,
        "echo request": vectors.ECHO_REQUEST,
        "echo response": vectors.ECHO_REPLY,
    }


@pytest.mark.parametrize("frame", [vectors.VERSION_REQUEST, vectors.ECHO_REQUEST])
def test_every_captured_request_validates(frame: bytes) -> None:
    method, payload = split_request(frame)
    item = cbor2.loads(payload)
    validator(f"{method}-request").validate(item)
    METHODS[method].decode_params(payload)  # and the server agrees


@pytest.mark.parametrize(
    ("method", "frame"),
    [("version", vectors.VERSION_REPLY_OF_REFERENCE), ("echo", vectors.ECHO_REPLY)],
)
def test_every_captured_reply_validates(method: str, frame: bytes) -> None:
    assert frame[:4] == b"\0\0\0\0"  # ret 0
    validator(f"{method}-reply").validate(cbor2.loads(frame[8:]))


@pytest.mark.parametrize(
    ("name", "item"),
    [
        ("echo-request", {"req": {"message": "hi", "delay_ms": 5}}),  # snake_case
        ("echo-request", {"req": {"message": "hi", "delayMs": 5, "extra": 1}}),
        ("echo-request", {"req": {"message": "hi", "delayMs": "5"}}),
        ("echo-request", {"req": {"message": "hi", "delayMs": 2**63}}),
        ("echo-request", {"req": {"message": "hi"}}),
        ("version-request", {"x": 1}),
        ("schedule-request", {"job": {"name": "j", "payload": [], "priority": 1}}),
        ("echo-reply", {"echoed": "x", "timer_name": "t"}),
        ("event-frame", {"event": "on_echo_fired", "data": {"message": "m", "echo_count": 1}}),
        ("events-dropped-frame", {"dropped": 0}),
        ("events-dropped-frame", {"dropped": 1, "gap": "cut off"}),
        ("events-dropped-frame", {"dropped": 0, "gap": 1}),
    ],
)
def test_a_wrong_payload_does_not_validate(name: str, item: Any) -> None:
    assert not validator(name).is_valid(item)


def test_every_example_validates_in_both_the_schema_and_the_server() -> None:
    for name, method in METHODS.items():
        example = schema.example(method.params)
        validator(f"{name}-request").validate(example)
        method.validate_params(example)


def test_extension_frames_validate() -> None:
    validator("event-frame").validate(
        {"event": "on_echo_fired", "data": {"message": "m", "echoCount": 1}}
    )
    validator("events-dropped-frame").validate({"dropped": 3})
    validator("events-dropped-frame").validate({"dropped": 0, "gap": "cut off from the bus"})
    validator("events.subscribe-request").validate({"events": ["on_echo_fired"]})
    validator("events.subscribe-request").validate({})
    validator("events.unsubscribe-reply").validate(None)


def test_the_docs_method_table_is_the_generated_one() -> None:
    assert schema.method_table() in PROTOCOL


def test_the_docs_cddl_is_the_generated_one() -> None:
    assert f"```cddl\n{schema.cddl()}```" in PROTOCOL


def test_the_cddl_declares_every_method_and_every_model() -> None:
    rules = dict(
        line.split(" = ", 1)
        for line in schema.cddl().splitlines()
        if " = " in line and line[0] != ";"
    )
    for name, method in METHODS.items():
        assert f"{name}-request" in rules and f"{name}-reply" in rules
        wire = [info.alias or field for field, info in method.params.model_fields.items()]
        assert all(f"{key}:" in rules[f"{name}-request"] for key in wire)
    # Every type the method rules name is defined.
    used = set(re.findall(r"\b[A-Z]\w+", " ".join(rules.values())))
    assert used <= set(rules), used - set(rules)
    # The docs table lists exactly the methods of the CDDL.
    table = re.findall(r"^\| `([\w.]+)` \|", schema.method_table(), re.MULTILINE)
    assert (
        table
        == [rule[: -len("-request")] for rule in rules if rule.endswith("-request")][: len(METHODS)]
    )


def test_the_docs_stand_alone() -> None:
    assert "shared/" not in PROTOCOL
