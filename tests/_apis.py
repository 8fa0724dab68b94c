"""Throwaway APIs for the tests of what is generated from a description.

They are declared as the SDK declares its own (``wire/api.py``), so a test can
change a model and see what the schema, the stubs and compat make of it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from timer_sdk.models import EchoResponse, Int64, TimerModel
from timer_sdk.wire.description import ApiDescription, describe


class Method:
    """A stand-in for ``api.Method``: what the description reads."""

    def __init__(self, name: str, params: type[BaseModel], result: type[Any]) -> None:
        self.name, self.params, self.result = name, params, result


def changed_echo() -> ApiDescription:
    """The echo method alone, its request edited: one field's type changed, one added."""

    class EchoRequest(TimerModel):  # the same name, as an edit of models.py would keep it
        message: list[str]
        delay_ms: Int64
        reply_to: str | None = None

    class EchoParams(TimerModel):
        req: EchoRequest

    return describe([Method("echo", EchoParams, EchoResponse)], events={})
