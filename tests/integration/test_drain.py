"""SIGTERM drains a real ``threatgate node`` (and balancer): it stops accepting, answers every event it read, exits.

The client holds the node's replies back by not reading (a small receive buffer, so most replies
wait in the node), as a slow SIEM does; the node counts the events it read in
``threatgate_events_total``, scraped while it drains (reading stopped, the metrics port still up).
The balancer's events in flight are those its node has not answered yet: the node is SIGSTOPped.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import (
    REPLY_FLAGS,
    HTTPSClient,
    LineWriter,
    NodeProcess,
    example_config,
    prometheus_samples,
    wait_until,
)
from tests.integration.test_balancer import URL_HIT, balancer_for, nodes

FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
EVENTS = 100_000
"""Events the client offers: their replies are far more than the kernel buffers hold, so the node stops
reading long before the last (the rest is never read, so never answered)."""
FINISHED = re.compile(rb"^(\d+) LookupFinished$", re.M)


@dataclass
class Node:
    proc: NodeProcess
    port: int
    api_port: int
    metrics_port: int
    dir: Path

    def events_read(self) -> int:
        return int(prometheus_samples(self.metrics_port)["threatgate_events_total"])

    def readyz(self) -> tuple[int, dict[str, object]]:
        reply = HTTPSClient(self.api_port, self.dir / "certs" / "node.pem").request("GET", "/readyz")
        body = reply.json()
        assert isinstance(body, dict)
        return reply.status, body

    def exit_within(self, seconds: float) -> tuple[int, float]:
        """The exit status, and how long the node took after this call (fails past ``seconds``)."""
        start = time.monotonic()
        try:
            status = self.proc.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the node still runs {seconds} s later:\n{self.proc.log()}") from None
        return status, time.monotonic() - start


@contextmanager
def node(tmp: Path, drain_timeout: int) -> Iterator[Node]:
    config = example_config(
        tmp,
        extra_service="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>"
        f"<DrainTimeout>{drain_timeout}</DrainTimeout>",
    )
    proc = NodeProcess(config)
    try:
        proc.wait_ready()
        yield Node(proc, proc.port, proc.api_port, proc.metrics_port, tmp)
    finally:
        proc.stop()


@contextmanager
def slow_reader(port: int) -> Iterator[socket.socket]:
    """A ReplyBack client streaming EVENTS detecting events, reading none of the replies (its window is small)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    writer = LineWriter(sock)  # blocks once the node stops reading; fails once the node has closed: both expected
    writer.send(FLAGS + b"".join(b"%d url=http://fakess123.nu/p\n" % i for i in range(1, EVENTS + 1)))
    try:
        yield sock
    finally:
        sock.close()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the node sent until it closed the connection (a reset after the data counts as closed: the
    node closes a socket holding unread events that way, once the client's kernel has every reply)."""
    chunks = []
    try:
        while data := sock.recv(1 << 20):
            chunks.append(data)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def wait_events_read(n: Node) -> None:
    """Until the node has read (and answered into its buffers) some events."""
    deadline = time.monotonic() + 20
    while n.events_read() < 1000:
        assert time.monotonic() < deadline, n.proc.log()
        time.sleep(0.02)


def test_sigterm_answers_every_event_the_node_read_then_exits_0(tmp_path: Path) -> None:
    with node(tmp_path, drain_timeout=10) as n, slow_reader(n.port) as client:
        wait_events_read(n)
        n.proc.signal(signal.SIGTERM)
        sent = time.monotonic()
        n.proc.wait_for_log(r"node draining: 1 event connection\(s\), up to 10 s")
        read = n.events_read()  # reading stopped when the drain began: this is final
        assert 1000 <= read < EVENTS
        time.sleep(0.3)  # the client keeps its replies waiting a while: the node must wait for it
        assert n.proc.proc.poll() is None
        data = read_until_closed(client)
        ids = [int(m) for m in FINISHED.findall(data)]
        assert ids == list(range(1, read + 1))  # every event read answered, once, in order; no other
        status, _ = n.exit_within(10 + 2 - (time.monotonic() - sent))
        assert status == 0
        log = n.proc.log()
        assert re.search(r"INF threatgate.node: node drained in \d+\.\d s: 1 connection\(s\) closed cleanly", log), log
        assert "Traceback" not in log


def test_a_client_that_never_reads_is_cut_at_DrainTimeout(tmp_path: Path) -> None:
    with node(tmp_path, drain_timeout=1) as n, slow_reader(n.port):
        wait_events_read(n)
        n.proc.signal(signal.SIGTERM)
        status, took = n.exit_within(1 + 2)
        assert status == 0 and took >= 1.0
        log = n.proc.log()
        assert re.search(
            r"WAR threatgate.node: node drained in 1\.\d s: 0 connection\(s\) closed cleanly, "
            r"1 cut at the deadline \(\d+ reply byte\(s\) undelivered\) \(DrainTimeout 1 s\)",
            log,
        ), log


def test_a_second_sigterm_forces_the_exit(tmp_path: Path) -> None:
    with node(tmp_path, drain_timeout=60) as n, slow_reader(n.port):
        wait_events_read(n)
        n.proc.signal(signal.SIGTERM)
        n.proc.wait_for_log(r"node draining: 1 event connection\(s\), up to 60 s")
        n.proc.signal(signal.SIGTERM)
        status, took = n.exit_within(5)
        assert status == 0 and took < 5
        log = n.proc.log()
        assert "WAR threatgate: SIGTERM again while stopping: exiting now" in log, log
        assert "node drained" not in log and "Traceback" not in log


def test_a_draining_node_refuses_new_connections_and_says_so_in_readyz(tmp_path: Path) -> None:
    with node(tmp_path, drain_timeout=10) as n:
        assert n.readyz()[0] == 200
        with slow_reader(n.port) as client:
            wait_events_read(n)
            n.proc.signal(signal.SIGTERM)
            n.proc.wait_for_log(r"node draining: 1 event connection\(s\)")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", n.port), timeout=5).close()
            status, body = n.readyz()
            assert (status, body["ready"], body["reason"]) == (503, False, "draining")
            assert prometheus_samples(n.metrics_port)["threatgate_ready"] == 0
            read_until_closed(client)
        assert n.exit_within(10)[0] == 0
        with pytest.raises(OSError):  # the REST API stopped last
            urllib.request.urlopen(f"http://127.0.0.1:{n.metrics_port}/metrics", timeout=2)


def test_a_balancer_answers_every_event_it_read_before_it_exits(tmp_path: Path) -> None:
    config = example_config(tmp_path / "node")
    extra = "<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString><DrainTimeout>10</DrainTimeout>"
    with (
        nodes((config, 0)) as [node],
        balancer_for(tmp_path / "kl_balancer.conf", [node.port], extra=extra) as balancer,
        socket.create_connection(("127.0.0.1", balancer.port), timeout=20) as client,
    ):
        metrics_port = balancer.metrics_port
        node.signal(signal.SIGSTOP)  # its answers wait: the balancer's events are in flight
        try:
            client.sendall(REPLY_FLAGS + b"".join(b"%d %s\n" % (i, URL_HIT) for i in range(1, 51)))
            pending = lambda: prometheus_samples(metrics_port)["threatgate_balancer_pending"]  # noqa: E731
            wait_until(lambda: pending() == 50, "the balancer to read the 50 events")
            balancer.signal(signal.SIGTERM)
            balancer.wait_for_log(r"balancer draining: 1 client connection\(s\), 50 event\(s\) unanswered, up to 10 s")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", balancer.port), timeout=5).close()
            time.sleep(0.3)  # the answers are late: the balancer waits for them
            assert balancer.proc.poll() is None
        finally:
            node.signal(signal.SIGCONT)
        data = read_until_closed(client)
        assert data.count(b"LookupFinished\n") == 50 and data.count(b"matchedIndicator=http://fakess123.nu ") == 50
        assert balancer.proc.wait(10 + 2) == 0
        log = balancer.log()
        drained = r"INF threatgate.balancer: balancer drained in [\d.]+ s: 1 connection\(s\) closed cleanly"
        assert re.search(drained, log), log
        assert "Traceback" not in log
