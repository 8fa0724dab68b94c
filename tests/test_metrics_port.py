"""The metrics port is bounded like the RPC port: real ``serve --metrics`` processes, loopback."""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import socket
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from timer_sdk import Timer, TimerClient
from timer_sdk.errors import AddressError
from timer_sdk.metrics import MetricsServer, serve_metrics
from timer_sdk.serving.metrics_address import metrics_address
from timer_sdk.tools import cli

from .test_faults import LOOPS, cpu_seconds
from .test_metrics import METRICS
from .test_workers import _finish

NOFILE = 1024  # the common default limit
ATTACKERS = 1100  # more than the server has descriptors
HALF_HEAD = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow"  # never finished


@contextlib.asynccontextmanager
async def limited_serve(loop: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, str]]:
    """``serve --metrics`` with at most ``NOFILE`` descriptors; yield it, its address, its URL."""
    run = (
        "import resource, runpy, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE})); "
        "sys.argv = ['timer-sdk', *sys.argv[1:]]; "
        "runpy.run_module('timer_sdk', run_name='__main__')"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", run, "serve", "tcp:127.0.0.1:0", "--loop", loop,
        "--metrics", "tcp:127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            listening = cli.LISTENING.search((await proc.stdout.readline()).decode())
            metrics = METRICS.search((await proc.stdout.readline()).decode())
        assert listening and metrics
        yield proc, listening.group(1), metrics.group(1)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await _finish(proc)


def _threads(pid: int) -> int:
    found = re.search(r"Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    assert found
    return int(found.group(1))


def _descriptors(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def _half_open(port: int, count: int) -> list[asyncio.StreamWriter]:
    """``count`` connections that each send part of a request head, then nothing more.

    Connects that do not complete within 10 s (a full accept queue) are given up.
    """
    writers: list[asyncio.StreamWriter] = []
    room = asyncio.Semaphore(64)

    async def one() -> None:
        async with room:
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(10):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(HALF_HEAD)
                writers.append(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    return writers


async def _scrape(url: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()

    return await asyncio.to_thread(fetch)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_half_open_connections_to_the_metrics_port_leave_the_rpc_port_served(
    loop: str,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < ATTACKERS + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= ATTACKERS + 200, "needs descriptors"
    async with limited_serve(loop) as (proc, address, url):
        pid = proc.pid
        threads = _threads(pid)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        peak = 0

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, _descriptors(pid))
                await asyncio.sleep(0.005)

        sampler = asyncio.ensure_future(sample())
        attack = await _half_open(port, ATTACKERS)
        sampler.cancel()
        try:
            before = cpu_seconds(pid)
            started = time.perf_counter()
            # New RPC connections, each answered within a second while the attack holds.
            waits = []
            for _ in range(3):
                began = time.perf_counter()
                try:
                    async with asyncio.timeout(1):
                        client = await TimerClient.connect(address, timeout=1)
                        async with client:
                            await client.version()
                except (OSError, TimeoutError) as exc:
                    pytest.fail(f"a new RPC connection failed during the attack: {exc!r}")
                waits.append(time.perf_counter() - began)
            # A real scrape while the half-open connections are still held.
            status, body = await _scrape(url)
            await asyncio.sleep(1.0)  # a measuring window, not a synchronisation
            busy = (cpu_seconds(pid) - before) / (time.perf_counter() - started)
            held, during = _descriptors(pid), _threads(pid)
        finally:
            for writer in attack:
                writer.transport.abort()
    assert len(attack) >= ATTACKERS // 2, f"only {len(attack)} connections got through"
    assert max(waits) < 1.0, waits
    assert busy < 0.25, f"the server used {busy:.0%} of a core while the attack was held"
    assert during == threads, "no thread per connection"
    # Listening sockets, the cap, an accept queue's worth; never the process's 1024.
    assert held < 64 and peak < 64, f"{held} descriptors held, {peak} at the peak"
    assert status == 200
    assert "timer_sdk_requests_total" in body


# --- the HTTP server itself, in process ----------------------------------------


@contextlib.asynccontextmanager
async def metrics_port(**bounds: Any) -> AsyncIterator[tuple[MetricsServer, int]]:
    """A server with ``serve_metrics`` on loopback; yield it and its port."""
    async with await Timer().serve("tcp:127.0.0.1:0") as server:
        metrics = await serve_metrics(server, "tcp:127.0.0.1:0", **bounds)
        try:
            yield metrics, int(metrics.url.rsplit(":", 1)[1].removesuffix("/metrics"))
        finally:
            await metrics.close()


async def _exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(30):
            return await reader.read()
    finally:
        writer.close()


def _parts(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *fields = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    return status, headers, body


@pytest.mark.parametrize(
    ("request_head", "status", "says"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "200 OK", b"timer_sdk_requests_total"),
        (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", "200 OK", b"timer_sdk_requests_total"),
        (b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
         "200 OK", b"# EOF\n"),
        (b"HEAD /metrics HTTP/1.1\r\n\r\n", "200 OK", b""),
        (b"POST /metrics HTTP/1.1\r\n\r\n", "405 Method Not Allowed", b"GET or HEAD"),
        (b"GET / HTTP/1.1\r\n\r\n", "404 Not Found", b"metrics are at /metrics"),
        (b"\x16\x03\x01\x02\x00\r\n\r\n", "400 Bad Request", b"METHOD /metrics HTTP/1.1"),
        (b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 2000, "431 Request Header Fields Too Large",
         b"over 8 KiB"),
    ],
)  # fmt: skip
async def test_each_request_gets_one_answer_then_the_connection_closes(
    request_head: bytes, status: str, says: bytes
) -> None:
    async with metrics_port() as (_, port):
        response = await _exchange(port, request_head)
    line, headers, body = _parts(response)
    assert line == f"HTTP/1.1 {status}"
    assert headers["connection"] == "close"
    assert says in body
    if request_head.startswith(b"HEAD"):
        assert int(headers["content-length"]) > 1000
    else:
        assert int(headers["content-length"]) == len(body)
    if says == b"# EOF\n":
        assert headers["content-type"].startswith("application/openmetrics-text")
    if status.startswith("405"):
        assert headers["allow"] == "GET, HEAD"


async def test_a_request_head_not_sent_in_time_is_answered_408_and_closed() -> None:
    async with metrics_port(timeout=0.2) as (_, port):
        # The deadline is the server's own: the read ends when it closes.
        slow = await _exchange(port, HALF_HEAD)
        silent = await _exchange(port, b"")
    assert _parts(slow)[0] == _parts(silent)[0] == "HTTP/1.1 408 Request Timeout"


ESTABLISHED = "01"  # a connection's state in /proc/net/tcp while both ends have it open


def _tcp_state(local_port: int, remote_port: int) -> str | None:
    """The kernel's state of the loopback connection from ``local_port`` to ``remote_port``."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if local.endswith(f":{local_port:04X}") and remote.endswith(f":{remote_port:04X}"):
            return state
    return None


def _largest_send_buffer() -> int:
    """The most a TCP socket's send buffer may grow to, in bytes."""
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


async def test_a_reply_not_taken_in_time_is_cut_off_and_the_connection_closed() -> None:
    # A reply larger than the kernel can buffer for it, to a scraper that reads nothing:
    # the rest waits in the server. Over 100 samples carry the label (long values stand
    # in for many series), so the reply is over twice the largest send buffer.
    labels = {"instance": "x" * (_largest_send_buffer() // 50)}
    loop = asyncio.get_running_loop()
    async with metrics_port(labels=labels, timeout=0.2) as (_, port):
        with socket.socket() as scraper:
            scraper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the smallest window
            scraper.setblocking(False)
            await loop.sock_connect(scraper, ("127.0.0.1", port))
            await loop.sock_sendall(scraper, b"GET /metrics HTTP/1.1\r\n\r\n")
            async with asyncio.timeout(10):  # the deadline closes the server's end
                while _tcp_state(port, scraper.getsockname()[1]) == ESTABLISHED:
                    await asyncio.sleep(0.01)
            response = b""
            with contextlib.suppress(ConnectionResetError):
                async with asyncio.timeout(30):
                    while chunk := await loop.sock_recv(scraper, 1 << 20):
                        response += chunk
    status, headers, body = _parts(response)
    assert status == "HTTP/1.1 200 OK"
    assert len(body) < int(headers["content-length"])  # what the server held was dropped


async def test_past_the_cap_a_new_connection_closes_the_oldest_and_a_scrape_is_served() -> None:
    async with metrics_port(max_connections=2) as (_, port):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for _, writer in held:
            writer.write(HALF_HEAD)
        # A third connection, a real scrape: the oldest held one makes room for it.
        status, _, body = _parts(await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
        (oldest, _), (younger, _) = held
        with contextlib.suppress(ConnectionResetError):
            assert await oldest.read() == b""
        assert not younger.at_eof()
        for _, writer in held:
            writer.close()
    assert status == "HTTP/1.1 200 OK"
    assert b"timer_sdk_requests_total" in body


async def _close_while_a_connection_is_open() -> None:
    async with metrics_port() as (metrics, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HALF_HEAD)
        await writer.drain()
        await metrics.close()
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)


@pytest.mark.parametrize("loop", LOOPS)
def test_close_stops_listening_and_closes_open_connections(loop: str) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(_close_while_a_connection_is_open())


# --- wildcards, however spelled ------------------------------------------------

NOWHERE = "unix:/nonexistent-folder/timer.sock"
WILDCARDS = ["0", "0x0", "0.0.0", "0000.0.0.0", "00", "[::ffff:0.0.0.0]", "[::]", "0.0.0.0", "*"]


@pytest.mark.parametrize("host", WILDCARDS)
def test_serve_refuses_every_spelling_of_a_wildcard(
    host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Were the flag let through, serving fails on the missing folder: nothing listens.
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", NOWHERE, "--metrics", f"tcp:{host}:9464"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --metrics: will not serve metrics on every interface" in err
    if host not in ("0.0.0.0", "[::]", "*"):
        assert f"({host.strip('[]')} is " in err  # says what the spelling means


@pytest.mark.parametrize("host", WILDCARDS)
async def test_serve_metrics_refuses_every_spelling_of_a_wildcard(host: str) -> None:
    async with await Timer().serve("tcp:127.0.0.1:0") as server:
        with pytest.raises(AddressError, match="will not serve metrics on every interface"):
            await serve_metrics(server, f"tcp:{host}:0")


class _Resolver(asyncio.SelectorEventLoop):
    """A loop on which the name ``everywhere.test`` resolves to 0.0.0.0, as a hosts file may say."""

    async def getaddrinfo(self, host: Any, *args: Any, **kwargs: Any) -> Any:
        name = "0.0.0.0" if host == "everywhere.test" else host
        return await super().getaddrinfo(name, *args, **kwargs)


def test_a_name_that_resolves_to_a_wildcard_is_refused_as_bound() -> None:
    async def main() -> str:
        async with await Timer().serve("tcp:127.0.0.1:0") as server:
            # A name is not judged by its spelling: it passes the early check...
            assert metrics_address("tcp:everywhere.test:0").host == "everywhere.test"
            with pytest.raises(AddressError) as info:
                await serve_metrics(server, "tcp:everywhere.test:0")
            # ...and a name that means one interface is served.
            metrics = await serve_metrics(server, "tcp:localhost:0")
            await metrics.close()
            return str(info.value)

    with asyncio.Runner(loop_factory=_Resolver) as runner:
        message = runner.run(main())
    assert "will not serve metrics on every interface (everywhere.test is 0.0.0.0)" in message


@pytest.mark.parametrize("flag", ["9464", "127.0.0.1:9464", "http://127.0.0.1:9464"])
def test_metrics_without_tcp_says_what_it_takes(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", NOWHERE, "--metrics", flag])
    err = capsys.readouterr().err
    assert "argument --metrics: expected tcp:HOST:PORT, e.g. tcp:127.0.0.1:9464" in err
    assert "tls:" not in err and "unix:" not in err


def _open_descriptors() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


@pytest.mark.parametrize("step", ["dup", "listen"])
async def test_a_failed_start_leaves_nothing_bound(
    step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start that fails (the acceptor's copy of the socket, its listen): the error reaches
    the caller, and no descriptor is left open or the port bound."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def no_descriptors(self: socket.socket, *args: object) -> socket.socket:
        raise OSError(24, "Too many open files")

    async with await Timer().serve("tcp:127.0.0.1:0") as server:
        fds = _open_descriptors()
        with monkeypatch.context() as patched:
            patched.setattr(socket.socket, step, no_descriptors)
            with pytest.raises(OSError, match="Too many open files"):
                await serve_metrics(server, f"tcp:127.0.0.1:{port}")
        assert _open_descriptors() == fds
        with socket.socket() as again:  # a socket left bound would hold the port
            again.bind(("127.0.0.1", port))
