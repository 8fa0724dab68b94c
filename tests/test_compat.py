"""``timer-sdk compat``: every difference between two APIs, judged for both directions.

The rules are checked on APIs declared as the SDK declares its own (Pydantic
models, described and written as JSON Schema by the same code as ``timer-sdk
schema``), on nim-ffi's real evolution of the timer (built by editing a copy of
this API's JSON Schema), and on the API published in ``docs/api.json``, which a
change to the models must not break unless the file is published again.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import Field, create_model

from timer_sdk import Timer
from timer_sdk.models import INT64_MAX, INT64_MIN, Int64, TimerModel
from timer_sdk.tools import compat, schema
from timer_sdk.tools.compat import BREAKING, IF_USED, SAFE, Change
from timer_sdk.tools.compat_values import Document, subset, words
from timer_sdk.wire.description import describe

from . import _apis

PUBLISHED = Path(__file__).resolve().parent.parent / "docs" / "api.json"
PUBLISH = "timer-sdk schema --format json-schema > docs/api.json"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "timer_sdk", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def one(changes: list[Change], subject: str) -> Change:
    found = [change for change in changes if change.subject == subject]
    assert len(found) == 1, compat.report(changes)
    return found[0]


# --- nim-ffi's evolution of the timer ----------------------------------------------

PRIORITY = {"enum": ["low", "normal", "high"], "title": "Priority", "type": "string"}


def nim_ffi_next(*, result_priority_required: bool = True) -> dict[str, Any]:
    """This API as nim-ffi's timer evolved it, edited into a copy of the JSON Schema."""
    document = schema.json_schema()
    defs = document["$defs"]
    defs["JobSpec"]["properties"]["priority"] = dict(PRIORITY)
    defs["ScheduleResult"]["properties"]["priority"] = dict(PRIORITY)
    if result_priority_required:
        defs["ScheduleResult"]["required"].append("priority")
    defs["JobScheduledEvent"] = {
        "additionalProperties": False,
        "properties": {
            "jobId": {"title": "Jobid", "type": "string"},
            "willRunCount": {"maximum": INT64_MAX, "minimum": INT64_MIN, "type": "integer"},
        },
        "required": ["jobId", "willRunCount"],
        "title": "JobScheduledEvent",
        "type": "object",
    }
    defs["event-frame"]["oneOf"].append(
        {
            "type": "object",
            "properties": {
                "event": {"const": "on_job_scheduled"},
                "data": {"$ref": "#/$defs/JobScheduledEvent"},
            },
            "additionalProperties": False,
            "required": ["event", "data"],
        }
    )
    for name in ("events.subscribe-request", "events.subscribe-reply"):
        defs[name]["properties"]["events"]["items"]["enum"].append("on_job_scheduled")
    defs["LibVersionParams"] = {"additionalProperties": False, "properties": {},
                                "title": "LibVersionParams", "type": "object"}  # fmt: skip
    defs["lib_version-request"] = {"$ref": "#/$defs/LibVersionParams"}
    defs["lib_version-reply"] = {"type": "string"}
    defs["EchoRequest"]["properties"]["delayMs"]["maximum"] = 5000
    return document


def test_nim_ffi_evolution_is_classified_change_by_change() -> None:
    changes = compat.compare(schema.json_schema(), nim_ffi_next())
    subjects = {change.subject for change in changes}
    assert subjects == {"JobSpec.priority", "ScheduleResult.priority", "EchoRequest.delayMs",
                        "method lib_version", "event on_job_scheduled"}  # fmt: skip

    priority = one(changes, "JobSpec.priority")  # integer to text enum: breaking both ways
    assert priority.what == 'type changed: integer -> text enum ("low", "normal", "high")'
    assert priority.where == ("schedule request: job.priority",)
    assert priority.old_client.level == priority.new_client.level == BREAKING
    assert "the newer server accepts only text enum" in priority.old_client.why

    gained = one(changes, "ScheduleResult.priority")  # a reply field: old clients skip it
    assert gained.what == "field added (required)"
    assert gained.where == ("schedule reply: priority",)
    assert gained.old_client.level == SAFE
    assert gained.new_client.level == BREAKING  # a newer client requires what an older lacks
    assert "an older server never sends it" in gained.new_client.why

    event = one(changes, "event on_job_scheduled")
    assert (event.what, event.old_client.level, event.new_client.level) == (
        "event added",
        SAFE,
        IF_USED,
    )
    method = one(changes, "method lib_version")
    assert (method.what, method.old_client.level, method.new_client.level) == (
        "method added",
        SAFE,
        IF_USED,
    )
    assert "unknown method: lib_version" in method.new_client.why

    bound = one(changes, "EchoRequest.delayMs")  # a tightened request bound
    assert bound.what == "values changed: integer -> integer up to 5000"
    assert "echo request: req.delayMs" in bound.where
    assert "complex request: req.messages[].delayMs" in bound.where  # the same model
    assert bound.old_client.level == BREAKING  # an older client may send 6000
    assert bound.new_client.level == SAFE
    assert changes[0].level == BREAKING  # worst first


def test_an_optional_reply_field_added_is_safe_both_ways() -> None:
    changes = compat.compare(schema.json_schema(), nim_ffi_next(result_priority_required=False))
    gained = one(changes, "ScheduleResult.priority")
    assert (gained.old_client.level, gained.new_client.level) == (SAFE, SAFE)


def test_going_back_is_judged_from_the_other_side() -> None:
    changes = compat.compare(nim_ffi_next(), schema.json_schema())
    assert one(changes, "method lib_version").old_client.level == BREAKING
    assert one(changes, "event on_job_scheduled").old_client.level == BREAKING
    assert one(changes, "event on_job_scheduled").new_client.level == SAFE
    loosened = one(changes, "EchoRequest.delayMs")
    assert (loosened.old_client.level, loosened.new_client.level) == (SAFE, IF_USED)
    removed = one(changes, "ScheduleResult.priority")
    assert (removed.what, removed.old_client.level) == ("field removed (was required)", BREAKING)


def test_identical_apis_have_no_differences() -> None:
    assert compat.compare(schema.json_schema(), schema.json_schema()) == []
    assert compat.report([]) == "no differences: compatible both ways\n"


# --- the rules, on APIs declared as the SDK declares its own ------------------------


Fields = dict[str, Any]
REQUIRED = ...


def _api(item: Fields, reply: Fields, *, item_name: str = "Item") -> dict[str, Any]:
    """One method ``put``: request ``{item: <item_name>}``, reply ``Reply``."""
    item_model = create_model(item_name, __base__=TimerModel, **item)
    params = create_model("PutParams", __base__=TimerModel, item=(item_model, REQUIRED))
    reply_model = create_model("Reply", __base__=TimerModel, **reply)
    return schema.json_schema(describe([_apis.Method("put", params, reply_model)], events={}))


BASE: Fields = {"name": (str, REQUIRED), "size": (Int64, REQUIRED), "note": (str | None, None)}
GONE = None  # in ``new``: the field is removed
UP_TO_10 = Annotated[int, Field(ge=INT64_MIN, le=10)]


@pytest.mark.parametrize(
    ("side", "old", "new", "subject", "what", "levels"),
    [
        # request fields: the server reads strictly
        ("request", {}, {"color": (str, REQUIRED)}, "color", "field added (required)",
         (BREAKING, BREAKING)),
        ("request", {}, {"color": (str | None, None)}, "color", "field added (optional)",
         (SAFE, IF_USED)),  # clients never send unset fields
        ("request", {}, {"size": GONE}, "size", "field removed (was required)",
         (BREAKING, BREAKING)),
        ("request", {}, {"note": GONE}, "note", "field removed (was optional)",
         (BREAKING, SAFE)),
        ("request", {"size": (Int64 | None, None)}, {"size": (Int64, REQUIRED)}, "size",
         "field now required", (BREAKING, SAFE)),
        ("request", {"size": (Int64, REQUIRED)}, {"size": (Int64 | None, None)}, "size",
         "field now optional", (SAFE, IF_USED)),
        ("request", {"size": (UP_TO_10, REQUIRED)}, {}, "size",
         "values changed: integer up to 10 -> integer", (SAFE, IF_USED)),
        ("request", {"size": (int, REQUIRED)}, {"size": (bool, REQUIRED)}, "size",
         "type changed: integer -> bool", (BREAKING, BREAKING)),
        # reply fields: clients read tolerantly
        ("reply", {}, {"color": (str, REQUIRED)}, "color", "field added (required)",
         (SAFE, BREAKING)),
        ("reply", {}, {"color": (str | None, None)}, "color", "field added (optional)",
         (SAFE, SAFE)),
        ("reply", {}, {"size": GONE}, "size", "field removed (was required)",
         (BREAKING, SAFE)),
        ("reply", {}, {"note": GONE}, "note", "field removed (was optional)",
         (SAFE, SAFE)),
        ("reply", {"size": (Int64, REQUIRED)}, {"size": (str, REQUIRED)}, "size",
         "type changed: integer -> text", (BREAKING, BREAKING)),
        ("reply", {"note": (str | None, None)}, {"note": (str | None, "x")}, "note",
         "default changed: None -> 'x'", (SAFE, SAFE)),
    ],
)  # fmt: skip
def test_each_rule(
    *, side: str, old: Fields, new: Fields, subject: str, what: str, levels: tuple[str, str]
) -> None:
    before = {**BASE, **old}
    after = {k: v for k, v in {**BASE, **new}.items() if v is not GONE}
    if side == "request":
        changes = compat.compare(_api(before, BASE), _api(after, BASE))
        subject = f"Item.{subject}"
    else:
        changes = compat.compare(_api(BASE, before), _api(BASE, after))
        subject = f"Reply.{subject}"
    found = [c for c in changes if c.subject == subject and c.what == what]
    assert len(found) == 1, compat.report(changes)
    assert (found[0].old_client.level, found[0].new_client.level) == levels, compat.report(changes)


@pytest.mark.parametrize(
    ("model", "levels"), [("Item", (SAFE, IF_USED)), ("Reply", (BREAKING, SAFE))]
)
def test_an_enum_value_added(model: str, levels: tuple[str, str]) -> None:
    # The models declare no enums yet: edit the JSON Schema, as nim-ffi's evolution is.
    old = _api(BASE, BASE)
    new = copy.deepcopy(old)
    old["$defs"][model]["properties"]["name"] = {"enum": ["a", "b"], "type": "string"}
    new["$defs"][model]["properties"]["name"] = {"enum": ["a", "b", "c"], "type": "string"}
    (change,) = compat.compare(old, new)
    assert change.what == 'values changed: text enum ("a", "b") -> text enum ("a", "b", "c")'
    assert (change.old_client.level, change.new_client.level) == levels


def test_a_renamed_model_is_no_change_on_the_wire() -> None:
    assert compat.compare(_api(BASE, BASE), _api(BASE, BASE, item_name="Thing")) == []


def test_a_doc_change_is_listed_as_safe() -> None:
    old = _api(BASE, BASE)
    new = copy.deepcopy(old)
    new["$defs"]["Item"]["description"] = "An item, described."
    (change,) = compat.compare(old, new)
    assert (change.subject, change.what, change.level) == ("Item", "documentation changed", SAFE)


def test_a_method_reply_that_is_no_model_is_compared_as_a_value() -> None:
    old = schema.json_schema()
    new = copy.deepcopy(old)
    new["$defs"]["version-reply"] = {"type": "integer"}
    (change,) = compat.compare(old, new)
    assert change.subject == "version reply"
    assert (change.old_client.level, change.new_client.level) == (BREAKING, BREAKING)


def test_a_document_that_is_not_an_api_is_refused() -> None:
    with pytest.raises(ValueError, match="it has no \\$defs"):
        compat.compare({"title": "x"}, schema.json_schema())
    broken = schema.json_schema()
    del broken["$defs"]["echo-reply"]
    with pytest.raises(ValueError, match="as `timer-sdk schema` writes it"):
        compat.compare(schema.json_schema(), broken)


# --- the command -------------------------------------------------------------------


def test_compat_exits_0_for_the_same_api_and_1_for_the_priority_change(tmp_path: Path) -> None:
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(run("schema", "--format", "json-schema").stdout)
    new.write_text(json.dumps(nim_ffi_next(), indent=2))

    same = run("compat", str(old), str(old))
    assert (same.returncode, same.stdout, same.stderr) == (
        0, "no differences: compatible both ways\n", ""
    )  # fmt: skip
    changed = run("compat", str(old), str(new))
    assert changed.returncode == 1, changed.stderr
    assert 'JobSpec.priority: type changed: integer -> text enum ("low", "normal", "high")\n' in (
        changed.stdout
    )
    assert "  in schedule request: job.priority\n" in changed.stdout
    assert changed.stdout.endswith("5 differences (3 breaking, 2 if used): NOT compatible\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.json", "missing.json"], "cannot read missing.json: No such file or directory"),
        (["bad.json", "bad.json"], "bad.json is not JSON"),
        (["other.json", "other.json"], "other.json is not an API description"),
        (["broken.json", "other.json"], "not an API description"),
        (["broken.json", "broken.json"], "not a JSON Schema of the wire API"),
    ],
)
def test_compat_exits_2_when_it_cannot_read_an_api(
    tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "other.json").write_text('{"title": "no defs"}')
    broken = schema.json_schema()
    del broken["$defs"]["echo-reply"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    (tmp_path / "fine.json").write_text(json.dumps(schema.json_schema()))
    if args == ["broken.json", "broken.json"]:
        args = ["fine.json", "broken.json"]
    out = subprocess.run(
        [sys.executable, "-m", "timer_sdk", "compat", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert out.stdout == ""


def test_compat_without_new_is_a_usage_error() -> None:
    out = run("compat", "old.json")
    assert out.returncode == 2 and "the following arguments are required: NEW" in out.stderr


async def test_compat_reads_a_live_server(tmp_path: Path) -> None:
    from .test_cli_help import arun
    from .test_describe import reference_like

    new = tmp_path / "new.json"
    new.write_text(json.dumps(nim_ffi_next()))
    async with await Timer().serve("tcp:127.0.0.1:0") as server:
        assert (await arun("compat", str(PUBLISHED), server.address))[0] == 0
        code, out, _ = await arun("compat", server.address, str(new))
    assert code == 1 and "JobSpec.priority" in out
    async with reference_like() as address:
        code, out, err = await arun("compat", address, str(new))
    assert (code, out) == (2, "")
    assert "unknown method: server.describe" in err and err.count("\n") == 1


# --- the published API: as `buf breaking` in CI ---------------------------------------


def gate(published: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why the models may not ship against the published API, or ``None``."""
    breaking = [c for c in compat.compare(published, current) if c.level == BREAKING]
    if not breaking:
        return None
    return (
        "the models break the API published in docs/api.json:\n"
        + compat.report(breaking)
        + f"if that is on purpose, publish the new API ({PUBLISH}) and say so in CHANGELOG.md"
    )


def test_the_models_do_not_break_the_published_api() -> None:
    problem = gate(json.loads(PUBLISHED.read_text()), schema.json_schema())
    assert problem is None, problem


def test_the_gate_stops_a_breaking_change_and_names_it() -> None:
    problem = gate(schema.json_schema(), nim_ffi_next())
    assert problem is not None and "JobSpec.priority" in problem and PUBLISH in problem
    assert gate(schema.json_schema(), nim_ffi_next(result_priority_required=False)) is not None
    assert gate(schema.json_schema(), schema.json_schema()) is None


def test_the_published_api_is_current() -> None:
    current = run("schema", "--format", "json-schema").stdout
    if PUBLISHED.read_text() != current:
        drift = compat.compare(json.loads(PUBLISHED.read_text()), json.loads(current))
        pytest.fail(f"docs/api.json is not the API of these models; publish it ({PUBLISH}):\n"
                    + compat.report(drift))  # fmt: skip


# --- values: which a reader accepts of what a writer may send -----------------------

DEFS = Document(
    {"$defs": {"Level": {"enum": ["a", "b"], "type": "string"}, "M": {"type": "object"}}}, "DEFS"
)
INT, NUM, TEXT = {"type": "integer"}, {"type": "number"}, {"type": "string"}


@pytest.mark.parametrize(
    ("writer", "reader", "expected"),
    [
        ({**INT, "exclusiveMinimum": 0}, {**INT, "minimum": 1}, True),
        ({**INT, "minimum": 0}, {**INT, "exclusiveMinimum": 0}, False),
        ({**INT, "exclusiveMaximum": 11}, {**INT, "maximum": 10}, True),
        ({**NUM, "exclusiveMaximum": 1.5}, {**NUM, "maximum": 1.5}, True),
        (INT, NUM, True),
        (NUM, INT, False),
        ({**TEXT, "maxLength": 5}, {**TEXT, "maxLength": 10}, True),
        (TEXT, {**TEXT, "maxLength": 10}, False),
        (TEXT, {**TEXT, "pattern": "^a"}, False),
        ({"enum": ["ab", "ac"]}, {**TEXT, "pattern": "^a", "maxLength": 2}, True),
        ({"enum": ["abc"]}, {**TEXT, "maxLength": 2}, False),
        ({"const": 3}, {**INT, "maximum": 5}, True),
        ({"const": True}, INT, False),  # a bool is no integer, as strict readers have it
        ({"const": 1}, {"type": "boolean"}, False),
        ({"const": None}, {"type": "null"}, True),
        ({"const": 1.5}, TEXT, False),
        ({"const": {"a": 1}}, {"type": "object"}, False),
        ({"const": "a"}, {"$ref": "#/$defs/Level"}, True),
        ({"$ref": "#/$defs/Level"}, TEXT, True),
        ({"$ref": "#/$defs/Level"}, {"enum": ["a"]}, False),
        ({"type": "array", "items": INT, "maxItems": 3}, {"type": "array", "items": NUM}, True),
        ({"type": "array", "items": TEXT}, {"type": "array", "items": INT}, False),
        ({"type": "array", "items": TEXT}, {"type": "array", "items": TEXT, "minItems": 1}, False),
        ({"anyOf": [TEXT, {"type": "null"}]}, TEXT, False),
        ({"anyOf": [TEXT, {"type": "null"}]}, {"anyOf": [{"type": "null"}, TEXT]}, True),
        ({"type": "boolean"}, {"type": "boolean"}, True),
        ({"$ref": "#/$defs/M"}, {"type": "object"}, False),
        ({"type": "object"}, {"type": "object", "title": "documentation only"}, True),
        ({"type": "object", "minProperties": 1}, {"type": "object"}, False),
    ],
)
def test_which_values_a_reader_accepts(writer: Any, reader: Any, expected: bool) -> None:
    assert subset(writer, reader, DEFS, DEFS) is expected


@pytest.mark.parametrize(
    ("frag", "text"),
    [
        ({**INT, "minimum": 1, "maximum": 10}, "integer from 1 to 10"),
        ({**INT, "minimum": 1, "maximum": INT64_MAX}, "integer from 1"),
        ({**NUM, "exclusiveMaximum": 2}, "float up to 2"),
        ({"type": "array", "items": {"$ref": "#/$defs/M"}}, "list of M"),
        ({"enum": [1, 2]}, "enum (1, 2)"),
        ({"anyOf": [TEXT, {"type": "null"}]}, "text or null"),
        ({"type": "boolean"}, "bool"),
        ({}, "any value"),
    ],
)
def test_types_in_words(frag: Any, text: str) -> None:
    assert words(frag, DEFS) == text


def test_a_field_that_holds_several_models_pairs_them_by_name() -> None:
    old = _api(BASE, BASE)
    old["$defs"]["PutParams"]["properties"]["item"] = {
        "anyOf": [{"$ref": "#/$defs/Item"}, {"$ref": "#/$defs/Reply"}]
    }
    new = copy.deepcopy(old)
    new["$defs"]["Item"]["properties"]["name"]["description"] = "what it is called"
    new["$defs"]["Reply"]["required"].remove("size")
    new["$defs"]["Reply"]["properties"]["size"] = {"anyOf": [INT, {"type": "null"}]}
    changes = compat.compare(old, new)
    assert [(c.subject, c.what) for c in changes] == [
        ("Reply.size", "field now optional"),
        ("Reply.size", "type changed: integer -> integer or null"),
        ("Item.name", "documentation changed"),
    ], compat.report(changes)
    assert "put request: item.size" in changes[0].where  # Reply, used in a request here


def test_a_model_that_became_text_is_a_type_change() -> None:
    old = _api(BASE, BASE)
    new = copy.deepcopy(old)
    new["$defs"]["PutParams"]["properties"]["item"] = TEXT
    (change,) = compat.compare(old, new)
    assert (change.subject, change.what, change.level) == (
        "PutParams.item", "type changed: Item -> text", BREAKING
    )  # fmt: skip


def test_a_model_that_holds_itself_is_compared_once_and_each_use_is_named() -> None:
    old = _api(BASE, BASE)
    defs = old["$defs"]
    defs["Inner"] = {"type": "object", "properties": {"size": {**INT, "maximum": 20}}}
    defs["Item"]["properties"]["inner"] = {"$ref": "#/$defs/Inner"}
    defs["Item"]["properties"]["parts"] = {"type": "array", "items": {"$ref": "#/$defs/Item"}}
    defs["PutParams"]["properties"]["other"] = {"$ref": "#/$defs/Item"}
    new = copy.deepcopy(old)
    new["$defs"]["Inner"]["properties"]["size"]["maximum"] = 10
    (change,) = compat.compare(old, new)
    assert change.subject == "Inner.size"
    # Each way in is named; the way round through parts[] is walked once, not forever.
    assert change.where == ("put request: item.inner.size", "put request: other.inner.size")
    assert (change.old_client.level, change.new_client.level) == (BREAKING, SAFE)
