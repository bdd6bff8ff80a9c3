"""``threatgate demo``: a two-node cluster behind a balancer, a settings change, the Control killed.

Everything runs as real processes on free loopback ports: two ``threatgate node`` processes on
the example config and feeds, and a ``threatgate balancer`` in front of them.  The nodes form a
cluster with the ``threatgate cluster`` commands (``init`` on node1, the Control; ``token`` there and
``join`` on node2, a Secondary).  The demo changes the detection format on the Control
(``cluster settings set``) and waits until node2 applied the same revision with the same digest.
It streams the example events (repeated, paced) through the balancer with the CyberTrace session
flags, kills node1 (the Control) with SIGKILL halfway, and checks that every event still got its
complete answer exactly once, in the new format.  node2 then enters emergency mode (no Control),
and is promoted to Control (``cluster promote``, epoch 2).  Last it uses node2's REST API over
HTTPS (its self-signed certificate, verified): a lookup, and a pushed indicator that becomes a new
settings revision and detects in event matching straight away.

Exit code 0 only if every check passed.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from threatgate.errors import ThreatgateError

EXAMPLES = Path(__file__).resolve().parent / "examples"
"""The example configs, feeds and events: package data (in a checkout, a link to the top-level examples/)."""
MARKER = ".threatgate-demo"
"""Written into the demo's working directory: only such a directory is emptied by the next run."""
FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
ROUNDS = 400
"""How many times the example events are sent (paced, so the node can be killed mid-stream)."""
CLI_TIMEOUT = 30.0
"""Seconds one ``threatgate cluster ...`` command may take."""
SYNC_TIMEOUT = 15.0
"""Seconds node2 may take to apply a settings revision, or to notice that the Control is gone."""

T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Proc:
    """A child ``threatgate`` process with its log in a file we can wait on."""

    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "threatgate", *args], stdout=self._log, stderr=self._log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(re.findall(pattern, self.log())) >= count:
                return
            if self.proc.poll() is not None:
                raise ThreatgateError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise ThreatgateError(f"{self.name}: {pattern!r} not seen within {timeout:.0f} s:\n{self.log()}")

    def hang_then_die(self) -> None:
        """Freeze the process (its events stay unanswered at the balancer), then kill it."""
        self.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _cli(*args: str) -> str:
    """Run one ``threatgate`` command (a child process, like the nodes) to its end; its output."""
    what = "threatgate " + " ".join(a for a in args[:3] if not a.startswith("--"))  # no token in messages
    try:
        done = subprocess.run(
            [sys.executable, "-m", "threatgate", *args], capture_output=True, text=True, timeout=CLI_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise ThreatgateError(f"{what}: no answer within {CLI_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        raise ThreatgateError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done.stdout


def _field(text: str, name: str) -> str:
    """The value of a ``name: value`` line of a command's output."""
    match = re.search(rf"^{name}:\s*(\S+)", text, re.M)
    if match is None:
        raise ThreatgateError(f"no {name!r} line in:\n{text}")
    return match[1]


def _indent(text: str) -> str:
    return "\n".join(f"  {line}".rstrip() for line in text.rstrip().splitlines())


def _readyz(api_port: int, cafile: Path) -> dict[str, Any]:
    """A node's unauthenticated ``GET /readyz`` (role, epoch, revision, digest, emergency); {} if none."""
    try:
        context = ssl.create_default_context(cafile=str(cafile))  # the node's own certificate, verified
        conn = http.client.HTTPSConnection("127.0.0.1", api_port, context=context, timeout=5)
        try:
            conn.request("GET", "/readyz")
            answer = json.loads(conn.getresponse().read())
        finally:
            conn.close()
    except (OSError, ValueError, http.client.HTTPException):
        return {}
    return answer if isinstance(answer, dict) else {}


def _poll(what: str, probe: Callable[[], T], done: Callable[[T], bool], timeout: float = SYNC_TIMEOUT) -> T:
    """Call ``probe`` until ``done`` accepts its answer; ThreatgateError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise ThreatgateError(f"{what} not seen within {timeout:.0f} s (last: {value})")
        time.sleep(0.01)


def _node_config(work: Path, name: str, ports: tuple[int, int, int], password_hash: str) -> Path:
    port, api_port, cluster_port = ports
    text = (work / "node.conf").read_text()
    text = text.replace("127.0.0.1:9999", f"127.0.0.1:{port}").replace("127.0.0.1:8443", f"127.0.0.1:{api_port}")
    text = text.replace("<Users>", f'<Users><User name="demo" password_hash="{password_hash}"/>')
    text = text.replace("certs/node.", f"certs/{name}.").replace("state/node.", f"state/{name}.")
    cluster = (
        f"  <Cluster><ConnectionString>127.0.0.1:{cluster_port}</ConnectionString>"
        f"<StateDirectory>state/{name}-cluster</StateDirectory><HeartbeatInterval>0.5</HeartbeatInterval></Cluster>\n"
    )
    text = text.replace("</Configuration>", cluster + "</Configuration>")
    path = work / f"{name}.conf"
    path.write_text(text)
    return path


def _balancer_config(work: Path, port: int, nodes: list[tuple[int, int]]) -> Path:
    text = (work / "balancer.conf").read_text()
    others = iter((_free_port(), _free_port()))
    text = re.sub(
        r'matching_port="9999" api_port="8443" cybertrace_port="9997"',
        lambda _: f'matching_port="{port}" api_port="{next(others)}" cybertrace_port="{next(others)}"',
        text,
    )
    instances = "".join(
        f'\n    <Instance matching_port="{p}" api_port="{a}" enabled="true">127.0.0.1</Instance>' for p, a in nodes
    )
    text = re.sub(r"<Instances>.*?</Instances>", f"<Instances>{instances}\n  </Instances>", text, flags=re.S)
    text = text.replace(
        '<HealthCheck interval="2" timeout="2" rise="2" fall="3"/>',
        '<HealthCheck interval="1" timeout="1" rise="1" fall="1"/>',
    )
    path = work / "balancer.conf"
    path.write_text(text)
    return path


def run_demo(workdir: str) -> int:
    """Run the demo; returns the exit code (0 when every check passed)."""
    if not (EXAMPLES / "node.conf").is_file():
        raise ThreatgateError(f"examples not found at {EXAMPLES}: the installation is incomplete (reinstall it)")
    from threatgate.node.auth import hash_password

    work = Path(workdir).resolve()
    if work.exists():
        if not work.is_dir() or (any(work.iterdir()) and not (work / MARKER).is_file()):
            raise ThreatgateError(
                f"{work} exists and is not a previous demo directory (no {MARKER}); "
                "choose another --workdir or remove it yourself"
            )
        shutil.rmtree(work)
    shutil.copytree(EXAMPLES, work)
    (work / MARKER).write_text("made by threatgate demo; the next demo run empties this directory\n")
    password = secrets.token_urlsafe(12)
    password_hash = hash_password(password)
    ports = [(_free_port(), _free_port(), _free_port()) for _ in range(2)]
    conf1, conf2 = (str(_node_config(work, f"node{i + 1}", p, password_hash)) for i, p in enumerate(ports))
    api1, api2 = ports[0][1], ports[1][1]
    ca1, ca2 = work / "certs" / "node1.pem", work / "certs" / "node2.pem"
    port = _free_port()
    bal_conf = _balancer_config(work, port, [(p, a) for p, a, _ in ports])
    events = (work / "events.txt").read_bytes()
    per_round = events.count(b"\n")
    event_format = re.search(r"<EventFormat>(.*?)</EventFormat>", (work / "node.conf").read_text())
    if event_format is None or not event_format[1].startswith("%REQ% "):
        raise ThreatgateError("examples/node.conf: the demo needs an <EventFormat> that starts with '%REQ% '")
    procs: list[_Proc] = []
    try:
        print(f"threatgate demo: 2 nodes on 127.0.0.1:{ports[0][0]} and :{ports[1][0]}, a balancer on 127.0.0.1:{port}")
        print(f"threatgate demo: logs in {work}")
        _cli("cluster", "init", "--config", conf1, "--cluster-id", "demo")
        node1 = _Proc("node1", ["node", "--config", conf1], work / "node1.log")
        procs.append(node1)
        node1.wait_for(r"node listening for events")
        token = _cli("cluster", "token", "--config", conf1)
        control = f"127.0.0.1:{ports[0][2]}"
        fingerprint = _field(token, "fingerprint")
        _cli("cluster", "join", "--config", conf2, "--control", control, "--token", _field(token, "token"),
             "--fingerprint", fingerprint)  # fmt: skip
        procs.append(_Proc("node2", ["node", "--config", conf2], work / "node2.log"))
        balancer = _Proc("balancer", ["balancer", "--config", str(bal_conf)], work / "balancer.log")
        procs.append(balancer)
        print(
            f"threatgate demo: cluster 'demo': node1 is the Control at {control} (cluster init), "
            f"node2 joined as a Secondary (cluster token, cluster join)"
        )
        procs[1].wait_for(r"node listening for events")
        marker, synced = _change_settings(conf1, conf2, (api1, ca1), (api2, ca2), event_format[1])
        balancer.wait_for(r"instance \S+ is UP", count=2)
        total = per_round * ROUNDS
        print(f"\nthreatgate demo: streaming {total} events ({ROUNDS} x examples/events.txt) through the balancer;")
        print(
            "threatgate demo: halfway, node1 (the Control) hangs (SIGSTOP) with events in flight, then dies (SIGKILL)\n"
        )
        killed_at: list[float] = []

        def kill() -> None:
            node1.hang_then_die()
            killed_at.append(time.monotonic())

        lines = _stream(port, events, ROUNDS, kill=kill)
        ok = _report(lines, per_round, ROUNDS, balancer.log(), marker)
        promoted = _failover(conf2, api2, ca2, killed_at[0] if killed_at else time.monotonic())
        api_ok = _rest_demo(ports[1][0], api2, ca2, password)
    finally:
        for proc in reversed(procs):
            proc.stop()
    return 0 if ok and synced and promoted and api_ok else 1


def _change_settings(
    conf1: str, conf2: str, node1: tuple[int, Path], node2: tuple[int, Path], event_format: str
) -> tuple[str, bool]:
    """Change the detection format on the Control; wait until node2 applied the same revision.

    Returns the marker the new format puts in every detection, and whether both nodes agree.
    """
    base = _poll("node1's settings revision", lambda: _readyz(*node1), lambda r: r.get("revision") is not None)
    marker = f"cluster=demo-r{base['revision'] + 1}"
    value = event_format.replace("%REQ% ", f"%REQ% {marker} ", 1)  # the request id stays first: the balancer needs it
    print(f"\n$ threatgate cluster settings set --config node1.conf OutputSettings/EventFormat '%REQ% {marker} ...'")
    out = _cli("cluster", "settings", "set", "--config", conf1, "--base", str(base["revision"]),
               "OutputSettings/EventFormat", value)  # fmt: skip
    print(_indent(out))
    committed = re.search(r"settings revision (\d+) \(epoch \d+, sha256 (\w+)\)", out)
    if committed is None:
        raise ThreatgateError(f"unexpected answer from cluster settings set:\n{out}")
    revision, digest = int(committed[1]), committed[2]
    committed_at = time.monotonic()  # the Control applied it before answering, and pushes it now

    def same(r: dict[str, Any]) -> bool:
        return r.get("revision") == revision and r.get("sha256") == digest

    on2 = _poll(f"settings r{revision} applied on node2", lambda: _readyz(*node2), same)
    took = time.monotonic() - committed_at
    on1 = _readyz(*node1)
    print(
        f"threatgate demo: node1 r{on1.get('revision')} sha256 {str(on1.get('sha256'))[:12]}, "
        f"node2 r{on2['revision']} sha256 {on2['sha256'][:12]}; node2 applied it {took * 1000:.0f} ms after "
        "the Control committed it"
    )
    print("$ threatgate cluster status --config node2.conf")
    print(_indent(_cli("cluster", "status", "--config", conf2)))
    return marker, same(on1) and same(on2)


def _stream(port: int, events: bytes, rounds: int, kill: Callable[[], None]) -> list[str]:
    """Send the events ``rounds`` times, paced; call ``kill`` once half the answers are in."""
    per_round = events.count(b"\n")
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(FLAGS)

        def send() -> None:
            for _ in range(rounds):
                s.sendall(events)
                time.sleep(0.004)
            s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        buf = b""
        killed = False
        while data := s.recv(65536):
            buf += data
            if not killed and buf.count(b"LookupFinished\n") >= per_round * rounds // 2:
                killed = True
                kill()
        sender.join(10)
    return buf.decode().splitlines()


def _report(lines: list[str], per_round: int, rounds: int, balancer_log: str, marker: str) -> bool:
    groups: list[list[str]] = [[]]
    for line in lines:
        if line == "LookupFinished":
            groups.append([])
        else:
            groups[-1].append(line)
    answered = len(groups) - 1
    first_round = groups[:per_round]
    for i, group in enumerate(first_round, 1):
        for line in group:
            print(f"! event {i}: {line}")
        print(f"  event {i}: LookupFinished")
    # Every round carries the same events, so every round must get the same answers, in order.
    expected = first_round
    same = all(groups[r * per_round : (r + 1) * per_round] == expected for r in range(rounds))
    detections = sum(len(g) for g in groups)
    marked = sum(marker in line for g in groups for line in g)
    resent = sum(int(n) for n in re.findall(r"(\d+) unfinished event\(s\) sent again", balancer_log))
    print(
        f"\nthreatgate demo: {answered}/{per_round * rounds} events answered, {detections} detections "
        f"({marked} in the cluster's new format, {marker}), every round identical: {same};\n"
        f"threatgate demo: {resent} event(s) node1 never answered were re-sent to node2"
    )
    return answered == per_round * rounds and same and detections > 0 and marked == detections


def _failover(conf2: str, api2: int, ca2: Path, killed_at: float) -> bool:
    """Wait for node2's emergency mode (no Control), promote it, show the table; True if it is the Control."""
    state = _poll("emergency mode on node2", lambda: _readyz(api2, ca2), lambda r: bool(r.get("emergency")))
    print(
        f"\nthreatgate demo: node2 in emergency mode {time.monotonic() - killed_at:.1f} s after node1 died "
        f"(matching goes on, settings frozen):\n  {state['emergency']}"
    )
    print("$ threatgate cluster promote --config node2.conf")
    print(_indent(_cli("cluster", "promote", "--config", conf2)))
    print("$ threatgate cluster status --config node2.conf")
    print(_indent(_cli("cluster", "status", "--config", conf2)))
    after = _readyz(api2, ca2)
    return after.get("role") == "control" and after.get("epoch") == 2 and not after.get("emergency")


def _rest_demo(port: int, api_port: int, cafile: Path, password: str) -> bool:
    """Lookup through node2's REST API, then push an indicator and match an event that carries it."""
    context = ssl.create_default_context(cafile=str(cafile))  # the node's own certificate, verified
    auth = "Basic " + base64.b64encode(f"demo:{password}".encode()).decode()
    headers = {"Authorization": auth, "Accept": "application/json", "Content-Type": "application/json"}

    def call(method: str, path: str, body: object) -> tuple[int, object, str | None]:
        conn = http.client.HTTPSConnection("127.0.0.1", api_port, context=context, timeout=30)
        try:
            conn.request(method, path, json.dumps(body), headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read()), response.getheader("ETag")
        finally:
            conn.close()

    print(f"\nthreatgate demo: node2's REST API on https://127.0.0.1:{api_port} (certificate {cafile})")
    status, answer, _ = call("POST", "/api/1.1/lookup", [{"object": "http://fakess123.nu"}, {"object": "192.0.2.200"}])
    for item in answer if isinstance(answer, list) else []:
        print(f"  POST /api/1.1/lookup {item['object']}: {item['result']}")
    call("POST", "/api/1.1/suppliers", {"name": "demo_soar", "confidence": 75})
    pushed, _, etag = call("PUT", "/api/1.1/suppliers/demo_soar/indicators", [{"indicator": "evil.demo.test"}])
    revision = (etag or "").strip('"')
    print(
        f"  PUT /api/1.1/suppliers/demo_soar/indicators evil.demo.test: {pushed}, settings revision {revision or '?'}"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(FLAGS + b"99 url=http://evil.demo.test/login\n")
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while data := s.recv(65536):
            reply += data
    text = reply.decode().strip()
    for line in text.splitlines():
        print(("  " if line.endswith("LookupFinished") else "! ") + line)
    return status == 200 and pushed == 200 and revision.isdigit() and "category=demo_soar" in text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(os.environ.get("THREATGATE_DEMO_DIR", ".demo")))
