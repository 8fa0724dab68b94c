"""Prometheus metrics from a real ``timer-sdk serve --metrics``, scraped over loopback."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from timer_sdk import EchoRequest, RemoteCallError, Timer, TimerClient
from timer_sdk.bench import metrics_cost
from timer_sdk.metrics import register
from timer_sdk.tools import cli
from timer_sdk.wire.codec import decode_item, encode_item

from .test_bus import Tally
from .test_workers import _finish

METRICS = re.compile(r"metrics at (http://\S+/metrics)")
DELAY_MS = 10  # of every other echo _calls makes
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@asynccontextmanager
async def serving(
    workers: int = 1, metrics: str = "tcp:127.0.0.1:0"
) -> AsyncIterator[tuple[str, list[str]]]:
    """``serve --metrics`` (port 0 by default); yield the server's address and each metrics URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "timer_sdk", "serve", "tcp:127.0.0.1:0",
        "--metrics", metrics, "--workers", str(workers),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        urls: list[str] = []
        address = None
        lines: list[str] = []
        try:
            async with asyncio.timeout(120):
                # A single server says where after its listening line, workers before it.
                while address is None or len(urls) < workers:
                    lines.append((await proc.stdout.readline()).decode())
                    assert lines[-1], f"the server exited before listening: {lines}"
                    if found := METRICS.search(lines[-1]):
                        urls.append(found.group(1))
                    elif listening := cli.LISTENING.search(lines[-1]):
                        address = listening.group(1)
        except TimeoutError:
            pytest.fail(f"not listening with {workers} metrics URLs after 120 s: {lines}")
        yield address, urls
    finally:
        if proc.returncode is None:
            proc.terminate()
        code, _, err = await _finish(proc)
        assert code == 0, err


async def scrape(url: str) -> Samples:
    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=30) as reply:
            body: bytes = reply.read()
        return body.decode()

    text = await asyncio.to_thread(fetch)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


async def _calls(address: str, echoes: int) -> None:
    """``echoes`` good echo calls and one bad one, two versions, seen by one subscriber."""
    async with (
        await TimerClient.connect(address, timeout=30) as subscriber,
        subscriber.events() as events,
        await TimerClient.connect(address, timeout=30) as client,
    ):
        for i in range(echoes):
            await client.echo(EchoRequest(message=str(i), delay_ms=DELAY_MS * (i % 2)))
        with pytest.raises(RemoteCallError):
            await client.call_raw("echo", encode_item({"req": {"message": 5, "delayMs": 0}}))
        await client.version()
        await client.version()
        await Tally().read_until(events, echoes)


async def test_a_scrape_counts_every_call() -> None:
    async with serving() as (address, [url]):
        await _calls(address, echoes=9)
        samples = await scrape(url)
    assert value(samples, "timer_sdk_requests_total", method="echo") == 10
    assert value(samples, "timer_sdk_requests_total", method="version") == 2
    # events.subscribe, and events.unsubscribe as the stream closed
    assert value(samples, "timer_sdk_requests_total", method="other") == 2
    assert value(samples, "timer_sdk_request_duration_seconds_count", method="echo") == 10
    assert value(samples, "timer_sdk_request_duration_seconds_bucket", method="echo",
                 le="+Inf") == 10  # fmt: skip
    assert value(samples, "timer_sdk_request_duration_seconds_count", method="version") == 2
    # Four echoes waited 10 ms each; uvloop's timers, in whole milliseconds, may end one early.
    duration_sum = value(samples, "timer_sdk_request_duration_seconds_sum", method="echo")
    assert duration_sum > 4 * (DELAY_MS - 1) / 1000
    assert value(samples, "timer_sdk_request_errors_total", method="echo") == 1
    assert value(samples, "timer_sdk_request_errors_total", method="version") == 0
    assert value(samples, "timer_sdk_error_replies_total") == 1
    assert value(samples, "timer_sdk_events_sent_total") == 9
    assert value(samples, "timer_sdk_events_dropped_total") == 0
    assert value(samples, "timer_sdk_connections_accepted_total") == 2
    assert value(samples, "timer_sdk_budget_limit_bytes") == 64 << 20
    assert ("process_cpu_seconds_total", frozenset()) in samples


async def test_a_scrape_under_two_workers_shows_each_worker() -> None:
    async with serving(workers=2) as (address, urls):
        assert len(urls) == 2
        await asyncio.gather(*(_calls(address, echoes=6) for _ in range(4)))
        scrapes = [await scrape(url) for url in urls]
    echoes = durations = 0.0
    seen = set()
    for samples in scrapes:
        # Every sample of one worker's scrape carries its label, and only its own.
        (worker,) = {dict(labels).get("worker") for name, labels in samples
                     if name.startswith("timer_sdk_")}  # fmt: skip
        assert worker is not None
        seen.add(worker)
        echoes += value(samples, "timer_sdk_requests_total", method="echo", worker=worker)
        durations += value(samples, "timer_sdk_request_duration_seconds_count", method="echo",
                           worker=worker)  # fmt: skip
    assert seen == {"0", "1"}
    assert echoes == durations == 4 * 7


def _two_free_ports() -> int:
    """A port P such that P and P+1 were both free a moment ago."""
    for _ in range(20):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two free ports side by side")


async def test_under_workers_worker_i_serves_its_own_metrics_on_port_plus_i() -> None:
    port = _two_free_ports()
    async with serving(workers=2, metrics=f"tcp:127.0.0.1:{port}") as (_, urls):
        scrapes = {url: await scrape(url) for url in urls}
    assert sorted(scrapes) == [f"http://127.0.0.1:{port + i}/metrics" for i in range(2)]
    for url, samples in scrapes.items():
        index = int(url.rsplit(":", 1)[1].removesuffix("/metrics")) - port
        assert ("timer_sdk_connections_open", frozenset({("worker", str(index))})) in samples


def test_embedding_registers_on_the_apps_registry() -> None:
    async def main() -> bytes:
        async with await Timer().serve("tcp:127.0.0.1:0") as server:
            registry = CollectorRegistry()
            register(server, registry, app="shop")
            async with await TimerClient.connect(server.address, timeout=30) as client:
                await client.version()
            return generate_latest(registry)

    text = asyncio.run(main()).decode()
    assert 'timer_sdk_requests_total{app="shop",method="version"} 1.0' in text
    assert 'timer_sdk_request_duration_seconds_count{app="shop",method="version"} 1.0' in text


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("tcp:0.0.0.0:9464", "will not serve metrics on every interface"),
        ("tcp:[::]:9464", "will not serve metrics on every interface"),
        ("unix:/tmp/m.sock", "expected tcp:HOST:PORT"),
    ],
)
def test_metrics_refuses_a_wildcard_or_non_tcp_address(
    flag: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--metrics", flag])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


async def test_serve_logs_json_lines_under_each_modules_name() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "timer_sdk", "serve", "tcp:127.0.0.1:0",
        "--log-format", "json", "--log-level", "info",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None and proc.stdout is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 60)
        entry = json.loads(line)
        listening = cli.LISTENING.search((await proc.stdout.readline()).decode())
        assert listening
        # A reply: the signal handlers are in place too.
        async with await TimerClient.connect(listening.group(1), timeout=30) as client:
            await client.version()
    finally:
        proc.terminate()
        code, _, err = await _finish(proc)
    assert entry["logger"] == "timer_sdk.server"
    assert entry["level"] == "info"
    assert entry["message"].startswith("timer 'ipc-server' listening on tcp:127.0.0.1:")
    assert code == 0, err
    entries = [json.loads(rest) for rest in err.splitlines()]
    assert all(e["logger"].startswith("timer_sdk.") for e in entries)
    # What serve prints for people on stdout at shutdown is a record for machines too.
    assert {"logger": "timer_sdk.shutdown", "level": "info", "message": "stopped"}.items() <= (
        entries[-1].items()
    )


async def test_top_says_why_a_tcp_server_without_stats_refuses() -> None:
    async with await Timer().serve("tcp:127.0.0.1:0") as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "timer_sdk", "top", server.address, "--count", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        code, out, err = await _finish(proc)
    assert code == 1
    assert "server.stats: not enabled on this server" in err
    assert "--stats" in err
    assert "Traceback" not in err + out


async def test_a_taken_metrics_port_stops_serve_with_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "timer_sdk", "serve", "tcp:127.0.0.1:0",
            "--metrics", f"tcp:127.0.0.1:{port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        code, _, err = await _finish(proc)
    assert code == 1
    assert f"--metrics tcp:127.0.0.1:{port}: Address already in use" in err
    assert "Traceback" not in err


def test_the_cost_measurement_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert metrics_cost.main(["--rounds", "1", "--duration", "0.05"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["load", "metrics", "off", "metrics", "on", "on/off"]
    # three loads, server CPU for the two pipelined ones, and a scrape's server CPU
    assert len(rows) == 7
    assert all(float(row.split()[-1]) > 0 for row in rows[1:])
    assert rows[-1].startswith("scrape /metrics, server CPU ms")


@pytest.mark.parametrize(
    ("where", "flags", "answers"),
    [("tcp", [], False), ("tcp", ["--stats"], True), ("unix", [], True),
     ("unix", ["--no-stats"], False)],
)  # fmt: skip
async def test_serve_answers_stats_as_its_flags_say(
    where: str, flags: list[str], answers: bool, tmp_path: Path
) -> None:
    address = f"unix:{tmp_path / 's.sock'}" if where == "unix" else "tcp:127.0.0.1:0"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "timer_sdk", "serve", address, *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        listening = cli.LISTENING.search(
            (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        )
        assert listening
        async with await TimerClient.connect(listening.group(1), timeout=30) as client:
            if answers:
                reply = decode_item(await client.call_raw("server.stats"))
                assert isinstance(reply, dict)
                assert reply["timer"] == "ipc-server"
            else:
                # The refusal says why, for this kind of address.
                why = (
                    "started with --no-stats" if where == "unix" else "only if started with --stats"
                )
                with pytest.raises(RemoteCallError, match=rf"server\.stats: not enabled.*{why}"):
                    await client.call_raw("server.stats")
    finally:
        proc.terminate()
        code, _, err = await _finish(proc)
    assert code == 0, err
