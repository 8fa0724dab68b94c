"""One declaration: the server's dispatch, the client's stubs and the Timer agree."""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

import pytest

import timer_sdk
from timer_sdk.client import TimerClient
from timer_sdk.timer import Timer
from timer_sdk.wire import api

PACKAGE = Path(timer_sdk.__file__).parent


@pytest.mark.parametrize("name", sorted(api.METHODS))
def test_client_timer_and_envelope_agree(name: str) -> None:
    method = api.METHODS[name]
    assert method.name == name
    proc = inspect.signature(getattr(Timer, name))
    stub = inspect.signature(getattr(TimerClient, name))
    proc_hints = typing.get_type_hints(getattr(Timer, name))
    stub_hints = typing.get_type_hints(getattr(TimerClient, name))

    proc_params = [p for p in proc.parameters if p != "self"]
    stub_params = [p for p in stub.parameters if p not in ("self", "timeout")]
    assert proc_params == stub_params == list(method.params.model_fields)
    for param in proc_params:
        field = method.params.model_fields[param].annotation
        assert proc_hints[param] is stub_hints[param] is field
    assert proc_hints["return"] is stub_hints["return"] is method.result


def test_every_typed_client_method_is_declared() -> None:
    procs = {
        name
        for name, _ in inspect.getmembers(Timer, inspect.iscoroutinefunction)
        if not name.startswith("_") and name != "serve"
    }
    assert procs == set(api.METHODS)
    for name in procs:
        assert inspect.iscoroutinefunction(getattr(TimerClient, name))


@pytest.mark.parametrize(
    "module",
    ["models", "wire/api", "wire/codec", "wire/framing", "wire/address", "errors", "calling/plans"],
)
def test_sans_io_modules_import_no_io(module: str) -> None:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "selectors", "ssl", "trio", "anyio"}


def test_public_api_is_exported() -> None:
    for name in timer_sdk.__all__:
        assert hasattr(timer_sdk, name), name
    assert (PACKAGE / "py.typed").exists()
