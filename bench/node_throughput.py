"""Node benchmark: feed load, restart, memory per indicator and per-core matching throughput of both engines
beside GNU grep.

    .venv/bin/python bench/node_throughput.py --indicators 100000,1000000,10000000 --events 200000
    .venv/bin/python bench/node_throughput.py --indicators 100000 --engines reference --profile

For each size the data (``threatgate feeds generate``) goes to ``bench/data/<size>/`` (``--data-dir``) and is
reused while ``stamp.json`` shows the same arguments and generator source.  Each size is measured in a fresh
subprocess so its RSS is not polluted by the previous one:

* load: ``load_feed`` for every ``<Feed>`` of the generated node.conf, then ``IndicatorStore``, wall and CPU
  seconds;
* memory: VmRSS after the load and after one matcher per engine is built, minus VmRSS before the load (the
  interpreter with numpy and threatgate imported), per indicator and relative to the feed bytes on disk;
  VmHWM (peak) too; what the store's structures hold when this build says (``store.nbytes``);
* matching, per engine of ``--engines``: ``make_matcher(config, store, engine=NAME).match(batch,
  finished=True)`` over events.txt in batches of 256 events (one 64 KiB read), one thread, cold caches;
  events per CPU-second of that loop is the per-core figure.  The detections are checked against
  expected.txt and the engines' output lines against each other (byte-identical, by digest).

Then a real node is started from the feeds and restarted on its snapshots (``node_e2e.measure_restart``,
when the build has ``<Feeds snapshot_dir>``): seconds to the first detection, and the restarted node's RSS
per indicator over a node without feeds.

The anchor is ``LC_ALL=C grep -F -c -f patterns.txt events.txt`` with every indicator's literal text as
a pattern (masks and ``*.`` domains without their stars; CIDRs as written, which never match): a C
multi-pattern substring scan over the same bytes.  It does less than threatgate (no extraction, no
normalisation, no CIDR or sub-domain semantics, no output), so it is an upper bound for "as fast as a
byte scan", not an equivalent."""

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
TARGET_BYTES_PER_INDICATOR = 60  # RSS at 10 M indicators, record context included (issue 13)
TARGET_LOAD_S = 20.0  # 10 M indicators parsed and indexed
TARGET_RESTART_S = 2.0  # node restart with unchanged feeds (snapshot mapped), ready to match
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


def _grep_once(patterns: str, target: str, timeout: float, mem_limit: int) -> tuple[str, float, float, int, int]:
    """(status, wall seconds, CPU seconds, matching lines, peak RSS bytes) of one ``grep -F -c -f`` run.

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
    cpu = usage.ru_utime + usage.ru_stime
    if proc.returncode == -signal.SIGKILL and elapsed >= timeout:
        return "timeout", elapsed, cpu, 0, peak
    if proc.returncode not in (0, 1):
        if b"memory exhausted" in stderr or proc.returncode == -signal.SIGKILL:
            return "oom", elapsed, cpu, 0, peak
        raise RuntimeError(f"grep failed ({proc.returncode}): {stderr.decode(errors='replace').strip()}")
    return "ok", elapsed, cpu, int(stdout.strip() or 0), peak


def run_grep(out: str, timeout: float, mem_limit: int) -> dict[str, Any]:
    """grep over events.txt, and over /dev/null to separate building the pattern matcher from scanning."""
    patterns = grep_patterns(out)
    events = os.path.join(out, "events.txt")
    result: dict[str, Any] = {"grep_patterns_bytes": os.path.getsize(patterns), "grep_mem_limit": mem_limit}
    status, elapsed, cpu, lines, peak = _grep_once(patterns, events, timeout, mem_limit)
    result.update(grep_status=status, grep_seconds=elapsed, grep_cpu_seconds=cpu, grep_lines=lines, grep_peak_rss=peak)
    if status == "ok":
        setup = _grep_once(patterns, os.devnull, timeout, mem_limit)
        result["grep_setup_seconds"] = setup[1] if setup[0] == "ok" else None
        result["grep_setup_cpu_seconds"] = setup[2] if setup[0] == "ok" else None
    return result


def default_grep_limit() -> int:
    """Half of MemAvailable, at most 8 GiB."""
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return min(8 << 30, int(line.split()[1]) * 1024 // 2)
    return 8 << 30


# -- the measuring subprocess --------------------------------------------------------------------


def structure_bytes(store: Any, snapshots: dict[int, Any]) -> int | None:
    """What the index structures hold: ``store.nbytes`` plus the per-feed arrays that exist in this build.

    Read with getattr so the bench runs on both sides of the store rewrite (issue 13): None when the store
    does not say.
    """
    total = getattr(store, "nbytes", None)
    if total is None:
        return None
    for snap in snapshots.values():
        for name in ("kinds", "keys", "offsets", "lengths"):
            array = getattr(snap, name, None)
            if hasattr(array, "nbytes"):  # numpy arrays, memoryviews
                total += int(array.nbytes)
            elif hasattr(array, "itemsize"):  # array.array
                total += int(array.itemsize * len(array))
    return int(total)


def worker(out: str, batch: int, profile: bool, engines: list[str]) -> dict[str, Any]:
    """Load and match in this (fresh) process; returns the measurements.

    The feeds are loaded once; then one matcher per engine is built through ``make_matcher`` (what the node
    does) and timed over the same events.  RSS is read after the load and again after every matcher is
    built, so an engine's own structures count in its bytes per indicator.
    """
    import numpy  # noqa: F401  (imported before the baseline so it is not counted as feed memory)

    from threatgate.config.node import load_node_config
    from threatgate.node.engine import make_matcher
    from threatgate.node.eventpath import syslog_date
    from threatgate.node.feeds import FeedSnapshot, load_feed
    from threatgate.node.matcher import Matcher, MatchStats
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

    feed_bytes = sum(os.path.getsize(s.settings.path) for s in snapshots.values())
    records = sum(s.report.records for s in snapshots.values())
    malformed = sum(s.report.malformed for s in snapshots.values())

    def match_all(matcher: Matcher, stats: MatchStats) -> tuple[int, str]:
        """(output lines, sha256 of all of them in order): two engines agree when the digests do."""
        lines = 0
        digest = hashlib.sha256()
        for chunk in batches:
            answer = matcher.match(chunk, date=date, finished=True, stats=stats)
            lines += len(answer)
            digest.update("".join(answer).encode("utf-8", "surrogateescape"))
        return lines, digest.hexdigest()

    runs: dict[str, dict[str, Any]] = {}
    matchers: dict[str, Matcher] = {}
    for name in engines:  # every matcher first, so the RSS after them holds all their structures
        gc.collect()
        rss = vm_status("VmRSS")
        started = time.perf_counter()
        matchers[name] = make_matcher(config, store, engine=name)
        runs[name] = {"build_seconds": time.perf_counter() - started, "build_rss": vm_status("VmRSS") - rss}
    gc.collect()
    rss_engines = vm_status("VmRSS")

    with open(os.path.join(out, "events.txt"), encoding="utf-8") as fh:
        events: list[FramedEvent] = list(fh.read().splitlines())
    with open(os.path.join(out, "expected.txt"), encoding="utf-8") as fh:
        expected = sum(1 for _ in fh)
    batches = [events[i : i + batch] for i in range(0, len(events), batch)]
    date = syslog_date(0)
    for name in engines:
        stats = MatchStats()
        gc.collect()
        started = time.perf_counter()
        cpu_started = time.process_time()
        lines, digest = match_all(matchers[name], stats)
        runs[name].update(
            match_seconds=time.perf_counter() - started,
            match_cpu_seconds=time.process_time() - cpu_started,
            detections=stats.detections,
            output_lines=lines,
            output_digest=digest,
        )

    result: dict[str, Any] = {
        "indicators": records,
        "malformed": malformed,
        "feed_bytes": feed_bytes,
        "parse_seconds": parse_s,
        "load_seconds": load_s,
        "load_cpu_seconds": load_cpu,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "rss_engines": rss_engines,
        "rss_peak": peak,
        "struct_bytes": structure_bytes(store, snapshots),
        "events": len(events),
        "events_bytes": os.path.getsize(os.path.join(out, "events.txt")),
        "expected_detections": expected,
        "engines": runs,
    }
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        match_all(make_matcher(config, store, engine=engines[0]), MatchStats())
        prof.disable()
        text = io.StringIO()
        st = pstats.Stats(prof, stream=text)
        st.sort_stats("tottime").print_stats(25)
        st.sort_stats("cumulative").print_stats(20)
        result["profile"] = f"engine {engines[0]}\n" + text.getvalue()
    return result


def measure(out: str, batch: int, profile: bool, engines: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", out, "--batch", str(batch)]
    cmd += ["--engines", ",".join(engines)]
    if profile:
        cmd.append("--profile")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {out} failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


# -- report ---------------------------------------------------------------------------------------


def eps_per_core(r: dict[str, Any], engine: str) -> float:
    """Events per CPU-second of the matching loop (one thread, so per core, whatever else the machine runs)."""
    run = r["engines"][engine]
    return float(r["events"] / max(run["match_cpu_seconds"], 1e-9))


def grep_per_core(r: dict[str, Any]) -> float | None:
    """grep's events per CPU-second (whole run, matcher build included), None when it did not finish."""
    if r.get("grep_status") != "ok":
        return None
    return float(r["events"] / max(r["grep_cpu_seconds"], 1e-9))


def grep_cell(r: dict[str, Any]) -> str:
    status = r.get("grep_status")
    if status is None:
        return "skipped"
    if status == "timeout":
        return f"timeout {r['grep_seconds']:.0f} s"
    if status == "oom":
        return f"OOM > {r['grep_mem_limit'] / 2**30:.3g} GiB"
    return f"{grep_per_core(r):,.0f}"


def grep_scan_cell(r: dict[str, Any]) -> str:
    """grep scanning only: CPU of the run minus CPU of the run on /dev/null (building the pattern matcher)."""
    setup = r.get("grep_setup_cpu_seconds")
    if r.get("grep_status") != "ok" or setup is None or r["grep_cpu_seconds"] <= setup:
        return "-"
    return f"{r['events'] / (r['grep_cpu_seconds'] - setup):,.0f}"


def restart_cell(r: dict[str, Any]) -> str:
    restart = r.get("restart")
    if not restart:
        return "-"
    if restart.get("seconds") is None:
        return "n/a"
    return f"{restart['seconds']:.2f}"


def node_bytes_cell(r: dict[str, Any]) -> str:
    """The restarted node's RSS per indicator, total / its own (not file-backed) memory; "-" when not measured."""
    restart = r.get("restart") or {}
    if restart.get("rss_per_indicator") is None:
        return "-"
    return f"{restart['rss_per_indicator']:.0f} / {restart['private_per_indicator']:.0f}"


def engine_check(r: dict[str, Any], engine: str) -> str:
    """ok when the detections equal expected.txt and every event got its finished line."""
    run = r["engines"][engine]
    if run["detections"] != r["expected_detections"]:
        return f"MISMATCH {run['detections']}/{r['expected_detections']}"
    if run["output_lines"] != r["events"] + run["detections"]:
        return f"LINES {run['output_lines']}"
    return "ok"


def columns_for(engines: list[str]) -> list[str]:
    cols = [
        "indicators",
        "feeds MB",
        "load s",
        "node start s",
        "restart s",
        "RSS B/ind",
        "node B/ind all / own",
        "peak MB",
    ]
    for name in engines:
        cols += [f"{name} ev/s/core", f"{name}/grep"]
    if len(engines) > 1:
        cols.append(f"{engines[0]}/{engines[1]}")
    cols += ["grep ev/s/core", "grep scan ev/s/core", "same lines", "check"]
    return cols


def row(r: dict[str, Any], engines: list[str]) -> list[str]:
    n = r["indicators"]
    rss = r["rss_engines"] - r["rss_before"]
    grep = grep_per_core(r)
    cells = [
        f"{n:,}",
        f"{r['feed_bytes'] / 1e6:,.0f}",
        f"{r['load_seconds']:.1f}",
        f"{r['restart']['start_seconds']:.1f}" if (r.get("restart") or {}).get("start_seconds") else "-",
        restart_cell(r),
        f"{rss / n:.0f}",
        node_bytes_cell(r),
        f"{r['rss_peak'] / 1e6:,.0f}",
    ]
    for name in engines:
        eps = eps_per_core(r, name)
        cells += [f"{eps:,.0f}", f"{eps / grep:.2f}" if grep else "-"]
    if len(engines) > 1:
        cells.append(f"{eps_per_core(r, engines[0]) / eps_per_core(r, engines[1]):.2f}x")
    digests = {r["engines"][name]["output_digest"] for name in engines}
    checks = {name: engine_check(r, name) for name in engines}
    bad = [f"{name}: {c}" for name, c in checks.items() if c != "ok"]
    cells += [
        grep_cell(r),
        grep_scan_cell(r),
        "-" if len(engines) == 1 else "yes" if len(digests) == 1 else "NO",
        "ok" if not bad else "; ".join(bad),
    ]
    return cells


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


def detail_line(r: dict[str, Any], engines: list[str]) -> str:
    parts = [
        f"parse {r['parse_seconds']:.1f} s + store {r['load_seconds'] - r['parse_seconds']:.1f} s "
        f"({r['load_cpu_seconds']:.1f} CPU-s)",
        f"baseline RSS {r['rss_before'] / 1e6:.0f} MB, +{(r['rss_after'] - r['rss_before']) / 1e6:,.0f} MB after "
        f"the load, +{(r['rss_engines'] - r['rss_before']) / 1e6:,.0f} MB with the matchers",
    ]
    if r.get("struct_bytes") is not None:
        parts.append(f"structures {r['struct_bytes'] / r['indicators']:.0f} B/ind")
    for name in engines:
        run = r["engines"][name]
        parts.append(
            f"{name}: build {run['build_seconds']:.2f} s (+{run['build_rss'] / 1e6:,.0f} MB), match "
            f"{run['match_seconds']:.2f} s wall / {run['match_cpu_seconds']:.2f} s CPU, {run['detections']} detections"
        )
    parts.append(f"{r['events']:,} events of {r['events_bytes'] / r['events']:.0f} B")
    if r.get("generate_seconds") is not None:
        parts.append(f"generated in {r['generate_seconds']:.1f} s")
    if r.get("grep_status") == "ok":
        parts.append(
            f"grep {r['grep_seconds']:.2f} s wall / {r['grep_cpu_seconds']:.2f} s CPU (of which "
            f"{r.get('grep_setup_cpu_seconds') or 0:.2f} s CPU on /dev/null), peak RSS "
            f"{r['grep_peak_rss'] / 1e6:,.0f} MB, {r['grep_lines']} matching lines"
        )
    elif r.get("grep_status"):
        parts.append(
            f"grep {r['grep_status']} after {r['grep_seconds']:.0f} s, peak RSS {r['grep_peak_rss'] / 1e6:,.0f} MB"
        )
    restart = r.get("restart")
    if restart:
        parts.append(restart["summary"])
    return f"{r['indicators']:,} indicators: " + "; ".join(parts)


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_targets(results: list[dict[str, Any]], engines: list[str]) -> None:
    big = max(results, key=lambda r: r["indicators"])
    n = big["indicators"]
    bpi = (big["rss_engines"] - big["rss_before"]) / n
    print()
    print(f"targets (at {n:,} indicators; they are set for 10,000,000):")
    for name in engines:
        eps = eps_per_core(big, name)
        print(f"  {name + ' ev/s/core':<22} {eps:>12,.0f}  target >= {TARGET_EPS:,}  {_verdict(eps >= TARGET_EPS)}")
    print(
        f"  {'RSS B/indicator':<22} {bpi:>12.0f}  target <= {TARGET_BYTES_PER_INDICATOR}  "
        f"{_verdict(bpi <= TARGET_BYTES_PER_INDICATOR)}"
    )
    node_bpi = (big.get("restart") or {}).get("rss_per_indicator")
    if node_bpi is not None:
        own = big["restart"]["private_per_indicator"]
        print(
            f"  {'node RSS B/ind':<22} {node_bpi:>12.0f}  target <= {TARGET_BYTES_PER_INDICATOR}  "
            f"{_verdict(node_bpi <= TARGET_BYTES_PER_INDICATOR)}  (the restarted node after the events, over one "
            f"without feeds; {own:.0f} B/ind not file-backed: {_verdict(own <= TARGET_BYTES_PER_INDICATOR)})"
        )
    load = big["load_seconds"]
    verdict = _verdict(load <= TARGET_LOAD_S)
    print(f"  {'load s (in process)':<22} {load:>12.1f}  target <= {TARGET_LOAD_S:.0f}  {verdict}")
    start = (big.get("restart") or {}).get("start_seconds")
    if start is not None:
        print(
            f"  {'node start s':<22} {start:>12.1f}  target <= {TARGET_LOAD_S:.0f}  {_verdict(start <= TARGET_LOAD_S)}"
            "  (spawn to first detection, parsing the feeds)"
        )
    restart = (big.get("restart") or {}).get("seconds")
    if restart is None:
        why = (big.get("restart") or {}).get("summary", "not measured (--no-restart)")
        print(f"  {'restart s':<22} {'-':>12}  target <= {TARGET_RESTART_S:.0f}  {why}")
    else:
        print(
            f"  {'restart s':<22} {restart:>12.2f}  target <= {TARGET_RESTART_S:.0f}  "
            f"{_verdict(restart <= TARGET_RESTART_S)}"
        )
    print(
        f"  {'RSS / feed bytes':<22} {(big['rss_engines'] - big['rss_before']) / big['feed_bytes']:>11.2f}x  "
        f"(Zeek intel: {ZEEK_RSS_PER_FEED_BYTE})"
    )


def print_tables(results: list[dict[str, Any]], engines: list[str]) -> None:
    print()
    print_table(columns_for(engines), [row(r, engines) for r in results])
    print()
    for r in results:
        print(detail_line(r, engines))
    print_targets(results, engines)


def parse_engines(text: str) -> list[str]:
    from threatgate.node.engine import ENGINES

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ENGINES]
    if not names or unknown:
        raise SystemExit(f"--engines: use one or more of {', '.join(ENGINES)} (got {text!r})")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--indicators", default="100000,1000000", help="comma-separated sizes")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--hit-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256, help="events per Matcher.match call")
    parser.add_argument("--engines", default="compiled,reference", help="engines to measure, in this order")
    parser.add_argument("--data-dir", default=DEFAULT_DATA)
    parser.add_argument("--grep-timeout", type=float, default=300.0)
    parser.add_argument(
        "--grep-mem-limit", type=float, help="GiB of address space for grep (default: half of MemAvailable, at most 8)"
    )
    parser.add_argument("--no-grep", action="store_true")
    parser.add_argument("--no-restart", action="store_true", help="skip the node start and restart measurement")
    parser.add_argument("--profile", action="store_true", help="cProfile the matching loop of the smallest size")
    parser.add_argument("--json", dest="json_out", help="also write the raw results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    engines = parse_engines(args.engines)

    if args.worker:
        json.dump(worker(args.worker, args.batch, args.profile, engines), sys.stdout)
        return

    grep_limit = int(args.grep_mem_limit * 2**30) if args.grep_mem_limit else default_grep_limit()
    sizes = sorted(int(s.replace("_", "")) for s in args.indicators.split(",") if s.strip())
    results: list[dict[str, Any]] = []
    for size in sizes:
        print(f"== {size:,} indicators", file=sys.stderr, flush=True)
        out, gen_s = ensure_data(args.data_dir, size, args.events, args.hit_rate, args.seed)
        result = measure(out, args.batch, args.profile and size == sizes[0], engines)
        result["generate_seconds"] = gen_s
        speeds = ", ".join(f"{name} {eps_per_core(result, name):,.0f}" for name in engines)
        print(f"  load {result['load_seconds']:.1f} s, events/s per core: {speeds}", file=sys.stderr, flush=True)
        if not args.no_grep:
            result.update(run_grep(out, args.grep_timeout, grep_limit))
            print(f"  grep {result['grep_status']} {result['grep_seconds']:.1f} s", file=sys.stderr, flush=True)
        if not args.no_restart:
            result["restart"] = measure_restart(out, engines[0])
            print(f"  {result['restart']['summary']}", file=sys.stderr, flush=True)
        results.append(result)
        if args.json_out:  # after every size, so a later failure keeps what was measured
            with open(args.json_out, "w", encoding="utf-8") as fh:
                json.dump(results, fh, indent=1)
    print(
        f"\ncode {code_version()}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, batch {args.batch} events, "
        f"engines {', '.join(engines)}"
    )
    print_tables(results, engines)
    for r in results:
        if "profile" in r:
            print(f"\ncProfile of the matching loop at {r['indicators']:,} indicators:\n")
            print(r["profile"])


def measure_restart(out: str, engine: str) -> dict[str, Any]:
    """Node start from the feeds, then restart from the snapshot directory (bench/node_e2e.py does the work).

    Imported here, not at the top: node_e2e imports this module.
    """
    import node_e2e  # bench/ is on sys.path when this file runs as a script

    return node_e2e.measure_restart(out, engine)


if __name__ == "__main__":
    main()
