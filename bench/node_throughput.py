"""Node benchmark: feed load time, memory per indicator and single-core matching throughput vs GNU grep.

    .venv/bin/python bench/node_throughput.py --indicators 100000,1000000,10000000 --events 200000
    .venv/bin/python bench/node_throughput.py --indicators 100000 --profile

For each size the data (``threatgate feeds generate``) goes to ``bench/data/<size>/`` and is reused while
``stamp.json`` shows the same arguments and generator source.  Each size is measured in a fresh
subprocess so its RSS is not polluted by the previous one:

* load: ``load_feed`` for every ``<Feed>`` of the generated node.conf, then ``IndicatorStore`` (exactly
  what ``NodeService.reload_feeds`` does), wall seconds;
* memory: VmRSS after load minus VmRSS before it (the interpreter with numpy and threatgate imported),
  per indicator and relative to the feed bytes on disk; VmHWM (peak) too; ``store.nbytes`` plus the
  per-feed arrays, i.e. what the data structures themselves hold;
* matching: ``Matcher.match(batch, finished=True)`` over events.txt in batches of 256 events (one 64 KiB
  read), one thread, cold caches, wall seconds; the detections are checked against expected.txt.

The anchor is ``LC_ALL=C grep -F -c -f patterns.txt events.txt`` with every indicator's literal text as
a pattern (masks and ``*.`` domains without their stars; CIDRs as written, which never match): a C
multi-pattern substring scan over the same bytes.  It does less than threatgate (no extraction, no
normalisation, no CIDR or sub-domain semantics, no output), so it is an upper bound for "as fast as a
byte scan", not an equivalent.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import io
import json
import os
import pstats
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data")
FEEDS = ("urls.json", "domains.json", "ips.csv", "hashes.csv")

TARGET_EPS = 250_000  # events/s per core at 10 M indicators
TARGET_BYTES_PER_INDICATOR = 120  # RSS at 10 M indicators
TARGET_LOAD_S = 20.0  # 10 M indicators loaded
ZEEK_RSS_PER_FEED_BYTE = "6-7x"


# -- helpers ------------------------------------------------------------------------------------


def vm_status(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def code_version() -> str:
    """The commit measured, "+dirty" when src/ differs from it (read-only git calls; "unknown" without git)."""
    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=root, check=False).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def generator_digest() -> str:
    import threatgate.node.generate as gen

    with open(gen.__file__, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


def ensure_data(data_dir: str, indicators: int, events: int, hit_rate: float, seed: int) -> tuple[str, float | None]:
    """The generated directory for this size; (dir, generation seconds or None when reused)."""
    from threatgate.node.generate import generate

    out = os.path.join(data_dir, str(indicators))
    stamp_path = os.path.join(out, "stamp.json")
    stamp = {
        "indicators": indicators,
        "events": events,
        "hit_rate": hit_rate,
        "seed": seed,
        "port": 9999,
        "generator": generator_digest(),
    }
    try:
        with open(stamp_path, encoding="utf-8") as fh:
            if json.load(fh) == stamp:
                return out, None
    except (OSError, ValueError):
        pass
    if os.path.isdir(out):
        shutil.rmtree(out)
    started = time.perf_counter()
    print(f"  generating {indicators} indicators, {events} events into {out} ...", file=sys.stderr, flush=True)
    summary = generate(out, indicators=indicators, events=events, hit_rate=hit_rate, seed=seed, port=9999)
    elapsed = time.perf_counter() - started
    print(f"  {summary} in {elapsed:.1f} s", file=sys.stderr, flush=True)
    with open(stamp_path, "w", encoding="utf-8") as fh:  # written last: a half-written directory is redone
        json.dump(stamp, fh)
    return out, elapsed


def grep_patterns(out: str) -> str:
    """patterns.txt: the literal text of every indicator, one per line (cached next to the feeds)."""
    path = os.path.join(out, "patterns.txt")
    if os.path.exists(path):
        return path
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii", newline="\n") as dst:
        for name in FEEDS:
            with open(os.path.join(out, name), encoding="ascii") as src:
                chunk: list[str] = []
                for line in src:
                    value = _raw_value(name, line)
                    if value:
                        chunk.append(value)
                    if len(chunk) >= 100_000:
                        dst.write("\n".join(chunk) + "\n")
                        chunk.clear()
                if chunk:
                    dst.write("\n".join(chunk) + "\n")
    os.replace(tmp, path)
    return path


def _raw_value(feed: str, line: str) -> str:
    line = line.strip()
    if feed.endswith(".csv"):
        value = line.split(",", 1)[0]
        return "" if value in ("ip", "indicator") else value
    if not line.startswith("{"):
        return ""
    value = str(next(iter(json.loads(line.rstrip(",")).values())))
    # A star is not a fixed string: keep the longest literal piece (".cdn7.example/payload/").
    return max(value.split("*"), key=len) if "*" in value else value


def _grep_once(patterns: str, target: str, timeout: float, mem_limit: int) -> tuple[str, float, int, int]:
    """(status, wall seconds, matching lines, peak RSS bytes) of one ``grep -F -c -f`` run.

    status is "ok", "timeout" or "oom": grep runs under RLIMIT_AS = ``mem_limit`` so that a pattern
    set too big for it fails alone instead of waking the kernel's OOM killer on a shared machine.
    """

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))

    env = dict(os.environ, LC_ALL="C")
    started = time.perf_counter()
    proc = subprocess.Popen(
        ["grep", "-F", "-c", "-f", patterns, target],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limit,
    )
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    proc.stderr.close()
    peak = usage.ru_maxrss * 1024
    if proc.returncode == -signal.SIGKILL and elapsed >= timeout:
        return "timeout", elapsed, 0, peak
    if proc.returncode not in (0, 1):
        if b"memory exhausted" in stderr or proc.returncode == -signal.SIGKILL:
            return "oom", elapsed, 0, peak
        raise RuntimeError(f"grep failed ({proc.returncode}): {stderr.decode(errors='replace').strip()}")
    return "ok", elapsed, int(stdout.strip() or 0), peak


def run_grep(out: str, timeout: float, mem_limit: int) -> dict[str, Any]:
    """grep over events.txt, and over /dev/null to separate building the pattern matcher from scanning."""
    patterns = grep_patterns(out)
    events = os.path.join(out, "events.txt")
    result: dict[str, Any] = {"grep_patterns_bytes": os.path.getsize(patterns), "grep_mem_limit": mem_limit}
    status, elapsed, lines, peak = _grep_once(patterns, events, timeout, mem_limit)
    result.update(grep_status=status, grep_seconds=elapsed, grep_lines=lines, grep_peak_rss=peak)
    if status == "ok":
        setup = _grep_once(patterns, os.devnull, timeout, mem_limit)
        result["grep_setup_seconds"] = setup[1] if setup[0] == "ok" else None
    return result


def default_grep_limit() -> int:
    """Half of MemAvailable, at most 8 GiB."""
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return min(8 << 30, int(line.split()[1]) * 1024 // 2)
    return 8 << 30


# -- the measuring subprocess --------------------------------------------------------------------


def worker(out: str, batch: int, profile: bool) -> dict[str, Any]:
    """Load and match in this (fresh) process; returns the measurements."""
    import numpy  # noqa: F401  (imported before the baseline so it is not counted as feed memory)

    from threatgate.config.node import load_node_config
    from threatgate.node.feeds import FeedSnapshot, load_feed
    from threatgate.node.matcher import Matcher, MatchStats
    from threatgate.node.service import syslog_date
    from threatgate.node.store import IndicatorStore
    from threatgate.wire.framing import FramedEvent

    config = load_node_config(os.path.join(out, "node.conf"))
    gc.collect()
    rss_before = vm_status("VmRSS")

    started = time.perf_counter()
    cpu_started = time.process_time()
    snapshots: dict[int, FeedSnapshot] = {}
    for slot, settings in enumerate(config.feeds.feeds):
        if settings.enabled:
            snapshots[slot] = load_feed(settings)
    parse_s = time.perf_counter() - started
    store = IndicatorStore(snapshots)
    load_s = time.perf_counter() - started
    load_cpu = time.process_time() - cpu_started
    gc.collect()
    rss_after = vm_status("VmRSS")
    peak = vm_status("VmHWM")

    arrays = store.nbytes  # keys, record numbers and Bloom bitmaps (the records stay in the snapshots)
    feed_bytes = sum(os.path.getsize(s.settings.path) for s in snapshots.values())
    records = sum(s.report.records for s in snapshots.values())
    malformed = sum(s.report.malformed for s in snapshots.values())

    with open(os.path.join(out, "events.txt"), encoding="utf-8") as fh:
        events: list[FramedEvent] = list(fh.read().splitlines())
    with open(os.path.join(out, "expected.txt"), encoding="utf-8") as fh:
        expected = sum(1 for _ in fh)
    batches = [events[i : i + batch] for i in range(0, len(events), batch)]
    date = syslog_date(0)

    def match_all(matcher: Matcher, stats: MatchStats) -> int:
        lines = 0
        for chunk in batches:
            lines += len(matcher.match(chunk, date=date, finished=True, stats=stats))
        return lines

    stats = MatchStats()
    matcher = Matcher(config, store)
    gc.collect()
    started = time.perf_counter()
    cpu_started = time.process_time()
    lines = match_all(matcher, stats)
    match_s = time.perf_counter() - started
    match_cpu = time.process_time() - cpu_started

    result: dict[str, Any] = {
        "indicators": records,
        "malformed": malformed,
        "feed_bytes": feed_bytes,
        "parse_seconds": parse_s,
        "load_seconds": load_s,
        "load_cpu_seconds": load_cpu,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "rss_peak": peak,
        "store_nbytes": store.nbytes,
        "snapshot_array_bytes": arrays,
        "events": len(events),
        "events_bytes": os.path.getsize(os.path.join(out, "events.txt")),
        "match_seconds": match_s,
        "match_cpu_seconds": match_cpu,
        "detections": stats.detections,
        "expected_detections": expected,
        "output_lines": lines,
    }
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        match_all(Matcher(config, store), MatchStats())
        prof.disable()
        text = io.StringIO()
        st = pstats.Stats(prof, stream=text)
        st.sort_stats("tottime").print_stats(25)
        st.sort_stats("cumulative").print_stats(20)
        result["profile"] = text.getvalue()
    return result


def measure(out: str, batch: int, profile: bool) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", out, "--batch", str(batch)]
    if profile:
        cmd.append("--profile")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {out} failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


# -- report ---------------------------------------------------------------------------------------

COLUMNS = (
    "indicators",
    "feeds MB",
    "load s",
    "RSS +MB",
    "peak MB",
    "RSS B/ind",
    "struct B/ind",
    "RSS/feed",
    "events/s",
    "grep ev/s",
    "tg/grep",
    "grep scan ev/s",
    "tg/scan",
    "check",
)


def _grep_cells(r: dict[str, Any], eps: float) -> list[str]:
    """grep events/s (wall, and scan only = wall minus the run on /dev/null) and threatgate's ratio to each."""
    status = r.get("grep_status")
    if status is None:
        return ["skipped", "-", "-", "-"]
    if status == "timeout":
        return [f"timeout {r['grep_seconds']:.0f} s", "-", "-", "-"]
    if status == "oom":
        return [f"OOM > {r['grep_mem_limit'] / 2**30:.3g} GiB", "-", "-", "-"]
    grep_eps = r["events"] / r["grep_seconds"]
    cells = [f"{grep_eps:,.0f}", f"{eps / grep_eps:.3f}"]
    setup = r.get("grep_setup_seconds")
    if setup is not None and r["grep_seconds"] > setup:
        scan_eps = r["events"] / (r["grep_seconds"] - setup)
        cells += [f"{scan_eps:,.0f}", f"{eps / scan_eps:.3f}"]
    else:
        cells += ["-", "-"]
    return cells


def row(r: dict[str, Any]) -> list[str]:
    n = r["indicators"]
    rss = r["rss_after"] - r["rss_before"]
    eps = r["events"] / r["match_seconds"]
    grep = _grep_cells(r, eps)
    ok = r["detections"] == r["expected_detections"] and r["output_lines"] == r["events"] + r["detections"]
    return [
        f"{n:,}",
        f"{r['feed_bytes'] / 1e6:,.0f}",
        f"{r['load_seconds']:.1f}",
        f"{rss / 1e6:,.0f}",
        f"{r['rss_peak'] / 1e6:,.0f}",
        f"{rss / n:.0f}",
        f"{(r['store_nbytes'] + r['snapshot_array_bytes']) / n:.0f}",
        f"{rss / r['feed_bytes']:.2f}x",
        f"{eps:,.0f}",
        grep[0],
        grep[1],
        grep[2],
        grep[3],
        "ok" if ok else f"MISMATCH {r['detections']}/{r['expected_detections']}",
    ]


def print_table(columns: tuple[str, ...] | list[str], rows: list[list[str]]) -> None:
    """One table twice: aligned for the terminal, then as Markdown for docs/performance.md (every bench)."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
    print()
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---:" for _ in columns) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def print_tables(results: list[dict[str, Any]]) -> None:
    print()
    print_table(COLUMNS, [row(r) for r in results])
    print()
    for r in results:
        extra = []
        if r.get("generate_seconds") is not None:
            extra.append(f"generated in {r['generate_seconds']:.1f} s")
        if r.get("grep_status") == "ok":
            extra.append(
                f"grep {r['grep_seconds']:.2f} s (of which {r.get('grep_setup_seconds') or 0:.2f} s on /dev/null), "
                f"peak RSS {r['grep_peak_rss'] / 1e6:,.0f} MB, {r['grep_lines']} matching lines"
            )
        elif r.get("grep_status"):
            extra.append(
                f"grep {r['grep_status']} after {r['grep_seconds']:.0f} s, peak RSS {r['grep_peak_rss'] / 1e6:,.0f} MB"
            )
        print(
            f"{r['indicators']:,} indicators: parse {r['parse_seconds']:.1f} s + store "
            f"{r['load_seconds'] - r['parse_seconds']:.1f} s; baseline RSS {r['rss_before'] / 1e6:.0f} MB; "
            f"store.nbytes {r['store_nbytes'] / 1e6:.1f} MB + feed arrays {r['snapshot_array_bytes'] / 1e6:.1f} MB; "
            f"match {r['match_seconds']:.2f} s wall / {r['match_cpu_seconds']:.2f} s CPU for {r['events']:,} events "
            f"({r['events_bytes'] / r['events']:.0f} B/event, {r['detections']} detections)"
            + ("; " + "; ".join(extra) if extra else "")
        )
    big = max(results, key=lambda r: r["indicators"])
    n = big["indicators"]
    eps = big["events"] / big["match_seconds"]
    bpi = (big["rss_after"] - big["rss_before"]) / n
    print()
    print(f"targets (at {n:,} indicators; they are set for 10,000,000):")
    print(f"  events/s per core  {eps:>12,.0f}  target >= {TARGET_EPS:,}  {'met' if eps >= TARGET_EPS else 'NOT met'}")
    print(
        f"  RSS B/indicator    {bpi:>12.0f}  target <= {TARGET_BYTES_PER_INDICATOR}  "
        f"{'met' if bpi <= TARGET_BYTES_PER_INDICATOR else 'NOT met'}"
    )
    print(
        f"  load seconds       {big['load_seconds']:>12.1f}  target <= {TARGET_LOAD_S:.0f}  "
        f"{'met' if big['load_seconds'] <= TARGET_LOAD_S else 'NOT met'}"
    )
    print(
        f"  RSS / feed bytes   {(big['rss_after'] - big['rss_before']) / big['feed_bytes']:>11.2f}x  "
        f"(Zeek intel: {ZEEK_RSS_PER_FEED_BYTE})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--indicators", default="100000,1000000", help="comma-separated sizes")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--hit-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256, help="events per Matcher.match call")
    parser.add_argument("--data-dir", default=DEFAULT_DATA)
    parser.add_argument("--grep-timeout", type=float, default=300.0)
    parser.add_argument(
        "--grep-mem-limit", type=float, help="GiB of address space for grep (default: half of MemAvailable, at most 8)"
    )
    parser.add_argument("--no-grep", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile the matching loop of the smallest size")
    parser.add_argument("--json", dest="json_out", help="also write the raw results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        json.dump(worker(args.worker, args.batch, args.profile), sys.stdout)
        return

    grep_limit = int(args.grep_mem_limit * 2**30) if args.grep_mem_limit else default_grep_limit()
    sizes = sorted(int(s.replace("_", "")) for s in args.indicators.split(",") if s.strip())
    results: list[dict[str, Any]] = []
    for size in sizes:
        print(f"== {size:,} indicators", file=sys.stderr, flush=True)
        out, gen_s = ensure_data(args.data_dir, size, args.events, args.hit_rate, args.seed)
        result = measure(out, args.batch, args.profile and size == sizes[0])
        result["generate_seconds"] = gen_s
        print(
            f"  load {result['load_seconds']:.1f} s, {result['events'] / result['match_seconds']:,.0f} events/s",
            file=sys.stderr,
            flush=True,
        )
        if not args.no_grep:
            result.update(run_grep(out, args.grep_timeout, grep_limit))
            print(f"  grep {result['grep_status']} {result['grep_seconds']:.1f} s", file=sys.stderr, flush=True)
        results.append(result)
        if args.json_out:  # after every size, so a later failure keeps what was measured
            with open(args.json_out, "w", encoding="utf-8") as fh:
                json.dump(results, fh, indent=1)
    print(f"\ncode {code_version()}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, batch {args.batch} events")
    print_tables(results)
    for r in results:
        if "profile" in r:
            print(f"\ncProfile of the matching loop at {r['indicators']:,} indicators:\n")
            print(r["profile"])


if __name__ == "__main__":
    main()
