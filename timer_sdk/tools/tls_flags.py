"""The ``--tls-*`` flags of ``serve`` and ``call``, made into ``ssl.SSLContext`` objects.

Each set-up mistake gets a message that names the flag or the file, where the
ssl module would say ``[SSL] PEM lib`` or ``[Errno 2]`` without either.
"""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

from ..wire.address import Address
from .cli_help import UsageError

__all__ = ["client_ssl", "server_ssl"]


def _existing(flag: str, path: str) -> str:
    if not Path(path).is_file():
        raise UsageError(f"{flag} {path}: no such file")
    return path


def _load_pair(context: ssl.SSLContext, cert: str, key: str | None) -> None:
    _existing("--tls-cert", cert)
    if key is not None:
        _existing("--tls-key", key)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if key is None:
            raise UsageError(
                f"--tls-cert {cert} holds no private key that matches it: "
                "give the key file with --tls-key PEM"
            ) from exc
        raise UsageError(
            f"--tls-cert {cert} with --tls-key {key}: not a PEM certificate and its "
            f"private key ({exc.reason or exc})"
        ) from exc


def _load_ca(context: ssl.SSLContext, flag: str, path: str) -> None:
    try:
        context.load_verify_locations(_existing(flag, path))
    except ssl.SSLError as exc:
        raise UsageError(f"{flag} {path}: not a PEM certificate ({exc.reason or exc})") from exc


def server_ssl(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server's context from ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca``."""
    if not args.tls_cert:
        if Address.parse(args.address).scheme == "tls":
            raise UsageError(
                f"{args.address}: a tls: address needs the server's certificate and key: "
                "--tls-cert PEM --tls-key PEM"
            )
        if args.tls_key or args.tls_client_ca:
            flag = "--tls-key" if args.tls_key else "--tls-client-ca"
            raise UsageError(f"{flag} needs --tls-cert PEM too")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_pair(context, args.tls_cert, args.tls_key)
    if args.tls_client_ca:
        _load_ca(context, "--tls-client-ca", args.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_ssl(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client's context from ``--tls-ca``, ``--tls-cert`` and ``--tls-key``."""
    if args.tls_key and not args.tls_cert:
        raise UsageError("--tls-key needs --tls-cert PEM too")
    if not (args.tls_ca or args.tls_cert):
        return None
    context = ssl.create_default_context()
    if args.tls_ca:
        _load_ca(context, "--tls-ca", args.tls_ca)
    if args.tls_cert:
        _load_pair(context, args.tls_cert, args.tls_key)
    return context
