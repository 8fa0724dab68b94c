"""Where ``--metrics`` may serve: loopback, or one interface named explicitly.

A host that means every interface would publish load figures on all of them,
so it is refused however it is spelled: the host is read as the socket layer
reads it (getaddrinfo with AI_NUMERICHOST takes inet_aton's forms, so ``0``,
``0x0``, ``0.0.0`` and ``0000.0.0.0`` are 0.0.0.0), an IPv4-mapped
``::ffff:0.0.0.0`` counts as 0.0.0.0, and a host name is judged by the address
it is bound to, before it listens. Here rather than in the sans-I/O
``wire.address``: reading a host as the socket layer does takes ``socket``.
"""

from __future__ import annotations

import ipaddress
import socket

from ..errors import AddressError
from ..wire.address import Address

__all__ = ["metrics_address", "refuse_every_interface"]

_NUMERIC = socket.AI_NUMERICHOST | socket.AI_PASSIVE


def metrics_address(text: str) -> Address:
    """``tcp:HOST:PORT`` for ``--metrics``: loopback, or one interface named explicitly.

    A numeric host that means every interface is refused here; a host name
    is judged where it is bound, by :func:`refuse_every_interface`.
    """
    if not text.startswith("tcp:"):
        raise AddressError(f"--metrics {text}: expected tcp:HOST:PORT, e.g. tcp:127.0.0.1:9464")
    address = Address.parse(text)
    refuse_every_interface(text, "*" if address.host == "*" else _numeric(address.host))
    return address


def refuse_every_interface(text: str, bound: str | None) -> None:
    """Raise :class:`AddressError` if ``bound``, a numeric host, means every interface."""
    if bound is None:
        return
    meaning = bound
    if bound != "*":
        ip = ipaddress.ip_address(bound)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # on an IPv6 socket it is still IPv4's wildcard
        if not ip.is_unspecified:
            return
        meaning = str(ip)
    host = Address.parse(text).host
    means = "" if host == meaning else f" ({host} is {meaning})"
    raise AddressError(
        f"--metrics {text}: will not serve metrics on every interface{means}; name the one "
        "to serve on (tcp:127.0.0.1:9464 for this host only, or one of the host's addresses)"
    )


def _numeric(host: str) -> str | None:
    """The address a numeric ``host`` binds, read as the socket layer reads it; None for a name.

    getaddrinfo with AI_NUMERICHOST parses without a lookup, and takes
    inet_aton's forms too (``0``, ``0x0``, ``0.0.0``, ``0000.0.0.0``).
    """
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=_NUMERIC)
    except (socket.gaierror, UnicodeError):
        return None
    return str(found[0][4][0])
