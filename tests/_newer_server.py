"""A stand-in for a newer (or an older) timer server, run as its own process.

It speaks the framing with nothing but cbor2 and asyncio, so what the clients
meet is what another implementation would send, not this SDK's server:

- every reply has a field the clients do not know (``newField``, ``priority``...),
  and ``on_echo_fired`` carries one too (``firedAtMs``);
- ``schedule`` fires a second kind of event, ``on_job_scheduled {jobId, willRunCount}``;
- a ``ret 3`` frame (nim-ffi's ``RET_STALE_WARN``, "still running") goes before
  every reply;
- it has a method no client calls, ``lib_version``;
- an ``echo`` of the message :data:`WRONG_TYPE` answers ``echoed`` as an integer.

With ``--older`` it is an older server instead: ``ComplexRequest`` has no
``retries`` and ``ScheduleConfig`` no ``jitter``. Either way it refuses a request
field it does not know, as the reference does (ret 1).

Usage: ``python -m tests._newer_server [--older]``; it prints ``tcp:127.0.0.1:PORT``
once it listens, and serves until killed. Tests use :func:`running`.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2

RET_STALE_WARN = 3
WRONG_TYPE = "answer with a wrong type"
NAME = "ipc-server"

_ECHO = {"message", "delayMs"}
_NEWER: dict[str, dict[str, set[str]]] = {
    "version": {},
    "lib_version": {},
    "echo": {"req": _ECHO},
    "complex": {"req": {"messages", "tags", "note", "retries"}},
    "schedule": {
        "job": {"name", "payload", "priority"},
        "retry": {"maxAttempts", "backoffMs", "retryOn"},
        "schedule": {"startAtMs", "intervalMs", "jitter"},
    },
}
_OLDER = {
    **_NEWER,
    "complex": {"req": {"messages", "tags", "note"}},
    "schedule": {**_NEWER["schedule"], "schedule": {"startAtMs", "intervalMs"}},
}


def frame(ret: int, body: object) -> bytes:
    data = body if isinstance(body, bytes) else cbor2.dumps(body)
    return struct.pack(">iI", ret, len(data)) + data


class Newer:
    def __init__(self, api: dict[str, dict[str, set[str]]]) -> None:
        self.api = api
        self.subscribers: set[asyncio.StreamWriter] = set()

    def fire(self, name: str, data: dict[str, Any]) -> None:
        for writer in self.subscribers:
            writer.write(frame(16, {"event": name, "data": data}))

    def refusal(self, method: str, payload: Any) -> str | None:
        """What is wrong with a request, as strictly as the reference checks keys."""
        shape = self.api[method]
        if not isinstance(payload, dict) or set(payload) - set(shape):
            return f"unknown field in {payload!r}"
        for key, fields in shape.items():
            value = payload.get(key)
            if not isinstance(value, dict) or set(value) - fields:
                return f"unknown field in {key}: {value!r}"
        return None

    def answer(self, method: str, payload: Any, writer: asyncio.StreamWriter) -> bytes:
        if method == "events.subscribe":
            self.subscribers.add(writer)
            return frame(0, {"events": ["on_echo_fired", "on_job_scheduled"]})
        if method == "events.unsubscribe":
            self.subscribers.discard(writer)
            return frame(0, None)
        if method not in self.api:
            return frame(1, f"unknown method: {method}".encode())
        refused = self.refusal(method, payload)
        if refused is not None:
            return frame(1, refused.encode())
        if method == "version":
            return frame(0, "nim-timer v0.2.0")
        if method == "lib_version":
            return frame(0, {"major": 0, "minor": 2})
        if method == "echo":
            message = payload["req"]["message"]
            self.fire("on_echo_fired", {"message": message, "echoCount": 1, "firedAtMs": 5})
            if message == WRONG_TYPE:
                return frame(0, {"echoed": 42, "timerName": NAME})
            return frame(0, {"echoed": message, "timerName": NAME, "newField": 7})
        if method == "complex":
            req = payload["req"]
            note = req.get("note")
            summary = (
                f"received {len(req['messages'])} messages, "
                f"note={note if note is not None else '<none>'}, "
                f"retries={req.get('retries') or 0}"
            )
            return frame(
                0,
                {"summary": summary, "itemCount": len(req["messages"]),
                 "hasNote": note is not None, "warnings": ["none"]},
            )  # fmt: skip
        job, retry, when = payload["job"], payload["retry"], payload["schedule"]
        job_id = f"{NAME}:{job['name']}"
        runs = max(1, 60000 // when["intervalMs"]) if when["intervalMs"] > 0 else 1
        self.fire("on_job_scheduled", {"jobId": job_id, "willRunCount": runs})
        return frame(
            0,
            {"jobId": job_id, "willRunCount": runs,
             "firstRunAtMs": when["startAtMs"] + (when.get("jitter") or 0),
             "effectiveBackoffMs": retry["backoffMs"], "priority": "normal"},
        )  # fmt: skip

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(4), "big")
                method = (await reader.readexactly(size)).decode()
                size = int.from_bytes(await reader.readexactly(4), "big")
                body = await reader.readexactly(size)
                payload = cbor2.loads(body) if body else {}
                writer.write(frame(RET_STALE_WARN, b"still running"))
                writer.write(self.answer(method, payload, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.subscribers.discard(writer)
            writer.close()


@contextlib.contextmanager
def running(*args: str) -> Iterator[str]:
    """Run this server as a process with ``args``; its address while it runs."""
    with subprocess.Popen(
        [sys.executable, "-m", "tests._newer_server", *args],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            yield proc.stdout.readline().strip()  # printed once it listens
        finally:
            proc.kill()


async def main(argv: list[str]) -> None:
    newer = Newer(_OLDER if "--older" in argv else _NEWER)
    server = await asyncio.start_server(newer.serve, "127.0.0.1", 0)
    print(f"tcp:127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
