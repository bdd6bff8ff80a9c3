"""Node workers benchmark: one node with 1 and with N worker processes, client direct and through the balancer.

    .venv/bin/python bench/node_workers.py --data-dir /work/bench-data                 # 1 M indicators, 1 vs 2
    .venv/bin/python bench/node_workers.py --data-dir /work/bench-data --indicators 10000000   # the memory figure
    .venv/bin/python bench/node_workers.py --workers 1 --paths direct                  # a build without workers

Built on ``node_e2e.py``: the same data (``--data-dir``, ``node_throughput.ensure_data``), the same
firewall events and seven rules, the same byte-for-byte check against the answer of the same engine in
this process.  What one run does:

1. **In process**, once: the engine's answer to every event (``node_e2e.in_process``), cut into one
   block per event (each ends with its ``LookupFinished`` line).
2. **One node per worker count W** of ``--workers`` (default ``1,2``): a real ``threatgate node`` whose
   config has ``<ScanSettings><Workers>W</Workers></ScanSettings>`` and an ``<HTTPServer>`` (its
   ``/readyz`` says how many workers are ready and how many event connections a balancer should open).
   A build that does not know ``<Workers>`` is run without the element when W is 1 and refused for more.
   The nodes share one snapshot directory, so only the first builds the snapshots.  Ready when it logs
   "node listening for events" and ``/readyz`` answers 200 with every worker ready (when it says).
3. **direct**: W client connections to the node (the master gives each to the worker with the fewest;
   ``--connections`` sets another number), the events cut into as many consecutive parts, each part
   streamed on its connection by one ``sendall`` thread while another reads, after a warm-up of
   ``--warmup`` events on each connection.  Each connection's reply bytes must equal the in-process
   blocks of its events.  Before each measured stream the bench waits until the node has closed every
   earlier connection, so the master spreads the new ones over idle workers.
4. **balancer**: a real ``threatgate balancer`` in front of the node, its ``<Instance>`` without
   ``connections`` (auto: as many lanes as the node's ``/readyz`` says) and with ``api_port`` (so it
   polls readiness); one client connection carries every event.  The reply must equal the in-process
   answer with the leading request number of every line taken off (the balancer strips its own id;
   the client's number is not echoed back, docs/balancer.md).
5. **Figures**: events/s (wall: the first byte sent to the last line read), node CPU-seconds per
   million events (utime + stime from ``/proc/<pid>/stat`` of the node and of every child process:
   master and workers; the balancer's apart), the CPU of each worker (how evenly the work spread), and
   after both paths each worker's memory: RSS, PSS and USS from ``/proc/<pid>/smaps_rollup``
   (``threatgate.node.procmem``).  RSS counts the shared snapshot pages in every worker that touched
   them; USS is what one more worker adds (design: docs/architecture.md, "Workers").

Targets (issue 14): two workers >= 1.7x one worker's events/s, client direct; the USS of each extra
worker <= 15 % of the first worker's RSS at 10 M indicators.

Exit status: 0 when every run is valid, whether or not the targets are met; 1 when a run lost or changed
answers; 2 when the set-up failed.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

import node_e2e  # bench/ is on sys.path when this file runs as a script
import node_throughput
from api_lookup import SetupError, free_port, stop_group, tail, tcp_table
from threatgate.node import procmem

TARGET_SPEEDUP = 1.7  # 2 workers / 1 worker, events/s, client direct
TARGET_EXTRA_USS = 0.15  # an extra worker's USS / the first worker's RSS, at 10 M indicators
MEMORY_TARGET_AT = 10_000_000
WORKER_MODULE = b"threatgate.node.worker"  # python -m threatgate.node.worker: a worker's command line
PATHS = ("direct", "balancer")
BALANCER_FINISHED = b"LookupFinished\n"

NODE_EXTRA = """\
  <HTTPServer>
    <ConnectionString>127.0.0.1:{api_port}</ConnectionString>
    <CertificatePath>{run_dir}/tls/node.pem</CertificatePath>
    <PrivateKeyPath>{run_dir}/tls/node.key</PrivateKeyPath>
    <Database>{run_dir}/node.sqlite3</Database>
  </HTTPServer>
{scan}</Configuration>
"""

SCAN = "  <ScanSettings>\n    <Workers>{workers}</Workers>\n  </ScanSettings>\n"

BALANCER_CONF = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- node_workers.py: one node; connections= left out (auto: the lanes the node's /readyz asks for). -->
<Config>
  <Balancer matching_port="{port}" api_port="{api_port}" cybertrace_port="{alert_port}"
            scanners_count="20">127.0.0.1</Balancer>
  <Instances>
    <Instance matching_port="{node_port}" api_port="{node_api_port}" enabled="true">127.0.0.1</Instance>
  </Instances>
  <HealthCheck interval="1" timeout="2" rise="1" fall="3"/>
  <ReplyTimeout>60</ReplyTimeout>
  <MaxInflightEvents>20000</MaxInflightEvents>
  <MaxPendingEvents>100000</MaxPendingEvents>
</Config>
"""


# -- the expected answers ---------------------------------------------------------------------------


def event_blocks(answer: bytes, events: int) -> list[bytes]:
    """The in-process answer cut after each finished line: one block per event (its detections, then
    its ``<n> LookupFinished`` line)."""
    blocks = []
    start = 0
    for _ in range(events):
        end = answer.index(node_e2e.FINISHED, start) + len(node_e2e.FINISHED)
        blocks.append(answer[start:end])
        start = end
    if start != len(answer):
        raise SetupError(f"the in-process answer has {len(answer) - start} bytes after its last finished line")
    return blocks


def parts_of(count: int, parts: int) -> list[range]:
    """``count`` events cut into ``parts`` consecutive ranges of about equal size."""
    cuts = [count * i // parts for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]


def through_balancer(answer: bytes) -> bytes:
    """What a client of the balancer reads for ``answer``: every line without its leading request number."""
    return re.sub(rb"(?m)^\d+ ", b"", answer)


# -- the node ---------------------------------------------------------------------------------------------


def workers_supported(out: str, run_dir: str) -> bool:
    """Whether this build accepts ``<ScanSettings><Workers>`` (unknown config names are errors)."""
    from threatgate.config.node import load_node_config
    from threatgate.errors import ConfigError

    probe = os.path.join(run_dir, "probe")
    os.makedirs(probe, exist_ok=True)
    path = write_node_config(out, probe, free_port(), free_port(), 2, True, os.path.join(probe, "snapshots"))
    try:
        load_node_config(path)
    except ConfigError as exc:
        if "ScanSettings" in str(exc) or "Workers" in str(exc):
            return False
        raise
    return True


def write_node_config(
    out: str, run_dir: str, port: int, api_port: int, workers: int, element: bool, snapshots: str
) -> str:
    """node_e2e's seven-rule config plus an <HTTPServer> and, when ``element``, <ScanSettings><Workers>."""
    path = node_e2e.node_config(out, run_dir, port, feeds_attrs=f' {node_e2e.SNAPSHOT_ATTRIBUTE}="{snapshots}"')
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    scan = SCAN.format(workers=workers) if element else ""
    text = text.replace("</Configuration>", NODE_EXTRA.format(api_port=api_port, run_dir=run_dir, scan=scan))
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def readyz(api_port: int) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of the node's ``/readyz`` (its self-signed certificate is not checked)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{api_port}/readyz", context=ctx, timeout=5) as reply:
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


def wait_workers_ready(
    proc: subprocess.Popen[bytes], api_port: int, workers: int, log: str, timeout: float
) -> dict[str, Any]:
    """Until ``/readyz`` answers 200 and, when it reports workers, all ``workers`` are ready; its body."""
    deadline = time.monotonic() + timeout
    last: tuple[int, dict[str, Any]] = (0, {})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SetupError(f"the node exited with {proc.returncode}:\n{tail(log)}")
        last = readyz(api_port)
        status, body = last
        ready = body.get("workers", {}).get("ready", workers) if isinstance(body.get("workers"), dict) else workers
        if status == 200 and ready >= workers:
            return body
        time.sleep(0.1)
    raise SetupError(f"the node's /readyz did not say ready within {timeout:.0f} s (last: {last}):\n{tail(log)}")


def worker_pids(node_pid: int, workers: int) -> list[int]:
    """The pids of the node's worker processes (by their command line), in ascending order; the node itself
    when it runs one worker in its own process."""
    found = []
    for pid in procmem.children(node_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if WORKER_MODULE in fh.read():
                    found.append(pid)
        except OSError:
            continue
    if not found and workers == 1:
        return [node_pid]
    if len(found) != workers:
        raise SetupError(f"the node has {len(found)} worker process(es), {workers} configured")
    return found


def cpu_of(pids: list[int]) -> dict[int, float]:
    """utime + stime of each process that is still there."""
    out = {}
    for pid in pids:
        seconds = procmem.cpu_seconds(pid)
        if seconds is not None:
            out[pid] = seconds
    return out


class CpuMeter:
    """CPU-seconds of a node (its own process and every child) and of the balancer over one measured window."""

    def __init__(self, node_pid: int, balancer_pid: int | None) -> None:
        self.node_pid = node_pid
        self.balancer_pid = balancer_pid
        self._before: dict[int, float] = {}
        self._balancer = 0.0

    def _node_pids(self) -> list[int]:
        return [self.node_pid, *procmem.children(self.node_pid)]

    def start(self) -> None:
        self._before = cpu_of(self._node_pids())
        self._balancer = (procmem.cpu_seconds(self.balancer_pid) or 0.0) if self.balancer_pid else 0.0

    def stop(self) -> tuple[dict[int, float], float]:
        """(CPU-seconds spent per node process in the window, the balancer's)."""
        after = cpu_of(self._node_pids())
        spent = {pid: seconds - self._before.get(pid, 0.0) for pid, seconds in after.items()}
        balancer = (procmem.cpu_seconds(self.balancer_pid) or 0.0) - self._balancer if self.balancer_pid else 0.0
        return spent, balancer


# -- the balancer -----------------------------------------------------------------------------------------


ESTABLISHED, CLOSE_WAIT = "01", "08"  # TCP states in /proc/net/tcp


def server_sockets(port: int, states: tuple[str, ...] = (ESTABLISHED,)) -> int:
    """The node's ends of TCP connections to 127.0.0.1:``port`` in ``states``, from /proc/net/tcp."""
    return sum(1 for f in tcp_table() if f[1].endswith(f":{port:04X}") and f[3] in states)


def wait_closed(port: int, timeout: float) -> None:
    """Until the node has closed its end of every connection to ``port`` (none ESTABLISHED or CLOSE_WAIT):
    the worker that served it has seen it close, so the master counts it no more when it spreads the next."""
    deadline = time.monotonic() + timeout
    while server_sockets(port, (ESTABLISHED, CLOSE_WAIT)):
        if time.monotonic() > deadline:
            raise SetupError(f"the node still holds connections to port {port} after {timeout:.0f} s")
        time.sleep(0.01)


def start_balancer(run_dir: str, port: int, node_port: int, node_api_port: int, lanes: int, timeout: float) -> Any:
    """A balancer in front of the node, once it has opened ``lanes`` event connections to it."""
    config = os.path.join(run_dir, "balancer.conf")
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(
            BALANCER_CONF.format(
                port=port,
                api_port=free_port(),
                alert_port=free_port(),
                node_port=node_port,
                node_api_port=node_api_port,
            )
        )
    log = os.path.join(run_dir, "balancer.log")
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "threatgate", "balancer", "--config", config, "--log-level", "inf"],
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SetupError(f"the balancer exited with {proc.returncode}:\n{tail(log)}")
        with open(log, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        if "balancer listening for events" in text and re.search(r"instance \S+ is UP", text):
            if server_sockets(node_port) >= lanes:
                return proc, log
        time.sleep(0.1)
    stop_group(proc)
    raise SetupError(
        f"the balancer did not open {lanes} event connection(s) to the node within {timeout:.0f} s:\n{tail(log)}"
    )


# -- streaming --------------------------------------------------------------------------------------------


@dataclass
class PathRun:
    """One measured stream (or set of parallel streams) through one path to one node."""

    workers: int
    path: str
    round: int
    connections: int
    events: int
    wall: float
    node_cpu: float
    worker_cpu: list[float]
    balancer_cpu: float
    valid: bool
    notes: list[str] = field(default_factory=list)

    @property
    def eps(self) -> float:
        return self.events / self.wall if self.wall else 0.0

    @property
    def cpu_per_million(self) -> float:
        return self.node_cpu / self.events * 1e6 if self.events else 0.0


def parallel_streams(
    port: int, payloads: list[bytes], tokens: list[bytes], wants: list[int], timeout: float
) -> tuple[list[node_e2e.Stream], float]:
    """Every payload on its own connection at once (node_e2e.stream each); (the streams, wall seconds)."""
    results: list[node_e2e.Stream | None] = [None] * len(payloads)

    def run(i: int) -> None:
        results[i] = node_e2e.stream(port, node_e2e.FLAGS + payloads[i], wants[i], tokens[i], timeout)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(payloads))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    wall = time.perf_counter() - started
    streams = [r if r is not None else node_e2e.Stream(0, error="did not finish") for r in results]
    return streams, wall


def check(streams: list[node_e2e.Stream], expected: list[bytes], wants: list[int]) -> list[str]:
    """What is wrong with the replies, one note per connection (empty: every reply byte for byte right)."""
    notes = []
    for i, (run, want, answer) in enumerate(zip(streams, wants, expected, strict=True)):
        if run.error:
            notes.append(f"connection {i}: {run.error}")
        elif run.finished != want:
            notes.append(f"connection {i}: {run.finished} finished lines for {want} events")
        elif run.digest != hashlib.sha256(answer).hexdigest():
            expected_lines = answer.count(b"\n")
            notes.append(
                f"connection {i}: reply bytes differ from the in-process answer "
                f"({run.lines} lines, {expected_lines} expected)"
            )
    return notes


def measure(
    workers: int,
    path: str,
    rnd: int,
    port: int,
    meter: CpuMeter,
    pids: list[int],
    payloads: list[bytes],
    expected: list[bytes],
    tokens: list[bytes],
    timeout: float,
) -> PathRun:
    wants = [p.count(b"\n") for p in payloads]
    meter.start()
    streams, wall = parallel_streams(port, payloads, tokens, wants, timeout)
    spent, balancer = meter.stop()
    notes = check(streams, expected, wants)
    valid = not notes
    per_worker = [spent.get(pid, 0.0) for pid in pids]
    if len(payloads) == len(pids) > 1 and min(per_worker) < 0.25 * max(per_worker):  # a figure, not an answer
        notes.append(f"WARNING: the connections were not spread over the workers (worker CPU-s {per_worker})")
    return PathRun(
        workers,
        path,
        rnd,
        len(payloads),
        sum(wants),
        wall,
        sum(spent.values()),
        per_worker,
        balancer,
        valid,
        notes,
    )


# -- one node ---------------------------------------------------------------------------------------------


@dataclass
class NodeResult:
    workers: int
    start_seconds: float
    readyz: dict[str, Any]
    runs: list[PathRun]
    memory: list[dict[str, int]]  # per worker: rss, pss, uss (bytes)
    master_memory: dict[str, int] | None
    log_notes: list[str]


def run_node(
    args: argparse.Namespace,
    out: str,
    run_dir: str,
    workers: int,
    element: bool,
    snapshots: str,
    lines: list[bytes],
    blocks: list[bytes],
) -> NodeResult:
    """Start a node with ``workers`` workers, run every path of ``args.paths`` on it, read its memory, stop it."""
    sub = os.path.join(run_dir, f"workers-{workers}")
    os.makedirs(sub)
    port, api_port = free_port(), free_port()
    config = write_node_config(out, sub, port, api_port, workers, element, snapshots)
    log = os.path.join(sub, "node.log")
    started = time.perf_counter()
    proc = node_e2e.spawn_node(config, log, args.engine)
    balancer = None
    runs: list[PathRun] = []
    try:
        node_e2e.wait_ready(proc, log, args.timeout)
        body = wait_workers_ready(proc, api_port, workers, log, args.timeout)
        start_s = time.perf_counter() - started
        pids = worker_pids(proc.pid, workers)
        count = len(lines)
        conns = args.connections or workers
        warm = [b"".join(lines[: args.warmup])] * conns
        warm_blocks = [b"".join(blocks[: args.warmup])] * conns
        if "direct" in args.paths:
            parts = parts_of(count, conns)
            payloads = [b"".join(lines[r.start : r.stop]) * args.repeat for r in parts]
            expected = [b"".join(blocks[r.start : r.stop]) * args.repeat for r in parts]
            tokens = [node_e2e.FINISHED] * conns
            meter = CpuMeter(proc.pid, None)
            warmed = measure(workers, "warm-up", 0, port, meter, pids, warm, warm_blocks, tokens, args.timeout)
            if not warmed.valid:
                raise SetupError(f"warm-up on the node failed: {warmed.notes}\n{tail(log)}")
            for rnd in range(1, args.rounds + 1):
                wait_closed(port, args.timeout)
                runs.append(
                    measure(workers, "direct", rnd, port, meter, pids, payloads, expected, tokens, args.timeout)
                )
                progress(runs[-1])
        if "balancer" in args.paths:
            lanes = int(body.get("event_connections", 1))
            balancer_port = free_port()
            balancer, balancer_log = start_balancer(sub, balancer_port, port, api_port, lanes, args.timeout)
            payload = [b"".join(lines) * args.repeat]
            expected = [through_balancer(b"".join(blocks)) * args.repeat]
            tokens = [BALANCER_FINISHED]
            meter = CpuMeter(proc.pid, balancer.pid)
            warm_one = [warm[0]]
            warmed = measure(
                workers,
                "warm-up",
                0,
                balancer_port,
                meter,
                pids,
                warm_one,
                [through_balancer(warm_blocks[0])],
                tokens,
                args.timeout,
            )
            if not warmed.valid:
                raise SetupError(f"warm-up through the balancer failed: {warmed.notes}\n{tail(balancer_log)}")
            for rnd in range(1, args.rounds + 1):
                run = measure(
                    workers, "balancer", rnd, balancer_port, meter, pids, payload, expected, tokens, args.timeout
                )
                if rnd == 1:
                    run.notes.append(f"{lanes} lane(s) from the balancer to the node")
                runs.append(run)
                progress(run)
        memory = []
        for pid in pids:
            m = procmem.memory(pid)
            if m is None:
                raise SetupError(f"worker {pid} is gone after the runs:\n{tail(log)}")
            memory.append(asdict(m))
        master = procmem.memory(proc.pid) if pids != [proc.pid] else None
    finally:
        stop_group(balancer)
        stop_group(proc, timeout=30)
    with open(log, encoding="utf-8", errors="replace") as fh:
        warnings = [line.strip() for line in fh if " WARNING " in line or " ERROR " in line]
    return NodeResult(
        workers,
        start_s,
        body,
        runs,
        memory,
        asdict(master) if master else None,
        [f"node log: {w}" for w in warnings[:5]],
    )


def progress(run: PathRun) -> None:
    print(
        f"  {run.workers} worker(s) {run.path} round {run.round}: {run.eps:,.0f} events/s, "
        f"{run.cpu_per_million:.2f} node CPU-s per M events" + ("" if run.valid else " INVALID"),
        file=sys.stderr,
        flush=True,
    )


# -- report -----------------------------------------------------------------------------------------------


def best(results: list[NodeResult], workers: int, path: str) -> PathRun | None:
    runs = [r for n in results if n.workers == workers for r in n.runs if r.path == path and r.valid]
    return max(runs, key=lambda r: r.eps) if runs else None


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def print_report(args: argparse.Namespace, results: list[NodeResult], nbytes: int, events: int) -> None:
    columns = (
        "workers",
        "path",
        "round",
        "conns",
        "events/s",
        "node CPU-s/M ev",
        "per worker CPU-s",
        "balancer CPU-s/M ev",
        "check",
    )
    rows = []
    for n in results:
        for r in n.runs:
            rows.append(
                [
                    str(r.workers),
                    r.path,
                    str(r.round),
                    str(r.connections),
                    f"{r.eps:,.0f}",
                    f"{r.cpu_per_million:.2f}",
                    " + ".join(f"{c:.2f}" for c in r.worker_cpu),
                    f"{r.balancer_cpu / r.events * 1e6:.2f}" if r.path == "balancer" else "-",
                    "ok" if r.valid else "INVALID",
                ]
            )
    print()
    node_throughput.print_table(columns, rows)
    print()
    mem_columns = ("workers", "process", "RSS MB", "PSS MB", "USS MB", "USS / first worker's RSS")
    mem_rows = []
    for n in results:
        first_rss = n.memory[0]["rss"] if n.memory else 0
        if n.master_memory:
            m = n.master_memory
            mem_rows.append([str(n.workers), "master", mb(m["rss"]), mb(m["pss"]), mb(m["uss"]), "-"])
        for i, m in enumerate(n.memory):
            name = "node (one process)" if n.master_memory is None else f"worker {i}"
            share = f"{m['uss'] / first_rss:.1%}" if i and first_rss else "-"
            mem_rows.append([str(n.workers), name, mb(m["rss"]), mb(m["pss"]), mb(m["uss"]), share])
    node_throughput.print_table(mem_columns, mem_rows)
    print()
    print(
        f"{args.indicators:,} indicators, {events:,} firewall events of {nbytes / max(events, 1):.0f} B "
        f"(streamed {args.repeat} time(s) per run), seven rules, "
        f"engine {args.engine}; node start (spawn to /readyz ready): "
        + ", ".join(f"{n.workers} worker(s) {n.start_seconds:.1f} s" for n in results)
    )
    for n in results:
        if "workers" in n.readyz or "event_connections" in n.readyz:
            print(
                f"  {n.workers} worker(s): /readyz workers={n.readyz.get('workers')} "
                f"event_connections={n.readyz.get('event_connections')}"
            )
        for r in n.runs:
            for note in r.notes:
                print(f"  {r.workers} worker(s) {r.path} round {r.round}: {note}")
        for note in n.log_notes:
            print(f"  {n.workers} worker(s): {note}")
    print()
    print("targets (issue 14):")
    one, two = best(results, 1, "direct"), best(results, 2, "direct")
    if one and two:
        ratio = two.eps / one.eps
        verdict = "met" if ratio >= TARGET_SPEEDUP else "NOT met"
        print(f"  2 workers / 1 worker, direct: {ratio:.2f}x (target >= {TARGET_SPEEDUP}x): {verdict}")
    else:
        print(f"  2 workers / 1 worker, direct (target >= {TARGET_SPEEDUP}x): n/a (needs valid direct runs of 1 and 2)")
    one_b, two_b = best(results, 1, "balancer"), best(results, 2, "balancer")
    if one_b and two_b:
        print(f"  2 workers / 1 worker, through the balancer: {two_b.eps / one_b.eps:.2f}x (no target)")
    shares = [m["uss"] / n.memory[0]["rss"] for n in results if n.master_memory is not None for m in n.memory[1:]]
    if shares:
        worst = max(shares)
        verdict = "met" if worst <= TARGET_EXTRA_USS else "NOT met"
        where = "" if args.indicators >= MEMORY_TARGET_AT else f" (stated at {MEMORY_TARGET_AT:,} indicators)"
        print(
            f"  extra worker's USS / first worker's RSS: {worst:.1%} "
            f"(target <= {TARGET_EXTRA_USS:.0%}){where}: {verdict}"
        )
    else:
        print(f"  extra worker's USS / first worker's RSS (target <= {TARGET_EXTRA_USS:.0%}): n/a (needs 2 workers)")


# -- main -------------------------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> int:
    counts = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    if not counts or min(counts) < 1:
        raise SetupError("--workers: one or more worker counts >= 1, e.g. 1,2")
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not args.paths or any(p not in PATHS for p in args.paths):
        raise SetupError(f"--paths: one or more of {', '.join(PATHS)}")
    out, _ = node_throughput.ensure_data(args.data_dir, args.indicators, args.events, args.hit_rate, args.seed)
    events = node_e2e.firewall_events(out, args.seed, args.sha256_rate, args.sha256_other)
    lines = [(e + "\n").encode("ascii") for e in events]
    args.warmup = min(args.warmup, len(lines))
    run_dir = tempfile.mkdtemp(prefix="tg-workers-")
    ok = True
    try:
        element = workers_supported(out, run_dir)
        if not element and max(counts) > 1:
            raise SetupError("this build has no <ScanSettings><Workers>: run it with --workers 1")
        print(f"== {args.indicators:,} indicators, {len(events):,} firewall events", file=sys.stderr, flush=True)
        ref_dir = os.path.join(run_dir, "reference")
        os.makedirs(ref_dir)
        reference = node_e2e.in_process(node_e2e.node_config(out, ref_dir, free_port()), events, [args.engine], 256)
        answer = reference[args.engine].answer
        blocks = event_blocks(answer, len(events))
        del reference, answer
        gc.collect()
        snapshots = os.path.join(run_dir, "snapshots")
        results = []
        for workers in counts:
            result = run_node(args, out, run_dir, workers, element, snapshots, lines, blocks)
            results.append(result)
            ok = ok and all(r.valid for r in result.runs)
        print(
            f"\ncode {node_throughput.code_version()}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
            f"<Workers> element {'written' if element else 'not known to this build: left out'}"
        )
        print_report(args, results, sum(map(len, lines)), len(lines))
        if args.json_out:
            with open(args.json_out, "w", encoding="utf-8") as fh:
                json.dump(
                    {
                        "indicators": args.indicators,
                        "events": len(lines),
                        "workers_element": element,
                        "nodes": [asdict(n) for n in results],
                    },
                    fh,
                    indent=1,
                )
    finally:
        if args.keep:
            print(f"kept {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    node_e2e.add_dataset_arguments(parser)
    parser.add_argument("--workers", default="1,2", help="worker counts to compare, e.g. 1,2")
    parser.add_argument("--paths", default="direct,balancer", help="direct, balancer or both")
    parser.add_argument(
        "--connections", type=int, help="client connections of the direct path (default: one per worker)"
    )
    parser.add_argument("--engine", default="compiled")
    parser.add_argument("--rounds", type=int, default=3, help="measured streams per path (the best counts)")
    parser.add_argument("--warmup", type=int, default=20_000, help="events streamed on each connection first")
    return node_e2e.run(parser, bench)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a killed bench still stops its node
    sys.exit(main())
