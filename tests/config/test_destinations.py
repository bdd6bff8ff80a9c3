"""Tests for threatgate.config.destinations: a sender's destination, plain or over verified TLS (never unverified)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from tests.config.test_common import element, refused
from tests.helpers import balancer_config, example_config
from threatgate.config.balancer import load_balancer_config
from threatgate.config.common import Address
from threatgate.config.destinations import Destination, DestinationTLS, parse_destination, parse_fingerprint
from threatgate.config.node import load_node_config
from threatgate.errors import ConfigError

DIGEST = bytes(range(32))
COLONS = ":".join(f"{b:02X}" for b in DIGEST)


def test_without_tls_a_destination_is_a_plain_address() -> None:
    assert parse_destination(element("10.0.0.1:514")) == Address("10.0.0.1", 514)
    assert type(parse_destination(element("10.0.0.1:514", tls="false"))) is Address


@pytest.mark.parametrize("raw", [f"SHA256 {COLONS}", f"sha-256={COLONS.lower()}", COLONS.replace(":", ""), COLONS])
def test_a_fingerprint_is_read_as_openssl_prints_it_or_plainer(raw: str) -> None:
    assert parse_fingerprint(element(), raw) == DIGEST
    got = parse_destination(element("siem:6514", tls="true", fingerprint=raw))
    assert got == Destination("siem", 6514, DestinationTLS(sha256=DIGEST))


@pytest.mark.parametrize("raw", ["", "SHA256 AB:CD", "SHA1 " + COLONS, COLONS + ":00", "zz" * 32])
def test_a_fingerprint_that_is_not_a_sha256_is_refused(raw: str) -> None:
    assert "expected the certificate's SHA-256 fingerprint" in refused(lambda: parse_fingerprint(element(), raw))


def test_tls_needs_exactly_one_way_to_verify_the_server(tmp_path: Path) -> None:
    assert "never unverified" in refused(lambda: parse_destination(element("siem:6514", tls="true")))
    both = element("siem:6514", tls="true", fingerprint=COLONS, ca="ca.pem")
    assert "needs one of fingerprint=" in refused(lambda: parse_destination(both))
    assert 'apply to tls="true" only' in refused(lambda: parse_destination(element("siem:6514", fingerprint=COLONS)))


def test_a_ca_file_is_relative_to_the_config_and_must_hold_certificates(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "empty.pem").write_text("not a certificate\n")
    node = element("siem:6514", tls="true", ca="ca.pem")
    node.path = str(tmp_path / "node.conf")
    assert parse_destination(node) == Destination("siem", 6514, DestinationTLS(ca_file=str(tmp_path / "ca.pem")))
    for name in ("missing.pem", "empty.pem"):
        bad = element("siem:6514", tls="true", ca=name)
        bad.path = str(tmp_path / "node.conf")
        assert f"ca='{name}': cannot load CA certificates from {tmp_path / name}" in refused(
            lambda bad=bad: parse_destination(bad)
        )


def test_node_and_balancer_files_take_tls_on_their_senders(tmp_path: Path) -> None:
    node = example_config(tmp_path / "node")
    text = node.read_text().replace(
        "<ConnectionString>127.0.0.1:9998</ConnectionString>",
        f'<ConnectionString tls="true" fingerprint="SHA256 {COLONS}">127.0.0.1:9998</ConnectionString>',
    )
    node.write_text(text)
    assert load_node_config(str(node)).output.destination == Destination("127.0.0.1", 9998, DestinationTLS(DIGEST))
    balancer = balancer_config(
        tmp_path / "kl_balancer.conf",
        instances=[10001],
        extra=f'<OutputConnectionString tls="true" fingerprint="{COLONS}">10.0.0.9:6514</OutputConnectionString>',
    )
    assert load_balancer_config(str(balancer)).output == Destination("10.0.0.9", 6514, DestinationTLS(DIGEST))
    balancer.write_text(balancer.read_text().replace('fingerprint="', 'fingerprnt="'))
    with pytest.raises(ConfigError, match="unknown attribute 'fingerprnt'|never unverified"):
        load_balancer_config(str(balancer))
