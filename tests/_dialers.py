"""A client's own dialer, slowed down so that a test decides what each reconnect meets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from timer_sdk import Server
from timer_sdk.calling.dialer import _Dialer
from timer_sdk.calling.protocol import _ClientProtocol

from .conftest import wait_until


class SettlingDialer:
    """The client's own dialer, returning a connection once the server took or refused it.

    A refused connection is aborted by the server at once; without this, whether the
    client sees the abort before or after it gets the connection is a race of the loop.
    Dials wait for ``opened`` too, so that the test decides who gets the server first;
    ``dialed`` holds the loop time at which each dial started.
    """

    def __init__(self, real: _Dialer, current: Callable[[], Server], opened: asyncio.Event) -> None:
        self.real = real
        self.current = current
        self.opened = opened
        self.dialed: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def dial(self, loop: asyncio.AbstractEventLoop) -> _ClientProtocol:
        await self.opened.wait()
        self.dialed.append(loop.time())
        stats = self.current().stats
        refused = stats.connections_refused
        seen = stats.connections_accepted + refused
        protocol = await self.real.dial(loop)
        await wait_until(lambda: stats.connections_accepted + stats.connections_refused > seen)
        if stats.connections_refused > refused:
            await wait_until(lambda: protocol.failure is not None)
        return protocol
