"""Every notebook in notebooks/ runs top to bottom on a real kernel, as stored.

Each notebook is executed with nbclient on the ``python3`` kernel (this
interpreter). Notebooks are committed executed, so that a reader sees values
and plots without running them. A fresh run must reproduce the stored
outputs, as nbval checks them: the same outputs cell by cell, once ports,
timings and (for the benchmark) every number are sanitized; plots are
compared by kind, not by pixel. One with a checker below also has the values
that came back checked, cell by cell, through the cells' tags, in the fresh
run and in the stored copy alike.

To store a notebook after changing it: ``python -m tests.test_notebooks``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

import timer_sdk
from timer_sdk.bench.table import _label, format_table

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))

# Collected after the last cell: a leaked socket or transport shows up as a
# ResourceWarning on stderr (the kernel is told to show them).
LEAK_CHECK = "import gc\ngc.collect()"


class Outputs:
    """The outputs of an executed notebook, by cell tag."""

    def __init__(self, nb: Any) -> None:
        self.cells: dict[str, Any] = {}
        for cell in nb.cells:
            for tag in cell.get("metadata", {}).get("tags", []):
                self.cells[tag] = cell

    def stdout(self, tag: str) -> str:
        return "".join(
            out["text"]
            for out in self.cells[tag]["outputs"]
            if out["output_type"] == "stream" and out["name"] == "stdout"
        )

    def result(self, tag: str) -> str:
        """The ``text/plain`` of the cell's value (its last expression)."""
        results = [
            out["data"]["text/plain"]
            for out in self.cells[tag]["outputs"]
            if out["output_type"] == "execute_result"
        ]
        assert len(results) == 1, f"cell {tag!r} has {len(results)} results"
        return str(results[0])


def read(path: Path, as_version: object = 4) -> Any:
    """Read a notebook (nbformat is untyped)."""
    return nbformat.read(path, as_version=as_version)  # type: ignore[no-untyped-call]


# Run after the benchmark notebook's cells: prints, as JSON, what its table and plots
# were drawn from. The notebook file itself is left as it is.
BENCHMARK_PROBE = """import json as _json
print(_json.dumps({
    "document": document,
    "rows": rows,
    "latency": [row["name"] for row in latency_rows],
    "rate": [row["name"] for row in rate_rows],
    "codec": [row["name"] for row in codec_rows],
}, default=str))"""
PROBES = {"benchmark.ipynb": BENCHMARK_PROBE}

# A test needs the table's shape and the plots, not a measurement: the benchmark runs
# with tiny windows here (every number is sanitized anyway). Stored runs keep the code.
TINY = {
    "benchmark.ipynb": (
        "Settings(quick=True, ",
        "Settings(quick=True, warmup=0.01, duration=0.05, ",
    )
}


def execute(path: Path, *, tiny: bool = False) -> Any:
    """Run the notebook at ``path`` in a fresh kernel; return it with its outputs.

    The last cell is the leak check and, for a notebook in PROBES, the one
    before it is its probe; neither is part of the stored notebook. ``tiny``
    runs a notebook in TINY with its shorter settings.
    """
    nb = read(path)
    swap = TINY.get(path.name) if tiny else None
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            if swap is not None and swap[0] in cell.source:
                cell.source = cell.source.replace(*swap)
                swap = None
    assert swap is None, f"{path.name}: no cell has {swap[0]!r} to shorten"
    probe = PROBES.get(path.name)
    if probe is not None:
        cell = nbformat.v4.new_code_cell(probe)  # type: ignore[no-untyped-call]
        cell.metadata["tags"] = ["probe"]
        nb.cells.append(cell)
    leak_check = nbformat.v4.new_code_cell(LEAK_CHECK)  # type: ignore[no-untyped-call]
    nb.cells.append(leak_check)
    env = {**os.environ, "PYTHONWARNINGS": "default::ResourceWarning"}
    # The kernel listens on Unix sockets, not on TCP ports found free by binding port 0:
    # a test running in parallel could take one of those before the kernel binds it.
    with tempfile.TemporaryDirectory() as sockets:

        class IpcKernelManager(KernelManager):
            def __init__(self, **kwargs: Any) -> None:
                super().__init__(transport="ipc", ip=str(Path(sockets, "k")), **kwargs)

        client = NotebookClient(
            nb,
            kernel_manager_class=IpcKernelManager,
            timeout=60,  # per cell
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute(env=env)
    return nb


def check_quickstart(nb: Any) -> None:
    out = Outputs(nb)
    version = timer_sdk.__version__
    assert out.result("imports") == repr(version)

    served = re.fullmatch(
        r"<Server tcp:127\.0\.0\.1:(\d+) timer='ipc-server' serving, \d+ connections>",
        out.result("server"),
    )
    assert served is not None, out.result("server")
    port = int(served.group(1))
    assert port != 0
    assert out.result("connect") == f"<TimerClient tcp:127.0.0.1:{port} open, 0 pending>"

    assert out.result("version") == repr(f"timer-sdk v{version}")
    assert out.result("echo") == (
        "EchoResponse(echoed='hello from the notebook', timer_name='ipc-server')"
    )
    assert out.result("complex") == (
        "ComplexResponse(summary='received 2 messages, note=n, retries=3', "
        "item_count=2, has_note=True)"
    )
    assert out.result("schedule") == (
        "ScheduleResult(job_id='ipc-server:nightly-report', will_run_count=120, "
        "first_run_at_ms=1007, effective_backoff_ms=100)"
    )

    assert out.stdout("error") == (
        "RemoteCallError is a CallError: True\nmessage: job name must not be empty\n"
    )
    assert out.result("error") == (
        "RemoteCallError(method='schedule', message='job name must not be empty')"
    )

    assert out.stdout("timeout") == (
        "gave up: echo: no reply within 0.1 s\npending: 1\nechoed: the next call\npending: 0\n"
    )

    assert re.fullmatch(r"1000 replies in \d+ ms, all matched: True\n", out.stdout("pipelined")), (
        out.stdout("pipelined")
    )

    started = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", out.stdout("process-start"))
    assert started is not None, out.stdout("process-start")
    remote_port = int(started.group(1))
    assert remote_port not in (0, port)
    assert out.stdout("process-call") == (
        f"<TimerClient tcp:127.0.0.1:{remote_port} open, 0 pending>\ntimer-sdk v{version}\n"
    )
    assert out.result("process-call") == (
        "EchoResponse(echoed='hello, other process', timer_name='ipc-server')"
    )
    assert out.stdout("process-stop").endswith("timer-sdk: stopped\nexit code: 0\n")

    assert "client = await timer_sdk.TimerClient.connect(...)" in out.stdout("sync-guard")

    assert out.stdout("close") == (
        f"<TimerClient tcp:127.0.0.1:{port} closed, 0 pending>\n"
        f"<Server tcp:127.0.0.1:{port} timer='ipc-server' closed, 0 connections>\n"
    )


def check_quiet(nb: Any) -> None:
    """The run wrote nothing to stderr, and every output is short."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert not (out["output_type"] == "stream" and out["name"] == "stderr"), out["text"]
            text = out.get("text", "") or out.get("data", {}).get("text/plain", "")
            assert text.count("\n") <= 10, f"a long output:\n{text}"


def check_events(nb: Any) -> None:
    out = Outputs(nb)
    remote = out.stdout("remote").splitlines()
    assert remote == [f"message='tick {i}' echo_count=1" for i in range(5)] + [
        "received in order: True"
    ]
    assert out.stdout("local").splitlines() == [
        "EventsDropped(count=2)",
        "message='local 2' echo_count=1",
        "message='local 3' echo_count=1",
    ]
    assert out.stdout("close").strip() == "closed"


def check_benchmark(nb: Any) -> None:
    """The values the table and the three plots are drawn from, not only that cells ran."""
    drawn = json.loads(Outputs(nb).stdout("probe"))
    rows = drawn["rows"]
    by_name = {row["name"]: row for row in rows}
    for row in rows:
        assert row["ours"] > 0, row
        assert row["floor"] > 0, row
        assert math.isclose(row["ratio"], row["ours"] / row["floor"]), row
    # Ping-pong: one latency curve per transport, from 100 rising percentiles each.
    assert sorted(drawn["latency"]) == [
        f"ping-pong {method} {transport} p50"
        for method in ("echo", "version")
        for transport in ("tcp", "unix")
    ]
    for name in drawn["latency"]:
        for who in ("ours", "floor"):
            curve = by_name[name]["detail"][f"{who}_percentiles_us"]
            assert len(curve) >= 100
            assert all(0 < a <= b for a, b in itertools.pairwise(curve[:100])), curve[:100]
    # Throughput bars: every calls/s row outside ping-pong, pipelined and workers included.
    assert drawn["rate"] == [
        row["name"] for row in rows if row["unit"] == "calls/s" and row["group"] != "ping-pong"
    ]
    assert {"pipelined echo unix 4x32", "client gather version"} <= set(drawn["rate"])
    assert any(name.startswith("workers=2 ") for name in drawn["rate"])
    # Codec bars: four steps of a call per method, and their sum, which the bars add up to.
    steps = ("client encode", "server decode", "server encode", "client decode")
    for method in ("echo", "version"):
        names = [f"codec {method}: {step}" for step in steps]
        assert set(names) <= set(drawn["codec"])
        total = by_name[f"codec {method}: all four steps"]
        for who in ("ours", "floor"):
            assert math.isclose(sum(by_name[n][who] for n in names), total[who])
    assert len(drawn["codec"]) == 10
    # The first cell's summary and the table describe the same rows, and each plot drew.
    first = nb.cells[1]
    assert first.outputs[0]["text"].startswith(f"{len(rows)} rows in ")
    table = nb.cells[2].outputs[0]["data"]["text/markdown"]
    for row in rows:
        assert _label(row) in table, _label(row)
    images = [
        cell
        for cell in nb.cells
        if any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))
    ]
    assert len(images) == 3


CHECKS: dict[str, Callable[[Any], None]] = {
    "quickstart.ipynb": check_quickstart,
    "events.ipynb": check_events,
    "benchmark.ipynb": check_benchmark,
}
"""Per-notebook checks of the values that came back."""

QUIET = {"quickstart.ipynb"}
"""Notebooks that must run without stderr and with short outputs."""


SANITIZE_NUMBERS = {"benchmark.ipynb"}
"""Notebooks whose every number is a measurement."""

_SANITIZERS = [
    (re.compile(r"127\.0\.0\.1:\d+"), "127.0.0.1:PORT"),
    (re.compile(r"\b\d+(\.\d+)? ?(ms|s|µs)\b"), "N ms"),
    (re.compile(r"\b0x[0-9a-f]+\b"), "0xADDRESS"),
]


def sanitize(text: str, numbers: bool) -> str:
    for pattern, replacement in _SANITIZERS:
        text = pattern.sub(replacement, text)
    if numbers:
        # What a run measured changes verdicts, column widths and so where a long note
        # wraps: none of it may change what is compared, so line breaks fold too.
        text = re.sub(r"\b(met|MISSED|n/a)\b", "RESULT", text)
        text = re.sub(r"\d[\d,.]*", "N", text)
        text = re.sub(r"\s+", " ", text)
    return text


def comparable(nb: Any, numbers: bool) -> list[list[tuple[str, ...]]]:
    """Each code cell's outputs as nbval compares them: kind, stream, sanitized text.

    Images are compared by kind only (nbval skips their bytes too).
    """
    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs: list[tuple[str, ...]] = []
        for out in cell.outputs:
            if out.output_type == "stream":
                # How a stream is cut into messages depends on timing: join them, as nbval does.
                if outputs and outputs[-1][:2] == ("stream", out.name):
                    outputs[-1] = ("stream", out.name, outputs[-1][2] + out.text)
                else:
                    outputs.append(("stream", out.name, out.text))
            elif out.output_type in ("execute_result", "display_data"):
                data = out.data
                texts = [
                    sanitize(data[k], numbers) for k in ("text/plain", "text/markdown") if k in data
                ]
                outputs.append((out.output_type, ",".join(sorted(data)), *texts))
            else:
                outputs.append((out.output_type, out.get("ename", ""), out.get("evalue", "")))
        cells.append(
            [(*o[:2], sanitize(o[2], numbers)) if o[0] == "stream" else o for o in outputs]
        )
    return cells


def test_the_quickstart_is_there() -> None:
    assert NOTEBOOKS / "quickstart.ipynb" in PATHS


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_is_stored_executed_and_valid(path: Path) -> None:
    nb = read(path, as_version=nbformat.NO_CONVERT)
    assert nb.nbformat == 4
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), "not stored as one run from the top"
    for cell in code:
        assert cell.outputs or not cell.source.strip(), "a cell is stored without its outputs"
        assert not any(out.output_type == "error" for out in cell.outputs), "stored with an error"
    check = CHECKS.get(path.name)
    if check is not None and path.name not in PROBES:  # a probe runs only in a fresh kernel
        check(nb)  # what a reader sees is right, not only what a fresh run gives
    if path.name in QUIET:
        check_quiet(nb)
    assert path.stat().st_size < 300_000, "keep the stored notebook small"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_runs_and_reproduces_its_stored_outputs(path: Path) -> None:
    nb = execute(path, tiny=True)  # raises CellExecutionError if a cell raises
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.execution_count is not None, "a cell did not run"
    check = CHECKS.get(path.name)
    if check is not None:
        check(nb)
    if path.name in QUIET:
        check_quiet(nb)
    probed = Outputs(nb).stdout("probe") if path.name in PROBES else None
    nb.cells.pop()  # the leak check: its outputs were checked above, if quiet
    if path.name in PROBES:
        nb.cells.pop()
    numbers = path.name in SANITIZE_NUMBERS
    fresh = comparable(nb, numbers)
    stored = comparable(read(path), numbers)
    assert len(fresh) == len(stored), "cells added or removed: store the notebook again"
    for i, (new, old) in enumerate(zip(fresh, stored, strict=True)):
        assert new == old, f"code cell {i + 1} differs from the stored outputs"
    if path.name == "benchmark.ipynb":
        assert probed is not None
        check_any_verdict_reproduces(json.loads(probed)["document"], stored)


def check_any_verdict_reproduces(document: Any, stored: list[list[tuple[str, ...]]]) -> None:
    """The table of this run, with every target forced met, MISSED or unknown, still
    compares equal to the stored one: a stored output never hangs on a measurement."""
    targeted = [row for row in document["rows"] if row.get("target")]
    assert targeted, "no row has a target: nothing would be forced"
    for verdict in (True, False, None):
        for row in targeted:
            row["met"] = verdict
        table = sanitize(format_table(document), numbers=True)
        assert stored[1][0][3] == table, f"every target forced to met={verdict}"  # markdown


def store(path: Path) -> None:
    """Execute the notebook at ``path`` and store it with its outputs."""
    nb = execute(path)
    nb.cells.pop()  # the leak check
    if path.name in PROBES:
        nb.cells.pop()
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(nb, path)  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    for name in sys.argv[1:] or [p.name for p in PATHS]:
        store(NOTEBOOKS / name)
        print("stored", name)
