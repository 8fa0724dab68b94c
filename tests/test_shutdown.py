"""``serve_until_signal`` in process: one signal closes gracefully, a third stops at once.

Real signals, sent to this process. SIGUSR1 stands in for Ctrl-C, so the test runner's
own SIGINT handling is left alone; the CLI and README tests cover SIGINT and SIGTERM
in real child processes.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from types import FrameType

import pytest

from timer_sdk import EchoRequest, Server, TimerClient, TimerConfig
from timer_sdk.serving.shutdown import serve_until_signal

from .conftest import GatedTimer, wait_until

SIG = signal.SIGUSR1


@pytest.fixture
async def held() -> AsyncIterator[tuple[GatedTimer, Server]]:
    timer = GatedTimer(TimerConfig(name="held"))
    server = await timer.serve("tcp:127.0.0.1:0")
    yield timer, server
    timer.gate.set()
    await server.close(timeout=0)


def _serving(server: Server) -> tuple[asyncio.Task[bool], list[str]]:
    said: list[str] = []
    task = asyncio.create_task(
        serve_until_signal(server, shutdown_timeout=30, signals=(SIG,), report=said.append)
    )
    return task, said


async def _installed() -> None:
    """Wait until serve_until_signal has put its handler in place."""
    await wait_until(lambda: signal.getsignal(SIG) is not signal.SIG_DFL)


def _kill(times: int = 1) -> None:
    # raise(): to this thread, delivered before it returns, so none can merge with the next.
    for _ in range(times):
        signal.raise_signal(SIG)


async def test_one_signal_closes_gracefully_and_restores_the_handler(
    held: tuple[GatedTimer, Server],
) -> None:
    timer, server = held
    seen: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    old = signal.signal(SIG, previous)
    try:
        async with await TimerClient.connect(server.address, timeout=30) as client:
            call = asyncio.create_task(client.echo(EchoRequest(message="m", delay_ms=0)))
            await wait_until(lambda: len(server.tasks) == 1)
            task, said = _serving(server)
            await wait_until(lambda: signal.getsignal(SIG) is not previous)
            _kill()
            await wait_until(lambda: server.closing)
            assert said == ["shutting down, finishing 1 request in flight"]
            timer.gate.set()
            assert (await call).echoed == "m"  # the request in flight was answered
            assert await task is True
        assert signal.getsignal(SIG) is previous  # put back as it was
        _kill()
        await wait_until(lambda: seen == [SIG])
    finally:
        signal.signal(SIG, old)


async def test_a_second_signal_is_acknowledged_and_a_third_stops_at_once(
    held: tuple[GatedTimer, Server],
) -> None:
    _, server = held
    async with await TimerClient.connect(server.address, timeout=30) as client:
        calls = [
            asyncio.create_task(client.echo(EchoRequest(message=str(i), delay_ms=0)))
            for i in range(2)
        ]
        await wait_until(lambda: len(server.tasks) == 2)
        task, said = _serving(server)
        await _installed()
        _kill()
        await wait_until(lambda: len(said) == 1)
        _kill()
        await wait_until(lambda: len(said) == 2)
        assert said[1] == "still finishing 2 requests in flight; signal once more to stop at once"
        assert not task.done()
        _kill()
        assert await asyncio.wait_for(task, 30) is False
        assert said[2] == "stopping at once, abandoning 2 requests in flight"
        assert server.closing and not server.tasks
        for call in calls:
            with pytest.raises(Exception):  # noqa: B017, PT011  # aborted: lost, or an error reply
                await call


async def test_signals_before_it_wakes_stop_at_once(
    held: tuple[GatedTimer, Server],
) -> None:
    _, server = held
    task, said = _serving(server)
    await _installed()
    _kill(4)  # a fourth is ignored
    assert await asyncio.wait_for(task, 30) is False
    assert said == [
        "still finishing 0 requests in flight; signal once more to stop at once",
        "stopping at once, abandoning 0 requests in flight",
        "shutting down, finishing 0 requests in flight",
    ]


async def test_a_server_closed_by_someone_else_ends_it_quietly(
    held: tuple[GatedTimer, Server],
) -> None:
    _, server = held
    task, said = _serving(server)
    await _installed()
    await server.close()
    assert await asyncio.wait_for(task, 30) is True
    assert said == []
    assert signal.getsignal(SIG) is signal.SIG_DFL


async def test_cancelling_it_closes_the_server(held: tuple[GatedTimer, Server]) -> None:
    _, server = held
    task, _ = _serving(server)
    await _installed()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert server.closing
    await asyncio.wait_for(server.wait_closed(), 30)


async def test_cancelling_it_while_closing_waits_for_that_close(
    held: tuple[GatedTimer, Server],
) -> None:
    timer, server = held
    async with await TimerClient.connect(server.address, timeout=30) as client:
        call = asyncio.create_task(client.echo(EchoRequest(message="m", delay_ms=0)))
        await wait_until(lambda: len(server.tasks) == 1)
        task, _ = _serving(server)
        await _installed()
        _kill()
        await wait_until(lambda: server.closing)
        task.cancel()
        await asyncio.sleep(0)
        assert not task.done()  # shielded: the graceful close goes on
        timer.gate.set()
        assert (await call).echoed == "m"
        with pytest.raises(asyncio.CancelledError):
            await task


_C_HANDLER_CHILD = """
import asyncio, signal
from timer_sdk import Timer
from timer_sdk.serving.shutdown import serve_until_signal

async def main():
    before = signal.getsignal(signal.SIGABRT)  # faulthandler's, set in C: Python sees None
    server = await Timer().serve("tcp:127.0.0.1:0")
    said = []
    task = asyncio.create_task(
        serve_until_signal(server, signals=(signal.SIGABRT,), report=said.append)
    )
    while signal.getsignal(signal.SIGABRT) is None:
        await asyncio.sleep(0.001)
    signal.raise_signal(signal.SIGABRT)
    print(before, await task, signal.getsignal(signal.SIGABRT) is signal.SIG_DFL, said)

asyncio.run(main())
"""


async def test_a_handler_set_outside_python_is_not_put_back_and_the_stop_is_clean() -> None:
    # A handler installed in C before Python started (here faulthandler's, with -X
    # faulthandler; an embedding program's likewise) reads as None: it cannot be restored.
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-X", "faulthandler", "-c", _C_HANDLER_CHILD,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await child.communicate()
    assert child.returncode == 0, err.decode()
    assert out.decode().strip().split(maxsplit=3) == [
        "None",
        "True",
        "True",
        "['shutting down, finishing 0 requests in flight']",
    ]
