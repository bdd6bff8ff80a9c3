"""Tests for threatgate.node.snapshots through the node's feed lifecycle: mapped at restart without
parsing, built in a worker process on change, untrusted files rebuilt with the reason, unused ones removed."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from threatgate.config.node import FeedSettings, NodeConfig, RuleType, load_node_config
from threatgate.node import feeds, snapshots
from threatgate.node.service import NodeService

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SHARED = "http://shared.example/a"
OLD = "http://old.example/a"
NEW = "http://new.example/a"


def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_feed(path: Path, urls: list[str]) -> None:
    path.write_text(json.dumps([{"url": u, "threat": "T"} for u in urls]), encoding="utf-8")


@pytest.fixture(autouse=True)
def build_in_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every feed here is tiny: without this, all would be built in the node's own process."""
    monkeypatch.setattr(snapshots, "IN_PROCESS_BELOW", 0)


@pytest.fixture
def config(tmp_path: Path) -> NodeConfig:
    base = load_node_config(str(EXAMPLES / "node.conf"))
    write_feed(tmp_path / "urls.json", [SHARED, OLD])
    (tmp_path / "ips.csv").write_text("ip,threat\n192.0.2.1,x\n10.0.0.0/8,y\n", encoding="utf-8")
    feed_list = (
        FeedSettings(path=str(tmp_path / "urls.json"), name="urls.json", category="Urls", format="json"),
        FeedSettings(path=str(tmp_path / "ips.csv"), name="ips.csv", category="Ips", format="csv"),
    )
    return base.model_copy(
        update={
            "feeds": base.feeds.model_copy(update={"feeds": feed_list, "snapshot_dir": str(tmp_path / "snaps")}),
            "http": None,
        }
    )


def snapshot_files(config: NodeConfig) -> list[str]:
    return sorted(n for n in os.listdir(config.feeds.snapshot_dir) if n.endswith(snapshots.SUFFIX))


async def started(config: NodeConfig) -> NodeService:
    node = NodeService(config)
    await node.reload_feeds("startup")
    return node


async def settle(node: NodeService) -> None:
    """Let the spawned clean-up (removal of unused snapshots) run to its end."""
    while node._tasks:  # noqa: SLF001 - the node's own background tasks
        await asyncio.gather(*list(node._tasks))  # noqa: SLF001


def detects(node: NodeService, value: str, rule: RuleType = RuleType.URL) -> bool:
    return bool(node.matcher.lookup(rule, value))


async def test_first_start_builds_in_a_worker_and_restart_maps_without_parsing(
    config: NodeConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="threatgate.node"):
        first = await started(config)
    assert caplog.text.count("built in a worker process") == 2
    assert first.stats.snapshot_loads == {("urls.json", "built"): 1, ("ips.csv", "built"): 1}
    assert detects(first, SHARED) and detects(first, "10.1.2.3", RuleType.IP)
    directory = config.feeds.snapshot_dir
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    files = snapshot_files(config)
    assert len(files) == 2 and all(stat.S_IMODE(os.stat(os.path.join(directory, n)).st_mode) == 0o600 for n in files)

    def no_parse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an unchanged feed was parsed")

    monkeypatch.setattr(feeds, "parse_source", no_parse)
    monkeypatch.setattr("threatgate.node.service.build_in_worker", no_parse)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="threatgate.node"):
        second = await started(config)  # a restart: a new process would find the same files
    assert caplog.text.count("unchanged, snapshot") == 2 and "mapped (2 records, not parsed)" in caplog.text
    assert second.stats.snapshot_loads == {("urls.json", "mapped"): 1, ("ips.csv", "mapped"): 1}
    assert detects(second, SHARED) and detects(second, "10.1.2.3", RuleType.IP) and not detects(second, NEW)
    hit = second.matcher.lookup(RuleType.URL, OLD)[0]
    assert (hit.indicator.raw, hit.context) == (OLD, (("threat", "T"),))
    assert snapshot_files(config) == files


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[: len(data) // 2], "truncated"),
        (lambda data: data[:-9] + bytes([data[-9] ^ 1]) + data[-8:], "checksum"),
        (lambda data: data[:8] + (99).to_bytes(4, "little") + data[12:], "version"),
        (lambda data: data[:12] + (0x04030201).to_bytes(4, "little") + data[16:], "byte_order"),
    ],
    ids=["truncated", "flipped-byte", "future-version", "other-byte-order"],
)
async def test_an_untrusted_snapshot_is_rebuilt_with_a_warning(
    config: NodeConfig, caplog: pytest.LogCaptureFixture, damage: Any, reason: str
) -> None:
    await started(config)
    path = url_feed_snapshot(config)
    damage_file(path, damage)
    with caplog.at_level(logging.INFO, logger="threatgate.node"):
        node = await started(config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"feed urls.json: snapshot {path} not trusted ({reason}: ")
    assert warnings[0].endswith("; removed, rebuilding it from the feed")
    assert node.stats.snapshot_rebuilds == {("urls.json", reason): 1}
    assert node.stats.snapshot_loads == {("urls.json", "built"): 1, ("ips.csv", "mapped"): 1}
    assert detects(node, SHARED) and detects(node, OLD)
    assert url_feed_snapshot(config) == path  # the same bytes and settings: the same name, now trusted again


def damage_file(path: Path, damage: Any) -> None:
    path.write_bytes(damage(path.read_bytes()))


def url_feed_snapshot(config: NodeConfig) -> Path:
    """The snapshot file of the URL feed's current bytes."""
    _, digest = snapshots.source_digest(config.feeds.feeds[0])
    directory = snapshots.SnapshotDir(config.feeds.snapshot_dir)
    path = Path(directory.file_for(digest, config.feeds.feeds[0]))
    assert path.exists()
    return path


async def test_a_feed_update_under_matching_swaps_atomically_and_the_old_snapshot_goes(config: NodeConfig) -> None:
    node = await started(config)
    before = snapshot_files(config)
    write_feed(Path(config.feeds.feeds[0].path), [NEW, SHARED])
    answers: list[tuple[bool, bool, bool]] = []
    stop = asyncio.Event()

    async def match_meanwhile() -> None:
        while not stop.is_set():
            answers.append((detects(node, SHARED), detects(node, OLD), detects(node, NEW)))
            await asyncio.sleep(0.001)

    matching = asyncio.create_task(match_meanwhile())
    await node.reload_feeds("file changed: urls.json")
    stop.set()
    await matching
    assert len(answers) > 3  # matching went on while the worker built the new version
    # Every answer is one version or the other, never a mix: SHARED throughout, OLD then NEW.
    assert set(answers) <= {(True, True, False), (True, False, True)}
    assert answers[0] == (True, True, False)
    assert (detects(node, SHARED), detects(node, OLD), detects(node, NEW)) == (True, False, True)
    await settle(node)
    after = snapshot_files(config)
    assert len(after) == 2 and len(set(after) - set(before)) == 1  # the old version's file is removed


async def test_a_broken_feed_change_keeps_the_version_and_its_snapshot(config: NodeConfig) -> None:
    node = await started(config)
    before = snapshot_files(config)
    write_text(config.feeds.feeds[0].path, "[{")
    await node.reload_feeds("file changed: urls.json")
    await settle(node)
    assert detects(node, OLD)
    assert "truncated JSON feed" in (node._feed_states[0].error or "")  # noqa: SLF001
    assert snapshot_files(config) == before


def test_worker_answers_a_feed_error_as_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{}", encoding="utf-8")
    settings = FeedSettings(path=str(path), name="bad.json", category="C", format="json")
    with pytest.raises(feeds.FeedError, match="must be an array"):
        asyncio.run(snapshots.build_in_worker(str(tmp_path), settings))
    assert list(tmp_path.iterdir()) == [path]


async def test_an_unusable_snapshot_directory_is_a_failed_load_said_loudly(
    config: NodeConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    write_text(str(blocker), "")
    bad = config.model_copy(update={"feeds": config.feeds.model_copy(update={"snapshot_dir": f"{blocker}/snaps"})})
    with caplog.at_level(logging.ERROR, logger="threatgate.node"):
        node = await started(bad)
    assert f"feed urls.json not loaded (snapshot directory {blocker}/snaps: Not a directory)" in caplog.text
    assert node.stats.feed_failures == {"urls.json": 1, "ips.csv": 1}
    assert node.feed_status()["urls.json"] == (
        False,
        f"not loaded: snapshot directory {blocker}/snaps: Not a directory",
    )


def test_snapshot_dir_load_builds_once_then_maps(config: NodeConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = snapshots.SnapshotDir(config.feeds.snapshot_dir)
    first = directory.load(config.feeds.feeds[1])
    assert first.path is not None and first.path.endswith(snapshots.SUFFIX) and len(first) == 2
    monkeypatch.setattr(snapshots, "build_snapshot", lambda *a: pytest.fail("rebuilt an unchanged feed"))
    again = directory.load(config.feeds.feeds[1])
    assert again.path == first.path and again.record(1) == first.record(1)


@pytest.mark.parametrize(
    ("executable", "message"),
    [
        ("/bin/false", "the snapshot build worker failed: exit status 1"),
        ("/nonexistent/python", "cannot start the snapshot build worker: No such file or directory"),
    ],
)
def test_a_worker_that_fails_or_cannot_start_is_a_feed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, executable: str, message: str
) -> None:
    path = tmp_path / "f.json"
    write_feed(path, [SHARED])
    settings = FeedSettings(path=str(path), name="f.json", category="C", format="json")
    monkeypatch.setattr(snapshots.sys, "executable", executable)
    with pytest.raises(feeds.FeedError, match=message):
        asyncio.run(snapshots.build_in_worker(str(tmp_path), settings))


def test_a_worker_that_hangs_is_killed_and_is_a_feed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.json"
    write_feed(path, [SHARED])
    settings = FeedSettings(path=str(path), name="f.json", category="C", format="json")
    hang = tmp_path / "hang.sh"
    pid_file = tmp_path / "pid"
    hang.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n", encoding="ascii")
    hang.chmod(0o755)
    monkeypatch.setattr(snapshots.sys, "executable", str(hang))
    monkeypatch.setattr(snapshots, "BUILD_TIMEOUT_FLOOR", 0.5)
    with pytest.raises(feeds.FeedError, match=r"did not finish within 0\.5 s and was killed"):
        asyncio.run(snapshots.build_in_worker(str(tmp_path), settings))
    if pid_file.exists():  # (on a slow machine it may be killed before it wrote its pid)
        with pytest.raises(ProcessLookupError):  # killed and reaped: no worker left behind
            os.kill(int(pid_file.read_text()), 0)


async def test_a_small_feed_is_built_in_the_nodes_process(
    config: NodeConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(snapshots, "IN_PROCESS_BELOW", 4 << 20)
    monkeypatch.setattr("threatgate.node.service.build_in_worker", lambda *a: pytest.fail("a worker for a tiny feed"))
    with caplog.at_level(logging.INFO, logger="threatgate.node"):
        node = await started(config)
    assert caplog.text.count("built in this process") == 2
    assert node.stats.snapshot_loads == {("urls.json", "built"): 1, ("ips.csv", "built"): 1}
    assert detects(node, SHARED) and len(snapshot_files(config)) == 2


def test_a_snapshot_directory_serves_one_node_process_only(tmp_path: Path) -> None:
    path = str(tmp_path / "snaps")
    snapshots.SnapshotDir(path).prepare()
    snapshots.SnapshotDir(path).prepare()  # again in the same process (a reload, a new store): fine
    other = subprocess.run(
        [sys.executable, "-c", f"from threatgate.node.snapshots import SnapshotDir; SnapshotDir({path!r}).prepare()"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.returncode != 0
    assert "in use by another threatgate process: give each node its own <Feeds snapshot_dir>" in other.stderr
