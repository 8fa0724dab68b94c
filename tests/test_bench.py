"""The benchmark: its floor speaks our bytes, and ``timer-sdk bench --quick`` runs.

No test here asserts a speed: CI machines are too noisy for that.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest

from timer_sdk import EchoRequest, Server, TimerClient
from timer_sdk.bench import GROUPS, main
from timer_sdk.bench.floor import FloorClient, FloorError, FloorServer, serve_floor
from timer_sdk.bench.loadgen import run_job
from timer_sdk.connection import Connection
from timer_sdk.framing import encode_request

from .conftest import RawConnection, probe_reads

VERSION = encode_request(b"version", b"\xa0")
ECHO = encode_request(b"echo", cbor2.dumps({"req": {"message": "hello", "delayMs": 0}}))
SLOW_ECHO = encode_request(b"echo", cbor2.dumps({"req": {"message": "slow", "delayMs": 20}}))
ROW_KEYS = {"group", "name", "unit", "ours", "floor", "ratio", "loop", "better", "target", "met",
            "reference", "detail"}  # fmt: skip


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


def test_loadgen_targets_only_loopback_and_bounds_its_jobs() -> None:
    job = {"mode": "pingpong", "request": VERSION.hex(), "duration": 0.1}
    with pytest.raises(ValueError, match=r"only targets 127\.0\.0\.1"):
        run_job({**job, "address": "tcp:192.0.2.1:9099"})
    with pytest.raises(ValueError, match="conns"):
        run_job({**job, "address": "tcp:127.0.0.1:9", "conns": 100_000})
    with pytest.raises(ValueError, match="at most"):
        run_job({**job, "address": "tcp:127.0.0.1:9", "duration": 1e6})


def test_unknown_group_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--only", "nosuch"]) == 2
    assert "unknown group 'nosuch'" in capsys.readouterr().err


def test_bench_quick_runs_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "timer_sdk", "bench", "--quick", "--loop", "asyncio",
            "--duration", "0.1", "--json", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stderr
    assert "| loop | measurement |" in done.stdout
    document = json.loads(out.read_text())
    assert document["schema"] == 1
    assert document["quick"] is True
    assert document["settings"]["loops"] == ["asyncio"]
    rows = document["rows"]
    expected = set(GROUPS) if sys.platform == "linux" else set(GROUPS) - {"memory"}
    assert {row["group"] for row in rows} == expected
    for row in rows:
        assert set(row) == ROW_KEYS, row
        assert isinstance(row["name"], str)
        assert row["unit"] in ("calls/s", "µs", "KiB", "MiB")
        assert row["loop"] in ("asyncio", "none")
        assert row["better"] in ("higher", "lower")
        assert row["ours"] > 0, row
        assert row["floor"] > 0, row
        assert math.isclose(row["ratio"], row["ours"] / row["floor"])
        assert row["met"] is None or isinstance(row["met"], bool)
    names = {row["name"] for row in rows}
    assert "ping-pong echo unix p50" in names
    assert "pipelined echo unix 4x32" in names
    assert "client gather version" in names
    assert "workers=2 echo tcp 8x32" in names


def test_python_dash_m_bench_has_help() -> None:
    argv = [sys.executable, "-m", "timer_sdk.bench", "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout
    assert "--loop" in done.stdout
