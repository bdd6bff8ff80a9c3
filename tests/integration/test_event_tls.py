"""Events over TLS and ports closed to strangers, with real processes (issue 17).

A node and a balancer speak TLS on their event ports (and a TLS twin beside the plain port during a
migration), ask SIEM clients for certificates (by CA or pinned), refuse plain text on a TLS port and a
ClientHello on a plain one in words, and close a peer outside ``<AllowedSources>`` before reading a byte.
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.helpers import (
    EXAMPLES,
    NodeProcess,
    balancer_config,
    example_config,
    read_all,
    running_balancer,
    running_node,
)
from threatgate.net.tls import ensure_server_pair

FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack\n"
EVENTS = (EXAMPLES / "events.txt").read_bytes()
EVENT_COUNT = EVENTS.count(b"\n")


class Certs:
    """A CA with a server certificate for 127.0.0.1 and a client certificate, plus two self-signed clients."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = trustme.CA()
        self.ca.cert_pem.write_to_path(str(directory / "ca.pem"))
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        server.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
        server.private_key_pem.write_to_path(str(directory / "server.key"))
        (directory / "server.key").chmod(0o600)
        self.client = self.ca.issue_cert("siem.example")
        for name in ("pinned", "stranger"):
            ensure_server_pair(
                str(directory / f"{name}.pem"),
                str(directory / f"{name}.key"),
                common_name=name,
                hosts=["127.0.0.1"],
                client_auth=True,
            )

    def context(self, who: str | None) -> ssl.SSLContext:
        """A client context trusting the CA, presenting ``who``'s certificate (``ca``, ``pinned``, ``stranger``)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        if who == "ca":
            self.client.configure_cert(ctx)
        elif who is not None:
            ctx.load_cert_chain(str(self.dir / f"{who}.pem"), str(self.dir / f"{who}.key"))
        return ctx


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def tls_exchange(port: int, ctx: ssl.SSLContext, payload: bytes, *, source: str = "127.0.0.1") -> bytes:
    """Connect over TLS, send ``payload``, half-close (TLS close_notify is not used: a SIEM shuts its side
    down by the socket), read until the server closes."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(payload)
        data = b""
        while data.count(b"LookupFinished") < EVENT_COUNT:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def refused(port: int, ctx: ssl.SSLContext | None, payload: bytes = FLAGS + EVENTS, source: str = "127.0.0.1") -> bool:
    """True when the server closes without answering a single event."""
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    except OSError:
        return True
    s = raw
    try:
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1") if ctx is not None else raw
        s.sendall(payload)
        if ctx is None:
            s.shutdown(socket.SHUT_WR)  # a plain sender's end of events: the node answers and closes
        return b"LookupFinished" not in read_all(s)
    except (OSError, ssl.SSLError):
        return True
    finally:
        s.close()
        raw.close()


def detections(answer: bytes) -> list[str]:
    return [line for line in answer.decode().splitlines() if "LookupFinished" not in line]


def metric_sum(node: NodeProcess, pattern: str) -> float:
    with socket.create_connection(("127.0.0.1", node.metrics_port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        body = read_all(s).decode()
    return sum(float(m[1]) for m in re.finditer(rf"^{pattern}\S* (\S+)$", body, re.M))


TLS_INPUT = (
    "<TLS><CertificatePath>server.pem</CertificatePath><PrivateKeyPath>server.key</PrivateKeyPath>{port}"
    '<ClientCertificates mode="required"><CAFile>ca.pem</CAFile><Certificate>pinned.pem</Certificate>'
    "</ClientCertificates></TLS>"
)
METRICS = "<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>"


@pytest.fixture(params=[1, 2], ids=["one-process", "workers"])
def tls_node(request: pytest.FixtureRequest, tmp_path: Path, certs: Certs) -> Iterator[NodeProcess]:
    config = example_config(
        tmp_path, input_extra=TLS_INPUT.format(port=""), extra_service=METRICS, workers=request.param
    )
    with running_node(config) as node:
        yield node


def test_siem_events_over_tls_with_a_client_certificate_by_ca_or_pin(tls_node: NodeProcess, certs: Certs) -> None:
    plain = detections(tls_exchange(tls_node.port, certs.context("ca"), FLAGS + EVENTS))
    assert len(plain) >= 3, plain  # the example events match the example feeds
    assert detections(tls_exchange(tls_node.port, certs.context("pinned"), FLAGS + EVENTS)) == plain
    before = metric_sum(tls_node, 'threatgate_bad_input_total{reason="tls')
    assert refused(tls_node.port, certs.context(None))  # no certificate
    assert refused(tls_node.port, certs.context("stranger"))  # neither issued by the CA nor pinned
    assert refused(tls_node.port, None)  # plain text on a TLS port
    tls_node.wait_for_log(r"events port: TLS connection from 127\.0\.0\.1 closed")
    after = metric_sum(tls_node, 'threatgate_bad_input_total{reason="tls')
    assert after - before == 3
    assert metric_sum(tls_node, 'threatgate_bad_input_total{reason="tls_no_client_cert"}') == 1
    assert metric_sum(tls_node, 'threatgate_bad_input_total{reason="tls_client_cert_refused"}') == 1
    assert metric_sum(tls_node, 'threatgate_bad_input_total{reason="tls_plaintext"}') == 1


def test_a_migration_serves_plain_and_tls_side_by_side(tmp_path: Path, certs: Certs) -> None:
    twin = TLS_INPUT.format(port="<ConnectionString>127.0.0.1:0</ConnectionString>")
    config = example_config(tmp_path, input_extra=twin, extra_service=METRICS)
    with running_node(config) as node:
        assert set(node.bound) >= {"events", "events_tls"}
        tls_port = node.bound["events_tls"][1]
        over_tls = detections(tls_exchange(tls_port, certs.context("ca"), FLAGS + EVENTS))
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as s:
            s.sendall(FLAGS + EVENTS)
            s.shutdown(socket.SHUT_WR)
            assert detections(read_all(s)) == over_tls
        # A sender still set up for TLS on the plain port: refused in words, counted.
        assert refused(node.port, certs.context("ca"))
        node.wait_for_log(r"a TLS handshake from 127\.0\.0\.1 on a plain event port: closed")
        assert metric_sum(node, 'threatgate_bad_input_total{reason="tls_on_plain_port"}') == 1


def test_a_source_outside_the_allow_list_is_closed_before_a_byte_is_read(tmp_path: Path) -> None:
    config = example_config(tmp_path, extra_service=METRICS.replace("127.0.0.1:0", "127.0.0.2:0"))
    text = config.read_text().replace(
        "</Configuration>",
        '<AllowedSources ports="events,api"><Source>127.0.0.2</Source></AllowedSources>'
        '<AllowedSources ports="metrics"><Source>127.0.0.0/8</Source></AllowedSources></Configuration>',
    )
    config.write_text(text)
    with running_node(config) as node:
        assert refused(node.port, None, source="127.0.0.1")
        assert not refused(node.port, None, source="127.0.0.2")
        with (
            socket.create_connection(("127.0.0.1", node.api_port), timeout=10, source_address=("127.0.0.1", 0)) as s,
            pytest.raises(ConnectionResetError),
        ):
            read_all(s)  # reset without a TLS handshake
        node.wait_for_log(r"refused a connection from 127\.0\.0\.1 to the events port: not in its <AllowedSources>")
        with socket.create_connection(("127.0.0.2", node.metrics_port), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            body = read_all(s).decode()
        refusals = re.search(r'^threatgate_connections_total\{outcome="refused_source"\} (\S+)$', body, re.M)
        assert refusals is not None and float(refusals[1]) == 2, body[-2000:]


def test_balancer_takes_siem_events_over_tls_with_client_certificates(tmp_path: Path, certs: Certs) -> None:
    with running_node(example_config(tmp_path)) as node:
        config = balancer_config(
            tmp_path / "kl_balancer.conf",
            instances=[node.port],
            extra=(
                "<MatchingTLS><CertificatePath>server.pem</CertificatePath><PrivateKeyPath>server.key</PrivateKeyPath>"
                '<ClientCertificates mode="required"><CAFile>ca.pem</CAFile></ClientCertificates></MatchingTLS>'
                "<AlertTLS><CertificatePath>server.pem</CertificatePath><PrivateKeyPath>server.key</PrivateKeyPath>"
                "</AlertTLS>"
            ),
        )
        with running_balancer(config) as balancer:
            answer = detections(tls_exchange(balancer.port, certs.context("ca"), FLAGS + EVENTS))
            assert len(answer) >= 3
            assert refused(balancer.port, certs.context(None))
            assert refused(balancer.port, None)
            balancer.wait_for_log(r"events port: TLS connection from 127\.0\.0\.1 closed")
            raw = socket.create_connection(("127.0.0.1", balancer.bound["alerts"][1]), timeout=10)
            with certs.context(None).wrap_socket(raw, server_hostname="127.0.0.1") as alert:
                alert.sendall(b"Dec 04 10:00:00 alert=KL_ALERT_UpdatedFeed name=test\n")
            balancer.wait_for_log(r"service alert from 127\.0\.0\.1.*KL_ALERT_UpdatedFeed")


def test_a_flood_of_stalled_handshakes_starves_no_sender(tmp_path: Path, certs: Certs) -> None:
    """200 connections that never finish their handshake: a SIEM already connected keeps being answered, a new
    one still gets in (the oldest stalled handshakes make room), and the stalled ones are closed."""
    config = example_config(tmp_path, input_extra=TLS_INPUT.format(port=""), extra_service=METRICS)
    with running_node(config) as node:
        raw = socket.create_connection(("127.0.0.1", node.port), timeout=30)
        with certs.context("ca").wrap_socket(raw, server_hostname="127.0.0.1") as siem:
            siem.sendall(FLAGS + EVENTS)
            stalled = [socket.create_connection(("127.0.0.1", node.port), timeout=30) for _ in range(200)]
            try:
                siem.sendall(EVENTS)
                answered = b""
                while answered.count(b"LookupFinished") < 2 * EVENT_COUNT:
                    chunk = siem.recv(65536)
                    assert chunk, "the connected SIEM was cut"
                    answered += chunk
                assert detections(tls_exchange(node.port, certs.context("ca"), FLAGS + EVENTS))
                closed = 0
                for s in stalled[:100]:  # the oldest: evicted for the newcomers
                    s.settimeout(10)
                    try:
                        closed += s.recv(1) == b""
                    except ConnectionResetError:
                        closed += 1
                assert closed == 100
            finally:
                for s in stalled:
                    s.close()
        assert metric_sum(node, 'threatgate_connections_total{outcome="evicted_tls_handshake"}') >= 100


def test_a_renegotiation_attempt_is_refused_and_counted(tls_node: NodeProcess, certs: Certs, tmp_path: Path) -> None:
    """openssl s_client's ``R`` asks for a TLS 1.2 renegotiation: the node refuses it and closes, in words."""
    client = tmp_path / "client.pem"
    certs.client.private_key_and_cert_chain_pem.write_to_path(str(client))
    command = ["openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{tls_node.port}", "-cert", str(client)]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(FLAGS + EVENTS.splitlines(keepends=True)[0])
        proc.stdin.flush()
        for line in proc.stdout:  # wait for the answer: the session is up and serving
            if b"LookupFinished" in line:
                break
        proc.stdin.write(b"R\n")
        proc.stdin.flush()
        tls_node.wait_for_log(r"TLS connection from 127\.0\.0\.1 broken: the client tried to renegotiate")
        proc.kill()
    assert metric_sum(tls_node, 'threatgate_bad_input_total{reason="tls_renegotiation"}') == 1
    assert detections(tls_exchange(tls_node.port, certs.context("ca"), FLAGS + EVENTS))  # others are served


def test_workers_refuse_to_start_with_tls_files_they_could_not_use(tmp_path: Path, certs: Certs) -> None:
    """The workers run the handshakes, but the master checks the files at start: a missing CA file stops the
    node (exit 2, the file named), rather than a node READY that resets every TLS client."""
    bad = TLS_INPUT.format(port="").replace("<CAFile>ca.pem</CAFile>", "<CAFile>gone.pem</CAFile>")
    config = example_config(tmp_path, input_extra=bad, workers=2)
    node = NodeProcess(config)
    try:
        assert node.proc.wait(60) == 2, node.log_tail()
        assert "gone.pem" in node.log()
    finally:
        node.stop()


def test_a_reload_does_not_change_the_tls_of_workers(tmp_path: Path, certs: Certs) -> None:
    """<TLS> needs a restart, for every worker: one that serves its first TLS client after a SIGHUP removed
    <ClientCertificates> still asks for a certificate."""
    config = example_config(tmp_path, input_extra=TLS_INPUT.format(port=""), extra_service=METRICS, workers=2)
    with running_node(config) as node:
        mark = len(node.log())
        text = config.read_text()
        config.write_text(re.sub(r"<ClientCertificates.*?</ClientCertificates>", "", text, flags=re.S))
        node.signal(signal.SIGHUP)
        node.wait_for_log(r"needs a restart: InputSettings/TLS", after=mark)
        for _ in range(4):  # connections go to both workers
            assert refused(node.port, certs.context(None))
        assert detections(tls_exchange(node.port, certs.context("ca"), FLAGS + EVENTS))


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "workers"])
def test_allowed_sources_change_at_a_sighup_without_a_restart(tmp_path: Path, workers: int) -> None:
    """Adding a SIEM forwarder's address needs no restart of the event path: the next connection is judged by
    the new list (with workers, in the master that passes connections)."""
    config = example_config(tmp_path, workers=workers)
    text = config.read_text()
    config.write_text(
        text.replace(
            "</Configuration>",
            '<AllowedSources ports="events"><Source>127.0.0.2</Source></AllowedSources></Configuration>',
        )
    )
    with running_node(config) as node:
        assert refused(node.port, None, source="127.0.0.1")
        mark = len(node.log())
        config.write_text(config.read_text().replace("<Source>127.0.0.2</Source>", "<Source>127.0.0.0/8</Source>"))
        node.signal(signal.SIGHUP)
        node.wait_for_log(r"allowed sources now: events: 127\.0\.0\.0/8", after=mark)
        assert not refused(node.port, None, source="127.0.0.1")
        assert "needs a restart" not in node.log()[mark:]


def test_balancer_allowed_sources_change_at_a_sighup(tmp_path: Path) -> None:
    with running_node(example_config(tmp_path)) as node:
        only = '<AllowedSources ports="events,api"><Source>127.0.0.2</Source></AllowedSources>'
        path = balancer_config(tmp_path / "kl_balancer.conf", instances=[node.port], extra=only)
        with running_balancer(path) as balancer:
            assert refused(balancer.port, None, source="127.0.0.1")
            mark = balancer.log_offset()
            path.write_text(path.read_text().replace("<Source>127.0.0.2</Source>", "<Source>127.0.0.1</Source>"))
            balancer.signal(signal.SIGHUP)
            balancer.wait_for_log(r"allowed sources now: api: 127\.0\.0\.1/32", after=mark)
            balancer.wait_for_log(r"allowed sources now: events: 127\.0\.0\.1/32", after=mark)
            assert not refused(balancer.port, None, source="127.0.0.1")
