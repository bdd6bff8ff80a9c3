"""Source allow-lists (net/sources.py): decided from the peer's address alone."""

from __future__ import annotations

import ipaddress

import pytest

from threatgate.net.sources import SourceList, peer_address


def sources(*texts: str) -> SourceList:
    return SourceList(ipaddress.ip_network(t) for t in texts)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("192.0.2.7", True),
        ("192.0.2.8", False),
        ("::ffff:10.9.9.9", True),  # an IPv4 client of a dual-stack socket
        ("::ffff:11.9.9.9", False),
        ("2001:db8::1", True),
        ("2001:db9::1", False),
        ("fe80::1%eth0", False),
        ("not-an-address", False),
        ("", False),
    ],
)
def test_allows(host: str, allowed: bool) -> None:
    assert sources("10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32").allows(host) is allowed


def test_zone_is_dropped_and_mapped_addresses_are_ipv4() -> None:
    assert sources("fe80::/10").allows("fe80::1%eth0")
    assert peer_address("::ffff:127.0.0.1") == ipaddress.ip_address("127.0.0.1")
    assert peer_address("x") is None


def test_empty_list_allows_nobody() -> None:
    assert not SourceList(()).allows("127.0.0.1")
