"""The balancer's view of its nodes' ``/readyz``: real nodes (standalone, then a Control/Secondary cluster
built with the CLI), a real ``threatgate balancer`` and ``threatgate balancer status``.

What an operator of the balancer must get (docs/balancer.md, "Nodes in a cluster"):
- ``balancer status`` naming each node's state, role, epoch, revision and digest, ``!`` on a node whose
  settings differ from the majority, exit 0 only when every node answered and the digests agree;
- the same on the balancer's metrics (role and revision per instance, a digest-mismatch gauge) and one
  WARNING when digests start to differ, one INFO when they agree again;
- gateway writes: to every standalone node; in a cluster to the Control alone (a Secondary would refuse
  them), and 503 "no Control node" when none is reachable.

Every wait is on a metric, a log line or an answer, with a deadline; every process is stopped at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster_nodes import ClusterNode, join, stop_all
from tests.helpers import (
    BIND_ANY,
    BalancerProcess,
    HTTPReply,
    HTTPSClient,
    NodeProcess,
    basic_auth,
    example_config,
    gateway_config,
    prometheus_samples,
    wait_for_log_count,
    wait_until,
)
from threatgate.node.auth import hash_password

USER, PASSWORD = "cluster-view-user", "a cluster view test password"
AUTH = {"Authorization": basic_auth(USER, PASSWORD)}
ALLOWED = (
    ("POST", "/api/{version}/lookup"),
    ("GET", "/api/{version}/suppliers"),
    ("PUT", "/api/{version}/suppliers/{name}/indicators"),
)
DIGEST = re.compile(r"[0-9a-f]{12}")
SYNC_TIMEOUT = 30.0
"""Bound on every wait for something that crosses processes (a poll every second, heartbeats every 0.5 s)."""


def threatgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "threatgate", *args], capture_output=True, text=True, timeout=60, check=False
    )


class Instance:
    """What these tests ask of a node behind the balancer, standalone (``Node``) or clustered (``Member``)."""

    dir: Path
    port: int
    api_port: int

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"

    def categories(self, url: str) -> list[str]:
        api = HTTPSClient(self.api_port, self.dir / "certs" / "node.pem")
        reply = api.request("POST", "/api/1.1/lookup", [{"object": url}], headers=AUTH)
        assert reply.status == 200, reply
        return [c["category"] for c in reply.json()[0].get("categories", [])]


@dataclass
class Node(Instance):
    """A standalone node in its own directory: example config and feeds, one API user."""

    dir: Path
    config: Path
    port: int
    api_port: int
    proc: NodeProcess | None = None

    def start(self, stack: ExitStack) -> None:
        """Start it and wait for its READY: its ports (0 in its config) are the ones it reported."""
        self.proc = NodeProcess(self.config, self.port)
        stack.callback(self.proc.stop)
        self.proc.wait_ready(timeout=SYNC_TIMEOUT)
        self.port, self.api_port = self.proc.port, self.proc.api_port


class Member(Instance, ClusterNode):
    """A cluster node (tests.cluster_nodes: its config, process and ``threatgate cluster`` commands)."""


def user(password_hash: str) -> str:
    return f'<User name="{USER}" password_hash="{password_hash}"/>'


def make_node(root: Path, name: str, password_hash: str) -> Node:
    directory = root / name
    directory.mkdir()
    config = example_config(directory, users=user(password_hash))
    return Node(directory, config, 0, 0)


@dataclass
class Balancer:
    proc: BalancerProcess
    config: Path
    api_port: int
    metrics_port: int

    @property
    def api(self) -> HTTPSClient:
        return HTTPSClient(self.api_port, self.config.parent / "certs" / "balancer.pem")

    def metric(self, sample: str) -> float | None:
        return prometheus_samples(self.metrics_port).get(sample)

    def roles(self) -> dict[str, str]:
        """Each instance's role on the balancer's metrics (the ``role`` label whose value is 1)."""
        rx = re.compile(r'threatgate_balancer_instance_role\{instance="([^"]+)",role="([^"]+)"\}')
        found = [rx.fullmatch(k) for k, v in prometheus_samples(self.metrics_port).items() if v == 1]
        return {m[1]: m[2] for m in found if m is not None}

    def wait_roles(self, want: dict[str, str]) -> None:
        wait_until(lambda: self.roles() == want, f"balancer roles {want}", timeout=SYNC_TIMEOUT)

    def revisions(self, nodes: Sequence[Instance]) -> list[float | None]:
        return [self.metric(f'threatgate_balancer_instance_settings_revision{{instance="{n.key}"}}') for n in nodes]

    def status(self, *options: str) -> subprocess.CompletedProcess[str]:
        return threatgate("balancer", "status", "--config", str(self.config), *options)


def start_balancer(directory: Path, nodes: Sequence[Instance], stack: ExitStack) -> Balancer:
    directory.mkdir()
    config = directory / "kl_balancer.conf"
    gateway_config(
        config,
        instances=[(n.port, n.api_port) for n in nodes],
        allowed=ALLOWED,
        extra="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
        ports=BIND_ANY,
    )
    proc = BalancerProcess(config)
    stack.callback(proc.stop)
    proc.wait_ready(timeout=SYNC_TIMEOUT)
    wait_for_log_count(proc, r"instance 127\.0\.0\.1:\d+ is UP", len(nodes), timeout=SYNC_TIMEOUT)
    return Balancer(proc, config, proc.api_port, proc.metrics_port)


COLUMNS = ("INSTANCE", "API", "STATE", "BALANCER", "ROLE", "EPOCH", "REVISION", "DIGEST")
"""``balancer status`` with the balancer running: its own state of each instance (BALANCER) beside the nodes'."""


def table(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    """``balancer status`` rows by instance, cut at the header's column positions (``!``: the flag)."""
    header, *lines, _footer = result.stdout.splitlines()
    assert header.split() == list(COLUMNS), result.stdout
    starts = [header.index(name) for name in COLUMNS]
    rows: dict[str, dict[str, str]] = {}
    for line in lines:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows[cells[0]] = {"!": line[: starts[0]].strip(), **dict(zip(COLUMNS[1:], cells[1:], strict=True))}
    return rows


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD)  # scrypt: once per module


def put_indicator(balancer: Balancer, url: str) -> HTTPReply:
    return balancer.api.request("PUT", "/api/1.1/suppliers/InternalTI/indicators", [{"indicator": url}], headers=AUTH)


def test_standalone_nodes_are_shown_standalone_and_writes_reach_both(tmp_path: Path, password_hash: str) -> None:
    """Two standalone nodes: role standalone on the metrics and in ``status`` (exit 0, no digest, no flag),
    no mismatch; a gateway write still goes to both nodes."""
    with ExitStack() as stack:
        nodes = [make_node(tmp_path, f"n{i}", password_hash) for i in (1, 2)]
        for node in nodes:
            node.start(stack)
        balancer = start_balancer(tmp_path / "balancer", nodes, stack)
        balancer.wait_roles({n.key: "standalone" for n in nodes})
        assert balancer.metric("threatgate_balancer_settings_digest_mismatch") == 0
        assert balancer.revisions(nodes) == [None, None]  # no settings revision outside a cluster

        result = balancer.status()
        assert result.returncode == 0, result
        want = {
            "!": "",
            "STATE": "ready",
            "BALANCER": "UP",
            "ROLE": "standalone",
            "EPOCH": "-",
            "REVISION": "-",
            "DIGEST": "-",
        }
        assert table(result) == {n.key: {**want, "API": str(n.api_port)} for n in nodes}
        assert result.stdout.splitlines()[-1].startswith("no cluster member reachable: standalone nodes"), result
        summary = json.loads(balancer.status("--json").stdout)
        assert (summary["ok"], summary["controls"], summary["majority_sha256"]) == (True, [], None)
        assert [i["role"] for i in summary["instances"]] == ["standalone", "standalone"]

        url = "http://standalone-write.example/"
        reply = put_indicator(balancer, url)
        assert reply.status == 200, reply
        for node in nodes:
            assert "InternalTI" in node.categories(url)
        assert "Traceback" not in balancer.proc.log()


def build_cluster(tmp_path: Path, password_hash: str, stack: ExitStack) -> tuple[Member, Member]:
    """A Control and a Secondary, made as an operator makes them (init, start, token, join, start)."""
    control, secondary = (Member(tmp_path, name, users=user(password_hash)) for name in ("control", "second"))
    stack.callback(stop_all, [control, secondary])
    control.cli_ok("init")
    control.start()
    join(control, [secondary])
    secondary.start()
    return control, secondary


def test_cluster_roles_write_routing_and_digest_mismatch(tmp_path: Path, password_hash: str) -> None:
    """A Control and a Secondary built with ``threatgate cluster``: roles and one digest in ``status`` and the
    metrics; a gateway write goes to the Control and reaches the Secondary through it; settings the Secondary
    cannot apply make the digests differ (``!``, exit 1, gauge 1, one WARNING) until they are undone (INFO);
    with the Control killed a gateway write is 503 and ``status`` exits 1."""
    with ExitStack() as stack:
        control, secondary = build_cluster(tmp_path, password_hash, stack)
        both = [control, secondary]
        balancer = start_balancer(tmp_path / "balancer", both, stack)
        balancer.wait_roles({control.key: "control", secondary.key: "secondary"})
        pins = sorted(p.name for p in (tmp_path / "balancer" / "pins").iterdir())
        assert pins == sorted(f"127.0.0.1_{n.port}.pem" for n in both)  # saved on first use, as the gateway does

        # Revision 1 on both: status agrees with the metrics.
        result = balancer.status()
        assert result.returncode == 0, result
        rows = table(result)
        for node, role in ((control, "control"), (secondary, "secondary")):
            row = rows[node.key]
            assert (row["!"], row["STATE"], row["ROLE"], row["EPOCH"], row["REVISION"]) == ("", "ready", role, "1", "1")
        digest = rows[control.key]["DIGEST"]
        assert DIGEST.fullmatch(digest) and rows[secondary.key]["DIGEST"] == digest, result.stdout
        footer = f"all 2 cluster instance(s) hold settings {digest}; Control: {control.key}"
        assert result.stdout.splitlines()[-1] == footer

        # A gateway write goes to the Control alone (a Secondary answers 409: a fan-out would report drift, 502)
        # and reaches the Secondary through the Control.
        url = "http://cluster-write.example/"
        reply = put_indicator(balancer, url)
        assert reply.status == 200, reply
        assert reply.headers.get("etag") == '"2"', reply.headers  # the Control's new settings revision
        assert "InternalTI" in control.categories(url)
        wait_until(lambda: "InternalTI" in secondary.categories(url), "the Secondary detecting the write")
        wait_until(lambda: balancer.revisions(both) == [2, 2], "revision 2 on both", timeout=SYNC_TIMEOUT)
        result = balancer.status()
        assert result.returncode == 0, result
        rows = table(result)
        first, digest = digest, rows[control.key]["DIGEST"]  # the settings with the new indicator
        assert rows[secondary.key]["DIGEST"] == digest != first, result.stdout

        # Settings the Secondary cannot apply (a feed file only the Control has): it stays at revision 2.
        shutil.copy(control.dir / "feeds" / "stix_bundle.json", control.dir / "feeds" / "stix_control_only.json")
        mark = balancer.proc.log_offset()
        feed = "Feeds/Feed[@filename=feeds/{}.json]/@filename"
        changed = control.cli("settings", "set", feed.format("stix_bundle"), "feeds/stix_control_only.json")
        assert changed.returncode == 0, changed
        wait_until(
            lambda: balancer.metric("threatgate_balancer_settings_digest_mismatch") == 1,
            "the digest mismatch gauge",
            timeout=SYNC_TIMEOUT,
        )
        warned = balancer.proc.wait_for_log(
            r"WAR threatgate\.balancer: settings digests differ between cluster instances: (.*) "
            r"\(differing from the majority: (.*)\)",
            after=mark,
        )
        assert warned[2] == secondary.key and f"{secondary.key} {digest}" in warned[1], warned[0]
        result = balancer.status()
        assert result.returncode == 1, result
        rows = table(result)
        assert [rows[n.key]["!"] for n in both] == ["", "!"], result.stdout
        assert [rows[n.key]["REVISION"] for n in both] == ["3", "2"], result.stdout
        new = rows[control.key]["DIGEST"]
        assert new != digest and rows[secondary.key]["DIGEST"] == digest
        assert result.stdout.splitlines()[-1] == (
            f"! = settings digest differs from the majority ({new}); Control: {control.key}"
        )
        summary = json.loads(balancer.status("--json").stdout)
        assert [i["differs"] for i in summary["instances"]] == [False, True] and summary["ok"] is False

        # Undone on the Control: the Secondary applies the next revision and the digests agree again.
        undone = control.cli("settings", "set", feed.format("stix_control_only"), "feeds/stix_bundle.json")
        assert undone.returncode == 0, undone
        balancer.proc.wait_for_log(
            rf"INF threatgate\.balancer: settings digests agree again: {digest} on 2 instance",
            after=mark,
            timeout=SYNC_TIMEOUT,
        )
        assert balancer.metric("threatgate_balancer_settings_digest_mismatch") == 0
        assert len(re.findall("settings digests differ", balancer.proc.log()[mark:])) == 1  # never a line per poll
        assert balancer.status().returncode == 0

        # The Control killed: no Control to write to, so the write is refused and no node is touched.
        control.kill()
        balancer.wait_roles({control.key: "unknown", secondary.key: "secondary"})
        reply = put_indicator(balancer, "http://while-frozen.example/")
        assert reply.status == 503, reply
        [error] = reply.json()
        assert error["status"].startswith(
            "write refused, no instance was changed: no Control node: settings are frozen (emergency mode)"
        ), error
        assert "InternalTI" not in secondary.categories("http://while-frozen.example/")
        result = balancer.status()
        assert result.returncode == 1, result
        row = table(result)[control.key]
        assert row["STATE"].startswith("unreachable: ") and (row["ROLE"], row["DIGEST"]) == ("unknown", "-"), row
        assert result.stdout.splitlines()[-1].endswith("Control: none reachable (settings are frozen)"), result.stdout
        assert "Traceback" not in balancer.proc.log()
