"""The one declaration of the API: each method's name, envelope, reply and proc.

The server dispatches through :data:`METHODS`, and every typed method of the
clients is a one-line call through the same :class:`Method` object, so the
server, the clients and :class:`~timer_sdk.timer.Timer` cannot drift apart
(``tests/test_api.py`` checks that they cover the same methods with the same
types). The table calls a :class:`Procs`, never ``Timer`` by name: the library
sits above this layer and registers itself with :func:`native_procs`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, TypeAdapter
from pydantic_core import SchemaValidator

from ..events import UnknownEvent
from ..models import (
    ComplexParams,
    ComplexRequest,
    ComplexResponse,
    EchoEvent,
    EchoParams,
    EchoRequest,
    EchoResponse,
    JobSpec,
    RetryPolicy,
    ScheduleConfig,
    ScheduleParams,
    ScheduleResult,
    VersionParams,
)
from . import codec
from .encoders import FrameEncoder, frame_encoder

__all__ = [
    "COMPLEX",
    "ECHO",
    "EVENTS",
    "GOAWAY",
    "METHODS",
    "SCHEDULE",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "VERSION",
    "Method",
    "Procs",
    "decode_event",
    "decode_events_dropped",
    "decode_goaway",
    "decode_subscribe",
    "encode_event",
    "encode_events_dropped",
    "encode_events_gap",
    "encode_goaway",
    "is_native",
    "native_procs",
    "validate_event",
]

P = TypeVar("P", bound=BaseModel)
R = TypeVar("R")
T = TypeVar("T")


class Procs(Protocol):
    """What the method table calls and a server serves: the library's procs.

    :class:`~timer_sdk.timer.Timer` is one, and what ``serve()`` takes. Its
    underscored bodies answer a call at once when the proc would not wait.
    """

    @property
    def name(self) -> str: ...

    async def version(self) -> str: ...
    async def echo(self, req: EchoRequest) -> EchoResponse: ...
    async def complex(self, req: ComplexRequest) -> ComplexResponse: ...
    async def schedule(
        self, job: JobSpec, retry: RetryPolicy, schedule: ScheduleConfig
    ) -> ScheduleResult: ...
    def _version(self) -> str: ...
    def _echo_now(self, req: EchoRequest) -> EchoResponse: ...
    def _complex(self, req: ComplexRequest) -> ComplexResponse: ...
    def _schedule(
        self, job: JobSpec, retry: RetryPolicy, schedule: ScheduleConfig
    ) -> ScheduleResult: ...
    def add_echo_listener(self, listener: Callable[[EchoEvent], None]) -> Callable[[], None]: ...


class Method(Generic[P, R]):
    """One method of the wire API.

    ``params`` is the request envelope (a map keyed by the proc's parameter
    names), ``result`` the reply type, and ``invoke`` calls the proc on a
    :class:`Procs` with an envelope.
    """

    __slots__ = ("_empty_params", "_params_adapter", "_result_adapter", "call_now",
                 "encode_frame", "invoke", "name", "params", "result", "wire_name")  # fmt: skip

    def __init__(
        self,
        name: str,
        params: type[P],
        result: type[R],
        invoke: Callable[[Procs, P], Coroutine[Any, Any, R]],
        call_now: Callable[[Procs, P], R | None] | None = None,
    ) -> None:
        self.name = name
        self.wire_name = name.encode()
        self.params = params
        self.result = result
        self.invoke = invoke
        self.call_now = call_now
        """The proc without a coroutine: its result, or ``None`` if it must wait (then
        ``invoke``). Only for the library's own procs (:func:`native_procs`), not overrides."""
        self.encode_frame: FrameEncoder = frame_encoder(result)
        """A result to its whole success frame, as ``encode_reply(RET_OK, encode_result(r))``."""
        self._params_adapter: TypeAdapter[P] = TypeAdapter(params)
        self._result_adapter: TypeAdapter[R] = TypeAdapter(result)
        # An envelope without fields has one valid value, and models are frozen:
        # every ``{}`` request can share it.
        self._empty_params: P | None = None if params.model_fields else params()

    @property
    def empty_params(self) -> P | None:
        """The one envelope of a method without parameters (shared: models are frozen)."""
        return self._empty_params

    @property
    def params_validator(self) -> SchemaValidator:
        """pydantic's core validator of the envelope."""
        return self._params_adapter.validator  # type: ignore[return-value]

    @property
    def result_validator(self) -> SchemaValidator:
        """pydantic's core validator of the reply type."""
        return self._result_adapter.validator  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<Method {self.name}: {self.params.__name__} -> {self.result.__name__}>"

    # Server side: bytes in, model out; result out as bytes.

    def decode_params(
        self,
        payload: bytes,
        *,
        max_depth: int = codec.DEFAULT_MAX_DEPTH,
        max_items: int = codec.DEFAULT_MAX_ITEMS,
        decoder: codec.StrictDecoder | None = None,
    ) -> P:
        """Decode and validate a request payload; an empty payload is ``{}``.

        At most ``max_items`` array and map entries in all are validated:
        a larger request is refused before validation can amplify it. A server
        passes its own ``decoder`` (built with its ``max_depth``).
        """
        if self._empty_params is not None and (not payload or payload == b"\xa0"):
            return self._empty_params
        try:
            depth = decoder.max_depth if decoder is not None else max_depth
            codec.check_items(payload, max_items, depth)  # before cbor2 builds the item
            if not payload:
                item = {}
            elif decoder is not None:
                item = decoder.decode(payload)
            else:
                item = codec.decode_item(payload, max_depth=max_depth)
        except codec.DecodeError as exc:
            raise codec.DecodeError(f"{self.name}: invalid request: {exc}") from None
        return self.validate_params(item)

    def validate_params(self, item: object) -> P:
        """Validate a decoded payload by its wire names, as the server does."""
        params: P = codec.validate(self._params_adapter, item, f"{self.name}: invalid request")
        return params

    def encode_result(self, result: R) -> bytes:
        """Encode a proc's result as a success body."""
        if isinstance(result, BaseModel):
            return codec.encode_model(result)
        return codec.encode_item(result)

    # Client side: model in as bytes; reply bytes out as the result type.

    def encode_params(self, params: P) -> bytes:
        """Encode a request envelope; ``None`` optionals are omitted."""
        if self._empty_params is not None:
            return b"\xa0"
        return codec.encode_model(params)

    def decode_result(self, body: bytes) -> R:
        """Decode and validate a success body, as a client reads it.

        Every declared field is checked; a field the reply type does not
        declare (a newer server's) is ignored.
        """
        try:
            item = codec.decode_item(body)
        except codec.DecodeError as exc:
            raise codec.DecodeError(f"{self.name}: invalid reply: {exc}") from None
        if self.result is str and type(item) is str:
            return item  # type: ignore[return-value]  # all a str validator would check
        result: R = codec.validate(
            self._result_adapter, item, f"{self.name}: invalid reply", extra="ignore"
        )
        return result


def _version(timer: Procs, _params: VersionParams) -> Coroutine[Any, Any, str]:
    return timer.version()


def _echo(timer: Procs, params: EchoParams) -> Coroutine[Any, Any, EchoResponse]:
    return timer.echo(params.req)


def _echo_now(timer: Procs, params: EchoParams) -> EchoResponse | None:
    return timer._echo_now(params.req) if params.req.delay_ms <= 0 else None


def _complex(timer: Procs, params: ComplexParams) -> Coroutine[Any, Any, ComplexResponse]:
    return timer.complex(params.req)


def _schedule(timer: Procs, params: ScheduleParams) -> Coroutine[Any, Any, ScheduleResult]:
    return timer.schedule(params.job, params.retry, params.schedule)


VERSION = Method("version", VersionParams, str, _version, lambda t, _p: t._version())
ECHO = Method("echo", EchoParams, EchoResponse, _echo, _echo_now)
COMPLEX = Method(
    "complex", ComplexParams, ComplexResponse, _complex, lambda t, p: t._complex(p.req)
)
SCHEDULE = Method(
    "schedule",
    ScheduleParams,
    ScheduleResult,
    _schedule,
    lambda t, p: t._schedule(p.job, p.retry, p.schedule),
)

METHODS: dict[str, Method[Any, Any]] = {m.name: m for m in (VERSION, ECHO, COMPLEX, SCHEDULE)}
"""Every method the server answers, by wire name."""

_NATIVE: dict[str, object] = {}


def native_procs(cls: type[T]) -> type[T]:
    """Register ``cls`` (the library's ``Timer``) as the procs :attr:`Method.call_now` mirrors.

    A class decorator. A subclass that overrides a proc gets its override,
    called as a coroutine: see :func:`is_native`.
    """
    for name in METHODS:
        _NATIVE[name] = getattr(cls, name)
    return cls


def is_native(target: object, name: str) -> bool:
    """Whether ``target``'s proc ``name`` is the registered library's own, not an override."""
    return name in _NATIVE and getattr(type(target), name, None) is _NATIVE[name]


# --- the event extension (docs/protocol.md) ---------------------------------

EVENTS: dict[str, type[BaseModel]] = {"on_echo_fired": EchoEvent}
"""Every event the library fires, by wire name, with its payload model."""

SUBSCRIBE = "events.subscribe"
"""Ask for event frames on this connection: payload ``{}`` or ``{events: [names]}``."""

UNSUBSCRIBE = "events.unsubscribe"
"""Stop event frames; none follows this request's reply."""

_EVENT_ADAPTER: TypeAdapter[EchoEvent] = TypeAdapter(EchoEvent)


def encode_event(name: str, event: BaseModel) -> bytes:
    """Encode an event frame body: ``{event: name, data: {...}}``."""
    return codec.encode_item({"event": name, "data": codec.dump_model(event)})


def decode_event(body: bytes) -> EchoEvent | UnknownEvent:
    """Decode an event frame body as a client reads it.

    An event of a kind this client does not know is an :class:`UnknownEvent`;
    a known one is validated, ignoring fields its model does not declare.
    Raises :class:`~timer_sdk.wire.codec.DecodeError` for a body that is not
    ``{event: text, data: ...}`` or a known event's data of the wrong shape.
    """
    item = codec.decode_item(body)
    name = item.get("event") if isinstance(item, dict) else None
    if type(name) is not str or "data" not in item:
        raise codec.DecodeError(f"invalid event frame: {item!r:.80}")
    if name != "on_echo_fired":
        return UnknownEvent(name, item["data"])
    event: EchoEvent = codec.validate(_EVENT_ADAPTER, item["data"], name, extra="ignore")
    return event


def validate_event(item: object) -> EchoEvent:
    """Validate a decoded event frame body strictly, as servers sharing events do.

    Raises :class:`~timer_sdk.wire.codec.DecodeError`.
    """
    if not isinstance(item, dict) or item.get("event") != "on_echo_fired":
        raise codec.DecodeError(f"invalid event frame: {item!r:.80}")
    event: EchoEvent = codec.validate(_EVENT_ADAPTER, item.get("data"), "on_echo_fired")
    return event


def decode_subscribe(payload: bytes, *, max_depth: int = codec.DEFAULT_MAX_DEPTH) -> list[str]:
    """Decode an ``events.subscribe`` payload into the event names asked for."""
    try:
        item = codec.decode_item(payload, max_depth=max_depth) if payload else {}
    except codec.DecodeError as exc:
        raise codec.DecodeError(f"{SUBSCRIBE}: invalid request: {exc}") from None
    names = item.get("events", list(EVENTS)) if isinstance(item, dict) else None
    if (
        not isinstance(item, dict)
        or set(item) - {"events"}
        or not isinstance(names, list)
        or not names
        or any(name not in EVENTS for name in names)
    ):
        raise codec.DecodeError(
            f"{SUBSCRIBE}: invalid request: expected {{}} or {{events: [names]}} with names "
            f"from: {', '.join(EVENTS)}"
        )
    return names


def encode_events_dropped(count: int) -> bytes:
    """Encode a drop notice body: ``{dropped: count}``."""
    return codec.encode_item({"dropped": count})


def encode_events_gap(reason: str) -> bytes:
    """Encode a gap notice body: ``{dropped: 0, gap: reason}``, a loss of unknown size."""
    return codec.encode_item({"dropped": 0, "gap": reason})


def decode_events_dropped(body: bytes) -> int | str:
    """Decode a drop notice body: the count, or a gap notice's reason.

    Keys other than ``dropped`` and ``gap`` (a newer server's) are ignored.
    Raises :class:`~timer_sdk.wire.codec.DecodeError`.
    """
    item = codec.decode_item(body)
    count = item.get("dropped") if isinstance(item, dict) else None
    if type(count) is int and count >= 1:
        return count
    if count == 0 and type(count) is int and type(item.get("gap")) is str:
        return str(item["gap"])
    raise codec.DecodeError(f"invalid drop notice: {item!r:.80}")


# --- the close notice (docs/protocol.md) --------------------------------------

GOAWAY = "server.goaway"
"""Ask to be told, before a graceful close, that no further request will be read."""


def encode_goaway(reason: str) -> bytes:
    """Encode a close notice body: ``{reason: text}``."""
    return codec.encode_item({"reason": reason})


def decode_goaway(body: bytes) -> str:
    """The reason a close notice gives; keys it does not know are ignored, as is a bad body.

    A notice is a notice whatever its body says: the frame itself is the promise.
    """
    try:
        item = codec.decode_item(body)
    except codec.DecodeError:
        return "the server is closing the connection"
    reason = item.get("reason") if isinstance(item, dict) else None
    return reason if isinstance(reason, str) and reason else "the server is closing the connection"
