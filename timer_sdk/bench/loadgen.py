"""The load generator: a separate process that blasts pre-encoded frames at a server.

The benchmark starts it once (``python loadgen.py``) and sends it one job per
line of JSON on stdin; it answers one line of JSON on stdout. Running the load
in its own process keeps the client's cost out of the server rows.

Every job first makes one call to learn the reply, then checks every reply of
the run byte for byte against it, so a server that answers wrongly fails the
run instead of looking fast. It connects only to ``127.0.0.1``, ``::1`` and Unix
sockets, and every job is bounded in connections and in time.

Jobs (``mode``):

- ``pingpong``: one blocking socket, one call at a time; per-call latency.
- ``pipeline``: ``conns`` connections with ``depth`` calls in flight on each;
  with ``cpu_pid``, also the CPU time that process used in the measured window.
- ``hold``: open ``conns`` connections, make one call on each, keep them open.
- ``release``: close what ``hold`` opened.

Like ``floor.py`` this imports nothing from ``timer_sdk``, so that it starts
fast and runs the same whatever tree is being measured.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from typing import Any, cast

__all__ = ["LOOPBACK", "MAX_CONNECTIONS", "MAX_SECONDS", "cpu_seconds", "main", "run_job"]

LOOPBACK = {"127.0.0.1": socket.AF_INET, "::1": socket.AF_INET6}
MAX_CONNECTIONS = 2000
MAX_SECONDS = 120.0
PERCENTILES = tuple(range(101))

_held: list[socket.socket] = []


def _connect(address: str, timeout: float = 10.0) -> socket.socket:
    scheme, _, rest = address.partition(":")
    if scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = rest
    else:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host not in LOOPBACK:
            raise ValueError(f"the load generator only targets 127.0.0.1 and ::1, not {host}")
        sock = socket.socket(LOOPBACK[host], socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        target = (host, int(port))
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def _recv_reply(sock: socket.socket) -> bytes:
    """Read one whole reply frame."""
    head = _recv_exactly(sock, 8)
    return head + _recv_exactly(sock, int.from_bytes(head[4:], "big"))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def cpu_seconds(pid: int) -> float | None:
    """Return the CPU time a process has used so far (all its threads), or None.

    ``/proc/PID/task/*/schedstat`` counts in nanoseconds; ``/proc/PID/stat``
    only in clock ticks (10 ms), too coarse for a short run. Linux only.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        total = 0
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def _first_reply(address: str, request: bytes) -> bytes:
    with _connect(address) as sock:
        sock.sendall(request)
        reply = _recv_reply(sock)
    if reply[:4] != b"\0\0\0\0":
        raise RuntimeError(f"the first call failed: {reply[8:]!r}")
    return reply


def _pingpong(
    address: str, request: bytes, reply: bytes, warmup: float, duration: float
) -> dict[str, Any]:
    size = len(reply)
    buf = bytearray(size)
    view = memoryview(buf)
    clock = time.perf_counter_ns
    latencies: list[int] = []
    record = latencies.append
    with _connect(address) as sock:
        sock.settimeout(None)
        send = sock.send
        recv_into = sock.recv_into
        elapsed = 0
        for phase_seconds, keep in ((warmup, False), (duration, True)):
            phase_started = clock()
            deadline = phase_started + int(phase_seconds * 1e9)
            while True:
                started = clock()
                # A busy machine may not run us within a short window: measure one call
                # at least, rather than report none.
                if started >= deadline and (latencies or not keep):
                    break
                send(request)
                got = recv_into(view, size)
                while got < size:
                    more = recv_into(view[got:], size - got)
                    if not more:
                        raise ConnectionError("the server closed the connection")
                    got += more
                if keep:
                    record(clock() - started)
                if buf != reply:
                    raise RuntimeError(f"wrong reply: {bytes(buf)!r}, expected {reply!r}")
            elapsed = clock() - phase_started
    latencies.sort()
    count = len(latencies)
    if not count:
        raise RuntimeError("no call finished within the run")
    return {
        "calls": count,
        "seconds": elapsed / 1e9,
        "percentiles_us": [latencies[min(count - 1, count * p // 100)] / 1000 for p in PERCENTILES],
    }


class _Blaster(asyncio.Protocol):
    """One pipelined connection: refill as many requests as replies arrived."""

    def __init__(self, requests: list[bytes], replies: list[bytes], depth: int) -> None:
        self.requests = requests  # requests[n] is n request frames, joined
        self.replies = replies  # replies[n] is n expected reply frames, joined
        self.size = len(replies[1])
        self.depth = depth
        self.buf = bytearray()
        self.count = 0
        self.in_flight = 0
        self.running = True
        self.error: str | None = None
        self.transport: asyncio.Transport | None = None
        self.drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.in_flight = self.depth
        self.transport.write(self.requests[self.depth])

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        n = len(buf) // self.size
        if not n:
            return
        if n > self.in_flight or not buf.startswith(self.replies[n]):
            self._fail(f"wrong reply: {bytes(buf[: self.size])!r}")
            return
        del buf[: n * self.size]
        self.count += n
        if self.running:
            assert self.transport is not None
            self.transport.write(self.requests[n])
        else:
            self.in_flight -= n
            if not self.in_flight and not self.drained.done():
                self.drained.set_result(None)

    def stop(self) -> None:
        self.running = False
        if not self.in_flight and not self.drained.done():
            self.drained.set_result(None)

    def _fail(self, message: str) -> None:
        self.error = message
        self.running = False
        if self.transport is not None:
            self.transport.close()
        if not self.drained.done():
            self.drained.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.drained.done():
            self.error = self.error or "the server closed the connection"
            self.drained.set_result(None)


async def _pipeline(job: dict[str, Any], request: bytes, reply: bytes) -> dict[str, Any]:
    address = job["address"]
    conns = int(job.get("conns", 1))
    depth = int(job["depth"])
    warmup = float(job.get("warmup", 0.2))
    duration = float(job["duration"])
    loop = asyncio.get_running_loop()
    requests = [request * n for n in range(depth + 1)]
    replies = [reply * n for n in range(depth + 1)]
    blasters: list[_Blaster] = []
    for _ in range(conns):
        sock = _connect(address)
        sock.setblocking(False)
        blaster = _Blaster(requests, replies, depth)
        blasters.append(blaster)
        await loop.connect_accepted_socket(lambda: blasters[-1], sock)
    cpu_pid = job.get("cpu_pid")
    try:
        await asyncio.sleep(warmup)
        before = sum(b.count for b in blasters)
        cpu_before = cpu_seconds(cpu_pid) if cpu_pid else None
        started = time.perf_counter()
        await asyncio.sleep(duration)
        # A busy machine may answer nothing within a short window: it runs on until a
        # reply comes, and the rate is over its real length.
        while sum(b.count for b in blasters) == before and not any(b.error for b in blasters):
            if time.perf_counter() - started > MAX_SECONDS:
                raise RuntimeError(f"no reply within {MAX_SECONDS} s")
            await asyncio.sleep(min(duration, 0.01))
        calls = sum(b.count for b in blasters) - before
        seconds = time.perf_counter() - started
        cpu_after = cpu_seconds(cpu_pid) if cpu_pid else None
        for blaster in blasters:
            blaster.stop()
        async with asyncio.timeout(30):
            await asyncio.gather(*(b.drained for b in blasters))
    finally:
        for blaster in blasters:
            if blaster.transport is not None:
                blaster.transport.close()
        await asyncio.sleep(0)  # let the transports close their sockets
    errors = [b.error for b in blasters if b.error]
    if errors:
        raise RuntimeError(errors[0])
    per_conn = [b.count for b in blasters]
    result = {"calls": calls, "seconds": seconds, "per_connection": per_conn}
    if cpu_before is not None and cpu_after is not None:
        result["server_cpu_seconds"] = cpu_after - cpu_before
    return result


def _hold(address: str, request: bytes, conns: int) -> dict[str, Any]:
    for _ in range(conns):
        sock = _connect(address)
        _held.append(sock)
        sock.sendall(request)
        _recv_reply(sock)
    return {"held": len(_held)}


def _release() -> dict[str, Any]:
    for sock in _held:
        sock.close()
    count = len(_held)
    _held.clear()
    return {"released": count}


def _loop_factory(name: str) -> Any:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job and return its result; raise on a wrong reply or a bad job."""
    mode = job["mode"]
    if mode == "release":
        return _release()
    address = job["address"]
    request = bytes.fromhex(job["request"])
    conns = int(job.get("conns", 1))
    if not 1 <= conns <= MAX_CONNECTIONS:
        raise ValueError(f"conns must be 1..{MAX_CONNECTIONS}")
    if mode == "hold":
        return _hold(address, request, conns)
    warmup = float(job.get("warmup", 0.2))
    duration = float(job["duration"])
    if not 0 < warmup + duration <= MAX_SECONDS:
        raise ValueError(f"a run lasts at most {MAX_SECONDS} s")
    reply = _first_reply(address, request)
    if mode == "pingpong":
        result = _pingpong(address, request, reply, warmup, duration)
    elif mode == "pipeline":
        if not 1 <= int(job["depth"]) <= 1024:
            raise ValueError("depth must be 1..1024")
        with asyncio.Runner(loop_factory=_loop_factory(job.get("loop", "asyncio"))) as runner:
            result = runner.run(_pipeline(job, request, reply))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    result["reply"] = reply.hex()
    return dict(result)


def main() -> int:
    """Answer one JSON job per line of stdin until it closes."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            result = {"ok": True, **run_job(json.loads(line))}
        except Exception as exc:
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    _release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
