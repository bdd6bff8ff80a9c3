"""``threatgate demo``: a balancer in front of two nodes, the example feeds and events, one node killed.

Everything runs as real processes on free loopback ports: two ``threatgate node`` processes on
the example config and feeds, and a ``threatgate balancer`` in front of them.  The demo streams the
example events (repeated, paced) through the balancer with the CyberTrace session flags, kills one
node with SIGKILL halfway, and checks that every event still got its complete answer exactly once.
Then it uses a node's REST API over HTTPS (its self-signed certificate, verified): a lookup, and a
pushed indicator that detects in event matching straight away.
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

from threatgate.errors import ThreatgateError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
ROUNDS = 400
"""How many times the example events are sent (paced, so the node can be killed mid-stream)."""


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


def _node_config(work: Path, name: str, port: int, api_port: int, password_hash: str) -> Path:
    text = (work / "node.conf").read_text()
    text = text.replace("127.0.0.1:9999", f"127.0.0.1:{port}").replace("127.0.0.1:8443", f"127.0.0.1:{api_port}")
    text = text.replace("<Users>", f'<Users><User name="demo" password_hash="{password_hash}"/>')
    text = text.replace("certs/node.", f"certs/{name}.").replace("state/node.", f"state/{name}.")
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
    """Run the demo; returns the exit code (0 when every event was answered exactly once)."""
    if not (EXAMPLES / "node.conf").is_file():
        raise ThreatgateError(f"examples not found at {EXAMPLES} (run the demo from a source checkout)")
    from threatgate.node.auth import hash_password

    work = Path(workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(EXAMPLES, work)
    password = secrets.token_urlsafe(12)
    password_hash = hash_password(password)
    ports = [(_free_port(), _free_port()) for _ in range(2)]
    configs = [_node_config(work, f"node{i + 1}", p, a, password_hash) for i, (p, a) in enumerate(ports)]
    port = _free_port()
    bal_conf = _balancer_config(work, port, ports)
    events = (work / "events.txt").read_bytes()
    per_round = events.count(b"\n")
    procs: list[_Proc] = []
    try:
        for i, conf in enumerate(configs):
            procs.append(_Proc(f"node{i + 1}", ["node", "--config", str(conf)], work / f"node{i + 1}.log"))
        balancer = _Proc("balancer", ["balancer", "--config", str(bal_conf)], work / "balancer.log")
        procs.append(balancer)
        print(f"threatgate demo: 2 nodes on 127.0.0.1:{ports[0][0]} and :{ports[1][0]}, a balancer on 127.0.0.1:{port}")
        print(f"threatgate demo: logs in {work}")
        balancer.wait_for(r"instance \S+ is UP", count=2)
        total = per_round * ROUNDS
        print(f"threatgate demo: streaming {total} events ({ROUNDS} x examples/events.txt) through the balancer;")
        print("threatgate demo: halfway, node1 hangs (SIGSTOP) with events in flight, then dies (SIGKILL)\n")
        lines = _stream(port, events, ROUNDS, kill=procs[0].hang_then_die)
        ok = _report(lines, per_round, ROUNDS, balancer.log())
        api_ok = _rest_demo(ports[1][0], ports[1][1], work / "certs" / "node2.pem", password)
    finally:
        for proc in reversed(procs):
            proc.stop()
    return 0 if ok and api_ok else 1


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


def _report(lines: list[str], per_round: int, rounds: int, balancer_log: str) -> bool:
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
    resent = sum(int(n) for n in re.findall(r"(\d+) unfinished event\(s\) sent again", balancer_log))
    print(
        f"\nthreatgate demo: {answered}/{per_round * rounds} events answered, {detections} detections, "
        f"every round identical: {same}; {resent} event(s) node1 never answered were re-sent to node2"
    )
    return answered == per_round * rounds and same and detections > 0


def _rest_demo(port: int, api_port: int, cafile: Path, password: str) -> bool:
    """Lookup through node2's REST API, then push an indicator and match an event that carries it."""
    context = ssl.create_default_context(cafile=str(cafile))  # the node's own certificate, verified
    auth = "Basic " + base64.b64encode(f"demo:{password}".encode()).decode()
    headers = {"Authorization": auth, "Accept": "application/json", "Content-Type": "application/json"}

    def call(method: str, path: str, body: object) -> tuple[int, object]:
        conn = http.client.HTTPSConnection("127.0.0.1", api_port, context=context, timeout=30)
        try:
            conn.request(method, path, json.dumps(body), headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    print(f"\nthreatgate demo: node2's REST API on https://127.0.0.1:{api_port} (certificate {cafile})")
    status, answer = call("POST", "/api/1.1/lookup", [{"object": "http://fakess123.nu"}, {"object": "192.0.2.200"}])
    for item in answer if isinstance(answer, list) else []:
        print(f"  POST /api/1.1/lookup {item['object']}: {item['result']}")
    call("POST", "/api/1.1/suppliers", {"name": "demo_soar", "confidence": 75})
    pushed, _ = call("PUT", "/api/1.1/suppliers/demo_soar/indicators", [{"indicator": "evil.demo.test"}])
    print(f"  PUT /api/1.1/suppliers/demo_soar/indicators evil.demo.test: {pushed}")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(FLAGS + b"99 url=http://evil.demo.test/login\n")
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while data := s.recv(65536):
            reply += data
    text = reply.decode().strip()
    for line in text.splitlines():
        print(("  " if line.endswith("LookupFinished") else "! ") + line)
    return status == 200 and pushed == 200 and "category=demo_soar" in text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(os.environ.get("THREATGATE_DEMO_DIR", ".demo")))
