"""A real rsyslog forwarding events to a real node and to a real balancer, in both TCP framings.

rsyslog's omfwd sends ``TCP_Framing="traditional"`` (LF) or ``"octet-counted"`` (RFC 6587
``MSG-LEN SP MSG``) and sends no session flags, so the detections go to the OutputSettings destination,
a listener here.  rsyslog runs with a private config and work directory: its only input is an imtcp
port on 127.0.0.1 that the test writes events to, its only action the forwarding (no port 514, no
/dev/log, nothing system-wide).  syslog-ng (whose ``syslog()`` driver octet-counts by default) cannot be
installed beside rsyslog on Debian (both provide system-log-daemon), so it is not tested here.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import (
    DEFAULT_TIMEOUT,
    EXAMPLES,
    REPLY_FLAGS,
    LineSink,
    NodeProcess,
    answers_by_request_id,
    balancer_config,
    example_config,
    exchange,
    free_port,
    running_balancer,
    running_node,
    stream,
    wait_for_log_count,
)

EVENTS = (EXAMPLES / "events.txt").read_bytes().splitlines(keepends=True)  # "1 CEF:0|..." .. "7 CEF:0|..."
SENDERS = [  # rsyslog's TCP_Framing, and the template a message is sent with
    pytest.param("octet-counted", "%rawmsg%", id="octet-counted"),  # the event only: MSG-LEN covers it
    pytest.param("octet-counted", "%rawmsg%\\n", id="octet-counted-lf"),  # CyberTrace users' templates end in LF
    pytest.param("traditional", "%rawmsg%", id="traditional"),  # rsyslog appends the LF
]


def rsyslogd() -> str:
    path = shutil.which("rsyslogd") or shutil.which("rsyslogd", path="/usr/sbin:/sbin")
    if path is None:
        raise RuntimeError("rsyslog is not installed: run ./scripts/test, which installs it")
    return path


@contextmanager
def rsyslog(tmp: Path, target: int, framing: str, template: str) -> Iterator[socket.socket]:
    """A private rsyslogd forwarding to ``target`` with ``framing``; yields a connection to its imtcp input.

    Each line written to the input is one syslog message, forwarded as ``template`` makes it.  The input
    reads LF only: rsyslog's own octet-counting detection would take ``1 CEF:...`` for a 1-byte frame.
    """
    work = tmp / "rsyslog"
    work.mkdir()
    in_port = free_port()  # rsyslogd's own input: it does not report a port it picked
    conf = work / "rsyslog.conf"
    conf.write_text(
        f'global(workDirectory="{work}" net.enableDNS="off")\n'
        'module(load="imtcp")\n'
        f'template(name="threatgate_event" type="string" string="{template}")\n'
        'ruleset(name="forward") {\n'
        f'  action(type="omfwd" target="127.0.0.1" port="{target}" protocol="tcp" TCP_Framing="{framing}"\n'
        '         template="threatgate_event")\n'
        "}\n"
        f'input(type="imtcp" address="127.0.0.1" port="{in_port}" ruleset="forward" '
        'supportOctetCountedFraming="off")\n'
    )
    with open(work / "rsyslogd.log", "wb") as log:
        proc = subprocess.Popen(
            [rsyslogd(), "-n", "-f", str(conf), "-i", str(work / "rsyslogd.pid")], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + DEFAULT_TIMEOUT
            while True:  # ready when its input accepts a connection
                try:
                    sock = socket.create_connection(("127.0.0.1", in_port), timeout=DEFAULT_TIMEOUT)
                    break
                except ConnectionRefusedError:
                    output = (work / "rsyslogd.log").read_text(errors="replace")
                    assert proc.poll() is None, f"rsyslogd exited ({proc.returncode}):\n{output}"
                    assert time.monotonic() < deadline, f"rsyslogd input not listening:\n{output}"
                    time.sleep(0.05)
            with sock:
                yield sock
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def metric(port: int, name: str, label: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    for line in body.splitlines():
        if line.startswith(name + ("{" + label + "}" if label else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@dataclass
class Target:
    """A node (detections and ``<n> LookupFinished`` lines at its output) or a balancer (detections only)."""

    proc: NodeProcess
    metrics: int
    output: LineSink
    expected: list[str]  # the output lines for EVENTS, in order
    first: int  # how many of them belong to the first event


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("node")
    output = LineSink()
    config = example_config(
        tmp,
        extra_service="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
        output=f"<ConnectionString>127.0.0.1:{output.port}</ConnectionString>",
    )
    try:
        with running_node(config) as proc:
            # The reference: what the node answers a CyberTrace client that asks for its detections back.
            expected = exchange(proc.port, REPLY_FLAGS + b"".join(EVENTS)).decode().splitlines()
            first = expected.index("1 LookupFinished") + 1
            assert first > 1  # the first event detects something
            yield Target(proc, proc.metrics_port, output, expected, first)
    finally:
        output.close()


@pytest.fixture(scope="module")
def balancer(node: Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    path = tmp_path_factory.mktemp("balancer") / "kl_balancer.conf"
    output = LineSink()
    balancer_config(
        path,
        instances=[node.proc.port],
        extra=f"<OutputConnectionString>127.0.0.1:{output.port}</OutputConnectionString>"
        "<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
    )
    try:
        with running_balancer(path) as proc:
            wait_for_log_count(proc, r"instance 127\.0\.0\.1:\d+ is UP", 1)
            answers = answers_by_request_id(stream(node.proc.port, REPLY_FLAGS + b"".join(EVENTS)), len(EVENTS))
            expected = [line for answer in answers for line in answer]  # the balancer forwards detections only
            yield Target(proc, proc.metrics_port, output, expected, len(answers[0]))
    finally:
        output.close()


def lines_received(count: int) -> Callable[[str], bool]:
    return lambda text: text.count("\n") >= count


def forward_with_rsyslog(target: Target, tmp: Path, framing: str, template: str) -> None:
    """Events through a real rsyslog to ``target``: the first one alone (rsyslog then idles), then the rest."""
    octet_before = metric(target.metrics, "threatgate_connections_total", 'outcome="octet_counted"')
    mark = target.output.mark()
    with rsyslog(tmp, target.proc.port, framing, template) as syslog_input:
        syslog_input.sendall(EVENTS[0])
        # A sender that goes quiet after one message still gets it matched (the framing is decided on a pause).
        first = target.output.wait(lines_received(target.first), mark)
        assert first.splitlines() == target.expected[: target.first]
        syslog_input.sendall(b"".join(EVENTS[1:]))
        text = target.output.wait(lines_received(len(target.expected)), mark)
    assert text.splitlines() == target.expected
    octet = metric(target.metrics, "threatgate_connections_total", 'outcome="octet_counted"') - octet_before
    assert octet == (1 if framing == "octet-counted" else 0)
    assert metric(target.metrics, "threatgate_bad_input_total", 'reason="bad_frame"') == 0
    assert metric(target.metrics, "threatgate_bad_input_total", 'reason="oversized"') == 0


@pytest.mark.parametrize(("framing", "template"), SENDERS)
def test_rsyslog_to_a_node(node: Target, tmp_path: Path, framing: str, template: str) -> None:
    forward_with_rsyslog(node, tmp_path, framing, template)


@pytest.mark.parametrize(("framing", "template"), SENDERS)
def test_rsyslog_to_a_balancer(balancer: Target, tmp_path: Path, framing: str, template: str) -> None:
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
