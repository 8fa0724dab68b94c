"""Parse and format the address strings of protocol.md.

``tcp:HOST:PORT`` and ``tls:HOST:PORT`` split at the last ``:``; an IPv6 host
is written in brackets (``tcp:[::1]:9099``). ``unix:PATH`` is a Unix-domain
stream socket.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from ..errors import AddressError

__all__ = ["Address", "metrics_address"]

Scheme = Literal["tcp", "tls", "unix"]


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed address; ``str(address)`` gives the wire form back."""

    scheme: Scheme
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str | Address) -> Address:
        """Parse ``text``; raise :class:`~timer_sdk.errors.AddressError` naming what is wrong."""
        if isinstance(text, Address):
            return text
        scheme, sep, rest = text.partition(":")
        if not sep or scheme not in ("tcp", "tls", "unix"):
            raise AddressError(
                f"address {text!r}: expected tcp:HOST:PORT, tls:HOST:PORT or unix:PATH"
            )
        if scheme == "unix":
            if not rest:
                raise AddressError(f"address {text!r}: the socket path is empty")
            return cls("unix", path=rest)
        host, sep, port_text = rest.rpartition(":")
        if not sep or not host:
            raise AddressError(f"address {text!r}: expected {scheme}:HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise AddressError(f"address {text!r}: write an IPv6 host in brackets, [{host}]")
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise AddressError(f"address {text!r}: port must be a number from 0 to 65535")
        tcp_or_tls: Scheme = "tls" if scheme == "tls" else "tcp"
        return cls(tcp_or_tls, host=host, port=int(port_text))

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}:{host}:{self.port}"


def metrics_address(text: str) -> Address:
    """``tcp:HOST:PORT`` for ``--metrics``: loopback, or one interface named explicitly.

    A wildcard host would publish load figures on every interface: refused.
    """
    address = Address.parse(text)
    if address.scheme != "tcp":
        raise AddressError(f"--metrics {text}: expected tcp:HOST:PORT, e.g. tcp:127.0.0.1:9464")
    try:
        wildcard = ipaddress.ip_address(address.host).is_unspecified
    except ValueError:
        wildcard = address.host == "*"
    if wildcard:
        raise AddressError(
            f"--metrics {text}: will not serve metrics on every interface; name the one to "
            "serve on (tcp:127.0.0.1:9464 for this host only, or one of the host's addresses)"
        )
    return address
