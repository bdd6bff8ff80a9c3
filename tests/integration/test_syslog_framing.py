"""A real rsyslog forwarding events to a real node and to a real balancer, in both TCP framings.

rsyslog's omfwd sends ``TCP_Framing="traditional"`` (LF) or ``"octet-counted"`` (RFC 6587
``MSG-LEN SP MSG``) and sends no session flags, so the detections go to the OutputSettings destination,
a listener here.  rsyslog runs with a private config and work directory: its only input is an imtcp
port on 127.0.0.1 that the test writes events to, its only action the forwarding (no port 514, no
/dev/log, nothing system-wide: tests/shippers.py).  Over TLS, and syslog-ng:
tests/integration/test_shippers_tls.py.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DEFAULT_TIMEOUT, wait_for_log_count
from tests.shippers import (
    EVENTS,
    RsyslogFraming,
    Target,
    balancer_target,
    forward,
    lines_received,
    metric,
    node_target,
    rsyslog,
)

SENDERS = [  # rsyslog's TCP_Framing, and the template a message is sent with
    pytest.param("octet-counted", "%rawmsg%", id="octet-counted"),  # the event only: MSG-LEN covers it
    pytest.param("octet-counted", "%rawmsg%\\n", id="octet-counted-lf"),  # CyberTrace users' templates end in LF
    pytest.param("traditional", "%rawmsg%", id="traditional"),  # rsyslog appends the LF
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with node_target(tmp_path_factory.mktemp("node")) as target:
        yield target


@pytest.fixture(scope="module")
def balancer(node: Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with balancer_target(tmp_path_factory.mktemp("balancer"), [node.proc.port]) as target:
        yield target


def forward_with_rsyslog(target: Target, tmp: Path, framing: RsyslogFraming, template: str) -> None:
    """Events through a real rsyslog to ``target``; octet counting is detected exactly when rsyslog used it."""
    octet_before = metric(target.metrics, "threatgate_connections_total", 'outcome="octet_counted"')
    forward(target, rsyslog(tmp, target.port, framing, template), target.expected, target.first)
    octet = metric(target.metrics, "threatgate_connections_total", 'outcome="octet_counted"') - octet_before
    assert octet == (1 if framing == "octet-counted" else 0)
    assert metric(target.metrics, "threatgate_bad_input_total", 'reason="bad_frame"') == 0
    assert metric(target.metrics, "threatgate_bad_input_total", 'reason="oversized"') == 0


@pytest.mark.parametrize(("framing", "template"), SENDERS)
def test_rsyslog_to_a_node(node: Target, tmp_path: Path, framing: RsyslogFraming, template: str) -> None:
    forward_with_rsyslog(node, tmp_path, framing, template)


@pytest.mark.parametrize(("framing", "template"), SENDERS)
def test_rsyslog_to_a_balancer(balancer: Target, tmp_path: Path, framing: RsyslogFraming, template: str) -> None:
    forward_with_rsyslog(balancer, tmp_path, framing, template)


def octet(*messages: bytes) -> bytes:
    return b"".join(b"%d %s" % (len(m), m) for m in messages)


@pytest.mark.parametrize("kind", ["node", "balancer"])
def test_a_malformed_octet_counted_frame_is_counted_logged_and_the_stream_goes_on(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """A frame with a broken MSG-LEN is read up to its LF (as rsyslog does); the frames around it still match."""
    target: Target = request.getfixturevalue(kind)
    before = metric(target.metrics, "threatgate_bad_input_total", 'reason="bad_frame"')
    mark = target.output.mark()
    log_at = len(target.proc.log())
    broken = b"0" + EVENTS[4]  # "05 CEF:...": a leading zero is no MSG-LEN
    with socket.create_connection(("127.0.0.1", target.proc.port), timeout=DEFAULT_TIMEOUT) as sock:
        # Four good frames first: detection needs three whole frames and the next header (PROOF_FRAMES).
        sock.sendall(octet(*EVENTS[:4]) + broken + octet(*EVENTS[5:]))
        sock.shutdown(socket.SHUT_WR)
        text = target.output.wait(lines_received(len(target.expected)), mark)
    if kind == "node":
        # The broken frame's event starts with "05 ": its REQ is "05", the others are as sent.
        want = [f"0{line}" if line.startswith("5 ") else line for line in target.expected]
        assert text.splitlines() == want
    else:
        assert text.splitlines() == target.expected
    assert metric(target.metrics, "threatgate_bad_input_total", 'reason="bad_frame"') - before == 1
    wait_for_log_count(target.proc, r"octet-counted frame\(s\) with a malformed length", 1, after=log_at)
    assert target.proc.proc.poll() is None
