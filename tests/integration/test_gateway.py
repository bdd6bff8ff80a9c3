"""The balancer's REST gateway end to end: real nodes behind a real ``threatgate balancer``, TLS made in the tests.

What an API client of the balancer must get (docs/configuration.md, "Balancer"; gateway.py's docstring):
- only the requests of ``<AllowedRequests>``, whatever their spelling, and no byte of any other reaches a node;
- reads answered by one node, retried on another when it fails; writes on every node or on none;
- every node connection pinned: a node presenting another certificate (a new pair, a man in the middle)
  gets no request byte, and the client a 500 naming the node;
- ``threatgate balancer verify`` / ``pins`` telling an operator the same, and ``pins --renew`` undoing it;
- service alerts on cybertrace_port logged and forwarded, garbage there harmless.

"Nothing reached the node" is measured on the node (``threatgate_api_requests_total``, which counts every
answer) or, for the man in the middle, as the bytes it decrypted.  Every client verifies the certificate
it talks to; every wait is on a log line, an answer or a counter, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trustme

from tests.helpers import (
    BIND_ANY,
    REPLY_FLAGS,
    BalancerProcess,
    GatewayPorts,
    HTTPReader,
    HTTPReply,
    HTTPSClient,
    LoopThread,
    NodeProcess,
    basic_auth,
    example_config,
    exchange,
    free_port,
    gateway_config,
    keep_bound_ports,
    prometheus_samples,
    prometheus_total,
    raw_request,
    wait_for_log_count,
    wait_until,
)
from threatgate.balancer.gateway import MISMATCH
from threatgate.node.auth import hash_password

USER, PASSWORD = "gateway-user", "a gateway test password"
AUTH = {"Authorization": basic_auth(USER, PASSWORD)}
AUTH_LINE = "Authorization: " + basic_auth(USER, PASSWORD)
FP = r"[0-9A-F]{2}(?::[0-9A-F]{2}){31}"
URL_HIT = "http://fakess123.nu"  # listed in examples/feeds/malicious_urls.json
PING = b"X-KF-ReplyBackPING"
MAX_BODY = 64 * 1024 * 1024
ALLOWED = (
    ("POST", "/api/1.1/lookup"),
    ("GET", "/api/v.1.1/suppliers"),  # the other spelling of the version: one request
    ("GET", "/api/{version}/suppliers/{name}"),
    ("POST", "/api/{version}/suppliers"),
    ("PUT", "/api/{version}/suppliers/{name}/indicators"),
)


def fingerprint(cert: bytes | str) -> str:
    """SHA-256 of a certificate (DER bytes or PEM text), as the balancer prints it."""
    der = ssl.PEM_cert_to_DER_cert(cert) if isinstance(cert, str) else cert
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def threatgate(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "threatgate", *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def assert_error(reply: HTTPReply, status: int, fragment: str = "") -> str:
    """A JSON error answer ``[{"status": "..."}]`` with ``status`` and ``fragment`` in its text."""
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith("application/json"), reply
    body = reply.json()
    assert isinstance(body, list) and len(body) == 1 and isinstance(body[0]["status"], str), reply
    assert fragment in body[0]["status"], reply
    return str(body[0]["status"])


# -- nodes and balancers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD)  # scrypt: once per module


@dataclass
class ApiNode:
    """A real node with its REST API, metrics and one user; restartable on the same ports and files."""

    dir: Path
    config: Path
    event_port: int
    api_port: int
    metrics_port: int
    proc: NodeProcess

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.event_port}"

    @property
    def cert(self) -> Path:
        return self.dir / "certs" / "node.pem"

    @property
    def api(self) -> HTTPSClient:
        return HTTPSClient(self.api_port, self.cert)

    def api_requests(self) -> float:
        """REST requests this node process has answered (any status): the proof that one reached it."""
        return prometheus_total(self.metrics_port, "threatgate_api_requests_total")

    def start(self) -> None:
        """Start it again, on the ports of its first start (written into its config then)."""
        self.proc = NodeProcess(self.config, self.event_port)
        self.proc.wait_ready()

    def suppliers(self) -> list[str]:
        reply = self.api.request("GET", "/api/1.1/suppliers", headers=AUTH)
        assert reply.status == 200, reply
        return sorted(s["name"] for s in reply.json())

    def supplier(self, name: str) -> dict[str, Any]:
        reply = self.api.request("GET", f"/api/1.1/suppliers/{quote(name, safe='')}", headers=AUTH)
        assert reply.status == 200, reply
        details: dict[str, Any] = reply.json()[0]
        return details


@contextmanager
def api_nodes(dirs: list[Path], password_hash: str, *, alert_port: int | None = None) -> Iterator[list[ApiNode]]:
    """Nodes on the example config and feeds, started in parallel, stopped at the end (restarted ones too).

    Each binds port 0 for its event, API and metrics ports; once READY, the ports it got are written into
    its config, so that a restart (``ApiNode.start``) comes back on them.
    """
    nodes: list[ApiNode] = []
    try:
        for directory in dirs:
            config = example_config(
                directory,
                users=f'<User name="{USER}" password_hash="{password_hash}"/>',
                extra_service="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
            )
            if alert_port is not None:
                old = '<AlertConnectionString enabled="false">127.0.0.1:9997</AlertConnectionString>'
                text = config.read_text()
                assert text.count(old) == 1
                config.write_text(
                    text.replace(
                        old,
                        f'<AlertConnectionString enabled="true">127.0.0.1:{alert_port}</AlertConnectionString>'
                        "<EventSendingRetriesTimeout>1</EventSendingRetriesTimeout>",
                    )
                )
            nodes.append(ApiNode(directory, config, 0, 0, 0, NodeProcess(config)))
        for node in nodes:
            node.proc.wait_ready()
            node.event_port, node.api_port, node.metrics_port = (
                node.proc.port,
                node.proc.api_port,
                node.proc.metrics_port,
            )
            keep_bound_ports(node.proc)
        yield nodes
        for node in nodes:
            assert "Traceback" not in node.proc.log(), node.proc.log()
    finally:
        for node in nodes:
            node.proc.stop()


@dataclass
class Gateway:
    proc: BalancerProcess
    config: Path
    ports: GatewayPorts
    metrics_port: int

    @property
    def api(self) -> HTTPSClient:
        """A client of the gateway: the balancer's self-signed certificate is its only CA."""
        return HTTPSClient(self.ports.api, self.config.parent / "certs" / "balancer.pem")

    def pin(self, node: ApiNode) -> Path:
        """``<CertDirPath>/<INSTANCE>_<matching_port>.pem`` (CertDirPath "pins", next to the config)."""
        return self.config.parent / "pins" / f"127.0.0.1_{node.event_port}.pem"

    def metric(self, sample: str) -> float:
        return prometheus_samples(self.metrics_port).get(sample, 0.0)


@contextmanager
def running_gateway(
    directory: Path, instances: list[tuple[int, int]], *, extra: str = "", **options: Any
) -> Iterator[Gateway]:
    """A balancer (metrics on) in front of ``instances`` (matching_port, api_port), once every one is UP.

    Its ``/readyz`` polls are off: these tests count the requests a node answers and the pins made, which
    the polls would add to (they are tested in test_balancer_cluster.py).
    """
    config = directory / "kl_balancer.conf"
    extra += "<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>"
    extra += '<ReadinessCheck enabled="false"/>'
    options.setdefault("ports", BIND_ANY)
    gateway_config(config, instances=instances, extra=extra, **options)
    proc = BalancerProcess(config)
    try:
        proc.wait_ready()
        ports = GatewayPorts.bound_by(proc)
        assert f"REST gateway listening on https://127.0.0.1:{ports.api}\n" in proc.log()
        wait_for_log_count(proc, r"instance 127\.0\.0\.1:\d+ is UP", len(instances), after=0)
        yield Gateway(proc, config, ports, proc.metrics_port)
        assert proc.proc.poll() is None, "the balancer died"
        assert "Traceback" not in proc.log(), proc.log()
    finally:
        proc.stop()


def node_is(gateway: Gateway, node: ApiNode, state: str, after: int) -> None:
    gateway.proc.wait_for_log(rf"instance 127\.0\.0\.1:{node.event_port} is {state}", after=after)


@dataclass
class Cluster:
    nodes: list[ApiNode]
    gateway: Gateway

    def requests_on_nodes(self) -> list[float]:
        return [n.api_requests() for n in self.nodes]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, password_hash: str) -> Iterator[Cluster]:
    """Two nodes behind one balancer whose AllowedRequests hold reads and a few writes (module-wide)."""
    dirs = [tmp_path_factory.mktemp(f"node{i}") for i in range(2)]
    with api_nodes(dirs, password_hash) as nodes:
        instances = [(n.event_port, n.api_port) for n in nodes]
        with running_gateway(tmp_path_factory.mktemp("gateway"), instances, allowed=ALLOWED) as gateway:
            yield Cluster(nodes, gateway)


# -- servers the tests play: a relay / man in the middle, a stand-in node, a SIEM ----------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[int] | None = None) -> None:
    while data := await reader.read(65536):
        if seen is not None:
            seen[0] += len(data)
        writer.write(data)
        await writer.drain()


async def _pipe_both(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    seen: list[int] | None = None,
) -> None:
    """Copy both ways until either side ends (``seen`` counts the bytes from ``a``)."""
    tasks = [asyncio.ensure_future(_pipe(a[0], b[1], seen)), asyncio.ensure_future(_pipe(b[0], a[1]))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Relay:
    """What the balancer believes is a node's API port: a TCP relay to the real one.

    Passing through, TLS is end to end (the node's own certificate).  As a man in the middle it terminates
    TLS with a certificate of its own CA and forwards what it decrypts to the node; ``decrypted`` counts
    those bytes: the request bytes the balancer gave away.
    """

    def __init__(self, loop: LoopThread, node: ApiNode, mitm_cert: trustme.LeafCert) -> None:
        self.loop = loop
        self.node = node
        self.mitm = False
        self.accepted = 0
        self.handshakes = 0
        self.finished = 0
        self.decrypted = [0]
        self.errors: list[BaseException] = []
        self._mitm_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        mitm_cert.configure_cert(self._mitm_context)
        self._writers: set[asyncio.StreamWriter] = set()
        self._server = loop.run(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    def set_mitm(self, on: bool) -> None:
        """Switch mode; connections already relayed are cut (a pooled connection would bypass the switch)."""

        async def switch() -> None:
            self.mitm = on
            for writer in list(self._writers):
                writer.transport.abort()

        self.loop.run(switch())

    def close(self) -> None:
        async def close() -> None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()

        self.loop.run(close())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            if self.mitm:
                await writer.start_tls(self._mitm_context)
                self.handshakes += 1
                first = await reader.read(65536)
                if not first:
                    return
                self.decrypted[0] += len(first)
                node_context = ssl.create_default_context(cafile=str(self.node.cert))
                node_reader, upstream = await asyncio.open_connection(
                    "127.0.0.1", self.node.api_port, ssl=node_context, server_hostname="127.0.0.1"
                )
                upstream.write(first)
                await _pipe_both((reader, writer), (node_reader, upstream), self.decrypted)
            else:
                node_reader, upstream = await asyncio.open_connection("127.0.0.1", self.node.api_port)
                await _pipe_both((reader, writer), (node_reader, upstream))
        except (OSError, EOFError) as exc:
            self.errors.append(exc)
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            if upstream is not None:
                upstream.transport.abort()
            self.finished += 1


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]  # lower-case names, in order
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n == name]
        assert len(values) <= 1, self.headers
        return values[0] if values else None


class StandInNode:
    """A stand-in instance: PONG on its event port, an HTTPS API (its own CA) recording every request.

    For what a real node does not show: the exact target and headers it received.
    """

    def __init__(self, loop: LoopThread, ca: trustme.CA) -> None:
        self.loop = loop
        self.requests: list[Seen] = []
        self.drop = False  # True: every API request is read, recorded and left unanswered (connection cut)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        self._writers: set[asyncio.StreamWriter] = set()
        self._events = loop.run(asyncio.start_server(self._event, "127.0.0.1", 0))
        self._api = loop.run(asyncio.start_server(self._http, "127.0.0.1", 0, ssl=context))
        self.event_port: int = self._events.sockets[0].getsockname()[1]
        self.api_port: int = self._api.sockets[0].getsockname()[1]

    def close(self) -> None:
        async def close() -> None:
            for server in (self._events, self._api):
                server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            for server in (self._events, self._api):
                await server.wait_closed()

        self.loop.run(close())

    async def _event(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            first = b""
            while len(first) < len(PING) and PING.startswith(first):
                data = await reader.read(64)
                if not data:
                    return
                first += data
            if first == PING:
                writer.write(b"PONG")
                await writer.drain()
            while await reader.read(65536):  # the event connection: never answered (no event is sent here)
                pass
        except OSError:
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")[:-2]
                method, target, _ = lines[0].split(" ", 2)
                headers = [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
                length = int(next((v for n, v in headers if n == "content-length"), "0"))
                body = await reader.readexactly(length)
                self.requests.append(Seen(method, target, headers, body))
                if self.drop:
                    return  # as a node dying under the request
                payload = b'[{"status": "stand-in"}]'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Node: stand-in\r\n"
                    b"Keep-Alive: timeout=99\r\nServer: stand-in\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
                )
                await writer.drain()
        except (OSError, EOFError):
            pass  # the balancer closed its connection
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


class LineCollector:
    """A SIEM's TCP input: every line received, on any connection."""

    def __init__(self, loop: LoopThread) -> None:
        self.loop = loop
        self.lines: list[str] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._server = loop.run(asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 21))
        self.port: int = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        async def close() -> None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()

        self.loop.run(close())

    def having(self, fragment: str) -> list[str]:
        return [line for line in list(self.lines) if fragment in line]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                self.lines.append(line.rstrip(b"\n").decode("utf-8", "replace"))
        except (OSError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    try:
        yield loop
    finally:
        loop.close()


# == allow-list =============================================================================================


def test_allowed_requests_pass_in_both_version_spellings(cluster: Cluster) -> None:
    """Each allowed request answers what a node answers directly, spelled /api/1.1 or /api/v.1.1."""
    api, direct = cluster.gateway.api, cluster.nodes[0].api
    lookup = [{"object": URL_HIT}, {"object": "192.0.2.1"}]
    want_lookup = direct.request("POST", "/api/1.1/lookup", lookup, headers=AUTH)
    want_suppliers = direct.request("GET", "/api/1.1/suppliers", headers=AUTH)
    assert want_lookup.status == want_suppliers.status == 200
    assert want_lookup.json()[0]["result"] == "detected"
    for method, target, body, want in (
        ("POST", "/api/1.1/lookup", lookup, want_lookup),
        ("POST", "/api/v.1.1/lookup", lookup, want_lookup),
        ("GET", "/api/1.1/suppliers", None, want_suppliers),
        ("GET", "/api/v.1.1/suppliers", None, want_suppliers),
        ("GET", "/api/1.1//suppliers?verbose=1", None, want_suppliers),  # resolves to an allowed request
        ("GET", "/api/1.1/suppliers/x/../FalsePositive", None, None),
        ("GET", "/api/v.1.1/suppliers/%46alse%50ositive", None, None),
    ):
        reply = api.request(method, target, body, headers=AUTH)
        assert reply.status == 200, (target, reply)
        assert reply.headers["content-type"].startswith("application/json")
        if want is not None:
            assert reply.json() == want.json(), target
        else:
            assert reply.json()[0]["name"] == "FalsePositive", target


BYPASSES = [
    pytest.param("GET", "/api/1.1/suppliers/x/../../tags", 403, "GET /api/1.1/tags", id="dot-dot"),
    pytest.param("POST", "/api/1.1/lookup/../suppliers/Evil", 403, "POST /api/1.1/suppliers/Evil", id="climb-out"),
    pytest.param("GET", "/api/1.1/suppliers/x/%2e%2e/%2e%2e/tags", 403, "GET /api/1.1/tags", id="encoded-dot-dot"),
    pytest.param("PUT", "/api/1.1/suppliers/x/indicators/%2E%2e", 403, "PUT /api/1.1/suppliers/x", id="mixed-%2E%2e"),
    pytest.param(
        "PUT", "/api/1.1/suppliers/x%2Findicators", 403, "PUT /api/1.1/suppliers/x/indicators", id="%2F-in-segment"
    ),
    pytest.param("GET", "/api/1.1%2Ftags", 403, "GET /api/1.1/tags", id="%2F-in-version"),
    pytest.param("GET", "//api//1.1//tags", 403, "GET /api/1.1/tags", id="double-slashes"),
    pytest.param("POST", "/api/1.1/lookup;x", 403, "POST /api/1.1/lookup;x", id="semicolon-parameter"),
    pytest.param(
        "GET", "/api/v./suppliers/FalsePositive", 403, "GET /api//suppliers/FalsePositive", id="empty-version"
    ),
    pytest.param(
        "DELETE", "/api/1.1/suppliers/FalsePositive", 403, "DELETE /api/1.1/suppliers/FalsePositive", id="method"
    ),
    pytest.param("GET", "/api/1.1/lookup", 403, "GET /api/1.1/lookup", id="allowed-path-other-method"),
    pytest.param("gEt", "/api/1.1/suppliers", None, "", id="mixed-case-method"),
    pytest.param("post", "/api/1.1/lookup", None, "", id="lower-case-method"),
    pytest.param("POST", "https://127.0.0.1:{port}/api/1.1/lookup", 400, "is not an absolute path", id="absolute-form"),
    pytest.param("GET", "/api/1.1/suppliers/%zz", 400, "malformed %-escape", id="bad-escape"),
    pytest.param("GET", "/api/1.1/suppliers/%00", 400, "control character", id="nul"),
    pytest.param("GET", "/api/1.1/suppliers/%c0%ae%c0%ae", 400, "not UTF-8", id="overlong-utf8-dots"),
]


@pytest.mark.parametrize(("method", "target", "status", "shown"), BYPASSES)
def test_allow_list_bypass_attempts_reach_no_node(
    cluster: Cluster, method: str, target: str, status: int | None, shown: str
) -> None:
    """Refused at the gateway (403 naming the normalised request, 400 when there is none), with valid
    credentials and a body the node would act on, and not one request answered by a node."""
    gateway = cluster.gateway
    target = target.format(port=gateway.ports.api)
    before = cluster.requests_on_nodes()
    body = b'[{"name": "Evil", "object": "http://fakess123.nu"}]' if method.upper() in ("POST", "PUT") else b""
    headers = (AUTH_LINE, "Content-Type: application/json") if body else (AUTH_LINE,)
    reply = gateway.api.raw(raw_request(method, target, body, headers))
    if status is None:  # aiohttp's parser refuses a method that is not upper case (a 403 would do as well)
        assert 400 <= reply.status < 500, reply
        assert_error(reply, reply.status)
    elif status == 403:
        assert_error(reply, 403, f"request {shown} is not allowed by the balancer (AllowedRequests)")
    else:
        assert_error(reply, status, shown)
    assert cluster.requests_on_nodes() == before


def test_expect_100_continue_is_answered_by_the_gateway(cluster: Cluster) -> None:
    """A client waiting for ``100 Continue`` (curl does for large bodies) gets it from the gateway, and the
    node is not asked for one it never sends (the request would hang until UpstreamTimeout)."""
    body = b'[{"object": "http://fakess123.nu"}]'
    with cluster.gateway.api.connect(timeout=10) as sock:
        reader = HTTPReader(sock)
        for target in ("/api/1.1/lookup", "/api/v.1.1/lookup"):  # twice on one connection
            head = raw_request(
                "POST", target, headers=(AUTH_LINE, "Expect: 100-continue", f"Content-Length: {len(body)}")
            )
            sock.sendall(head)
            assert reader.reply().status == 100
            sock.sendall(body)
            reply = reader.reply()
            assert reply.status == 200, reply
            assert reply.json()[0]["result"] == "detected"


# == proxy hygiene ==============================================================================================


def test_credentials_pass_through_and_the_node_decides(cluster: Cluster) -> None:
    api = cluster.gateway.api
    missing = api.request("GET", "/api/1.1/suppliers")
    assert_error(missing, 401, "authentication required")
    assert missing.headers["www-authenticate"] == 'Basic realm="threatgate"'
    assert_error(api.request("GET", "/api/1.1/suppliers", headers={"Authorization": basic_auth(USER, "no")}), 401)
    assert api.request("GET", "/api/1.1/suppliers", headers=AUTH).status == 200


def test_the_node_gets_forwarding_headers_and_no_hop_by_hop_ones(loop_thread: LoopThread, tmp_path: Path) -> None:
    """Seen from a stand-in node: X-Forwarded-For (appended), X-Forwarded-Proto and X-Real-IP set by the
    gateway, Authorization and end-to-end headers as sent (repeated ones joined), hop-by-hop ones (fixed or
    named by any Connection line) and Expect gone, the target rebuilt from the normalised path."""
    node = StandInNode(loop_thread, trustme.CA())
    try:
        with running_gateway(tmp_path, [(node.event_port, node.api_port)]) as gateway:  # default AllowedRequests
            hop = (
                "Connection: keep-alive, X-Hop-One",
                "Connection: X-Hop-Two",
                "Keep-Alive: timeout=5",
                "TE: trailers",
                "Upgrade: websocket",
                "Trailer: X-Trailer",
                "Proxy-Authorization: Basic c2VjcmV0",
                "Proxy-Connection: keep-alive",
                "X-Hop-One: 1",
                "X-Hop-Two: 2",
            )
            kept = ("Authorization: Basic dXNlcjpwYXNz", "Accept: application/json", "X-Custom: one", "X-Custom: two")
            forged = ("X-Forwarded-For: 203.0.113.7", "X-Real-IP: 198.51.100.1", "X-Forwarded-Proto: http")
            reply = gateway.api.raw(
                raw_request("GET", "/api/v.1.1/suppliers/x/..//Fan%20Out%20%231%2050%25?x=1", b"", hop + kept + forged)
            )
            assert reply.status == 200, reply
            assert reply.json() == [{"status": "stand-in"}]
            assert reply.headers["x-node"] == "stand-in"  # end-to-end answer headers pass
            assert "keep-alive" not in reply.headers and reply.headers["server"] != "stand-in"
            [seen] = node.requests
            assert (seen.method, seen.target) == ("GET", "/api/1.1/suppliers/Fan%20Out%20%231%2050%25?x=1")
            names = {n for n, _ in seen.headers}
            assert not names & {"connection", "keep-alive", "te", "upgrade", "trailer", "expect"}, seen.headers
            assert not names & {"proxy-authorization", "proxy-connection", "x-hop-one", "x-hop-two"}, seen.headers
            assert seen.header("authorization") == "Basic dXNlcjpwYXNz"
            assert seen.header("accept") == "application/json"
            assert seen.header("x-custom") == "one, two"
            assert seen.header("x-forwarded-for") == "203.0.113.7, 127.0.0.1"
            assert seen.header("x-real-ip") == "127.0.0.1"
            assert seen.header("x-forwarded-proto") == "https"
            assert seen.header("host") == f"127.0.0.1:{node.api_port}"
            # A lookup with Expect: the gateway answers 100 itself and the body arrives whole, without Expect.
            body = b'[{"object": "http://fakess123.nu"}]'
            with gateway.api.connect() as sock:
                reader = HTTPReader(sock)
                head = ("Expect: 100-continue", f"Content-Length: {len(body)}", "Content-Type: application/json")
                sock.sendall(raw_request("POST", "/api/1.1/lookup", headers=head))
                assert reader.reply().status == 100
                sock.sendall(body)
                assert reader.reply().status == 200
            seen = node.requests[-1]
            assert (seen.method, seen.target, seen.body) == ("POST", "/api/1.1/lookup", body)
            assert seen.header("expect") is None and seen.header("content-type") == "application/json"
            # Not in the default AllowedRequests: refused, nothing sent.
            assert_error(gateway.api.request("PUT", "/api/1.1/suppliers/x", {"status": "disabled"}), 403)
            assert len(node.requests) == 2
    finally:
        node.close()


def test_limits_429_408_413_and_nothing_reaches_the_node(cluster: Cluster, tmp_path: Path) -> None:
    """MaxConcurrentRequests 1 held by a request whose body never ends: the next request is 429 at once,
    the held one 408 after RequestBodyTimeout (1 s) and closed; a declared body over 64 MiB is 413 before
    any of it is read.  The node answers only the requests that got through."""
    node = cluster.nodes[0]
    limits = "<MaxConcurrentRequests>1</MaxConcurrentRequests><RequestBodyTimeout>1</RequestBodyTimeout>"
    with running_gateway(tmp_path, [(node.event_port, node.api_port)], allowed=ALLOWED, extra=limits) as gateway:
        api = gateway.api
        before = node.api_requests()
        passed = 0
        with api.connect() as held:
            head = raw_request("POST", "/api/1.1/lookup", headers=(AUTH_LINE, "Content-Length: 100"))
            held.sendall(head + b'[{"object": ')
            start = time.monotonic()
            while (reply := api.request("GET", "/api/1.1/suppliers", headers=AUTH)).status == 200:
                passed += 1  # the held request was not being handled yet
                assert time.monotonic() - start < 0.8, "never 429 while a request holds the only slot"
            assert_error(reply, 429, "too many requests in progress at the balancer")
            assert reply.headers["retry-after"] == "1"
            reader = HTTPReader(held)
            assert_error(reader.reply(), 408, "request body not received in time")
            assert 0.8 < time.monotonic() - start < 10
            assert reader.closed(5)
        assert api.request("GET", "/api/1.1/suppliers", headers=AUTH).status == 200  # the slot is free again
        passed += 1
        with api.connect() as big:
            big.sendall(raw_request("POST", "/api/1.1/lookup", headers=(AUTH_LINE, f"Content-Length: {MAX_BODY + 1}")))
            reader = HTTPReader(big)
            assert_error(reader.reply(), 413, f"request body of {MAX_BODY + 1} bytes is over the {MAX_BODY} byte limit")
            assert reader.closed(5)
        assert node.api_requests() == before + passed
        assert gateway.metric('threatgate_api_requests_total{status="429"}') >= 1
        assert gateway.metric('threatgate_api_requests_total{status="408"}') == 1
        assert gateway.metric('threatgate_api_requests_total{status="413"}') == 1


# == writes and failover ========================================================================================


def test_a_write_reaches_every_node(cluster: Cluster) -> None:
    """POST suppliers and PUT indicators through the gateway: on each node, checked on the node itself."""
    api = cluster.gateway.api
    name = "Fan Out #1 50%"  # re-encoded on the way: space, '#' and '%'
    reply = api.request("POST", "/api/1.1/suppliers", {"name": name, "confidence": 77}, headers=AUTH)
    assert reply.status == 201, reply
    assert reply.json()[0]["name"] == name
    for node in cluster.nodes:
        assert name in node.suppliers()
        details = node.supplier(name)
        assert (details["confidence"], details["indicators"]) == (77, 0)
    items = [{"indicator": "http://fan-out.example/x"}, {"indicator": "198.51.100.77"}]
    reply = api.request("PUT", f"/api/v.1.1/suppliers/{quote(name, safe='')}/indicators", items, headers=AUTH)
    assert reply.status == 200, reply
    for node in cluster.nodes:
        assert node.supplier(name)["indicators"] == 2
        found = node.api.request("POST", "/api/1.1/lookup", [{"object": "http://fan-out.example/x"}], headers=AUTH)
        assert [c["category"] for c in found.json()[0]["categories"]] == [name]
    # A write every node refuses alike is answered as the nodes answer (no drift to report).
    assert_error(api.request("POST", "/api/1.1/suppliers", {"name": name}, headers=AUTH), 409)


def test_a_write_with_one_node_down_changes_no_node(cluster: Cluster) -> None:
    """Node B stopped and seen DOWN: writes are 503 before any node is touched (A unchanged, checked on A);
    reads are still served.  B back UP: the same write reaches both."""
    gateway, (a, b) = cluster.gateway, cluster.nodes
    api = gateway.api
    name = "Written While Down"
    suppliers, fp_indicators = a.suppliers(), a.supplier("FalsePositive")["indicators"]
    mark = gateway.proc.log_offset()
    b.proc.stop()
    try:
        node_is(gateway, b, "DOWN", mark)
        reply = api.request("POST", "/api/1.1/suppliers", {"name": name}, headers=AUTH)
        assert_error(reply, 503, f"write refused before any instance was changed: instance(s) {b.key} DOWN")
        items = [{"indicator": "http://written-while-down.example/"}]
        reply = api.request("PUT", "/api/1.1/suppliers/FalsePositive/indicators", items, headers=AUTH)
        assert_error(reply, 503, b.key)
        assert a.suppliers() == suppliers and a.supplier("FalsePositive")["indicators"] == fp_indicators
        assert api.request("GET", "/api/1.1/suppliers", headers=AUTH).status == 200  # reads: A alone
    finally:
        mark = gateway.proc.log_offset()
        b.start()
        node_is(gateway, b, "UP", mark)
    assert api.request("POST", "/api/1.1/suppliers", {"name": name}, headers=AUTH).status == 201
    assert name in a.suppliers() and name in b.suppliers()


def test_a_failed_read_is_retried_and_a_write_failing_on_one_node_is_reported_as_drift(
    cluster: Cluster, loop_thread: LoopThread, tmp_path: Path
) -> None:
    """Next to node A, a stand-in that is UP but cuts every API request unanswered: each read it takes is
    answered by A (and counted against it); a write reaches A and fails on it: 502 with each node's result,
    logged as drift."""
    a = cluster.nodes[0]
    stand_in = StandInNode(loop_thread, trustme.CA())
    stand_in.drop = True
    key = f"127.0.0.1:{stand_in.event_port}"
    instances = [(stand_in.event_port, stand_in.api_port), (a.event_port, a.api_port)]
    name = "Drifted Apart"
    try:
        with running_gateway(tmp_path, instances, allowed=ALLOWED) as gateway:
            lookup = [{"object": URL_HIT}]
            want = a.api.request("POST", "/api/1.1/lookup", lookup, headers=AUTH)

            def failures() -> float:
                return gateway.metric(f'threatgate_gateway_failures_total{{what="{key}"}}')

            sent = 0
            while failures() < 3:  # reads are spread at random: the stand-in gets its share
                reply = gateway.api.request("POST", "/api/1.1/lookup", lookup, headers=AUTH)
                assert (reply.status, reply.body) == (200, want.body)
                sent += 1
                assert sent < 200, "the stand-in never got a read"
            assert len(stand_in.requests) == failures()  # each one it cut was answered by A instead

            mark = gateway.proc.log_offset()
            reply = gateway.api.request("POST", "/api/1.1/suppliers", {"name": name}, headers=AUTH)
            assert reply.status == 502, reply
            [report] = reply.json()
            assert report["status"] == "the write succeeded on some instances only; nodes have drifted apart"
            results = {r["instance"]: r for r in report["results"]}
            assert results[a.key]["status"] == 201 and results[a.key]["body"][0]["name"] == name
            assert results[key]["status"] == 0 and results[key]["error"]
            drift = gateway.proc.wait_for_log(
                r"ERR threatgate\.gateway: write POST /api/1\.1/suppliers reached the nodes unevenly; "
                "they have drifted apart: (.*)",
                after=mark,
            )
            # each node's part in words, no Python list or dict
            cut = "the connection was closed before the whole answer arrived|Connection reset by peer"
            assert re.fullmatch(rf"{re.escape(key)} no answer \(({cut})\); {re.escape(a.key)} HTTP 201", drift[1]), (
                drift[1]
            )
            assert stand_in.requests[-1].body == b'{"name": "Drifted Apart"}'
            assert name in a.suppliers()
    finally:
        stand_in.close()
        # Node A alone holds the supplier now: remove it so the cluster's nodes agree again.
        a.api.request("DELETE", f"/api/1.1/suppliers/{quote(name, safe='')}", headers=AUTH)
    assert name not in a.suppliers()


def test_a_node_killed_during_lookups_is_invisible_to_clients(cluster: Cluster) -> None:
    """Four clients look up in a loop; node B is SIGKILLed: every lookup is answered 200 with the same
    detections (a lookup B took is retried on A)."""
    gateway, (a, b) = cluster.gateway, cluster.nodes
    objects = [{"object": URL_HIT}] + [{"object": f"http://clean-{i}.example/"} for i in range(300)]
    want = a.api.request("POST", "/api/1.1/lookup", objects, headers=AUTH)
    assert want.status == 200
    answers: list[HTTPReply] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        api = gateway.api
        while not stop.is_set():
            try:
                answers.append(api.request("POST", "/api/1.1/lookup", objects, headers=AUTH))
            except Exception as exc:  # reported below, never lost in the thread
                errors.append(exc)
                return

    retries_before = gateway.metric(f'threatgate_gateway_failures_total{{what="{b.key}"}}')
    threads = [threading.Thread(target=client, name=f"lookups-{i}") for i in range(4)]
    mark = gateway.proc.log_offset()
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: len(answers) >= 40 or bool(errors), "40 lookups before the kill")
        b.proc.proc.kill()
        assert b.proc.proc.wait(10) == -9
        node_is(gateway, b, "DOWN", mark)
        count = len(answers)
        wait_until(lambda: len(answers) >= count + 40 or bool(errors), "40 lookups after the kill")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        b.proc.stop()
        mark = gateway.proc.log_offset()
        b.start()
        node_is(gateway, b, "UP", mark)
    assert not errors, errors
    assert [r.status for r in answers if r.status != 200] == []
    assert all(r.body == want.body for r in answers)
    retried = gateway.metric(f'threatgate_gateway_failures_total{{what="{b.key}"}}') - retries_before
    print(f"{len(answers)} lookups, {retried:.0f} retried on the other node after B failed under them")


# == pinned certificates ==========================================================================================


@dataclass
class Pinned:
    """One node behind a relay (the address the balancer knows), and a balancer with only that instance."""

    node: ApiNode
    relay: Relay
    gateway: Gateway
    mitm_ca: trustme.CA
    mitm_pem: str = field(default="")

    def get(self) -> HTTPReply:
        return self.gateway.api.request("GET", "/api/1.1/suppliers", headers=AUTH)


@pytest.fixture(scope="module")
def pinned(tmp_path_factory: pytest.TempPathFactory, password_hash: str) -> Iterator[Pinned]:
    loop = LoopThread()
    relay: Relay | None = None
    try:
        with api_nodes([tmp_path_factory.mktemp("pinned-node")], password_hash) as [node]:
            ca = trustme.CA()
            mitm_cert = ca.issue_cert("127.0.0.1")
            relay = Relay(loop, node, mitm_cert)
            directory = tmp_path_factory.mktemp("pinned-gateway")
            with running_gateway(directory, [(node.event_port, relay.port)]) as gateway:
                yield Pinned(node, relay, gateway, ca, mitm_cert.cert_chain_pems[0].bytes().decode())
    finally:
        if relay is not None:
            relay.close()
        loop.close()


def pin_fingerprint(path: Path) -> str:
    return fingerprint(path.read_text())


def test_the_first_request_pins_the_node_certificate(pinned: Pinned) -> None:
    """No pin: the first request saves the certificate the node presents as <CertDirPath>/<INSTANCE>_<port>.pem
    (0600 in a 0700 directory), then every request is checked against it over reused connections."""
    gateway, node = pinned.gateway, pinned.node
    pins = gateway.pin(node).parent
    shutil.rmtree(pins, ignore_errors=True)  # whatever an earlier test left: the pin is made here
    mark = gateway.proc.log_offset()
    reply = pinned.get()
    assert reply.status == 200, reply
    assert reply.json() == node.api.request("GET", "/api/1.1/suppliers", headers=AUTH).json()
    saved = gateway.proc.wait_for_log(
        rf"WAR threatgate\.gateway: instance 127\.0\.0\.1:{node.event_port}: no reference certificate yet; "
        rf"saved the one it presented as (\S+) \(SHA-256 ({FP})\)",
        after=mark,
    )
    pin = gateway.pin(node)
    assert saved[1] == str(pin)
    assert pin.stat().st_mode & 0o777 == 0o600 and pins.stat().st_mode & 0o777 == 0o700
    assert ssl.PEM_cert_to_DER_cert(pin.read_text()) == ssl.PEM_cert_to_DER_cert(node.cert.read_text())
    assert saved[2] == fingerprint(node.cert.read_text())
    # Pinned connections are kept alive and reused: ten more requests, no new connection to the node.
    connections = pinned.relay.accepted
    for _ in range(10):
        assert pinned.get().status == 200
    assert pinned.relay.accepted == connections
    assert [p.name for p in pins.iterdir()] == [pin.name]  # written atomically: no temporary file left


def test_verify_pins_a_node_without_a_pin_as_the_gateway_would(pinned: Pinned) -> None:
    """``balancer verify`` with no pin yet: trust on first use through the gateway's own code path."""
    gateway, node = pinned.gateway, pinned.node
    config, pin = str(gateway.config), gateway.pin(node)
    shutil.rmtree(pin.parent, ignore_errors=True)
    listed = threatgate("balancer", "pins", "--config", config)
    assert listed.returncode == 0 and listed.stdout.splitlines() == [f"{node.key}  none      -  {pin}"], listed
    verify = threatgate("balancer", "verify", "--config", config, "--user", USER, "--password-stdin", stdin=PASSWORD)
    assert verify.returncode == 0, verify
    current = fingerprint(node.cert.read_text())
    assert verify.stdout.splitlines()[0] == f"OK   {node.key}  HTTP 200  pin {current}  {pin}"
    assert pin_fingerprint(pin) == current and pin.stat().st_mode & 0o777 == 0o600
    mark = gateway.proc.log_offset()
    assert pinned.get().status == 200
    assert "no reference certificate yet" not in gateway.proc.log()[mark:]  # the gateway uses that pin


def test_a_man_in_the_middle_gets_no_request_byte(pinned: Pinned) -> None:
    """A TLS listener with another certificate where the node was: 500 naming the node, logged at ERR with
    both fingerprints, the handshake completed and not one application byte sent; the relay passing
    again, the pin (unchanged) works again."""
    gateway, node, relay = pinned.gateway, pinned.node, pinned.relay
    assert pinned.get().status == 200  # pinned to the node's certificate
    pin = gateway.pin(node)
    pinned_pem, pinned_fp = pin.read_text(), pin_fingerprint(pin)
    node_requests = node.api_requests()
    relay.set_mitm(True)
    try:
        mark = gateway.proc.log_offset()
        handshakes = relay.handshakes
        for reply in (
            pinned.get(),
            gateway.api.request("POST", "/api/1.1/lookup", [{"object": URL_HIT}], headers=AUTH),
        ):
            assert reply.status == 500, reply
            assert reply.json() == [
                {"status": MISMATCH, "instance": "127.0.0.1", "port": relay.port, "matching_port": node.event_port}
            ]
        gateway.proc.wait_for_log(
            rf"ERR threatgate\.gateway: instance 127\.0\.0\.1 port {relay.port}: {re.escape(MISMATCH)} "
            rf"\(pinned {re.escape(str(pin))} SHA-256 {pinned_fp}, presented {fingerprint(pinned.mitm_pem)}\)",
            after=mark,
        )
        wait_until(lambda: relay.handshakes >= handshakes + 2, "the balancer's TLS handshakes with the relay")
        wait_until(lambda: relay.finished == relay.accepted, "the balancer closing its connections to the relay")
        assert relay.decrypted[0] == 0
    finally:
        relay.set_mitm(False)
    assert node.api_requests() == node_requests
    assert pin.read_text() == pinned_pem
    assert pinned.get().status == 200


def test_a_new_node_certificate_is_refused_until_the_pin_is_renewed(pinned: Pinned) -> None:
    """The node restarted with a new pair: 500 and no request reaches it; ``balancer verify`` fails and
    names both fingerprints, ``pins --check`` shows the mismatch; ``pins --renew`` shows both and replaces
    the pin only with ``--expect`` naming the presented fingerprint (refused without it, or with another);
    the gateway then answers 200 again; ``verify`` then succeeds and lists the suppliers."""
    gateway, node = pinned.gateway, pinned.node
    assert pinned.get().status == 200
    pin = gateway.pin(node)
    old = pin_fingerprint(pin)
    config = str(gateway.config)
    key = node.key
    mark = gateway.proc.log_offset()
    node.proc.stop()
    shutil.rmtree(node.dir / "certs")  # the node makes a new pair at start-up
    node.start()
    new = node.proc.wait_for_log(rf"created self-signed TLS certificate .* SHA-256 fingerprint ({FP})", after=0)[1]
    assert new == fingerprint(node.cert.read_text()) != old
    node_is(gateway, node, "DOWN", mark)
    node_is(gateway, node, "UP", mark)

    for reply in (pinned.get(), gateway.api.request("POST", "/api/1.1/lookup", [{"object": URL_HIT}], headers=AUTH)):
        assert reply.status == 500, reply
        assert reply.json() == [
            {"status": MISMATCH, "instance": "127.0.0.1", "port": pinned.relay.port, "matching_port": node.event_port}
        ]
    gateway.proc.wait_for_log(
        rf"ERR threatgate\.gateway: instance 127\.0\.0\.1 port {pinned.relay.port}: {re.escape(MISMATCH)} "
        rf"\(pinned {re.escape(str(pin))} SHA-256 {old}, presented {new}\)",
        after=mark,
    )

    verify = threatgate("balancer", "verify", "--config", config, "--user", USER, "--password-stdin", stdin=PASSWORD)
    assert verify.returncode == 1, verify
    assert re.search(rf"^FAIL {key}  HTTP -  pin {old}  {re.escape(str(pin))}$", verify.stdout, re.M), verify.stdout
    assert f"certificate mismatch: pinned {old}, presented {new}" in verify.stdout
    listed = threatgate("balancer", "pins", "--config", config)
    assert listed.returncode == 0, listed
    assert listed.stdout.splitlines() == [f"{key}  pinned    {old}  {pin}"]
    checked = threatgate("balancer", "pins", "--config", config, "--check")
    assert checked.returncode == 1, checked
    assert checked.stdout.splitlines() == [f"{key}  MISMATCH  {old}  {pin}  presented {new}"]
    assert node.api_requests() == 0  # neither the gateway nor the commands sent this node a request

    unknown = threatgate("balancer", "pins", "--config", config, "--renew", "127.0.0.1:1")
    assert unknown.returncode == 2 and f"one of {key}" in unknown.stderr, unknown
    shown = [f"pin file:  {pin}", f"pinned:    {old}", f"presented: {new}"]
    # Not confirmed (no terminal to ask at, no --expect): nothing replaced.
    unconfirmed = threatgate("balancer", "pins", "--config", config, "--renew", key)
    assert unconfirmed.returncode == 2, unconfirmed
    assert unconfirmed.stdout.splitlines() == shown
    assert "pin not renewed" in unconfirmed.stderr and "--expect FINGERPRINT" in unconfirmed.stderr
    # Another certificate than the one confirmed out of band (a man in the middle): refused.
    wrong = threatgate("balancer", "pins", "--config", config, "--renew", key, "--expect", old)
    assert wrong.returncode == 1, wrong
    assert f"presents {new}, not the expected {old}: pin not renewed" in wrong.stderr
    assert pin_fingerprint(pin) == old
    # The fingerprint confirmed (in any spelling: lower case, no colons): renewed.
    renewed = threatgate(
        "balancer", "pins", "--config", config, "--renew", key, "--expect", new.replace(":", "").lower()
    )
    assert renewed.returncode == 0, renewed
    assert renewed.stdout.splitlines() == [*shown, f"renewed {pin}: {old} -> {new}"]
    assert pin_fingerprint(pin) == new and pin.stat().st_mode & 0o777 == 0o600
    again = threatgate("balancer", "pins", "--config", config, "--renew", key)
    assert (
        again.returncode == 0
        and again.stdout.splitlines()[-1] == f"{key} presents its pinned certificate: nothing to renew"
    )

    reply = pinned.get()
    assert reply.status == 200, reply
    assert node.api_requests() == 1
    verify = threatgate("balancer", "verify", "--config", config, "--user", USER, "--password-stdin", stdin=PASSWORD)
    assert verify.returncode == 0, verify
    assert verify.stdout.splitlines() == [
        f"OK   {key}  HTTP 200  pin {new}  {pin}",
        "     suppliers: FalsePositive, InternalTI",
    ]
    wrong = threatgate("balancer", "verify", "--config", config, "--user", USER, "--password-stdin", stdin="wrong")
    assert wrong.returncode == 1 and f"FAIL {key}  HTTP 401" in wrong.stdout, wrong
    assert "     HTTP 401: authentication required" in wrong.stdout.splitlines(), wrong  # the node's words, no repr
    checked = threatgate("balancer", "pins", "--config", config, "--check")
    assert checked.returncode == 0, checked
    assert checked.stdout.splitlines() == [f"{key}  match     {new}  {pin}  presented {new}"]


def test_an_instance_whose_certificate_stops_matching_leaves_rest_rotation(
    loop_thread: LoopThread, tmp_path: Path, password_hash: str
) -> None:
    """Two nodes, one behind a relay that turns man in the middle: every read is answered 200 by the other
    node (never 500 and 200 in turn), the refusal is logged once at ERR and shown by a gauge, no request
    byte reaches the relay; when the relay passes the real certificate again the instance is back."""
    with api_nodes([tmp_path / "a", tmp_path / "b"], password_hash) as [node, other]:
        ca = trustme.CA()
        relay = Relay(loop_thread, node, ca.issue_cert("127.0.0.1"))
        try:
            instances = [(node.event_port, relay.port), (other.event_port, other.api_port)]
            (tmp_path / "gw").mkdir()
            with running_gateway(tmp_path / "gw", instances) as gateway:
                for _ in range(200):  # until both are pinned (each read goes to one of them, at random on a tie)
                    assert gateway.api.request("GET", "/api/1.1/suppliers", headers=AUTH).status == 200
                    if gateway.pin(node).exists() and gateway.pin(other).exists():
                        break
                assert gateway.pin(node).exists() and gateway.pin(other).exists(), "both pins"
                gauge = f'threatgate_balancer_instance_pin_refused{{instance="{node.key}"}}'
                assert gateway.metric(gauge) == 0
                relay.set_mitm(True)
                mark = gateway.proc.log_offset()
                statuses = [gateway.api.request("GET", "/api/1.1/suppliers", headers=AUTH).status for _ in range(12)]
                assert statuses == [200] * 12
                log = gateway.proc.log()[mark:]
                assert log.count("out of REST rotation") == 1, log
                assert re.search(rf"ERR threatgate\.gateway: instance 127\.0\.0\.1 port {relay.port}: ", log)
                assert gateway.metric(gauge) == 1
                assert relay.decrypted[0] == 0
                relay.set_mitm(False)
                deadline = time.monotonic() + 20
                while "back in REST rotation" not in gateway.proc.log()[mark:]:
                    assert time.monotonic() < deadline, "the instance never came back"
                    assert gateway.api.request("GET", "/api/1.1/suppliers", headers=AUTH).status == 200
                    time.sleep(0.2)
                assert gateway.metric(gauge) == 0
        finally:
            relay.close()


# == service alerts ================================================================================================


def test_service_alerts_are_logged_and_forwarded_and_garbage_is_harmless(
    loop_thread: LoopThread, tmp_path: Path, password_hash: str
) -> None:
    """A node's alerts arrive on cybertrace_port: logged at their severity (news INFO, failures and unknown
    alerts WARNING, never ERR), forwarded one per line.  Binary bytes, a 1 MiB line without newline and 100
    connections at once crash nothing: the long line is cut once, the connections over the limit are
    refused, events and PING are served, and the next alert still goes on."""
    siem = LineCollector(loop_thread)
    # Named ports: the node, started first, sends its alerts to the balancer's cybertrace_port.
    ports = GatewayPorts(free_port(), free_port(), free_port())
    try:
        node_dir = tmp_path / "node"
        node_dir.mkdir()
        with api_nodes([node_dir], password_hash, alert_port=ports.alerts) as [node]:
            forward = f"<AlertForwardConnectionString>127.0.0.1:{siem.port}</AlertForwardConnectionString>"
            with running_gateway(tmp_path, [(node.event_port, node.api_port)], extra=forward, ports=ports) as gateway:
                logged = gateway.proc.wait_for_log(
                    r"INF threatgate\.alerts: service alert from 127\.0\.0\.1:\d+: (.*alert=KL_ALERT_ServiceStarted.*)",
                    after=0,
                )
                assert re.search(
                    r"INF threatgate\.alerts: service alert from \S+: .*alert=KL_ALERT_UpdatedFeed", gateway.proc.log()
                )
                wait_until(lambda: bool(siem.having("alert=KL_ALERT_ServiceStarted")), "the forwarded ServiceStarted")
                names = [line.split("alert=", 1)[1].split(" ", 1)[0] for line in siem.lines]
                assert names[: names.index("KL_ALERT_ServiceStarted") + 1] == [
                    *["KL_ALERT_UpdatedFeed"] * 8,
                    "KL_ALERT_ServiceStarted",
                ]
                assert siem.having("alert=KL_ALERT_ServiceStarted") == [logged[1]]  # forwarded as received

                alerts = ("127.0.0.1", ports.alerts)
                with socket.create_connection(alerts, timeout=10) as s:
                    s.sendall(bytes(range(256)) * 4 + b"\n\xff\xfe\x00\x1b[2J garbage\r\n")
                with socket.create_connection(alerts, timeout=10) as s:
                    s.sendall(b"A" * (1 << 20))
                    s.sendall(b"\nNov 21 09:00:00 alert=KL_ALERT_AfterLongLine n=1\n")
                with socket.create_connection(alerts, timeout=10) as s:
                    s.sendall(b"Nov 21 09:00:00 alert=KL_ALERT_FailedToUpdateFeed feed=f.json error=truncated\n")
                for name in ("KL_ALERT_FailedToUpdateFeed", "KL_ALERT_AfterLongLine"):  # a failure; an unknown alert
                    gateway.proc.wait_for_log(
                        rf"WAR threatgate\.alerts: service alert from \S+: .*alert={name}", after=0
                    )

                def refused() -> float:
                    return gateway.metric('threatgate_bad_input_total{reason="alert_connections_refused"}')

                def flooded() -> float:
                    return gateway.metric('threatgate_alerts_total{alert="KL_ALERT_Flood"}')

                with contextlib.ExitStack() as stack:  # all open at once until each is refused or heard
                    flood = [stack.enter_context(socket.create_connection(alerts, timeout=10)) for _ in range(100)]
                    for n, s in enumerate(flood):
                        with contextlib.suppress(OSError):  # refused ones are closed by the balancer
                            s.sendall(b"Nov 21 09:00:01 alert=KL_ALERT_Flood n=%d\n" % n)
                    wait_until(lambda: refused() + flooded() == 100, "each connection refused or its alert counted")
                assert refused() >= 100 - 63 and flooded() <= 63  # 64 connections at most, the node's included

                wait_until(lambda: bool(siem.having("KL_ALERT_AfterLongLine")), "the alert after the long line")
                assert exchange(ports.matching, PING) == b"PONG"
                reply = exchange(ports.matching, REPLY_FLAGS + b"1 url=http://fakess123.nu\n").decode()
                assert "category=Malicious_URL" in reply and reply.endswith("LookupFinished\n")
                # The next alert is forwarded as soon as the flood's slots are free again.
                deadline = time.monotonic() + 20
                while not siem.having("KL_ALERT_Final"):
                    assert time.monotonic() < deadline, "no alert forwarded after the flood"
                    with socket.create_connection(alerts, timeout=10) as s, contextlib.suppress(OSError):
                        s.sendall(b"Nov 21 09:00:02 alert=KL_ALERT_Final n=1\n")
                    time.sleep(0.1)

                cut = [line for line in siem.lines if line.startswith("AAAA")]
                assert [len(line) for line in cut] == [64 * 1024]  # cut once, the rest of the line dropped
                assert gateway.metric('threatgate_bad_input_total{reason="alert_line_too_long"}') == 1
                assert gateway.metric('threatgate_alerts_total{alert="KL_ALERT_AfterLongLine"}') == 1
                assert flooded() == len(siem.having("KL_ALERT_Flood"))  # each one counted was forwarded
                assert any("garbage" in line for line in siem.lines)
                assert "ERR threatgate.alerts" not in gateway.proc.log()
    finally:
        siem.close()
