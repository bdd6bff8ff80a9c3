"""Snapshot store benchmark: build time of the snapshot writer, restart time from the snapshots, RSS.

    .venv/bin/python bench/snapshot_store.py --data-dir /work/bench-data --indicators 10000000

Uses the data ``bench/node_throughput.py`` generates (``<data-dir>/<size>/node.conf``, feeds, events.txt,
expected.txt).  Two steps, each in a fresh subprocess so neither pollutes the other's RSS:

* build: per ``<Feed>``, the parse (``feeds.parse_source``: whichever parser ``feedparse.parse_feed`` is),
  then the snapshot writer (``snapfile.build``) and the write, in this one process, sequentially (the node
  runs one worker process per changed feed, as many at once as there are cores);
* restart: what a node does at start-up with unchanged feeds: hash each feed, check its snapshot (header
  and checksum, read with ``read``), map it, build the ``IndicatorStore``; wall seconds until ready to
  match.  Then ``Matcher.match`` over events.txt (detections checked against expected.txt), and the RSS:
  after the restart, and after matching (the snapshot pages mapped by then, from ``/proc/self/smaps``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import os
import re
import subprocess
import sys
import time
from typing import Any


def vm(key: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def mapped_snapshot_bytes() -> int:
    """Resident bytes of the mapped snapshot files."""
    total = 0
    current = ""
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as fh:
        for line in fh:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split()
                current = parts[5] if len(parts) > 5 else ""
            elif line.startswith("Rss:") and current.endswith(".tgsnap"):
                total += int(line.split()[1]) * 1024
    return total


def build(data: str, snapshot_dir: str) -> dict[str, Any]:
    from threatgate.config.node import load_node_config
    from threatgate.node import feeds, snapfile, snapshots

    config = load_node_config(os.path.join(data, "node.conf"))
    directory = snapshots.SnapshotDir(snapshot_dir)
    directory.prepare()
    out: dict[str, Any] = {"feeds": {}}
    for settings in config.feeds.feeds:
        started = time.perf_counter()
        parsed, _, digest = feeds.parse_source(settings)
        parsed_at = time.perf_counter()
        chunks = snapfile.build(parsed, digest, snapshots.settings_digest(settings))
        built_at = time.perf_counter()
        path = directory.file_for(digest, settings)
        snapfile.write_atomic(path, chunks)
        out["feeds"][settings.name] = {
            "records": len(parsed.values),
            "parse_s": round(parsed_at - started, 2),
            "build_s": round(built_at - parsed_at, 2),
            "write_s": round(time.perf_counter() - built_at, 2),
            "bytes_per_record": round(os.path.getsize(path) / max(1, len(parsed.values)), 1),
        }
        del parsed, chunks
    return out


def restart(data: str, snapshot_dir: str) -> dict[str, Any]:
    import numpy  # noqa: F401  (before the baseline: not counted as store memory)

    from threatgate.config.node import load_node_config
    from threatgate.node import snapshots
    from threatgate.node.matcher import Matcher, MatchStats
    from threatgate.node.store import IndicatorStore

    config = load_node_config(os.path.join(data, "node.conf"))
    directory = snapshots.SnapshotDir(snapshot_dir)
    gc.collect()
    base = vm("VmRSS")
    started = time.perf_counter()

    def one(settings: Any) -> Any:
        identity, digest = snapshots.source_digest(settings)
        found = directory.map_existing(settings, identity, digest)
        if not isinstance(found, snapshots.FeedSnapshot):
            raise SystemExit(f"{settings.name}: no trusted snapshot ({found}); run the build step first")
        return found

    with concurrent.futures.ThreadPoolExecutor(len(config.feeds.feeds) or 1) as pool:
        snaps = list(pool.map(one, config.feeds.feeds))
    store = IndicatorStore(dict(enumerate(snaps)))
    ready_s = time.perf_counter() - started
    n = max(1, len(store))
    gc.collect()
    after_restart = vm("VmRSS")
    with open(os.path.join(data, "events.txt"), encoding="utf-8") as fh:
        events: list[Any] = fh.read().splitlines()
    with open(os.path.join(data, "expected.txt"), encoding="utf-8") as fh:
        expected = sum(1 for _ in fh)
    matcher = Matcher(config, store)
    stats = MatchStats()
    started = time.perf_counter()
    for i in range(0, len(events), 256):
        matcher.match(events[i : i + 256], date="Jan 01 00:00:00", finished=True, stats=stats)
    match_s = time.perf_counter() - started
    return {
        "indicators": len(store),
        "ready_s": round(ready_s, 2),
        "rss_after_restart_per_indicator": round((after_restart - base) / n, 1),
        "reference_events_per_s": round(len(events) / match_s),
        "detections": stats.detections,
        "expected_detections": expected,
        "mapped_after_matching_per_indicator": round(mapped_snapshot_bytes() / n, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "data"))
    parser.add_argument("--indicators", type=int, default=1_000_000)
    parser.add_argument("--snapshot-dir", help="default: <data-dir>/<size>/snapshots")
    parser.add_argument("--step", choices=("build", "restart"), help=argparse.SUPPRESS)  # the subprocesses
    args = parser.parse_args()
    data = os.path.join(args.data_dir, str(args.indicators))
    snapshot_dir = args.snapshot_dir or os.path.join(data, "snapshots")
    if args.step is not None:
        result = build(data, snapshot_dir) if args.step == "build" else restart(data, snapshot_dir)
        print(json.dumps(result))
        return
    for step in ("build", "restart"):
        command = [sys.executable, __file__, "--data-dir", args.data_dir, "--indicators", str(args.indicators)]
        command += ["--snapshot-dir", snapshot_dir, "--step", step]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        print(step, json.dumps(json.loads(done.stdout.strip().splitlines()[-1]), indent=1))


if __name__ == "__main__":
    main()
