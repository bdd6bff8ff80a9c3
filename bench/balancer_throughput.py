"""Balancer benchmark: the event path through the HA balancer, beside a direct node and HAProxy (mode tcp).

    .venv/bin/python bench/balancer_throughput.py                    # 1,000,000 events streamed, 30,000 one by one
    .venv/bin/python bench/balancer_throughput.py --profile          # + py-spy of the balancer (streaming, one by one)
    .venv/bin/python bench/balancer_throughput.py --events 2000000 --rounds 2 --json out.json

The same event stream goes, in one run, over four paths:

* ``direct``: client -> node (the anchor);
* ``haproxy``: client -> HAProxy ``mode tcp`` -> node.  HAProxy forwards per connection: a client
  connection is spliced to one node, which is the most an L4 proxy does with a single SIEM connection;
* ``balancer``: client -> threatgate balancer -> 2 nodes (events spread one by one, request ids added
  and stripped, replies correlated and released in order);
* ``direct x2`` (streaming only): the stream split in two halves, one connection to each node, so
  the figure of what the two nodes do without the balancer.

The nodes "match nothing": no feeds, and the only rule is the HA request id (``REQ``, a CONTEXT rule),
with the HA formats (``EventFormat`` and ``FinishedEventFormat`` start with ``%REQ%``), so every event
is answered by one ``LookupFinished`` line and the balancer is exercised as in production.

Three modes, all with ``X-KF-SendFinishedEventX-KF-ReplyBack``:

* **streaming**: the whole stream is written with one ``sendall`` of a pre-built buffer from one
  thread while another thread counts the finished lines (``bytearray.count`` on each read), so the
  client costs about 0.05 CPU-second per million events; events/s = events / (last line - first byte);
* **request-reply**: one event in flight, paced to ``--rr-rate`` (10,000/s) when the round trip allows
  it, otherwise as fast as one at a time goes; latency percentiles per path and the balancer's added
  latency (balancer minus direct);
* **paced**: open loop at exactly ``--rr-rate``: one thread sends an event every 100 µs whatever the
  replies, another timestamps the finished lines (in order), so the added latency is also known at
  10,000 events/s when one event at a time cannot get there.

CPU: utime + stime of the balancer, the nodes and HAProxy from ``/proc/<pid>/stat``, of this process
(the client) from ``time.process_time()``, and of the whole machine from ``/proc/stat``, over the
measured window only.  The busy cores not accounted to these processes are shown as "others".

Exit status: 0 when every run is valid, whether or not the targets are met; 1 when a run lost
answers or timed out; 2 when the set-up failed (HAProxy or py-spy missing, a process did not start).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
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
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import node_throughput  # bench/ is on sys.path when this file runs as a script
from api_lookup import SetupError, cpu_seconds, free_port, machine_busy, stop_group, summarize_stacks, tail

FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
INSTALL_HAPROXY = "apt-get install -y haproxy"

TARGET_CPU_PER_MILLION = 1.0  # balancer CPU-seconds per million events while streaming
TARGET_EPS = 500_000  # events/s end to end, nodes that match nothing
TARGET_ADDED_P99_MS = 2.0  # request-reply: balancer p99 minus direct p99
TARGET_RR_RATE = 10_000  # events/s at which the added p99 is stated

STREAM_PATHS = ("direct", "haproxy", "balancer", "direct x2")
RR_PATHS = ("direct", "haproxy", "balancer")


# -- events -------------------------------------------------------------------------------------------

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _event(rng: random.Random) -> str:
    """One short syslog-like line (RFC 3164 header, 70-110 bytes), never starting with a digit."""
    clock = f"{rng.randrange(24):02}:{rng.randrange(60):02}:{rng.randrange(60):02}"
    ts = f"{rng.choice(_MONTHS)} {rng.randint(1, 28):>2} {clock}"
    ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    kind = rng.randrange(4)
    if kind == 0:
        return (
            f"<86>{ts} host{rng.randrange(200):03} sshd[{rng.randrange(1000, 65000)}]: "
            f"Accepted publickey for user{rng.randrange(500)} from {ip} port {rng.randrange(1024, 65536)} ssh2"
        )
    if kind == 1:
        return (
            f"<190>{ts} web{rng.randrange(20):02} nginx: {ip} GET /static/app{rng.randrange(100)}.js "
            f"{rng.choice((200, 200, 200, 304, 404))} {rng.randrange(100, 90000)}"
        )
    if kind == 2:
        cron = f"CRON[{rng.randrange(1000, 65000)}]"
        return f"<78>{ts} host{rng.randrange(200):03} {cron}: (root) CMD (run-parts /etc/cron.hourly)"
    return f"<4>{ts} fw{rng.randrange(4)} kernel: DROP IN=eth0 SRC={ip} DST=192.168.{rng.randrange(256)}.1 PROTO=TCP"


def make_events(count: int, distinct: int, seed: int) -> tuple[bytes, list[bytes]]:
    """(the stream: ``count`` LF-terminated events, the distinct events): ``distinct`` events repeated.

    Repeating a block keeps generation under a second and memory at one copy of the stream
    (about 95 MB per million events); nodes that match nothing do not care about repetition.
    """
    rng = random.Random(seed)
    lines = [(_event(rng) + "\n").encode("ascii") for _ in range(max(1, min(distinct, count)))]
    reps, rest = divmod(count, len(lines))
    return b"".join(lines) * reps + b"".join(lines[:rest]), lines


def split_stream(stream: bytes, parts: int) -> list[memoryview]:
    """``stream`` cut into ``parts`` pieces of about equal size at event boundaries (no copy)."""
    view = memoryview(stream)
    cuts = [0]
    for i in range(1, parts):
        cuts.append(stream.index(b"\n", len(stream) * i // parts) + 1)
    cuts.append(len(stream))
    return [view[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


# -- processes ----------------------------------------------------------------------------------------


NODE_CONF = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- balancer_throughput.py: a node that matches nothing (no feeds), with the HA request id and formats. -->
<Configuration>
  <InputSettings>
    <ConnectionString>127.0.0.1:{port}</ConnectionString>
    <RegExps>
      <Source id="default">
        <REQ type="CONTEXT">^(\\d+)\\s</REQ>
      </Source>
    </RegExps>
  </InputSettings>
  <OutputSettings>
    <ConnectionString>127.0.0.1:{output_port}</ConnectionString>
    <EventFormat>%REQ% category=%Category% matchedIndicator=%MatchedIndicator% %RecordContext%</EventFormat>
    <RecordFieldContextFormat>%ParamName%=%ParamValue%</RecordFieldContextFormat>
    <ActionableFieldContextFormat>%ParamName%:%ParamValue%</ActionableFieldContextFormat>
    <FinishedEventFormat enabled="true">%REQ% LookupFinished</FinishedEventFormat>
  </OutputSettings>
  <ServiceSettings>
    <ScannersCount>20</ScannersCount>
  </ServiceSettings>
</Configuration>
"""

BALANCER_CONF = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- balancer_throughput.py: the defaults of examples/balancer.conf, health checks that bring nodes UP in 1 s. -->
<Config>
  <Balancer matching_port="{port}" api_port="{api_port}" cybertrace_port="{alert_port}"
            scanners_count="20">127.0.0.1</Balancer>
  <Instances>
{instances}
  </Instances>
  <HealthCheck interval="1" timeout="2" rise="1" fall="3"/>
  <ReplyTimeout>30</ReplyTimeout>
  <MaxInflightEvents>20000</MaxInflightEvents>
  <MaxPendingEvents>100000</MaxPendingEvents>
</Config>
"""

HAPROXY_CONF = """\
# balancer_throughput.py: HAProxy as a plain L4 proxy in front of the node(s).
global
    nbthread 1
    maxconn 256
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend events
    bind 127.0.0.1:{port}
    default_backend nodes
backend nodes
    balance leastconn
{servers}
"""


@dataclass
class Service:
    """A child process in its own session, with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise SetupError(f"{self.name} exited with {self.proc.returncode}:\n{tail(self.log_path)}")


def spawn(name: str, cmd: list[str], log_path: str) -> Service:
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Service(name, proc, log_path)


def wait_for_lines(service: Service, pattern: str, count: int, timeout: float) -> None:
    """Until ``pattern`` has matched ``count`` times in the service's log."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(rx.findall(service.log_text())) >= count:
            return
        service.check_alive()
        time.sleep(0.05)
    raise SetupError(
        f"{service.name}: {pattern!r} not seen {count} time(s) within {timeout:.0f} s:\n{tail(service.log_path)}"
    )


def wait_for_port(service: Service, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        service.check_alive()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SetupError(f"{service.name} not listening on port {port} within {timeout:.0f} s:\n{tail(service.log_path)}")


def start_node(run_dir: str, name: str, port: int) -> Service:
    config = os.path.join(run_dir, f"{name}.conf")
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(NODE_CONF.format(port=port, output_port=free_port()))
    cmd = [sys.executable, "-m", "threatgate", "node", "--config", config, "--log-level", "inf"]
    service = spawn(name, cmd, os.path.join(run_dir, f"{name}.log"))
    wait_for_lines(service, r"node listening for events", 1, 60)
    return service


def start_balancer(run_dir: str, port: int, node_ports: list[int]) -> Service:
    config = os.path.join(run_dir, "balancer.conf")
    instances = "\n".join(
        f'    <Instance matching_port="{p}" api_port="{free_port()}" enabled="true">127.0.0.1</Instance>'
        for p in node_ports
    )
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(BALANCER_CONF.format(port=port, api_port=free_port(), alert_port=free_port(), instances=instances))
    cmd = [sys.executable, "-m", "threatgate", "balancer", "--config", config, "--log-level", "inf"]
    service = spawn("balancer", cmd, os.path.join(run_dir, "balancer.log"))
    wait_for_lines(service, r"balancer listening for events", 1, 60)
    wait_for_lines(service, r"instance \S+ is UP", len(node_ports), 30)
    wait_for_lines(service, r"instance \S+: event connection open", len(node_ports), 30)
    return service


def find_haproxy(given: str | None) -> str:
    path = (
        given or shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
    )
    if not path or not os.access(path, os.X_OK):
        raise SetupError(
            f"haproxy not found: install it with `{INSTALL_HAPROXY}` (or pass --haproxy PATH, or --no-haproxy)"
        )
    return path


def haproxy_version(haproxy: str) -> str:
    out = subprocess.run([haproxy, "-v"], capture_output=True, text=True, timeout=10, check=False).stdout
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else "?"


def start_haproxy(haproxy: str, run_dir: str, port: int, node_ports: list[int]) -> Service:
    config = os.path.join(run_dir, "haproxy.cfg")
    servers = "\n".join(f"    server node{i + 1} 127.0.0.1:{p}" for i, p in enumerate(node_ports))
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(HAPROXY_CONF.format(port=port, servers=servers))
    check = subprocess.run([haproxy, "-c", "-q", "-f", config], capture_output=True, text=True, timeout=30, check=False)
    if check.returncode != 0:
        raise SetupError(f"haproxy -c failed:\n{check.stdout}{check.stderr}")
    service = spawn("haproxy", [haproxy, "-f", config, "-db"], os.path.join(run_dir, "haproxy.log"))
    wait_for_port(service, port, 10)
    return service


# -- measuring ----------------------------------------------------------------------------------------


@dataclass
class Usage:
    """What one measured window cost: wall seconds, CPU seconds per process, the client's, the machine's."""

    wall: float
    cpu: dict[str, float]
    client: float
    machine: float  # busy CPU-seconds of the whole machine (all processes, all cores)
    runq: dict[str, float] = field(default_factory=dict)  # seconds each process's main thread waited for a CPU


def run_queue_wait(pid: int) -> float:
    """Seconds the main thread of ``pid`` spent runnable but waiting for a CPU (``/proc/<pid>/schedstat``)."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class Meter:
    """CPU, run-queue waits and wall clock around a measured window."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: tuple[float, dict[str, float], dict[str, float], float, float] | None = None

    def start(self) -> None:
        self._start = (time.perf_counter(), self._cpu(), self._runq(), time.process_time(), machine_busy()[0])

    def stop(self, wall_end: float | None = None) -> Usage:
        assert self._start is not None
        t0, cpu0, runq0, client0, busy0 = self._start
        cpu1, runq1, client1, busy1 = self._cpu(), self._runq(), time.process_time(), machine_busy()[0]
        end = wall_end if wall_end is not None else time.perf_counter()
        return Usage(
            wall=end - t0,
            cpu={k: cpu1[k] - cpu0[k] for k in cpu0},
            client=client1 - client0,
            machine=busy1 - busy0,
            runq={k: runq1[k] - runq0[k] for k in runq0},
        )

    def _cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def _runq(self) -> dict[str, float]:
        return {name: run_queue_wait(pid) for name, pid in self.pids.items()}


@dataclass
class StreamRun:
    path: str
    events: int
    lines: int
    bytes: int
    usage: Usage
    first_line: str
    error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def eps(self) -> float:
        return self.events / self.usage.wall

    @property
    def valid(self) -> bool:
        """Every event answered by one line, all lines alike (the finished line; nothing matches)."""
        return not self.error and self.lines == self.events and self.bytes == self.lines * (len(self.first_line) + 1)


def _connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    return sock


def stream(path: str, ports: list[int], stream_bytes: bytes, meter: Meter, timeout: float) -> StreamRun:
    """Send the stream (split over ``ports``) as fast as possible; count finished lines until all arrived."""
    parts = split_stream(stream_bytes, len(ports))
    expected = [_count_lines(stream_bytes, parts, i) for i in range(len(parts))]
    socks = [_connect(port, timeout) for port in ports]
    lines = [0] * len(ports)
    nbytes = [0] * len(ports)
    finished = [0.0] * len(ports)
    first = [b""] * len(ports)
    errors: list[str] = []

    def reader(i: int) -> None:
        sock, want, buf = socks[i], expected[i], bytearray(1 << 20)
        count = total = 0
        try:
            while count < want:
                n = sock.recv_into(buf)
                if n == 0:
                    errors.append(f"connection {i} closed after {count} of {want} lines")
                    break
                if b"\n" not in first[i]:  # the first line, even if it came in pieces
                    first[i] = (first[i] + bytes(buf[: min(n, 128)]))[:256]
                count += buf.count(b"\n", 0, n)
                total += n
        except OSError as exc:
            errors.append(f"connection {i}: {exc!r} after {count} of {want} lines")
        lines[i], nbytes[i], finished[i] = count, total, time.perf_counter()

    def sender(i: int) -> None:
        try:
            socks[i].sendall(FLAGS)
            socks[i].sendall(parts[i])
        except OSError as exc:
            errors.append(f"connection {i}: sending: {exc!r}")

    readers = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(len(ports))]
    senders = [threading.Thread(target=sender, args=(i,), daemon=True) for i in range(len(ports))]
    meter.start()
    for t in readers + senders:
        t.start()
    for t in readers + senders:
        t.join(timeout + 5)
    alive = any(t.is_alive() for t in readers + senders)
    usage = meter.stop(wall_end=max(finished) if not alive and all(finished) else None)
    for sock in socks:
        sock.close()
    if alive:
        errors.append(f"not finished within {timeout:.0f} s")
    line = first[0].split(b"\n", 1)[0].decode("ascii", "replace")
    if not errors and sum(nbytes) != sum(lines) * (len(line) + 1):
        errors.append(f"{sum(nbytes)} reply bytes are not {sum(lines)} lines like {line!r}")
    return StreamRun(path, sum(expected), sum(lines), sum(nbytes), usage, line, "; ".join(errors))


def _count_lines(stream_bytes: bytes, parts: list[memoryview], i: int) -> int:
    start = sum(len(p) for p in parts[:i])
    return stream_bytes.count(b"\n", start, start + len(parts[i]))


@dataclass
class LatencyRun:
    mode: str  # "request-reply" (one event in flight) or "paced" (open loop at a fixed rate)
    path: str
    events: int
    rate: float  # target events/s (0: as fast as one at a time goes)
    latencies_us: list[float]
    usage: Usage
    error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def eps(self) -> float:
        return len(self.latencies_us) / self.usage.wall

    @property
    def valid(self) -> bool:
        return not self.error and len(self.latencies_us) == self.events

    def pct(self, q: float) -> float:
        """Nearest-rank percentile in milliseconds."""
        data = sorted(self.latencies_us)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, max(0, math.ceil(q * len(data)) - 1))] / 1000


LatencyFn = Callable[[str, int, list[bytes], int, int, float, "Meter", float], LatencyRun]


def precise_sleeps() -> None:
    """Timer slack 1 µs for the calling thread (default 50 µs), so 100 µs pacing steps are kept."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, ctypes.c_ulong(1000), 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def request_reply(
    path: str, port: int, events: list[bytes], count: int, warmup: int, rate: float, meter: Meter, timeout: float
) -> LatencyRun:
    """One event in flight: send, wait for its finished line, record the round trip; paced to ``rate``.

    When a round trip takes longer than 1/rate the next event goes at once (no catch-up burst), so the
    achieved rate is what one event at a time allows.
    """
    precise_sleeps()
    sock = _connect(port, timeout)
    buf = bytearray(4096)
    view = memoryview(buf)
    clock = time.perf_counter_ns
    interval = int(1e9 / rate) if rate > 0 else 0
    latencies: list[float] = []
    error = ""
    measuring = False
    try:
        sock.sendall(FLAGS)
        send, recv_into, n_events = sock.sendall, sock.recv_into, len(events)
        for phase, total in (("warmup", warmup), ("measure", count)):
            if phase == "measure":
                meter.start()
                measuring = True
            next_ns = clock()
            for i in range(total):
                if interval:
                    now = clock()
                    if next_ns > now:
                        time.sleep((next_ns - now) / 1e9)
                    else:
                        next_ns = now
                    next_ns += interval
                started = clock()
                send(events[i % n_events])
                got = recv_into(buf)
                while got and buf[got - 1] != 10:  # a partial line (rare): read the rest
                    more = recv_into(view[got:])
                    if not more:
                        got = 0
                        break
                    got += more
                elapsed = clock() - started
                if not got:
                    raise ConnectionError(f"closed by the peer after {i} events ({phase})")
                lines = buf.count(b"\n", 0, got)
                if lines != 1:
                    raise ConnectionError(f"{lines} lines for one event: {bytes(buf[:got])[:80]!r}")
                if measuring:
                    latencies.append(elapsed / 1000)
    except OSError as exc:
        error = repr(exc)
    if not measuring:
        meter.start()
    usage = meter.stop()
    sock.close()
    return LatencyRun("request-reply", path, count, rate, latencies, usage, error)


def paced(
    path: str, port: int, events: list[bytes], count: int, warmup: int, rate: float, meter: Meter, timeout: float
) -> LatencyRun:
    """Open loop: one thread sends an event every 1/rate s whatever the replies, another timestamps them.

    Replies come back in submission order, so the i-th finished line answers the i-th event; a line's
    time is that of the read that completed it.  Latency is counted from the actual send.
    """
    total = warmup + count
    sock = _connect(port, timeout)
    sent = [0] * total
    received = [0] * total
    errors: list[str] = []
    clock = time.perf_counter_ns
    interval = 1e9 / rate
    started = threading.Event()

    def sender() -> None:
        precise_sleeps()
        send, n_events = sock.sendall, len(events)
        try:
            send(FLAGS)
            t0 = clock()
            for i in range(total):
                due = t0 + int(i * interval)
                now = clock()
                if due > now:
                    time.sleep((due - now) / 1e9)
                if i == warmup:
                    meter.start()
                    started.set()
                sent[i] = clock()
                send(events[i % n_events])
        except OSError as exc:
            errors.append(f"sending: {exc!r}")

    def reader() -> None:
        buf = bytearray(65536)
        done = 0
        try:
            while done < total:
                n = sock.recv_into(buf)
                now = clock()
                if n == 0:
                    errors.append(f"closed by the peer after {done} lines")
                    return
                lines = buf.count(b"\n", 0, n)
                received[done : done + lines] = [now] * lines
                done += lines
        except OSError as exc:
            errors.append(f"reading: {exc!r} after {done} lines")

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=sender, daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + total / rate)
    if any(t.is_alive() for t in threads):
        errors.append(f"not finished within {timeout:.0f} s")
    if not started.is_set():
        meter.start()
    usage = meter.stop(wall_end=max(received) / 1e9 if not errors else None)
    sock.close()
    latencies = [(r - s) / 1000 for s, r in zip(sent[warmup:], received[warmup:], strict=True) if r]
    return LatencyRun("paced", path, count, rate, latencies if not errors else [], usage, "; ".join(errors))


def balancer_incidents(balancer: Service, offset: int) -> tuple[list[str], int]:
    """Lines of the balancer's log since ``offset`` that mean the run was not clean (DOWN, redispatch)."""
    text = balancer.log_text()
    notes = [
        line.split(" ", 3)[-1]
        for line in text[offset:].splitlines()
        if " is DOWN" in line or "sent again" in line or "pausing clients" in line or "dropped" in line
    ]
    return notes, len(text)


# -- profile ------------------------------------------------------------------------------------------


def profile_balancer(
    py_spy: str, balancer: Service, label: str, workload: Callable[[], Any], args: argparse.Namespace, run_dir: str
) -> tuple[Any, str]:
    """One more run (``workload()``) with py-spy attached to the balancer; (the run, top functions)."""
    raw = os.path.join(run_dir, f"py-spy-balancer-{label}.txt")
    cmd = [py_spy, "record", "-p", str(balancer.pid), "-r", str(args.profile_rate), "-f", "raw", "--nolineno"]
    cmd += ["-o", raw]
    if args.native:
        cmd.append("--native")
    spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        time.sleep(1.0)  # attached before the first byte
        if spy.poll() is not None:
            raise SetupError(f"py-spy exited at once: {spy.communicate()[0].decode(errors='replace')[-2000:]}")
        run = workload()
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        out, _ = spy.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        raise SetupError("py-spy did not stop") from None
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not os.path.exists(raw) or os.path.getsize(raw) == 0:
        raise SetupError(f"py-spy wrote nothing ({spy.returncode}): {out.decode(errors='replace')[-2000:]}")
    return run, summarize_stacks(raw, args.top)


# -- report -------------------------------------------------------------------------------------------

STREAM_COLUMNS = (
    "path",
    "events",
    "seconds",
    "events/s",
    "vs direct",
    "balancer CPU s",
    "bal CPU-s/M ev",
    "haproxy CPU s",
    "nodes CPU s",
    "node CPU-s/M ev",
    "client CPU s",
    "machine busy",
    "others",
    "runq wait s",
    "check",
)

RR_COLUMNS = (
    "path",
    "events",
    "events/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "+p50 ms",
    "+p99 ms",
    "proxy CPU-s/M ev",
    "nodes CPU s",
    "client CPU s",
    "machine busy",
    "others",
    "runq wait ms",
    "check",
)

ON_PATH = {
    "direct": ("node1",),
    "haproxy": ("haproxy", "node1"),
    "balancer": ("balancer", "node1", "node2"),
    "direct x2": ("node1", "node2"),
}
"""The server processes an event passes through on each path (for their run-queue waits)."""


def _runq(run: StreamRun | LatencyRun) -> float:
    """Seconds the server processes on the run's path waited, runnable, for a CPU during the window."""
    return sum(run.usage.runq.get(name, 0.0) for name in ON_PATH.get(run.path, ()))


def _cores(usage: Usage) -> tuple[str, str]:
    """(machine busy cores, cores busy with processes other than ours) over the window."""
    ours = sum(usage.cpu.values()) + usage.client
    return f"{usage.machine / usage.wall:.2f}", f"{max(0.0, usage.machine - ours) / usage.wall:.2f}"


def _check(valid: bool, error: str, notes: list[str], got: int, want: int) -> str:
    if not valid:
        return f"INVALID {got}/{want} {error}".strip()
    return "ok" + (f" ({len(notes)} balancer warning(s))" if notes else "")


def stream_cells(run: StreamRun, direct: StreamRun | None) -> list[str]:
    u, n = run.usage, run.events
    nodes = u.cpu.get("node1", 0.0) + u.cpu.get("node2", 0.0)
    bal = u.cpu.get("balancer", 0.0)
    busy, others = _cores(u)
    return [
        run.path,
        f"{n:,}",
        f"{u.wall:.2f}",
        f"{run.eps:,.0f}",
        f"{run.eps / direct.eps:.2f}" if direct and direct.valid else "-",
        f"{bal:.2f}",
        f"{bal / n * 1e6:.2f}" if run.path.startswith("balancer") else "-",
        f"{u.cpu.get('haproxy', 0.0):.2f}" if "haproxy" in u.cpu else "-",
        f"{nodes:.2f}",
        f"{nodes / n * 1e6:.2f}",
        f"{u.client:.2f}",
        busy,
        others,
        f"{_runq(run):.2f}",
        _check(run.valid, run.error, run.notes, run.lines, run.events),
    ]


def rr_cells(run: LatencyRun, direct: LatencyRun | None) -> list[str]:
    u = run.usage
    nodes = u.cpu.get("node1", 0.0) + u.cpu.get("node2", 0.0)
    busy, others = _cores(u)
    done = max(1, len(run.latencies_us))
    added = direct is not None and direct.valid and run is not direct
    return [
        run.path,
        f"{len(run.latencies_us):,}",
        f"{run.eps:,.0f}",
        f"{run.pct(0.5):.3f}",
        f"{run.pct(0.9):.3f}",
        f"{run.pct(0.99):.3f}",
        f"{run.pct(0.999):.3f}",
        f"{run.pct(1.0):.3f}",
        f"{run.pct(0.5) - direct.pct(0.5):+.3f}" if added and direct else "-",
        f"{run.pct(0.99) - direct.pct(0.99):+.3f}" if added and direct else "-",
        f"{u.cpu[run.path] / done * 1e6:.2f}" if run.path in ("balancer", "haproxy") else "-",
        f"{nodes:.2f}",
        f"{u.client:.2f}",
        busy,
        others,
        f"{_runq(run) * 1000:.0f}",
        _check(run.valid, run.error, run.notes, len(run.latencies_us), run.events),
    ]


def print_table(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> None:
    print(f"\n{title}\n")
    node_throughput.print_table(columns, rows)


def _verdict_max(value: float, target: float) -> str:
    if value <= target:
        return f"met ({target / value:.1f}x headroom)" if value > 0 else "met"
    return f"NOT met ({value / target:.1f}x over)"


def _verdict_min(value: float, target: float) -> str:
    if value >= target:
        return f"met ({value / target:.2f}x)"
    return f"NOT met ({100 * value / target:.1f} % of target, {target / value:.1f}x short)"


R = TypeVar("R", StreamRun, LatencyRun)


def _rounds(runs: list[R]) -> list[dict[str, R]]:
    """Runs grouped per round: a new round starts when a path comes again."""
    out: list[dict[str, R]] = []
    for run in runs:
        if not out or run.path in out[-1]:
            out.append({})
        out[-1][run.path] = run
    return out


def print_report(streams: list[StreamRun], latency: list[LatencyRun], rate: float) -> None:
    """Tables, ratios, CPU per event, targets."""
    by_round_s: list[dict[str, StreamRun]] = _rounds(streams)
    by_mode = {mode: _rounds([r for r in latency if r.mode == mode]) for mode in ("request-reply", "paced")}
    rows = [stream_cells(r, rnd.get("direct")) for rnd in by_round_s for r in rnd.values()]
    if rows:
        print_table("streaming (as fast as possible, one connection per node or proxy):", STREAM_COLUMNS, rows)
    titles = {
        "request-reply": "request-reply (one event in flight, "
        + (f"paced to {rate:,.0f}/s when the round trip allows):" if rate > 0 else "as fast as it goes):"),
        "paced": f"paced (open loop at {rate:,.0f} events/s, several events may be in flight):",
    }
    for mode, rounds in by_mode.items():
        rows = [rr_cells(r, rnd.get("direct")) for rnd in rounds for r in rnd.values()]
        if rows:
            print_table(titles[mode], RR_COLUMNS, rows)

    print()
    for i, rnd in enumerate(by_round_s):
        d, h, b, d2 = (rnd.get(p) for p in STREAM_PATHS)
        parts = []
        if d and d.valid:
            if h and h.valid:
                parts.append(f"haproxy/direct {h.eps / d.eps:.2f}")
            if b and b.valid:
                parts.append(f"balancer/direct {b.eps / d.eps:.2f}")
        if b and b.valid and d2 and d2.valid:
            parts.append(f"balancer/direct x2 {b.eps / d2.eps:.2f}")
        if parts:
            print(f"streaming round {i + 1}: " + ", ".join(parts))
        if b and b.valid:
            u = b.usage
            per = {k: v / b.events * 1e6 for k, v in u.cpu.items()}
            client = u.client / b.events * 1e6
            total = sum(per.get(k, 0.0) for k in ("balancer", "node1", "node2")) + client
            ncpu = os.cpu_count() or 1
            print(
                f"  CPU per event through the balancer: balancer {per.get('balancer', 0):.2f} µs, nodes "
                f"{per.get('node1', 0) + per.get('node2', 0):.2f} µs, client {client:.2f} µs; all {ncpu} cores "
                f"busy with nothing else would allow {ncpu / total * 1e6:,.0f} events/s; the balancer alone on "
                f"one core {1e6 / per.get('balancer', 1e-9):,.0f} events/s"
            )
        if h and h.valid and "haproxy" in h.usage.cpu:
            print(f"  haproxy CPU per event: {h.usage.cpu['haproxy'] / h.events * 1e6:.2f} µs")
    for mode, rounds in by_mode.items():
        for i, lat_round in enumerate(rounds):
            base = lat_round.get("direct")
            if not (base and base.valid):
                continue
            for other in (lat_round.get("haproxy"), lat_round.get("balancer")):
                if other and other.valid:
                    print(
                        f"{mode} round {i + 1}: {other.path} adds {other.pct(0.5) - base.pct(0.5):+.3f} ms at p50, "
                        f"{other.pct(0.99) - base.pct(0.99):+.3f} ms at p99 "
                        f"({other.eps:,.0f} vs {base.eps:,.0f} events/s)"
                    )
    labelled = [(r.path, "streaming", r.notes) for r in streams] + [(r.path, r.mode, r.notes) for r in latency]
    for path, mode, notes in labelled:
        for note in notes[:3]:
            print(f"  balancer log during {path} ({mode}): {note}")

    print("\ntargets (worst round):")
    bal_runs = [rnd["balancer"] for rnd in by_round_s if "balancer" in rnd and rnd["balancer"].valid]
    if bal_runs:
        cpu_m = max(r.usage.cpu["balancer"] / r.events * 1e6 for r in bal_runs)
        eps = min(r.eps for r in bal_runs)
        print(
            f"  balancer CPU-s per million events, streaming  {cpu_m:>9.2f}  target <= {TARGET_CPU_PER_MILLION:.1f}  "
            f"{_verdict_max(cpu_m, TARGET_CPU_PER_MILLION)}"
        )
        print(
            f"  events/s end to end through the balancer     {eps:>9,.0f}  target >= {TARGET_EPS:,}  "
            f"{_verdict_min(eps, TARGET_EPS)}"
        )
    for mode, rounds in by_mode.items():
        pairs = [(rnd["balancer"], rnd["direct"]) for rnd in rounds if "balancer" in rnd and "direct" in rnd]
        pairs = [(b, d) for b, d in pairs if b.valid and d.valid]
        if not pairs:
            continue
        added = max(b.pct(0.99) - d.pct(0.99) for b, d in pairs)
        reached = min(b.eps for b, _ in pairs)
        verdict = _verdict_max(max(added, 0.0), TARGET_ADDED_P99_MS)
        note = f" at {reached:,.0f} events/s"
        if mode == "request-reply" and reached < 0.97 * TARGET_RR_RATE:
            note += (
                f" (one event at a time went no faster; direct: {min(d.eps for _, d in pairs):,.0f}/s; "
                f"mean round trip {1e6 / reached:,.0f} µs through the balancer)"
            )
        label = f"added p99 latency, {mode} (ms)"
        print(f"  {label:<45}{added:>9.3f}  target <= {TARGET_ADDED_P99_MS:.1f}  {verdict}{note}")


# -- main ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events streamed per path")
    parser.add_argument("--distinct", type=int, default=50_000, help="distinct events (the stream repeats them)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=50_000, help="events streamed before each measured stream")
    parser.add_argument("--rr-events", type=int, default=30_000, help="events per path, request-reply and paced")
    parser.add_argument("--rr-warmup", type=int, default=2_000, help="unmeasured events first, same connection")
    parser.add_argument(
        "--rr-rate", type=float, default=TARGET_RR_RATE, help="events/s, request-reply and paced (0: unpaced, no paced)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat every path this many times, interleaved")
    parser.add_argument("--no-stream", action="store_true", help="skip streaming mode")
    parser.add_argument("--no-rr", action="store_true", help="skip request-reply mode")
    parser.add_argument("--no-paced", action="store_true", help="skip the open-loop paced mode")
    parser.add_argument("--no-haproxy", action="store_true", help="skip the HAProxy path")
    parser.add_argument("--haproxy", help="path of haproxy")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a run is given up")
    parser.add_argument("--profile", action="store_true", help="py-spy the balancer during one more streaming run")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="with --profile: include C frames")
    parser.add_argument("--top", type=int, default=25, help="with --profile: functions listed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    parser.add_argument("--json", dest="json_out", help="also write the raw results to this file")
    args = parser.parse_args()
    try:
        return bench(args)
    except SetupError as exc:
        print(f"balancer_throughput: set-up failed: {exc}", file=sys.stderr)
        return 2


def bench(args: argparse.Namespace) -> int:
    if args.events < 1 or args.rr_events < 1 or args.rounds < 1 or args.warmup < 0 or args.rr_warmup < 0:
        raise SetupError("--events, --rr-events and --rounds must be at least 1, the warm-ups at least 0")
    haproxy = None if args.no_haproxy else find_haproxy(args.haproxy)
    py_spy = None
    if args.profile:
        py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.access(py_spy, os.X_OK):
            raise SetupError("--profile needs py-spy: .venv/bin/pip install py-spy")
    log = sys.stderr
    started = time.perf_counter()
    stream_bytes, distinct = make_events(args.events, args.distinct, args.seed)
    warm_bytes = b"".join(distinct[i % len(distinct)] for i in range(args.warmup)) if args.warmup else b""
    print(
        f"{args.events:,} events, {len(stream_bytes) / args.events:.0f} B/event on average "
        f"({len(stream_bytes) / 1e6:.0f} MB), made in {time.perf_counter() - started:.1f} s",
        file=log,
        flush=True,
    )

    run_dir = tempfile.mkdtemp(prefix="threatgate-balancer-bench-")
    services: list[Service] = []
    ok = False
    try:
        ports = {name: free_port() for name in ("node1", "node2", "balancer", "haproxy")}
        node1 = start_node(run_dir, "node1", ports["node1"])
        services.append(node1)
        node2 = start_node(run_dir, "node2", ports["node2"])
        services.append(node2)
        balancer = start_balancer(run_dir, ports["balancer"], [ports["node1"], ports["node2"]])
        services.append(balancer)
        hap: Service | None = None
        if haproxy:
            hap = start_haproxy(haproxy, run_dir, ports["haproxy"], [ports["node1"]])
            services.append(hap)
        pids = {s.name: s.pid for s in services}
        meter = Meter(pids)
        print(f"node1 :{ports['node1']}, node2 :{ports['node2']}, balancer :{ports['balancer']}", file=log, flush=True)

        routes: dict[str, list[int]] = {
            "direct": [ports["node1"]],
            "haproxy": [ports["haproxy"]],
            "balancer": [ports["balancer"]],
            "direct x2": [ports["node1"], ports["node2"]],
        }
        paths_s = [p for p in STREAM_PATHS if hap or p != "haproxy"]
        paths_r = [p for p in RR_PATHS if hap or p != "haproxy"]
        streams: list[StreamRun] = []
        latency: list[LatencyRun] = []
        latency_modes: list[tuple[str, LatencyFn]] = []
        if not args.no_rr:
            latency_modes.append(("request-reply", request_reply))
        if not args.no_paced and args.rr_rate > 0:
            latency_modes.append(("paced", paced))
        offset = len(balancer.log_text())
        precise_sleeps()
        for rnd in range(args.rounds):
            if not args.no_stream:
                for path in paths_s:
                    if warm_bytes:
                        stream(path, routes[path], warm_bytes, Meter({}), args.timeout)
                    print(f"round {rnd + 1}: streaming {args.events:,} events, {path} ...", file=log, flush=True)
                    _, offset = balancer_incidents(balancer, offset)
                    run = stream(path, routes[path], stream_bytes, meter, args.timeout)
                    run.notes, offset = balancer_incidents(balancer, offset)
                    print(
                        f"  {run.eps:,.0f} events/s, {run.usage.wall:.2f} s, "
                        f"balancer CPU {run.usage.cpu['balancer']:.2f} s"
                        + ("" if run.valid else f"  INVALID {run.lines}/{run.events} {run.error}"),
                        file=log,
                        flush=True,
                    )
                    streams.append(run)
                    for s in services:
                        s.check_alive()
            for mode, run_latency in latency_modes:
                for path in paths_r:
                    print(f"round {rnd + 1}: {mode} {args.rr_events:,} events, {path} ...", file=log, flush=True)
                    _, offset = balancer_incidents(balancer, offset)
                    lat = run_latency(
                        path,
                        routes[path][0],
                        distinct,
                        args.rr_events,
                        args.rr_warmup,
                        args.rr_rate,
                        meter,
                        args.timeout,
                    )
                    lat.notes, offset = balancer_incidents(balancer, offset)
                    print(
                        f"  {lat.eps:,.0f} events/s, p50 {lat.pct(0.5):.3f} ms, p99 {lat.pct(0.99):.3f} ms"
                        + ("" if lat.valid else f"  INVALID {lat.error}"),
                        file=log,
                        flush=True,
                    )
                    latency.append(lat)
                    for s in services:
                        s.check_alive()

        profiles: list[tuple[str, Any, str]] = []
        if py_spy:
            bal_port = ports["balancer"]
            workloads: list[tuple[str, Callable[[], Any]]] = []
            if not args.no_stream:
                workloads.append(
                    ("streaming", lambda: stream("balancer", [bal_port], stream_bytes, meter, args.timeout))
                )
            if not args.no_rr:
                workloads.append(
                    (
                        "request-reply",
                        lambda: request_reply(
                            "balancer", bal_port, distinct, args.rr_events, 0, args.rr_rate, meter, args.timeout
                        ),
                    )
                )
            for label, workload in workloads:
                print(f"py-spy: balancer, {label} ...", file=log, flush=True)
                prun, text = profile_balancer(py_spy, balancer, label, workload, args, run_dir)
                print(f"  {prun.eps:,.0f} events/s under the profiler", file=log, flush=True)
                profiles.append((label, prun, text))

        print(
            f"\ncode {node_throughput.code_version()}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
            f"HAProxy {haproxy_version(haproxy) if haproxy else 'skipped'}; "
            f"{args.events:,} events of {len(stream_bytes) / args.events:.0f} B on average streamed per path, "
            f"{args.rr_events:,} one by one; nodes match nothing (no feeds, REQ rule only); "
            f"balancer: 2 nodes, MaxInflightEvents 20000, MaxPendingEvents 100000"
        )
        print_report(streams, latency, args.rr_rate)
        for label, prun, text in profiles:
            done = prun.events if isinstance(prun, StreamRun) else len(prun.latencies_us)
            print(
                f"\npy-spy of the balancer, {label} ({prun.eps:,.0f} events/s under the profiler, "
                f"balancer {prun.usage.cpu['balancer'] / max(1, done) * 1e6:.2f} CPU-s per million events), "
                f"top {args.top} by own time:\n"
            )
            print(text)
        if args.json_out:
            with open(args.json_out, "w", encoding="utf-8") as fh:
                json.dump(
                    {
                        "streams": [asdict(r) for r in streams],
                        "latency": [{**asdict(r), "latencies_us": None} for r in latency],
                        "latency_percentiles_ms": [
                            {q: r.pct(v) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))}
                            for r in latency
                        ],
                        "profiles": {label: text for label, _, text in profiles},
                    },
                    fh,
                    indent=1,
                )
        ok = True
        return 0 if all(r.valid for r in streams) and all(r.valid for r in latency) else 1
    finally:
        for service in reversed(services):
            stop_group(service.proc)
        if args.keep or not ok:
            print(f"kept {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
