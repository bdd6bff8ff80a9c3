"""Real syslog shippers as test peers: a private rsyslogd or syslog-ng forwarding to a node or a balancer.

Each shipper runs with a config written here into the test's directory: its only input is a plain TCP
port on 127.0.0.1 that the test writes events to (LF-framed, one event a line), its only output the
forwarding under test (plain TCP or TLS, LF or RFC 6587 octet-counted framing).  No port 514, no
/dev/log, no system config, pid file, state or control socket is touched, so the tests run beside a
system syslog daemon and as any user.  Both are stopped with SIGTERM, then SIGKILL after 10 s.

syslog shippers send no session flags and read no replies, so a test asserts on what the node's
OutputSettings destination (or the balancer's OutputConnectionString) receives: a :class:`Target`.

syslog-ng: Debian's syslog-ng-core conflicts with rsyslog (both provide system-log-daemon), so
scripts/test unpacks the package into :data:`SYSLOG_NG_ROOT` instead of installing it, and it runs from
there (its libraries and modules found by LD_LIBRARY_PATH and --module-path); an installed
``syslog-ng`` on PATH is used first.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tests.helpers import (
    DEFAULT_TIMEOUT,
    EXAMPLES,
    REPLY_FLAGS,
    LineSink,
    NodeProcess,
    answers_by_request_id,
    balancer_config,
    example_config,
    free_port,
    running_balancer,
    running_node,
    stream,
    wait_for_log_count,
)
from tests.pki import Pair

EVENTS = (EXAMPLES / "events.txt").read_bytes().splitlines(keepends=True)  # "1 CEF:0|..." .. "7 CEF:0|..."

SYSLOG_NG_ROOT = Path(os.environ.get("THREATGATE_SYSLOG_NG_ROOT", "/opt/syslog-ng-core"))
"""Where scripts/test unpacks Debian's syslog-ng-core (``dpkg-deb -x``) when syslog-ng is not installed."""

STOP_TIMEOUT = 10.0


# -- what a shipper forwards to, and how it checks the server ---------------------------------------------------


@dataclass(frozen=True)
class ShipperTLS:
    """TLS settings of a shipper's forwarding: the server is verified, never trusted blindly.

    ``ca_file`` and ``server_name`` (a DNS name in the server's certificate): verified by chain and
    name (rsyslog ``x509/name``, syslog-ng ``peer-verify(required-trusted)``, which checks the target
    address against the certificate).  ``fingerprint`` (SHA-256, hex with colons) instead: rsyslog's
    ``x509/fingerprint``, for a node's self-signed certificate.  ``client``: the certificate the
    shipper presents to a port that asks for one.
    """

    ca_file: Path | None = None
    server_name: str = ""
    fingerprint: str = ""
    client: Pair | None = None


def rsyslogd() -> str:
    path = shutil.which("rsyslogd") or shutil.which("rsyslogd", path="/usr/sbin:/sbin")
    if path is None:
        raise RuntimeError("rsyslog is not installed: run ./scripts/test, which installs it")
    return path


def syslog_ng() -> tuple[list[str], dict[str, str]]:
    """The command line start of syslog-ng, and the environment it needs (installed, or unpacked by scripts/test)."""
    installed = shutil.which("syslog-ng") or shutil.which("syslog-ng", path="/usr/sbin:/sbin")
    if installed is not None:
        return [installed], {}
    binary = SYSLOG_NG_ROOT / "usr/sbin/syslog-ng"
    modules = sorted((SYSLOG_NG_ROOT / "usr/lib/syslog-ng").glob("[0-9]*"))
    if not binary.exists() or not modules:
        raise RuntimeError(f"syslog-ng is not installed nor unpacked in {SYSLOG_NG_ROOT}: run ./scripts/test")
    env = {"LD_LIBRARY_PATH": str(SYSLOG_NG_ROOT / "usr/lib/syslog-ng")}
    return [str(binary), f"--module-path={modules[-1]}"], env


# -- config writers ---------------------------------------------------------------------------------------------

RsyslogFraming = Literal["traditional", "octet-counted"]


def rsyslog_config(work: Path, in_port: int, target: int, framing: RsyslogFraming, template: str,
                   tls: ShipperTLS | None = None) -> str:  # fmt: skip
    """rsyslog.conf: imtcp on 127.0.0.1:``in_port`` (LF only) forwarded by omfwd to 127.0.0.1:``target``.

    With ``tls``: the gtls (GnuTLS) stream driver, mode 1 (TLS only), the CA and client pair given per
    action (``StreamDriver.CAFile`` and friends, rsyslog >= 8.2108), so no global setting is needed.
    The input reads LF only: rsyslog's own octet-counting detection would take ``1 CEF:...`` for a
    1-byte frame.
    """
    action = (
        f'action(type="omfwd" target="127.0.0.1" port="{target}" protocol="tcp" TCP_Framing="{framing}"\n'
        '       template="threatgate_event" action.resumeInterval="1"'
    )
    if tls is not None:
        action += '\n       StreamDriver="gtls" StreamDriverMode="1"'
        if tls.fingerprint:
            action += f' StreamDriverAuthMode="x509/fingerprint" StreamDriverPermittedPeers="SHA256:{tls.fingerprint}"'
        else:
            action += f' StreamDriverAuthMode="x509/name" StreamDriverPermittedPeers="{tls.server_name}"'
        if tls.ca_file is not None:
            action += f'\n       StreamDriver.CAFile="{tls.ca_file}"'
        if tls.client is not None:
            action += f'\n       StreamDriver.CertFile="{tls.client.cert}" StreamDriver.KeyFile="{tls.client.key}"'
    return (
        f'global(workDirectory="{work}" net.enableDNS="off")\n'
        'module(load="imtcp")\n'
        f'template(name="threatgate_event" type="string" string="{template}")\n'
        f'ruleset(name="forward") {{\n  {action})\n}}\n'
        f'input(type="imtcp" address="127.0.0.1" port="{in_port}" ruleset="forward" '
        'supportOctetCountedFraming="off")\n'
    )


SyslogNgDriver = Literal["network", "syslog"]


def syslog_ng_config(in_port: int, target: int, driver: SyslogNgDriver, tls: ShipperTLS | None = None) -> str:
    """syslog-ng.conf: a network() source on 127.0.0.1:``in_port`` forwarded to 127.0.0.1:``target``.

    ``network``: LF framing, the event alone (``template("${MSG}\\n")``).  ``syslog``: RFC 5425/6587
    octet counting; this driver always writes an RFC 5424 header (``<13>1 TIMESTAMP HOST - - - - ``)
    before the message and a LF after each frame, as it does for real users.  The source does not
    parse (``flags(no-parse)``): MSG is the line as written.  ``time-reopen(1)``: a refused connection
    is retried after a second, not 60.
    """
    transport = "tls" if tls is not None else "tcp"
    options = f'"127.0.0.1" port({target}) transport("{transport}")'
    if driver == "network":
        options += ' template("${MSG}\\n")'
    if tls is not None:
        if tls.ca_file is None:
            raise ValueError("syslog-ng verifies the server by a CA file")
        parts = [f'ca-file("{tls.ca_file}")', "peer-verify(required-trusted)"]
        if tls.client is not None:
            parts += [f'cert-file("{tls.client.cert}")', f'key-file("{tls.client.key}")']
        options += f" tls({' '.join(parts)})"
    return (
        "@version: 3.38\n"
        "options { stats-freq(0); time-reopen(1); };\n"
        f'source s_in {{ network(ip("127.0.0.1") port({in_port}) transport("tcp") flags(no-parse)); }};\n'
        f"destination d_threatgate {{ {driver}({options}); }};\n"
        "log { source(s_in); destination(d_threatgate); };\n"
    )


# -- processes --------------------------------------------------------------------------------------------------


@contextmanager
def shipper_process(argv: list[str], env: dict[str, str], in_port: int, log_path: Path) -> Iterator[socket.socket]:
    """Start a shipper; once its input port accepts a connection, yield that connection; stop it at the end."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        try:
            deadline = time.monotonic() + DEFAULT_TIMEOUT
            while True:  # ready when its input accepts a connection: neither daemon reports a port it picked
                try:
                    sock = socket.create_connection(("127.0.0.1", in_port), timeout=DEFAULT_TIMEOUT)
                    break
                except ConnectionRefusedError:
                    output = log_path.read_text(errors="replace")
                    assert proc.poll() is None, f"{argv[0]} exited ({proc.returncode}):\n{output}"
                    assert time.monotonic() < deadline, f"{argv[0]}: input not listening:\n{output}"
                    time.sleep(0.05)
            with sock:
                yield sock
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`: a test never hangs on a shipper that will not exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def rsyslog(
    tmp: Path, target: int, framing: RsyslogFraming, template: str, tls: ShipperTLS | None = None
) -> Iterator[socket.socket]:
    """A private rsyslogd forwarding to ``target``; yields a connection to its input (one event a line).

    Its messages (TLS failures among them) are in ``rsyslog/rsyslogd.log``.
    """
    work = tmp / "rsyslog"
    work.mkdir()
    in_port = free_port()  # rsyslogd's own input: it does not report a port it picked
    conf = work / "rsyslog.conf"
    conf.write_text(rsyslog_config(work, in_port, target, framing, template, tls))
    argv = [rsyslogd(), "-n", "-f", str(conf), "-i", str(work / "rsyslogd.pid")]
    with shipper_process(argv, {}, in_port, work / "rsyslogd.log") as sock:
        yield sock


@contextmanager
def syslog_ng_process(
    tmp: Path, target: int, driver: SyslogNgDriver, tls: ShipperTLS | None = None
) -> Iterator[socket.socket]:
    """A private syslog-ng (foreground, no capabilities, own persist file, control socket and pid file)."""
    work = tmp / "syslog-ng"
    work.mkdir()
    in_port = free_port()
    conf = work / "syslog-ng.conf"
    conf.write_text(syslog_ng_config(in_port, target, driver, tls))
    command, env = syslog_ng()
    argv = [
        *command,
        "--no-caps",
        "-F",
        "-e",  # its own messages (connections, TLS errors) on stderr, into the log file
        "-f",
        str(conf),
        "-R",
        str(work / "persist"),
        "-c",
        str(work / "ctl"),
        "-p",
        str(work / "pid"),
    ]
    with shipper_process(argv, env, in_port, work / "syslog-ng.log") as sock:
        yield sock


# -- what arrives at the SIEM side -------------------------------------------------------------------------------


def metric(port: int, name: str, label: str = "") -> float:
    """One sample of ``http://127.0.0.1:port/metrics`` (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    for line in body.splitlines():
        if line.startswith(name + ("{" + label + "}" if label else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def client_context(ca_file: Path, client: Pair | None = None) -> ssl.SSLContext:
    """A Python TLS client that verifies the server by ``ca_file`` (and presents ``client`` if given)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    return context


@contextmanager
def connect(port: int, tls: ssl.SSLContext | None = None, server_name: str = "") -> Iterator[socket.socket]:
    """A connection to 127.0.0.1:``port``, over TLS (verifying ``server_name``) when ``tls`` is given."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEFAULT_TIMEOUT)
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=server_name)
        except BaseException:
            sock.close()
            raise
    with sock:
        yield sock


def ask(sock: socket.socket, payload: bytes, last: str) -> list[str]:
    """Send ``payload`` and read reply lines up to and including ``last`` (TLS has no half-close to wait on)."""
    sock.sendall(payload)
    data = b""
    while f"\n{last}\n".encode() not in b"\n" + data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before {last!r}: {data!r}"
        data += chunk
    return data.decode().splitlines()


@dataclass
class Target:
    """A node (detections and ``<n> LookupFinished`` lines at its output) or a balancer (detections only).

    ``port``: where shippers send (the process's event port); ``tls`` and ``server_name``: how a
    test client reaches it when it speaks TLS.
    """

    proc: NodeProcess
    metrics: int
    output: LineSink
    expected: list[str]  # the output lines for EVENTS, in order
    first: int  # how many of them belong to the first event
    port: int = 0
    tls: ssl.SSLContext | None = None
    server_name: str = ""

    def __post_init__(self) -> None:
        if not self.port:
            self.port = self.proc.port

    def reference(self, events: list[bytes]) -> list[str]:
        """The output lines for ``events`` (LF-framed) sent with no flags: what a shipper's delivery must match."""
        mark = self.output.mark()
        with connect(self.port, self.tls, self.server_name) as sock:
            sock.sendall(b"".join(events))
            # Open until the detections are out, as a shipper's connection is: a TLS client cannot
            # half-close, and a balancer discards the answers of a client that left.
            return self.output.wait(lines_received(len(self.expected)), mark).splitlines()


@contextmanager
def node_target(
    tmp: Path, input_extra: str = "", tls: ssl.SSLContext | None = None, server_name: str = "", workers: int = 1
) -> Iterator[Target]:
    """A node (examples/node.conf) whose OutputSettings destination is a :class:`LineSink`.

    ``expected`` is what the node answers a CyberTrace client that asks for its detections back: the
    reference a shipper's delivery is compared with.  ``input_extra``: more ``<InputSettings>``
    elements; ``tls`` (and ``server_name``): the event port speaks TLS, this is how to reach it;
    ``workers``: ``<ScanSettings><Workers>`` (with 2 or more the master accepts, a worker serves).
    """
    output = LineSink()
    config = example_config(
        tmp,
        extra_service="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
        input_extra=input_extra,
        output=f"<ConnectionString>127.0.0.1:{output.port}</ConnectionString>",
        workers=workers,
    )
    try:
        with running_node(config) as proc, connect(proc.port, tls, server_name) as sock:
            expected = ask(sock, REPLY_FLAGS + b"".join(EVENTS), f"{len(EVENTS)} LookupFinished")
            first = expected.index("1 LookupFinished") + 1
            assert first > 1  # the first event detects something
            yield Target(proc, proc.metrics_port, output, expected, first, tls=tls, server_name=server_name)
    finally:
        output.close()


@contextmanager
def balancer_target(tmp: Path, nodes: list[int], extra: str = "") -> Iterator[Target]:
    """A balancer before ``nodes`` (plain event ports) whose OutputConnectionString is a :class:`LineSink`.

    ``expected``: the detections the first node answers for EVENTS (the balancer forwards detections
    only, no finished lines), once every node is UP.
    """
    path = tmp / "kl_balancer.conf"
    output = LineSink()
    balancer_config(
        path,
        instances=nodes,
        extra=f"<OutputConnectionString>127.0.0.1:{output.port}</OutputConnectionString>"
        "<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>" + extra,
    )
    try:
        with running_balancer(path) as proc:
            wait_for_log_count(proc, r"instance 127\.0\.0\.1:\d+ is UP", len(nodes))
            answers = answers_by_request_id(stream(nodes[0], REPLY_FLAGS + b"".join(EVENTS)), len(EVENTS))
            expected = [line for answer in answers for line in answer]
            yield Target(proc, proc.metrics_port, output, expected, len(answers[0]))
    finally:
        output.close()


def lines_received(count: int) -> Callable[[str], bool]:
    return lambda text: text.count("\n") >= count


def forward(target: Target, shipper: AbstractContextManager[socket.socket], expected: list[str], first: int) -> str:
    """Events through a real shipper to ``target``: the first one alone (the shipper then idles), then the rest.

    ``expected``: the output lines for EVENTS, ``first`` of them for the first event.  A sender that goes
    quiet after one message still gets it matched (an event port decides the framing on a pause).
    Returns the output text.
    """
    mark = target.output.mark()
    with shipper as syslog_input:
        syslog_input.sendall(EVENTS[0])
        text = target.output.wait(lines_received(first), mark)
        assert text.splitlines() == expected[:first]
        syslog_input.sendall(b"".join(EVENTS[1:]))
        text = target.output.wait(lines_received(len(expected)), mark)
    assert text.splitlines() == expected
    return text
