"""What changed between two versions of the wire API, and whom it breaks (``timer-sdk compat``).

:func:`compare` reads two JSON Schema documents as ``timer-sdk schema --format
json-schema`` writes them and lists every difference, each judged for both
directions: an older client against a newer server, and a newer client
against an older server. The rules are protobuf's and buf's, fitted to this
protocol: a server reads requests strictly (an unknown or a missing field is
refused) and a client reads replies and events tolerantly (unknown fields and
event kinds are skipped, known ones are checked). Model names never travel on
the wire, so a renamed model is no change: fields are compared where they are
used.

A verdict is ``safe``; ``if used``, when only a peer that uses something new
fails (a newer client calling a method an older server lacks, or setting a
field it does not know); or ``breaking``, when a peer that does only what its
own version allows fails. Sans-I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from ..wire.api import SUBSCRIBE
from .compat_values import Document, kinds, plain, subset, words

__all__ = ["BREAKING", "IF_USED", "SAFE", "Change", "Verdict", "compare", "report"]

Level = Literal["safe", "if used", "breaking"]
SAFE: Level = "safe"
IF_USED: Level = "if used"
BREAKING: Level = "breaking"
_RANK = {SAFE: 0, IF_USED: 1, BREAKING: 2}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One direction's judgement of a change, and why."""

    level: Level
    why: str


@dataclasses.dataclass(frozen=True)
class Change:
    """One difference between two APIs, judged for both directions."""

    subject: str
    """What changed: ``JobSpec.priority``, ``method lib_version``, ``event on_job_scheduled``."""
    what: str
    where: tuple[str, ...]
    """Where the wire carries it: ``schedule request: job.priority``."""
    old_client: Verdict
    """An older client against a newer server."""
    new_client: Verdict
    """A newer client against an older server."""

    @property
    def level(self) -> Level:
        """The worse of the two verdicts."""
        return max(self.old_client.level, self.new_client.level, key=_RANK.__getitem__)


# --- judging ---------------------------------------------------------------------

Side = Literal["request", "reply"]
_WHO = {  # (side, old client?) -> (writer, reader, strict reader, newer client writes)
    ("request", True): ("an older client", "the newer server", True, False),
    ("request", False): ("a newer client", "an older server", True, True),
    ("reply", True): ("the newer server", "an older client", False, False),
    ("reply", False): ("an older server", "a newer client", False, False),
}


def _presence(side: Side, old_client: bool, before: str, after: str) -> Verdict:
    """A field's presence ("absent", "optional", "required") before and after, judged."""
    writer_is_old = (side == "request") == old_client
    w, r = (before, after) if writer_is_old else (after, before)
    writer, reader, strict, newer_client = _WHO[side, old_client]
    if w != "absent" and r == "absent" and strict:
        failure = f"{reader} refuses a field it does not know, which {writer} "
        failure += "always sends" if w == "required" else "sends when it is set"
    elif w != "required" and r == "required":
        failure = f"{reader} requires it, and {writer} "
        failure += "never sends it" if w == "absent" else "leaves it out when unset"
    else:
        why = f"{reader} skips fields it does not know" if r == "absent" else "both sides agree"
        return Verdict(SAFE, why)
    level = IF_USED if newer_client and w == "optional" else BREAKING
    return Verdict(level, failure)


def _values(
    side: Side, old_client: bool, old: Any, new: Any, docs: tuple[Document, Document]
) -> Verdict:
    writer_is_old = (side == "request") == old_client
    o_doc, n_doc = docs
    w, w_doc, r, r_doc = (old, o_doc, new, n_doc) if writer_is_old else (new, n_doc, old, o_doc)
    writer, reader, _, newer_client = _WHO[side, old_client]
    if subset(w, r, w_doc, r_doc):
        return Verdict(SAFE, f"{reader} accepts every value {writer} sends")
    why = f"{writer} may send {words(w, w_doc)}; {reader} accepts only {words(r, r_doc)}"
    if newer_client and subset(r, w, r_doc, w_doc):
        return Verdict(IF_USED, f"{why}: a newer client must keep to that against it")
    return Verdict(BREAKING, why)


def _worst(verdicts: list[Verdict]) -> Verdict:
    return max(verdicts, key=lambda v: _RANK[v.level])


# --- walking both documents ------------------------------------------------------


def _join(path: str, field: str) -> str:
    """``schedule request: `` and ``job`` make ``schedule request: job``; then ``.priority``."""
    return f"{path}{field}" if path.endswith(": ") else f"{path}.{field}"


def _state(model: dict[str, Any], field: str) -> str:
    if field not in model.get("properties", {}):
        return "absent"
    return "required" if field in model.get("required", []) else "optional"


class _Compare:
    def __init__(self, old: Document, new: Document) -> None:
        self.old, self.new = old, new
        self.uses: dict[tuple[str, str], dict[Side, list[str]]] = {}
        self.inside: set[tuple[str, str]] = set()  # the models being walked into
        self.changes: list[Change] = []

    def pair(self, o_name: str, n_name: str, side: Side, path: str) -> None:
        """Note where a model is used; go on into the models it holds, every path once."""
        self.uses.setdefault((o_name, n_name), {}).setdefault(side, []).append(path)
        if (o_name, n_name) in self.inside:
            return  # a model that holds itself: its fields are compared once
        self.inside.add((o_name, n_name))
        o_model, n_model = self.old.defs[o_name], self.new.defs[n_name]
        for field in o_model.get("properties", {}):
            if field in n_model.get("properties", {}):
                o_frag, n_frag = o_model["properties"][field], n_model["properties"][field]
                self.nested(o_frag, n_frag, side, _join(path, field))
        self.inside.discard((o_name, n_name))

    def nested(self, o_frag: Any, n_frag: Any, side: Side, path: str) -> None:
        o_models, n_models = self.old.models_in(o_frag), self.new.models_in(n_frag)
        if len(o_models) == len(n_models) == 1 and o_models[0][1] == n_models[0][1]:
            self.pair(o_models[0][0], n_models[0][0], side, path + o_models[0][1])
            return
        for name, suffix in o_models:
            if (name, suffix) in n_models:
                self.pair(name, name, side, path + suffix)

    def value(
        self, subject: str, where: list[str], o_frag: Any, n_frag: Any, sides: list[Side]
    ) -> None:
        docs = (self.old, self.new)
        if plain(o_frag) == plain(n_frag):
            if o_frag != n_frag:
                self.add(subject, "documentation changed", where, SAFE, "not on the wire")
            return
        if not (subset(o_frag, n_frag, *docs) and subset(n_frag, o_frag, self.new, self.old)):
            same = kinds(o_frag, self.old) == kinds(n_frag, self.new)
            what = f"{'values' if same else 'type'} changed: {words(o_frag, self.old)} -> "
            what += words(n_frag, self.new)
            verdicts = [
                _worst([_values(side, old_client, o_frag, n_frag, docs) for side in sides])
                for old_client in (True, False)
            ]
            self.changes.append(Change(subject, what, tuple(where), *verdicts))
        o_rest = {k: v for k, v in plain(o_frag).items() if k == "default"}
        n_rest = {k: v for k, v in plain(n_frag).items() if k == "default"}
        if o_rest != n_rest:
            what = f"default changed: {o_rest.get('default')!r} -> {n_rest.get('default')!r}"
            self.add(
                subject, what, where, SAFE, "not on the wire; an omitted field means another value"
            )

    def add(self, subject: str, what: str, where: list[str], level: Level, why: str) -> None:
        verdict = Verdict(level, why)
        self.changes.append(Change(subject, what, tuple(where), verdict, verdict))

    def fields(self, o_name: str, n_name: str, uses: dict[Side, list[str]]) -> None:
        o_model, n_model = self.old.defs[o_name], self.new.defs[n_name]
        sides = list(uses)
        if o_model.get("description") != n_model.get("description"):
            where = [path.rstrip(": ") for side in sides for path in uses[side]]
            self.add(n_name, "documentation changed", where, SAFE, "not on the wire")
        o_fields, n_fields = o_model.get("properties", {}), n_model.get("properties", {})
        for field in [*o_fields, *(f for f in n_fields if f not in o_fields)]:
            subject = f"{n_name}.{field}"
            where = [_join(path, field) for side in sides for path in uses[side]]
            before, after = _state(o_model, field), _state(n_model, field)
            if before != after:
                if before == "absent":
                    what = f"field added ({after})"
                elif after == "absent":
                    what = f"field removed (was {before})"
                else:
                    what = f"field now {after}"
                verdicts = [
                    _worst([_presence(side, old_client, before, after) for side in sides])
                    for old_client in (True, False)
                ]
                self.changes.append(Change(subject, what, tuple(where), *verdicts))
            if field in o_fields and field in n_fields:
                self.value(subject, where, o_fields[field], n_fields[field], sides)

    def run(self) -> list[Change]:
        old, new = self.old, self.new
        for name in old.methods:
            if name not in new.methods:
                self.changes.append(Change(
                    f"method {name}", "method removed", (),
                    Verdict(BREAKING, f"an older client calling it gets 'unknown method: {name}'"),
                    Verdict(SAFE, "a newer client does not call it"),
                ))  # fmt: skip
                continue
            for side in ("request", "reply"):
                o_frag, n_frag = old.defs[f"{name}-{side}"], new.defs[f"{name}-{side}"]
                o_model, n_model = old.model(o_frag), new.model(n_frag)
                if o_model and n_model:
                    self.pair(o_model, n_model, side, f"{name} {side}: ")
                else:
                    self.value(f"{name} {side}", [f"{name} {side}"], o_frag, n_frag, [side])
                    self.nested(o_frag, n_frag, side, f"{name} {side}: ")
        for name in new.methods:
            if name not in old.methods:
                self.changes.append(Change(
                    f"method {name}", "method added", (),
                    Verdict(SAFE, "an older client does not call it"),
                    Verdict(IF_USED, f"an older server answers 'unknown method: {name}': a newer "
                            "client checks server.describe, or the error, before relying on it"),
                ))  # fmt: skip
        for name, o_data in old.events.items():
            if name in new.events:
                self.nested(o_data, new.events[name], "reply", f"event {name}: ")
                continue
            self.changes.append(Change(
                f"event {name}", "event removed", (),
                Verdict(BREAKING, f"an older client that names it in {SUBSCRIBE} is refused, "
                        "and the events it waits for never come"),
                Verdict(SAFE, "a newer client skips event kinds it does not know"),
            ))  # fmt: skip
        for name in new.events:
            if name not in old.events:
                self.changes.append(Change(
                    f"event {name}", "event added", (),
                    Verdict(SAFE, "an older client skips event kinds it does not know"),
                    Verdict(IF_USED, f"an older server never sends it, and refuses an "
                            f"{SUBSCRIBE} that names it"),
                ))  # fmt: skip
        for (o_name, n_name), uses in self.uses.items():
            self.fields(o_name, n_name, uses)
        return sorted(self.changes, key=lambda c: -_RANK[c.level])


def compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Every difference from API ``old`` to API ``new`` (JSON Schema documents), worst first.

    Raises :class:`ValueError` if either is not written as ``timer-sdk schema`` writes.
    """
    documents = (Document(old, "OLD"), Document(new, "NEW"))
    try:
        return _Compare(*documents).run()
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"not a JSON Schema of the wire API as `timer-sdk schema` writes it: {exc!r}"
        ) from None


def report(changes: list[Change]) -> str:
    """The changes as ``timer-sdk compat`` prints them, with a last line that sums them up."""
    if not changes:
        return "no differences: compatible both ways\n"
    lines = []
    for change in changes:
        lines.append(f"{change.subject}: {change.what}")
        lines += [f"  in {where}" for where in change.where]
        for label, verdict in (("older client, newer server", change.old_client),
                               ("newer client, older server", change.new_client)):  # fmt: skip
            lines.append(f"  {label}: {verdict.level}: {verdict.why}")
    counts = {level: sum(c.level == level for c in changes) for level in (BREAKING, IF_USED, SAFE)}
    summary = ", ".join(f"{n} {level}" for level, n in counts.items() if n)
    overall = "NOT compatible" if counts[BREAKING] else "compatible both ways"
    return "\n".join([*lines, f"{len(changes)} differences ({summary}): {overall}"]) + "\n"
