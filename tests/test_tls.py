"""TLS and mutual TLS, in process and through the CLI, with certificates made at run time.

What a refused client sees depends on the TLS version: under TLS 1.2 the
server's refusal of a missing client certificate ends the handshake, so
``connect`` raises ConnectError; under TLS 1.3 the client finishes its side of
the handshake before the server has checked its certificate, so ``connect``
succeeds and the first call fails with ConnectionLost. Both are tested as they
are; neither may hang.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from timer_sdk import (
    ConnectError,
    ConnectionLost,
    EchoRequest,
    Limits,
    Server,
    Timer,
    TimerClient,
    TimerConfig,
    TimerConnectionError,
)
from timer_sdk.tools.server_process import ServerProcess

from .conftest import RawConnection, wait_until

TLS13 = ssl.TLSVersion.TLSv1_3
TLS12 = ssl.TLSVersion.TLSv1_2


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("127.0.0.1", "localhost")


@pytest.fixture(scope="module")
def client_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("client@example.org")


def server_context(
    ca: trustme.CA, cert: trustme.LeafCert, *, require_client_cert: bool = False
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    if require_client_cert:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca: trustme.CA | None,
    cert: trustme.LeafCert | None = None,
    *,
    version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca is not None:
        ca.configure_trust(context)
    if cert is not None:
        cert.configure_cert(context)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    return context


@asynccontextmanager
async def serving(
    context: ssl.SSLContext, address: str = "tls:127.0.0.1:0", limits: Limits | None = None
) -> AsyncIterator[Server]:
    """Serve over TLS; fail (not hang) if closing the server takes too long."""
    server = await Timer(TimerConfig(name="ipc-server")).serve(address, ssl=context, limits=limits)
    try:
        yield server
    finally:
        async with asyncio.timeout(5):
            await server.close(timeout=1)


async def assert_serves_tls(server: Server, context: ssl.SSLContext) -> None:
    async with await TimerClient.connect(server.address, ssl=context, timeout=10) as client:
        reply = await client.echo(EchoRequest(message="over tls", delay_ms=0))
        assert reply.echoed == "over tls"


# --- TLS ------------------------------------------------------------------------


async def test_tls_round_trip(ca: trustme.CA, server_cert: trustme.LeafCert) -> None:
    async with serving(server_context(ca, server_cert)) as server:
        assert server.address.startswith("tls:127.0.0.1:")
        context = client_context(ca)
        async with await TimerClient.connect(server.address, ssl=context) as client:
            assert await client.version() == "timer-sdk v0.1.0"
            replies = await asyncio.gather(
                *(client.echo(EchoRequest(message=f"m{i}", delay_ms=i % 3)) for i in range(200))
            )
            assert [r.echoed for r in replies] == [f"m{i}" for i in range(200)]
            [conn] = server.connections
            transport = conn._transport
            assert transport is not None
            assert transport.get_extra_info("ssl_object").version() == "TLSv1.3"


async def test_ssl_argument_on_a_tcp_address(ca: trustme.CA, server_cert: trustme.LeafCert) -> None:
    async with serving(server_context(ca, server_cert), "tcp:127.0.0.1:0") as server:
        assert server.address.startswith("tls:")  # what it really is
        port = server.address.rsplit(":", 1)[1]
        context = client_context(ca)
        async with await TimerClient.connect(f"tcp:127.0.0.1:{port}", ssl=context) as client:
            assert await client.version()


async def test_tls_address_without_a_context_is_refused() -> None:
    with pytest.raises(ValueError, match=r"needs an ssl\.SSLContext"):
        await Timer().serve("tls:127.0.0.1:0")


async def test_client_that_does_not_trust_the_server_is_refused(
    ca: trustme.CA, server_cert: trustme.LeafCert
) -> None:
    async with serving(server_context(ca, server_cert)) as server:
        with pytest.raises(ConnectError, match="not signed by a CA this client trusts"):
            await TimerClient.connect(server.address, ssl=client_context(None))
        await assert_serves_tls(server, client_context(ca))


async def test_hostname_is_checked(ca: trustme.CA) -> None:
    only_localhost = ca.issue_cert("localhost")
    async with serving(server_context(ca, only_localhost)) as server:
        with pytest.raises(ConnectError, match=r"IP address mismatch.*names another host"):
            await TimerClient.connect(server.address, ssl=client_context(ca))
        async with await TimerClient.connect(
            server.address, ssl=client_context(ca), server_hostname="localhost"
        ) as client:
            assert await client.version()


async def test_an_expired_certificate_is_named_as_such(ca: trustme.CA) -> None:
    long_ago = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
    expired = ca.issue_cert("127.0.0.1", not_before=long_ago, not_after=long_ago)
    async with serving(server_context(ca, expired)) as server:
        with pytest.raises(
            ConnectError, match="certificate verify failed: certificate has expired"
        ):
            await TimerClient.connect(server.address, ssl=client_context(ca))


async def test_a_tls_address_where_nothing_listens_says_so(ca: trustme.CA) -> None:
    with socket.socket() as held:  # bound, never listening: connecting is refused
        held.bind(("127.0.0.1", 0))
        address = f"tls:127.0.0.1:{held.getsockname()[1]}"
        with pytest.raises(ConnectError, match=f"cannot connect to {address}: Connect call failed"):
            await TimerClient.connect(address, ssl=client_context(ca))


async def test_plain_tcp_client_on_a_tls_port_fails_cleanly(
    ca: trustme.CA, server_cert: trustme.LeafCert
) -> None:
    async with serving(server_context(ca, server_cert)) as server:
        plain = server.address.replace("tls:", "tcp:")
        async with await TimerClient.connect(plain) as client:
            async with asyncio.timeout(5):  # a clear error, not a hang
                with pytest.raises(ConnectionLost, match="if it serves TLS, use tls:"):
                    await client.version()
        raw = await RawConnection.open(plain)
        try:
            await raw.send(bytes.fromhex("0000000776657273696f6e00000001a0"))
            assert await raw.reader.read() == b""  # closed, with nothing in the clear
        finally:
            await raw.close()
        await assert_serves_tls(server, client_context(ca))


async def test_tls_client_on_a_plain_port_fails_cleanly(
    ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="timer_sdk")
    async with await Timer().serve("tcp:127.0.0.1:0") as server:
        tls = server.address.replace("tcp:", "tls:")
        async with asyncio.timeout(5):
            with pytest.raises(ConnectError, match="does not speak TLS"):
                await TimerClient.connect(tls, ssl=client_context(ca))
        # The ClientHello reads as a method name of ~369 MB: refused before any
        # allocation, and answered in plain bytes that the client's TLS layer refuses.
        await wait_until(lambda: server.stats.protocol_violations == 1)
        assert any("not TLS" in r.getMessage() for r in caplog.records)
        async with await TimerClient.connect(server.address) as client:
            assert await client.version()


async def test_malformed_frames_over_tls_get_the_same_answers(
    ca: trustme.CA, server_cert: trustme.LeafCert
) -> None:
    async with serving(server_context(ca, server_cert)) as server:
        host, port = "127.0.0.1", int(server.address.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection(host, port, ssl=client_context(ca))
        conn = RawConnection(reader, writer)
        try:
            await conn.send(b"\x00\x00\x00\x02\xff\xfe\x00\x00\x00\x01\xa0")
            ret, body = await conn.recv_reply()
            assert (ret, body) == (1, "\ufffd\ufffd: method name is not valid UTF-8".encode())
            await conn.send(b"\xff\xff\xff\xff")
            assert await conn.reader.read() == b""
        finally:
            await conn.close()
        await assert_serves_tls(server, client_context(ca))


# --- mutual TLS -------------------------------------------------------------------


async def test_mutual_tls_accepts_a_client_certificate(
    ca: trustme.CA, server_cert: trustme.LeafCert, client_cert: trustme.LeafCert
) -> None:
    async with serving(server_context(ca, server_cert, require_client_cert=True)) as server:
        context = client_context(ca, client_cert)
        async with await TimerClient.connect(server.address, ssl=context) as client:
            assert await client.version()
            [conn] = server.connections
            assert conn._transport is not None
            peercert = conn._transport.get_extra_info("peercert")
            assert "client@example.org" in str(peercert)


@dataclass(frozen=True)
class Refused:
    """A client that mutual TLS must refuse."""

    cert: str | None  # "other-ca": a certificate the server's CA did not sign
    version: ssl.TLSVersion


REFUSED = {
    "no cert, TLS 1.3": Refused(None, TLS13),
    "no cert, TLS 1.2": Refused(None, TLS12),
    "cert of another CA, TLS 1.3": Refused("other-ca", TLS13),
    "cert of another CA, TLS 1.2": Refused("other-ca", TLS12),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
async def test_mutual_tls_refuses_a_client_without_a_valid_certificate(
    ca: trustme.CA, server_cert: trustme.LeafCert, name: str
) -> None:
    case = REFUSED[name]
    cert = trustme.CA().issue_cert("mallory@example.org") if case.cert else None
    context = client_context(ca, cert, version=case.version)
    async with serving(server_context(ca, server_cert, require_client_cert=True)) as server:
        async with asyncio.timeout(5):
            # Either way the error says what is likely wrong.
            hint = r"is a client certificate required, or is yours from a CA it does not trust"
            if case.version is TLS12:
                refused = f"cannot connect to {server.address}.*{hint}"
                with pytest.raises(ConnectError, match=refused):
                    await TimerClient.connect(server.address, ssl=context)
            else:
                # TLS 1.3: the refusal arrives after the client's handshake has finished.
                async with await TimerClient.connect(server.address, ssl=context) as client:
                    with pytest.raises(ConnectionLost, match=hint):
                        await client.version()
                    assert client.closed
        assert server.stats.requests == 0  # the refused client got nothing through
        await assert_serves_tls(server, client_context(ca, ca.issue_cert("ok@example.org")))


async def test_refused_tls12_client_gets_a_readable_reason(
    ca: trustme.CA, server_cert: trustme.LeafCert
) -> None:
    context = client_context(ca, version=TLS12)
    async with serving(server_context(ca, server_cert, require_client_cert=True)) as server:
        with pytest.raises(ConnectError) as info:
            await TimerClient.connect(server.address, ssl=context)
        await assert_serves_tls(server, client_context(ca, ca.issue_cert("ok@example.org")))
    assert not str(info.value).endswith(": ")


# --- handshakes that never finish ---------------------------------------------


@pytest.mark.parametrize("bad_client", ["plain tcp", "untrusting tls", "silent"])
async def test_close_after_a_failed_handshake(
    ca: trustme.CA, server_cert: trustme.LeafCert, bad_client: str
) -> None:
    server = await Timer().serve("tls:127.0.0.1:0", ssl=server_context(ca, server_cert))
    plain = server.address.replace("tls:", "tcp:")
    try:
        if bad_client == "plain tcp":
            async with await TimerClient.connect(plain) as client:
                with pytest.raises(ConnectionLost):
                    await client.version()
        elif bad_client == "untrusting tls":
            with pytest.raises(ConnectError):
                await TimerClient.connect(server.address, ssl=client_context(None))
        else:
            raw = await RawConnection.open(plain)
            await raw.close()
    finally:
        try:
            # A hang is the failure; cancelling close() aborts what is left, cleanly.
            async with asyncio.timeout(3):
                await server.close(timeout=0.5)
        except TimeoutError:
            pytest.fail("server.close() hung after a failed TLS handshake")


async def test_a_client_that_never_starts_the_handshake_is_cut_off(
    ca: trustme.CA, server_cert: trustme.LeafCert
) -> None:
    limits = Limits(frame_timeout=0.3)
    async with serving(server_context(ca, server_cert), limits=limits) as server:
        plain = server.address.replace("tls:", "tcp:")
        silent = [await RawConnection.open(plain) for _ in range(10)]
        try:
            async with asyncio.timeout(3):  # ten deadlines
                for conn in silent:
                    assert await conn.reader.read() == b""
        finally:
            for conn in silent:
                await conn.close()
        await assert_serves_tls(server, client_context(ca))


async def test_a_tls_client_closing_logs_no_warning(
    ca: trustme.CA, server_cert: trustme.LeafCert, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(server_context(ca, server_cert)) as server:
        await assert_serves_tls(server, client_context(ca))
        await wait_until(lambda: not server.connections)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, [r.getMessage() for r in warnings]


# --- the CLI ------------------------------------------------------------------------


@dataclass(frozen=True)
class Files:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


@pytest.fixture(scope="module")
def pem_files(
    ca: trustme.CA,
    server_cert: trustme.LeafCert,
    client_cert: trustme.LeafCert,
    tmp_path_factory: pytest.TempPathFactory,
) -> Files:
    where = tmp_path_factory.mktemp("pem")
    files = Files(
        *(
            str(where / n)
            for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
        )
    )
    ca.cert_pem.write_to_path(files.ca)
    for leaf, cert, key in (
        (server_cert, files.server_cert, files.server_key),
        (client_cert, files.client_cert, files.client_key),
    ):
        Path(cert).write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(key)
    return files


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "timer_sdk",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def tls_serve_args(f: Files, *, mutual: bool = False) -> list[str]:
    args = ["tls:127.0.0.1:0", "--tls-cert", f.server_cert, "--tls-key", f.server_key]
    return [*args, "--tls-client-ca", f.ca] if mutual else args


@pytest.mark.timeout(90)
async def test_cli_serves_and_calls_over_tls(pem_files: Files) -> None:
    async with ServerProcess(*tls_serve_args(pem_files)) as server:
        assert server.address.startswith("tls:127.0.0.1:")
        code, out, err = await cli("call", server.address, "version", "--tls-ca", pem_files.ca)
        assert (code, json.loads(out)) == (0, "timer-sdk v0.1.0"), err
        assert await server.stop() == 0


@pytest.mark.timeout(90)
async def test_cli_mutual_tls(pem_files: Files) -> None:
    f = pem_files
    async with ServerProcess(*tls_serve_args(f, mutual=True)) as server:
        echo = '{"req": {"message": "mutual", "delayMs": 0}}'
        client_args = ["--tls-ca", f.ca, "--tls-cert", f.client_cert, "--tls-key", f.client_key]
        code, out, err = await cli("call", server.address, "echo", echo, *client_args)
        assert code == 0, err
        assert json.loads(out) == {"echoed": "mutual", "timerName": "ipc-server"}
        assert await server.stop() == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mistake", ["untrusted server", "no client cert", "tcp: to a tls port"])
async def test_cli_refusals_are_clear(pem_files: Files, mistake: str) -> None:
    mutual = mistake == "no client cert"
    async with ServerProcess(*tls_serve_args(pem_files, mutual=mutual)) as server:
        if mistake == "no client cert":
            code, _, err = await cli("call", server.address, "version", "--tls-ca", pem_files.ca)
            expected = (
                f"timer-sdk call: connection to {server.address} lost: the server closed it "
                "before any reply, right after the TLS handshake (is a client certificate required"
            )
        elif mistake == "untrusted server":  # the system trust store does not know the test CA
            code, _, err = await cli("call", server.address, "version")
            expected = "not signed by a CA this client trusts: trust its CA (--tls-ca"
        else:
            plain = server.address.replace("tls:", "tcp:")
            code, _, err = await cli("call", plain, "version")
            expected = "before any reply (if it serves TLS, use tls: instead of tcp:)"
        assert code == 1
        assert expected in err, err
        assert "Traceback" not in err
        code, _, err = await cli(
            "call",
            server.address,
            "version",
            "--tls-ca",
            pem_files.ca,
            "--tls-cert",
            pem_files.client_cert,
            "--tls-key",
            pem_files.client_key,
        )
        assert code == 0, err  # and the server still serves
        assert await server.stop(timeout=10) == 0  # SIGTERM still stops it cleanly


@pytest.mark.timeout(90)
async def test_cli_server_stops_on_sigterm_after_a_refused_client(pem_files: Files) -> None:
    async with ServerProcess(*tls_serve_args(pem_files)) as server:
        code, _, _ = await cli("call", server.address, "version")
        assert code == 1
        assert await server.stop(timeout=5) == 0


# Each set-up mistake, and what the user must read: the flag or the file at fault.
MISTAKES = {
    "no flags": (
        [],
        "tls:127.0.0.1:0: a tls: address needs the server's certificate and key: --tls-cert PEM",
    ),
    "no key": (
        ["--tls-cert", "{server_cert}"],
        "--tls-cert {server_cert} holds no private key "
        "that matches it: give the key file with --tls-key PEM",
    ),
    "no such cert": (
        ["--tls-cert", "{missing}", "--tls-key", "{server_key}"],
        "--tls-cert {missing}: no such file",
    ),
    "no such key": (
        ["--tls-cert", "{server_cert}", "--tls-key", "{missing}"],
        "--tls-key {missing}: no such file",
    ),
    "wrong key": (
        ["--tls-cert", "{server_cert}", "--tls-key", "{client_key}"],
        "--tls-cert {server_cert} with --tls-key {client_key}: not a PEM certificate "
        "and its private key",
    ),
    "no such client CA": (
        [
            "--tls-cert",
            "{server_cert}",
            "--tls-key",
            "{server_key}",
            "--tls-client-ca",
            "{missing}",
        ],
        "--tls-client-ca {missing}: no such file",
    ),
    "a key alone": (["--tls-key", "{server_key}"], "--tls-key needs --tls-cert PEM too"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
async def test_each_tls_set_up_mistake_names_the_flag_or_file(
    pem_files: Files, mistake: str, tmp_path: Path
) -> None:
    flags, expected = MISTAKES[mistake]
    names = {**vars(pem_files), "missing": str(tmp_path / "nothing.pem")}
    address = "tcp:127.0.0.1:0" if mistake == "a key alone" else "tls:127.0.0.1:0"
    code, out, err = await cli("serve", address, *(f.format(**names) for f in flags))
    assert (code, out) == (2, "")
    assert err.startswith(f"timer-sdk serve: {expected.format(**names)}"), err
    assert err.count("\n") == 1, err
    assert "PEM lib" not in err and "Errno" not in err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--tls-ca", "{missing}"], "--tls-ca {missing}: no such file"),
        (["--tls-ca", "{server_key}"], "--tls-ca {server_key}: not a PEM certificate"),
        (["--tls-key", "{client_key}"], "--tls-key needs --tls-cert PEM too"),
        (["--tls-cert", "{missing}"], "--tls-cert {missing}: no such file"),
    ],
)
async def test_the_clients_tls_mistakes_name_the_flag_or_file(
    pem_files: Files, flags: list[str], expected: str, tmp_path: Path
) -> None:
    names = {**vars(pem_files), "missing": str(tmp_path / "nothing.pem")}
    args = [f.format(**names) for f in flags]
    code, _, err = await cli("call", "tls:127.0.0.1:9", "version", *args)
    assert code == 2
    assert err.startswith(f"timer-sdk call: {expected.format(**names)}"), err


def test_every_refusal_raises_a_connection_error_family() -> None:
    # What the tests above catch is what a caller catches: one family, builtin-compatible.
    assert issubclass(ConnectError, TimerConnectionError)
    assert issubclass(ConnectionLost, ConnectionError)
