"""Feed parsing benchmark: ``parse_feed`` against the reference loader, per feed, and 10M parsed and indexed.

    .venv/bin/python bench/feed_parse.py --data-dir /work/bench-data/10000000
    .venv/bin/python bench/feed_parse.py --data-dir bench/data/1000000 --reference    # + today's loader

What it does:

1. **Data.** The four generated feeds of ``threatgate feeds generate`` in ``--data-dir`` (``urls.json``,
   ``domains.json``, ``ips.csv``, ``hashes.csv``; ``bench/node_throughput.py`` writes them into
   ``bench/data/<size>/``).
2. **Per feed, alone.** In a fresh process per feed, so that one feed's heap does not slow the next:
   read the file, ``parse_feed``, then index it as a snapshot does (the fixed 64-bit keys of the
   values with the compiled engine's ``keys_of`` when it is built, else xxhash, and one stable
   ``argsort``).  Wall and CPU seconds, and µs per record, for parsing and for indexing.
   ``--reference`` also times today's loader (``load_feed`` without a private copy) on the same file.
3. **All feeds in ``--jobs`` processes** (2 by default, as the snapshot builder runs them), longest
   first: the wall time from the first start to the last end is the "10M parsed and indexed" figure.

The machine may be shared: CPU seconds are shown beside wall seconds to judge the noise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from typing import Any

FEEDS = ("hashes.csv", "urls.json", "domains.json", "ips.csv")


def _settings(path: str) -> Any:
    from threatgate.config.node import FeedSettings

    fmt = "json" if path.endswith(".json") else "csv"
    return FeedSettings(path=path, name=os.path.basename(path), category="Bench", format=fmt)  # type: ignore[arg-type]


def _keys(kinds: Any, values: list[str]) -> Any:
    import numpy as np

    try:
        from threatgate.node._engine import keys_of  # type: ignore[import-not-found]

        return np.frombuffer(keys_of(np.asarray(kinds, np.int8).tobytes(), values), np.uint64)
    except (ImportError, UnicodeEncodeError):
        import xxhash

        pairs = zip(kinds, values, strict=True)
        return np.fromiter(
            (xxhash.xxh3_64_intdigest(v.encode("utf-8", "surrogatepass"), seed=k) for k, v in pairs),
            np.uint64,
            count=len(values),
        )


def parse_and_index(path: str) -> dict[str, Any]:
    """Parse one feed and index it; seconds and record counts (runs in a worker process)."""
    import numpy as np

    from threatgate.node.feedparse import parse_feed

    t0, c0 = time.perf_counter(), time.process_time()
    with open(path, "rb") as fh:
        data = fh.read()
    parsed = parse_feed(_settings(path), data)
    t1, c1 = time.perf_counter(), time.process_time()
    keys = _keys(parsed.kinds, parsed.values)
    np.argsort(keys, kind="stable")
    t2, c2 = time.perf_counter(), time.process_time()
    return {
        "feed": os.path.basename(path),
        "records": len(parsed.values),
        "malformed": parsed.report.malformed,
        "parse_wall": t1 - t0,
        "parse_cpu": c1 - c0,
        "index_wall": t2 - t1,
        "index_cpu": c2 - c1,
        "start": t0,
        "end": t2,
        "pid": os.getpid(),
    }


def reference_load(path: str) -> dict[str, Any]:
    from threatgate.node.feeds import load_feed

    t0, c0 = time.perf_counter(), time.process_time()
    snap = load_feed(_settings(path), keep_records=False)
    return {"records": snap.report.records, "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}


def _alone(func: Any, path: str) -> dict[str, Any]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result: dict[str, Any] = pool.apply(func, (path,))
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--reference", action="store_true", help="also time today's loader per feed")
    args = parser.parse_args(argv)
    paths = [os.path.join(args.data_dir, name) for name in FEEDS]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        print(f"missing feed files: {', '.join(missing)} (threatgate feeds generate writes them)", file=sys.stderr)
        return 2

    print("| feed | records | reference µs/rec (cpu) | parse_feed µs/rec wall (cpu) | index µs/rec (cpu) |")
    print("|---|---:|---:|---:|---:|")
    for path in paths:
        got = _alone(parse_and_index, path)
        n = max(got["records"], 1)
        ref = "-"
        if args.reference:
            r = _alone(reference_load, path)
            ref = f"{r['wall'] / n * 1e6:.2f} ({r['cpu'] / n * 1e6:.2f})"
        parse = f"{got['parse_wall'] / n * 1e6:.2f} ({got['parse_cpu'] / n * 1e6:.2f})"
        index = f"{got['index_wall'] / n * 1e6:.2f} ({got['index_cpu'] / n * 1e6:.2f})"
        print(f"| {got['feed']} | {got['records']:,} | {ref} | {parse} | {index} |", flush=True)

    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(parse_and_index, paths, chunksize=1)
    wall = time.perf_counter() - start
    records = sum(r["records"] for r in results)
    cpu = sum(r["parse_cpu"] + r["index_cpu"] for r in results)
    per_process: dict[int, float] = {}
    for r in results:
        per_process[r["pid"]] = per_process.get(r["pid"], 0.0) + r["parse_cpu"] + r["index_cpu"]
    print(
        f"\nall {len(paths)} feeds in {args.jobs} processes: {records:,} indicators parsed and indexed "
        f"in {wall:.1f} s wall ({cpu:.1f} CPU s; process start-up included); target <= 20 s at 10M"
    )
    print(
        f"CPU seconds per process: {', '.join(f'{v:.1f}' for v in per_process.values())} (the wall time on idle "
        f"cores); load average {os.getloadavg()[0]:.1f} at the end (other processes share the cores)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
