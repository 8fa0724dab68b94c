"""The table: the targets first, then every row, each block fenced so it pastes as Markdown.

Every line fits in :data:`WIDTH` columns; a note too long for its row's line is
wrapped onto the lines below it, whole. Nothing in it is quoted from
elsewhere: each number was measured in the run that the document describes.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

from .rows import TARGETS, WORKER_COUNTS

__all__ = ["WIDTH", "format_table"]

WIDTH = 100
NOTE_INDENT = " " * 6
UNITS = {"calls/s": "/s", "µs": "µs", "KiB": "KiB", "MiB": "MiB"}
GROUP_TITLES = {
    "memory": "memory: server RSS (Linux)",
    "ping-pong": "ping-pong: one connection, one call at a time",
    "pipelined": "pipelined: 32 calls in flight per connection",
    "workers": "workers: serve --workers "
    + ", ".join(map(str, WORKER_COUNTS[:-1]))
    + f" and {WORKER_COUNTS[-1]}, one TCP port",
    "client": "client: in process, against the floor server",
    "codec": "codec: µs per step of one call, in process (decode = decode + validate)",
}
LEGEND = """\
ours = this tree's server and client. models = the models floor, a plain asyncio server and
client that decode with cbor2, validate into the same pydantic models, call the same Timer
procs and encode the same reply bytes, without our strict checks (models_floor.py). floor =
cbor2 alone, no validation (floor.py). /models and /floor: ours divided by that floor (for /s
higher is better; for µs, MiB and KiB lower). Each server runs in its own process, the load
comes from another; every number is a median of alternating rounds of this run."""
AGAINST_NOTE = """\
↳ against: the --against server's number, its ratios to the same floors, and its share of
ours. skip says why it has none: a unix address has no tcp rows (and the other way round),
RSS and CPU need a process this run started, workers a server it starts; client and codec
rows measure no server."""
TARGET_NOTE = """\
Targets are this project's own goals; they are not the numbers of any
other implementation. Each bounds ours/models, except server CPU per call,
which bounds ours in µs (server-process CPU time over the measured window / calls), and
the timeout rows, which bound ours with a timeout over ours without (median of per-round ratios)."""


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if math.isnan(value):
        return "n/a"
    if unit == "calls/s" or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.2f}"


def _label(row: dict[str, Any]) -> str:
    """The row's name inside its group's block, with its unit."""
    name: str = row["name"]
    for prefix in (f"{row['group']} ", "server RSS", "server CPU per pipelined "):
        if name.startswith(prefix):
            name = name[len(prefix) :].lstrip(", ")
            break
    if row["name"].startswith("server CPU per"):
        name = f"CPU per {name}"
    elif row["group"] == "memory":
        name = (
            "RSS per idle conn" if name.startswith("per") else name.replace("connections", "conns")
        )
        name = name if name.startswith("RSS") else f"RSS, {name}"
    return f"  {name}, {UNITS.get(row['unit'], row['unit'])}"


def _target(row: dict[str, Any]) -> str:
    if not row.get("target"):
        return ""
    bound = row["target"].replace(">=", "≥").replace("<=", "≤")
    if row.get("target_basis") == "value":
        bound += f" {row['unit']}"
    elif row.get("target_basis") == "untimed":  # a number no column shows: shown here
        compared = _ratio(row.get("detail", {}).get("vs_untimed")) or "?"
        bound = f"ours/untimed {compared} {bound}"
    verdict = "n/a" if row["met"] is None else "met" if row["met"] else "MISSED"
    return f"{bound}: {verdict}"


def _against_cells(row: dict[str, Any], label: str) -> list[str]:
    against = row.get("against")
    if against is None:
        skipped = row.get("against_skipped") or "no measurement"
        return [label, "", "", "", "", "", f"skip: {skipped}"]
    models, floor = row.get("models_floor"), row.get("floor")
    return [
        label,
        _number(against, row["unit"]),
        "",
        "",
        _ratio(against / models if models else None),
        _ratio(against / floor if floor else None),
        f"= {against / row['ours']:.2f} of ours",
    ]


def _render(header: list[str], lines: list[list[str] | str]) -> list[str]:
    """Align ``lines`` under ``header``: text left, numbers right; a str is a heading."""
    rows = [header] + [line for line in lines if isinstance(line, list)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    out = []
    for line in [header, *lines]:
        if isinstance(line, str):
            out.append(line)
            continue
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:-1], widths[1:-1], strict=True)]
        text = "  ".join([*cells, line[-1]]).rstrip()
        if len(text) <= WIDTH:
            out.append(text)
            continue
        # A long note goes whole on the lines below its row, never cut: a cut note
        # would lose its verdict, and the layout would hang on what the run measured.
        out.append("  ".join(cells).rstrip())
        out += textwrap.wrap(line[-1], WIDTH, initial_indent=NOTE_INDENT,
                             subsequent_indent=NOTE_INDENT)  # fmt: skip
    return out


def _fenced(title: str, body: list[str]) -> list[str]:
    return [title, "", "```", *body, "```", ""]


def _headline(document: dict[str, Any]) -> list[str]:
    against = document.get("against")
    lines: list[list[str] | str] = []
    order = list(TARGETS)
    picked = [row for row in document["rows"] if row["name"] in TARGETS]
    picked.sort(key=lambda row: (order.index(row["name"]), row["loop"]))
    for row in picked:
        name = row["name"].replace(" unix 4x32", " unix 4x32" if "CPU" not in row["name"] else "")
        name = f"{name}, {UNITS.get(row['unit'], row['unit'])}"
        lines.append(
            [
                name,
                row["loop"],
                _number(row["ours"], row["unit"]),
                _number(row.get("models_floor"), row["unit"]),
                _ratio(row.get("models_ratio")),
                _target(row),
            ]
        )
        if against:
            cells = _against_cells(row, "  ↳ against")
            lines.append([cells[0], "", cells[1], "", cells[4], cells[6]])
    if not lines:
        return []
    header = ["target", "loop", "ours", "models", "/models", "goal: result"]
    return _fenced("Targets: ours against the models floor", _render(header, lines))


def format_table(document: dict[str, Any]) -> str:
    """Return a result document as text: the targets first, then every row by loop."""
    settings = document.get("settings", {})
    machine = document.get("machine", {})
    load = machine.get("loadavg")
    out = [
        f"timer-sdk {document.get('timer_sdk', '?')} bench"
        f"{' --quick' if document.get('quick') else ''}: "
        f"{settings.get('rounds', '?')} round(s) of {settings.get('duration_s', '?')} s, "
        f"{machine.get('cpus', '?')} CPUs"
        + (f", load average {load[0]:.2f} at the start" if load else ""),
        "",
    ]
    against = document.get("against")
    if against:
        out += [f"↳ against: {against}, measured in the same run, under the same load.", ""]
    out += _headline(document)
    loops = list(dict.fromkeys(row["loop"] for row in document["rows"]))
    for loop in loops:
        lines: list[list[str] | str] = []
        group = None
        for row in document["rows"]:
            if row["loop"] != loop:
                continue
            if row["group"] != group:
                group = row["group"]
                lines.append(GROUP_TITLES.get(group, group))
            lines.append(
                [
                    _label(row),
                    _number(row["ours"], row["unit"]),
                    _number(row.get("models_floor"), row["unit"]),
                    _number(row["floor"], row["unit"]),
                    _ratio(row.get("models_ratio")),
                    _ratio(row["ratio"]),
                    _target(row),
                ]
            )
            if against:
                lines.append(_against_cells(row, "    ↳ against"))
        header = ["measurement", "ours", "models", "floor", "/models", "/floor", "target"]
        title = "In process, no event loop" if loop == "none" else f"Event loop {loop}"
        out += _fenced(title, _render(header, lines))
    out += [LEGEND, "", TARGET_NOTE] + (["", AGAINST_NOTE] if against else [])
    return "\n".join(out)
