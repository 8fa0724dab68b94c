"""``serve --metrics`` as the command line takes it: the extra it needs, and worker ports."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest

from timer_sdk.tools import observe

from .test_workers import _finish

# An install without the metrics extra: "import prometheus_client" fails in this process.
WITHOUT_PROMETHEUS = (
    "import sys; sys.modules['prometheus_client'] = None; "
    "from timer_sdk.tools.cli import main; sys.exit(main())"
)


def test_metrics_without_the_extra_name_it() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PROMETHEUS, "serve", "--metrics", "tcp:127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "argument --metrics: needs prometheus_client: " in done.stderr
    assert "[metrics]" in done.stderr  # the extra, as pip installs it here


def test_only_a_worker_process_has_a_worker_index() -> None:
    with pytest.raises(ValueError, match="cannot tell which worker process 'MainProcess' is"):
        observe._worker_index()


def _two_free_ports() -> int:
    """A port P such that P and P + 1 were both free a moment ago."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return int(port)
    raise AssertionError("no two free ports side by side")


@pytest.mark.skipif(sys.platform != "linux", reason="--workers uses SO_REUSEPORT")
async def test_worker_i_serves_its_metrics_on_port_plus_i() -> None:
    port = _two_free_ports()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "timer_sdk", "serve", "tcp:127.0.0.1:0", "--workers", "2",
        "--metrics", f"tcp:127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(60):
            while len([line for line in lines if "metrics at" in line]) < 2:
                lines.append((await proc.stdout.readline()).decode())
                assert lines[-1], f"the server exited: {lines}"
        urls = sorted(
            line.split(" metrics at ")[1].strip() for line in lines if "metrics at" in line
        )
    finally:
        if proc.returncode is None:
            proc.terminate()
        code, _, err = await _finish(proc)
    assert code == 0, err
    assert urls == [f"http://127.0.0.1:{port}/metrics", f"http://127.0.0.1:{port + 1}/metrics"]
