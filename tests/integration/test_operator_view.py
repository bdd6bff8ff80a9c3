"""What an operator reads from real ``threatgate node`` and ``balancer`` processes (issue 12, items 4-6).

- metrics a Prometheus user expects: process, Python and build-info series on every ``/metrics``; per-feed
  series only for enabled feeds; per-instance balancer series (dispatched, answered, redispatched,
  health-check round trip); the balancer's ``/readyz`` polls counted apart from user requests;
- log levels: client connect/close at debug on the balancer, hints naming metrics that exist;
- no ``Server: Python/... aiohttp/...`` on any HTTP answer.

Every wait is on a log line, a counter or an answer, with a deadline.
"""

from __future__ import annotations

import ast
import asyncio
import os
import platform
import pty
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.helpers import (
    BIND_ANY,
    EXAMPLES,
    REPLY_FLAGS,
    BalancerProcess,
    GatewayPorts,
    HTTPSClient,
    LoopThread,
    NodeProcess,
    balancer_config,
    example_config,
    exchange,
    gateway_config,
    prometheus_samples,
    running_balancer,
    stream,
    wait_for_log_count,
    wait_until,
)
from threatgate._version import __version__
from threatgate.net.tls import fingerprint_sha256

SRC = Path(__file__).resolve().parents[2] / "src" / "threatgate"
URL_HIT = "http://fakess123.nu"  # in examples/feeds/malicious_urls.json
FEEDS = ("malicious_urls.json", "ip_reputation.csv", "malicious_hashes.json", "botnet_domains.json")


def scrape(port: int) -> tuple[dict[str, float], set[str], dict[str, str]]:
    """(samples, the metric names it declares, the HTTP headers) of ``http://127.0.0.1:port/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
        headers = {k.lower(): v for k, v in response.getheaders()}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples, set(re.findall(r"^# TYPE (\S+) ", text, re.M)), headers


@dataclass
class Node:
    proc: NodeProcess
    dir: Path
    event_port: int
    api_port: int
    metrics_port: int

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.event_port}"

    @property
    def api(self) -> HTTPSClient:
        return HTTPSClient(self.api_port, self.dir / "certs" / "node.pem")

    def samples(self) -> dict[str, float]:
        return prometheus_samples(self.metrics_port)

    def total(self, name: str) -> float:
        return sum(v for k, v in self.samples().items() if k == name or k.startswith(name + "{"))


def start_node(directory: Path) -> Node:
    """A node started on port 0 for its event, API and metrics ports; its ports are known after :func:`ready`."""
    directory.mkdir(parents=True, exist_ok=True)
    config = example_config(directory, extra_service="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>")
    return Node(NodeProcess(config), directory, 0, 0, 0)


def ready(node: Node) -> Node:
    """Wait for the node's READY; its ports are the ones it reported."""
    node.proc.wait_ready()
    node.event_port, node.api_port, node.metrics_port = node.proc.port, node.proc.api_port, node.proc.metrics_port
    return node


@dataclass
class Deployment:
    nodes: list[Node]
    balancer: BalancerProcess
    ports: GatewayPorts
    metrics_port: int
    dir: Path

    @property
    def gateway(self) -> HTTPSClient:
        return HTTPSClient(self.ports.api, self.dir / "certs" / "balancer.pem")

    def samples(self) -> dict[str, float]:
        return prometheus_samples(self.metrics_port)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Two example nodes behind a balancer that polls their ``/readyz`` (the default) every second."""
    nodes: list[Node] = []
    balancer: BalancerProcess | None = None
    try:
        for i in range(2):
            nodes.append(start_node(tmp_path_factory.mktemp(f"node{i}")))
        for node in nodes:
            ready(node)
        directory = tmp_path_factory.mktemp("balancer")
        gateway_config(
            directory / "kl_balancer.conf",
            instances=[(n.event_port, n.api_port) for n in nodes],
            extra="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
            ports=BIND_ANY,
        )
        balancer = BalancerProcess(directory / "kl_balancer.conf")
        balancer.wait_ready()
        wait_for_log_count(balancer, r"instance 127\.0\.0\.1:\d+ is UP", 2, after=0)
        yield Deployment(nodes, balancer, GatewayPorts.bound_by(balancer), balancer.metrics_port, directory)
        assert balancer.proc.poll() is None and "Traceback" not in balancer.log(), balancer.log()
        for node in nodes:
            assert "Traceback" not in node.proc.log(), node.proc.log()
    finally:
        if balancer is not None:
            balancer.stop()
        for node in nodes:
            node.proc.stop()


# -- item 5: what a Prometheus user expects -------------------------------------------------------------------


def test_every_metrics_endpoint_has_process_python_and_build_info(deployment: Deployment) -> None:
    build = f'threatgate_build_info{{python="{platform.python_version()}",version="{__version__}"}}'
    for port in (deployment.metrics_port, deployment.nodes[0].metrics_port):
        samples, names, _ = scrape(port)
        assert samples[build] == 1, port
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "python_info"):
            assert name in names, (port, name)
        assert samples["process_resident_memory_bytes"] > 0 and samples["process_start_time_seconds"] > 0
        assert any(k.startswith("python_gc_collections_total{") for k in samples), port


def test_readyz_polls_are_counted_apart_from_user_requests(deployment: Deployment) -> None:
    """The balancer asks each node's /readyz every second: the node counts them as probes, not as API
    requests, and the balancer counts them as its readiness polls, not as gateway requests or failures."""
    node = deployment.nodes[0]
    requests = node.total("threatgate_api_requests_total")
    probes = node.samples().get('threatgate_api_probes_total{path="/readyz"}', 0)
    wait_until(
        lambda: node.samples().get('threatgate_api_probes_total{path="/readyz"}', 0) >= probes + 2,
        "two more /readyz polls of the node",
    )
    assert node.total("threatgate_api_requests_total") == requests  # none of them is a user request
    assert node.api.request("GET", "/healthz").status == 200  # a probe from anyone is a probe
    assert node.samples()['threatgate_api_probes_total{path="/healthz"}'] >= 1
    assert node.api.request("GET", "/api/1.1/suppliers").status == 401  # a user request is one
    assert node.total("threatgate_api_requests_total") == requests + 1
    balancer = deployment.samples()
    assert balancer['threatgate_balancer_readiness_polls_total{result="ready"}'] >= 4
    assert sum(v for k, v in balancer.items() if k.startswith("threatgate_api_requests_total")) == 0
    assert sum(v for k, v in balancer.items() if k.startswith("threatgate_gateway_failures_total")) == 0


def test_per_instance_series(deployment: Deployment) -> None:
    """Events through the balancer: per instance, what was sent and answered adds up to the whole; each
    instance's last health check round trip is there."""
    events = 200
    payload = REPLY_FLAGS + b"".join(b"%d url=%s\n" % (n, URL_HIT.encode()) for n in range(events))
    before = deployment.samples()
    lines = stream(deployment.ports.matching, payload)
    assert lines.count("LookupFinished") == events
    after = deployment.samples()

    def added(name: str) -> float:
        keys = [f'{name}{{instance="{n.key}"}}' for n in deployment.nodes]
        return sum(after[k] - before.get(k, 0) for k in keys)

    assert added("threatgate_balancer_instance_dispatched_total") == events
    assert added("threatgate_balancer_instance_answered_total") == events
    assert added("threatgate_balancer_instance_redispatched_total") == 0
    for node in deployment.nodes:
        assert after[f'threatgate_balancer_instance_up{{instance="{node.key}"}}'] == 1
        assert 0 < after[f'threatgate_balancer_instance_check_seconds{{instance="{node.key}"}}'] < 10


class SilentInstance:
    """An instance that passes health checks (PING -> PONG) and never answers an event."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.received = 0
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                first = conn.recv(65536)
                if first.startswith(b"X-KF-ReplyBackPING"):
                    conn.sendall(b"PONG")
                    return
                self.received += first.count(b"\n")
                while data := conn.recv(65536):
                    self.received += data.count(b"\n")
            except OSError:
                return

    def close(self) -> None:
        self.server.close()
        for conn in self._conns:
            conn.close()


def test_events_an_instance_owed_are_counted_as_its_redispatches(deployment: Deployment, tmp_path: Path) -> None:
    """An instance that takes events and answers none: its events go to the other one once overdue, and
    the per-instance series say so (its dispatched all redispatched, none answered)."""
    node, silent = deployment.nodes[0], SilentInstance()
    path = balancer_config(
        tmp_path / "kl_balancer.conf",
        instances=[silent.port, node.event_port],
        extra="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
    )
    events = 100
    payload = REPLY_FLAGS + b"".join(b"%d url=%s\n" % (n, URL_HIT.encode()) for n in range(events))
    try:
        with running_balancer(path) as balancer:
            wait_for_log_count(balancer, r"instance 127\.0\.0\.1:\d+ is UP", 2, after=0)
            lines = stream(balancer.port, payload)
            assert lines.count("LookupFinished") == events
            samples = prometheus_samples(balancer.metrics_port)
    finally:
        silent.close()
    quiet, real = f'{{instance="127.0.0.1:{silent.port}"}}', f'{{instance="{node.key}"}}'
    assert samples["threatgate_balancer_instance_dispatched_total" + quiet] > 0
    assert (
        samples["threatgate_balancer_instance_redispatched_total" + quiet]
        == samples["threatgate_balancer_instance_dispatched_total" + quiet]
        == samples["threatgate_balancer_redispatched_total"]
    )
    assert samples["threatgate_balancer_instance_answered_total" + quiet] == 0
    assert samples["threatgate_balancer_instance_answered_total" + real] == events


def test_per_feed_series_follow_the_enabled_feeds(tmp_path: Path) -> None:
    """Records and last load time per enabled feed; a feed disabled at SIGHUP leaves no stale series."""
    node = start_node(tmp_path)
    try:
        ready(node)
        samples = node.samples()
        for feed in FEEDS:
            assert samples[f'threatgate_feed_records{{feed="{feed}"}}'] > 0, feed
            assert samples[f'threatgate_feed_last_load_timestamp_seconds{{feed="{feed}"}}'] > 1e9, feed
        assert samples['threatgate_feed_records{feed="malicious_urls.json"}'] == len(
            (EXAMPLES / "feeds" / "malicious_urls.json").read_text().strip().splitlines()[1:-1]
        )
        config = node.proc.config
        text = config.read_text()
        old = '<Feed filename="feeds/botnet_domains.json" enabled="true"'
        assert text.count(old) == 1
        config.write_text(text.replace(old, old.replace('"true"', '"false"')))
        node.proc.signal(signal.SIGHUP)
        node.proc.wait_for_log(r"configuration reloaded from ")
        wait_until(
            lambda: not any("botnet_domains.json" in k for k in node.samples()),
            "the disabled feed's series to go",
        )
        assert node.samples()['threatgate_feed_records{feed="malicious_urls.json"}'] > 0
    finally:
        node.proc.stop()


# -- item 4: log levels and hints ------------------------------------------------------------------------------


def test_balancer_client_connect_and_close_are_debug_lines(deployment: Deployment) -> None:
    """At the default level a client's connection leaves no line (docs/balancer.md: "dbg")."""
    mark = deployment.balancer.log_offset()
    assert (
        "category=Malicious_URL"
        in exchange(deployment.ports.matching, REPLY_FLAGS + b"1 url=" + URL_HIT.encode() + b"\n").decode()
    )
    wait_until(lambda: deployment.samples()["threatgate_balancer_clients"] == 0, "the client's close to be handled")
    log = deployment.balancer.log()[mark:]
    assert "connected" not in log and "disconnected" not in log, log


def test_every_metric_a_log_line_names_exists(deployment: Deployment) -> None:
    """Hints in log messages ("see threatgate_...", "counted in threatgate_...") name a metric as exposed."""
    exposed: set[str] = set()
    for port in (deployment.metrics_port, deployment.nodes[0].metrics_port):
        samples, declared, _ = scrape(port)
        exposed |= declared | {k.partition("{")[0] for k in samples}  # counters are declared as NAME_total
    hints: dict[str, str] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and " " in node.value:
                for name in re.findall(r"\b(threatgate_[a-z_]+)", node.value):
                    hints[name] = f"{path.relative_to(SRC)}: {node.value[:120]}"
    assert hints, "no hint found: the scan is broken"
    for doc in ("operations.md", "balancer.md", "api.md", "configuration.md"):
        text = (SRC.parents[1] / "docs" / doc).read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), 1):
            for name in re.findall(r"\b(threatgate_[a-z_]+[a-z])", line):
                hints.setdefault(name, f"docs/{doc}:{number}: {line[:120]}")
    # Cluster and worker families exist only on cluster members and nodes with <Workers> >= 2
    # (tests/integration/test_node_workers.py checks those).
    cluster_only = {n for n in hints if n.startswith(("threatgate_cluster_", "threatgate_worker"))}
    missing = {name: where for name, where in hints.items() if name not in exposed and name not in cluster_only}
    assert not missing, missing


# -- item 6: no Python internals, no software versions ---------------------------------------------------------


def test_a_node_whose_port_is_taken_says_so_in_words(tmp_path: Path) -> None:
    """asyncio's text is ``[Errno 98] error while attempting to bind on address ('127.0.0.1', P): ...``."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = int(taken.getsockname()[1])
        config = example_config(tmp_path, port=port)
        result = subprocess.run(
            [sys.executable, "-m", "threatgate", "node", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"threatgate: node failed: cannot listen on 127.0.0.1:{port}: Address already in use", last


def test_pins_renew_at_a_terminal_shows_both_fingerprints_and_asks(tmp_path: Path) -> None:
    """Without --expect, at a terminal: the pin file, the pinned and the presented fingerprints, a question;
    "n" keeps the pin (exit 1), "y" replaces it."""
    ca = trustme.CA()
    pinned, presented = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    presented.configure_cert(context)
    loop = LoopThread()
    server = loop.run(asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=context))

    async def close() -> None:
        server.close()
        await server.wait_closed()

    try:
        api_port = int(server.sockets[0].getsockname()[1])
        config = tmp_path / "kl_balancer.conf"
        gateway_config(config, instances=[(9, api_port)])
        key = "127.0.0.1:9"
        pin = tmp_path / "pins" / "127.0.0.1_9.pem"
        pin.parent.mkdir()
        pin.write_text(pinned.cert_chain_pems[0].bytes().decode())
        old, new = (
            fingerprint_sha256(pinned.cert_chain_pems[0].bytes()),
            fingerprint_sha256(presented.cert_chain_pems[0].bytes()),
        )

        def at_terminal(answer: bytes) -> subprocess.CompletedProcess[str]:
            master, slave = pty.openpty()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "threatgate", "balancer", "pins", "--config", str(config), "--renew", key],
                    stdin=slave,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                os.write(master, answer + b"\n")  # the terminal holds the line until the question reads it
                out, err = proc.communicate(timeout=60)
            finally:
                os.close(slave)
                os.close(master)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

        shown = [f"pin file:  {pin}", f"pinned:    {old}", f"presented: {new}"]
        question = f"Replace the pin of {key} with the presented certificate? [y/N]: "
        kept = at_terminal(b"n")
        assert kept.returncode == 1 and kept.stdout.splitlines() == [*shown, question], kept  # the answer: on the tty
        assert "pin not renewed" in kept.stderr and fingerprint_sha256(pin.read_bytes()) == old
        renewed = at_terminal(b"y")
        assert renewed.returncode == 0, renewed
        assert renewed.stdout.splitlines() == [*shown, question + f"renewed {pin}: {old} -> {new}"], renewed
        assert fingerprint_sha256(pin.read_bytes()) == new
    finally:
        loop.run(close())
        loop.close()


def test_no_answer_names_python_or_aiohttp(deployment: Deployment) -> None:
    node = deployment.nodes[0]
    answers = {
        "node API": node.api.request("GET", "/readyz").headers,
        "node API, unauthenticated": node.api.request("GET", "/api/1.1/suppliers").headers,
        "node API, malformed request": node.api.raw(b"GARBAGE\r\n\r\n").headers,
        "gateway, not allowed": deployment.gateway.request("DELETE", "/api/1.1/tags/x").headers,
        "gateway, malformed request": deployment.gateway.raw(b"GARBAGE\r\n\r\n").headers,
        "node metrics": scrape(node.metrics_port)[2],
        "balancer metrics": scrape(deployment.metrics_port)[2],
    }
    for what, headers in answers.items():
        assert headers.get("server") == "threatgate", (what, headers)
