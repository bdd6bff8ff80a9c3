"""A node with worker processes (``<Workers>2``): real processes, real sockets, real TLS for the API.

The master accepts and hands each connection to a worker; these tests check what an operator and a
SIEM see: connections spread over the workers, every worker detects what the REST API pushed as
soon as the push is answered, a feed change under load reaches every worker without a connection
dropped, a killed worker is restarted and its connections alone close, ScannersCount is node-wide,
and the answers are byte for byte those of one process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import EXAMPLES, exchange, running_node, wait_until
from tests.integration.test_node_api import (
    FLAGS,
    Node,
    add_supplier,
    api_node,
    hashes,  # noqa: F401 - the module-scoped fixture
    metric,
    put_indicators,
    write_config,
)


class Session:
    """One event connection with ReplyBack and finished lines: send events, read their answers."""

    def __init__(self, port: int, flags: bytes = FLAGS) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(flags)
        self._buf = b""
        self.next_id = 1

    def ask(self, event: str) -> list[str]:
        """Send one event; its detection lines (the finished line checked and removed)."""
        n = self.next_id
        self.next_id += 1
        self.sock.sendall(f"{n} {event}\n".encode())
        lines = self.read_until(f"{n} LookupFinished")
        return [line[len(f"{n} ") :] for line in lines[:-1]]

    def read_until(self, last: str) -> list[str]:
        out: list[str] = []
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                out.append(line.decode())
                if out[-1] == last:
                    return out
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed before {last!r}; read {out}")
            self._buf += data

    def closed_by_peer(self, timeout: float = 10) -> bool:
        self.sock.settimeout(timeout)
        try:
            while data := self.sock.recv(65536):
                self._buf += data
        except (ConnectionResetError, TimeoutError):
            return False
        return True

    def close(self) -> None:
        self.sock.close()


@contextmanager
def sessions(port: int, count: int, flags: bytes = FLAGS) -> Iterator[list[Session]]:
    opened = [Session(port, flags) for _ in range(count)]
    try:
        yield opened
    finally:
        for s in opened:
            s.close()


def worker_pids(node: Node) -> dict[int, int]:
    """The pid of each running worker, from the node's log (the last 'ready' line of each)."""
    return {int(w): int(p) for w, p in re.findall(r"worker (\d+) ready \(pid (\d+)\)", node.log())}


def active_per_worker(node: Node) -> list[float]:
    return [metric(node, "threatgate_worker_active_connections", f'worker="{w}"') for w in (0, 1)]


def spread_over_both(node: Node, opened: list[Session]) -> None:
    """Make each session ACTIVE (one event) and wait until the two workers hold one each."""
    for s in opened:
        assert s.ask("src=192.0.2.1") == []
    wait_until(lambda: active_per_worker(node) == [1.0, 1.0], "one connection on each worker")


@pytest.fixture
def node2(tmp_path: Path, hashes: dict[str, str]) -> Iterator[Node]:  # noqa: F811 - pytest fixture injection
    with api_node(tmp_path, hashes, workers=2, service_extra="<HandshakeTimeout>1</HandshakeTimeout>") as node:
        assert metric(node, "threatgate_workers", 'state="ready"') == 2
        yield node


def test_connections_spread_over_the_workers_and_a_rest_push_detects_on_every_worker(node2: Node) -> None:
    node = node2
    url = "http://pushed.example/w"
    with sessions(node.event_port, 2) as opened:
        spread_over_both(node, opened)
        add_supplier(node, "Workers Supplier", confidence=60)
        reply = put_indicators(node, "Workers Supplier", [{"indicator": url}])
        answered = time.monotonic()
        assert reply.status == 200, reply
        for s in opened:  # at once, on both workers: the API answered after both applied the push
            assert s.ask(f"url={url}") == [
                f"category=Workers Supplier matchedIndicator={url} confidence=60 source=default "
                "supplier=Workers Supplier"
            ]
        assert time.monotonic() - answered < 1.0
    ready = json.loads(node.api.get("/readyz", auth=None).body)
    assert ready["workers"] == {"configured": 2, "ready": 2}
    assert ready["event_connections"] == 2
    assert metric(node, "threatgate_events_total") == 4  # summed over the workers


def test_answers_are_those_of_one_process(tmp_path: Path, hashes: dict[str, str]) -> None:  # noqa: F811
    payload = FLAGS + (EXAMPLES / "events.txt").read_bytes()
    answers = {}
    for workers in (1, 2):
        with api_node(tmp_path / str(workers), hashes, workers=workers) as node:
            answers[workers] = [exchange(node.event_port, payload) for _ in range(3)]
    assert answers[1][0].count(b"LookupFinished") == payload.count(b"\n")
    assert answers[2] == answers[1]


def test_a_feed_change_and_sighup_under_load_reach_every_worker_without_a_dropped_connection(node2: Node) -> None:
    node = node2
    feed = node.dir / "feeds" / "malicious_urls.json"
    new_url = "http://changed-under-load.example/x"
    with sessions(node.event_port, 2) as opened:
        spread_over_both(node, opened)
        sent = [0, 0]
        stop = threading.Event()
        errors: list[BaseException] = []

        def load(i: int) -> None:
            until = time.monotonic() + 60  # bounded: stops by itself if the test fails to stop it
            try:
                while not stop.is_set() and time.monotonic() < until:
                    batch = "".join(f"{opened[i].next_id + k} url=http://load.example/{k}\n" for k in range(200))
                    first = opened[i].next_id
                    opened[i].next_id += 200
                    opened[i].sock.sendall(batch.encode())
                    lines = opened[i].read_until(f"{first + 199} LookupFinished")
                    assert len(lines) == 200, lines[:3]
                    sent[i] += 200
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=load, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: min(sent) >= 1000, "load on both connections")
            records = json.loads(feed.read_text())
            records.append({"url": new_url, "threat": "Changed"})
            tmp = feed.with_suffix(".tmp")
            tmp.write_text(json.dumps(records))
            os.replace(tmp, feed)
            node.proc.signal(signal.SIGHUP)
            node.proc.wait_for_log(r"alert KL_ALERT_UpdatedFeed feed=malicious_urls.json records=6")
            before = list(sent)
            wait_until(lambda: all(s > b for s, b in zip(sent, before, strict=True)), "load goes on after the swap")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not errors, errors
        for s in opened:  # the same connections, still open, on both workers
            lines = s.ask(f"url={new_url}")
            assert len(lines) == 1 and f"matchedIndicator={new_url}" in lines[0], lines
    assert "configuration reloaded" in node.log()


def test_a_killed_worker_is_restarted_and_only_its_connections_close(node2: Node) -> None:
    node = node2
    with sessions(node.event_port, 2) as opened:
        spread_over_both(node, opened)
        pids = worker_pids(node)
        assert sorted(pids) == [0, 1]
        os.kill(pids[0], signal.SIGKILL)
        closed = [s for s in opened if s.closed_by_peer(timeout=2)]
        assert len(closed) == 1
        survivor = next(s for s in opened if s not in closed)
        assert survivor.ask("url=http://fakess123.nu")[0].startswith("category=Malicious_URL")
        node.proc.wait_for_log(r"worker 0 \(pid \d+\) exited with status 9 \(SIGKILL\); its 1 connection\(s\) closed")
        node.proc.wait_for_log(r"alert KL_ALERT_WorkerRestarted worker=0")
        node.proc.wait_for_log(r"worker 0 ready")
    assert worker_pids(node)[0] != pids[0]
    assert metric(node, "threatgate_worker_restarts_total", 'worker="0"') == 1
    with sessions(node.event_port, 2) as fresh:
        spread_over_both(node, fresh)  # the restarted worker takes connections again
        for s in fresh:
            assert s.ask("url=http://fakess123.nu")[0].startswith("category=Malicious_URL")
    assert metric(node, "threatgate_events_total") >= 7  # the dead worker's reported events are kept


def test_scanners_count_is_node_wide(tmp_path: Path, hashes: dict[str, str]) -> None:  # noqa: F811
    with api_node(
        tmp_path, hashes, workers=2, scanners=2, service_extra="<HandshakeTimeout>1</HandshakeTimeout>"
    ) as node:
        with sessions(node.event_port, 2) as opened:
            for s in opened:
                s.sock.sendall(b"0 src=192.0.2.1\n")
                s.read_until("0 LookupFinished")
            wait_until(lambda: active_per_worker(node) == [1.0, 1.0], "one connection on each worker")
            # Both idle for less than HandshakeTimeout: the third is refused, node-wide.
            with sessions(node.event_port, 1) as (third,):
                third.sock.sendall(b"1 url=http://fakess123.nu\n")
                assert third.closed_by_peer()
            assert metric(node, "threatgate_connections_total", 'outcome="rejected_scanners"') == 1
            assert exchange(node.event_port, b"X-KF-ReplyBackPING") == b"PONG"
            # Idle past HandshakeTimeout: the idlest is evicted for a newcomer, on whichever worker it is.
            time.sleep(2.2)  # idle time is what is under test: the workers report idle connections each second
            with sessions(node.event_port, 1) as (fourth,):
                assert fourth.ask("url=http://fakess123.nu")[0].startswith("category=Malicious_URL")
                assert sum(s.closed_by_peer(timeout=5) for s in opened) == 1
            assert metric(node, "threatgate_connections_total", 'outcome="evicted_idle"') == 1


def test_sigterm_drains_every_worker_then_exits(tmp_path: Path, hashes: dict[str, str]) -> None:  # noqa: F811
    config, _, _, _ = write_config(tmp_path, hashes, workers=2, service_extra="<DrainTimeout>5</DrainTimeout>")
    with running_node(config) as proc:
        node = Node(proc, tmp_path, proc.port, proc.api_port, proc.metrics_port)
        with sessions(node.event_port, 2) as opened:
            spread_over_both(node, opened)
            assert proc.notices() == []  # READY=1 came from the master alone: the workers send no notice
            count = 20_000
            for s in opened:  # sent, not read yet: the answers wait in the kernel and the workers' buffers
                first = s.next_id
                s.sock.sendall("".join(f"{first + k} url=http://fakess123.nu/{k}\n" for k in range(count)).encode())
            wait_until(lambda: metric(node, "threatgate_events_total") >= 2 + 2 * count, "every event read")
            started = time.monotonic()
            proc.signal(signal.SIGTERM)
            proc.wait_for_log(r"node draining: 2 event connection\(s\) in 2 worker\(s\)")
            for s in opened:
                lines = s.read_until(f"{s.next_id + count - 1} LookupFinished")
                assert sum(line.endswith(" LookupFinished") for line in lines) == count
                assert s.closed_by_peer()  # FIN once everything owed was delivered
            assert proc.proc.wait(10) == 0
            assert time.monotonic() - started < 5 + 2
        proc.wait_for_log(r"node drained in [\d.]+ s: 2 connection\(s\) closed cleanly")
        assert "cut at the deadline" not in proc.log()


def test_connections_of_clients_that_do_not_resend_are_never_moved(node2: Node) -> None:
    """Spreading connections again closes one only if its client re-sends what was not answered (the
    CyberTrace HA flags); a client with ReplyBack alone keeps its connection however uneven the workers
    (the example config sends finished lines anyway: FinishedEventFormat enabled)."""
    node = node2
    with sessions(node.event_port, 4, flags=b"X-KF-ReplyBack") as opened:
        for s in opened:  # one after the other: the master alternates, 0 and 2 on worker 0, 1 and 3 on worker 1
            s.sock.sendall(b"0 url=http://fakess123.nu\n")
            assert "matchedIndicator=http://fakess123.nu" in s.read_until("0 LookupFinished")[0]
        wait_until(lambda: active_per_worker(node) == [2.0, 2.0], "two connections on each worker")
        opened[1].close()
        opened[3].close()
        node.proc.wait_for_log(r"worker 0 holds 2 event connection\(s\), another 0: none can move")
        for s in (opened[0], opened[2]):
            s.sock.sendall(b"1 url=http://fakess123.nu\n")
            assert "matchedIndicator=http://fakess123.nu" in s.read_until("1 LookupFinished")[0]
