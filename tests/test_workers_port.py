"""The claim on the port of ``serve --workers``, with and without abstract socket names."""

from __future__ import annotations

import errno
import os
import re
import resource
import socket
import sys

import pytest

from timer_sdk.serving import workers_port
from timer_sdk.serving.workers_port import claim_port
from timer_sdk.wire.address import Address


def _worker(port: int) -> socket.socket:
    """A socket that listens on ``port`` as a worker does: SO_REUSEPORT, to share it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.fixture
def no_abstract_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as on macOS: no abstract socket names, so no lock."""
    monkeypatch.setattr(workers_port, "ABSTRACT_SOCKETS", False)


@pytest.mark.usefixtures("no_abstract_sockets")
def test_without_abstract_sockets_a_port_in_use_is_refused() -> None:
    with socket.socket() as taken:  # a one-process serve, say
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        said = f"error while attempting to bind on address ('127.0.0.1', {port})"
        with pytest.raises(OSError, match=re.escape(f"{said}: address already in use")) as info:
            claim_port(Address.parse(f"tcp:127.0.0.1:{port}"))
    assert info.value.errno == errno.EADDRINUSE


@pytest.mark.usefixtures("no_abstract_sockets")
def test_without_abstract_sockets_listening_workers_keep_a_second_server_out() -> None:
    claim = claim_port(Address.parse("tcp:127.0.0.1:0"))
    port = claim.address.port
    assert claim.lock is None and port != 0
    with _worker(port), _worker(port):  # the workers join the placeholder's port
        claim.release_placeholder()
        with pytest.raises(OSError, match="address already in use") as info:
            claim_port(Address.parse(f"tcp:127.0.0.1:{port}"))
        assert info.value.errno == errno.EADDRINUSE
        claim.close()
    with socket.socket() as after:  # nothing of the claim is left on the port
        after.bind(("127.0.0.1", port))


def _open_descriptors() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(sys.platform != "linux", reason="abstract socket names are Linux's")
def test_a_claim_out_of_descriptors_fails_and_keeps_no_socket() -> None:
    # Room for one descriptor more: the placeholder for port 0 takes it, the lock finds none.
    before = _open_descriptors()
    lowest_free = os.dup(0)
    os.close(lowest_free)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + 1, hard))
    try:
        with pytest.raises(OSError, match="Too many open files") as info:
            claim_port(Address.parse("tcp:127.0.0.1:0"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert info.value.errno == errno.EMFILE
    assert _open_descriptors() == before  # the placeholder was closed
