"""The port of ``serve --workers``: its workers share it, and no one else may.

The workers bind it with SO_REUSEPORT, so that the kernel spreads connections
over them evenly. But SO_REUSEPORT lets any socket of the same user join:
a second ``serve --workers`` on the port would start without a word and take
half of the connections. So the parent claims the port first, and a second
server fails with "address already in use", as a one-process ``serve`` does.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
from typing import Any

from ..wire.address import Address

__all__ = ["PortClaim", "claim_port"]

ABSTRACT_SOCKETS = sys.platform.startswith("linux")
"""Whether Unix sockets may have abstract names, which the kernel frees when the process exits.

Without them (macOS, the BSDs) there is no lock: a second server fails only
once the first one's workers listen, and a stranger's SO_REUSEPORT socket may join.
"""


@dataclasses.dataclass
class PortClaim:
    """What the parent holds: the address with its port, and sockets to close."""

    address: Address
    lock: socket.socket | None
    """Held while the workers serve: the claim on the port, among ``--workers`` servers."""
    placeholder: socket.socket | None
    """For port 0, holds the port the OS chose until the workers listen on it."""

    def release_placeholder(self) -> None:
        if self.placeholder is not None:
            self.placeholder.close()
            self.placeholder = None

    def close(self) -> None:
        self.release_placeholder()
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def claim_port(address: Address) -> PortClaim:
    """Claim ``address``'s TCP port for this server's workers; raise ``OSError`` if taken."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    placeholder = None
    if address.port == 0:  # each worker would get a port of its own: learn one first
        placeholder = _bound(family, kind, proto, sockaddr, reuse_port=True)
        address = dataclasses.replace(address, port=placeholder.getsockname()[1])
        sockaddr = placeholder.getsockname()
    try:
        lock = _lock(address.port, sockaddr)
        if placeholder is None:
            try:  # without SO_REUSEPORT this fails if anyone listens there
                _bound(family, kind, proto, sockaddr, reuse_port=False).close()
            except BaseException:
                if lock is not None:
                    lock.close()
                raise
    except BaseException:
        if placeholder is not None:
            placeholder.close()
        raise
    return PortClaim(address, lock, placeholder)


def _in_use(sockaddr: object, exc: OSError) -> OSError:
    # asyncio's wording, as a one-process serve says it
    why = (exc.strerror or str(exc)).lower()
    return OSError(exc.errno, f"error while attempting to bind on address {sockaddr!r}: {why}")


def _bound(
    family: int, kind: int, proto: int, sockaddr: tuple[Any, ...], *, reuse_port: bool
) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers do
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise _in_use(sockaddr, exc) from None
    return sock


def _lock(port: int, sockaddr: object) -> socket.socket | None:
    """One name per port in Linux's abstract socket namespace: the kernel frees it at exit."""
    if not ABSTRACT_SOCKETS:
        return None
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(f"\0timer-sdk serve --workers: tcp port {port}")
    except OSError as exc:  # as a rule, another serve --workers holds the name
        lock.close()
        raise _in_use(sockaddr, exc) from None
    return lock
