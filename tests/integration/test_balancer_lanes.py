"""Lanes: a real balancer opening several event connections to one real node, talked to as a SIEM does.

A node with worker processes serves each connection in one worker, so the balancer opens one connection
("lane") per worker and spreads one client's events over them.  Here the node is a single process, which
serves any number of connections the same way, so what is checked is the balancer's side: the node sees
``connections`` event connections, one client's events travel over all of them, and when one of them is
cut (as when the worker serving it dies) only that lane's unfinished events are sent again, each answered
exactly once, while the instance stays UP; when the whole node goes, it is DOWN as with one connection.

A lane is cut by a small TCP proxy between the balancer and the node (:class:`CuttingProxy`): a single
process node cannot be made to close one of its connections on cue.  Everything else is real.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import (
    EXAMPLES,
    FINISHED_LINE,
    REPLY_FLAGS,
    BalancerProcess,
    NodeProcess,
    answers_by_request_id,
    answers_in_order,
    balancer_config,
    example_config,
    free_port,
    prometheus_samples,
    running_balancer,
    stream,
    wait_until,
)
from tests.integration.test_balancer import SLOW_NODES, STARTUP_TIMEOUT, STREAM_TIMEOUT, assert_answers, client, nodes

LANE_FLAGS = b"X-KF-SendFinishedEvent"
"""How the balancer's event connections start (health checks start with ``X-KF-ReplyBackPING``)."""
REPEAT = 5000
"""The 7 example events, this many times: 35,000 events."""


@dataclass
class Pipe:
    """One proxied connection: the balancer's side, the node's side, and the event lines it carried."""

    down: socket.socket
    up: socket.socket
    lane: bool = False
    lines: int = 0
    cut: threading.Event = field(default_factory=threading.Event)


class CuttingProxy:
    """A TCP proxy on threads in front of a node: forwards every connection as is, tells lanes from health
    checks, counts the lines each lane carries to the node, and cuts a lane on demand (both sides closed, so
    the balancer sees the node close it, exactly as when the worker serving it dies)."""

    def __init__(self, node_port: int) -> None:
        self.node_port = node_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.pipes: list[Pipe] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def lanes(self) -> list[Pipe]:
        with self._lock:
            return [p for p in self.pipes if p.lane]

    def open_lanes(self) -> list[Pipe]:
        return [p for p in self.lanes() if not p.cut.is_set()]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                down, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.node_port), timeout=10)
            except OSError:
                down.close()  # the node is down: so is the proxied port
                continue
            up.settimeout(None)
            pipe = Pipe(down, up)
            with self._lock:
                self.pipes.append(pipe)
            for args in ((pipe, down, up, True), (pipe, up, down, False)):
                thread = threading.Thread(target=self._pump, args=args, daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump(self, pipe: Pipe, src: socket.socket, dst: socket.socket, to_node: bool) -> None:
        first = True
        with contextlib.suppress(OSError):
            while not pipe.cut.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if to_node:
                    if first:
                        pipe.lane = data.startswith(LANE_FLAGS)
                        first = False
                    pipe.lines += data.count(b"\n")
                if pipe.cut.is_set():
                    break  # what was read after the cut is lost with the connection
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self, pipe: Pipe) -> None:
        pipe.cut.set()
        for s in (pipe.down, pipe.up):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._threads[0].join(10)
        with self._lock:
            pipes = list(self.pipes)
        for pipe in pipes:
            self.cut(pipe)
        for thread in self._threads[1:]:
            thread.join(10)
        for pipe in pipes:
            pipe.down.close()
            pipe.up.close()
        self.server.close()


@dataclass
class Node:
    proc: NodeProcess
    port: int
    metrics: int
    config: Path
    reference: list[tuple[str, ...]]  # its answers to examples/events.txt

    def active_connections(self) -> float:
        return prometheus_samples(self.metrics).get("threatgate_active_connections", -1)


@contextmanager
def example_node(tmp_path: Path, env: dict[str, str] | None = None, port: int = 0) -> Iterator[Node]:
    """The example node on event port ``port`` (0: the one it binds); its metrics on a port it binds."""
    config = example_config(
        tmp_path, port=port, extra_service="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>"
    )
    assert "<ScannersCount>9</ScannersCount>" in config.read_text()  # room for the lanes
    with nodes((config, port), env=env) as [proc]:
        events = (EXAMPLES / "events.txt").read_bytes()
        reference = answers_by_request_id(stream(proc.port, REPLY_FLAGS + events), 7)
        yield Node(proc, proc.port, proc.metrics_port, config, reference)


@contextmanager
def lanes_balancer(
    tmp_path: Path, port: int, connections: str | None, api_port: int | None = None
) -> Iterator[tuple[BalancerProcess, int]]:
    """A balancer in front of one instance on ``port`` with ``connections`` (None: not written, i.e. auto);
    its own ports (the metrics port yielded with it) are the ones it binds."""
    path = balancer_config(
        tmp_path / "kl_balancer.conf",
        instances=[port],
        extra="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
    )
    attributes = (f' connections="{connections}"' if connections else "") + (
        f' api_port="{api_port}"' if api_port else ""
    )
    text = path.read_text()
    tag = f'<Instance matching_port="{port}" enabled="true"'
    assert text.count(tag) == 1
    path.write_text(text.replace(tag, tag + attributes))
    with running_balancer(path) as balancer:
        balancer.wait_for_log(rf"instance 127\.0\.0\.1:{port} is UP", timeout=STARTUP_TIMEOUT, after=0)
        yield balancer, balancer.metrics_port


def lanes_open(metrics: int, port: int) -> float:
    return prometheus_samples(metrics).get(f'threatgate_balancer_instance_lanes{{instance="127.0.0.1:{port}"}}', -1)


def test_two_lanes_carry_one_clients_events_over_two_node_connections(tmp_path: Path) -> None:
    """``connections="2"``: the node sees two event connections from the balancer; one client's 35,000 events
    are answered once each, in order, as the node answers them directly.  SIGHUP with another ``connections``
    opens or closes lanes while the instance stays UP."""
    with example_node(tmp_path / "node") as node, lanes_balancer(tmp_path, node.port, "2") as (balancer, metrics):
        wait_until(lambda: node.active_connections() == 2, "2 event connections on the node")
        assert lanes_open(metrics, node.port) == 2
        assert re.search(r"instance 127\.0\.0\.1:\d+ lane 1: event connection open", balancer.log())
        events = (EXAMPLES / "events.txt").read_bytes()
        with client(balancer.port) as (_, reader, writer):
            writer.send(REPLY_FLAGS + events * REPEAT)
            writer.shutdown()
            lines = reader.join(STREAM_TIMEOUT)
        assert node.active_connections() == 2  # the lanes stay open after the stream
        for connections in ("3", "1"):
            mark = balancer.log_offset()
            path = tmp_path / "kl_balancer.conf"
            path.write_text(re.sub(r'connections="\d+"', f'connections="{connections}"', path.read_text()))
            balancer.signal(signal.SIGHUP)
            balancer.wait_for_log(r"configuration reloaded from ", after=mark)
            wait_until(lambda n=int(connections): node.active_connections() == n, f"{connections} connections")
            assert lanes_open(metrics, node.port) == int(connections)
            assert answers_in_order(stream(balancer.port, REPLY_FLAGS + events)) == node.reference
        assert "is DOWN" not in balancer.log() and "is UP" not in balancer.log()[mark:]
    assert lines.count(FINISHED_LINE) == 7 * REPEAT
    assert_answers(answers_in_order(lines), node.reference * REPEAT)


def test_auto_with_a_node_that_says_nothing_opens_one_connection(tmp_path: Path) -> None:
    """``auto`` (not written) and readiness polled: a node whose ``/readyz`` has no ``event_connections``, or
    says 1 (a node without workers), gets one event connection, as before lanes."""
    config = example_config(
        tmp_path / "node", extra_service="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>"
    )
    with (
        nodes((config, 0)) as [proc],
        lanes_balancer(tmp_path, proc.port, None, api_port=proc.api_port) as (balancer, metrics),
    ):
        port, metrics_node = proc.port, proc.metrics_port
        balancer.wait_for_log(rf"instance 127\.0\.0\.1:{port}: role standalone", timeout=STARTUP_TIMEOUT)
        node = Node(proc, port, metrics_node, config, [])
        wait_until(lambda: node.active_connections() == 1, "the event connection on the node")
        assert stream(balancer.port, REPLY_FLAGS + b"1 hello\n") == [FINISHED_LINE]
        assert node.active_connections() == 1 and lanes_open(metrics, port) == 1
        assert "lane" not in balancer.log()


def test_a_lane_cut_mid_stream_resends_only_its_events_and_the_instance_stays_up(tmp_path: Path) -> None:
    """One of two lanes is cut while both hold events (the worker serving it died): its unfinished events are
    sent again on the other lane, every event is answered exactly once with its detections, the instance
    never goes DOWN, and the cut lane reconnects and carries events again."""
    with example_node(tmp_path / "node", env=SLOW_NODES) as node:
        proxy = CuttingProxy(node.port)
        try:
            with lanes_balancer(tmp_path, proxy.port, "2") as (balancer, metrics):
                wait_until(lambda: len(proxy.open_lanes()) == 2, "2 lanes through the proxy")
                events = (EXAMPLES / "events.txt").read_bytes()
                with client(balancer.port) as (_, reader, writer):
                    writer.send(REPLY_FLAGS + events * REPEAT)
                    reader.wait_finished(3000, timeout=STREAM_TIMEOUT)
                    first, second = proxy.open_lanes()
                    assert first.lines > 100 and second.lines > 100  # one client, both lanes
                    mark = balancer.log_offset()
                    proxy.cut(first)
                    lost = balancer.wait_for_log(
                        # "closed by the node", or "Broken pipe" when the balancer was writing as the cut came
                        r"instance 127\.0\.0\.1:\d+ lane (\d): event connection lost: [^;]+; the "
                        r"instance stays UP \(1 of 2 event connections open\), this one reconnects in 0\.2 s",
                        after=mark,
                    )
                    resent = balancer.wait_for_log(
                        rf"(\d+) unfinished event\(s\) of event connection {lost[1]} sent again", after=mark
                    )
                    assert int(resent[1]) > 0
                    wait_until(lambda: len(proxy.open_lanes()) == 2, "the cut lane reconnected")
                    third = proxy.open_lanes()[-1]
                    assert third is not first and third is not second
                    writer.send(events * 1000)  # after the reconnect: the new lane carries events too
                    writer.shutdown()
                    lines = reader.join(STREAM_TIMEOUT)
                assert third.lines > 100
                assert "is DOWN" not in balancer.log()
                samples = prometheus_samples(metrics)
                assert samples['threatgate_balancer_transitions_total{kind="lane_lost"}'] == 1
                assert samples["threatgate_balancer_redispatched_total"] == int(resent[1])
                assert lanes_open(metrics, proxy.port) == 2
        finally:
            proxy.close()
    assert lines.count(FINISHED_LINE) == 7 * (REPEAT + 1000)
    assert_answers(answers_in_order(lines), node.reference * (REPEAT + 1000))


@pytest.mark.timeout(180)
def test_a_node_restarted_mid_stream_behind_two_lanes(tmp_path: Path) -> None:
    """SIGKILL of the node while both lanes hold events: the instance is DOWN (its last lane lost), every
    unfinished event waits; the node restarted on the same port gets two lanes again and answers them all,
    each exactly once, in order."""
    # A port named in the config: the node restarted comes back on it.
    with example_node(tmp_path / "node", env=SLOW_NODES, port=free_port()) as node:
        with lanes_balancer(tmp_path, node.port, "2") as (balancer, metrics):
            wait_until(lambda: node.active_connections() == 2, "2 event connections on the node")
            events = (EXAMPLES / "events.txt").read_bytes()
            with client(balancer.port) as (_, reader, writer):
                writer.send(REPLY_FLAGS + events * REPEAT)
                writer.shutdown()
                reader.wait_finished(3000, timeout=STREAM_TIMEOUT)
                mark = balancer.log_offset()
                node.proc.proc.kill()
                assert node.proc.proc.wait(10) == -9
                balancer.wait_for_log(rf"instance 127\.0\.0\.1:{node.port} is DOWN: ", after=mark)
                waiting = balancer.wait_for_log(r"(\d+) unfinished event\(s\) wait in the backlog", after=mark)
                assert int(waiting[1]) > 0
                restarted = NodeProcess(node.config, node.port, SLOW_NODES)
                try:
                    restarted.wait_ready(timeout=STARTUP_TIMEOUT)
                    node.metrics = restarted.metrics_port  # the metrics port is bound anew (0 in the config)
                    balancer.wait_for_log(rf"instance 127\.0\.0\.1:{node.port} is UP", after=mark)
                    lines = reader.join(STREAM_TIMEOUT)
                    wait_until(lambda: node.active_connections() == 2, "2 event connections on the restarted node")
                    assert lanes_open(metrics, node.port) == 2
                finally:
                    restarted.stop()
    assert lines.count(FINISHED_LINE) == 7 * REPEAT
    assert_answers(answers_in_order(lines), node.reference * REPEAT)
