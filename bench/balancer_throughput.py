"""Balancer benchmark: the event path through the HA balancer, beside a direct node and HAProxy (mode tcp).

    .venv/bin/python bench/balancer_throughput.py                    # 1,000,000 events streamed, 30,000 one by one
    .venv/bin/python bench/balancer_throughput.py --profile          # + py-spy of the balancer (streaming, one by one)
    .venv/bin/python bench/balancer_throughput.py --events 2000000 --rounds 2 --json out.json
    .venv/bin/python bench/balancer_throughput.py --transport plain        # plain TCP only (issues 4 and 15)
    .venv/bin/python bench/balancer_throughput.py --transport tls --profile --native   # TLS paths, OpenSSL frames

The same event stream goes, in one run, over four plain-TCP paths:

* ``direct``: client -> node (the anchor);
* ``haproxy``: client -> HAProxy ``mode tcp`` -> node.  HAProxy forwards per connection: a client
  connection is spliced to one node, which is the most an L4 proxy does with a single SIEM connection;
* ``balancer``: client -> threatgate balancer -> 2 nodes (events spread one by one, request ids added
  and stripped, replies correlated and released in order);
* ``direct x2`` (streaming only): the stream split in two halves, one connection to each node, so
  the figure of what the two nodes do without the balancer.

and, with ``--transport`` holding ``tls`` (the default: ``plain,tls``), over their TLS twins in the
same run, each beside its plain path so the ratio of the two is taken a few seconds apart (issue 17):

* ``direct tls``: client --TLS--> node (the node's ``<InputSettings><TLS>`` on a second port: the
  TLS anchor);
* ``haproxy tls``: client --TLS--> HAProxy (``bind ... ssl crt``) --TLS--> node (``server ... ssl
  verify required ca-file <the node's certificate>``), still ``mode tcp``, one thread;
* ``balancer tls-in``: client --TLS--> balancer (``<MatchingTLS port=...>``, a second port of the
  plain balancer) --plain--> nodes: the cost of the client hop alone;
* ``balancer tls``: client --TLS--> a second balancer (``<MatchingTLS enabled="true"/>``) --TLS-->
  nodes (``<Instance tls="true">`` to the nodes' TLS ports, their certificates pinned on first use in
  a fresh ``CertDirPath``): TLS on both hops, the path issue 17's targets are about.  A build that
  cannot send events to nodes over TLS fails to bring this balancer's instances UP: ``--no-upstream-tls``
  leaves the path out;
* ``direct x2 tls`` (streaming only).

Every certificate is a self-signed P-256 pair made by ``net/tls.py`` in the run directory; the
client trusts exactly those, checks 127.0.0.1 in them and speaks TLS 1.3 only (OpenSSL's default
suite, AES-256-GCM).  Its TLS runs through memory BIOs over the same blocking socket (``Conn``):
what it sends is sealed into TLS records *before* the measured window, in sending order (the
streaming and paced senders run beside a reader thread, and one OpenSSL object must not be used by
two threads at once), so the servers see the records a TLS sender writes (one per event in the
request-reply and paced modes, 16 KiB ones when streaming) and the client's encryption stays out of
the window; its decryption of the replies stays in (the client CPU column).

The nodes "match nothing": no feeds, and the only rule is the HA request id (``REQ``, a CONTEXT rule),
with the HA formats (``EventFormat`` and ``FinishedEventFormat`` start with ``%REQ%``), so every event
is answered by one ``LookupFinished`` line and the balancer is exercised as in production.  They run
one process each (``--node-workers 1``): a node with workers may shed the bench client's connection to
spread a balancer's lanes (``start_node``), and one connection is served by one process either way.

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

CPU: utime + stime of the balancers, the nodes (with their worker processes: ``<Workers>`` defaults to
one per core) and HAProxy from ``/proc/<pid>/stat``, of this process (the client) from
``time.process_time()``, and of the whole machine from ``/proc/stat``, over the measured window only.
The busy cores not accounted to these processes are shown as "others".

Targets: issue 4/15's (the plain balancer's CPU per event, events/s, added p99 against direct) and
issue 17's: ``balancer tls`` events/s at least 0.70 of ``balancer`` (TLS costs at most 30 %), and its
p99 at most 0.5 ms above the plain balancer's at 10,000 events/s; HAProxy's TLS/plain ratios and
``balancer tls-in``'s are printed beside them as anchors.

Exit status: 0 when every run is valid, whether or not the targets are met; 1 when a run lost
answers or timed out; 2 when the set-up failed (HAProxy or py-spy missing, a process did not start).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar, cast

import node_throughput  # bench/ is on sys.path when this file runs as a script
from api_lookup import SetupError, cpu_seconds, free_port, machine_busy, stop_group, summarize_stacks, tail

FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
INSTALL_HAPROXY = "apt-get install -y haproxy"

TARGET_CPU_PER_MILLION = 1.0  # balancer CPU-seconds per million events while streaming
TARGET_EPS = 500_000  # events/s end to end, nodes that match nothing
TARGET_ADDED_P99_MS = 2.0  # request-reply: balancer p99 minus direct p99
TARGET_RR_RATE = 10_000  # events/s at which the added p99 is stated

TARGET_TLS_RATIO = 0.70  # balancer TLS events/s over balancer plain events/s (TLS costs at most 30 %)
TARGET_TLS_ADDED_P99_MS = 0.5  # p99 of the balancer over TLS minus over plain TCP, at TARGET_RR_RATE

STREAM_PATHS = (
    "direct",
    "direct tls",
    "haproxy",
    "haproxy tls",
    "balancer",
    "balancer tls-in",
    "balancer tls",
    "direct x2",
    "direct x2 tls",
)
RR_PATHS = ("direct", "direct tls", "haproxy", "haproxy tls", "balancer", "balancer tls-in", "balancer tls")
TRANSPORTS = ("plain", "tls")

PLAIN_OF = {
    "direct tls": "direct",
    "haproxy tls": "haproxy",
    "balancer tls-in": "balancer",
    "balancer tls": "balancer",
    "direct x2 tls": "direct x2",
}
"""The plain-TCP twin of each TLS path: what its TLS cost is measured against."""

PROXY_OF = {
    "haproxy": "haproxy",
    "haproxy tls": "haproxy",
    "balancer": "balancer",
    "balancer tls-in": "balancer",
    "balancer tls": "balancer-tls",
}
"""The proxy process an event passes through on each path (none on the direct paths)."""


def is_tls(path: str) -> bool:
    return path in PLAIN_OF


def direct_of(path: str) -> str:
    """The direct path of the same transport: the anchor of a path's "vs direct" figures."""
    return "direct tls" if is_tls(path) else "direct"


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


# -- TLS ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """A certificate and its key (PEM files)."""

    cert: str
    key: str


def make_pairs(run_dir: str, names: list[str]) -> dict[str, Pair]:
    """A self-signed pair per name (P-256, for 127.0.0.1), made as a node makes its own: net/tls.py."""
    from threatgate.net.tls import ensure_server_pair  # cryptography: only when TLS is measured

    certs = os.path.join(run_dir, "certs")
    os.makedirs(certs, mode=0o700, exist_ok=True)
    pairs = {}
    for name in names:
        pair = Pair(os.path.join(certs, f"{name}.pem"), os.path.join(certs, f"{name}.key"))
        ensure_server_pair(pair.cert, pair.key, common_name=f"balancer_throughput {name}", hosts=["127.0.0.1"])
        pairs[name] = pair
    return pairs


def client_context(pairs: list[Pair]) -> ssl.SSLContext:
    """The client's TLS: 1.3 only (AES-GCM, OpenSSL's default suite order), trusting the run's certificates.

    Each server's self-signed certificate is a trust anchor and is checked for 127.0.0.1, so the
    client verifies every peer exactly as a SIEM given the certificates would.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    for pair in pairs:
        context.load_verify_locations(pair.cert)
    return context


class Conn:
    """One client connection: plain TCP, or TLS run through memory BIOs over the same blocking socket.

    With TLS, what is to be sent is sealed (encrypted into TLS records) by :meth:`seal` *before* it
    is sent, in the order it will be sent, and :meth:`recv_into` decrypts what arrives.  The senders
    of the streaming and paced modes run in their own thread beside a reader thread; an OpenSSL
    object must not be used by two threads at once (``SSL_write`` and ``SSL_read`` share its state),
    so the records are sealed before the threads start and only the reader touches the TLS object.
    The servers see exactly the records a TLS sender would write, and the client's own encryption,
    which is not what is measured, stays out of the measured window (its decryption stays in).
    """

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject | None, incoming: ssl.MemoryBIO) -> None:
        self.sock = sock
        self.tls = tls
        self._incoming = incoming
        self._outgoing = ssl.MemoryBIO()
        self._raw = bytearray(1 << 18)
        self.sendall = sock.sendall

    @property
    def cipher(self) -> str:
        """The TLS version and suite (``TLSv1.3 TLS_AES_256_GCM_SHA384``), empty for plain TCP."""
        if self.tls is None:
            return ""
        suite = self.tls.cipher()
        return f"{self.tls.version()} {suite[0]}" if suite else "?"

    def seal(self, data: bytes | memoryview) -> bytes | memoryview:
        """The bytes to put on the wire for ``data``: itself, or its TLS records."""
        if self.tls is None:
            return data
        self.tls.write(data)
        return self._outgoing.read()

    def recv_into(self, buf: bytearray | memoryview) -> int:
        """Like ``socket.recv_into``: decrypted bytes read into ``buf``, 0 at the end of the stream."""
        tls = self.tls
        if tls is None:
            return self.sock.recv_into(buf)
        while True:
            try:
                return cast(int, tls.read(len(buf), buf))  # typeshed: bytes; with a buffer, a count
            except ssl.SSLWantReadError:
                n = self.sock.recv_into(self._raw)
                if n == 0:
                    return 0
                self._incoming.write(memoryview(self._raw)[:n])
            except ssl.SSLZeroReturnError:
                return 0

    def close(self) -> None:
        self.sock.close()

    @classmethod
    def open(cls, port: int, timeout: float, context: ssl.SSLContext | None) -> Conn:
        """Connect to 127.0.0.1:``port``; with ``context``, run the TLS handshake before returning."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        incoming = ssl.MemoryBIO()
        if context is None:
            return cls(sock, None, incoming)
        conn = cls(sock, None, incoming)
        tls = context.wrap_bio(incoming, conn._outgoing, server_hostname="127.0.0.1")
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pending = conn._outgoing.read()
                    if pending:
                        sock.sendall(pending)
                    n = sock.recv_into(conn._raw)
                    if n == 0:
                        raise ConnectionError(f"port {port} closed the connection during the TLS handshake") from None
                    incoming.write(memoryview(conn._raw)[:n])
            pending = conn._outgoing.read()  # the client's Finished
            if pending:
                sock.sendall(pending)
        except BaseException:
            sock.close()
            raise
        conn.tls = tls
        return conn


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
{tls}  </InputSettings>
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
  <ScanSettings>
    <Workers>{workers}</Workers>
  </ScanSettings>
</Configuration>
"""

BALANCER_CONF = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- balancer_throughput.py: the defaults of examples/balancer.conf, health checks that bring nodes UP in 1 s. -->
<Config>
  <Balancer matching_port="{port}" api_port="{api_port}" cybertrace_port="{alert_port}"
            scanners_count="20">127.0.0.1</Balancer>
  <SSLCertificatePath>{cert}</SSLCertificatePath>
  <SSLPrivateKeyPath>{key}</SSLPrivateKeyPath>
  <CertDirPath>{pins}</CertDirPath>
{matching_tls}  <Instances>
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
{tls}"""

NODE_TLS = """\
    <TLS enabled="true">
      <ConnectionString>127.0.0.1:{port}</ConnectionString>
      <CertificatePath>{cert}</CertificatePath>
      <PrivateKeyPath>{key}</PrivateKeyPath>
    </TLS>
"""

HAPROXY_TLS = """\
frontend events_tls
    bind 127.0.0.1:{port} ssl crt {pem} ssl-min-ver TLSv1.2
    default_backend nodes_tls
backend nodes_tls
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


def start_node(run_dir: str, name: str, port: int, tls: tuple[int, Pair] | None, workers: str) -> Service:
    """A node listening on ``port``; with ``tls`` (port, certificate pair) also on a TLS twin port.

    ``workers`` is its ``<Workers>``.  The default here is 1: a node with worker processes sheds an
    HA client's connection (one sending ``X-KF-ReplyBack`` and ``X-KF-SendFinishedEvent``) once it is
    owed nothing when its workers' connection counts differ by two (node/pool.py), to spread a
    balancer's lanes; the health checks of two balancers make that happen, and the bench's client,
    which does not reconnect, then loses its paced run.
    """
    config = os.path.join(run_dir, f"{name}.conf")
    twin = NODE_TLS.format(port=tls[0], cert=tls[1].cert, key=tls[1].key) if tls else ""
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(NODE_CONF.format(port=port, output_port=free_port(), tls=twin, workers=workers))
    cmd = [sys.executable, "-m", "threatgate", "node", "--config", config, "--log-level", "inf"]
    service = spawn(name, cmd, os.path.join(run_dir, f"{name}.log"))
    wait_for_lines(service, r"node listening for events", 1, 60)
    return service


def start_balancer(
    run_dir: str,
    name: str,
    port: int,
    node_ports: list[int],
    pair: Pair,
    *,
    matching_tls: str = "",
    upstream_tls: bool = False,
) -> Service:
    """A balancer in front of ``node_ports``, with its own certificate pair and a fresh pin directory.

    ``matching_tls`` is the ``<MatchingTLS>`` element (none: plain TCP from the clients);
    ``upstream_tls`` writes ``tls="true"`` on every ``<Instance>`` (events to the nodes over TLS, each
    node's certificate pinned on first use in the pin directory).
    """
    config = os.path.join(run_dir, f"{name}.conf")
    tls_attr = ' tls="true"' if upstream_tls else ""
    instances = "\n".join(
        f'    <Instance matching_port="{p}" api_port="{free_port()}" enabled="true"{tls_attr}>127.0.0.1</Instance>'
        for p in node_ports
    )
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(
            BALANCER_CONF.format(
                port=port,
                api_port=free_port(),
                alert_port=free_port(),
                instances=instances,
                cert=pair.cert,
                key=pair.key,
                pins=os.path.join(run_dir, f"pins-{name}"),
                matching_tls=f"  {matching_tls}\n" if matching_tls else "",
            )
        )
    cmd = [sys.executable, "-m", "threatgate", "balancer", "--config", config, "--log-level", "inf"]
    service = spawn(name, cmd, os.path.join(run_dir, f"{name}.log"))
    wait_for_lines(service, r"balancer listening for events", 1, 60)
    hint = " (does this build send events to nodes over TLS? --no-upstream-tls skips the path)" if upstream_tls else ""
    try:
        wait_for_lines(service, r"instance \S+ is UP", len(node_ports), 30)
        wait_for_lines(service, r"instance \S+: event connection open", len(node_ports), 30)
    except SetupError as exc:
        raise SetupError(f"{exc}{hint}") from None
    return service


def check_pins(pin_dir: str, nodes: list[Pair]) -> None:
    """The balancer pinned exactly the nodes' certificates (one pin each), so its TLS to them is real."""
    from threatgate.net.tls import fingerprint_sha256

    def fingerprint(path: str) -> str:
        with open(path, "rb") as fh:
            return fingerprint_sha256(fh.read())

    try:
        pinned = sorted(fingerprint(os.path.join(pin_dir, name)) for name in os.listdir(pin_dir))
    except OSError as exc:
        raise SetupError(f"the balancer saved no pins in {pin_dir}: {exc}") from None
    expected = sorted(fingerprint(pair.cert) for pair in nodes)
    if pinned != expected:
        raise SetupError(f"the pins in {pin_dir} ({pinned}) are not the nodes' certificates ({expected})")


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


def start_haproxy(
    haproxy: str, run_dir: str, port: int, node_ports: list[int], tls: tuple[int, Pair, list[Pair], list[int]] | None
) -> Service:
    """HAProxy ``mode tcp`` on ``port`` to ``node_ports``; with ``tls`` also a TLS frontend and backend.

    ``tls`` is (the TLS port, HAProxy's own pair, the nodes' pairs, the nodes' TLS ports): HAProxy
    terminates the client's TLS with its pair and opens TLS to each node, verifying the node's
    self-signed certificate as its own CA (``verify required ca-file``), as an operator would pin it.
    """
    config = os.path.join(run_dir, "haproxy.cfg")
    servers = "\n".join(f"    server node{i + 1} 127.0.0.1:{p}" for i, p in enumerate(node_ports))
    tls_section = ""
    if tls:
        tls_port, own, node_pairs, tls_ports = tls
        pem = os.path.join(run_dir, "certs", "haproxy-bundle.pem")
        with open(own.cert, encoding="ascii") as cert_fh, open(own.key, encoding="ascii") as key_fh:
            bundle = cert_fh.read() + key_fh.read()
        fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(bundle)
        tls_servers = "\n".join(
            f"    server node{i + 1}_tls 127.0.0.1:{p} ssl verify required ca-file {pair.cert}"
            for i, (p, pair) in enumerate(zip(tls_ports, node_pairs, strict=True))
        )
        tls_section = HAPROXY_TLS.format(port=tls_port, pem=pem, servers=tls_servers)
    with open(config, "w", encoding="utf-8") as fh:
        fh.write(HAPROXY_CONF.format(port=port, servers=servers, tls=tls_section))
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


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (a node's workers), from ``/proc/<pid>/task/*/children``."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as fh:
                found.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            continue
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its children: a node with ``<Workers>`` >= 2 matches in its workers."""
    total = cpu_seconds(pid)
    for child in children(pid):
        try:
            total += cpu_seconds(child)
        except (OSError, IndexError, ValueError):
            continue  # a worker that exited between the listing and the read
    return total


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
        return {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}

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
    cipher: str = ""  # TLS version and suite; empty over plain TCP

    @property
    def eps(self) -> float:
        return self.events / self.usage.wall

    @property
    def valid(self) -> bool:
        """Every event answered by one line, all lines alike (the finished line; nothing matches)."""
        return not self.error and self.lines == self.events and self.bytes == self.lines * (len(self.first_line) + 1)


def stream(
    path: str, ports: list[int], stream_bytes: bytes, meter: Meter, timeout: float, tls: ssl.SSLContext | None = None
) -> StreamRun:
    """Send the stream (split over ``ports``) as fast as possible; count finished lines until all arrived.

    With ``tls`` the connections speak TLS and the stream is sealed into TLS records before the
    measured window (:class:`Conn`).
    """
    parts = split_stream(stream_bytes, len(ports))
    expected = [_count_lines(stream_bytes, parts, i) for i in range(len(parts))]
    socks = [Conn.open(port, timeout, tls) for port in ports]
    wire = [(sock.seal(FLAGS), sock.seal(part)) for sock, part in zip(socks, parts, strict=True)]
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
            socks[i].sendall(wire[i][0])
            socks[i].sendall(wire[i][1])
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
    return StreamRun(path, sum(expected), sum(lines), sum(nbytes), usage, line, "; ".join(errors), [], socks[0].cipher)


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
    cipher: str = ""  # TLS version and suite; empty over plain TCP

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


LatencyFn = Callable[[str, int, list[bytes], int, int, float, "Meter", float, "ssl.SSLContext | None"], LatencyRun]


def precise_sleeps() -> None:
    """Timer slack 1 µs for the calling thread (default 50 µs), so 100 µs pacing steps are kept."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, ctypes.c_ulong(1000), 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def sealed_events(conn: Conn, events: list[bytes], total: int) -> list[bytes | memoryview]:
    """The ``total`` events to send, in order, as they go on the wire: each its own TLS record over TLS."""
    n_events = len(events)
    return [conn.seal(events[i % n_events]) for i in range(total)]


def request_reply(
    path: str,
    port: int,
    events: list[bytes],
    count: int,
    warmup: int,
    rate: float,
    meter: Meter,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> LatencyRun:
    """One event in flight: send, wait for its finished line, record the round trip; paced to ``rate``.

    When a round trip takes longer than 1/rate the next event goes at once (no catch-up burst), so the
    achieved rate is what one event at a time allows.  Over TLS each event is one record, sealed
    before the first is sent (:class:`Conn`); the replies are decrypted inside the round trip.
    """
    precise_sleeps()
    sock = Conn.open(port, timeout, tls)
    buf = bytearray(4096)
    view = memoryview(buf)
    clock = time.perf_counter_ns
    interval = int(1e9 / rate) if rate > 0 else 0
    latencies: list[float] = []
    error = ""
    measuring = False
    try:
        sock.sendall(sock.seal(FLAGS))
        wire = iter(sealed_events(sock, events, warmup + count))
        send, recv_into = sock.sendall, sock.recv_into
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
                data = next(wire)
                started = clock()
                send(data)
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
    return LatencyRun("request-reply", path, count, rate, latencies, usage, error, [], sock.cipher)


def paced(
    path: str,
    port: int,
    events: list[bytes],
    count: int,
    warmup: int,
    rate: float,
    meter: Meter,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> LatencyRun:
    """Open loop: one thread sends an event every 1/rate s whatever the replies, another timestamps them.

    Replies come back in submission order, so the i-th finished line answers the i-th event; a line's
    time is that of the read that completed it.  Latency is counted from the actual send.  Over TLS
    each event is one record, all sealed before the threads start (:class:`Conn`).
    """
    total = warmup + count
    sock = Conn.open(port, timeout, tls)
    flags = sock.seal(FLAGS)
    wire = sealed_events(sock, events, total)
    sent = [0] * total
    received = [0] * total
    errors: list[str] = []
    clock = time.perf_counter_ns
    interval = 1e9 / rate
    started = threading.Event()

    def sender() -> None:
        precise_sleeps()
        send = sock.sendall
        try:
            send(flags)
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
                send(wire[i])
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
    return LatencyRun(
        "paced", path, count, rate, latencies if not errors else [], usage, "; ".join(errors), [], sock.cipher
    )


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
    raw = os.path.join(run_dir, f"py-spy-{label.replace(' ', '-')}.txt")
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
    text = summarize_stacks(raw, args.top)
    return run, (time_by_category(raw) + "\n\n" + text) if args.native else text


SYSCALLS = frozenset(
    {"write", "writev", "read", "readv", "recv", "recvfrom", "send", "sendto", "sendmsg", "epoll_pwait"}
)


def leaf_category(stack: list[str]) -> str:
    """Where one py-spy sample (``--native``, root first) spent its time, by its leaf frame."""
    func, _, where = stack[-1].strip().rpartition(" (")
    where = where.rstrip(")")
    if "libssl" in where or "libcrypto" in where:
        return "OpenSSL (libssl, libcrypto)"
    if where.startswith("libc.so") and func in SYSCALLS:
        return "system calls (read, write, epoll)"
    if "threatgate/" in where or where.endswith("_scan.c"):
        return "threatgate (Python and its C helpers)"
    if where.endswith(("loop.c", ".pyx", ".pxd")) or "uvloop" in where or "libuv" in where:
        return "uvloop and libuv (its SSLProtocol included)"
    return "interpreter, libc (copies, allocation), other"


def time_by_category(raw: str) -> str:
    """Samples of the main thread by :func:`leaf_category`, and how many ran under uvloop's SSLProtocol."""
    counts: collections.Counter[str] = collections.Counter()
    under_ssl = samples = 0
    with open(raw, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            stack_s, _, count_s = line.rstrip("\n").rpartition(" ")
            if not stack_s or not count_s.isdigit():
                continue
            stack = stack_s.split(";")
            if any("Thread._bootstrap" in f for f in stack):
                continue
            count = int(count_s)
            samples += count
            counts[leaf_category(stack)] += count
            under_ssl += count if any("SSLProtocol" in f for f in stack) else 0
    if not samples:
        return "no samples"
    rows = [f"| {name} | {100 * n / samples:.1f} |" for name, n in counts.most_common()]
    return "\n".join(
        ["| where (leaf frame) | % of samples |", "|---|---:|", *rows, ""]
        + [f"{100 * under_ssl / samples:.1f} % of samples ran under uvloop's SSLProtocol (TLS reads and writes)"]
    )


# -- report -------------------------------------------------------------------------------------------

STREAM_COLUMNS = (
    "path",
    "events",
    "seconds",
    "events/s",
    "vs direct",
    "vs plain",
    "proxy CPU s",
    "proxy CPU-s/M ev",
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
    "+p99 vs plain",
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
    "direct tls": ("node1",),
    "haproxy": ("haproxy", "node1"),
    "haproxy tls": ("haproxy", "node1"),
    "balancer": ("balancer", "node1", "node2"),
    "balancer tls-in": ("balancer", "node1", "node2"),
    "balancer tls": ("balancer-tls", "node1", "node2"),
    "direct x2": ("node1", "node2"),
    "direct x2 tls": ("node1", "node2"),
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


def _proxy_cpu(run: StreamRun | LatencyRun) -> float | None:
    """CPU seconds of the run's proxy (balancer or HAProxy) over the window; None on a direct path."""
    proxy = PROXY_OF.get(run.path)
    return run.usage.cpu.get(proxy, 0.0) if proxy else None


def stream_cells(run: StreamRun, rnd: dict[str, StreamRun]) -> list[str]:
    u, n = run.usage, run.events
    nodes = u.cpu.get("node1", 0.0) + u.cpu.get("node2", 0.0)
    proxy = _proxy_cpu(run)
    busy, others = _cores(u)
    direct = rnd.get(direct_of(run.path))
    plain = rnd.get(PLAIN_OF.get(run.path, ""))
    return [
        run.path,
        f"{n:,}",
        f"{u.wall:.2f}",
        f"{run.eps:,.0f}",
        f"{run.eps / direct.eps:.2f}" if direct and direct.valid else "-",
        f"{run.eps / plain.eps:.2f}" if plain and plain.valid else "-",
        f"{proxy:.2f}" if proxy is not None else "-",
        f"{proxy / n * 1e6:.2f}" if proxy is not None else "-",
        f"{nodes:.2f}",
        f"{nodes / n * 1e6:.2f}",
        f"{u.client:.2f}",
        busy,
        others,
        f"{_runq(run):.2f}",
        _check(run.valid, run.error, run.notes, run.lines, run.events),
    ]


def rr_cells(run: LatencyRun, rnd: dict[str, LatencyRun]) -> list[str]:
    u = run.usage
    nodes = u.cpu.get("node1", 0.0) + u.cpu.get("node2", 0.0)
    proxy = _proxy_cpu(run)
    busy, others = _cores(u)
    done = max(1, len(run.latencies_us))
    direct = rnd.get(direct_of(run.path))
    plain = rnd.get(PLAIN_OF.get(run.path, ""))
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
        f"{run.pct(0.99) - plain.pct(0.99):+.3f}" if plain and plain.valid and run.valid else "-",
        f"{proxy / done * 1e6:.2f}" if proxy is not None else "-",
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


def _pairs(rounds: list[dict[str, R]], path: str, base: str) -> list[tuple[R, R]]:
    """(run of ``path``, run of ``base``) of every round where both are valid."""
    found = [(rnd.get(path), rnd.get(base)) for rnd in rounds]
    return [(a, b) for a, b in found if a is not None and b is not None and a.valid and b.valid]


def print_report(streams: list[StreamRun], latency: list[LatencyRun], rate: float) -> None:
    """Tables, ratios, CPU per event, targets."""
    by_round_s: list[dict[str, StreamRun]] = _rounds(streams)
    by_mode = {mode: _rounds([r for r in latency if r.mode == mode]) for mode in ("request-reply", "paced")}
    rows = [stream_cells(r, rnd) for rnd in by_round_s for r in rnd.values()]
    if rows:
        print_table("streaming (as fast as possible, one connection per node or proxy):", STREAM_COLUMNS, rows)
    titles = {
        "request-reply": "request-reply (one event in flight, "
        + (f"paced to {rate:,.0f}/s when the round trip allows):" if rate > 0 else "as fast as it goes):"),
        "paced": f"paced (open loop at {rate:,.0f} events/s, several events may be in flight):",
    }
    for mode, rounds in by_mode.items():
        rows = [rr_cells(r, rnd) for rnd in rounds for r in rnd.values()]
        if rows:
            print_table(titles[mode], RR_COLUMNS, rows)
    ciphers = {r.path: r.cipher for r in streams if r.cipher} | {r.path: r.cipher for r in latency if r.cipher}
    if ciphers:
        print("\nclient TLS: " + ", ".join(f"{path} {cipher}" for path, cipher in ciphers.items()))

    print()
    for i, rnd in enumerate(by_round_s):
        d, h, b, d2 = (rnd.get(p) for p in ("direct", "haproxy", "balancer", "direct x2"))
        parts = []
        if d and d.valid:
            if h and h.valid:
                parts.append(f"haproxy/direct {h.eps / d.eps:.2f}")
            if b and b.valid:
                parts.append(f"balancer/direct {b.eps / d.eps:.2f}")
        if b and b.valid and d2 and d2.valid:
            parts.append(f"balancer/direct x2 {b.eps / d2.eps:.2f}")
        tls = [
            f"{path} {run.eps / rnd[PLAIN_OF[path]].eps:.2f}"
            for path, run in rnd.items()
            if is_tls(path) and run.valid and PLAIN_OF[path] in rnd and rnd[PLAIN_OF[path]].valid
        ]
        if tls:
            parts.append("TLS/plain: " + ", ".join(tls))
        if parts:
            print(f"streaming round {i + 1}: " + ", ".join(parts))
        for path in ("balancer", "balancer tls-in", "balancer tls"):
            run = rnd.get(path)
            if not (run and run.valid):
                continue
            u, proxy = run.usage, PROXY_OF[path]
            per = {k: v / run.events * 1e6 for k, v in u.cpu.items()}
            client = u.client / run.events * 1e6
            total = sum(per.get(k, 0.0) for k in (proxy, "node1", "node2")) + client
            ncpu = os.cpu_count() or 1
            print(
                f"  CPU per event, {path}: balancer {per.get(proxy, 0):.2f} µs, nodes "
                f"{per.get('node1', 0) + per.get('node2', 0):.2f} µs, client {client:.2f} µs; all {ncpu} cores "
                f"busy with nothing else would allow {ncpu / total * 1e6:,.0f} events/s; the balancer alone on "
                f"one core {1e6 / max(per.get(proxy, 0.0), 1e-9):,.0f} events/s"
            )
        for path in ("haproxy", "haproxy tls"):
            run = rnd.get(path)
            if run and run.valid and "haproxy" in run.usage.cpu:
                print(f"  haproxy CPU per event, {path}: {run.usage.cpu['haproxy'] / run.events * 1e6:.2f} µs")
    for mode, rounds in by_mode.items():
        for i, lat_round in enumerate(rounds):
            for other in lat_round.values():
                bases = [lat_round.get(direct_of(other.path)), lat_round.get(PLAIN_OF.get(other.path, ""))]
                for base in bases:
                    if other.valid and base is not None and base is not other and base.valid:
                        print(
                            f"{mode} round {i + 1}: {other.path} adds {other.pct(0.5) - base.pct(0.5):+.3f} ms at "
                            f"p50, {other.pct(0.99) - base.pct(0.99):+.3f} ms at p99 to {base.path} "
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
        pairs = _pairs(rounds, "balancer", "direct")
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
        print(f"  {label:<52}{added:>9.3f}  target <= {TARGET_ADDED_P99_MS:.1f}  {verdict}{note}")
    print_tls_targets(by_round_s, by_mode)


def print_tls_targets(by_round_s: list[dict[str, StreamRun]], by_mode: dict[str, list[dict[str, LatencyRun]]]) -> None:
    """Issue 17's targets: the balancer over TLS against itself over plain TCP; HAProxy's ratio beside it.

    ``balancer tls`` (TLS on both hops) is the path the targets are about; ``balancer tls-in`` (TLS
    from the client only) and HAProxy's TLS path are shown beside it, as anchors, without a verdict.
    """
    for path, plain in (("balancer tls", "balancer"), ("balancer tls-in", "balancer"), ("haproxy tls", "haproxy")):
        pairs = _pairs(by_round_s, path, plain)
        if not pairs:
            continue
        ratio = min(t.eps / p.eps for t, p in pairs)
        verdict = (
            f"target >= {TARGET_TLS_RATIO:.2f}  {_verdict_min(ratio, TARGET_TLS_RATIO)}"
            if path == "balancer tls"
            else "(anchor)"
        )
        label = f"events/s {path} / {plain}, streaming"
        print(f"  {label:<52}{ratio:>9.2f}  {verdict}")
    for mode, rounds in by_mode.items():
        for path, plain in (("balancer tls", "balancer"), ("balancer tls-in", "balancer"), ("haproxy tls", "haproxy")):
            lat_pairs = _pairs(rounds, path, plain)
            if not lat_pairs:
                continue
            added = max(t.pct(0.99) - p.pct(0.99) for t, p in lat_pairs)
            reached = min(t.eps for t, _ in lat_pairs)
            verdict = (
                f"target <= {TARGET_TLS_ADDED_P99_MS:.1f}  {_verdict_max(max(added, 0.0), TARGET_TLS_ADDED_P99_MS)}"
                if path == "balancer tls"
                else "(anchor)"
            )
            label = f"p99 {path} - {plain}, {mode} (ms)"
            print(f"  {label:<52}{added:>+9.3f}  {verdict} at {reached:,.0f} events/s")


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
    parser.add_argument("--no-haproxy", action="store_true", help="skip the HAProxy paths")
    parser.add_argument(
        "--transport",
        default="plain,tls",
        help="comma-separated: plain (TCP), tls (client TLS 1.3; TLS to the nodes on the both-hops paths)",
    )
    parser.add_argument(
        "--no-upstream-tls", action="store_true", help="skip 'balancer tls' (TLS on both hops: client and nodes)"
    )
    parser.add_argument(
        "--no-tls-in", action="store_true", help="skip 'balancer tls-in' (TLS from the client, plain to the nodes)"
    )
    parser.add_argument("--haproxy", help="path of haproxy")
    parser.add_argument(
        "--node-workers", default="1", help="the nodes' <Workers> (1: one process each; auto: one per core)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a run is given up")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy each balancer during one more streaming and request-reply run"
    )
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
    transports = {t.strip() for t in args.transport.split(",") if t.strip()}
    if not transports or not transports <= set(TRANSPORTS):
        raise SetupError(f"--transport {args.transport!r}: a comma-separated list of {', '.join(TRANSPORTS)}")
    with_tls = "tls" in transports
    upstream_tls = with_tls and not args.no_upstream_tls
    tls_in = with_tls and not args.no_tls_in
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
        names = ("node1", "node2", "balancer", "balancer-tls", "haproxy")
        ports = {name: free_port() for name in names}
        tls_ports = {name: free_port() for name in names}  # the TLS twin ports (balancer-tls: unused)
        pairs = make_pairs(run_dir, list(names) if with_tls else ["balancer"])
        for name in ("node1", "node2"):
            twin_port = (tls_ports[name], pairs[name]) if with_tls else None
            services.append(start_node(run_dir, name, ports[name], twin_port, args.node_workers))
        twin = f'<MatchingTLS enabled="true" port="{tls_ports["balancer"]}"/>' if tls_in else ""
        node_ports = [ports["node1"], ports["node2"]]
        balancer = start_balancer(
            run_dir, "balancer", ports["balancer"], node_ports, pairs["balancer"], matching_tls=twin
        )
        services.append(balancer)
        balancer_tls: Service | None = None
        if upstream_tls:
            balancer_tls = start_balancer(
                run_dir,
                "balancer-tls",
                ports["balancer-tls"],
                [tls_ports["node1"], tls_ports["node2"]],
                pairs["balancer-tls"],
                matching_tls='<MatchingTLS enabled="true"/>',
                upstream_tls=True,
            )
            services.append(balancer_tls)
            check_pins(os.path.join(run_dir, "pins-balancer-tls"), [pairs["node1"], pairs["node2"]])
        hap: Service | None = None
        if haproxy:
            hap_tls = (tls_ports["haproxy"], pairs["haproxy"], [pairs["node1"]], [tls_ports["node1"]])
            hap = start_haproxy(haproxy, run_dir, ports["haproxy"], [ports["node1"]], hap_tls if with_tls else None)
            services.append(hap)
        pids = {s.name: s.pid for s in services}
        meter = Meter(pids)
        context = client_context(list(pairs.values())) if with_tls else None
        print(
            f"node1 :{ports['node1']}, node2 :{ports['node2']}, balancer :{ports['balancer']}"
            + (
                f"; TLS: node1 :{tls_ports['node1']}, node2 :{tls_ports['node2']}, balancer (tls-in) "
                f":{tls_ports['balancer']}, balancer-tls :{ports['balancer-tls']}"
                if with_tls
                else ""
            ),
            file=log,
            flush=True,
        )

        routes: dict[str, list[int]] = {
            "direct": [ports["node1"]],
            "haproxy": [ports["haproxy"]],
            "balancer": [ports["balancer"]],
            "direct x2": [ports["node1"], ports["node2"]],
            "direct tls": [tls_ports["node1"]],
            "haproxy tls": [tls_ports["haproxy"]],
            "balancer tls-in": [tls_ports["balancer"]],
            "balancer tls": [ports["balancer-tls"]],
            "direct x2 tls": [tls_ports["node1"], tls_ports["node2"]],
        }
        logs = {p: balancer_tls if p == "balancer tls" and balancer_tls else balancer for p in routes}

        def wanted(path: str) -> bool:
            if ("tls" if is_tls(path) else "plain") not in transports:
                return False
            if path.startswith("haproxy") and not hap:
                return False
            return (path != "balancer tls" or upstream_tls) and (path != "balancer tls-in" or tls_in)

        def tls_of(path: str) -> ssl.SSLContext | None:
            return context if is_tls(path) else None

        paths_s = [p for p in STREAM_PATHS if wanted(p)]
        paths_r = [p for p in RR_PATHS if wanted(p)]
        streams: list[StreamRun] = []
        latency: list[LatencyRun] = []
        latency_modes: list[tuple[str, LatencyFn]] = []
        if not args.no_rr:
            latency_modes.append(("request-reply", request_reply))
        if not args.no_paced and args.rr_rate > 0:
            latency_modes.append(("paced", paced))
        offsets = {s.name: len(s.log_text()) for s in (balancer, balancer_tls) if s}
        precise_sleeps()
        for rnd in range(args.rounds):
            if not args.no_stream:
                for path in paths_s:
                    if warm_bytes:
                        stream(path, routes[path], warm_bytes, Meter({}), args.timeout, tls_of(path))
                    print(f"round {rnd + 1}: streaming {args.events:,} events, {path} ...", file=log, flush=True)
                    svc = logs[path]
                    _, offsets[svc.name] = balancer_incidents(svc, offsets[svc.name])
                    run = stream(path, routes[path], stream_bytes, meter, args.timeout, tls_of(path))
                    run.notes, offsets[svc.name] = balancer_incidents(svc, offsets[svc.name])
                    proxy = PROXY_OF.get(path)
                    print(
                        f"  {run.eps:,.0f} events/s, {run.usage.wall:.2f} s, client CPU {run.usage.client:.2f} s"
                        + (f", {proxy} CPU {run.usage.cpu[proxy]:.2f} s" if proxy else "")
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
                    svc = logs[path]
                    _, offsets[svc.name] = balancer_incidents(svc, offsets[svc.name])
                    lat = run_latency(
                        path,
                        routes[path][0],
                        distinct,
                        args.rr_events,
                        args.rr_warmup,
                        args.rr_rate,
                        meter,
                        args.timeout,
                        tls_of(path),
                    )
                    lat.notes, offsets[svc.name] = balancer_incidents(svc, offsets[svc.name])
                    print(
                        f"  {lat.eps:,.0f} events/s, p50 {lat.pct(0.5):.3f} ms, p99 {lat.pct(0.99):.3f} ms"
                        + ("" if lat.valid else f"  INVALID {lat.error}"),
                        file=log,
                        flush=True,
                    )
                    latency.append(lat)
                    for s in services:
                        s.check_alive()

        profiles: list[tuple[str, str, Any, str]] = []
        if py_spy:
            profiled = [p for p in ("balancer", "balancer tls", "balancer tls-in") if wanted(p)]
            if "balancer tls" in profiled and "balancer tls-in" in profiled:
                profiled.remove("balancer tls-in")  # the both-hops path covers the client hop's code too
            workloads: list[tuple[str, str, Callable[[], Any]]] = []
            for path in profiled:
                port, tls = routes[path][0], tls_of(path)
                if not args.no_stream:
                    run_stream = functools.partial(stream, path, [port], stream_bytes, meter, args.timeout, tls)
                    workloads.append((path, "streaming", run_stream))
                if not args.no_rr:
                    run_rr = functools.partial(
                        request_reply, path, port, distinct, args.rr_events, 0, args.rr_rate, meter, args.timeout, tls
                    )
                    workloads.append((path, "request-reply", run_rr))
            for path, label, workload in workloads:
                print(f"py-spy: {path}, {label} ...", file=log, flush=True)
                service = logs[path]
                prun, text = profile_balancer(py_spy, service, f"{path} {label}", workload, args, run_dir)
                print(f"  {prun.eps:,.0f} events/s under the profiler", file=log, flush=True)
                profiles.append((path, label, prun, text))

        print(
            f"\ncode {node_throughput.code_version()}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
            f"HAProxy {haproxy_version(haproxy) if haproxy else 'skipped'}; "
            f"{args.events:,} events of {len(stream_bytes) / args.events:.0f} B on average streamed per path, "
            f"{args.rr_events:,} one by one; nodes match nothing (no feeds, REQ rule only); "
            f"balancer: 2 nodes, MaxInflightEvents 20000, MaxPendingEvents 100000; "
            f"transports: {', '.join(t for t in TRANSPORTS if t in transports)}"
            + (f", OpenSSL {ssl.OPENSSL_VERSION.split()[1]} in the client" if with_tls else "")
        )
        print_report(streams, latency, args.rr_rate)
        for path, label, prun, text in profiles:
            done = prun.events if isinstance(prun, StreamRun) else len(prun.latencies_us)
            proxy = PROXY_OF[path]
            print(
                f"\npy-spy of {proxy}, {path}, {label} ({prun.eps:,.0f} events/s under the profiler, "
                f"balancer {prun.usage.cpu[proxy] / max(1, done) * 1e6:.2f} CPU-s per million events), "
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
                        "profiles": {f"{path} {label}": text for path, label, _, text in profiles},
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
