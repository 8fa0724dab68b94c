"""The benchmark: its floor speaks our bytes, and ``timer-sdk bench --quick`` runs.

No test here asserts a speed: CI machines are too noisy for that.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cbor2
import pytest

from timer_sdk import EchoRequest, EchoResponse, Server, TimerClient
from timer_sdk.bench import GROUPS, TARGETS, Row, format_table, main
from timer_sdk.bench.floor import FloorClient, FloorError, FloorServer, serve_floor
from timer_sdk.bench.loadgen import run_job
from timer_sdk.bench.models_floor import ModelsFloorClient, serve_models_floor
from timer_sdk.bench.processes import ServerProcess, start
from timer_sdk.bench.rows import WORKER_COUNTS, Settings, estimate_seconds
from timer_sdk.models import EchoParams, VersionParams
from timer_sdk.serving.connection import Connection
from timer_sdk.wire.framing import encode_reply, encode_request

from .conftest import RawConnection, probe_reads

VERSION = encode_request(b"version", b"\xa0")
ECHO = encode_request(b"echo", cbor2.dumps({"req": {"message": "hello", "delayMs": 0}}))
SLOW_ECHO = encode_request(b"echo", cbor2.dumps({"req": {"message": "slow", "delayMs": 20}}))
SCHEDULE: dict[str, dict[str, object]] = {
    "job": {"name": "j", "payload": ["p"], "priority": 1},
    "retry": {"maxAttempts": 3, "backoffMs": 100, "retryOn": ["timeout"]},
    "schedule": {"startAtMs": 1000, "intervalMs": 500, "jitter": 7},
}
EVERY_METHOD = [
    VERSION,
    SLOW_ECHO,
    ECHO,
    encode_request(b"complex", cbor2.dumps({"req": {"messages": [], "tags": ["t"], "note": "n"}})),
    encode_request(b"schedule", cbor2.dumps(SCHEDULE)),
    encode_request(b"schedule", cbor2.dumps({**SCHEDULE, "job": {**SCHEDULE["job"], "name": ""}})),
    encode_request(b"nosuch", b"\xa0"),
    ECHO,
]
ROW_KEYS = {"group", "name", "unit", "ours", "floor", "ratio", "loop", "better", "target", "met",
            "reference", "detail", "models_floor", "models_ratio", "target_basis", "against",
            "against_skipped"}  # fmt: skip


async def test_floor_answers_the_same_bytes_as_ours(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    floor_address = (
        f"unix:{tmp_path / 'floor.sock'}"
        if server.address.startswith("unix:")
        else "tcp:127.0.0.1:0"
    )
    version = await server.timer.version()
    floor, floor_address = await serve_floor(floor_address, version, server.timer.name)
    try:
        replies: dict[str, list[tuple[int, bytes]]] = {}
        reads = {
            "ours": probe_reads(monkeypatch, Connection),
            "floor": probe_reads(monkeypatch, FloorServer),
        }
        for name, address in (("ours", server.address), ("floor", floor_address)):
            conn = await RawConnection.open(address)
            try:
                # Split mid-frame (each server reads the 3 bytes alone), pipelined, and a
                # delayed echo ahead of a quick one.
                data = VERSION + ECHO + SLOW_ECHO + ECHO
                await conn.send(data[:3])
                await reads[name].until(3)
                assert reads[name].sizes == [3]
                await conn.send(data[3:])
                replies[name] = [await conn.recv_reply() for _ in range(4)]
            finally:
                await conn.close()
        assert replies["floor"] == replies["ours"]
        assert cbor2.loads(replies["ours"][2][1])["echoed"] == "slow"
    finally:
        floor.close()
        await floor.wait_closed()


async def test_floor_client_gets_what_our_client_gets(server: Server) -> None:
    ours = await TimerClient.connect(server.address, timeout=30)
    floor = await FloorClient.connect(server.address)
    try:
        assert await floor.call(b"version", {}) == await ours.version()
        reply = await ours.echo(EchoRequest(message="m", delay_ms=0))
        floor_reply = await floor.call(b"echo", {"req": {"message": "m", "delayMs": 0}})
        assert floor_reply == {"echoed": reply.echoed, "timerName": reply.timer_name}
        with pytest.raises(FloorError, match="unknown method: nosuch"):
            await floor.call(b"nosuch", {})
    finally:
        await ours.close()
        await floor.close()


async def test_models_floor_answers_the_same_bytes_as_ours(server: Server, tmp_path: Path) -> None:
    models_address = (
        f"unix:{tmp_path / 'models.sock'}"
        if server.address.startswith("unix:")
        else "tcp:127.0.0.1:0"
    )
    floor, models_address = await serve_models_floor(models_address, server.timer.name)
    try:
        replies: dict[str, list[tuple[int, bytes]]] = {}
        for name, address in (("ours", server.address), ("models floor", models_address)):
            conn = await RawConnection.open(address)
            try:
                # Pipelined, a delayed echo ahead of quick calls, an error from a proc, an
                # unknown method, and the last frame cut after the first reply came back.
                data = b"".join(EVERY_METHOD)
                cut = len(data) - len(ECHO) + 5
                await conn.send(data[:cut])
                first = await conn.recv_reply()
                await conn.send(data[cut:])
                replies[name] = [first] + [await conn.recv_reply() for _ in EVERY_METHOD[1:]]
            finally:
                await conn.close()
        assert replies["models floor"] == replies["ours"]
        assert [ret for ret, _ in replies["ours"]] == [0, 0, 0, 0, 0, 1, 1, 0]
        assert cbor2.loads(replies["ours"][1][1])["echoed"] == "slow"
        assert replies["ours"][5][1] == b"job name must not be empty"
    finally:
        floor.close()
        await floor.wait_closed()


async def test_models_floor_client_gets_the_models_our_client_gets(server: Server) -> None:
    ours = await TimerClient.connect(server.address, timeout=30)
    floor = await ModelsFloorClient.connect(server.address)
    try:
        request = EchoRequest(message="m", delay_ms=0)
        assert await floor.call_model(b"version", VersionParams()) == await ours.version()
        reply = await floor.call_model(b"echo", EchoParams(req=request))
        assert reply == await ours.echo(request)
        assert isinstance(reply, EchoResponse)
        with pytest.raises(FloorError, match="unknown method: nosuch"):
            await floor.call(b"nosuch", {})
    finally:
        await ours.close()
        await floor.close()


def test_loadgen_targets_only_loopback_and_bounds_its_jobs() -> None:
    job = {"mode": "pingpong", "request": VERSION.hex(), "duration": 0.1}
    with pytest.raises(ValueError, match=r"only targets 127\.0\.0\.1 and ::1"):
        run_job({**job, "address": "tcp:192.0.2.1:9099"})
    with pytest.raises(ValueError, match="conns"):
        run_job({**job, "address": "tcp:127.0.0.1:9", "conns": 100_000})
    with pytest.raises(ValueError, match="at most"):
        run_job({**job, "address": "tcp:127.0.0.1:9", "duration": 1e6})


def test_unknown_group_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--only", "nosuch"]) == 2
    assert "unknown group 'nosuch'" in capsys.readouterr().err


@pytest.fixture
def second_server() -> Iterator[ServerProcess]:
    """A second instance of our server, in its own process: the "foreign" server."""
    server = start("ours", "tcp:127.0.0.1:0", "asyncio")
    try:
        yield server
    finally:
        server.stop()


def _run_bench(*args: str) -> tuple[str, dict[str, Any]]:
    """Run ``timer-sdk bench --quick`` with ``args`` in a subprocess; return its table and JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        argv = [sys.executable, "-m", "timer_sdk", "bench", "--quick", "--loop", "asyncio",
                "--json", str(out), *args]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=110, check=False)
        assert done.returncode == 0, done.stderr
        # Before anything is measured, it says how long it will take.
        first = done.stderr.splitlines()[0]
        assert re.fullmatch(r"bench: +\d+\.\d s  this run takes about \d+ s: .+ on asyncio", first)
        return done.stdout, json.loads(out.read_text())


def test_bench_quick_runs_against_a_second_server(second_server: ServerProcess) -> None:
    against = second_server.address
    table, document = _run_bench("--duration", "0.05", "--against", against)
    widest = max(table.splitlines(), key=len)
    assert len(widest) <= 100, widest
    assert table.index("Targets: ours against the models floor") < table.index("Event loop")
    assert f"↳ against: {against}" in table
    assert "skip: tcp address" in table  # on every unix row
    assert "reference" not in table
    assert document["schema"] == 1
    assert document["quick"] is True
    assert document["against"] == against
    assert document["settings"]["loops"] == ["asyncio"]
    assert len(document["machine"]["loadavg"]) == 3
    rows = document["rows"]
    linux = sys.platform == "linux"
    expected = set(GROUPS) if linux else set(GROUPS) - {"memory"}
    assert {row["group"] for row in rows} == expected
    for row in rows:
        assert set(row) == ROW_KEYS, row
        assert isinstance(row["name"], str)
        assert row["unit"] in ("calls/s", "µs", "KiB", "MiB")
        assert row["loop"] in ("asyncio", "none")
        assert row["better"] in ("higher", "lower")
        for who in ("ours", "floor", "models_floor"):
            assert row[who] > 0, (who, row)
        assert math.isclose(row["ratio"], row["ours"] / row["floor"])
        assert math.isclose(row["models_ratio"], row["ours"] / row["models_floor"])
        assert row["reference"] is None
        assert (row["target"] is None) == (row["name"] not in TARGETS), row
        assert row["met"] is None or isinstance(row["met"], bool)
        # The second server speaks tcp: it is measured on every tcp server row, and
        # every other row says why not.
        measured = row["group"] in ("ping-pong", "pipelined") and " tcp" in row["name"]
        assert (row["against"] is not None) == measured, row
        assert (row["against_skipped"] is None) == measured, row
        if measured:
            assert row["against"] > 0, row
    by_name = {row["name"]: row for row in rows}
    assert by_name["ping-pong echo unix p50"]["against_skipped"] == "tcp address"
    assert by_name["workers=2 echo tcp 8x32"]["against_skipped"] == "not ours to start"
    assert by_name["client gather echo"]["against_skipped"] == "client row"
    assert by_name["codec echo: all four steps"]["against_skipped"] == "in process"
    for name in TARGETS:
        if linux or "CPU" not in name:
            assert by_name[name]["target"], name
    if linux:
        cpu = by_name["server CPU per pipelined echo unix 4x32"]
        assert cpu["target_basis"] == "value"
        assert cpu["against_skipped"] == "tcp address"
        assert cpu["met"] == (cpu["ours"] <= 12)
        assert by_name["server RSS per idle connection"]["against_skipped"] == "not our process"
    pipelined = by_name["pipelined echo unix 4x32"]
    assert pipelined["target_basis"] == "models floor"
    assert pipelined["met"] == (pipelined["models_ratio"] >= 1.2)


def test_bench_against_the_floor_server(tmp_path: Path) -> None:
    # The floor as a stand-in for another implementation: it shares no code with ours.
    address = f"unix:{tmp_path / 'foreign.sock'}"
    foreign = start("floor", address, "asyncio")
    try:
        table, document = _run_bench("--only", "ping-pong", "--duration", "0.05",
                                     "--against", address)  # fmt: skip
    finally:
        foreign.stop()
    rows = document["rows"]
    assert {row["group"] for row in rows} == {"ping-pong"}
    for row in rows:
        if " unix" in row["name"]:
            assert row["against"] > 0, row
        else:
            assert row["against"] is None, row
            assert row["against_skipped"] == "unix address", row
    assert "skip: unix address" in table


def test_targets_bound_the_models_ratio_or_the_value() -> None:
    def row(name: str, ours: float, models: float, unit: str = "calls/s") -> Row:
        return Row("g", name, unit, ours, 1.0, "asyncio", "higher", models_floor=models)

    assert row("pipelined echo unix 4x32", 120.0, 100.0).met is True
    assert row("pipelined echo unix 4x32", 119.0, 100.0).met is False
    assert row("ping-pong echo tcp p50", 50.0, 50.0, "µs").met is True
    assert row("ping-pong echo tcp p50", 51.0, 50.0, "µs").met is False
    cpu = row("server CPU per pipelined echo unix 4x32", 12.5, 5.0, "µs")
    assert (cpu.target, cpu.target_basis, cpu.met) == ("<= 12", "value", False)
    untargeted = row("pipelined echo tcp 4x32", 1.0, 100.0)
    assert (untargeted.target, untargeted.met) == (None, None)


def test_the_table_fits_100_columns_whatever_the_against_server_says() -> None:
    rows = [
        Row("pipelined", "pipelined echo unix 4x32", "calls/s", 123_456.0, 234_567.0, "uvloop",
            "higher", models_floor=111_111.0, against=1_234_567.0),
        Row("pipelined", "server CPU per pipelined echo unix 4x32", "µs", 123.0, 4.5, "uvloop",
            "lower", models_floor=12.0, against_skipped="not our process"),
        Row("ping-pong", "ping-pong echo tcp p50", "µs", 1_234.0, 50.0, "uvloop", "lower",
            models_floor=60.0, against_skipped="failed: " + "the server closed the connection" * 9),
    ]  # fmt: skip
    document = {"rows": [asdict(r) for r in rows], "against": "tcp:[::1]:65535", "quick": True}
    table = format_table(document)
    assert max(len(line) for line in table.splitlines()) <= 100, table
    assert "…" not in table, "a long note is wrapped whole, never cut"
    assert "skip: failed: " + "the server closed the connection" * 9 in " ".join(table.split())
    assert "skip: not our process" in table
    assert "= 10.00 of ours" in table
    assert table.index("Targets:") < table.index("Event loop uvloop")


def test_against_refuses_what_it_cannot_load(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["--against", "tcp:192.0.2.1:9099", "--only", "codec"]) == 2
    assert "only loopback (127.0.0.1, ::1), not 192.0.2.1" in capsys.readouterr().err
    assert main(["--against", "localhost:9099", "--only", "codec"]) == 2
    assert "--against wants unix:PATH or tcp:127.0.0.1:PORT" in capsys.readouterr().err
    assert main(["--against", f"unix:{tmp_path / 'nothing.sock'}", "--only", "codec"]) == 2
    assert "nothing.sock: cannot connect" in capsys.readouterr().err


def test_python_dash_m_bench_has_help() -> None:
    argv = [sys.executable, "-m", "timer_sdk.bench", "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout
    assert "--loop" in done.stdout


def test_timeout_targets_bound_ours_over_ours_without_a_timeout() -> None:
    def row(name: str, ours: float, untimed: float) -> Row:
        detail = {"untimed": untimed, "vs_untimed": ours / untimed if untimed else math.nan}
        return Row("client", name, "calls/s", ours, 1.0, "asyncio", "higher",
                   models_floor=1.0, detail=detail)  # fmt: skip

    assert row("client gather echo, timeout=5", 95.0, 100.0).met is True
    assert row("client gather echo, timeout=5", 94.0, 100.0).met is False
    default = row("client gather echo, client timeout=5", 94.0, 100.0)
    assert (default.target, default.target_basis, default.met) == (">= 0.95", "untimed", False)
    assert row("client gather echo, timeout=5", 95.0, 0.0).met is None


def test_a_timeout_rows_target_shows_the_number_it_compares() -> None:
    # Its /models column passes the bound; the target is on ours over ours untimed.
    detail = {"untimed": 100.0, "vs_untimed": 0.93}
    row = Row("client", "client gather echo, timeout=5", "calls/s", 93.0, 1.0, "asyncio",
              "higher", models_floor=60.0, detail=detail)  # fmt: skip
    table = format_table({"rows": [asdict(row)], "quick": True})
    [line] = [line for line in table.splitlines() if line.startswith("client gather echo")]
    assert line.endswith("1.55  ours/untimed 0.93 ≥ 0.95: MISSED"), line


def test_the_workers_title_names_every_count_it_measures() -> None:
    rows = [
        Row("workers", f"workers={n} echo tcp 8x32", "calls/s", 1.0, 1.0, "asyncio", "higher")
        for n in WORKER_COUNTS
    ]
    table = format_table({"rows": [asdict(r) for r in rows]})
    assert "workers: serve --workers 1, 2 and 4, one TCP port" in table
    for n in WORKER_COUNTS:
        assert f"workers={n} echo" in table


def test_the_estimate_grows_with_what_is_run() -> None:
    quick = Settings(quick=True, loops=("asyncio",)).resolved()
    full = Settings(loops=("asyncio",)).resolved()
    assert 10 < estimate_seconds(quick) < estimate_seconds(full)
    both = Settings(quick=True, loops=("asyncio", "asyncio")).resolved()
    assert estimate_seconds(quick) < estimate_seconds(both) < 2 * estimate_seconds(quick)


class _SlowAfterTheFirst:
    """A server thread that answers its first request at once and each later one 0.2 s late:
    the stand-in for a machine too busy to answer within a measuring window."""

    REPLY = encode_reply(0, cbor2.dumps("v"))

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        self.address = f"unix:{path}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        first = True
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                threading.Thread(target=self._answer, args=(conn, first), daemon=True).start()
                first = False

    def _answer(self, conn: socket.socket, first: bool) -> None:
        with conn, contextlib.suppress(OSError):
            while conn.recv(len(VERSION), socket.MSG_WAITALL):
                if not first:
                    time.sleep(0.2)
                first = False
                conn.sendall(self.REPLY)


@pytest.mark.parametrize("mode", ["pingpong", "pipeline"])
def test_a_window_too_short_to_see_a_reply_measures_one_at_least(mode: str, tmp_path: Path) -> None:
    # A window of 0 s, with replies 0.2 s late: it reports the calls it waited for, not
    # none (a rate of 0 calls/s, or no latency at all).
    server = _SlowAfterTheFirst(tmp_path / "slow.sock")
    job = {"mode": mode, "address": server.address, "request": VERSION.hex(),
           "warmup": 0.01, "duration": 0, "depth": 1}  # fmt: skip
    try:
        result = run_job(job)
    finally:
        server.listener.close()
    assert result["calls"] >= 1
    assert result["seconds"] >= 0.1
