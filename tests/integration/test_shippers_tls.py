"""Real shippers over TLS: rsyslog (omfwd, gtls) and syslog-ng (tls()) forward to a node and to a balancer.

Both framings: LF (rsyslog ``TCP_Framing="traditional"``, syslog-ng ``network()``) and RFC 5425 octet
counting (rsyslog ``TCP_Framing="octet-counted"``, syslog-ng ``syslog()``).  Shippers send no session
flags and read no replies, so each test asserts on the detections the SIEM side receives: the node's
OutputSettings destination, the balancer's OutputConnectionString.  Every certificate comes from a CA
made here (tests/pki.py); every shipper verifies the server by it and by name, as in production.

STAGE 1 (this file as it stands): TLS is terminated by socat in front of the plain event ports
(:func:`tests.shippers.tls_terminator`), which proves the harness (certificates, shipper configs,
framings over TLS) until the node's ``<InputSettings><TLS>`` and the balancer's ``<MatchingTLS>`` land;
then the fixtures point at those ports instead and the refusal of a certificate is also asserted in
threatgate's log and counters.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.pki import Pair, TestCA
from tests.shippers import (
    EVENTS,
    ShipperTLS,
    Target,
    balancer_target,
    client_context,
    forward,
    metric,
    node_target,
    rsyslog,
    syslog_ng_process,
    tls_terminator,
)

SERVER_NAME = "threatgate-node"


@dataclass(frozen=True)
class PKI:
    ca: TestCA
    server: Pair  # the event ports' certificate: SAN threatgate-node and 127.0.0.1
    client: Pair  # a shipper's certificate, signed by the same CA
    stranger: Pair  # a shipper's certificate from another CA: not allowed

    def shipper(self, client: Pair | None = None) -> ShipperTLS:
        return ShipperTLS(ca_file=self.ca.cert_path, server_name=SERVER_NAME, client=client)

    def test_client(self, client: Pair | None = None) -> ssl.SSLContext:
        return client_context(self.ca.cert_path, client)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca = TestCA(directory)
    other = TestCA(directory / "other", name="another CA")
    return PKI(
        ca,
        ca.issue(SERVER_NAME, hosts=("127.0.0.1",), server=True),
        ca.issue("shipper", client=True),
        other.issue("stranger", client=True),
    )


@pytest.fixture(scope="module")
def node(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("node")
    with node_target(tmp) as target, tls_terminator(pki.server, target.proc.port, tmp / "socat.log") as port:
        target.port, target.tls, target.server_name = port, pki.test_client(), SERVER_NAME
        yield target


@pytest.fixture(scope="module")
def balancer(node: Target, pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """A balancer with two nodes behind it (the ``node`` fixture's and one more)."""
    tmp = tmp_path_factory.mktemp("balancer")
    with ExitStack() as stack:
        second = stack.enter_context(node_target(tmp_path_factory.mktemp("node2")))
        target = stack.enter_context(balancer_target(tmp, [node.proc.port, second.proc.port]))
        target.port = stack.enter_context(tls_terminator(pki.server, target.proc.port, tmp / "socat.log"))
        target.tls, target.server_name = pki.test_client(), SERVER_NAME
        yield target


SHIPPERS = [
    pytest.param("rsyslog", "traditional", id="rsyslog-lf"),
    pytest.param("rsyslog", "octet-counted", id="rsyslog-octet-counted"),
    pytest.param("syslog-ng", "network", id="syslog-ng-network-lf"),
    pytest.param("syslog-ng", "syslog", id="syslog-ng-syslog-octet-counted"),
]


def shipper(kind: str, framing: str, tmp: Path, port: int, tls: ShipperTLS) -> AbstractContextManager[socket.socket]:
    if kind == "rsyslog":
        return rsyslog(tmp, port, "octet-counted" if framing == "octet-counted" else "traditional", "%rawmsg%", tls)
    return syslog_ng_process(tmp, port, "syslog" if framing == "syslog" else "network", tls)


SYSLOG_HEADER = b"<13>1 2026-01-01T00:00:00+00:00 localhost - - - - "
"""What syslog-ng's syslog() driver writes before each message (RFC 5424; its timestamp is not in any detection)."""


def ship_and_check(target: Target, kind: str, framing: str, tmp: Path, tls: ShipperTLS) -> None:
    """Forward EVENTS through the shipper over TLS; the detections match, in the framing the shipper used."""
    octet_counted = framing in ("octet-counted", "syslog")
    expected = target.expected
    if framing == "syslog":  # the reference: the same messages, header included, on the plain port
        expected = target.reference([SYSLOG_HEADER + event for event in EVENTS])
    before = metric(target.metrics, "threatgate_connections_total", 'outcome="octet_counted"')
    forward(target, shipper(kind, framing, tmp, target.port, tls), expected, target.first)
    octet = metric(target.metrics, "threatgate_connections_total", 'outcome="octet_counted"') - before
    assert octet == (1 if octet_counted else 0)
    assert metric(target.metrics, "threatgate_bad_input_total", 'reason="bad_frame"') == 0


@pytest.mark.parametrize(("kind", "framing"), SHIPPERS)
def test_a_shipper_to_a_tls_node(node: Target, pki: PKI, tmp_path: Path, kind: str, framing: str) -> None:
    ship_and_check(node, kind, framing, tmp_path, pki.shipper())


@pytest.mark.parametrize(("kind", "framing"), SHIPPERS)
def test_a_shipper_to_a_tls_balancer(balancer: Target, pki: PKI, tmp_path: Path, kind: str, framing: str) -> None:
    ship_and_check(balancer, kind, framing, tmp_path, pki.shipper())


def test_rsyslog_pinning_the_server_certificate_by_fingerprint(node: Target, pki: PKI, tmp_path: Path) -> None:
    """``x509/fingerprint``: how rsyslog trusts a node's self-signed certificate (no CA file)."""
    pinned = ShipperTLS(fingerprint=pki.server.fingerprint)
    ship_and_check(node, "rsyslog", "octet-counted", tmp_path, pinned)


def test_rsyslog_refuses_a_server_whose_fingerprint_differs(node: Target, pki: PKI, tmp_path: Path) -> None:
    """A pin that does not match: rsyslog refuses the server, says so, and sends nothing."""
    wrong = ShipperTLS(fingerprint=pki.client.fingerprint)
    mark = node.output.mark()
    with rsyslog(tmp_path, node.port, "traditional", "%rawmsg%", wrong) as syslog_input:
        syslog_input.sendall(b"".join(EVENTS))
        log = tmp_path / "rsyslog/rsyslogd.log"
        wait_until(lambda: "not permitted to talk to it" in log.read_text(errors="replace"), "rsyslog's refusal")
    assert node.output.mark() == mark


@dataclass
class MutualTLS:
    """A TLS port in front of the node that requires a client certificate signed by the test CA."""

    target: Target
    log: Path  # the TLS server's log, where a refused certificate is reported

    def refusals(self) -> int:
        return len(re.findall(r"SSL_accept\(\): .*(?:certificate verify failed|did not return a certificate)",
                              self.log.read_text(errors="replace")))  # fmt: skip


@pytest.fixture
def mutual_tls(node: Target, pki: PKI, tmp_path: Path) -> Iterator[MutualTLS]:
    log = tmp_path / "socat-mtls.log"
    with tls_terminator(pki.server, node.proc.port, log, client_ca=pki.ca.cert_path) as port:
        tls = pki.test_client(pki.client)
        target = Target(node.proc, node.metrics, node.output, node.expected, node.first, port, tls, SERVER_NAME)
        yield MutualTLS(target, log)


@pytest.mark.parametrize("kind", ["rsyslog", "syslog-ng"])
def test_a_shipper_with_an_allowed_client_certificate_delivers(
    mutual_tls: MutualTLS, pki: PKI, tmp_path: Path, kind: str
) -> None:
    framing = "octet-counted" if kind == "rsyslog" else "network"
    ship_and_check(mutual_tls.target, kind, framing, tmp_path, pki.shipper(pki.client))
    assert mutual_tls.refusals() == 0


@pytest.mark.parametrize("certificate", ["stranger", "none"])
def test_a_shipper_whose_certificate_is_not_allowed_delivers_nothing(
    mutual_tls: MutualTLS, pki: PKI, tmp_path: Path, certificate: str
) -> None:
    """The server refuses the handshake and says so; not one event reaches the node's output.

    rsyslog itself may not notice: over TLS 1.3 the server checks the client's certificate after the
    client has finished its side of the handshake, so rsyslog logs nothing and counts the events as
    sent.  Only the server can report the refusal, which is why the event port must log and count it.
    """
    client = pki.stranger if certificate == "stranger" else None
    output = mutual_tls.target.output
    mark = output.mark()
    with rsyslog(tmp_path, mutual_tls.target.port, "traditional", "%rawmsg%", pki.shipper(client)) as syslog_input:
        syslog_input.sendall(b"".join(EVENTS))
        wait_until(lambda: mutual_tls.refusals() >= 1, "the TLS server's refusal of the client certificate")
    assert output.mark() == mark, output.data[mark:]
