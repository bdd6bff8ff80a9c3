"""What the balancer does when things go wrong in everyday operation, with real nodes and real clients.

Issue 11: nothing lost silently.  Each test here reproduces a case where the balancer used to miss a
detection, stall every client or stay silent: a node that hangs (SIGSTOP), no node at all, an event
that fits the node only without the request id, clients that hold slots or never read, a balancer
restarted in front of running nodes, and memory after a burst.
"""

from __future__ import annotations

import re
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import (
    FINISHED_LINE,
    REPLY_FLAGS,
    ReplyReader,
    balancer_config,
    example_config,
    exchange,
    free_ports,
    running_balancer,
    stream,
    wait_for_log_count,
    wait_until,
)
from tests.integration.test_balancer import (
    STREAM_TIMEOUT,
    URL_HIT,
    Examples,
    FakeNode,
    assert_answers,
    balancer_for,
    client,
    instance,
    nodes,
)
from tests.integration.test_balancer import (
    example_nodes as example_nodes,  # noqa: F401 - the module fixture, shared with these tests
)

PING = b"X-KF-ReplyBackPING"


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def metric(port: int, name: str, labels: str = "") -> float:
    """One sample of ``name{labels}`` (0 when absent)."""
    m = re.search(rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$", metrics(port), re.M)
    return float(m[1]) if m else 0.0


def rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^VmRSS:\s+(\d+) kB$", text, re.M)
    assert m, text
    return int(m[1])


def answers(lines: list[str]) -> list[tuple[str, ...]]:
    """Per-event answers: the detection lines before each finished line (whatever its context)."""
    out: list[tuple[str, ...]] = []
    current: list[str] = []
    for line in lines:
        if line.startswith(FINISHED_LINE):
            out.append(tuple(current))
            current = []
        else:
            current.append(line)
    assert not current, current[:3]
    return out


# -- item 9: a hung node -------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_stopped_node_adds_at_most_two_seconds_to_any_answer(example_nodes: Examples, tmp_path: Path) -> None:  # noqa: F811
    """A paced stream (about 1,000 events/s) through two nodes; one is SIGSTOPped for 8 s.  Its unanswered
    events are sent to the other once overdue, so no event waits more than 2 s longer than usual, and
    every event is answered exactly once, in order.  (It used to stall every client until health checks
    declared the node DOWN, 8-11 s.)"""
    configs = [(example_config(tmp_path / f"n{i}"), 0) for i in range(2)]
    batch = example_nodes.events * 3  # 21 events
    rounds = 700  # every 20 ms: 14 s
    health = '<HealthCheck interval="1" timeout="1" rise="2" fall="3"/>'
    with (
        nodes(*configs) as (victim, survivor),
        balancer_for(tmp_path / "kl_balancer.conf", [victim.port, survivor.port], health=health) as balancer,
        socket.create_connection(("127.0.0.1", balancer.port), timeout=STREAM_TIMEOUT) as sock,
    ):
        reader = ReplyReader(sock)
        sock.sendall(REPLY_FLAGS)
        sent_at: list[float] = []
        start = time.monotonic()
        stopped = resumed = False
        for k in range(rounds):
            pause = start + k * 0.02 - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            sent_at.append(time.monotonic())
            sock.sendall(batch)
            elapsed = time.monotonic() - start
            if not stopped and elapsed >= 2.0:
                victim.proc.send_signal(signal.SIGSTOP)
                stopped = True
            if stopped and not resumed and elapsed >= 10.0:
                victim.proc.send_signal(signal.SIGCONT)
                resumed = True
        sock.shutdown(socket.SHUT_WR)
        lines = reader.join(STREAM_TIMEOUT)
        log = balancer.log()
    assert stopped and resumed
    assert_answers(answers(lines), example_nodes.reference * 3 * rounds)
    assert all(line == FINISHED_LINE or not line.startswith(FINISHED_LINE) for line in lines)
    per_batch = len(batch.splitlines())
    waits = [reader.finished_at[(k + 1) * per_batch - 1] - sent_at[k] for k in range(rounds)]
    worst = max(waits)
    assert worst < 2.5, f"an event waited {worst:.2f} s for its answer (batch {waits.index(worst)})"
    assert re.search(rf"{instance(victim.port)} is suspect: no answer for ", log), log
    assert re.search(rf"{instance(victim.port)}: \d+ unfinished event\(s\) sent again to other instances", log)


def test_an_event_is_re_sent_for_being_overdue_once(tmp_path: Path) -> None:
    """Two stand-in nodes that never answer events (what a "poison pill" event slow everywhere looks
    like): the first is suspect and its events go to the second, which is then left to ReplyTimeout
    instead of being made suspect in turn (no ping-pong that would take every instance out)."""
    a, b = FakeNode(), FakeNode()
    try:
        health = '<HealthCheck interval="1" timeout="10" rise="1" fall="3"/>'
        with (
            balancer_for(
                tmp_path / "kl_balancer.conf", [a.port, b.port], health=health, extra="<ReplyTimeout>4</ReplyTimeout>"
            ) as balancer,
            socket.create_connection(("127.0.0.1", balancer.port), timeout=30) as sock,
        ):
            sock.sendall(REPLY_FLAGS + b"1 slow everywhere\n")
            first = balancer.wait_for_log(r"instance (127\.0\.0\.1:\d+) is suspect: no answer for ")[1]
            other = f"127.0.0.1:{b.port if first.endswith(f':{a.port}') else a.port}"
            balancer.wait_for_log(rf"instance {re.escape(other)} is DOWN: no answer for 4 s", timeout=30)
            assert balancer.log().count("is suspect") == 1, balancer.log()
    finally:
        a.close()
        b.close()


# -- items 5 and 13: no instance at all ---------------------------------------------------------------------


def test_with_no_instance_events_wait_then_get_an_error_finished_line(tmp_path: Path) -> None:
    """No node UP: the balancer says so at WARNING (and again at a bounded rate), and with MaxEventWait an
    event that waited that long is answered with ``LookupFinished error=no_instance`` (counted) instead of
    silence; PING is still answered."""
    nodes_ports = free_ports(2)  # nothing listens on them: the point of the test
    path = balancer_config(
        tmp_path / "kl_balancer.conf",
        instances=nodes_ports,
        extra="<MaxEventWait>2</MaxEventWait><MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
    )
    with running_balancer(path) as balancer:
        port, metrics_port = balancer.port, balancer.metrics_port
        balancer.wait_for_log(r"WAR threatgate\.balancer: no instance available \(none UP\): \d+ event\(s\) wait")
        started = time.monotonic()
        lines = stream(port, REPLY_FLAGS + b"1 " + URL_HIT + b"\n2 nothing here\n", timeout=30)
        waited = time.monotonic() - started
        assert lines == ["LookupFinished error=no_instance waited=2s"] * 2
        assert 1.5 <= waited < 10
        assert exchange(port, PING) == b"PONG"
        balancer.wait_for_log(r"2 event\(s\) waited 2 s \(MaxEventWait\) with no instance UP")
        assert metric(metrics_port, "threatgate_balancer_unmatched_events_total", 'reason="max_event_wait"') == 2


def test_events_of_a_lost_instance_are_said_to_wait_when_no_other_is_up(
    example_nodes: Examples, tmp_path: Path
) -> None:  # noqa: F811
    """The only node is killed while it holds events: the log says they wait (not "sent again to other
    instances", which there are none of); when a node comes back they are answered."""
    port = free_ports(1)[0]  # named in the config: the node started again comes back on the same port
    config = example_config(tmp_path / "n", port=port)
    with nodes((config, port)) as (node,), balancer_for(tmp_path / "kl_balancer.conf", [port]) as balancer:
        with client(balancer.port, timeout=60) as (_, reader, writer):
            writer.send(REPLY_FLAGS + example_nodes.events * 2000)
            reader.wait_finished(100, timeout=30)
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(10)
            m = balancer.wait_for_log(
                rf"{instance(port)}: (\d+) unfinished event\(s\) wait in the backlog: no other instance available"
            )
            assert int(m[1]) > 0
            balancer.wait_for_log(r"no instance available \(none UP\)")
            with nodes((config, port)):
                balancer.wait_for_log(r"an instance is available again after [\d.]+ s without one")
                writer.shutdown()
                lines = reader.join(60)
    assert_answers(answers(lines), example_nodes.reference * 2000)


# -- item 8: a node missing a feed ---------------------------------------------------------------------------


def test_events_stay_away_from_a_node_that_is_not_ready(example_nodes: Examples, tmp_path: Path) -> None:  # noqa: F811
    """A node started with a truncated feed answers PING but its ``/readyz`` says not ready: the balancer
    logs it once and sends every event to the ready node (every detection present); once the file is
    fixed the node is ready again and gets events."""
    metrics = "<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>"
    configs = [(example_config(tmp_path / f"n{i}", extra_service=metrics if i == 0 else ""), 0) for i in range(2)]
    feed = tmp_path / "n0" / "feeds" / "malicious_urls.json"
    good = feed.read_bytes()
    feed.write_bytes(good[: len(good) // 2])  # truncated: node 0 loads without this feed
    with nodes(*configs) as procs:
        # The balancer's config names the ports the nodes bound (event and API: readiness is polled).
        node_metrics = procs[0].metrics_port
        event_ports = [proc.port for proc in procs]
        path = balancer_config(tmp_path / "kl_balancer.conf", instances=event_ports, extra=metrics)
        text = path.read_text()
        for proc in procs:
            old = f'<Instance matching_port="{proc.port}" '
            text = text.replace(old, f'{old}api_port="{proc.api_port}" ')
        path.write_text(text)
        broken = event_ports[0]
        with running_balancer(path) as balancer:
            port, metrics_port = balancer.port, balancer.metrics_port
            wait_for_log_count(balancer, r"is UP", 2)
            balancer.wait_for_log(
                rf"WAR threatgate\.balancer: {instance(broken)} is not ready \(.*malicious_urls\.json"
            )
            assert metric(metrics_port, "threatgate_balancer_instance_ready", f'instance="127.0.0.1:{broken}"') == 0
            for _ in range(3):
                lines = stream(port, REPLY_FLAGS + example_nodes.events * 50)
                assert_answers(answers(lines), example_nodes.reference * 50)
            assert metric(node_metrics, "threatgate_events_total") == 0  # not one event went to the broken node
            assert balancer.log().count(f"127.0.0.1:{broken} is not ready") == 1
            feed.write_bytes(good)
            balancer.wait_for_log(rf"{instance(broken)} is ready again", timeout=30)
            assert metric(metrics_port, "threatgate_balancer_instance_ready", f'instance="127.0.0.1:{broken}"') == 1


# -- item 7: a balancer started in front of running nodes ---------------------------------------------------


def test_a_balancer_started_in_front_of_running_nodes_serves_at_the_first_check(
    example_nodes: Examples,  # noqa: F811
    tmp_path: Path,
) -> None:
    """With the default checks (rise 2, every 2 s) an instance never checked before is UP at its first
    passing check, so a balancer restart does not answer 503 / hold events for rise x interval."""
    health = '<HealthCheck interval="2" timeout="2" rise="2" fall="3"/>'
    path = balancer_config(tmp_path / "kl_balancer.conf", instances=example_nodes.ports, health=health)
    with running_balancer(path) as balancer:
        port = balancer.port
        wait_for_log_count(balancer, r"instance 127\.0\.0\.1:\d+ is UP \(first health check passed\)", 2, timeout=5)
        lines = stream(port, REPLY_FLAGS + example_nodes.events)
    assert_answers(answers(lines), example_nodes.reference)


# -- item 10: an event that fits a node only without the request id ------------------------------------------


def test_an_event_the_node_would_refuse_after_the_request_id_is_answered_with_an_error(
    example_nodes: Examples,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Node and balancer at the default 1 MiB MaxEventSize: an event 2 bytes short of it matches when sent
    straight to a node ("1 " fits) but not after a longer request id; the balancer answers it with
    ``error=event_too_large`` (counted) instead of forwarding it to be silently unmatched.  An event that
    fits after any id is forwarded and detects."""
    limit = 1024 * 1024

    def event(size: int) -> bytes:
        return URL_HIT + b" " + b"x" * (size - len(URL_HIT) - 1)

    near = event(limit - 2)
    direct = stream(example_nodes.ports[0], REPLY_FLAGS + b"1 " + near + b"\n")
    assert direct == ["1 " + example_nodes.url_hit[0], "1 " + FINISHED_LINE]  # sent straight, it detects
    path = balancer_config(
        tmp_path / "kl_balancer.conf",
        instances=example_nodes.ports,
        extra="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
    )
    with running_balancer(path) as balancer:
        port, metrics_port = balancer.port, balancer.metrics_port
        wait_for_log_count(balancer, r"is UP", 2)
        stream(port, REPLY_FLAGS + b"warm-up\n" * 20)  # request ids of two digits from now on
        lines = stream(port, REPLY_FLAGS + near + b"\n" + event(limit - 20) + b"\n")
        assert lines == [
            f"LookupFinished error=event_too_large size={limit - 2} limit={limit - 3}",
            example_nodes.url_hit[0],
            FINISHED_LINE,
        ]
        balancer.wait_for_log(rf"event of {limit - 2} bytes from 127\.0\.0\.1 not forwarded")
        assert metric(metrics_port, "threatgate_balancer_unmatched_events_total", 'reason="event_too_large"') == 1


# -- item 11: clients that hold slots or never read ------------------------------------------------------------


def test_connections_that_only_send_flags_cannot_lock_out_a_newcomer(example_nodes: Examples, tmp_path: Path) -> None:  # noqa: F811
    """scanners_count connections that sent their flags and nothing else: a newcomer evicts the one idle
    the longest (counted, logged) and is served; with IdleTimeout an idle connection is closed by itself."""
    path = balancer_config(
        tmp_path / "kl_balancer.conf",
        instances=example_nodes.ports,
        scanners_count=3,
        extra="<HandshakeTimeout>1</HandshakeTimeout><IdleTimeout>4</IdleTimeout>"
        "<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
    )
    with running_balancer(path) as balancer:
        port, metrics_port = balancer.port, balancer.metrics_port
        wait_for_log_count(balancer, r"is UP", 2)
        holders = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(3)]
        try:
            for h in holders:
                h.sendall(REPLY_FLAGS + b"\n")
            wait_until(lambda: metric(metrics_port, "threatgate_balancer_clients") == 3, "the 3 holders active")
            time.sleep(1.2)  # the holders are now idle for longer than HandshakeTimeout: evictable
            lines = stream(port, REPLY_FLAGS + example_nodes.events)
            assert_answers(answers(lines), example_nodes.reference)
            balancer.wait_for_log(r"all 3 scanners busy; closed the connection idle the longest")
            assert metric(metrics_port, "threatgate_connections_total", 'outcome="evicted_idle"') == 1
            assert metric(metrics_port, "threatgate_connections_total", 'outcome="rejected_scanners"') == 0
            # The two left are closed by IdleTimeout (4 s): the client sees EOF.
            closed = 0
            for h in holders:
                try:
                    closed += h.recv(1) == b""
                except ConnectionResetError:
                    closed += 1
            assert closed == 3
            assert metric(metrics_port, "threatgate_connections_total", 'outcome="idle_timeout"') == 2
            balancer.wait_for_log(r"closed \d+ event connection\(s\) that sent nothing for 4 s \(IdleTimeout\)")
        finally:
            for h in holders:
                h.close()


def test_a_client_that_never_reads_is_paused_alone(example_nodes: Examples, tmp_path: Path) -> None:  # noqa: F811
    """A client floods events and never reads: past MaxPendingEventsPerClient only that client stops being
    read; another client is served at once and is never paused.  Held back by us (not reading it, its
    answers unread), the flooding client is not "idle": IdleTimeout never closes it."""
    path = balancer_config(
        tmp_path / "kl_balancer.conf",
        instances=example_nodes.ports,
        extra="<MaxPendingEventsPerClient>2000</MaxPendingEventsPerClient><MaxInflightEvents>200</MaxInflightEvents>"
        "<IdleTimeout>2</IdleTimeout>"
        "<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
    )
    flood = REPLY_FLAGS + example_nodes.events * 40_000  # 280,000 events, about 11 MB of answers
    with (
        running_balancer(path) as balancer,
        socket.create_connection(("127.0.0.1", balancer.port), timeout=30) as hog,
    ):
        port, metrics_port = balancer.port, balancer.metrics_port
        wait_for_log_count(balancer, r"is UP", 2)
        hog.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 30
        while sent < len(flood) and time.monotonic() < deadline:  # until the balancer stops reading it
            try:
                sent += hog.send(flood[sent : sent + 65536])
            except BlockingIOError:
                if "not reading it until half are answered" in balancer.log():
                    break
                time.sleep(0.01)
        balancer.wait_for_log(r"client 127\.0\.0\.1 has \d+ unanswered events \(MaxPendingEventsPerClient 2000\)")
        for _ in range(3):
            started = time.monotonic()
            lines = stream(port, REPLY_FLAGS + example_nodes.events, timeout=20)
            assert_answers(answers(lines), example_nodes.reference)
            assert time.monotonic() - started < 5
        assert metric(metrics_port, "threatgate_connections_total", 'outcome="paused_client_limit"') >= 1
        assert "pausing clients" not in balancer.log()
        time.sleep(2.5)  # longer than IdleTimeout since the hog last sent anything the balancer read
        assert metric(metrics_port, "threatgate_connections_total", 'outcome="idle_timeout"') == 0


def test_a_node_closes_idle_connections_but_never_the_balancers(example_nodes: Examples, tmp_path: Path) -> None:  # noqa: F811
    """A node with IdleTimeout 2 s closes a client that sent its flags and nothing else; the balancer's own
    event connection, silent between events, is kept open by its empty keep-alive lines (no DOWN, no
    redispatch) and still answers after the pause."""
    config = example_config(
        tmp_path / "n",
        extra_service="<IdleTimeout>2</IdleTimeout><MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
    )
    with nodes((config, 0)) as [node], balancer_for(tmp_path / "kl_balancer.conf", [node.port]) as balancer:
        port, metrics_port = node.port, node.metrics_port
        with socket.create_connection(("127.0.0.1", port), timeout=20) as idle:
            idle.sendall(REPLY_FLAGS + b"\n")
            started = time.monotonic()
            assert idle.recv(1) == b""  # closed by the node
            assert 1.5 < time.monotonic() - started < 10
        assert metric(metrics_port, "threatgate_connections_total", 'outcome="idle_timeout"') == 1
        time.sleep(3)  # the balancer's connection stays silent for longer than the node's IdleTimeout
        lines = stream(balancer.port, REPLY_FLAGS + example_nodes.events)
        assert_answers(answers(lines), example_nodes.reference)
        log = balancer.log()
        assert "event connection lost" not in log and "is DOWN" not in log, log
        assert metric(metrics_port, "threatgate_connections_total", 'outcome="idle_timeout"') == 1


# -- item 12: memory after a burst ---------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_memory_returns_after_a_backlog_drains(example_nodes: Examples, tmp_path: Path) -> None:  # noqa: F811
    """A burst held by a stopped node (150,000 events wait), then answered: once the backlog has drained
    the balancer's RSS returns to within 10 % of what it was before the burst."""
    config = example_config(tmp_path / "n")
    events = example_nodes.events * 3000  # 21,000 events
    extra = "<MaxPendingEvents>200000</MaxPendingEvents><MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>"
    with (
        nodes((config, 0)) as (node,),
        balancer_for(tmp_path / "kl_balancer.conf", [node.port], extra=extra) as balancer,
    ):
        metrics_port = balancer.metrics_port
        pid = balancer.proc.pid
        for _ in range(3):  # warm up: the allocator and the tables reach their working size
            assert len(answers(stream(balancer.port, REPLY_FLAGS + events, timeout=60))) == 21_000
        before = rss_kib(pid)
        with client(balancer.port, timeout=120) as (_, reader, writer):
            node.proc.send_signal(signal.SIGSTOP)
            try:
                writer.send(REPLY_FLAGS + events * 7)
                writer.shutdown()
                deadline = time.monotonic() + 60
                while metric(metrics_port, "threatgate_balancer_pending") < 140_000:
                    assert time.monotonic() < deadline, "the burst never piled up"
                    time.sleep(0.2)
                peak = rss_kib(pid)
            finally:
                node.proc.send_signal(signal.SIGCONT)
            reader.join(120)
        assert reader.finished == 147_000
        deadline = time.monotonic() + 20
        while rss_kib(pid) > before * 1.10 and time.monotonic() < deadline:
            time.sleep(0.25)
        after = rss_kib(pid)
    assert peak > before * 1.10, (before, peak)  # the burst did cost memory
    assert after <= before * 1.10, f"RSS {before} KiB before the burst, {peak} at its peak, {after} after"
