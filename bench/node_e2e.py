"""Node benchmark end to end over TCP: a real ``threatgate node``, a seven-rule firewall format, both engines.

    .venv/bin/python bench/node_e2e.py                                   # 1 M indicators, both engines
    .venv/bin/python bench/node_e2e.py --indicators 100000 --engines reference --rounds 2

What one run does, per engine (``THREATGATE_ENGINE`` in the node's environment):

1. **Data.** The feeds of ``bench/data/<size>/`` (``node_throughput.ensure_data``, the same set and the
   same defaults, so ``--data-dir /work/bench-data`` shares it).  The events are the generated Squid CEF
   events rewritten, one for one, as firewall key=value lines (FortiGate-like: ``srcip= dstip= hostname=
   url= md5= sha256=``), so every listed value of a hit event is still there; a ``--sha256-rate`` share of
   events carries a SHA-256 from hashes.csv (a listed one) and a ``--sha256-other`` share an unlisted one.
   Nothing here changes the shared generator.
2. **The rule set:** seven rules on one source: ``REQ`` (CONTEXT), ``srcip`` and ``dstip`` (IP),
   ``hostname`` (DOMAIN), ``url`` (URL), ``md5`` (MD5), ``sha256`` (SHA256).
3. **In process first** (the same figure as ``node_throughput.py``): the feeds loaded in this process,
   ``make_matcher(config, store, engine)``, ``match(batch of 256, finished=True)`` over the events, CPU
   time.  Its output lines are the reference answer for the TCP run.
4. **The node** runs as ``python -m threatgate node`` on a private config in a temporary directory (free
   ports, absolute feed paths); ready when it logs "node listening for events".  A client connection sends
   ``X-KF-SendFinishedEventX-KF-ReplyBack`` (the balancer's flags) and ``--warmup`` events; then a measured
   connection streams every event with one ``sendall`` from one thread while another thread reads the
   replies, counts the lines and the ``LookupFinished`` lines and hashes the bytes.  The run is valid when
   each event got its finished line and the reply bytes equal the in-process output byte for byte.
5. **CPU:** utime + stime of the node from ``/proc/<pid>/stat`` before and after the measured stream:
   events per node CPU-second is the per-core figure; events/s is wall (first byte sent to last line read).
6. **The wire alone:** the same bytes through ``socat TCP-LISTEN:<port> PIPE`` (an echo), counted by the
   same reader: what moving the bytes costs without threatgate (socat's CPU too).

Also here: ``measure_restart`` (used by node_throughput.py): a node started on the feeds with a snapshot
directory, stopped, started again; seconds from spawning the process to the first detection answered.
It runs when the build has snapshots (``<Feeds snapshot_dir=...>`` is accepted by the config) and says
"n/a" otherwise.

Exit status: 0 when every run is valid, whether or not the target is met; 1 when a run lost or changed
answers; 2 when the set-up failed.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import node_throughput  # bench/ is on sys.path when this file runs as a script
from api_lookup import SetupError, cpu_seconds, free_port, stop_group, tail

FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
FINISHED = b" LookupFinished\n"
TARGET_PER_CPU = 150_000  # events per node CPU-second end to end at 1 M indicators, seven rules
SNAPSHOT_ATTRIBUTE = "snapshot_dir"  # <Feeds snapshot_dir="..."> (issue 13, item 3)

NODE_CONF = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- node_e2e.py: the generated feeds, seven rules on a firewall key=value format. -->
<Configuration>
  <InputSettings>
    <ConnectionString>127.0.0.1:{port}</ConnectionString>
    <RegExps>
      <Source id="default">
        <REQ type="CONTEXT">^(\\d+)\\s</REQ>
        <RE_SRC type="IP" extract="first">\\ssrcip=(\\d{{1,3}}(?:\\.\\d{{1,3}}){{3}})</RE_SRC>
        <RE_DST type="IP" extract="first">\\sdstip=(\\d{{1,3}}(?:\\.\\d{{1,3}}){{3}})</RE_DST>
        <RE_DOMAIN type="DOMAIN" extract="first">\\shostname=([^\\s"]+)</RE_DOMAIN>
        <RE_URL type="URL" extract="first">\\surl=(\\S+)</RE_URL>
        <RE_MD5 type="MD5" extract="first">\\smd5=([\\da-fA-F]{{32}})</RE_MD5>
        <RE_SHA256 type="SHA256" extract="first">\\ssha256=([\\da-fA-F]{{64}})</RE_SHA256>
      </Source>
    </RegExps>
  </InputSettings>
  <OutputSettings>
    <ConnectionString>127.0.0.1:{output_port}</ConnectionString>
    <EventFormat>%REQ% category=%Category% matchedIndicator=%MatchedIndicator% confidence=%Confidence% \
source=%SourceId% %RecordContext%</EventFormat>
    <RecordFieldContextFormat>%ParamName%=%ParamValue%</RecordFieldContextFormat>
    <ActionableFieldContextFormat>%ParamName%:%ParamValue%</ActionableFieldContextFormat>
    <FinishedEventFormat enabled="true">%REQ% LookupFinished</FinishedEventFormat>
  </OutputSettings>
  <ServiceSettings>
    <ScannersCount>20</ScannersCount>
  </ServiceSettings>
  <Feeds update_frequency="0" per_scan_detect_limit="0"{feeds_attrs}>
{feeds}
  </Feeds>
</Configuration>
"""

_CEF = re.compile(r"(\w+)=(\S+)")


# -- events ---------------------------------------------------------------------------------------------


def listed_sha256(out: str, wanted: int) -> list[str]:
    """Up to ``wanted`` SHA-256 values listed in hashes.csv (every fourth record is one), from the top."""
    found: list[str] = []
    with open(os.path.join(out, "hashes.csv"), encoding="ascii") as fh:
        for line in fh:
            value = line.split(",", 1)[0]
            if len(value) == 64:
                found.append(value)
                if len(found) >= wanted:
                    break
    return found


def firewall_events(out: str, seed: int, sha256_rate: float, sha256_other: float) -> list[str]:
    """The generated CEF events of ``out`` as firewall key=value lines, in the same order (no LF).

    Same request id, addresses, URL (and its host as ``hostname``), MD5 when the event had one; a SHA-256
    from hashes.csv in ``sha256_rate`` of the events, an unlisted one in ``sha256_other``.
    """
    rng = random.Random(seed)
    with open(os.path.join(out, "events.txt"), encoding="ascii") as fh:
        cef = fh.read().splitlines()
    listed = listed_sha256(out, max(1, int(len(cef) * sha256_rate) + 1))
    lines: list[str] = []
    for n, line in enumerate(cef):
        req = line.split(" ", 1)[0]
        v = dict(_CEF.findall(line))
        url = v["url"]
        host = urlsplit(url).hostname or ""
        second = n % 86_400
        parts = [
            f"{req} date=2026-12-04 time={second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}",
            f'devname="fw{n % 4:02d}" logid="0000000013" type="traffic" subtype="forward" level="notice"',
            f'srcip={v["src"]} srcport={v["spt"]} srcintf="lan" dstip={v["dst"]} dstport={v["dpt"]}',
            f'dstintf="wan1" proto=6 action="accept" service="{v["app"]}" hostname={host} url={url}',
            f"sentbyte={rng.randrange(200, 90_000)} rcvdbyte={v.get('out', rng.randrange(200, 2_000_000))}",
            f'user="{v["suser"]}"',
        ]
        if "md5" in v:
            parts.append(f"md5={v['md5']}")
        roll = rng.random()
        if roll < sha256_rate:
            parts.append(f"sha256={listed[rng.randrange(len(listed))]}")
        elif roll < sha256_rate + sha256_other:
            parts.append(f"sha256={hashlib.sha256(f'{seed}:e2e:{n}'.encode()).hexdigest()}")
        lines.append(" ".join(parts))
    return lines


# -- the node's config and process ----------------------------------------------------------------------


def node_config(out: str, run_dir: str, port: int, feeds_attrs: str = "") -> str:
    """The seven-rule config for the feeds of ``out`` (the generated node.conf's <Feed> lines, absolute)."""
    with open(os.path.join(out, "node.conf"), encoding="utf-8") as fh:
        generated = fh.read()
    feeds = [
        "    " + re.sub(r'filename="([^"]+)"', lambda m: f'filename="{os.path.join(out, m.group(1))}"', line.strip())
        for line in generated.splitlines()
        if line.strip().startswith("<Feed ")
    ]
    if not feeds:
        raise SetupError(f"{out}/node.conf has no <Feed> lines")
    text = NODE_CONF.format(
        port=port,
        output_port=free_port(),
        feeds_attrs=feeds_attrs,
        feeds="\n".join(feeds),
    )
    path = os.path.join(run_dir, "node.conf")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def spawn_node(config: str, log_path: str, engine: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, THREATGATE_ENGINE=engine)
    with open(log_path, "ab") as log_fh:
        return subprocess.Popen(
            [sys.executable, "-m", "threatgate", "node", "--config", config, "--log-level", "inf"],
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def wait_ready(proc: subprocess.Popen[bytes], log_path: str, timeout: float) -> None:
    """Until the node logs "node listening for events" (feeds loaded); SetupError if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            if "node listening for events" in fh.read():
                return
        if proc.poll() is not None:
            raise SetupError(f"the node exited with {proc.returncode}:\n{tail(log_path)}")
        time.sleep(0.05)
    raise SetupError(f"the node was not ready within {timeout:.0f} s:\n{tail(log_path)}")


# -- streaming ----------------------------------------------------------------------------------------


@dataclass
class Stream:
    """What one streamed connection gave back."""

    events: int
    lines: int = 0
    finished: int = 0
    nbytes: int = 0
    digest: str = ""
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def eps(self) -> float:
        return self.events / self.wall if self.wall else 0.0


def stream(port: int, payload: bytes, want: int, token: bytes, timeout: float) -> Stream:
    """Send ``payload`` on one connection while reading until ``token`` came back ``want`` times.

    ``token`` is the end of a finished line (``b" LookupFinished\\n"``), or ``b"\\n"`` for an echo.  The
    reader counts lines and tokens (carrying the last bytes of each chunk over, so a token cut between two
    reads counts once) and hashes the reply bytes.  ``wall`` runs from just before the first byte is sent
    to the last token read.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    result = Stream(payload.count(b"\n"))
    digest = hashlib.sha256()
    done = [0.0]

    def reader() -> None:
        buf = bytearray(1 << 20)
        carry = b""
        keep = len(token) - 1
        try:
            while result.finished < want:
                n = sock.recv_into(buf)
                if n == 0:
                    result.error = f"connection closed after {result.finished} of {want} finished lines"
                    break
                chunk = bytes(buf[:n])
                digest.update(chunk)
                result.nbytes += n
                result.lines += chunk.count(b"\n")
                window = carry + chunk
                result.finished += window.count(token)
                carry = window[-keep:] if keep else b""
        except OSError as exc:
            result.error = f"{exc!r} after {result.finished} of {want} finished lines"
        done[0] = time.perf_counter()

    def sender() -> None:
        try:
            sock.sendall(payload)
        except OSError as exc:
            result.error = result.error or f"sending: {exc!r}"

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=sender, daemon=True)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    if any(t.is_alive() for t in threads):
        result.error = result.error or f"not finished within {timeout:.0f} s ({result.finished} of {want})"
    sock.close()
    result.wall = (done[0] or time.perf_counter()) - started
    result.digest = digest.hexdigest()
    return result


# -- in process -----------------------------------------------------------------------------------------


@dataclass
class InProcess:
    engine: str
    events: int
    cpu: float
    wall: float
    detections: int
    lines: int
    digest: str
    answer: bytes = b""

    @property
    def per_cpu(self) -> float:
        return self.events / self.cpu if self.cpu else 0.0


def in_process(config_path: str, events: list[str], engines: list[str], batch: int) -> dict[str, InProcess]:
    """Each engine's matcher over ``events`` in this process (CPU time), with its complete answer."""
    from threatgate.config.node import load_node_config
    from threatgate.node.engine import make_matcher
    from threatgate.node.eventpath import syslog_date
    from threatgate.node.feeds import load_feed
    from threatgate.node.matcher import MatchStats
    from threatgate.node.store import IndicatorStore

    config = load_node_config(config_path)
    store = IndicatorStore({slot: load_feed(s) for slot, s in enumerate(config.feeds.feeds) if s.enabled})
    batches = [events[i : i + batch] for i in range(0, len(events), batch)]
    results: dict[str, InProcess] = {}
    date = syslog_date(0)  # not in the formats: any date renders the same lines
    for name in engines:
        matcher = make_matcher(config, store, engine=name)
        stats = MatchStats()
        out: list[str] = []
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        for chunk in batches:
            out += matcher.match(chunk, date=date, finished=True, stats=stats)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        answer = "".join(out).encode("utf-8", "surrogateescape")
        results[name] = InProcess(
            name, len(events), cpu, wall, stats.detections, len(out), hashlib.sha256(answer).hexdigest(), answer
        )
    return results


# -- runs -----------------------------------------------------------------------------------------------


@dataclass
class NodeRun:
    engine: str
    round: int
    run: Stream
    node_cpu: float
    start_seconds: float
    valid: bool
    notes: list[str]

    @property
    def per_cpu(self) -> float:
        return self.run.events / self.node_cpu if self.node_cpu else 0.0


def run_node(
    out: str, run_dir: str, engine: str, rnd: int, payload: bytes, warmup: bytes, reference: InProcess, timeout: float
) -> NodeRun:
    """Start a node with ``engine``, warm it up, stream ``payload`` once and check the answer byte for byte."""
    port = free_port()
    sub = os.path.join(run_dir, f"{engine}-{rnd}")
    os.makedirs(sub)
    config = node_config(out, sub, port)
    log_path = os.path.join(sub, "node.log")
    started = time.perf_counter()
    proc = spawn_node(config, log_path, engine)
    try:
        wait_ready(proc, log_path, timeout)
        start_s = time.perf_counter() - started
        warm_events = warmup.count(b"\n")
        warm = stream(port, FLAGS + warmup, warm_events, FINISHED, timeout)
        if warm.error or warm.finished != warm_events:
            raise SetupError(f"warm-up on the {engine} node failed: {warm.error or warm.finished}\n{tail(log_path)}")
        events = payload.count(b"\n")
        cpu0 = cpu_seconds(proc.pid)
        run = stream(port, FLAGS + payload, events, FINISHED, timeout)
        node_cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        stop_group(proc)
    notes = []
    if run.error:
        notes.append(run.error)
    if run.finished != events:
        notes.append(f"{run.finished} LookupFinished lines for {events} events")
    repeat = events // reference.events
    expected = hashlib.sha256(reference.answer * repeat).hexdigest() if repeat > 1 else reference.digest
    if run.digest != expected:
        notes.append(
            f"reply bytes differ from the in-process answer ({run.lines} lines, {reference.lines * repeat} expected)"
        )
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        warnings = [line.strip() for line in fh if " WARNING " in line or " ERROR " in line]
    notes += [f"node log: {line}" for line in warnings[:5]]
    valid = not run.error and run.finished == events and run.digest == expected
    return NodeRun(engine, rnd, run, node_cpu, start_s, valid, notes)


def run_socat(run_dir: str, payload: bytes, timeout: float) -> tuple[Stream, float] | None:
    """The same bytes through ``socat TCP-LISTEN EXEC:cat`` (an echo): (the stream, socat + cat CPU-seconds).

    Not ``PIPE``: socat writes into its own pipe with blocking writes and stops for good once the pipe is
    full; ``cat`` drains it in a process of its own.
    """
    socat = shutil.which("socat")
    if socat is None:
        return None
    port = free_port()
    log_path = os.path.join(run_dir, "socat.log")
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen(
            [socat, f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr", "EXEC:cat"],
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SetupError(f"socat did not listen on {port}:\n{tail(log_path)}")
            time.sleep(0.02)
        run = stream(port, payload, payload.count(b"\n"), b"\n", timeout)  # closes the connection: socat ends
        timer = threading.Timer(10.0, lambda: stop_group(proc))
        timer.start()
        try:
            _, _, usage = os.wait4(proc.pid, 0)  # socat's rusage counts cat, the child it waited for
        finally:
            timer.cancel()
        proc.returncode = 0
        return run, usage.ru_utime + usage.ru_stime
    finally:
        stop_group(proc)


def _listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, seen in /proc/net/tcp (no connection to a one-shot echo)."""
    with open("/proc/net/tcp", encoding="ascii") as fh:
        return any(f":{port:04X} " in line and line.split()[3] == "0A" for line in fh)


# -- restart from the snapshot directory (used by node_throughput.py) -------------------------------------


def snapshots_supported(config: str) -> bool:
    """Whether this build accepts ``<Feeds snapshot_dir=...>`` (unknown config names are errors)."""
    from threatgate.config.node import load_node_config
    from threatgate.errors import ConfigError

    try:
        load_node_config(config)
    except ConfigError as exc:
        if SNAPSHOT_ATTRIBUTE in str(exc):
            return False
        raise
    return True


def first_detection(proc: subprocess.Popen[bytes], port: int, event: bytes, log_path: str, timeout: float) -> None:
    """Until the node answers ``event`` with a detection line (connecting as soon as it listens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SetupError(f"the node exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
                sock.sendall(FLAGS + event + b"\n")
                reply = b""
                while not reply.endswith(FINISHED):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
            if b"category=" in reply:
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise SetupError(f"no detection within {timeout:.0f} s:\n{tail(log_path)}")


def _wait_snapshots_settled(directory: str, feeds: int, timeout: float) -> list[str]:
    """The snapshot files once at least one per feed exists and nothing changed for a second."""
    deadline = time.monotonic() + timeout
    last: list[tuple[str, int]] = []
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        try:
            now = sorted((e.name, e.stat().st_size) for e in os.scandir(directory) if e.is_file())
        except FileNotFoundError:
            now = []
        if now != last:
            last, stable_since = now, time.monotonic()
        finished = [name for name, _ in now if not name.startswith(".") and not name.endswith(".tmp")]
        if len(finished) >= feeds and time.monotonic() - stable_since >= 1.0:
            return finished
        time.sleep(0.1)
    raise SetupError(f"{directory}: no snapshot per feed within {timeout:.0f} s (have {last})")


def node_memory(pid: int) -> tuple[int, int, int]:
    """(VmRSS, VmHWM, RssFile) of a process, in bytes: RssFile is the resident part of mapped files (the
    snapshots), which the kernel can drop and read again; the rest of VmRSS is the process's own memory."""
    found = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssFile"):
                found[key] = int(value.split()[0]) * 1024
    return found["VmRSS"], found["VmHWM"], found.get("RssFile", 0)


def first_answer(proc: subprocess.Popen[bytes], port: int, event: bytes, log_path: str, timeout: float) -> None:
    """Until the node answers ``event`` with its finished line (a node without feeds detects nothing)."""
    wait_ready(proc, log_path, timeout)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(FLAGS + event + b"\n")
        reply = b""
        while not reply.endswith(FINISHED):
            chunk = sock.recv(65536)
            if not chunk:
                raise SetupError(f"the node closed the connection:\n{tail(log_path)}")
            reply += chunk


def measure_restart(out: str, engine: str, timeout: float = 900.0) -> dict[str, Any]:
    """A node's start from the feeds, then its restart on the snapshots: seconds from spawning the process to
    the first detection, and the node's RSS per indicator once the restarted node has matched every event.

    The RSS baseline is a third node with the same config and no feeds, once it has matched the same events.
    Returns ``{"seconds": restart or None, "start_seconds", "rss_per_indicator", ..., "summary": one line}``.
    """
    with open(os.path.join(out, "expected.txt"), encoding="ascii") as fh:
        hit_no = int(fh.readline().split()[0])
    with open(os.path.join(out, "events.txt"), "rb") as fh:
        events = fh.read()
    event = next(line for line in events.split(b"\n") if line.startswith(b"%d " % hit_no))
    # The generated CEF event is matched by the generated rules: the config is the generated node.conf.
    run_dir = tempfile.mkdtemp(prefix="tg-restart-")
    try:
        snap_dir = os.path.join(run_dir, "snapshots")
        port = free_port()
        config = restart_config(out, run_dir, port, snap_dir)
        if not snapshots_supported(config):
            return {"seconds": None, "summary": f"restart: n/a, this build has no <Feeds {SNAPSHOT_ATTRIBUTE}>"}
        with open(config, encoding="utf-8") as fh:
            text = fh.read()
        feeds = len(re.findall(r"<Feed ", text))
        times, memory, logs = [], [], []
        for attempt in range(2):
            logs.append(os.path.join(run_dir, f"node-{attempt + 1}.log"))
            started = time.perf_counter()
            proc = spawn_node(config, logs[-1], engine)
            try:
                first_detection(proc, port, event, logs[-1], timeout)
                times.append(time.perf_counter() - started)
                memory.append(node_memory(proc.pid))
                if attempt == 0:
                    files = _wait_snapshots_settled(snap_dir, feeds, timeout)
                else:
                    after_events = _match_all(port, events, timeout)
                    memory.append(node_memory(proc.pid))
            finally:
                stop_group(proc, timeout=30)
        empty = os.path.join(run_dir, "empty.conf")
        with open(empty, "w", encoding="utf-8") as fh:
            fh.write(re.sub(r"\s*<Feed [^>]*/>", "", text).replace(snap_dir, os.path.join(run_dir, "empty-snapshots")))
        proc = spawn_node(empty, os.path.join(run_dir, "empty.log"), engine)
        try:
            first_answer(proc, port, event, os.path.join(run_dir, "empty.log"), timeout)
            _match_all(port, events, timeout)
            baseline, _, baseline_file = node_memory(proc.pid)
        finally:
            stop_group(proc, timeout=30)
        with open(logs[1], encoding="utf-8", errors="replace") as fh:
            mapped = len(re.findall(r"snapshot \S+ mapped", fh.read()))
        indicators = _indicators(out)
        size = sum(os.path.getsize(os.path.join(snap_dir, f)) for f in files)
        per_indicator = (memory[2][0] - baseline) / indicators
        private = (memory[2][0] - memory[2][2] - (baseline - baseline_file)) / indicators
        summary = (
            f"node start from the feeds {times[0]:.2f} s, restart on {len(files)} snapshots "
            f"({size / 1e6:,.0f} MB) {times[1]:.2f} s to the first detection ({engine}); node RSS "
            f"{memory[0][0] / 1e6:,.0f} MB (peak {memory[0][1] / 1e6:,.0f} MB) after the start, "
            f"{memory[1][0] / 1e6:,.0f} MB after the restart, {memory[2][0] / 1e6:,.0f} MB once it matched the "
            f"{after_events:,} events ({memory[2][2] / 1e6:,.0f} MB of it mapped files), {baseline / 1e6:,.0f} MB "
            f"({baseline_file / 1e6:,.0f} MB) for a node without feeds that did the same: {per_indicator:.0f} B per "
            f"indicator, {private:.0f} B of it the node's own (not file-backed) memory"
        )
        if mapped < feeds:
            summary += f"; WARNING: the restarted node logged {mapped} snapshot(s) mapped for {feeds} feeds"
        return {
            "seconds": times[1],
            "start_seconds": times[0],
            "snapshot_bytes": size,
            "rss_restart": memory[1][0],
            "rss_restart_matched": memory[2][0],
            "rss_file_restart_matched": memory[2][2],
            "rss_file_no_feeds": baseline_file,
            "rss_start": memory[0][0],
            "hwm_start": memory[0][1],
            "rss_no_feeds": baseline,
            "rss_per_indicator": per_indicator,
            "private_per_indicator": private,
            "mapped": mapped,
            "summary": summary,
        }
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _match_all(port: int, events: bytes, timeout: float) -> int:
    """Stream ``events`` (LF-terminated) through a node up to their finished lines; the number of events."""
    count = events.count(b"\n")
    run = stream(port, FLAGS + events, count, FINISHED, timeout)
    if run.error or run.finished != count:
        raise SetupError(f"streaming the events to the restarted node: {run.error or run.finished}")
    return count


def _indicators(out: str) -> int:
    """The number of indicators of a generated set (from its stamp.json)."""
    with open(os.path.join(out, "stamp.json"), encoding="utf-8") as fh:
        return int(json.load(fh)["indicators"])


def restart_config(out: str, run_dir: str, port: int, snap_dir: str) -> str:
    """The generated node.conf with absolute feed paths, free ports and a snapshot directory.

    The node's state (supplier database) goes to ``state/`` beside the config, in the temporary directory.
    """
    with open(os.path.join(out, "node.conf"), encoding="utf-8") as fh:
        text = fh.read()
    text = re.sub(r'filename="([^"]+)"', lambda m: f'filename="{os.path.join(out, m.group(1))}"', text)
    ports = iter([port, free_port()])
    text = re.sub(
        r"<ConnectionString>127\.0\.0\.1:\d+</ConnectionString>",
        lambda m: f"<ConnectionString>127.0.0.1:{next(ports)}</ConnectionString>",
        text,
        count=2,
    )
    text = text.replace("<Feeds ", f'<Feeds {SNAPSHOT_ATTRIBUTE}="{snap_dir}" ', 1)
    path = os.path.join(run_dir, "node.conf")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


# -- report ---------------------------------------------------------------------------------------------


def print_report(
    size: int, inproc: dict[str, InProcess], runs: list[NodeRun], wire: tuple[Stream, float] | None, nbytes: int
) -> None:
    columns = (
        "engine",
        "round",
        "events/s",
        "ev/node CPU-s",
        "in-process ev/CPU-s",
        "e2e/in-process",
        "node start s",
        "detections",
        "check",
    )
    rows = []
    for r in runs:
        ref = inproc[r.engine]
        rows.append(
            [
                r.engine,
                str(r.round),
                f"{r.run.eps:,.0f}",
                f"{r.per_cpu:,.0f}",
                f"{ref.per_cpu:,.0f}",
                f"{r.per_cpu / ref.per_cpu:.2f}" if ref.per_cpu else "-",
                f"{r.start_seconds:.1f}",
                f"{ref.detections:,}",
                "ok" if r.valid else "INVALID",
            ]
        )
    if wire is not None:
        run, cpu = wire
        rows.append(
            ["socat echo", "-", f"{run.eps:,.0f}", f"{run.events / cpu:,.0f}" if cpu else "-", "-", "-", "-", "-"]
            + ["ok" if not run.error and run.lines == run.events else f"INVALID {run.error}"]
        )
    print()
    node_throughput.print_table(columns, rows)
    print()
    events = runs[0].run.events if runs else 0
    print(
        f"{size:,} indicators, {events:,} events of {nbytes / max(events, 1):.0f} B streamed per run; "
        "seven rules (REQ, srcip, dstip, hostname, url, md5, sha256)"
    )
    for r in runs:
        ref = inproc[r.engine]
        node_us = 1e6 * r.node_cpu / r.run.events
        match_us = 1e6 * ref.cpu / ref.events
        print(
            f"  {r.engine} round {r.round}: {r.run.wall:.2f} s wall, node {r.node_cpu:.2f} CPU-s, "
            f"{r.run.lines:,} lines ({r.run.finished:,} LookupFinished), {r.run.nbytes / 1e6:.1f} MB back; "
            f"{node_us:.2f} µs of node CPU per event, of which {match_us:.2f} matching in process and "
            f"{node_us - match_us:+.2f} the rest (sockets, framing, the event loop, writing)"
        )
        for note in r.notes:
            print(f"    {note}")
    for name, ref in inproc.items():
        print(
            f"  in process {name}: {ref.cpu:.2f} CPU-s / {ref.wall:.2f} s wall, {ref.detections:,} detections, "
            f"{ref.lines:,} lines"
        )
    if wire is not None:
        run, cpu = wire
        print(
            f"  socat echo: {run.wall:.2f} s wall, socat {cpu:.2f} CPU-s, {run.nbytes / 1e6:.1f} MB back "
            "(the wire alone: loopback TCP both ways and one line counter)"
        )
    print()
    print(f"target (at 1,000,000 indicators): >= {TARGET_PER_CPU:,} events per node CPU-second")
    for engine in dict.fromkeys(r.engine for r in runs):
        worst = min(r.per_cpu for r in runs if r.engine == engine)
        verdict = "met" if worst >= TARGET_PER_CPU else f"NOT met ({worst / TARGET_PER_CPU:.0%} of it)"
        print(f"  {engine:<10} {worst:>10,.0f}  {verdict}")


def bench(args: argparse.Namespace) -> int:
    from threatgate.node.engine import ENGINES

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        raise SetupError(f"--engines: use one or more of {', '.join(ENGINES)}")
    out, _ = node_throughput.ensure_data(args.data_dir, args.indicators, args.events, args.hit_rate, args.seed)
    events = firewall_events(out, args.seed, args.sha256_rate, args.sha256_other)
    payload = ("\n".join(events) + "\n").encode("ascii") * args.repeat
    warmup = ("\n".join(events[: args.warmup]) + "\n").encode("ascii")
    run_dir = tempfile.mkdtemp(prefix="tg-e2e-")
    ok = True
    try:
        print(f"== {args.indicators:,} indicators, {len(events):,} firewall events", file=sys.stderr, flush=True)
        inproc = in_process(node_config(out, run_dir, free_port()), events, engines, args.batch)
        gc.collect()
        for name, ref in inproc.items():
            print(f"  in process {name}: {ref.per_cpu:,.0f} events/CPU-s", file=sys.stderr, flush=True)
        runs: list[NodeRun] = []
        for rnd in range(1, args.rounds + 1):
            for engine in engines:
                run = run_node(out, run_dir, engine, rnd, payload, warmup, inproc[engine], args.timeout)
                runs.append(run)
                ok = ok and run.valid
                print(
                    f"  {engine} round {rnd}: {run.run.eps:,.0f} events/s, {run.per_cpu:,.0f} per node CPU-s"
                    + ("" if run.valid else " INVALID"),
                    file=sys.stderr,
                    flush=True,
                )
        wire = None if args.no_socat else run_socat(run_dir, payload, args.timeout)
        print(
            f"\ncode {node_throughput.code_version()}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
            f"batch {args.batch} (in process)"
        )
        print_report(args.indicators, inproc, runs, wire, len(payload))
        if args.json_out:
            with open(args.json_out, "w", encoding="utf-8") as fh:
                json.dump(
                    {
                        "indicators": args.indicators,
                        "in_process": {k: {**v.__dict__, "answer": None} for k, v in inproc.items()},
                        "runs": [{**r.__dict__, "run": r.run.__dict__} for r in runs],
                        "socat": None if wire is None else {"run": wire[0].__dict__, "cpu": wire[1]},
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


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The generated data set's options (node_throughput.ensure_data), shared with node_workers.py."""
    parser.add_argument("--indicators", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=200_000, help="events of the generated set (and streamed)")
    parser.add_argument("--hit-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sha256-rate", type=float, default=0.01, help="share of events with a listed SHA-256")
    parser.add_argument("--sha256-other", type=float, default=0.3, help="share with an unlisted SHA-256")
    parser.add_argument("--data-dir", default=node_throughput.DEFAULT_DATA)
    parser.add_argument("--repeat", type=int, default=1, help="stream the events this many times per run")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    parser.add_argument("--json", dest="json_out")


def run(parser: argparse.ArgumentParser, bench: Callable[[argparse.Namespace], int]) -> int:
    """Parse the arguments and run ``bench``: its exit status, or 2 when the set-up failed."""
    args = parser.parse_args()
    try:
        return bench(args)
    except SetupError as exc:
        print(f"set-up failed: {exc}", file=sys.stderr)
        return 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_dataset_arguments(parser)
    parser.add_argument("--engines", default="compiled,reference")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20_000, help="events streamed before each measured stream")
    parser.add_argument("--batch", type=int, default=256, help="events per match call in process")
    parser.add_argument("--no-socat", action="store_true", help="skip the wire-only anchor")
    return run(parser, bench)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a killed bench still stops its node
    sys.exit(main())
