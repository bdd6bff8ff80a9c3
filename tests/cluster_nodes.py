"""Real ``threatgate node`` processes in a Control/Secondary cluster, embedded or through etcd.

Used by tests/integration/test_cluster.py, test_cluster_etcd.py (the same nodes with an ``<Etcd .../>``
element in ``<Cluster>``) and test_balancer_cluster.py.  Every node lives in its own directory
(``tests.helpers.example_config``) with free event, API and cluster ports on 127.0.0.1 and a ``<Cluster>``
element with a short heartbeat.  The cluster is administered the way an operator does it:
``python -m threatgate cluster ... --config`` child processes.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tests.helpers import DEFAULT_TIMEOUT, HTTPSClient, NodeProcess, example_config, exchange, free_ports, wait_until

HEARTBEAT = 0.5
"""Seconds between heartbeats; with the default FallCount 3 a silent peer is unreachable after 1.5 s."""
CLI_TIMEOUT = 60.0
START_TIMEOUT = 30.0
SYNC_TIMEOUT = 20.0
CLUSTER_ID = "tgtest"
FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
FEED_URL = "http://fakess123.nu"  # examples/feeds/malicious_urls.json
CONTROL_ELECTED = rf"cluster {CLUSTER_ID}: node \S+ is control at epoch 1 on "
"""The log line of an embedded cluster's first Control (followed by its address)."""

_HANDED_OUT: set[int] = set()
"""Ports given to nodes of this test process: nodes bind late, so a port must not be handed out twice."""


class ClusterNode:
    """One node: its directory, ports, config, the running process (if any) and its CLI."""

    def __init__(
        self,
        root: Path,
        name: str,
        *,
        users: str = "",
        heartbeat: float = HEARTBEAT,
        cluster_extra: str = "",
        workers: int = 1,
    ) -> None:
        """``users``: ``<User .../>`` elements; ``cluster_extra``: more elements in ``<Cluster>`` (``<Etcd .../>``);
        ``workers``: ``<ScanSettings><Workers>`` (a local setting: it never travels with the cluster settings)."""
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port, self.api_port, self.cluster_port = free_ports(3, exclude=tuple(_HANDED_OUT))
        _HANDED_OUT.update((self.port, self.api_port, self.cluster_port))
        config = example_config(self.dir, port=self.port, api_port=self.api_port, users=users, workers=workers)
        text = config.read_text()
        cluster = (
            "  <Cluster>\n"
            f"    <ConnectionString>127.0.0.1:{self.cluster_port}</ConnectionString>\n"
            "    <StateDirectory>state/cluster</StateDirectory>\n"
            f"    <HeartbeatInterval>{heartbeat}</HeartbeatInterval>\n"
            + (f"    {cluster_extra}\n" if cluster_extra else "")
            + "  </Cluster>\n"
        )
        assert text.count("</Configuration>") == 1
        config.write_text(text.replace("</Configuration>", cluster + "</Configuration>"))
        self.config = config
        self.proc: NodeProcess | None = None
        self.starts = 0

    def __repr__(self) -> str:
        return f"ClusterNode({self.name} {self.address})"

    @property
    def address(self) -> str:
        """The cluster address other nodes reach this one on (what ``cluster status`` shows)."""
        return f"127.0.0.1:{self.cluster_port}"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state" / "cluster"

    @property
    def node_id(self) -> str:
        """This node's id: its cluster certificate's SHA-256 fingerprint (written by init or join)."""
        return str(json.loads((self.state_dir / "node.json").read_text())["node_id"])

    # -- the process ----------------------------------------------------------------------------------

    def start(self, wait: bool = True) -> NodeProcess:
        """Start ``threatgate node``; its log is ``node-<port>.log`` and holds this run only (a restart
        keeps the previous run's log beside it as ``node-<port>.<run>.log``)."""
        assert not self.running(), f"{self.name} is running"
        if self.proc is not None:
            self.proc.stop()  # closes the old log file
            self.proc.log_path.rename(self.proc.log_path.with_suffix(f".{self.starts}.log"))
        self.starts += 1
        self.proc = NodeProcess(self.config, self.port)
        if wait:
            self.wait_started()
        return self.proc

    def wait_started(self) -> None:
        self.process.wait_for_log(r"node listening for events", timeout=START_TIMEOUT, after=0)

    @property
    def process(self) -> NodeProcess:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc

    def running(self) -> bool:
        return self.proc is not None and self.proc.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye to the other nodes (in etcd mode no resignation: the lease has to expire)."""
        proc = self.process
        proc.signal(signal.SIGKILL)
        proc.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def log(self) -> str:
        return self.process.log()

    # -- the command line ------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """``python -m threatgate cluster ARGS --config <this node's config>``; never raises on exit codes."""
        return self.cli_popen(*args).communicate_result(timeout)

    def cli_popen(self, *args: str) -> CLIProcess:
        """The same command, started and not waited for (for concurrent commands)."""
        return CLIProcess([sys.executable, "-m", "threatgate", "cluster", *args, "--config", str(self.config)])

    def cli_ok(self, *args: str) -> str:
        """Run a cluster command that must succeed; its stdout."""
        result = self.cli(*args)
        assert result.returncode == 0, f"{self.name}: cluster {' '.join(args)} -> {result.returncode}\n{result.stderr}"
        return result.stdout

    def status(self) -> dict[str, Any]:
        """``cluster status --json``: ``{"self": {...}, "members": [...]}``."""
        return parse_status(self.cli("status", "--json"))

    def own_call(self, method: str, path: str) -> Any:
        """What the CLI does without starting a process: a call to our cluster port with our own certificate."""
        status, answer = cluster_call(self, method, path, cert=self.identity_files)
        assert status == 200, (self, method, path, status, answer)
        return answer

    def table(self) -> dict[str, Any]:
        """The node table ``cluster status --json`` prints, fetched in-process (cheap enough to poll)."""
        table = self.own_call("GET", "/cluster/v1/status")
        assert isinstance(table, dict)
        return table

    def history(self) -> list[tuple[int, int, str]]:
        """``cluster settings history``: (revision, epoch, sha256) of every kept revision, oldest first."""
        return parse_history(self.cli("settings", "history"))

    @property
    def identity_files(self) -> tuple[Path, Path]:
        """This node's cluster certificate and key (what it presents to other members)."""
        return self.state_dir / "cluster.pem", self.state_dir / "cluster.key"

    def api(self) -> HTTPSClient:
        """HTTPS to this node's REST API, verifying its self-signed certificate."""
        return HTTPSClient(self.api_port, self.dir / "certs" / "node.pem")

    def readyz(self) -> dict[str, Any]:
        """``GET /readyz``: role, epoch, applied revision and digest, emergency (cheap enough to poll fast)."""
        reply = self.api().request("GET", "/readyz", timeout=5)
        body = reply.json()
        assert isinstance(body, dict)
        return body

    def applied(self) -> tuple[int | None, str | None]:
        """(revision, sha256) this node applies, from ``/readyz``."""
        ready = self.readyz()
        return ready["revision"], ready["sha256"]

    # -- events ----------------------------------------------------------------------------------------

    def detections(self, event: str = f"url={FEED_URL}", *, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """The detection lines (request id stripped) of one event sent to the event port."""
        lines = exchange(self.port, FLAGS + f"7 {event}\n".encode(), timeout).decode().splitlines()
        assert lines and lines[-1] == "7 LookupFinished", lines
        assert all(line.startswith("7 ") for line in lines), lines
        return [line[2:] for line in lines[:-1]]

    def assert_matches(self, marker: str, event: str = f"url={FEED_URL}") -> None:
        """``event`` (one that names ``FEED_URL``) is detected with the ``event_format(marker)`` line."""
        found = self.detections(event)
        assert feed_detection(marker) in found, (self, found)


class CLIProcess:
    """A ``threatgate cluster`` child process with captured text output."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def communicate_result(self, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError(f"{' '.join(self.argv[3:])} did not finish within {timeout} s") from None
        return subprocess.CompletedProcess(self.argv, self.proc.returncode, out, err)


def event_format(marker: str) -> str:
    """An EventFormat whose detections carry ``marker`` (and keep the request id first)."""
    return f"%REQ% {marker} category=%Category% matchedIndicator=%MatchedIndicator%"


def feed_detection(marker: str) -> str:
    """The detection line (request id stripped) of an event naming ``FEED_URL`` under ``event_format(marker)``."""
    return f"{marker} category=Malicious_URL matchedIndicator={FEED_URL}"


def committed(output: str) -> tuple[int, int, str]:
    """(revision, epoch, sha256) from what ``cluster settings set`` prints (that line and nothing else)."""
    m = re.fullmatch(r"settings revision (\d+) \(epoch (\d+), sha256 ([0-9a-f]{64})\)\n", output)
    assert m, f"unexpected settings set output: {output!r}"
    return int(m[1]), int(m[2]), m[3]


def cluster_call(
    node: ClusterNode, method: str, path: str, body: bytes | None = None, *, cert: tuple[Path, Path] | None
) -> tuple[int, Any]:
    """One request to ``node``'s cluster port presenting ``cert`` (None: no client certificate).

    The server is verified against its own pinned cluster certificate, as members do.  Returns the status
    and the decoded JSON body; raises OSError (ssl.SSLError, a reset) when the TLS layer refuses us.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # pinned: the only trusted certificate is the node's own
    ctx.load_verify_locations(cadata=(node.state_dir / "cluster.pem").read_text())
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    conn = http.client.HTTPSConnection("127.0.0.1", node.cluster_port, context=ctx, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        conn.close()


def parse_status(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result
    table = json.loads(result.stdout)
    assert isinstance(table, dict) and set(table) == {"self", "members"}, table
    return table


def parse_history(result: subprocess.CompletedProcess[str]) -> list[tuple[int, int, str]]:
    assert result.returncode == 0, result
    out = []
    for line in result.stdout.splitlines():
        m = re.fullmatch(r"r(\d+)  epoch (\d+)  .*  ([0-9a-f]{64})", line)
        assert m, f"unexpected history line {line!r}"
        out.append((int(m[1]), int(m[2]), m[3]))
    return out


def cli_all(nodes: list[ClusterNode], *args: str) -> list[subprocess.CompletedProcess[str]]:
    """The same ``cluster ARGS`` on every node, run concurrently; the results in ``nodes`` order."""
    procs = [node.cli_popen(*args) for node in nodes]
    return [proc.communicate_result() for proc in procs]


def statuses(nodes: list[ClusterNode]) -> list[dict[str, Any]]:
    """``cluster status --json`` of every node (concurrent CLI processes)."""
    return [parse_status(r) for r in cli_all(nodes, "status", "--json")]


def histories(nodes: list[ClusterNode]) -> list[list[tuple[int, int, str]]]:
    """``cluster settings history`` of every node (concurrent CLI processes)."""
    return [parse_history(r) for r in cli_all(nodes, "settings", "history")]


# -- a cluster ------------------------------------------------------------------------------------------


def parse_token(output: str) -> tuple[str, str, str]:
    """(token, control address, fingerprint) from ``cluster token`` output."""
    found = dict(re.findall(r"^(token|control|fingerprint):\s+(\S+)$", output, re.M))
    assert set(found) == {"token", "control", "fingerprint"}, output
    return found["token"], found["control"], found["fingerprint"]


def join(control: ClusterNode, joiners: list[ClusterNode]) -> None:
    """Issue a token per joiner on ``control`` and join each with its own (offline: joiners are not running).

    The commands run concurrently: tokens first, then the joins.  Each token names ``control``'s address
    and its node id as the fingerprint to pin.
    """
    issued = [parse_token(r.stdout) for r in cli_all([control] * len(joiners), "token")]
    procs = []
    for joiner, (token, address, fingerprint) in zip(joiners, issued, strict=True):
        assert (address, fingerprint) == (control.address, control.node_id)
        procs.append(joiner.cli_popen("join", "--control", address, "--token", token, "--fingerprint", fingerprint))
    for joiner, proc in zip(joiners, procs, strict=True):
        result = proc.communicate_result()
        assert result.returncode == 0, f"{joiner.name}: join -> {result.returncode}\n{result.stderr}"


def same_applied_revision(nodes: list[ClusterNode], revision: int | None = None, sha256: str | None = None) -> bool:
    """Whether every node's readiness shows one applied revision and digest (``revision``, ``sha256`` if given)."""
    seen = {n.applied() for n in nodes}
    if len(seen) != 1:
        return False
    (rev, digest), *_ = seen
    return (
        rev is not None
        and digest is not None
        and (revision is None or rev == revision)
        and (sha256 is None or digest == sha256)
    )


def wait_applied(
    nodes: list[ClusterNode], revision: int, sha256: str | None = None, timeout: float = SYNC_TIMEOUT
) -> None:
    """Wait until every node applies ``revision`` (with digest ``sha256`` if given)."""
    what = f"{nodes} applying r{revision}" + (f" {sha256[:12]}" if sha256 else "")
    wait_until(lambda: same_applied_revision(nodes, revision, sha256), what, timeout)


def all_reachable(node: ClusterNode, count: int) -> bool:
    """Whether ``node``'s table shows ``count - 1`` reachable members and no emergency."""
    table = node.table()
    return (
        table["self"]["emergency"] is None
        and len(table["members"]) == count - 1
        and all(m["reachable"] for m in table["members"])
    )


def settled(nodes: list[ClusterNode]) -> tuple[int, str]:
    """Wait until every node applies one revision and sees the others; that (revision, sha256)."""
    wait_until(lambda: same_applied_revision(nodes), "every node applying one revision", SYNC_TIMEOUT)
    wait_until(lambda: all(all_reachable(n, len(nodes)) for n in nodes), "every node seeing the others", SYNC_TIMEOUT)
    ready = nodes[0].readyz()
    return int(ready["revision"]), str(ready["sha256"])


def stop_all(nodes: list[ClusterNode]) -> None:
    """SIGTERM every running node at once, then reap each (SIGKILL after 10 s) and close its log."""
    for node in nodes:
        if node.running():
            node.process.signal(signal.SIGTERM)
    for node in nodes:
        if node.proc is None:
            continue
        try:
            node.proc.proc.wait(10)  # one SIGTERM only: a second one during shutdown kills the node outright
        except subprocess.TimeoutExpired:
            node.proc.proc.kill()
            node.proc.proc.wait()
        node.proc.stop()  # closes its log
    alive = [n.name for n in nodes if n.running()]
    assert not alive, f"nodes still running: {alive}"


@contextmanager
def three_node_cluster(
    root: Path,
    *,
    users: str = "",
    cluster_extra: str = "",
    elected: str | None = None,
    workers: tuple[int, ...] = (1, 1, 1),
) -> Iterator[list[ClusterNode]]:
    """n1 (Control, ``cluster init`` before its first start), n2 and n3 joined with tokens, all in sync.

    ``users`` (``<User .../>`` elements) go into n1's config only: API users are shared settings, so they
    are part of revision 1 and the others receive them when they join.  ``cluster_extra`` goes into every
    node's ``<Cluster>``; ``elected`` is the log line of n1 taking the Control role (default: the embedded
    cluster's); ``workers``: each node's worker processes.  Every process is stopped on exit, also when setting
    up fails.
    """
    nodes = [
        ClusterNode(root, f"n{i}", users=users if i == 1 else "", cluster_extra=cluster_extra, workers=w)
        for i, w in zip((1, 2, 3), workers, strict=True)
    ]
    n1, n2, n3 = nodes
    with ExitStack() as stack:
        stack.callback(stop_all, nodes)
        n1.cli_ok("init", "--cluster-id", CLUSTER_ID)
        n1.start()
        n1.process.wait_for_log(elected or CONTROL_ELECTED + re.escape(n1.address), timeout=START_TIMEOUT, after=0)
        join(n1, [n2, n3])
        n2.start(wait=False)
        n3.start(wait=False)
        n2.wait_started()
        n3.wait_started()
        settled(nodes)
        yield nodes
