"""Which values a fragment of the wire API's JSON Schema allows, for :mod:`timer_sdk.tools.compat`.

:class:`Document` reads one document as ``timer-sdk schema --format
json-schema`` writes it: its methods, events and models. :func:`subset` says
whether a reader accepts every value a writer may send (an integer up to 5000
is within any integer; a text enum is not an integer), models apart: those
compare field by field. :func:`words` names a type for a reader. Sans-I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ..wire.api import SUBSCRIBE, UNSUBSCRIBE

__all__ = ["DERIVED", "Document", "kinds", "plain", "subset", "words"]

DERIVED = {f"{SUBSCRIBE}-request", f"{SUBSCRIBE}-reply", f"{UNSUBSCRIBE}-request",
           f"{UNSUBSCRIBE}-reply", "event-frame", "events-dropped-frame"}  # fmt: skip
"""Definitions written from the event list: their changes are the events'."""
_INT64 = (-(2**63), 2**63 - 1)


# --- reading a document --------------------------------------------------------


class Document:
    """One version of the API: its definitions, methods and events."""

    def __init__(self, document: Mapping[str, Any], label: str) -> None:
        defs = document.get("$defs") if isinstance(document, Mapping) else None
        if not isinstance(defs, dict):
            raise ValueError(f"{label}: not a JSON Schema of the wire API: it has no $defs")
        self.defs: dict[str, Any] = defs
        self.methods = [n.removesuffix("-request") for n in defs
                        if n.endswith("-request") and n not in DERIVED]  # fmt: skip
        frames = defs.get("event-frame", {}).get("oneOf", [])
        self.events = {f["properties"]["event"]["const"]: f["properties"]["data"] for f in frames}

    def model(self, frag: Any) -> str | None:
        """The name of the model ``frag`` refers to, if it is one."""
        if isinstance(frag, dict) and isinstance(frag.get("$ref"), str):
            name = frag["$ref"].rpartition("/")[2]
            target = self.defs.get(name, {})
            if "properties" in target or target.get("type") == "object":
                return str(name)
        return None

    def alternatives(self, frag: Any) -> list[dict[str, Any]]:
        """``frag`` as the list of its alternatives; a model is ``{"$model": name}``."""
        name = self.model(frag)
        if name is not None:
            return [{"$model": name}]
        if "$ref" in frag:  # an enum or alias by name: what it names
            return self.alternatives(self.defs.get(frag["$ref"].rpartition("/")[2], {}))
        for key in ("anyOf", "oneOf"):
            if key in frag:
                return [alt for sub in frag[key] for alt in self.alternatives(sub)]
        return [frag]

    def models_in(self, frag: Any, suffix: str = "") -> list[tuple[str, str]]:
        """The models a field holds, each with ``[]`` per list around it."""
        found = []
        for alt in self.alternatives(frag):
            if "$model" in alt:
                found.append((alt["$model"], suffix))
            elif alt.get("type") == "array":
                found += self.models_in(alt.get("items", {}), suffix + "[]")
        return found


# --- values: does a reader accept every value a writer sends? ---------------------


def _bounds(alt: dict[str, Any]) -> tuple[float, float]:
    low = alt.get("minimum", -math.inf)
    high = alt.get("maximum", math.inf)
    integer = alt.get("type") == "integer"
    if "exclusiveMinimum" in alt:
        value = alt["exclusiveMinimum"]
        low = max(low, math.floor(value) + 1 if integer else math.nextafter(value, math.inf))
    if "exclusiveMaximum" in alt:
        value = alt["exclusiveMaximum"]
        high = min(high, math.ceil(value) - 1 if integer else math.nextafter(value, -math.inf))
    return low, high


def _within(outer: dict[str, Any], inner: dict[str, Any], low: str, high: str) -> bool:
    return bool(outer.get(low, 0) <= inner.get(low, 0)
                and inner.get(high, math.inf) <= outer.get(high, math.inf))  # fmt: skip


_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                       "boolean": (bool,), "null": (type(None),)}  # fmt: skip


def _admits(reader: dict[str, Any], value: Any) -> bool:
    """Whether ``reader`` (one alternative) accepts the literal ``value``."""
    if "const" in reader or "enum" in reader:
        values = reader["enum"] if "enum" in reader else [reader["const"]]
        return any(type(v) is type(value) and v == value for v in values)
    kind = reader.get("type")
    if kind not in _TYPES or type(value) not in _TYPES[kind]:
        return False  # a bool is no integer, as strict readers have it
    if kind in ("integer", "number"):
        low, high = _bounds(reader)
        return bool(low <= value <= high)
    if kind == "string":
        size: int = len(value)
        return bool(reader.get("minLength", 0) <= size <= reader.get("maxLength", math.inf)
                    and re.search(str(reader.get("pattern", "")), value))  # fmt: skip
    return True


def _covers(reader: dict[str, Any], writer: dict[str, Any], old: Document, new: Document) -> bool:
    kind, other = writer.get("type"), reader.get("type")
    if "$model" in writer or "$model" in reader:  # models compare field by field, apart
        return "$model" in writer and "$model" in reader
    if (
        "const" in reader
        or "enum" in reader
        or (kind != other and not (kind == "integer" and other == "number"))
    ):
        return False
    if kind in ("integer", "number"):
        (w_low, w_high), (r_low, r_high) = _bounds(writer), _bounds(reader)
        return bool(r_low <= w_low and w_high <= r_high)
    if kind == "string":
        return _within(reader, writer, "minLength", "maxLength") and all(
            reader.get(key) in (None, writer.get(key)) for key in ("pattern", "format")
        )
    if kind == "array":
        return _within(reader, writer, "minItems", "maxItems") and subset(
            writer.get("items", {}), reader.get("items", {}), old, new
        )
    if kind in ("boolean", "null"):
        return True
    return bool(plain(reader) == plain(writer))


def subset(writer: Any, reader: Any, w_doc: Document, r_doc: Document) -> bool:
    """Whether ``reader`` accepts every value ``writer`` allows."""
    readers = r_doc.alternatives(reader)
    for alt in w_doc.alternatives(writer):
        if "const" in alt or "enum" in alt:
            values = alt["enum"] if "enum" in alt else [alt["const"]]
            if not all(any(_admits(r, v) for r in readers) for v in values):
                return False
        elif not any(_covers(r, alt, w_doc, r_doc) for r in readers):
            return False
    return True


def plain(frag: Any) -> Any:
    """``frag`` without what is only documentation."""
    if isinstance(frag, dict):
        return {k: plain(v) for k, v in frag.items() if k not in ("title", "description")}
    if isinstance(frag, list):
        return [plain(v) for v in frag]
    return frag


def kinds(frag: Any, doc: Document) -> set[str]:
    """The JSON types of ``frag``'s alternatives (a model's name for a model)."""
    found = set()
    for alt in doc.alternatives(frag):
        values = alt["enum"] if "enum" in alt else [alt["const"]] if "const" in alt else None
        if "$model" in alt:
            found.add("object")
        elif values is not None:
            found |= {type(value).__name__ for value in values}
        else:
            found.add(str(alt.get("type")))
    return {{"str": "string", "int": "integer", "float": "number", "bool": "boolean",
             "NoneType": "null"}.get(kind, kind) for kind in found}  # fmt: skip


def words(frag: Any, doc: Document) -> str:
    """A type in words: ``integer up to 5000``, ``text enum ("low", "high")``."""
    texts = []
    for alt in doc.alternatives(frag):
        if "$model" in alt:
            texts.append(alt["$model"])
        elif "const" in alt or "enum" in alt:
            values = alt["enum"] if "enum" in alt else [alt["const"]]
            kind = "text " if all(isinstance(v, str) for v in values) else ""
            texts.append(f"{kind}enum ({', '.join(map(_literal, values))})")
        elif alt.get("type") in ("integer", "number"):
            low, high = _bounds(alt)
            name = "integer" if alt["type"] == "integer" else "float"
            low_shown, high_shown = (
                low not in (-math.inf, _INT64[0]),
                high not in (math.inf, _INT64[1]),
            )
            if low_shown and high_shown:
                name += f" from {low:g} to {high:g}"
            elif low_shown:
                name += f" from {low:g}"
            elif high_shown:
                name += f" up to {high:g}"
            texts.append(name)
        elif alt.get("type") == "array":
            texts.append(f"list of {words(alt.get('items', {}), doc)}")
        else:
            named = str(alt.get("type", "any value"))
            texts.append({"string": "text", "boolean": "bool"}.get(named, named))
    return " or ".join(texts)


def _literal(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)
