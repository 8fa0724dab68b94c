"""Addresses as users write them: each mistake named, each valid form kept as written."""

from __future__ import annotations

import pytest

from timer_sdk.errors import AddressError
from timer_sdk.wire.address import Address, metrics_address


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http://x", "expected tcp:HOST:PORT, tls:HOST:PORT or unix:PATH"),
        ("unix:", "the socket path is empty"),
        ("tcp:9099", "expected tcp:HOST:PORT"),
        ("tls::9099", "expected tls:HOST:PORT"),
        ("tcp:::1:9099", r"write an IPv6 host in brackets, \[::1\]"),
        ("tcp:127.0.0.1:http", "port must be a number from 0 to 65535"),
        ("tcp:127.0.0.1:65536", "port must be a number from 0 to 65535"),
    ],
)
def test_a_wrong_address_is_refused_with_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(AddressError, match=f"address {text!r}: {message}"):
        Address.parse(text)


@pytest.mark.parametrize("text", ["tcp:[::1]:9099", "tls:localhost:0", "unix:/tmp/t.sock"])
def test_a_valid_address_reads_back_as_written(text: str) -> None:
    assert str(Address.parse(text)) == text
    assert Address.parse(Address.parse(text)) == Address.parse(text)


def test_an_ipv6_host_is_kept_without_its_brackets() -> None:
    assert Address.parse("tcp:[::1]:9099") == Address("tcp", host="::1", port=9099)


@pytest.mark.parametrize("text", ["tcp:localhost:9464", "tcp:127.0.0.1:0", "tcp:[::1]:9464"])
def test_metrics_are_served_on_a_named_interface(text: str) -> None:
    assert str(metrics_address(text)) == text


@pytest.mark.parametrize("text", ["tcp:0.0.0.0:9464", "tcp:[::]:9464", "tcp:*:9464"])
def test_metrics_are_never_served_on_every_interface(text: str) -> None:
    with pytest.raises(AddressError, match="will not serve metrics on every interface"):
        metrics_address(text)


@pytest.mark.parametrize("text", ["unix:/tmp/m.sock", "tls:127.0.0.1:9464"])
def test_metrics_need_a_tcp_address(text: str) -> None:
    with pytest.raises(AddressError, match=r"expected tcp:HOST:PORT, e\.g\. tcp:127\.0\.0\.1:9464"):
        metrics_address(text)
