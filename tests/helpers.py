"""Helpers for integration tests: real ``threatgate node`` processes and real TCP clients."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEFAULT_TIMEOUT = 20.0


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def example_config(
    tmp: Path,
    *,
    port: int,
    extra_service: str = "",
    input_extra: str = "",
    output: str = "",
    api_port: int | None = None,
    users: str = "",
) -> Path:
    """Copy the example config and feeds into ``tmp`` with ``port`` and optional extra elements.

    The REST API listens on ``api_port`` (a free port when None); ``users`` is inserted in ``<Users>``.
    """
    shutil.copytree(EXAMPLES / "feeds", tmp / "feeds", dirs_exist_ok=True)
    text = (EXAMPLES / "node.conf").read_text()
    text = text.replace(
        "<ConnectionString>127.0.0.1:9999</ConnectionString>",
        f"<ConnectionString>127.0.0.1:{port}</ConnectionString>" + input_extra,
    )
    text = text.replace("<ScannersCount>9</ScannersCount>", "<ScannersCount>9</ScannersCount>" + extra_service)
    text = text.replace("127.0.0.1:8443", f"127.0.0.1:{api_port or free_port()}")
    text = text.replace("<Users>", "<Users>" + users)
    if output:
        text = re.sub(r"<ConnectionString>127\.0\.0\.1:9998</ConnectionString>", output, text)
    path = tmp / "node.conf"
    path.write_text(text)
    return path


class NodeProcess:
    """A ``threatgate node`` child process whose stderr is captured in a file we can wait on."""

    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.log_path = config.parent / f"node-{port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "threatgate", "node", "--config", str(config), "--log-level", "inf"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._seen = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = DEFAULT_TIMEOUT, after: int | None = None) -> re.Match[str]:
        """Block until ``pattern`` appears in the log (after offset ``after``); fail on exit or timeout."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        start = self._seen if after is None else after
        while True:
            text = self.log()
            m = rx.search(text, start)
            if m:
                self._seen = m.end()
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited ({self.proc.returncode}) before {pattern!r}:\n{text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timeout waiting for {pattern!r}:\n{text}")
            time.sleep(0.02)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextmanager
def running_node(config: Path, port: int) -> Iterator[NodeProcess]:
    node = NodeProcess(config, port)
    try:
        node.wait_for_log(r"node listening for events")
        yield node
    finally:
        node.stop()


def exchange(port: int, payload: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Send ``payload``, half-close, and read until the node closes: what a lookup script does."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        data = s.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def read_lines(s: socket.socket, count: int) -> list[str]:
    """Read until ``count`` LF-terminated lines have arrived (socket timeout bounds the wait)."""
    buf = b""
    while buf.count(b"\n") < count:
        data = s.recv(65536)
        if not data:
            break
        buf += data
    return buf.decode().splitlines()


def socat() -> str:
    path = shutil.which("socat")
    if path is None:
        raise RuntimeError("socat is not installed: run ./scripts/test, which installs it")
    return path
