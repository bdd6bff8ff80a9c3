"""``threatgate demo``: a node on the example config and feeds, fed the example events as a client would.

The node runs as a real ``threatgate node`` child process on a free port; the demo connects with the
CyberTrace session flags, sends examples/events.txt and prints every detection it gets back.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
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
    port = _free_port()
    conf = work / "node.conf"
    conf.write_text(re.sub(r"127\.0\.0\.1:9999", f"127.0.0.1:{port}", conf.read_text()))
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
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(FLAGS + events)
                s.shutdown(socket.SHUT_WR)
                chunks = []
                while data := s.recv(65536):
                    chunks.append(data)
        finally:
            proc.terminate()
            proc.wait(10)
    lines = b"".join(chunks).decode().splitlines()
    detections = [line for line in lines if not line.endswith(" LookupFinished")]
    finished = len(lines) - len(detections)
    for line in lines:
        print(("  " if line.endswith("LookupFinished") else "! ") + line)
    print(f"\nthreatgate demo: {len(detections)} detection(s), {finished} LookupFinished line(s) for {n_events} events")
    return 0 if detections and finished == n_events else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(os.environ.get("THREATGATE_DEMO_DIR", ".demo")))
