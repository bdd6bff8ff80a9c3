"""A node's detections to a TLS destination (``<ConnectionString tls="true" fingerprint=...>``), real processes.

The destination is socat terminating TLS in front of a plain line sink: with the right fingerprint the
detections arrive; with another one the sink receives nothing, the node logs both fingerprints at
ERROR and counts the lines it drops.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers import line_sink, running_node, wait_until
from tests.integration.test_balancer_tls import Terminator, fingerprint, make_pair
from tests.integration.test_output import EVENTS, NO_RETRIES, dropped, node_config, reference_detections, send_plain


def tls_output(config: Path, port: int, pin: str) -> None:
    text = config.read_text()
    old = f"<ConnectionString>127.0.0.1:{port}</ConnectionString>"
    assert text.count(old) == 1
    new = f'<ConnectionString tls="true" fingerprint="SHA256 {pin}">127.0.0.1:{port}</ConnectionString>'
    config.write_text(text.replace(old, new))


def test_detections_reach_a_pinned_tls_destination(tmp_path: Path) -> None:
    cert, key = make_pair(tmp_path / "siem", "siem")
    with line_sink() as siem:
        front = Terminator(siem.port, cert, key)
        try:
            config = node_config(tmp_path, front.port, NO_RETRIES)
            tls_output(config, front.port, fingerprint(cert))
            with running_node(config) as node:
                want = reference_detections(node.port)
                send_plain(node.port, EVENTS)
                assert [line.partition(" ")[2] for line in siem.wait_lines(4)] == [
                    line.partition(" ")[2] for line in want
                ]
                node.wait_for_log(rf"detections: connected to 127\.0\.0\.1:{front.port}")
        finally:
            front.kill()


def test_a_destination_with_another_certificate_gets_nothing(tmp_path: Path) -> None:
    cert, key = make_pair(tmp_path / "siem", "siem")
    expected, _ = make_pair(tmp_path / "expected", "expected")
    with line_sink() as siem:
        front = Terminator(siem.port, cert, key)
        try:
            config = node_config(tmp_path, front.port, NO_RETRIES)
            tls_output(config, front.port, fingerprint(expected))
            with running_node(config) as node:
                send_plain(node.port, EVENTS)
                node.wait_for_log(
                    rf"ERR threatgate\.net: detections: 127\.0\.0\.1:{front.port} certificate mismatch: "
                    rf"pinned {fingerprint(expected)}, presented {fingerprint(cert)}; nothing sent"
                )
                wait_until(lambda: dropped(node.metrics_port, "detections", "retries_exhausted") == 4, "4 dropped")
            assert siem.data == b""
        finally:
            front.kill()
