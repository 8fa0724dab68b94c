"""The blocking facade against real servers: every method, errors, timeouts, interrupts."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import inspect
import os
import queue
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from timer_sdk import (
    CallError,
    CallTimeout,
    ClientClosedError,
    ComplexRequest,
    ComplexResponse,
    EchoRequest,
    EchoResponse,
    JobSpec,
    LoopError,
    RemoteCallError,
    RetryPolicy,
    ScheduleConfig,
    ScheduleResult,
    Server,
    Timer,
    TimerConfig,
    __version__,
    _portal,
)
from timer_sdk._portal import get_portal
from timer_sdk.calling.connecting import Connecting
from timer_sdk.client import TimerClient as AsyncTimerClient
from timer_sdk.models import EchoParams
from timer_sdk.sync import TimerClient
from timer_sdk.wire import api, codec

JOB = JobSpec(name="j", payload=["p"], priority=1)
RETRY = RetryPolicy(max_attempts=3, backoff_ms=100, retry_on=["timeout"])
WHEN = ScheduleConfig(start_at_ms=1000, interval_ms=500, jitter=7)


class RecordingTimer(Timer):
    """A timer that reports each echo as it starts, and holds ``gated`` echoes until told."""

    def __init__(self) -> None:
        super().__init__(TimerConfig(name="ipc-server"))
        self.started: queue.Queue[str] = queue.Queue()
        self.gate: asyncio.Event | None = None

    async def echo(self, req: EchoRequest) -> EchoResponse:
        self.started.put(req.message)
        if req.message.startswith("gated"):
            assert self.gate is not None
            await self.gate.wait()
        return await super().echo(req)


class ThreadServer:
    """A real server on its own event loop, in a background thread."""

    def __init__(self, address: str) -> None:
        self.timer = RecordingTimer()
        self._ready: concurrent.futures.Future[Server] = concurrent.futures.Future()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(address),))
        self._thread.start()
        self.server = self._ready.result(timeout=30)
        self.address = self.server.address

    async def _main(self, address: str) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.timer.gate = asyncio.Event()
        try:
            server = await self.timer.serve(address)
        except Exception as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(server)
        async with server:
            await self._stop.wait()

    def open_gate(self) -> None:
        """Let every ``gated`` echo, waiting or to come, finish."""
        assert self.timer.gate is not None
        self.loop.call_soon_threadsafe(self.timer.gate.set)

    def stop(self) -> None:
        self.open_gate()
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive()


@pytest.fixture
def served(address: str) -> Iterator[ThreadServer]:
    """A server in a background thread, over TCP and over a Unix socket."""
    srv = ThreadServer(address)
    yield srv
    srv.stop()


@pytest.fixture
def tcp_served() -> Iterator[ThreadServer]:
    """A server in a background thread, over TCP only."""
    srv = ThreadServer("tcp:127.0.0.1:0")
    yield srv
    srv.stop()


@pytest.fixture
def sync_client(tcp_served: ThreadServer) -> Iterator[TimerClient]:
    """A client the server has already answered once."""
    with TimerClient.connect(tcp_served.address, timeout=30) as client:
        # connect() returns once the kernel has the connection, maybe before the
        # server has accepted it; a server stopped in that gap leaks it (Server.close).
        client.version()
        yield client


def interrupt_main_thread_when(ready: Callable[[], bool]) -> threading.Thread:
    """Start a thread that sends SIGINT to the main thread once ``ready()`` says so."""
    main = threading.main_thread().ident
    assert main is not None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def run() -> None:
        if ready():
            signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def next_started(timer: RecordingTimer) -> str:
    try:
        return timer.started.get(timeout=30)
    except queue.Empty:
        return ""


# --- round trips -------------------------------------------------------------


def test_round_trip_of_every_method(served: ThreadServer) -> None:
    with TimerClient.connect(served.address, timeout=30) as client:
        assert client.address == served.address
        assert repr(client) == f"<sync.TimerClient {served.address} open, 0 pending>"
        assert client.version() == f"timer-sdk v{__version__}"
        assert client.echo(EchoRequest(message="hello over the wire", delay_ms=5)) == (
            EchoResponse(echoed="hello over the wire", timer_name="ipc-server")
        )
        two = [EchoRequest(message="a", delay_ms=0), EchoRequest(message="b", delay_ms=0)]
        assert client.complex(
            ComplexRequest(messages=two, tags=["x", "y"], note="n", retries=3)
        ) == ComplexResponse(
            summary="received 2 messages, note=n, retries=3", item_count=2, has_note=True
        )
        assert client.complex(ComplexRequest(messages=[], tags=[])) == ComplexResponse(
            summary="received 0 messages, note=<none>, retries=0", item_count=0, has_note=False
        )
        assert client.schedule(JOB, RETRY, WHEN) == ScheduleResult(
            job_id="ipc-server:j",
            will_run_count=120,
            first_run_at_ms=1007,
            effective_backoff_ms=100,
        )
        generic = client.call(api.ECHO, EchoParams(req=EchoRequest(message="g", delay_ms=0)))
        assert generic == EchoResponse(echoed="g", timer_name="ipc-server")
        assert codec.decode_item(client.call_raw("version")) == f"timer-sdk v{__version__}"
        assert client.pending == 0
        assert not client.closed
    assert client.closed
    assert repr(client) == f"<sync.TimerClient {served.address} closed, 0 pending>"
    client.close()  # again: a no-op
    with pytest.raises(ClientClosedError):
        client.version()


def test_against_a_server_process(address: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "timer_sdk", "serve", address],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the server prints it once it listens
        match = re.search(r"listening on (\S+)", line)
        assert match is not None, line
        with TimerClient.connect(match.group(1), timeout=30) as client:
            assert client.version() == f"timer-sdk v{__version__}"
            reply = client.echo(EchoRequest(message="to another process", delay_ms=1))
            assert reply.echoed == "to another process"
            assert client.schedule(JOB, RETRY, WHEN).job_id == "ipc-server:j"
            with pytest.raises(RemoteCallError, match="job name must not be empty"):
                client.schedule(JOB.model_copy(update={"name": ""}), RETRY, WHEN)
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert rest.endswith("timer-sdk: stopped\n")


def test_threads_share_one_client(sync_client: TimerClient) -> None:
    def calls(n: int) -> list[str]:
        return [
            sync_client.echo(EchoRequest(message=f"{n}-{i}", delay_ms=0)).echoed for i in range(50)
        ]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(calls, range(8)))
    assert results == [[f"{n}-{i}" for i in range(50)] for n in range(8)]


def test_clients_share_one_loop_thread(tcp_served: ThreadServer) -> None:
    with (
        TimerClient.connect(tcp_served.address) as one,
        TimerClient.connect(tcp_served.address) as two,
    ):
        assert one.version() == two.version()
        names = [t.name for t in threading.enumerate()]
        assert names.count("timer-sdk-sync") == 1
        thread = get_portal().thread
        assert thread.daemon


# --- errors and timeouts -----------------------------------------------------


def test_error_replies_raise_remote_call_error(served: ThreadServer) -> None:
    with TimerClient.connect(served.address, timeout=30) as client:
        with pytest.raises(RemoteCallError) as empty:
            client.schedule(JOB.model_copy(update={"name": ""}), RETRY, WHEN)
        assert isinstance(empty.value, CallError)
        assert empty.value.method == "schedule"
        assert empty.value.message == "job name must not be empty"
        assert repr(empty.value) == (
            "RemoteCallError(method='schedule', message='job name must not be empty')"
        )

        with pytest.raises(RemoteCallError) as attempts:
            client.schedule(JOB, RETRY.model_copy(update={"max_attempts": 0}), WHEN)
        assert attempts.value.message == "retry.maxAttempts must be positive"

        with pytest.raises(RemoteCallError) as unknown:
            client.call_raw("nosuch")
        assert unknown.value.message == "unknown method: nosuch"

        assert client.echo(EchoRequest(message="still fine", delay_ms=0)).echoed == "still fine"


def test_timeout_then_the_next_call_gets_its_own_reply(served: ThreadServer) -> None:
    with TimerClient.connect(served.address, timeout=30) as client:
        with pytest.raises(CallTimeout, match=r"echo: no reply within 0\.1 s"):
            client.echo(EchoRequest(message="slow", delay_ms=1000), timeout=0.1)
        assert client.pending == 1  # the slow reply is still to come, and to be dropped
        assert client.echo(EchoRequest(message="after", delay_ms=0)).echoed == "after"
        assert client.pending == 0


def test_the_client_default_timeout_applies(tcp_served: ThreadServer) -> None:
    with TimerClient.connect(tcp_served.address, timeout=0.1) as client:
        assert client.timeout == 0.1
        with pytest.raises(CallTimeout):
            client.echo(EchoRequest(message="gated", delay_ms=0))
        tcp_served.open_gate()
        client.timeout = 30
        assert client.echo(EchoRequest(message="after", delay_ms=0)).echoed == "after"
        assert client.pending == 0


# --- interrupts --------------------------------------------------------------


@pytest.fixture(params=["one wait", "sliced wait"])
def poll(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wait for outcomes in one wait (POSIX) and in short slices (as on Windows)."""
    if request.param == "sliced wait":
        monkeypatch.setattr(_portal, "_POLL", 0.01)


@pytest.mark.usefixtures("poll")
def test_ctrl_c_cancels_the_call_and_the_client_stays_usable(
    tcp_served: ThreadServer, sync_client: TimerClient
) -> None:
    timer = tcp_served.timer

    def the_gated_call_is_in_flight() -> bool:
        return next_started(timer) == "gated"

    interrupter = interrupt_main_thread_when(the_gated_call_is_in_flight)
    try:
        with pytest.raises(KeyboardInterrupt):
            sync_client.echo(EchoRequest(message="gated", delay_ms=0))
    finally:
        interrupter.join()
    # The request is on the wire, so the server will still answer it; the
    # call waiting for that reply was cancelled (once the loop got to it).
    assert sync_client.pending == 1
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0), get_portal().loop).result(timeout=30)
    [(_, waiting, _)] = sync_client._client._protocol.pending
    assert waiting.cancelled()

    def release_when_fresh_is_in_flight() -> None:
        if next_started(timer) == "fresh":
            tcp_served.open_gate()

    releaser = threading.Thread(target=release_when_fresh_is_in_flight)
    releaser.start()
    try:
        # Its reply comes after the gated one's, which must be dropped.
        assert sync_client.echo(EchoRequest(message="fresh", delay_ms=0)).echoed == "fresh"
    finally:
        tcp_served.open_gate()
        releaser.join()
    assert sync_client.pending == 0


def test_ctrl_c_during_connect_leaves_no_connection_open() -> None:
    # A listener that accepts but never speaks TLS: the handshake hangs.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        port = listener.getsockname()[1]
        accepted: list[socket.socket] = []

        def accept() -> bool:
            accepted.append(listener.accept()[0])
            return True

        interrupter = interrupt_main_thread_when(accept)
        try:
            with pytest.raises(KeyboardInterrupt):
                TimerClient.connect(f"tls:127.0.0.1:{port}", ssl=ssl.create_default_context())
        finally:
            interrupter.join()
        with accepted[0] as conn:
            conn.settimeout(30)
            while conn.recv(4096):  # the ClientHello, then the end of the stream
                pass


def test_a_result_produced_as_the_caller_leaves_is_disposed_once() -> None:
    portal = get_portal()
    produced = threading.Event()
    release = threading.Event()
    disposed: list[object] = []
    thing = object()

    async def produce() -> object:
        # Hold the loop once the value exists, before the caller can receive it.
        asyncio.get_running_loop().call_soon(release.wait, 30)
        produced.set()
        return thing

    async def dispose(value: object) -> None:
        disposed.append(value)

    interrupter = interrupt_main_thread_when(lambda: produced.wait(30))
    try:
        with pytest.raises(KeyboardInterrupt):
            portal.run(produce, dispose)
    finally:
        interrupter.join()
        release.set()
    # Whichever side saw the other first disposes; a few loop turns let it run.
    for _ in range(3):
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), portal.loop).result(timeout=30)
    assert disposed == [thing]


def test_a_sliced_wait_is_renewed_until_the_outcome(
    monkeypatch: pytest.MonkeyPatch, tcp_served: ThreadServer, sync_client: TimerClient
) -> None:
    monkeypatch.setattr(_portal, "_POLL", 0.01)
    slices: list[float | None] = []
    real_result = concurrent.futures.Future.result

    def result(self: concurrent.futures.Future[Any], timeout: float | None = None) -> Any:
        if threading.current_thread() is threading.main_thread():
            slices.append(timeout)
        return real_result(self, timeout)

    monkeypatch.setattr(concurrent.futures.Future, "result", result)

    def release_a_moment_after_it_started() -> None:
        if next_started(tcp_served.timer) == "gated":
            threading.Event().wait(0.2)
            tcp_served.open_gate()

    releaser = threading.Thread(target=release_a_moment_after_it_started)
    releaser.start()
    try:
        reply = sync_client.echo(EchoRequest(message="gated", delay_ms=0))
    finally:
        tcp_served.open_gate()
        releaser.join()
    assert reply.echoed == "gated"
    assert len(slices) > 5  # the gate held it for 0.2 s: many 10 ms slices, each renewed
    assert set(slices) == {0.01}


def main_thread_waits_in_the_portal() -> bool:
    """Wait until the main thread blocks in a wait inside ``Portal.run``."""
    main = threading.main_thread().ident
    assert main is not None
    for _ in range(30_000):
        frame = sys._current_frames().get(main)
        if frame is not None and frame.f_code.co_name == "wait":
            names = set()
            while frame is not None:
                names.add((Path(frame.f_code.co_filename).name, frame.f_code.co_name))
                frame = frame.f_back
            if ("_portal.py", "run") in names:
                return True
        threading.Event().wait(0.001)
    return False


def test_a_caller_who_leaves_before_the_call_starts_starts_nothing() -> None:
    portal = get_portal()
    release = threading.Event()
    made: list[str] = []

    async def make() -> str:
        made.append("made")
        return "value"

    portal.loop.call_soon_threadsafe(release.wait, 30)  # the loop is busy: nothing starts
    interrupter = interrupt_main_thread_when(main_thread_waits_in_the_portal)
    try:
        with pytest.raises(KeyboardInterrupt):
            portal.run(make)
    finally:
        interrupter.join()
        release.set()
    for _ in range(3):
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), portal.loop).result(timeout=30)
    assert made == []  # it saw the caller gone and never made the call


@pytest.mark.parametrize("with_dispose", [True, False])
def test_a_result_produced_after_the_caller_left_is_disposed_on_the_loop(
    with_dispose: bool,
) -> None:
    portal = get_portal()
    started = threading.Event()
    left = threading.Event()
    disposed: list[object] = []
    thing = object()

    async def produce() -> object:
        started.set()
        left.wait(30)  # holds the loop: the caller's cancel cannot land before we return
        return thing

    async def dispose(value: object) -> None:
        disposed.append(value)

    tasks_before = asyncio.run_coroutine_threadsafe(_all_tasks(), portal.loop).result(30)
    interrupter = interrupt_main_thread_when(lambda: started.wait(30))
    try:
        with pytest.raises(KeyboardInterrupt):
            portal.run(produce, dispose if with_dispose else None)
    finally:
        interrupter.join()
        left.set()
    for _ in range(3):
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), portal.loop).result(timeout=30)
    assert disposed == ([thing] if with_dispose else [])
    # Nothing is left running on the loop either way.
    assert asyncio.run_coroutine_threadsafe(_all_tasks(), portal.loop).result(30) == tasks_before


async def _all_tasks() -> int:
    return len(asyncio.all_tasks()) - 1  # not counting this one


# --- misuse --------------------------------------------------------------------


async def test_blocking_inside_a_coroutine_raises_loop_error(
    tcp_served: ThreadServer, sync_client: TimerClient
) -> None:
    with pytest.raises(LoopError, match=re.escape("await timer_sdk.TimerClient.connect(...)")):
        sync_client.version()
    with pytest.raises(LoopError):
        sync_client.echo(EchoRequest(message="x", delay_ms=0))
    with pytest.raises(LoopError):
        TimerClient.connect(tcp_served.address)
    with pytest.raises(LoopError):
        sync_client.close()
    assert isinstance(LoopError("x"), RuntimeError)
    gc.collect()  # no coroutine was made and left never awaited


def test_blocking_on_its_own_loop_thread_raises_loop_error(sync_client: TimerClient) -> None:
    async def inside() -> str:
        return sync_client.version()  # would wait for the loop it is blocking

    future = asyncio.run_coroutine_threadsafe(inside(), get_portal().loop)
    with pytest.raises(LoopError):
        future.result(timeout=30)


FORK = """
import os, sys
from timer_sdk import LoopError
from timer_sdk.sync import TimerClient

address = sys.argv[1]
parent = TimerClient.connect(address, timeout=30)
parent.version()
pid = os.fork()
if pid == 0:
    try:
        parent.version()
    except LoopError:
        pass
    else:
        os._exit(1)
    del parent  # finalized here, in the child: the parent's connection is not its to close
    with TimerClient.connect(address, timeout=30) as child:
        os._exit(0 if child.version().startswith("timer-sdk v") else 2)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert parent.version().startswith("timer-sdk v")
parent.close()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_after_fork_the_child_connects_anew(tcp_served: ThreadServer, tmp_path: Path) -> None:
    # In a fresh interpreter: forking the multi-threaded test process is not safe.
    subprocess.run(
        [sys.executable, "-c", FORK, tcp_served.address], check=True, cwd=tmp_path, timeout=60
    )


def test_an_unclosed_client_warns_and_is_closed(tcp_served: ThreadServer) -> None:
    client = TimerClient.connect(tcp_served.address)
    client.version()  # the server has accepted it (see sync_client)
    inner = client._client
    with pytest.warns(ResourceWarning, match="unclosed <TimerClient"):
        del client  # the last reference: finalized at once
    # The finalizer queued the close first; once a later coroutine has run, it has begun.
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0), get_portal().loop).result(timeout=30)
    assert inner.closed


# --- the facade is the async client, method for method ------------------------

FACADE = [
    "connect", "version", "echo", "complex", "schedule", "describe", "call", "call_raw", "close"
]  # fmt: skip
ASYNC_ONLY = {"events"}
"""Async streams, not offered blocking (yet)."""


def _shape(fn: Callable[..., Any], *, unbound: bool) -> tuple[list[tuple[Any, ...]], Any]:
    signature = inspect.signature(fn, eval_str=True)
    params = list(signature.parameters.values())[1 if unbound else 0 :]
    ret = signature.return_annotation
    if ret in (TimerClient, Connecting[AsyncTimerClient]):  # connect: blocking, or awaitable
        ret = AsyncTimerClient
    return [(p.name, p.kind, p.default, p.annotation) for p in params], ret


@pytest.mark.parametrize("name", FACADE)
def test_signature_matches_the_async_twin(name: str) -> None:
    unbound = name != "connect"  # connect is a classmethod, already bound to its class
    assert _shape(getattr(TimerClient, name), unbound=unbound) == _shape(
        getattr(AsyncTimerClient, name), unbound=unbound
    )
    assert inspect.iscoroutinefunction(getattr(AsyncTimerClient, name)) is unbound
    assert not inspect.iscoroutinefunction(getattr(TimerClient, name))
    assert getattr(TimerClient, name).__doc__


def test_the_facade_covers_the_async_client() -> None:
    public = {
        name
        for name, member in inspect.getmembers(AsyncTimerClient)
        if not name.startswith("_") and callable(member)
    }
    assert public - ASYNC_ONLY == set(FACADE)
    for name in ("address", "closed", "pending"):
        assert isinstance(getattr(TimerClient, name), property)
        assert isinstance(getattr(AsyncTimerClient, name), property)
    assert hasattr(TimerClient, "__enter__")
    assert hasattr(TimerClient, "__exit__")


def test_the_package_layout_keeps_sync_apart(tmp_path: Path) -> None:
    # Importing the package must not start the loop thread: it starts on first use.
    code = (
        "import threading, timer_sdk, timer_sdk.sync\n"
        "assert [t for t in threading.enumerate() if t.name == 'timer-sdk-sync'] == []\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=60)
