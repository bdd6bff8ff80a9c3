"""``threatgate demo``: a node on the example config and feeds, fed the example events as a client would.

The node runs as a real ``threatgate node`` child process on free ports; the demo connects with the
CyberTrace session flags, sends examples/events.txt and prints every detection it gets back.  Then it
uses the REST API over HTTPS (the node's self-signed certificate, verified): a lookup, and a pushed
indicator that detects in event matching straight away.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from threatgate.errors import ThreatgateError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "node listening for events" in log_path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise ThreatgateError(f"node exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.05)
    raise ThreatgateError("node did not start listening within 60 s")


def run_demo(workdir: str) -> int:
    """Run the demo; returns the exit code (0 when every expected detection came back)."""
    if not (EXAMPLES / "node.conf").is_file():
        raise ThreatgateError(f"examples not found at {EXAMPLES} (run the demo from a source checkout)")
    work = Path(workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(EXAMPLES, work)
    port, api_port = _free_port(), _free_port()
    conf = work / "node.conf"
    password = secrets.token_urlsafe(12)
    from threatgate.node.auth import hash_password

    text = re.sub(r"127\.0\.0\.1:9999", f"127.0.0.1:{port}", conf.read_text())
    text = text.replace("127.0.0.1:8443", f"127.0.0.1:{api_port}")
    text = text.replace("<Users>", f'<Users><User name="demo" password_hash="{hash_password(password)}"/>')
    conf.write_text(text)
    events = (work / "events.txt").read_bytes()
    n_events = events.count(b"\n")
    log_path = work / "node.log"
    print(f"threatgate demo: starting a node on 127.0.0.1:{port} with {conf} (log: {log_path})")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "threatgate", "node", "--config", str(conf)], stdout=log, stderr=log
        )
        try:
            _wait_listening(proc, log_path)
            print(f"threatgate demo: sending {n_events} events from examples/events.txt with {FLAGS.decode()}\n")
            lines = _exchange(port, FLAGS + events).splitlines()
            detections = [line for line in lines if not line.endswith(" LookupFinished")]
            finished = len(lines) - len(detections)
            for line in lines:
                print(("  " if line.endswith("LookupFinished") else "! ") + line)
            print(
                f"\nthreatgate demo: {len(detections)} detection(s), "
                f"{finished} LookupFinished line(s) for {n_events} events"
            )
            api_ok = _rest_demo(port, api_port, work / "certs" / "node.pem", password)
        finally:
            proc.terminate()
            proc.wait(10)
    return 0 if detections and finished == n_events and api_ok else 1


def _exchange(port: int, payload: bytes) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode()


def _rest_demo(port: int, api_port: int, cafile: Path, password: str) -> bool:
    """Lookup through the REST API, then push an indicator and match an event that carries it."""
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

    print(f"\nthreatgate demo: REST API on https://127.0.0.1:{api_port} (certificate {cafile})")
    status, answer = call("POST", "/api/1.1/lookup", [{"object": "http://fakess123.nu"}, {"object": "192.0.2.200"}])
    for item in answer if isinstance(answer, list) else []:
        print(f"  POST /api/1.1/lookup {item['object']}: {item['result']}")
    call("POST", "/api/1.1/suppliers", {"name": "demo_soar", "confidence": 75})
    pushed, _ = call("PUT", "/api/1.1/suppliers/demo_soar/indicators", [{"indicator": "evil.demo.test"}])
    print(f"  PUT /api/1.1/suppliers/demo_soar/indicators evil.demo.test: {pushed}")
    reply = _exchange(port, FLAGS + b"99 url=http://evil.demo.test/login\n").strip()
    for line in reply.splitlines():
        print(("  " if line.endswith("LookupFinished") else "! ") + line)
    return status == 200 and pushed == 200 and "category=demo_soar" in reply


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(os.environ.get("THREATGATE_DEMO_DIR", ".demo")))
