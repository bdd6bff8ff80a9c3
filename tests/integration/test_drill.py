"""``threatgate drill`` against a real balancer and two real nodes (issue 16, "Failover drill").

The nodes load the example feeds, where ``url=http://fakess123.nu`` is a Malicious_URL hit and
``url=http://example.org/index.html`` is no hit: the canaries of ``<Drill>`` alternate both, so a lost
or repeated answer would show as the wrong detections.  Each test starts its own processes on port 0
and passes the ports they bound to the drill.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import (
    BIND_ANY,
    BalancerProcess,
    GatewayPorts,
    NodeProcess,
    example_config,
    gateway_config,
    keep_bound_ports,
    wait_for_log_count,
    wait_until,
)
from threatgate.node.auth import hash_password

USER, PASSWORD = "drill-user", "a drill test password"
CANARIES = (
    "<Drill>"
    '<Canary expect="Malicious_URL">url=http://fakess123.nu</Canary>'
    '<Canary expect="">url=http://example.org/index.html</Canary>'
    "</Drill>"
)
THREATGATE = Path(sys.executable).parent / "threatgate"
CONTROL = '''"""The test's stop/start commands for the node named by {instance}: stop kills it (SIGKILL);
start does nothing, or with a config in the state file starts it again and records its pid."""
import json, os, signal, subprocess, sys
action, key, path = sys.argv[1:4]
state = json.load(open(path))
node = state[key]
if action == "stop":
    os.kill(node["pid"], signal.SIGKILL)
elif node.get("config"):
    log = open(node["config"] + ".restart.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "threatgate", "node", "--config", node["config"]],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    node["pid"] = proc.pid
    json.dump(state, open(path, "w"))
'''


def control(tmp_path: Path, dep: Deployment, *, restart: bool) -> str:
    """The stop/start command line (ACTION for stop or start), and the state file it works on."""
    pids = tmp_path / "pids.json"
    pids.write_text(
        json.dumps({dep.key(n): {"pid": n.proc.pid, "config": str(n.config) if restart else ""} for n in dep.nodes})
    )
    script = tmp_path / "control.py"
    script.write_text(CONTROL)
    return f"{sys.executable} {script} ACTION {{instance}} {pids}"


@dataclass
class Deployment:
    config: Path
    ports: GatewayPorts
    nodes: list[NodeProcess]
    balancer: BalancerProcess

    def key(self, node: NodeProcess) -> str:
        return f"127.0.0.1:{node.port}"


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD)  # scrypt: once per module


@contextmanager
def deployment(tmp_path: Path, password_hash: str) -> Iterator[Deployment]:
    """Two nodes (a REST user each) and a balancer with the canaries, every instance UP."""
    procs: list[NodeProcess] = []
    balancer: BalancerProcess | None = None
    try:
        for i in range(2):
            directory = tmp_path / f"node{i}"
            directory.mkdir()
            config = example_config(directory, users=f'<User name="{USER}" password_hash="{password_hash}"/>')
            procs.append(NodeProcess(config))
        for proc in procs:
            proc.wait_ready()
            keep_bound_ports(proc)  # a node started again comes back on the same ports
        config = tmp_path / "kl_balancer.conf"
        gateway_config(config, instances=[(p.port, p.api_port) for p in procs], extra=CANARIES, ports=BIND_ANY)
        balancer = BalancerProcess(config)
        balancer.wait_ready()
        wait_for_log_count(balancer, r"instance 127\.0\.0\.1:\d+ is UP", 2, after=0)
        yield Deployment(config, GatewayPorts.bound_by(balancer), procs, balancer)
    finally:
        if balancer is not None:
            balancer.stop()
        for proc in procs:
            proc.stop()


def drill(dep: Deployment, *args: str, timeout: float = 50) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(THREATGATE),
            "drill",
            "--config",
            str(dep.config),
            "--matching-port",
            str(dep.ports.matching),
            "--api-port",
            str(dep.ports.api),
            "--user",
            USER,
            "--password-stdin",
            "--hold",
            "1",
            *args,
        ],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_drill_passes_with_admin_drain(tmp_path: Path, password_hash: str) -> None:
    """Each instance drained and enabled in turn: every canary answered once as expected, REST answers."""
    with deployment(tmp_path, password_hash) as dep:
        result = drill(dep, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert report["ok"] and report["problems"] == []
        rows = report["instances"]
        assert [r["instance"] for r in rows] == [dep.key(n) for n in dep.nodes]
        for row in rows:
            assert row["ok"] and row["problems"] == []
            assert row["rest_ok"] >= 1 and row["rest_failed"] == 0
            assert row["detect_seconds"] is not None and row["detect_seconds"] < 5
            assert row["events"] > 10
        assert set(states(dep).values()) == {"UP"}  # both brought back
        assert dep.balancer.proc.poll() is None


def test_a_node_that_never_comes_back_fails_the_drill(tmp_path: Path, password_hash: str) -> None:
    """The stop command kills the first node, the start command does not bring it back: that step fails,
    and the second is refused (it is the last UP instance); exit status 1 with a line saying so."""
    with deployment(tmp_path, password_hash) as dep:
        command = control(tmp_path, dep, restart=False)
        result = drill(
            dep,
            "--stop-command",
            command.replace("ACTION", "stop"),
            "--start-command",
            command.replace("ACTION", "start"),
            "--up-timeout",
            "3",
        )
        first, second = (dep.key(n) for n in dep.nodes)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"FAIL {first}: did not come back UP within 3 s (the balancer shows it DOWN" in result.stdout
        assert f"FAIL {second}: refusing to take out {second}: it is the last UP instance" in result.stdout
        assert dep.nodes[0].proc.wait(5) != 0 and dep.nodes[1].proc.poll() is None
        table = result.stdout.splitlines()
        assert table[0].split()[:4] == ["INSTANCE", "DETECT", "RESENT", "STALL"]
        assert table[1].startswith(first) and table[1].endswith("FAIL")
        # Every canary sent while the node was killed was still answered exactly once, as expected.
        assert not [line for line in table if "canary" in line or "event #" in line], result.stdout


def test_the_drill_passes_when_each_node_is_killed_and_started_again(tmp_path: Path, password_hash: str) -> None:
    """A real crash (SIGKILL) instead of a drain: the balancer sees it DOWN, re-sends what it held, and every
    canary is still answered exactly once; started again, each node is UP before the next is killed."""
    with deployment(tmp_path, password_hash) as dep:
        command = control(tmp_path, dep, restart=True)
        try:
            result = drill(
                dep,
                "--json",
                "--stop-command",
                command.replace("ACTION", "stop"),
                "--start-command",
                command.replace("ACTION", "start"),
            )
        finally:
            for node in json.loads((tmp_path / "pids.json").read_text()).values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node["pid"], signal.SIGTERM)
        assert result.returncode == 0, result.stdout + result.stderr
        rows = json.loads(result.stdout)["instances"]
        assert [r["ok"] for r in rows] == [True, True]
        assert all(r["detect_seconds"] is not None and r["rest_ok"] >= 1 for r in rows), rows


def test_ctrl_c_brings_the_instance_out_back(tmp_path: Path, password_hash: str) -> None:
    """SIGINT while the first instance is drained: it is enabled again before the drill exits (status 1)."""
    with deployment(tmp_path, password_hash) as dep:
        proc = subprocess.Popen(
            [
                str(THREATGATE),
                "drill",
                "--config",
                str(dep.config),
                "--matching-port",
                str(dep.ports.matching),
                "--no-rest",
                "--hold",
                "60",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stderr is not None
            first = dep.key(dep.nodes[0])
            assert proc.stderr.readline() == f"drill: {first}: taking it out\n"
            wait_until(lambda: states(dep)[first] == "MAINT", "the first instance drained")
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()  # reaps it and closes the pipes
        assert proc.returncode == 1 and "drill: interrupted" in err, err
        assert set(states(dep).values()) == {"UP"}


def states(dep: Deployment) -> dict[str, str]:
    """Each instance's state, as the admin socket lists it."""
    listed = subprocess.run(
        [str(THREATGATE), "balancer", "instance", "list", "--config", str(dep.config), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return {r["instance"]: r["state"] for r in json.loads(listed.stdout)["instances"]}
