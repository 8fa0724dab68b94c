"""The Pydantic models of every request, reply, event and config.

Fields are snake_case in Python and camelCase on the wire (``delay_ms`` is
``delayMs``). Models are strict and frozen: a ``"5"`` is not an int, a
``True`` is not an int, and an unknown field is an error, in process and on
the wire alike. Integers are bounded to the signed 64-bit range that the
reference implementation uses.

Python code may build a model with either spelling
(``EchoRequest(delay_ms=5)`` or ``EchoRequest(delayMs=5)``); the server
validates wire input by the camelCase names only.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

__all__ = [
    "ComplexParams",
    "ComplexRequest",
    "ComplexResponse",
    "EchoEvent",
    "EchoParams",
    "EchoRequest",
    "EchoResponse",
    "Int64",
    "JobSpec",
    "RetryPolicy",
    "ScheduleConfig",
    "ScheduleParams",
    "ScheduleResult",
    "TimerConfig",
    "TimerModel",
    "VersionParams",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
"""An integer in the signed 64-bit range, as the reference's ``int``."""


class TimerModel(BaseModel):
    """Base of every timer model: strict, frozen, camelCase on the wire."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="forbid",
        strict=True,
        frozen=True,
    )


# --- the library's types -------------------------------------------------


class TimerConfig(TimerModel):
    """The timer's construction config: its one piece of state."""

    name: str = "ipc-server"
    """The name that replies and events carry (``timerName`` in an echo reply)."""


class EchoRequest(TimerModel):
    """Echo ``message`` back after ``delay_ms`` milliseconds."""

    message: str
    """The text to echo back."""
    delay_ms: Int64
    """Milliseconds to wait before echoing; 0 or less echoes at once."""


class EchoResponse(TimerModel):
    """The echoed message and the name of the timer that echoed it."""

    echoed: str
    """The request's ``message``, unchanged."""
    timer_name: str
    """The name of the timer that echoed it (:attr:`TimerConfig.name`)."""


class ComplexRequest(TimerModel):
    """A batch of echo requests with tags and two optional fields."""

    messages: list[EchoRequest]
    """The batch; only counted, not echoed."""
    tags: list[str]
    """Free-form labels; accepted and not used."""
    note: str | None = None
    """An optional note, repeated in the summary (``<none>`` without one)."""
    retries: Int64 | None = None
    """An optional count, repeated in the summary (0 without one)."""


class ComplexResponse(TimerModel):
    """A summary of a :class:`ComplexRequest`."""

    summary: str
    """One line: ``received N messages, note=..., retries=...``."""
    item_count: Int64
    """How many messages the request held."""
    has_note: bool
    """Whether the request had a ``note``."""


class JobSpec(TimerModel):
    """A job to schedule."""

    name: str
    """The job's name; must not be empty. Part of its ``job_id``."""
    payload: list[str]
    """The job's arguments, as strings."""
    priority: Int64
    """The job's priority; any integer."""


class RetryPolicy(TimerModel):
    """How a scheduled job retries."""

    max_attempts: Int64
    """Attempts in all, the first included; must be positive."""
    backoff_ms: Int64
    """Milliseconds to wait between attempts."""
    retry_on: list[str]
    """The kinds of failure that are retried, such as ``"timeout"``."""


class ScheduleConfig(TimerModel):
    """When a scheduled job starts and how often it runs."""

    start_at_ms: Int64
    """When the first run is due, in milliseconds."""
    interval_ms: Int64
    """Milliseconds between runs; 0 or less runs once."""
    jitter: Int64 | None = None
    """Milliseconds added to ``start_at_ms`` for the first run (0 without one)."""


class ScheduleResult(TimerModel):
    """What :meth:`Timer.schedule` planned."""

    job_id: str
    """``TIMER_NAME:JOB_NAME``."""
    will_run_count: Int64
    """Runs in the first minute: 60000 // ``interval_ms``, at least 1."""
    first_run_at_ms: Int64
    """``start_at_ms`` + ``jitter``."""
    effective_backoff_ms: Int64
    """The ``backoff_ms`` the job retries with."""


class EchoEvent(TimerModel):
    """Fired as ``on_echo_fired`` by every echo."""

    message: str
    """The message that was echoed."""
    echo_count: Int64
    """Echoes this event stands for; 1 for each echo."""


# --- request envelopes: one per method, keyed by the proc's parameter names ---


class VersionParams(TimerModel):
    """The ``version`` request: no parameters."""


class EchoParams(TimerModel):
    """The ``echo`` request envelope."""

    req: EchoRequest


class ComplexParams(TimerModel):
    """The ``complex`` request envelope."""

    req: ComplexRequest


class ScheduleParams(TimerModel):
    """The ``schedule`` request envelope."""

    job: JobSpec
    retry: RetryPolicy
    schedule: ScheduleConfig
