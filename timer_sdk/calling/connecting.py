"""What ``TimerClient.connect(...)`` returns: awaitable, and an async context manager.

``client = await TimerClient.connect(address)`` and ``async with
TimerClient.connect(address) as client:`` both work, as they do for aiohttp's
and httpx's sessions; the second closes the client when the block ends. The
connection starts when it is awaited or entered, not before.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Connecting"]


class _Closes(Protocol):
    async def close(self) -> None: ...


C = TypeVar("C", bound=_Closes)


class Connecting(Generic[C]):
    """A connection being made: ``await`` it for the client, or ``async with`` it.

    ``async with TimerClient.connect(address) as client:`` closes the client
    when the block ends; ``await TimerClient.connect(address)`` leaves closing
    to you (``async with await ...`` works too).
    """

    __slots__ = ("_client", "_opening")

    def __init__(self, opening: Coroutine[Any, Any, C]) -> None:
        self._opening = opening
        self._client: C | None = None

    def __await__(self) -> Generator[Any, None, C]:
        return self._opening.__await__()

    async def __aenter__(self) -> C:
        self._client = await self._opening
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._client is not None  # entered: __aexit__ runs only after __aenter__ returned
        await self._client.close()
