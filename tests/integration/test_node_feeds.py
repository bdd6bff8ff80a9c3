"""Feed files changing under a real ``threatgate node``: overwritten in place, truncated, renamed over,
deleted, broken at start-up.  Detections never depend on the file staying the same, a change is
applied within 5 s with ``update_frequency="0"`` (no schedule), and a node missing a feed says so."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    HTTPSClient,
    NodeProcess,
    example_config,
    exchange,
    prometheus_samples,
    running_node,
    wait_for_log_count,
    wait_until,
)

FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
APPLY_WITHIN = 5.0
"""The issue's bound: a changed feed file detects within 5 s."""
SHARED = "http://malicious.example/p/index.php"  # in the example feed and in every new version below
NEW = "http://new-threat.example/x"
URLS = "malicious_urls.json"
FEEDS = 8  # the example's feeds: one snapshot file per loaded version, STIX and MISP included
BOTNET_URL = "http://a7396d61caffe18a4cffbb3b428c9b60.com/"  # in the botnet domains feed


class AlertSink:
    """The AlertConnectionString destination: collects every alert line the node sends."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.data = b""
        self._cond = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            while chunk := conn.recv(65536):
                with self._cond:
                    self.data += chunk
                    self._cond.notify_all()

    def count(self, needle: str) -> int:
        with self._cond:
            return self.data.decode().count(needle)

    def wait_for(self, needle: str, count: int = 1, timeout: float = 20) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: self.data.decode().count(needle) >= count, timeout)
        assert ok, f"alert {needle!r} x{count} not received: {self.data.decode()}"

    def close(self) -> None:
        self.server.close()


@dataclass
class Node:
    proc: NodeProcess
    dir: Path
    port: int
    api_port: int
    metrics_port: int
    alerts: AlertSink

    @property
    def feed(self) -> Path:
        return self.dir / "feeds" / URLS

    def detects(self, url: str, category: str = "Malicious_URL", matched: str | None = None) -> bool:
        """Whether an event holding ``url`` detects as ``category`` on ``matched`` (default: the URL)."""
        reply = exchange(self.port, FLAGS + f"1 url={url}\n".encode()).decode()
        assert reply.endswith("1 LookupFinished\n"), reply
        return f"1 category={category} matchedIndicator={matched or url} " in reply

    def readyz(self) -> tuple[int, dict[str, Any]]:
        reply = HTTPSClient(self.api_port, self.dir / "certs" / "node.pem").request("GET", "/readyz")
        return reply.status, reply.json()

    def metric(self, key: str) -> float:
        return prometheus_samples(self.metrics_port).get(key, -1.0)

    def failures(self, feed: str = URLS) -> float:
        return self.metric(f'threatgate_feed_load_failures_total{{feed="{feed}"}}')


def _config(tmp: Path, alerts: AlertSink) -> Path:
    """Every port of the node 0: it binds them and reports them at READY."""
    config = example_config(tmp, extra_service="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>")
    text = config.read_text()
    for old, new in (
        ('<Feeds update_frequency="30"', '<Feeds update_frequency="0"'),  # no schedule: only the watch reloads
        (
            '<AlertConnectionString enabled="false">127.0.0.1:9997</AlertConnectionString>',
            f'<AlertConnectionString enabled="true">127.0.0.1:{alerts.port}</AlertConnectionString>',
        ),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    config.write_text(text)
    return config


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    alerts = AlertSink()
    config = _config(tmp_path, alerts)
    try:
        with running_node(config) as proc:
            yield Node(proc, tmp_path, proc.port, proc.api_port, proc.metrics_port, alerts)
            assert "Traceback" not in proc.log(), proc.log()
    finally:
        alerts.close()


def new_version(data: bytes) -> bytes:
    """The feed with a new record put *first*: every record of the old version moves to another offset."""
    return json.dumps([{"url": NEW, "threat": "New"}, *json.loads(data)], indent=1).encode()


def overwrite_in_place(path: Path, data: bytes) -> None:
    """What ``cp``, ``curl -o`` and ``>`` do: the same inode, its bytes rewritten."""
    inode = path.stat().st_ino
    with open(path, "r+b") as fh:
        fh.write(data)
        fh.truncate()
    assert path.stat().st_ino == inode


def snapshot_files(node: Node) -> int:
    """The snapshot files of loaded feed versions: in the snapshot directory beside the node's database."""
    return len(list((node.dir / "state" / "node.snapshots").glob("*.tgsnap")))


def wait_detects(node: Node, url: str, since: float) -> float:
    """Seconds from ``since`` until ``url`` detects (fails after APPLY_WITHIN)."""
    wait_until(lambda: node.detects(url), f"{url} to detect", timeout=APPLY_WITHIN + 1)
    took = time.monotonic() - since
    assert took < APPLY_WITHIN, f"applied after {took:.1f} s"
    return took


class Prober:
    """Sends an event for ``url`` again and again on a thread and counts the replies without its detection."""

    def __init__(self, node: Node, url: str) -> None:
        self.node, self.url = node, url
        self.sent = self.missed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sent += 1
            if not self.node.detects(self.url):
                self.missed += 1
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_a_feed_overwritten_in_place_keeps_detecting_and_its_new_version_applies_within_5_s(node: Node) -> None:
    assert node.detects(SHARED) and not node.detects(NEW)
    assert snapshot_files(node) == FEEDS
    prober = Prober(node, SHARED)
    try:
        wait_until(lambda: prober.sent >= 5, "the prober to run")
        written = time.monotonic()
        overwrite_in_place(node.feed, new_version(node.feed.read_bytes()))
        wait_detects(node, NEW, written)
        node.proc.wait_for_log(rf"feeds loaded \(file changed: {URLS}\)")
        sent = prober.sent
        wait_until(lambda: prober.sent >= sent + 5, "more probes against the new version")
    finally:
        prober.stop()
    # A value listed in both versions detected throughout: before, while and after the file changed.
    assert prober.missed == 0, f"{prober.missed} of {prober.sent} events lost their detection"
    node.alerts.wait_for(f"alert=KL_ALERT_UpdatedFeed feed={URLS} records=6")
    assert node.metric(f'threatgate_feed_records{{feed="{URLS}"}}') == 6
    # The replaced version's snapshot is removed with it: one file per loaded feed version.
    wait_until(lambda: snapshot_files(node) == FEEDS, "the old version's snapshot to be removed")


def test_a_truncated_renamed_or_deleted_feed_file(node: Node) -> None:
    good = node.feed.read_bytes()
    # Truncated in place (a crashed download): the loaded version stays, said loudly once.
    overwrite_in_place(node.feed, good[: len(good) // 2])
    node.proc.wait_for_log(
        rf"ERR threatgate\.node: feed {URLS} not loaded \(.*{URLS}: truncated JSON feed.*\); "
        r"keeping the previous version \(5 records\)"
    )
    node.alerts.wait_for(f"alert=KL_ALERT_FailedToUpdateFeed feed={URLS}")
    assert node.failures() == 1
    assert node.detects(SHARED)
    status, ready = node.readyz()
    assert status == 200 and ready["ready"] is True, ready
    assert ready["feeds"][URLS].startswith("previous version kept: "), ready
    assert "truncated JSON feed" in ready["feeds"][URLS]
    # The broken file is not tried (nor reported) again while it stays the same, though the watch
    # goes on: another feed's change is applied meanwhile.
    domains = node.dir / "feeds" / "botnet_domains.json"
    records = json.loads(domains.read_text())
    domains.write_text(json.dumps([*records, {"domain": "later.example"}]))
    node.proc.wait_for_log(r"feeds loaded \(file changed: botnet_domains\.json\)")
    assert node.detects("http://later.example/", "Botnet_CnC_Domain", "later.example")
    assert node.proc.log().count(f"feed {URLS} not loaded") == 1 and node.failures() == 1

    # Replaced by rename (the atomic way), no SIGHUP: picked up.
    written = time.monotonic()
    tmp = node.feed.with_suffix(".tmp")
    tmp.write_bytes(new_version(good))
    os.replace(tmp, node.feed)
    wait_detects(node, NEW, written)
    assert node.detects(SHARED)
    status, ready = node.readyz()
    assert status == 200 and ready["feeds"][URLS] == "loaded", ready

    # Deleted: the loaded version stays, said once (error, alert, counter); the node stays ready.
    node.feed.unlink()
    node.proc.wait_for_log(
        rf"feed {URLS} not loaded \(.*{URLS}: cannot open: No such file or directory\); keeping the previous version"
    )
    node.alerts.wait_for(f"alert=KL_ALERT_FailedToUpdateFeed feed={URLS}", count=2)
    assert node.failures() == 2
    assert node.detects(NEW) and node.detects(SHARED)
    status, ready = node.readyz()
    assert status == 200 and ready["ready"] is True, ready
    assert ready["feeds"][URLS].startswith("previous version kept: "), ready
    # Put back: loaded again.
    written = time.monotonic()
    node.feed.write_bytes(good)
    wait_until(lambda: not node.detects(NEW), "the restored version (without the new record)", APPLY_WITHIN + 1)
    assert time.monotonic() - written < APPLY_WITHIN
    assert node.detects(SHARED)
    wait_for_log_count(node.proc, rf"alert KL_ALERT_UpdatedFeed feed={URLS} ", 3)  # start-up, rename, restore
    assert node.failures() == 2


def test_a_node_started_with_a_broken_feed_is_not_ready_until_the_file_is_fixed(tmp_path: Path) -> None:
    alerts = AlertSink()
    config = _config(tmp_path, alerts)
    feed = tmp_path / "feeds" / URLS
    good = feed.read_bytes()
    feed.write_bytes(good[:-20])
    try:
        with running_node(config) as proc:
            node = Node(proc, tmp_path, proc.port, proc.api_port, proc.metrics_port, alerts)
            port = proc.port
            proc.wait_for_log(
                rf"ERR threatgate\.node: feed {URLS} not loaded \(.*truncated JSON feed.*\); "
                r"no previous version to keep",
                after=0,
            )
            proc.wait_for_log(rf"WAR threatgate\.node: node not ready \(/readyz answers 503\): .*feed\(s\) {URLS}")
            status, ready = node.readyz()
            assert status == 503, ready
            assert ready["ready"] is False
            assert ready["reason"] == f"no loaded version of feed(s) {URLS}"
            assert ready["feeds"][URLS].startswith(f"not loaded: {feed}: truncated JSON feed"), ready
            assert ready["feeds"]["botnet_domains.json"] == "loaded"
            assert ready["max_event_size"] == 1024 * 1024
            assert node.metric("threatgate_ready") == 0
            assert node.metric(f'threatgate_feed_last_load_timestamp_seconds{{feed="{URLS}"}}') == 0
            assert node.failures() == 1
            alerts.wait_for(f"alert=KL_ALERT_FailedToUpdateFeed feed={URLS}")
            # It still answers, with the feeds it has (partial matching beats none when it is the only node).
            assert exchange(port, b"X-KF-ReplyBackPING") == b"PONG"
            assert not node.detects(SHARED)
            assert node.detects(BOTNET_URL, "Botnet_CnC_Domain", BOTNET_URL[7:-1])
            # The file is fixed: ready within 5 s, without a signal, and the feed detects.
            fixed = time.monotonic()
            feed.write_bytes(good)
            wait_until(lambda: node.readyz()[0] == 200, "/readyz 200", APPLY_WITHIN + 1)
            assert time.monotonic() - fixed < APPLY_WITHIN
            status, ready = node.readyz()
            assert ready["ready"] is True and "reason" not in ready and ready["feeds"][URLS] == "loaded", ready
            assert node.detects(SHARED)
            proc.wait_for_log(r"INF threatgate\.node: node ready: every enabled feed is loaded")
            assert node.metric("threatgate_ready") == 1
            assert node.metric(f'threatgate_feed_last_load_timestamp_seconds{{feed="{URLS}"}}') > time.time() - 60
            assert "Traceback" not in proc.log()
    finally:
        alerts.close()


def test_a_feed_that_takes_another_feeds_place_at_a_reload_never_inherits_its_version(node: Node) -> None:
    """SIGHUP with the URL feed replaced, at its place in the list, by a feed file that does not load:
    the URL feed's records stop detecting (it is no longer configured) instead of being kept as if they
    were the new feed's "previous version", and the node is not ready naming the new feed."""
    assert node.detects(SHARED)
    broken = node.dir / "feeds" / "broken.json"
    broken.write_text('[{"url": "http://x.example/"}')  # truncated: never loads
    config = node.dir / "node.conf"
    text = config.read_text()
    old = '<Feed filename="feeds/malicious_urls.json" enabled="true" confidence="100" category="Malicious_URL"/>'
    assert text.count(old) == 1
    config.write_text(text.replace(old, old.replace("feeds/malicious_urls.json", "feeds/broken.json")))
    mark = len(node.proc.log())
    node.proc.signal(signal.SIGHUP)
    node.proc.wait_for_log(r"feed broken\.json not loaded \(.*\); no previous version to keep", after=mark)
    wait_until(lambda: not node.detects(SHARED), "the replaced feed's records to stop detecting")
    status, body = node.readyz()
    assert status == 503 and "broken.json" in json.dumps(body), body


def test_a_feed_moved_in_the_list_keeps_its_previous_version(node: Node) -> None:
    """The botnet feed's file is broken (its previous version kept, the node ready); a SIGHUP adds a feed
    at the top of the list, so every feed moves one place: the botnet feed still detects with the version
    it had, and the node stays ready (versions follow their feed file, not their place)."""
    domain = BOTNET_URL[7:-1]
    assert node.detects(BOTNET_URL, "Botnet_CnC_Domain", domain)
    botnet = node.dir / "feeds" / "botnet_domains.json"
    mark = len(node.proc.log())
    botnet.write_text('[{"domain": "x.example"}')  # truncated: this version never loads
    node.proc.wait_for_log(r"feed botnet_domains\.json not loaded \(.*\); keeping the previous version", after=mark)
    (node.dir / "feeds" / "extra.json").write_text(json.dumps([{"url": NEW, "threat": "Extra"}]))
    config = node.dir / "node.conf"
    text = config.read_text()
    first = '<Feeds update_frequency="0" per_scan_detect_limit="0">'
    assert text.count(first) == 1
    extra = '<Feed filename="feeds/extra.json" enabled="true" confidence="50" category="Extra"/>'
    config.write_text(text.replace(first, first + "\n    " + extra))
    mark = len(node.proc.log())
    node.proc.signal(signal.SIGHUP)
    node.proc.wait_for_log(r"feeds loaded \(SIGHUP\)", after=mark)
    assert node.detects(NEW, "Extra")
    assert node.detects(BOTNET_URL, "Botnet_CnC_Domain", domain)  # its previous version, at its new place
    status, body = node.readyz()
    assert status == 200, body
