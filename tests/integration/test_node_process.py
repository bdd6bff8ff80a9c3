"""A real ``threatgate node`` process, talked to over TCP exactly as CyberTrace clients do."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    EXAMPLES,
    NodeProcess,
    example_config,
    exchange,
    read_all,
    read_lines,
    running_node,
    socat,
)

FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    config = example_config(
        tmp_path,
        extra_service="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
        input_extra="<MaxEventSize>4096</MaxEventSize>",
    )
    with running_node(config) as proc:
        yield proc


def metric(node: NodeProcess, name: str, label: str = "") -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(name + ("{" + label + "}" if label else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def by_event(lines: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in lines:
        req, _, rest = line.partition(" ")
        out.setdefault(req, []).append(rest)
    return out


def test_node_answers_flags_and_events_with_socat(node: NodeProcess) -> None:
    """Flags without newline, then events: detections then exactly one LookupFinished per event, in order."""
    payload = FLAGS + (EXAMPLES / "events.txt").read_bytes()
    result = subprocess.run(
        [socat(), "-t", "5", "-", f"TCP:127.0.0.1:{node.port}"], input=payload, capture_output=True, timeout=20
    )
    lines = result.stdout.decode().splitlines()
    events = by_event(lines)
    assert list(events) == ["1", "2", "3", "4", "5", "6", "7"]
    for req, replies in events.items():
        assert replies[-1] == "LookupFinished", (req, replies)
        assert replies.count("LookupFinished") == 1
    assert any("category=Malicious_URL matchedIndicator=http://fakess123.nu" in r for r in events["1"])
    assert any("matchedIndicator=203.0.113.0/24" in r for r in events["2"])
    assert any("matchedIndicator=*.evil-cdn.example/payload/*" in r for r in events["3"])
    assert not any("Adware" in r for r in events["5"])  # FalsePositive suppresses the feed detection ...
    assert any("category=InternalTI" in r and "campaign 42" in r for r in events["5"])  # ... not InternalTI
    assert events["6"] == ["LookupFinished"]


def test_a_node_bound_to_port_0_reports_its_ports_at_ready(node: NodeProcess) -> None:
    """Every listening port configured as 0 is picked at bind, sent with READY=1 and logged as in use."""
    assert set(node.bound) == {"events", "api", "metrics"}
    assert all(host == "127.0.0.1" and port > 0 for host, port in node.bound.values()), node.bound
    assert len({port for _, port in node.bound.values()}) == 3
    log = node.log()
    assert f"node listening for events on 127.0.0.1:{node.port} " in log
    assert f"REST API listening on https://127.0.0.1:{node.api_port}/api/1.1/" in log
    assert f"metrics on http://127.0.0.1:{node.metrics_port}/metrics" in log
    assert exchange(node.port, b"X-KF-ReplyBackPING") == b"PONG"


def test_node_ping_is_answered_even_when_every_scanner_is_busy(tmp_path: Path) -> None:
    config = example_config(tmp_path)
    config.write_text(
        config.read_text().replace("<ScannersCount>9</ScannersCount>", "<ScannersCount>1</ScannersCount>")
    )
    with running_node(config) as proc:
        port = proc.port
        busy = socket.create_connection(("127.0.0.1", port), timeout=10)
        busy.sendall(FLAGS + b"1 hello\n")
        assert read_lines(busy, 1) == ["1 LookupFinished"]
        # The only scanner is held: a second event connection is refused cleanly (closed, no data) ...
        with socket.create_connection(("127.0.0.1", port), timeout=10) as second:
            second.sendall(FLAGS + b"2 hello\n")
            assert read_all(second) == b""
        proc.wait_for_log(r"all 1 scanners busy; refusing event connection")
        # ... while a health check still gets its PONG.
        assert exchange(port, b"X-KF-ReplyBackPING") == b"PONG"
        busy.close()


def test_node_survives_hostile_input_and_keeps_serving(node: NodeProcess) -> None:
    port = node.port
    # Invalid UTF-8 and NUL bytes: replaced, still matched, counted.
    out = exchange(port, FLAGS + b"1 url=http://fakess123.nu \xff\xfe\n2 src=192.0.2.0 \x00x\n").decode()
    assert "1 category=Malicious_URL" in out and "2 category=IP_Reputation" in out
    # An over-long line (MaxEventSize 4096 here) is not matched but still gets its finished line.
    out = exchange(
        port, FLAGS + b"3 url=http://fakess123.nu " + b"A" * 10000 + b"\n4 url=http://fakess123.nu\n"
    ).decode()
    assert out.splitlines()[0] == "3 LookupFinished"
    assert "4 category=Malicious_URL" in out
    # A client that never sends a newline only costs MaxEventSize of memory, then is discarded.
    hog = socket.create_connection(("127.0.0.1", port), timeout=10)
    hog.sendall(FLAGS + b"5 " + b"B" * 200_000)
    # A client that disconnects mid-event.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as quitter:
        quitter.sendall(FLAGS + b"6 url=http://fakess1")
    # Everyone else is unaffected.
    out = exchange(port, FLAGS + b"7 url=http://fakess123.nu\n").decode()
    assert "7 category=Malicious_URL" in out
    hog.close()
    assert metric(node, "threatgate_bad_input_total", 'reason="invalid_utf8"') >= 1
    assert metric(node, "threatgate_bad_input_total", 'reason="nul"') >= 1
    assert metric(node, "threatgate_bad_input_total", 'reason="oversized"') >= 2
    assert node.proc.poll() is None


def test_node_survives_a_connection_flood(node: NodeProcess) -> None:
    """Hundreds of silent connections: capped and closed, and a real client is still served."""
    flood = []
    try:
        for _ in range(400):
            flood.append(socket.create_connection(("127.0.0.1", node.port), timeout=10))
        out = exchange(node.port, FLAGS + b"1 url=http://fakess123.nu\n").decode()
        assert "1 category=Malicious_URL" in out
        assert exchange(node.port, b"X-KF-ReplyBackPING") == b"PONG"
    finally:
        for s in flood:
            s.close()
    assert metric(node, "threatgate_connections_total", 'outcome="evicted_handshake"') >= 1
    assert node.proc.poll() is None


def test_node_sends_detections_to_output_without_replyback(tmp_path: Path) -> None:
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    out_port = listener.getsockname()[1]
    done = threading.Event()

    def collect() -> None:
        conn, _ = listener.accept()
        with conn:
            buf = b""
            while b"2 LookupFinished" not in buf:
                data = conn.recv(65536)
                if not data:
                    break
                buf += data
            received.append(buf)
            done.set()

    threading.Thread(target=collect, daemon=True).start()
    config = example_config(tmp_path, output=f"<ConnectionString>127.0.0.1:{out_port}</ConnectionString>")
    with running_node(config) as proc:
        port = proc.port
        # No flags at all: the reply socket stays silent, detections go to the output address.
        assert exchange(port, b"1 url=http://fakess123.nu\n2 hello\n") == b""
        assert done.wait(20)
    listener.close()
    text = received[0].decode()
    assert "1 category=Malicious_URL" in text
    assert text.endswith("2 LookupFinished\n")  # FinishedEventFormat enabled="true" in the config


def test_node_reloads_feeds_on_sighup_and_keeps_the_old_version_of_a_broken_feed(tmp_path: Path) -> None:
    alerts = socket.create_server(("127.0.0.1", 0))
    alert_port = alerts.getsockname()[1]
    config = example_config(tmp_path)
    config.write_text(
        config.read_text().replace(
            '<AlertConnectionString enabled="false">127.0.0.1:9997</AlertConnectionString>',
            f'<AlertConnectionString enabled="true">127.0.0.1:{alert_port}</AlertConnectionString>',
        )
    )
    feed = tmp_path / "feeds" / "malicious_urls.json"
    with running_node(config) as proc:
        port = proc.port
        conn, _ = alerts.accept()
        conn.settimeout(20)
        assert "1 LookupFinished" == exchange(port, FLAGS + b"1 url=http://new-threat.example/x\n").decode().strip()
        # Replace atomically (write + rename), as feed updaters should: the new record detects.
        records = json.loads(feed.read_text())
        records.append({"url": "http://new-threat.example/x", "threat": "New"})
        tmp = feed.with_suffix(".tmp")
        tmp.write_text(json.dumps(records))
        os.replace(tmp, feed)
        proc.signal(signal.SIGHUP)
        # The SIGHUP, or the watch of the feed files if it saw the change first, loads it.
        proc.wait_for_log(r"feeds loaded \((SIGHUP|file changed: malicious_urls\.json)\)")
        out = exchange(port, FLAGS + b"2 url=http://new-threat.example/x\n").decode()
        assert "2 category=Malicious_URL matchedIndicator=http://new-threat.example/x" in out
        # A broken (truncated) file keeps the previous version and raises a service alert.
        tmp.write_text(feed.read_text()[:-20])
        os.replace(tmp, feed)
        proc.signal(signal.SIGHUP)
        proc.wait_for_log(r"feed malicious_urls.json not loaded .*keeping the previous version")
        out = exchange(port, FLAGS + b"3 url=http://new-threat.example/x\n").decode()
        assert "3 category=Malicious_URL" in out
        buf = b""
        deadline = time.monotonic() + 20
        while b"KL_ALERT_FailedToUpdateFeed" not in buf and time.monotonic() < deadline:
            buf += conn.recv(65536)
        assert b"alert=KL_ALERT_FailedToUpdateFeed feed=malicious_urls.json" in buf
        conn.close()
    alerts.close()


def test_node_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    config = example_config(tmp_path)
    config.write_text(config.read_text().replace("url=(\\S+)", "url=(\\S+"))
    result = subprocess.run(
        [sys.executable, "-m", "threatgate", "node", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"{config}:10: <RE_URL>: regex" in result.stderr
    assert "does not compile" in result.stderr


def test_both_matching_engines_answer_a_real_client_byte_for_byte(tmp_path: Path) -> None:
    """THREATGATE_ENGINE selects the engine of a real node; both answer the same bytes, hostile input included."""
    payload = (
        FLAGS
        + (EXAMPLES / "events.txt").read_bytes()
        + b"8 url=http://fakess123.nu/\xff\xfe src=192.0.2.9\n9 \x00 url=HTTP://FAKESS123.NU\n"
        + "10 url=http://пример.рф/ dst=203.0.113.5\n".encode()
    )
    answers = {}
    for engine in ("compiled", "reference"):
        directory = tmp_path / engine
        directory.mkdir()
        config = example_config(
            directory, extra_service="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>"
        )
        with running_node(config, env={"THREATGATE_ENGINE": engine}) as proc:
            proc.wait_for_log(rf"ScannersCount \d+, {engine} matching engine", after=0)
            answers[engine] = exchange(proc.port, payload)
            paths = {
                p: metric(proc, "threatgate_engine_events_total", f'path="{p}"') for p in ("compiled", "reference")
            }
        if engine == "compiled":
            assert paths["compiled"] > 0 and paths["reference"] >= 3  # the three hostile events
        else:
            assert paths == {"compiled": 0.0, "reference": 10.0}
    assert answers["compiled"] == answers["reference"]
    assert answers["compiled"].count(b"LookupFinished") == 10


def test_node_refuses_an_unknown_engine(tmp_path: Path) -> None:
    config = example_config(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "threatgate", "node", "--config", str(config)],
        env={**os.environ, "THREATGATE_ENGINE": "turbo"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "THREATGATE_ENGINE='turbo' is not an engine; use one of: compiled, reference" in result.stderr
