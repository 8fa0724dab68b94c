"""What a connection and its parts need of the server they serve.

:class:`~timer_sdk.server.Server` assembles connections from this folder; they
reach back only through :class:`Host`, so nothing here imports the server's
module, and a part can be tested against a stand-in.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from .stats import Counted

if TYPE_CHECKING:
    from ..bus import EventBus
    from ..limits import Limits

__all__ = ["Host"]


class Host(Counted, Protocol):
    """The server, as its connections see it.

    Connections are ``Any`` here: the server holds them, and typing them would
    make this interface import the connection that imports it.
    """

    loop: asyncio.AbstractEventLoop
    limits: Limits
    closing: bool
    refused: set[Any]  # being aborted in connection_made
    tasks: set[asyncio.Task[None]]
    bus: EventBus | None
    _drained: asyncio.Event  # set while no connection is open

    def _connection_gone(self) -> None: ...
    def _subscribe(self, conn: Any) -> None: ...
    def _unsubscribe(self, conn: Any) -> None: ...
    def _reclaim(self) -> None: ...
