"""The exception tree of timer_sdk.

Every exception the SDK raises on purpose derives from :class:`TimerError`::

    TimerError
    ├── CallError              a proc refused the call (in process)
    │   └── RemoteCallError    the server answered with an error reply (ret 1)
    ├── TimerConnectionError   also a builtin ConnectionError
    │   ├── ConnectError       could not connect at all
    │   ├── ConnectionLost     the connection dropped; pending calls fail with it
    │   │   └── CallNotStarted the server closed gracefully before reading the call
    │   └── ClientClosedError  the client was closed by its owner
    ├── CallTimeout            also a builtin TimeoutError
    ├── ProtocolError          the peer broke the wire contract
    │   └── FrameTooLarge      a length prefix over the configured limit
    ├── AddressError           also a builtin ValueError
    └── LoopError              also a builtin RuntimeError: the wrong event loop

``except CallError`` catches a proc's refusal whether the proc ran in process
or behind a socket, so code can move between the two without changing.
"""

from __future__ import annotations

__all__ = [
    "AddressError",
    "CallError",
    "CallNotStarted",
    "CallTimeout",
    "ClientClosedError",
    "ConnectError",
    "ConnectionLost",
    "FrameTooLarge",
    "LoopError",
    "ProtocolError",
    "RemoteCallError",
    "TimerConnectionError",
    "TimerError",
]


class TimerError(Exception):
    """Base of every timer_sdk exception."""


class CallError(TimerError):
    """A proc refused its input, for example an empty job name.

    ``message`` is the exact text the server sends in an error reply.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RemoteCallError(CallError):
    """The server answered a call with an error reply (ret 1).

    ``method`` is the method called; ``message`` is the server's text.
    """

    def __init__(self, method: str, message: str) -> None:
        super().__init__(message)
        self.method = method

    def __str__(self) -> str:
        if not self.message:
            return self.method
        # Most server texts already start with the method name; say it once.
        if self.message.startswith(f"{self.method}:"):
            return self.message
        return f"{self.method}: {self.message}"

    def __repr__(self) -> str:
        return f"RemoteCallError(method={self.method!r}, message={self.message!r})"


class TimerConnectionError(TimerError, ConnectionError):
    """The connection to the server cannot carry calls."""


class ConnectError(TimerConnectionError):
    """Connecting failed: refused, unreachable, no such socket, or timed out."""


class ConnectionLost(TimerConnectionError):
    """The connection dropped; calls that were pending fail with this."""


class CallNotStarted(ConnectionLost):
    """The server closed the connection gracefully before it read this call.

    It told the client so (a close notice, docs/protocol.md): the call never
    started on the server, so sending it again is safe even for a method with
    effects. A client with ``reconnect=True``, or several ``connections``,
    does that itself; this error reaches the caller only when it could not.
    Unlike a plain :class:`ConnectionLost`, after which the call may have run.
    """


class ClientClosedError(TimerConnectionError):
    """The client was closed; calls pending at that moment fail with this."""


class CallTimeout(TimerError, TimeoutError):
    """A call took longer than its timeout.

    The request may have reached the server and run. Its late reply is read
    and discarded, so later calls on the same client still get their own.
    """


class ProtocolError(TimerError):
    """The peer sent bytes that break the wire contract."""


class FrameTooLarge(ProtocolError):
    """A length prefix exceeds the configured limit."""


class AddressError(TimerError, ValueError):
    """An address string is not ``tcp:HOST:PORT``, ``tls:HOST:PORT`` or ``unix:PATH``."""


class LoopError(TimerError, RuntimeError):
    """An object was used from a thread or event loop where it would deadlock."""
