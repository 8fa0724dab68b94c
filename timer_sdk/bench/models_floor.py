"""The models floor: the floor plus the work our server cannot skip.

The plain floor (``floor.py``) answers with hand-built dicts and validates
nothing, so every ratio against it also charges ours for pydantic. This floor
does the same essential work as our server, written the plain way: ``cbor2``
decodes the payload, pydantic validates it into the same models
(:mod:`timer_sdk.models`), a :class:`~timer_sdk.timer.Timer` proc computes the
result, and the result model is encoded to the real reply. It skips what makes
ours strict: no tag refusal, no depth limit, no exactly-one-item check, no
duplicate-key or by-alias-only rule, no limits, no stats. Its success replies
are byte-identical to ours.

Framing, ordering and write batching come from :class:`FloorServer` and
:class:`FloorClient` unchanged. Run the server as
``python -m timer_sdk.bench.models_floor ADDRESS``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple, TypeVar

import cbor2
from pydantic import BaseModel

from ..errors import CallError
from ..models import (
    ComplexParams,
    ComplexResponse,
    EchoParams,
    EchoResponse,
    ScheduleParams,
    ScheduleResult,
    TimerConfig,
    VersionParams,
)
from ..timer import Timer
from .floor import (
    FloorClient,
    FloorError,
    FloorServer,
    _error,
    _pack_reply_head,
    run_server,
    serve_floor,
)

__all__ = [
    "PROCS",
    "ModelsFloorClient",
    "ModelsFloorServer",
    "Proc",
    "dump",
    "load_params",
    "serve_models_floor",
    "validate_result",
]

R = TypeVar("R")


class Proc(NamedTuple):
    """One method: its envelope, its result type and how to call the Timer."""

    params: type[BaseModel]
    result: type[Any]
    call: Callable[[Timer, Any], Coroutine[Any, Any, Any]]
    may_wait: Callable[[Any], bool]
    """Whether this call can suspend (it then runs in a Task)."""


def _never(_params: Any) -> bool:
    return False


PROCS: dict[bytes, Proc] = {
    b"version": Proc(VersionParams, str, lambda t, _p: t.version(), _never),
    b"echo": Proc(
        EchoParams, EchoResponse, lambda t, p: t.echo(p.req), lambda p: p.req.delay_ms > 0
    ),
    b"complex": Proc(ComplexParams, ComplexResponse, lambda t, p: t.complex(p.req), _never),
    b"schedule": Proc(
        ScheduleParams,
        ScheduleResult,
        lambda t, p: t.schedule(p.job, p.retry, p.schedule),
        _never,
    ),
}


def dump(value: Any) -> bytes:
    """Encode a model (by its wire names, no ``None`` optionals) or a plain value."""
    if isinstance(value, BaseModel):
        value = value.__pydantic_serializer__.to_python(value, by_alias=True, exclude_none=True)
    return cbor2.dumps(value)


def load_params(proc: Proc, payload: bytes) -> Any:
    """Decode and validate a request payload into the proc's envelope model."""
    return proc.params.__pydantic_validator__.validate_python(
        cbor2.loads(payload) if payload else {}
    )


def validate_result(proc: Proc, item: Any) -> Any:
    """Validate a decoded reply body into the proc's result type."""
    if proc.result is str:
        if type(item) is not str:
            raise FloorError(f"expected a str, got {item!r:.80}")
        return item
    return proc.result.__pydantic_validator__.validate_python(item)


def _encode(result: Any) -> bytes:
    body = dump(result)
    return _pack_reply_head(0, len(body)) + body


def _run_now(coro: Coroutine[Any, Any, R]) -> R:
    """Run a coroutine that never suspends, without a Task (as our server does)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        result: R = stop.value
        return result
    coro.close()
    raise RuntimeError("a proc suspended that was not expected to")


class ModelsFloorServer(FloorServer):
    """One connection of the models floor server."""

    def __init__(self, timer: Timer) -> None:
        super().__init__("", timer.name)
        self._timer = timer

    def _answer(self, method: bytes, payload: bytes) -> bytes | None:
        proc = PROCS.get(method)
        if proc is None:
            return _error(f"unknown method: {method.decode('utf-8', 'replace')}")
        try:
            params = load_params(proc, payload)
            coro = proc.call(self._timer, params)
            if not proc.may_wait(params):
                return _encode(_run_now(coro))
        except CallError as exc:
            return _error(exc.message)
        except Exception as exc:
            return _error(f"{method.decode('utf-8', 'replace')}: {exc}")
        slot: list[bytes | None] = [None]
        self._slots.append(slot)
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(lambda done: self._finish(slot, done))
        return None

    def _finish(self, slot: list[bytes | None], task: asyncio.Task[Any]) -> None:
        try:
            frame = _encode(task.result())
        except CallError as exc:
            frame = _error(exc.message)
        except BaseException as exc:
            frame = _error(repr(exc))
        self._fill(slot, frame)


class ModelsFloorClient(FloorClient):
    """A floor client that sends models and validates replies into models."""

    async def call_model(self, method: bytes, params: BaseModel) -> Any:
        """Encode ``params``, call ``method``, validate the reply into its result type."""
        wire = params.__pydantic_serializer__.to_python(params, by_alias=True, exclude_none=True)
        return validate_result(PROCS[method], await self.call(method, wire))


async def serve_models_floor(
    address: str, timer_name: str, *, reuse_port: bool = False
) -> tuple[asyncio.Server, str]:
    """Start a models floor server on the running loop; return it and the address bound."""
    timer = Timer(TimerConfig(name=timer_name))
    return await serve_floor(
        address, "", timer_name, reuse_port=reuse_port, factory=lambda: ModelsFloorServer(timer)
    )


def main(argv: list[str] | None = None) -> int:
    """Run a models floor server until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description="the benchmark's models floor server")
    parser.add_argument("address")
    parser.add_argument("--name", default="ipc-server", help="the timer's name")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--reuse-port", action="store_true")
    args = parser.parse_args(argv)
    return run_server(
        "models floor",
        lambda: serve_models_floor(args.address, args.name, reuse_port=args.reuse_port),
        args.loop,
    )


if __name__ == "__main__":
    sys.exit(main())
