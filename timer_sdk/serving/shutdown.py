"""Serve until Ctrl-C or SIGTERM, then stop gracefully: for scripts and ``timer-sdk serve``.

The first signal closes the server gracefully (:meth:`Server.close`: stop
accepting, answer every request already received). A second one is
acknowledged, so that a user who presses Ctrl-C again knows it was heard. A
third stops at once: connections are aborted and procs still running are
cancelled. Handling the signals on the loop, instead of letting
``KeyboardInterrupt`` cancel the main task, is what keeps the stop free of
tracebacks.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any, Protocol

__all__ = ["serve_until_signal"]

logger = logging.getLogger("timer_sdk.shutdown")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Closable(Protocol):
    """What this module needs of a server (:class:`~timer_sdk.server.Server` is one)."""

    tasks: set[asyncio.Task[None]]

    async def wait_closed(self) -> None: ...
    async def close(self, timeout: float | None = ...) -> None: ...


def _requests(server: Closable) -> str:
    n = len(server.tasks)
    return f"{n} request in flight" if n == 1 else f"{n} requests in flight"


async def serve_until_signal(
    server: Closable,
    *,
    shutdown_timeout: float | None = 10.0,
    signals: Sequence[signal.Signals] = STOP_SIGNALS,
    report: Callable[[str], Any] | None = None,
) -> bool:
    """Serve until one of ``signals`` arrives, then close ``server`` gracefully.

    A second signal is reported, a third aborts the close. ``report`` gets
    each message (default: the ``timer_sdk.shutdown`` logger, at WARNING, so
    that an app without logging set up still shows them; the first one at
    INFO when no request is in flight, as the stop is then immediate). Returns ``True``
    if the close was graceful (or the server was closed by someone else),
    ``False`` if a third signal cut it short.

    Runs on the main thread's loop (it uses ``loop.add_signal_handler``) and
    puts the previous handlers back when it returns. Cancelling it closes the
    server, as :meth:`Server.serve_forever` does.
    """
    loop = asyncio.get_running_loop()
    # By default a stop that waits for work says so (warning: shown even without
    # logging set up); an immediate one is routine (info).
    say: Callable[[str], Any] = report or logger.warning
    heard = 0
    first = asyncio.Event()
    closing: asyncio.Task[None] | None = None

    def on_signal() -> None:
        nonlocal heard
        heard += 1
        if heard == 1:
            first.set()
        elif heard == 2:
            say(f"still finishing {_requests(server)}; signal once more to stop at once")
        elif heard == 3:
            say(f"stopping at once, abandoning {_requests(server)}")
            if closing is not None:
                closing.cancel()

    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    try:
        stopped = loop.create_task(first.wait())
        closed = loop.create_task(server.wait_closed())
        try:
            await asyncio.wait((stopped, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            closed.cancel()
        if not first.is_set():
            return True  # closed by someone else
        inform = say if server.tasks or report else logger.info
        inform(f"shutting down, finishing {_requests(server)}")
        closing = loop.create_task(server.close(timeout=shutdown_timeout))
        if heard >= 3:  # all three arrived before we got here
            closing.cancel()
        await asyncio.wait((closing,))
        if closing.cancelled():
            return False
        closing.result()
        return True
    except asyncio.CancelledError:
        await asyncio.shield(closing or server.close(timeout=shutdown_timeout))
        raise
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            if handler is not None:  # e.g. asyncio.run's own Ctrl-C handler
                signal.signal(sig, handler)
