"""Opening the connection under a TimerClient, and reopening it: dialing and its errors.

Apart from ``protocol.py`` because none of it runs per call: it turns
an address into a connected :class:`~timer_sdk.calling.protocol._ClientProtocol`,
or into a :class:`~timer_sdk.errors.ConnectError` that says why not (a TLS
handshake fails in ways worth explaining).
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from dataclasses import dataclass

from ..errors import ConnectError
from ..wire.address import Address
from .protocol import DEFAULT_MAX_PENDING, _ClientProtocol

_BACKOFF_FIRST = 0.05
"""Seconds before redialing after a failed dial; doubles with each failure."""
_BACKOFF_MAX = 5.0
"""The longest wait between dials."""


@dataclass(frozen=True, slots=True)
class _Dialer:
    """Everything needed to open (and reopen) the connection."""

    address: Address
    ssl: _ssl.SSLContext | None
    server_hostname: str | None
    max_frame_size: int
    connect_timeout: float | None
    max_pending: int = DEFAULT_MAX_PENDING
    dead_after: float | None = None
    goaway: bool = False
    """Ask the server for its close notice (``server.goaway``) on each connection."""

    async def dial(self, loop: asyncio.AbstractEventLoop) -> _ClientProtocol:
        address = self.address
        protocol = _ClientProtocol(
            loop,
            str(address),
            self.max_frame_size,
            max_pending=self.max_pending,
            dead_after=self.dead_after,
            drainable=self.ssl is None,
        )
        try:
            async with asyncio.timeout(self.connect_timeout):
                if address.scheme == "unix":
                    await loop.create_unix_connection(lambda: protocol, address.path)
                else:
                    await loop.create_connection(
                        lambda: protocol,
                        address.host,
                        address.port,
                        ssl=self.ssl,
                        server_hostname=self.server_hostname if self.ssl else None,
                    )
        except TimeoutError:
            raise ConnectError(f"cannot connect to {address}: timed out") from None
        except OSError as exc:  # includes ssl.SSLError
            reason = exc.strerror or str(exc) or type(exc).__name__
            if self.ssl is not None:
                reason = _tls_reason(exc, reason)
            raise ConnectError(f"cannot connect to {address}: {reason}") from exc
        if self.goaway:  # before any call: a close then says which calls never started
            protocol.ask_goaway()
        return protocol


# What OpenSSL says when the first bytes back are not a TLS record.
_NOT_TLS_REASONS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG")
# What certificate verification says when the chain ends at a CA we do not trust.
_UNKNOWN_CA = (
    "unable to get local issuer certificate",
    "self-signed certificate",
    "self signed certificate",
)


def _tls_reason(exc: OSError, reason: str) -> str:
    """Explain a failed TLS handshake as far as the error allows."""
    if isinstance(exc, _ssl.SSLError) and exc.reason in _NOT_TLS_REASONS:
        return f"the server does not speak TLS ({exc.reason}); use tcp: instead of tls:"
    if isinstance(exc, _ssl.SSLCertVerificationError):
        detail = f"certificate verify failed: {(exc.verify_message or reason).rstrip('.')}"
        if "mismatch" in detail:
            return (
                f"{detail}; the server's certificate names another host: connect by a "
                "name it lists, or pass server_hostname="
            )
        if any(words in detail for words in _UNKNOWN_CA):
            return (
                f"{detail}; the server's certificate is not signed by a CA this client "
                "trusts: trust its CA (--tls-ca, or the ssl context's load_verify_locations)"
            )
    if isinstance(exc, ConnectionResetError):
        # A server refusing our certificate (TLS 1.2) closes the handshake like this.
        return (
            "the server closed the connection during the TLS handshake "
            "(is a client certificate required, or is yours from a CA it does not trust?)"
        )
    return reason
