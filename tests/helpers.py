"""Helpers for integration tests: real ``threatgate node`` processes and real TCP clients."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from threatgate.runtime import LISTEN_VARIABLE

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEFAULT_TIMEOUT = 20.0


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1.

    Only for a port nothing must listen on (a refused connection is the point of the test), or one a
    config must name before the process starts and keep across restarts: a process under test binds
    port 0 and reports the port it got (:meth:`NodeProcess.wait_ready`), which no other process can
    take between the pick and the bind.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def example_config(
    tmp: Path,
    *,
    port: int = 0,
    extra_service: str = "",
    input_extra: str = "",
    output: str = "",
    api_port: int | None = None,
    users: str = "",
    workers: int | str | None = 1,
) -> Path:
    """Copy the example config and feeds into ``tmp`` with ``port`` and optional extra elements.

    ``port`` 0 (the default): the node binds the ports the kernel picks and reports them at READY
    (:meth:`NodeProcess.wait_ready`).  The REST API listens on ``api_port`` (None: 0 as well with
    ``port`` 0, else a port free a moment ago); ``users`` is inserted in ``<Users>``.
    ``workers``: ``<ScanSettings><Workers>`` (1 by default: one process, as the tests were written
    for; None leaves the element out, which means ``auto``).
    """
    shutil.copytree(EXAMPLES / "feeds", tmp / "feeds", dirs_exist_ok=True)
    text = (EXAMPLES / "node.conf").read_text()
    text = text.replace(
        "<ConnectionString>127.0.0.1:9999</ConnectionString>",
        f"<ConnectionString>127.0.0.1:{port}</ConnectionString>" + input_extra,
    )
    text = text.replace("<ScannersCount>9</ScannersCount>", "<ScannersCount>9</ScannersCount>" + extra_service)
    if api_port is None:
        api_port = 0 if port == 0 else free_port()
    text = text.replace("127.0.0.1:8443", f"127.0.0.1:{api_port}")
    text = text.replace("<Users>", "<Users>" + users)
    if output:
        text = re.sub(r"<ConnectionString>127\.0\.0\.1:9998</ConnectionString>", output, text)
    if workers is not None:
        text = text.replace(
            "</Configuration>", f"<ScanSettings><Workers>{workers}</Workers></ScanSettings></Configuration>"
        )
    path = tmp / "node.conf"
    path.write_text(text)
    return path


class NodeProcess:
    """A ``threatgate node`` child process whose stderr is captured in a file we can wait on.

    The process gets its own ``NOTIFY_SOCKET`` (unless the caller set one: it listens itself), so
    :meth:`wait_ready` waits for the READY=1 notice systemd would get, and reads from it the ports the
    process bound (``X_THREATGATE_LISTEN``): a port configured as 0 is known once it is in use.
    """

    command = "node"

    def __init__(self, config: Path, port: int = 0, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.port = port
        """The event port: as configured, then (after :meth:`wait_ready`) as bound."""
        self.bound: dict[str, tuple[str, int]] = {}
        """What the process reported binding, by name (``events``, ``api``, ``alerts``, ``metrics``)."""
        self.log_path = _unused(config.parent, f"{self.command}-{port}" if port else self.command, ".log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, **(env or {})}
        self._notify: socket.socket | None = None
        if "NOTIFY_SOCKET" not in env:
            self._notify, env["NOTIFY_SOCKET"] = _notify_socket(self.log_path.with_suffix(".notify"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "threatgate", self.command, "--config", str(config), "--log-level", "inf"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self._seen = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, tuple[str, int]]:
        """Block until the process sends READY=1 (start-up done, every port bound); the addresses it bound.

        Sets :attr:`port` to the bound event port, and the log cursor of :meth:`wait_for_log` after the
        start-up's "listening for events" line, where waiting for that line used to leave it.  Fails,
        with the log's tail, when the process exits or ``timeout`` passes first.
        """
        assert self._notify is not None, "NOTIFY_SOCKET was set by the caller: it receives READY itself"
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.command}: no READY=1 within {timeout} s; log tail:\n{self.log_tail()}")
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.command} exited ({self.proc.returncode}) before READY=1; log tail:\n{self.log_tail()}"
                )
            self._notify.settimeout(min(left, 0.1))
            try:
                message = self._notify.recv(4096).decode()
            except TimeoutError:
                continue
            fields = dict(line.partition("=")[::2] for line in message.splitlines())
            if fields.get("READY") == "1":
                break
        self.bound = parse_listening(fields.get(LISTEN_VARIABLE, ""))
        if "events" in self.bound:
            self.port = self.bound["events"][1]
        started = re.search(rf"{self.command} listening for events", self.log())
        self._seen = started.end() if started else 0
        return self.bound

    def notices(self) -> list[str]:
        """The notices received since :meth:`wait_ready` (or the last call), without waiting."""
        assert self._notify is not None, "NOTIFY_SOCKET was set by the caller: it receives the notices itself"
        out = []
        self._notify.setblocking(False)
        try:
            while True:
                out.append(self._notify.recv(4096).decode())
        except BlockingIOError:
            return out
        finally:
            self._notify.setblocking(True)

    @property
    def api_port(self) -> int:
        return self.bound["api"][1]

    @property
    def metrics_port(self) -> int:
        return self.bound["metrics"][1]

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
        if self._notify is not None:
            self._notify.close()
        return self.proc.returncode


def parse_listening(value: str) -> dict[str, tuple[str, int]]:
    """The addresses in an ``X_THREATGATE_LISTEN`` value (runtime.Listening.variable): name -> (host, port)."""
    out: dict[str, tuple[str, int]] = {}
    for item in value.split():
        name, _, address = item.partition("=")
        host, _, port = address.rpartition(":")
        out[name] = (host.strip("[]"), int(port))
    return out


def _unused(directory: Path, stem: str, suffix: str) -> Path:
    """``directory/stem<suffix>``, or ``stem-2``, ``stem-3``... when taken (two port-0 processes share a directory)."""
    path, n = directory / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = directory / f"{stem}-{n}{suffix}"
    return path


def _notify_socket(path: Path) -> tuple[socket.socket, str]:
    """A bound SOCK_DGRAM unix socket to pass as ``NOTIFY_SOCKET``, and its address.

    At ``path`` (in the test's directory) when it fits a unix socket name (107 bytes); else in the
    abstract namespace (``@...``, which runtime.notify knows), named after this test process and the path.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    if len(os.fsencode(path)) < 100:
        path.unlink(missing_ok=True)
        sock.bind(str(path))
        return sock, str(path)
    name = f"threatgate-test-{os.getpid()}-{abs(hash(str(path)))}"
    sock.bind("\0" + name)
    return sock, "@" + name


def keep_bound_ports(proc: NodeProcess) -> None:
    """Write the ports a READY node bound for its 0 ports into its config: a restart comes back on them.

    For tests that restart a node where others know it by its ports (a balancer's instance, a pin file).
    """
    text = proc.config.read_text()
    for name, pattern in (
        ("events", r"(<InputSettings>(?:(?!</InputSettings>).)*?<ConnectionString>[^<]*:)0(?=</ConnectionString>)"),
        ("api", r"(<HTTPServer\b(?:(?!</HTTPServer>).)*?<ConnectionString>[^<]*:)0(?=</ConnectionString>)"),
        ("metrics", r"(<MetricsConnectionString[^>]*>[^<]*:)0(?=</MetricsConnectionString>)"),
    ):
        if name in proc.bound:
            port = proc.bound[name][1]
            text = re.sub(pattern, lambda m, port=port: f"{m[1]}{port}", text, count=1, flags=re.S)
    proc.config.write_text(text)


@contextmanager
def running_node(config: Path, port: int = 0, env: dict[str, str] | None = None) -> Iterator[NodeProcess]:
    """A started node, READY: ``node.port`` (and ``node.bound``) are what it bound."""
    node = NodeProcess(config, port, env)
    try:
        node.wait_ready()
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


class LineSink:
    """A real TCP destination (a SIEM, an OutputSettings or alert destination): accepts connections on a
    thread and keeps every byte sent to it, on any connection."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.data = b""
        self._cond = threading.Condition()
        threading.Thread(target=self._accept, name="line-sink", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), name="line-sink-conn", daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                with self._cond:
                    self.data += data
                    self._cond.notify_all()

    def wait_lines(self, count: int, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """Every line received, once there are at least ``count``; fail after ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: self.data.count(b"\n") >= count, timeout)
            lines = self.data.decode().splitlines()
        assert len(lines) >= count, f"{len(lines)} of {count} lines arrived: {lines}"
        return lines

    def mark(self) -> int:
        """The current end of what was received: pass it as ``after`` to :meth:`wait`."""
        with self._cond:
            return len(self.data)

    def wait(self, done: Callable[[str], bool], after: int, timeout: float = DEFAULT_TIMEOUT) -> str:
        """The text received after offset ``after`` once ``done`` holds for it; fail after ``timeout``."""
        with self._cond:
            ok = self._cond.wait_for(lambda: done(self.data[after:].decode("utf-8", "replace")), timeout)
            text = self.data[after:].decode("utf-8", "replace")
        assert ok, f"timeout; received so far: {text!r}"
        return text

    def close(self) -> None:
        self.server.close()


@contextmanager
def line_sink() -> Iterator[LineSink]:
    sink = LineSink()
    try:
        yield sink
    finally:
        sink.close()


# -- the balancer: processes, configs and streaming clients (tests/integration/test_balancer.py) ---------------

REPLY_FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
"""The session flags of a client that wants its detections back, each event closed by LookupFinished."""
FINISHED_LINE = "LookupFinished"


class BalancerProcess(NodeProcess):
    """A ``threatgate balancer`` child process, with NodeProcess's log waiting, signals and stop."""

    command = "balancer"

    def log_offset(self) -> int:
        """The current end of the log: pass it as ``after`` to wait only for what comes next."""
        return len(self.log())


@contextmanager
def running_balancer(config: Path, port: int = 0) -> Iterator[BalancerProcess]:
    """A started balancer, READY: ``balancer.port`` (and ``balancer.bound``) are what it bound."""
    balancer = BalancerProcess(config, port)
    try:
        balancer.wait_ready()
        yield balancer
    finally:
        balancer.stop()


def wait_for_log_count(
    proc: NodeProcess, pattern: str, count: int, timeout: float = DEFAULT_TIMEOUT, after: int = 0
) -> list[re.Match[str]]:
    """Block until ``pattern`` occurs ``count`` times in the log after offset ``after`` (any order of lines)."""
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while True:
        text = proc.log()
        found = list(rx.finditer(text, after))
        if len(found) >= count:
            return found
        if proc.proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.proc.returncode}) before {count} x {pattern!r}:\n{text}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timeout waiting for {count} x {pattern!r} (saw {len(found)}):\n{text}")
        time.sleep(0.02)


def free_ports(count: int, exclude: tuple[int, ...] = ()) -> list[int]:
    """``count`` distinct TCP ports free a moment ago on 127.0.0.1 (bound together to pick), none in ``exclude``."""
    while True:
        socks = [socket.socket() for _ in range(count)]
        try:
            for s in socks:
                s.bind(("127.0.0.1", 0))
            ports = [int(s.getsockname()[1]) for s in socks]
        finally:
            for s in socks:
                s.close()
        if not set(ports) & set(exclude):
            return ports


HEALTH_FAST = '<HealthCheck interval="1" timeout="10" rise="1" fall="1"/>'
"""Health checks that notice a node coming or going within about a second (tests only).  A stopped node
refuses the check at once; the long timeout only keeps a slow PONG on an overloaded machine from counting."""


def balancer_config(
    path: Path,
    *,
    port: int = 0,
    instances: list[int],
    disabled: tuple[int, ...] = (),
    scanners_count: int = 20,
    health: str = HEALTH_FAST,
    extra: str = "",
) -> Path:
    """Write examples/balancer.conf to ``path`` with our ports, instances on 127.0.0.1 and ``extra`` elements.

    An element of ``extra`` replaces the example's element of the same name.  The instances are
    ``<Instance matching_port="P" enabled="true|false">127.0.0.1</Instance>`` (``disabled`` ones false).
    API and alert ports are kept across rewrites of the same file (SIGHUP tests); with ``port`` 0 (the
    default) they are 0 as well: the balancer binds what the kernel picks and reports it at READY.
    """
    text = (EXAMPLES / "balancer.conf").read_text()
    for tag in set(re.findall(r"<(\w+)", extra)):
        text = re.sub(rf"\n *<{tag}\b(?:[^>]*/>|.*?</{tag}>)", "", text, flags=re.S)
    old = path.read_text() if path.exists() else ""
    kept = re.search(r'api_port="(\d+)" cybertrace_port="(\d+)"', old)
    if kept:
        api, alerts = int(kept[1]), int(kept[2])
    else:
        api, alerts = (0, 0) if port == 0 else free_ports(2, exclude=(port, *instances))
    lines = "".join(
        f'    <Instance matching_port="{p}" enabled="{"false" if p in disabled else "true"}">127.0.0.1</Instance>\n'
        for p in instances
    )
    for pattern, replacement in (
        (
            r"<Balancer [^>]*>",
            f'<Balancer matching_port="{port}" api_port="{api}" cybertrace_port="{alerts}" '
            f'scanners_count="{scanners_count}">',
        ),
        (r"<Instances>.*</Instances>", f"<Instances>\n{lines}  </Instances>"),
        (r"<HealthCheck [^>]*/>", health),
        (r"</Config>", f"  {extra}\n</Config>" if extra else "</Config>"),
    ):
        text, n = re.subn(pattern, lambda _m, r=replacement: r, text, flags=re.S)
        assert n == 1, f"examples/balancer.conf changed: {pattern!r} matched {n} times"
    path.write_text(text)
    return path


_FINISHED_RX = re.compile(r"^(?:\d+ )?LookupFinished$", re.M)


class ReplyReader:
    """Reads a socket on a thread until EOF: the lines received, how many were ``LookupFinished``
    (a balancer's ``LookupFinished`` or a node's ``<id> LookupFinished``) and when each arrived."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lines: list[str] = []
        self.finished = 0
        self.finished_at: list[float] = []  # time.monotonic() of each LookupFinished line's read
        self.eof = False
        self.error: Exception | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="reply-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = b""
        try:
            while True:
                data = self.sock.recv(1 << 20)
                now = time.monotonic()
                if not data:
                    break
                buf += data
                end = buf.rfind(b"\n")
                if end < 0:
                    continue
                text = buf[:end].decode("utf-8")
                buf = buf[end + 1 :]
                finished = len(_FINISHED_RX.findall(text))
                with self._cond:
                    self.lines.extend(text.split("\n"))
                    self.finished += finished
                    self.finished_at.extend([now] * finished)
                    self._cond.notify_all()
        except Exception as exc:  # reported by wait_finished / join, never lost in the thread
            self.error = exc
        finally:
            with self._cond:
                if buf:
                    self.lines.append(buf.decode("utf-8", "replace"))  # an unterminated last line
                self.eof = True
                self._cond.notify_all()

    def wait_finished(self, count: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Block until ``count`` LookupFinished lines arrived; fail on EOF, error or timeout."""
        with self._cond:
            self._cond.wait_for(lambda: self.finished >= count or self.eof, timeout)
            finished, eof = self.finished, self.eof
        if finished < count:
            raise AssertionError(f"{finished} of {count} LookupFinished lines (eof={eof}, error={self.error!r})")

    def join(self, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """Wait for EOF; the lines.  Raises what the thread met (e.g. a socket timeout)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"no EOF within {timeout} s after {self.finished} LookupFinished lines")
        if self.error is not None:
            raise self.error
        return self.lines


class LineWriter:
    """Sends byte strings on a thread, in order (``sendall`` may block for long under back-pressure)."""

    _SHUTDOWN = b""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.error: Exception | None = None
        self._queue: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="line-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                data = self._queue.get()
                if data is self._SHUTDOWN:
                    self.sock.shutdown(socket.SHUT_WR)
                    return
                self.sock.sendall(data)
        except Exception as exc:
            self.error = exc

    def send(self, data: bytes) -> None:
        assert data, "use shutdown() to half-close"
        self._queue.put(data)

    def shutdown(self) -> None:
        """Half-close after everything queued before has been sent."""
        self._queue.put(self._SHUTDOWN)

    def join(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"still sending after {timeout} s")
        if self.error is not None:
            raise self.error


def stream(port: int, payload: bytes, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """Send ``payload`` (flags included) on a thread, half-close, and return every line until the peer closes.

    Unlike :func:`exchange`, replies are read while sending, so any volume works.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        reader = ReplyReader(s)
        writer = LineWriter(s)
        writer.send(payload)
        writer.shutdown()
        writer.join(timeout)
        return reader.join(timeout)


def answers_in_order(lines: list[str]) -> list[tuple[str, ...]]:
    """A balancer client's reply lines cut into per-event answers: the detections before each LookupFinished."""
    out: list[tuple[str, ...]] = []
    current: list[str] = []
    for line in lines:
        if line == FINISHED_LINE:
            out.append(tuple(current))
            current = []
        else:
            current.append(line)
    assert not current, f"lines after the last LookupFinished: {current[:5]}"
    return out


def answers_by_request_id(lines: list[str], count: int) -> list[tuple[str, ...]]:
    """A node's reply lines (``<id> ...`` for events numbered 1..count, sent in that order) as per-event answers.

    Checks what the node promises: answers in event order, one ``<id> LookupFinished`` closing each event.
    """
    out: list[tuple[str, ...]] = []
    current: list[str] = []
    for line in lines:
        req, _, rest = line.partition(" ")
        assert req == str(len(out) + 1), f"answer of event {req} where {len(out) + 1} was due: {line!r}"
        if rest == FINISHED_LINE:
            out.append(tuple(current))
            current = []
        else:
            current.append(rest)
    assert not current and len(out) == count, (len(out), count, current[:5])
    return out


# == The balancer's REST gateway (tests/integration/test_gateway.py) =========================================
# A separate block: only additions, nothing above uses it.  Its imports are here to keep it self-contained.

import asyncio  # noqa: E402
import base64  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import ssl  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Coroutine  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

_T = TypeVar("_T")


def basic_auth(user: str, password: str) -> str:
    """An ``Authorization`` header value for HTTP Basic."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class HTTPReply:
    status: int
    headers: dict[str, str]  # lower-case names (a repeated field: the last one)
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HTTPReader:
    """Reads HTTP/1.1 answers (Content-Length framed, as aiohttp sends them) from a socket, one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def recv(self) -> bytes:
        """Bytes from the peer, or b"" once it closed the connection (however it closed it)."""
        try:
            return self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return b""

    def reply(self) -> HTTPReply:
        """The next answer (an interim ``100 Continue`` too: it is an answer without a body)."""
        while b"\r\n\r\n" not in self.buf:
            data = self.recv()
            if not data:
                raise AssertionError(f"connection closed before a whole answer: {self.buf!r}")
            self.buf += data
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(lines[0].split()[1])
        length = int(headers.get("content-length", "0")) if status >= 200 else 0
        while len(self.buf) < length:
            data = self.recv()
            if not data:
                break
            self.buf += data
        body, self.buf = self.buf[:length], self.buf[length:]
        return HTTPReply(status, headers, body)

    def closed(self, timeout: float) -> bool:
        """Whether the peer closes the connection within ``timeout`` seconds (anything it sends is dropped)."""
        self.sock.settimeout(timeout)
        try:
            while self.recv():
                pass
        except TimeoutError:
            return False
        return True


class HTTPSClient:
    """HTTPS to one port on 127.0.0.1 with certificate verification on: ``cafile`` is the only CA."""

    def __init__(self, port: int, cafile: Path) -> None:
        self.port = port
        self.context = ssl.create_default_context(cafile=str(cafile))
        assert self.context.verify_mode == ssl.CERT_REQUIRED and self.context.check_hostname

    def request(
        self,
        method: str,
        target: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 20,
    ) -> HTTPReply:
        """One request on a fresh connection; ``body`` is sent as is when bytes, else as JSON."""
        sent = dict(headers or {})
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=timeout)
        try:
            conn.request(method, target, body=body, headers=sent)
            response = conn.getresponse()
            data = response.read()
            return HTTPReply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        finally:
            conn.close()

    @contextmanager
    def connect(self, timeout: float = 20) -> Iterator[ssl.SSLSocket]:
        """A raw TLS socket (verified), for bytes http.client will not send."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        try:
            sock = self.context.wrap_socket(raw, server_hostname="127.0.0.1")
        except BaseException:
            raw.close()
            raise
        with sock:
            yield sock

    def raw(self, data: bytes, timeout: float = 20) -> HTTPReply:
        """Send ``data`` on a fresh connection and read one answer."""
        with self.connect(timeout) as sock:
            sock.sendall(data)
            return HTTPReader(sock).reply()


def raw_request(method: str, target: str, body: bytes = b"", headers: tuple[str, ...] = ()) -> bytes:
    """The bytes of one HTTP/1.1 request, exactly as given (Content-Length added for a body unless framed)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if body and not any(h.lower().startswith(("content-length:", "transfer-encoding:")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def prometheus_samples(port: int) -> dict[str, float]:
    """Every sample of ``http://127.0.0.1:port/metrics``, keyed by name with labels as printed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def prometheus_total(port: int, name: str) -> float:
    """The sum of every sample of metric ``name`` (all label values)."""
    return sum(v for k, v in prometheus_samples(port).items() if k == name or k.startswith(name + "{"))


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Poll ``predicate`` (every 20 ms) until it holds; fail after ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timeout ({timeout} s) waiting for {what}")
        time.sleep(0.02)


@dataclass(frozen=True)
class GatewayPorts:
    matching: int
    api: int
    alerts: int

    @classmethod
    def bound_by(cls, balancer: NodeProcess) -> GatewayPorts:
        """The ports a READY balancer reported (what it bound for the ports written 0)."""
        return cls(balancer.port, balancer.bound["api"][1], balancer.bound["alerts"][1])


BIND_ANY = GatewayPorts(0, 0, 0)
"""Every port of a balancer 0 in :func:`gateway_config`: it binds them and reports them at READY."""


def gateway_config(
    path: Path,
    *,
    instances: list[tuple[int, int]],
    allowed: tuple[tuple[str, str], ...] | None = None,
    extra: str = "",
    health: str = HEALTH_FAST,
    ports: GatewayPorts | None = None,
) -> GatewayPorts:
    """Write a balancer config for gateway tests: ``instances`` are (matching_port, api_port) on 127.0.0.1.

    ``allowed`` None leaves ``<AllowedRequests>`` out (the read-only defaults); ``extra`` is added as is;
    ``ports`` (else ports free a moment ago; :data:`BIND_ANY` for 0) are the balancer's own.
    """
    ports = ports or GatewayPorts(free_port(), free_port(), free_port())
    rows = "".join(
        f'    <Instance matching_port="{m}" api_port="{a}" enabled="true">127.0.0.1</Instance>\n' for m, a in instances
    )
    rules = ""
    if allowed is not None:
        rules = (
            "  <AllowedRequests>\n"
            + "".join(f'    <Request method="{m}" path="{p}"/>\n' for m, p in allowed)
            + "  </AllowedRequests>\n"
        )
    path.write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n<Config>\n'
        f'  <Balancer matching_port="{ports.matching}" api_port="{ports.api}" cybertrace_port="{ports.alerts}"'
        ' scanners_count="20">127.0.0.1</Balancer>\n'
        f"  <Instances>\n{rows}  </Instances>\n{rules}  {health}\n  {extra}\n</Config>\n"
    )
    return ports


class LoopThread:
    """An asyncio event loop on a thread, for servers a test plays itself (a relay, a stand-in node, a SIEM).

    ``close`` cancels every task (handlers must close their transports in ``finally``) and closes the loop.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = DEFAULT_TIMEOUT) -> _T:
        """Run ``coro`` on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for _ in range(5):  # let transports closed by the handlers finish closing
                await asyncio.sleep(0)

        try:
            self.run(cancel_all())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
