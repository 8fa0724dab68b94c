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


class EchoRequest(TimerModel):
    """Echo ``message`` back after ``delay_ms`` milliseconds."""

    message: str
    delay_ms: Int64


class EchoResponse(TimerModel):
    """The echoed message and the name of the timer that echoed it."""

    echoed: str
    timer_name: str


class ComplexRequest(TimerModel):
    """A batch of echo requests with tags and two optional fields."""

    messages: list[EchoRequest]
    tags: list[str]
    note: str | None = None
    retries: Int64 | None = None


class ComplexResponse(TimerModel):
    """A summary of a :class:`ComplexRequest`."""

    summary: str
    item_count: Int64
    has_note: bool


class JobSpec(TimerModel):
    """A job to schedule."""

    name: str
    payload: list[str]
    priority: Int64


class RetryPolicy(TimerModel):
    """How a scheduled job retries."""

    max_attempts: Int64
    backoff_ms: Int64
    retry_on: list[str]


class ScheduleConfig(TimerModel):
    """When a scheduled job starts and how often it runs."""

    start_at_ms: Int64
    interval_ms: Int64
    jitter: Int64 | None = None


class ScheduleResult(TimerModel):
    """What :meth:`Timer.schedule` planned."""

    job_id: str
    will_run_count: Int64
    first_run_at_ms: Int64
    effective_backoff_ms: Int64


class EchoEvent(TimerModel):
    """Fired as ``on_echo_fired`` by every echo."""

    message: str
    echo_count: Int64


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
