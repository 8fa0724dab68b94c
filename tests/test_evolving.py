"""Each client against a real newer server process, and a newer client against an older one.

``tests/_newer_server.py`` answers as a later timer would (fields, an event kind,
a method and a ``ret 3`` frame this SDK does not know) or, with ``--older``, as
an earlier one that lacks two optional request fields. docs/protocol.md,
"Evolving the API", gives the rules these tests hold the clients to.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from timer_sdk import (
    ComplexRequest,
    ComplexResponse,
    EchoEvent,
    EchoRequest,
    EchoResponse,
    JobSpec,
    RemoteCallError,
    RetryPolicy,
    ScheduleConfig,
    ScheduleResult,
    TimerClient,
    UnknownEvent,
)
from timer_sdk import sync as blocking
from timer_sdk.wire.codec import DecodeError

from ._newer_server import WRONG_TYPE, running

JOB = JobSpec(name="j", payload=["p"], priority=1)
RETRY = RetryPolicy(max_attempts=3, backoff_ms=100, retry_on=["timeout"])
WHEN = ScheduleConfig(start_at_ms=1000, interval_ms=500, jitter=7)
TWO = ComplexRequest(messages=[EchoRequest(message="a", delay_ms=0)] * 2, tags=["x"], note="n")

# The five calls every client makes, and what each must return: the fields it knows.
EXPECTED: list[Any] = [
    "nim-timer v0.2.0",
    EchoResponse(echoed="one", timer_name="ipc-server"),
    ComplexResponse(summary="received 2 messages, note=n, retries=0", item_count=2, has_note=True),
    ScheduleResult(job_id="ipc-server:j", will_run_count=120, first_run_at_ms=1007,
                   effective_backoff_ms=100),
    EchoResponse(echoed="two", timer_name="ipc-server"),
]  # fmt: skip
EVENTS: list[Any] = [
    EchoEvent(message="one", echo_count=1),
    UnknownEvent("on_job_scheduled", {"jobId": "ipc-server:j", "willRunCount": 120}),
    EchoEvent(message="two", echo_count=1),
]


@pytest.fixture(scope="module")
def newer() -> Iterator[str]:
    with running() as address:
        yield address


@pytest.fixture(scope="module")
def older() -> Iterator[str]:
    with running("--older") as address:
        yield address


async def test_the_async_client_gets_every_call_and_event_from_a_newer_server(
    newer: str,
) -> None:
    async with await TimerClient.connect(newer, timeout=30) as client:
        async with client.events() as events:
            results = [
                await client.version(),
                await client.echo(EchoRequest(message="one", delay_ms=0)),
                await client.complex(TWO),
                await client.schedule(JOB, RETRY, WHEN),
                await client.echo(EchoRequest(message="two", delay_ms=0)),
            ]
            items = [await anext(events) for _ in EVENTS]
        assert results == EXPECTED
        assert items == EVENTS
        assert not client.closed


def test_the_blocking_client_gets_every_call_and_event_from_a_newer_server(newer: str) -> None:
    with blocking.TimerClient.connect(newer, timeout=30) as client:
        with client.events() as events:
            results = [
                client.version(),
                client.echo(EchoRequest(message="one", delay_ms=0)),
                client.complex(TWO),
                client.schedule(JOB, RETRY, WHEN),
                client.echo(EchoRequest(message="two", delay_ms=0)),
            ]
            items = [next(events) for _ in EVENTS]
        assert results == EXPECTED
        assert items == EVENTS
        assert list(events) == []  # closed: the iteration ends
        assert not client.closed


async def test_a_known_field_of_the_wrong_type_is_still_an_error(newer: str) -> None:
    async with await TimerClient.connect(newer, timeout=30) as client:
        with pytest.raises(DecodeError, match=r"^echo: invalid reply: echoed: Input should be"):
            await client.echo(EchoRequest(message=WRONG_TYPE, delay_ms=0))
        assert await client.version() == EXPECTED[0]  # the connection is kept


async def test_a_newer_client_calls_an_older_server_leaving_new_fields_unset(
    older: str,
) -> None:
    # The older server knows neither ComplexRequest.retries nor ScheduleConfig.jitter.
    when = WHEN.model_copy(update={"jitter": None})
    async with await TimerClient.connect(older, timeout=30) as client:
        assert await client.complex(TWO) == EXPECTED[2]
        assert (await client.schedule(JOB, RETRY, when)).first_run_at_ms == 1000
        # It refuses what it does not know, so the calls above sent no unset field.
        with pytest.raises(RemoteCallError, match="unknown field"):
            await client.complex(TWO.model_copy(update={"retries": 3}))
        assert not client.closed
