"""A real ``threatgate balancer`` in front of real ``threatgate node`` processes, talked to as a SIEM does.

What a client of the balancer must see (docs/configuration.md, "Balancer"): for every event it sent, in
the order it sent them, that event's detection lines without the balancer's request id and then, with
``X-KF-SendFinishedEvent``, one ``LookupFinished`` line: exactly what one node would answer, whatever
happens to the nodes behind.  The reference is always a node answering the same events directly.

Every wait is on something observable (a log line, a reply line, a metric) with a deadline; every
process is stopped and every socket closed, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import (
    EXAMPLES,
    FINISHED_LINE,
    HEALTH_FAST,
    REPLY_FLAGS,
    BalancerProcess,
    LineWriter,
    NodeProcess,
    ReplyReader,
    answers_by_request_id,
    answers_in_order,
    balancer_config,
    example_config,
    exchange,
    free_ports,
    read_all,
    read_lines,
    running_balancer,
    socat,
    stream,
    wait_for_log_count,
    wait_until,
)

EVENTS = 200_000
"""Events of the generated stream (``threatgate feeds generate``)."""
STARTUP_TIMEOUT = 60.0
STREAM_TIMEOUT = 120.0
PING = b"X-KF-ReplyBackPING"
URL_HIT = b"url=http://fakess123.nu"  # listed in examples/feeds/malicious_urls.json
Answers = list[tuple[str, ...]]


def instance(port: int) -> str:
    """How the balancer names an instance in its log (a regex)."""
    return rf"instance 127\.0\.0\.1:{port}"


@contextmanager
def nodes(*configs: tuple[Path, int], env: dict[str, str] | None = None) -> Iterator[list[NodeProcess]]:
    """Start nodes in parallel (each loads its feeds), wait until all are READY, stop them all at the end.

    A port 0 in a config is bound by its node: ``proc.port`` is the port it got.
    """
    procs: list[NodeProcess] = []
    try:
        for config, port in configs:
            procs.append(NodeProcess(config, port, env))
        for proc in procs:
            proc.wait_ready(timeout=STARTUP_TIMEOUT)
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@contextmanager
def balancer_for(path: Path, ports: list[int], **options: object) -> Iterator[BalancerProcess]:
    """A balancer in front of ``ports`` (written with :func:`balancer_config`), once every instance is UP.

    Its own ports are 0 (``balancer.port`` is the event port it bound): a SIGHUP rewrite of ``path`` with
    :func:`balancer_config` keeps them so (its ``port`` left at 0).
    """
    balancer_config(path, instances=ports, **options)
    with running_balancer(path) as balancer:
        wait_for_log_count(balancer, r"instance 127\.0\.0\.1:\d+ is UP", len(ports), timeout=STARTUP_TIMEOUT)
        yield balancer


@contextmanager
def client(port: int, timeout: float = STREAM_TIMEOUT) -> Iterator[tuple[socket.socket, ReplyReader, LineWriter]]:
    """A connection with a reader and a writer thread (both end when the socket is shut down or closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        reader = ReplyReader(sock)
        writer = LineWriter(sock)
        try:
            yield sock, reader, writer
        finally:  # on failure too: both threads end before the socket is closed
            with contextlib.suppress(OSError):
                if not reader.eof:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the reader (and a blocked writer) up
            writer.shutdown()
            for thread in (reader, writer):
                with contextlib.suppress(OSError, AssertionError):
                    thread.join(10)


def assert_answers(got: Answers, want: Answers) -> None:
    """Event by event, in order: the same detection lines (the first differences shown)."""
    assert len(got) == len(want), f"{len(got)} answers for {len(want)} events"
    wrong = [n for n, (g, w) in enumerate(zip(got, want, strict=True), 1) if g != w]
    shown = "\n".join(f"event {n}: got {got[n - 1]!r}, want {want[n - 1]!r}" for n in wrong[:5])
    assert not wrong, f"{len(wrong)} event(s) answered wrongly:\n{shown}"


# -- the generated stream: 200,000 events, their reference answers from one node --------------------------------


@dataclass
class Dataset:
    dir: Path
    events: bytes  # events.txt: "<n> CEF:..." for n = 1..EVENTS
    offsets: list[int]  # offsets[i] is where event i + 1 starts; offsets[EVENTS] == len(events)
    reference: Answers  # reference[i]: the detections of event i + 1 from a node, without the request id
    ping_lags: list[int]  # events the node answered while a PING sent during that run waited for its PONG

    def chunk(self, start: int, stop: int) -> bytes:
        """Events ``start + 1`` to ``stop`` (0-based, half-open, like a slice)."""
        return self.events[self.offsets[start] : self.offsets[stop]]

    def node_config(self, port: int = 0, metrics_port: int | None = None, workers: int = 1) -> Path:
        """The generated node.conf (feeds next to it) with event port ``port``, metrics on ``metrics_port``,
        ``workers`` worker processes (1: one process, as these tests were written for).  Port 0 (the
        default; metrics too): bound by the node, read from its READY (``NodeProcess.port``, ``metrics_port``)."""
        text = (self.dir / "node.conf").read_text()
        old = "<ConnectionString>127.0.0.1:9999</ConnectionString>"
        assert text.count(old) == 1
        text = text.replace(old, f"<ConnectionString>127.0.0.1:{port}</ConnectionString>")
        text = text.replace(
            "</Configuration>", f"<ScanSettings><Workers>{workers}</Workers></ScanSettings></Configuration>"
        )
        if metrics_port is not None:
            text = text.replace(
                "</Configuration>",
                f"  <ServiceSettings><MetricsConnectionString>127.0.0.1:{metrics_port}</MetricsConnectionString>"
                "</ServiceSettings>\n</Configuration>",
            )
        path = self.dir / f"node-{port}.conf"
        n = 1
        while port == 0 and path.exists():  # one file per node: several share port 0
            n += 1
            path = self.dir / f"node-0-{n}.conf"
        path.write_text(text)
        return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """``threatgate feeds generate`` output, and every event's answer when sent straight to one node."""
    out = tmp_path_factory.mktemp("generated")
    result = subprocess.run(
        [sys.executable, "-m", "threatgate", "feeds", "generate", "--out", str(out), "--indicators", "20000"]
        + ["--events", str(EVENTS), "--hit-rate", "0.3", "--seed", "1", "--port", "9999"],
        capture_output=True,
        text=True,
        timeout=STREAM_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    hits = int(re.search(r"\((\d+) hits\)", result.stdout)[1])  # type: ignore[index]
    events = (out / "events.txt").read_bytes()
    offsets = [0]
    find = events.find
    while len(offsets) <= EVENTS:
        offsets.append(find(b"\n", offsets[-1]) + 1)
    assert offsets[-1] == len(events) and events.startswith(b"1 CEF:")
    # The reference: the same events straight to one node (numbered 1..EVENTS, so REQ is the event number).
    # Meanwhile, health checks as the balancer sends them: how many events pass before each PONG.
    data = Dataset(out, events, offsets, [], [])
    with nodes((data.node_config(), 0)) as [node], client(node.port) as (_, reader, writer):
        port = node.port
        writer.send(REPLY_FLAGS + events)
        writer.shutdown()
        for n in range(5):
            reader.wait_finished(10_000 + n * 30_000, timeout=STREAM_TIMEOUT)
            before = reader.finished
            assert exchange(port, PING) == b"PONG"
            data.ping_lags.append(reader.finished - before)
        lines = reader.join(STREAM_TIMEOUT)
    data.reference = answers_by_request_id(lines, EVENTS)
    # The reference is not trivially empty: it detects exactly what the generator promised (expected.txt).
    expected = dict(line.split(" ") for line in (out / "expected.txt").read_text().splitlines())
    assert len(expected) == hits > EVENTS // 5
    for n, answer in enumerate(data.reference, 1):
        categories = [re.match(r"category=(\S+) ", line)[1] for line in answer]  # type: ignore[index]
        assert categories == ([expected[str(n)]] if str(n) in expected else []), (n, answer)
    return data


def metric_events(metrics_port: int) -> int:
    """``threatgate_events_total`` of a node: how many events it has matched."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        body = response.read().decode()
    m = re.search(r"^threatgate_events_total (\S+)$", body, re.M)
    return int(float(m[1])) if m else 0


SLOW_NODES = {"THREATGATE_ENGINE": "reference"}
"""Nodes on the reference matcher (same answers, a tenth of the speed), where a test needs events still in
flight when it acts: the compiled engine answers the 27,000 events left of a 30,000-event chunk in about
0.1 s, so a SIGHUP or a SIGKILL could find nothing left to send again."""


@pytest.mark.timeout(300)
def test_node_killed_mid_stream_every_detection_exactly_once(dataset: Dataset, tmp_path: Path) -> None:
    """200,000 events through 2 nodes; one is SIGKILLed halfway; each event's answer arrives once, as from one node."""
    with (
        nodes(*[(dataset.node_config(), 0) for _ in range(2)], env=SLOW_NODES) as (victim, survivor),
        balancer_for(tmp_path / "kl_balancer.conf", [victim.port, survivor.port]) as balancer,
        client(balancer.port) as (_, reader, writer),
    ):
        writer.send(REPLY_FLAGS + dataset.events)
        writer.shutdown()  # half-closed: the balancer answers everything, then closes
        reader.wait_finished(EVENTS // 2, timeout=STREAM_TIMEOUT)
        mark = balancer.log_offset()
        victim.proc.kill()
        assert victim.proc.wait(10) == -9
        balancer.wait_for_log(rf"{instance(victim.port)} is DOWN: ", after=mark)
        redispatched = balancer.wait_for_log(
            rf"{instance(victim.port)}: (\d+) unfinished event\(s\) sent again to other instances", after=mark
        )
        assert int(redispatched[1]) > 0
        writer.join(STREAM_TIMEOUT)
        lines = reader.join(STREAM_TIMEOUT)
        assert survivor.proc.poll() is None and balancer.proc.poll() is None
    assert lines.count(FINISHED_LINE) == EVENTS
    assert_answers(answers_in_order(lines), dataset.reference)
    assert sum(map(len, dataset.reference)) == len(lines) - EVENTS  # and not one detection line more


def test_a_node_busy_with_a_stream_answers_health_checks_at_once(dataset: Dataset) -> None:
    """A PING to a node matching a saturating stream is answered after a few reads of that stream.

    Counted in events, not seconds, so machine load does not matter.  uvloop reads a busy socket up to 32
    times (8 MiB) per loop iteration and each read is matched at once: PONG came ~100,000 events (seconds)
    later, and the balancer's health checks marked both healthy nodes DOWN under load (redispatching
    40,000 events each time).  The event port now yields to the loop after every large read.
    """
    assert len(dataset.ping_lags) == 5
    assert max(dataset.ping_lags) < 20_000, dataset.ping_lags


@pytest.mark.timeout(300)
def test_disable_and_enable_an_instance_with_sighup_under_load(dataset: Dataset, tmp_path: Path) -> None:
    """SIGHUP with ``enabled="false"``: the instance gets nothing more, its unfinished events go elsewhere;
    an invalid file is refused and the running configuration kept; enabled again it is UP and serves."""
    config = tmp_path / "kl_balancer.conf"
    cuts = [0, 30_000, 40_000, 45_000, 75_000, 80_000]
    with (
        nodes(*[(dataset.node_config(0, 0), 0) for _ in range(2)], env=SLOW_NODES) as (a, b),
        balancer_for(config, [a.port, b.port]) as balancer,
        client(balancer.port) as (_, reader, writer),
    ):
        ports, metrics = [a.port, b.port], [a.metrics_port, b.metrics_port]
        writer.send(REPLY_FLAGS + dataset.chunk(cuts[0], cuts[1]))
        reader.wait_finished(3_000, timeout=STREAM_TIMEOUT)
        # Disable a while both instances hold events.
        mark = balancer.log_offset()
        balancer_config(config, instances=ports, disabled=(a.port,))
        balancer.signal(signal.SIGHUP)
        balancer.wait_for_log(rf"{instance(a.port)} disabled \(MAINT\)", after=mark)
        balancer.wait_for_log(r"configuration reloaded from ", after=mark)
        moved = balancer.wait_for_log(
            rf"{instance(a.port)}: (\d+) unfinished event\(s\) sent again to other instances \(disabled\)", after=mark
        )
        assert int(moved[1]) > 0
        reader.wait_finished(cuts[1], timeout=STREAM_TIMEOUT)
        a_matched = metric_events(metrics[0])
        assert 0 < a_matched < cuts[1]
        writer.send(dataset.chunk(cuts[1], cuts[2]))
        reader.wait_finished(cuts[2], timeout=STREAM_TIMEOUT)
        assert metric_events(metrics[0]) == a_matched  # disabled: not one event more
        # An invalid file (that would enable it) is refused: the running configuration stays.
        mark = balancer.log_offset()
        balancer_config(config, instances=ports, extra="<Bogus/>")
        balancer.signal(signal.SIGHUP)
        refused = balancer.wait_for_log(r"configuration not reloaded, keeping the running one: (.*)", after=mark)
        assert refused[1].startswith(f"{config}:") and "<Bogus>: unknown element" in refused[1]
        writer.send(dataset.chunk(cuts[2], cuts[3]))
        reader.wait_finished(cuts[3], timeout=STREAM_TIMEOUT)
        assert metric_events(metrics[0]) == a_matched
        assert "configuration reloaded" not in balancer.log()[mark:]
        # Enabled again (and rise="2" now): health checks bring it UP and it gets events again.
        mark = balancer.log_offset()
        balancer_config(config, instances=ports, health=HEALTH_FAST.replace('rise="1"', 'rise="2"'))
        balancer.signal(signal.SIGHUP)
        balancer.wait_for_log(rf"{instance(a.port)} enabled; UP after 2 health checks", after=mark)
        balancer.wait_for_log(rf"{instance(a.port)} is UP \(2 checks passed\)", after=mark)
        writer.send(dataset.chunk(cuts[3], cuts[4]))
        deadline = time.monotonic() + STREAM_TIMEOUT
        while metric_events(metrics[0]) == a_matched:
            assert time.monotonic() < deadline, "the enabled instance gets no events"
            assert reader.finished < cuts[4], "every event answered, none by the enabled instance"
            time.sleep(0.05)
        # And it serves alone once the other one is gone (events sent to the dead one are sent again).
        b.proc.kill()
        b.proc.wait(10)
        writer.send(dataset.chunk(cuts[4], cuts[5]))
        writer.shutdown()
        lines = reader.join(STREAM_TIMEOUT)
        assert a.proc.poll() is None and balancer.proc.poll() is None
        assert re.search(rf"{instance(b.port)} is DOWN: ", balancer.log())
    assert lines.count(FINISHED_LINE) == cuts[-1]
    assert_answers(answers_in_order(lines), dataset.reference[: cuts[-1]])


def instance_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``threatgate balancer instance ARGS --config CONFIG``, as an operator types it."""
    return subprocess.run(
        [sys.executable, "-m", "threatgate", "balancer", "instance", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.timeout(300)
def test_drain_disable_and_enable_at_run_time_under_load(dataset: Dataset, tmp_path: Path) -> None:
    """The admin socket (``threatgate balancer instance``): a drained instance answers what it holds and gets
    nothing more, a disabled one's events go elsewhere, enabled it serves again; every event answered once."""
    picked = free_ports(4)
    ports, metrics = picked[:2], picked[2:]
    config = tmp_path / "kl_balancer.conf"
    cuts = [0, 30_000, 40_000, 70_000, 80_000]
    with (
        nodes(*[(dataset.node_config(p, m), p) for p, m in zip(ports, metrics, strict=True)], env=SLOW_NODES) as (a, b),
        balancer_for(config, ports) as balancer,
        client(balancer.port) as (_, reader, writer),
    ):
        sock = tmp_path / "kl_balancer.sock"
        assert sock.is_socket() and sock.stat().st_mode & 0o777 == 0o600
        key = f"127.0.0.1:{a.port}"
        writer.send(REPLY_FLAGS + dataset.chunk(cuts[0], cuts[1]))
        reader.wait_finished(3_000, timeout=STREAM_TIMEOUT)
        # Drain a while both hold events: it finishes them (none is sent again), then it is MAINT.
        mark = balancer.log_offset()
        drained = instance_cli(config, "drain", key)
        assert drained.returncode == 0, drained.stderr
        assert re.fullmatch(rf"{key}: (DRAIN \(draining \(\d+ event\(s\) in flight\)\)|MAINT.*)\n", drained.stdout)
        balancer.wait_for_log(rf"{instance(a.port)} drained: MAINT", after=mark)
        listed = json.loads(instance_cli(config, "list", "--json").stdout)
        row = next(r for r in listed["instances"] if r["instance"] == key)
        assert (row["state"], row["why"], row["redispatched"], row["lanes"]) == ("MAINT", "drained at run time", 0, 0)
        shown = subprocess.run(
            [sys.executable, "-m", "threatgate", "balancer", "status", "--config", str(config), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        states = {i["instance"]: i["balancer"] for i in json.loads(shown.stdout)["instances"]}
        assert states[key] == "MAINT (drained at run time)", shown.stdout  # balancer status shows it too
        a_matched = metric_events(metrics[0])
        reader.wait_finished(cuts[1], timeout=STREAM_TIMEOUT)
        writer.send(dataset.chunk(cuts[1], cuts[2]))
        reader.wait_finished(cuts[2], timeout=STREAM_TIMEOUT)
        assert metric_events(metrics[0]) == a_matched  # drained: not one event more
        # Enabled: UP after its health checks, and it gets events again.
        mark = balancer.log_offset()
        assert instance_cli(config, "enable", key).returncode == 0
        balancer.wait_for_log(rf"{instance(a.port)} is UP", after=mark)
        writer.send(dataset.chunk(cuts[2], cuts[3]))
        wait_until(lambda: metric_events(metrics[0]) > a_matched, "the enabled instance gets events")
        # Disabled while it holds events: they are sent to the other one at once.
        mark = balancer.log_offset()
        disabled = instance_cli(config, "disable", key)
        assert disabled.returncode == 0 and disabled.stdout == f"{key}: MAINT (disabled at run time)\n"
        balancer.wait_for_log(rf"{instance(a.port)} disabled at run time \(MAINT\)", after=mark)
        # A command for an instance the balancer does not have is refused, and says which it has.
        unknown = instance_cli(config, "drain", "127.0.0.1:1")
        assert unknown.returncode == 1 and "no instance 127.0.0.1:1 (instances: " in unknown.stderr
        writer.send(dataset.chunk(cuts[3], cuts[4]))
        writer.shutdown()
        lines = reader.join(STREAM_TIMEOUT)
        assert a.proc.poll() is None and b.proc.poll() is None and balancer.proc.poll() is None
    assert lines.count(FINISHED_LINE) == cuts[-1]
    assert_answers(answers_in_order(lines), dataset.reference[: cuts[-1]])
    assert not sock.exists()  # removed at shutdown


# -- the example nodes: small, hand-made cases ---------------------------------------------------------------


@dataclass
class Examples:
    ports: list[int]
    events: bytes  # examples/events.txt: 7 events
    reference: Answers  # their answers from one node
    url_hit: tuple[str, ...]  # a node's answer to "<n> url=http://fakess123.nu"


@pytest.fixture(scope="module")
def example_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Examples]:
    """Two nodes on the example config and feeds, and the answers one of them gives to examples/events.txt."""
    configs = [(example_config(tmp_path_factory.mktemp(f"node{i}")), 0) for i in range(2)]
    events = (EXAMPLES / "events.txt").read_bytes()
    with nodes(*configs) as procs:
        ports = [proc.port for proc in procs]
        reference = answers_by_request_id(stream(ports[0], REPLY_FLAGS + events), 7)
        assert len(reference[0]) >= 1 and reference[5] == ()  # some detect, some do not
        [url_hit] = answers_by_request_id(stream(ports[0], REPLY_FLAGS + b"1 " + URL_HIT + b"\n"), 1)
        assert len(url_hit) == 1 and "matchedIndicator=http://fakess123.nu " in url_hit[0]
        yield Examples(ports, events, reference, url_hit)


@pytest.fixture(scope="module")
def example_balancer(example_nodes: Examples, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BalancerProcess]:
    """A balancer in front of the example nodes, with a small MaxEventSize."""
    path = tmp_path_factory.mktemp("balancer") / "kl_balancer.conf"
    with balancer_for(path, example_nodes.ports, extra="<MaxEventSize>1024</MaxEventSize>") as balancer:
        yield balancer


def direct(example_nodes: Examples, payload: bytes, count: int) -> Answers:
    """A node's answers to ``payload`` (``count`` events numbered 1..count) sent straight to it."""
    return answers_by_request_id(stream(example_nodes.ports[0], REPLY_FLAGS + payload), count)


def test_events_through_the_balancer_with_socat(example_nodes: Examples, example_balancer: BalancerProcess) -> None:
    """socat as the client: flags without newline, then events; half-closed by socat at the end of its input."""
    payload = REPLY_FLAGS + example_nodes.events * 50
    result = subprocess.run(
        [socat(), "-t", "30", "-", f"TCP:127.0.0.1:{example_balancer.port}"],
        input=payload,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    answers = answers_in_order(result.stdout.decode().splitlines())
    assert_answers(answers, example_nodes.reference * 50)
    assert any(line.startswith("category=Malicious_URL matchedIndicator=http://fakess123.nu") for line in answers[0])


def test_a_balancer_bound_to_port_0_reports_its_ports_at_ready(example_balancer: BalancerProcess) -> None:
    """Every listening port written 0 is picked at bind, sent with READY=1 and logged as in use."""
    bound = example_balancer.bound
    assert set(bound) == {"events", "api", "alerts"} and len({port for _, port in bound.values()}) == 3
    assert all(host == "127.0.0.1" and port > 0 for host, port in bound.values()), bound
    log = example_balancer.log()
    assert f"balancer listening for events on 127.0.0.1:{example_balancer.port} " in log
    assert f"REST gateway listening on https://127.0.0.1:{bound['api'][1]}\n" in log
    assert f"listening for service alerts on 127.0.0.1:{bound['alerts'][1]}\n" in log


def test_ping_through_the_balancer(example_balancer: BalancerProcess) -> None:
    result = subprocess.run(
        [socat(), "-t", "5", "-", f"TCP:127.0.0.1:{example_balancer.port}"], input=PING, capture_output=True, timeout=20
    )
    assert result.stdout == b"PONG"
    assert exchange(example_balancer.port, PING) == b"PONG"


def test_the_session_flags_decide_what_comes_back(example_nodes: Examples, example_balancer: BalancerProcess) -> None:
    """ReplyBack alone: detections without LookupFinished.  No flags (and no OutputConnectionString): nothing
    comes back, the detections are dropped, and the half-closed connection is still closed when done."""
    port = example_balancer.port
    detections = [line for answer in example_nodes.reference for line in answer]
    assert exchange(port, b"X-KF-ReplyBack" + example_nodes.events).decode().splitlines() == detections
    assert exchange(port, example_nodes.events) == b""
    example_balancer.wait_for_log(r"no <OutputConnectionString>: \d+ line\(s\) dropped")
    assert answers_in_order(exchange(port, REPLY_FLAGS + example_nodes.events).decode().splitlines()) == (
        example_nodes.reference
    )


def test_scanners_count_refuses_the_next_connection(example_nodes: Examples, tmp_path: Path) -> None:
    """scanners_count="2": a third event connection is closed without data, PING is still answered, a freed
    slot is taken by the next client, and the two holders keep being served."""
    with balancer_for(tmp_path / "kl_balancer.conf", example_nodes.ports, scanners_count=2) as balancer:
        port = balancer.port
        with (
            socket.create_connection(("127.0.0.1", port), timeout=20) as first,
            socket.create_connection(("127.0.0.1", port), timeout=20) as second,
        ):
            for s in (first, second):
                s.sendall(REPLY_FLAGS + b"1 hello\n")
                assert read_lines(s, 1) == [FINISHED_LINE]
            with socket.create_connection(("127.0.0.1", port), timeout=20) as third:
                third.sendall(REPLY_FLAGS + b"1 " + URL_HIT + b"\n")
                assert read_all(third) == b""
            balancer.wait_for_log(r"all 2 scanners busy; refusing event connection from 127\.0\.0\.1")
            assert exchange(port, PING) == b"PONG"
            second.sendall(b"2 " + URL_HIT + b"\n")
            assert answers_in_order(read_lines(second, 2)) == [example_nodes.url_hit]
            first.close()
            # The freed slot is taken by the next client once the balancer has seen the close (bounded retry).
            deadline = time.monotonic() + 20
            while True:
                reply = exchange(port, REPLY_FLAGS + b"3 " + URL_HIT + b"\n")
                if reply:
                    break
                assert time.monotonic() < deadline, "the slot of a closed client is never freed"
                time.sleep(0.05)
            assert answers_in_order(reply.decode().splitlines()) == [example_nodes.url_hit]
            second.sendall(b"4 hello\n")
            assert read_lines(second, 1) == [FINISHED_LINE]


# -- hostile clients ---------------------------------------------------------------------------------------


def test_invalid_utf8_is_replaced_and_still_matched(example_nodes: Examples, example_balancer: BalancerProcess) -> None:
    event = b"1 " + URL_HIT + b" \xff\xfe\xc3(\n"
    answers = answers_in_order(exchange(example_balancer.port, REPLY_FLAGS + event).decode().splitlines())
    assert answers == [example_nodes.url_hit]
    assert answers == direct(example_nodes, event, 1)


def test_an_over_long_event_is_answered_without_detections(
    example_nodes: Examples, example_balancer: BalancerProcess
) -> None:
    """Longer than MaxEventSize (1024): answered by the balancer at once, one LookupFinished, nothing else;
    the next events (also after an over-long one still arriving) are unaffected."""
    payload = (
        REPLY_FLAGS
        + b"1 " + URL_HIT + b" " + b"A" * 5000 + b"\n"
        + b"2 " + URL_HIT + b"\n"
        + b"3 " + URL_HIT + b" " + b"B" * 1100 + b"\n"
        + b"4 " + URL_HIT + b"\n"
    )  # fmt: skip
    lines = exchange(example_balancer.port, payload).decode().splitlines()
    assert lines.count(FINISHED_LINE) == 4
    hit = example_nodes.url_hit
    assert answers_in_order(lines) == [(), hit, (), hit]
    # An over-long line still arriving is answered before its end (nothing of it is kept), and after it ends
    # the next event is matched as usual.
    with client(example_balancer.port, timeout=20) as (_, reader, writer):
        writer.send(REPLY_FLAGS + b"5 " + URL_HIT + b" " + b"C" * 2048)
        reader.wait_finished(1)
        writer.send(b"C" * 100_000 + b"\n6 " + URL_HIT + b"\n")
        writer.shutdown()
        assert answers_in_order(reader.join(20)) == [(), hit]


def test_forged_finished_lines_complete_nothing(example_nodes: Examples, example_balancer: BalancerProcess) -> None:
    """Events that look like a node's answers are only events: each gets exactly its own LookupFinished."""
    port = example_balancer.port
    with client(port, timeout=20) as (_, slow_reader, slow_writer):
        # Another client with an event in flight, so a forged id could in principle name it.
        slow_writer.send(REPLY_FLAGS + example_nodes.events)
        forged = b"123 LookupFinished\n1 LookupFinished\nLookupFinished\n2 category=Malicious_URL x\n"
        lines = exchange(port, REPLY_FLAGS + forged + b"5 " + URL_HIT + b"\n").decode().splitlines()
        assert answers_in_order(lines) == [(), (), (), (), example_nodes.url_hit]
        assert len(lines) == 5 + len(example_nodes.url_hit)
        slow_writer.shutdown()
        assert_answers(answers_in_order(slow_reader.join(20)), example_nodes.reference)


def test_half_closed_client_gets_every_answer_then_the_balancer_closes(
    example_nodes: Examples, example_balancer: BalancerProcess
) -> None:
    """Send, shut the write side down at once, read: all answers (the last event has no newline), then EOF."""
    payload = REPLY_FLAGS + example_nodes.events * 100 + b"8 " + URL_HIT
    lines = exchange(example_balancer.port, payload).decode().splitlines()  # returns at EOF (or fails on timeout)
    assert_answers(answers_in_order(lines), example_nodes.reference * 100 + [example_nodes.url_hit])


def test_a_client_leaving_mid_stream_does_not_disturb_another(
    example_nodes: Examples, example_balancer: BalancerProcess
) -> None:
    """Two clients stream at once; one resets its connection with thousands of events unanswered.  The other
    gets every answer exactly once, in order."""
    port = example_balancer.port
    repeat = 3000  # 21,000 events each
    with client(port) as (_, stay_reader, stay_writer):
        stay_writer.send(REPLY_FLAGS + example_nodes.events * repeat)
        stay_writer.shutdown()
        with socket.create_connection(("127.0.0.1", port), timeout=STREAM_TIMEOUT) as leaver:
            leave_reader = ReplyReader(leaver)
            leaver.sendall(REPLY_FLAGS + example_nodes.events * repeat)  # read by the balancer at once
            leave_reader.wait_finished(1_000)
            stay_reader.wait_finished(1_000)
            leaver.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            leaver.shutdown(socket.SHUT_RD)  # ends our reader thread; nothing is sent
            leave_reader.join(10)
            mark = example_balancer.log_offset()
            assert stay_reader.finished < 7 * repeat
        # Closed with linger 0: a reset, not an EOF.
        left = example_balancer.wait_for_log(
            r"client 127\.0\.0\.1 left with (\d+) event\(s\) unanswered; their answers will be discarded", after=mark
        )
        assert int(left[1]) > 0
        lines = stay_reader.join(STREAM_TIMEOUT)
    assert_answers(answers_in_order(lines), example_nodes.reference * repeat)
    assert example_balancer.proc.poll() is None


# -- no healthy node ---------------------------------------------------------------------------------------


def test_events_wait_for_a_node_and_are_answered_when_one_comes_up(example_nodes: Examples, tmp_path: Path) -> None:
    """Balancer first, no node: events wait (the backlog is bounded: past MaxPendingEvents the client is no
    longer read) and PING is answered; the first node that comes UP answers them all, in order."""
    ports = free_ports(2)  # nothing listens on them yet (the point): the node started later takes ports[1]
    path = balancer_config(
        tmp_path / "kl_balancer.conf", instances=ports, extra="<MaxPendingEvents>5</MaxPendingEvents>"
    )
    events = example_nodes.events
    with running_balancer(path) as balancer, client(balancer.port, timeout=60) as (_, reader, writer):
        port = balancer.port
        writer.send(REPLY_FLAGS + events)
        balancer.wait_for_log(r"\d+ events wait for an instance \(MaxPendingEvents 5\): pausing clients")
        writer.send(events * 20)  # not read for now: stays in the socket buffers
        writer.shutdown()
        assert exchange(port, PING) == b"PONG"
        assert reader.finished == 0 and not reader.lines
        assert "is UP" not in balancer.log()
        node_dir = tmp_path / "node"
        node_dir.mkdir()
        with nodes((example_config(node_dir, port=ports[1]), ports[1])):
            balancer.wait_for_log(rf"{instance(ports[1])} is UP")
            lines = reader.join(60)
        assert balancer.proc.poll() is None
        balancer.wait_for_log(r"under half of MaxPendingEvents 5\): 1 client\(s\) resumed")
    assert_answers(answers_in_order(lines), example_nodes.reference * 21)


# -- health checks racing a reload -------------------------------------------------------------------------


class FakeNode:
    """A stand-in node on threads: answers PING with PONG (or holds the PONG while ``hold`` is set) and
    swallows event connections.  For what a real node cannot be made to do on cue: answer a check late."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.hold = threading.Event()  # set: the next PING waits for ``release``
        self.held = threading.Event()  # a PING is being held
        self.release = threading.Event()
        self.held_ping_closed = threading.Event()  # the balancer closed the held PING after its PONG
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(20)
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            first = b""
            while len(first) < len(PING) and PING.startswith(first):
                data = conn.recv(64)
                if not data:
                    return
                first += data
            if first == PING:
                held = self.hold.is_set()
                if held:
                    self.held.set()
                    self.release.wait(20)
                conn.sendall(b"PONG")
            while conn.recv(65536):  # an event connection (never answered), or the end of a PING
                pass
            if first == PING and held:
                self.held_ping_closed.set()

    def close(self) -> None:
        self._stop.set()
        self.release.set()
        self._threads[0].join(10)  # no new connection after this
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads[1:]:
            thread.join(10)
        for conn in self._conns:
            conn.close()
        self.server.close()


def test_a_health_check_answered_after_the_instance_was_disabled_does_not_count(tmp_path: Path) -> None:
    """A PONG arriving after SIGHUP disabled the instance is stale: no "is UP" for a disabled instance, and
    enabled again it needs ``rise`` fresh checks (and says so) before it gets events."""
    fake = FakeNode()
    config = tmp_path / "kl_balancer.conf"
    slow_checks = '<HealthCheck interval="1" timeout="10" rise="1" fall="1"/>'
    try:
        with balancer_for(config, [fake.port], health=slow_checks) as balancer:
            fake.hold.set()
            assert fake.held.wait(20), "no health check"
            mark = balancer.log_offset()
            balancer_config(config, instances=[fake.port], disabled=(fake.port,), health=slow_checks)
            balancer.signal(signal.SIGHUP)
            balancer.wait_for_log(rf"{instance(fake.port)} disabled \(MAINT\)", after=mark)
            fake.hold.clear()
            fake.release.set()
            assert fake.held_ping_closed.wait(20)  # the balancer has read the late PONG
            assert "is UP" not in balancer.log()[mark:]
            mark = balancer.log_offset()
            balancer_config(config, instances=[fake.port], health=slow_checks.replace('rise="1"', 'rise="2"'))
            balancer.signal(signal.SIGHUP)
            balancer.wait_for_log(rf"{instance(fake.port)} enabled; UP after 2 health checks", after=mark)
            balancer.wait_for_log(rf"{instance(fake.port)} is UP \(2 checks passed\)", after=mark)
            balancer.wait_for_log(rf"{instance(fake.port)}: event connection open", after=mark)
    finally:
        fake.close()


def test_a_hung_node_is_taken_out_and_its_events_answered_by_another(example_nodes: Examples, tmp_path: Path) -> None:
    """A node that answers PING but never answers events: overdue ``fall`` times (here 1, and ReplyTimeout
    1 s) it is DOWN and the events it held are answered by the other node, exactly once and in order."""
    fake = FakeNode()
    try:
        with (
            balancer_for(
                tmp_path / "kl_balancer.conf",
                [fake.port, example_nodes.ports[0]],
                extra="<ReplyTimeout>1</ReplyTimeout>",
            ) as balancer,
            client(balancer.port, timeout=60) as (_, reader, writer),
        ):
            writer.send(REPLY_FLAGS + example_nodes.events * 10)
            writer.shutdown()
            lines = reader.join(60)
            balancer.wait_for_log(rf"{instance(fake.port)} is DOWN: no answer to events for 1\.\d s \(overdue 1 time")
            moved = balancer.wait_for_log(rf"{instance(fake.port)}: (\d+) unfinished event\(s\) sent again")
            assert int(moved[1]) > 0
    finally:
        fake.close()
    assert_answers(answers_in_order(lines), example_nodes.reference * 10)
