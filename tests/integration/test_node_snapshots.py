"""A real ``threatgate node`` restarted on its state directory: unchanged feeds are mapped from their
snapshots (never parsed) and still detect; a damaged snapshot is refused with a WARNING, counted and
rebuilt, and detects again."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import example_config, exchange, prometheus_samples, running_node

FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
URL = "http://malicious.example/p/index.php"  # in the example's malicious_urls.json
URLS = "malicious_urls.json"
FEEDS = 8


def detects(port: int, url: str = URL) -> bool:
    reply = exchange(port, FLAGS + f"1 url={url}\n".encode()).decode()
    assert reply.endswith("1 LookupFinished\n"), reply
    return f"1 category=Malicious_URL matchedIndicator={url} " in reply


def test_a_restarted_node_maps_its_snapshots_and_rebuilds_a_damaged_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THREATGATE_SNAPSHOT_IN_PROCESS_BELOW", "0")  # the example feeds are tiny: use workers
    metrics = "<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>"
    config = example_config(tmp_path, extra_service=metrics)
    snapshots = tmp_path / "state" / "node.snapshots"  # beside state/node.sqlite3
    with running_node(config) as proc:
        assert proc.log().count("built in a worker process") == FEEDS
        assert detects(proc.port)
        built = proc.log()
    files = sorted(snapshots.glob("*.tgsnap"))
    assert len(files) == FEEDS
    url_snapshot = next(p for p in files if f"feed {URLS}: snapshot {p.name} built" in built)

    with running_node(config) as proc:  # unchanged feeds: every one mapped, none parsed
        log = proc.log()
        assert log.count("unchanged, snapshot") == FEEDS and "built in a worker process" not in log
        assert f"feed {URLS}: unchanged, snapshot {url_snapshot.name} mapped (5 records, not parsed)" in log
        assert detects(proc.port) and not detects(proc.port, "http://clean.example/")
        assert "Traceback" not in proc.log()

    data = bytearray(url_snapshot.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit in the middle of the file
    url_snapshot.write_bytes(data)
    with running_node(config) as proc:
        proc.wait_for_log(
            rf"WAR threatgate\.node: feed {URLS}: snapshot {url_snapshot} not trusted \(checksum: checksum mismatch",
            after=0,
        )
        log = proc.log()
        assert log.count("unchanged, snapshot") == FEEDS - 1 and log.count("built in a worker process") == 1
        assert detects(proc.port)
        samples = prometheus_samples(proc.metrics_port)
        assert samples[f'threatgate_snapshot_rebuilds_total{{feed="{URLS}",reason="checksum"}}'] == 1
        assert samples[f'threatgate_snapshot_loads_total{{feed="{URLS}",how="built"}}'] == 1
        assert "Traceback" not in proc.log()
    assert sorted(snapshots.glob("*.tgsnap")) == files  # rebuilt under the same name
