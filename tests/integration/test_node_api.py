"""The node's REST API over HTTPS: real ``threatgate node`` processes, real TLS clients (stdlib only).

Every client verifies the node's self-signed certificate (``certs/node.pem`` as the only CA), so the
tests also prove that the generated pair is usable as is.  Most tests share one node (distinct
supplier and tag names keep them apart); nodes whose configuration differs are started where needed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.helpers import (
    HTTPReader,
    HTTPReply,
    HTTPSClient,
    NodeProcess,
    basic_auth,
    example_config,
    exchange,
    free_port,
    running_node,
)
from threatgate.node.auth import hash_password

FLAGS = b"X-KF-SendFinishedEventX-KF-ReplyBack"
USER, PASSWORD = "alice", "correct horse battery staple"
EXPORTER, EXPORT_PASSWORD = "exporter", "export only"
MAX_BODY = 64 * 1024 * 1024
FINGERPRINT = r"[0-9A-F]{2}(?::[0-9A-F]{2}){31}"

EXPECTED_URL_EXPORT = (
    "#indicator;category;confidence\n"
    '"http://fakess123.nu";"Malicious_URL";"100"\n'
    '"http://malicious.example/p/index.php";"Malicious_URL";"100"\n'
    '"*.evil-cdn.example/payload/*";"Malicious_URL";"100"\n'
    '"http://mixed.example/Login";"Malicious_URL";"100"\n'
)
"""The example's Malicious_URL feed, less http://benign-but-listed.example/download: false_positives.json
marks benign-but-listed.example/*, so the node never detects it through that feed and does not export it."""


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    """scrypt is slow on purpose: hash each password once per module."""
    return {USER: hash_password(PASSWORD), EXPORTER: hash_password(EXPORT_PASSWORD)}


# -- clients ----------------------------------------------------------------------------------------


basic = basic_auth


Reply = HTTPReply
_DEFAULT: Any = object()


class Client(HTTPSClient):
    """HTTPS to one node (verification on), as the test user unless ``auth`` says otherwise."""

    def request(
        self,
        method: str,
        target: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        auth: Any = _DEFAULT,
        timeout: float = 10,
    ) -> Reply:
        sent: dict[str, str] = {}
        auth = (USER, PASSWORD) if auth is _DEFAULT else auth
        if auth is not None:
            sent["Authorization"] = basic(*auth)
        sent.update(headers or {})
        return super().request(method, target, body, headers=sent, timeout=timeout)

    def get(self, target: str, **kwargs: Any) -> Reply:
        return self.request("GET", target, **kwargs)

    def post(self, target: str, body: Any, **kwargs: Any) -> Reply:
        return self.request("POST", target, body, **kwargs)

    def put(self, target: str, body: Any, **kwargs: Any) -> Reply:
        return self.request("PUT", target, body, **kwargs)

    def delete(self, target: str, body: Any = None, **kwargs: Any) -> Reply:
        return self.request("DELETE", target, body, **kwargs)


def request_bytes(
    method: str, target: str, body: bytes = b"", *, headers: tuple[str, ...] = (), auth: bool = True
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    if auth:
        lines.append("Authorization: " + basic(USER, PASSWORD))
    if body and not any(h.lower().startswith(("content-length:", "transfer-encoding:")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def recv(sock: ssl.SSLSocket) -> bytes:
    """Bytes from the node, or b"" once it closed the connection (however it closed it)."""
    try:
        return sock.recv(65536)
    except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return b""


def read_reply(sock: ssl.SSLSocket) -> Reply:
    return HTTPReader(sock).reply()


def wait_closed(sock: ssl.SSLSocket, limit: float) -> tuple[float, bytes]:
    """Seconds until the node closed ``sock`` (at most ``limit``) and anything it sent first."""
    start = time.monotonic()
    sock.settimeout(limit)
    received = b""
    try:
        while data := recv(sock):
            received += data
    except TimeoutError:
        raise AssertionError(f"the node kept the connection open for more than {limit} s") from None
    return time.monotonic() - start, received


def assert_error(reply: Reply, status: int, fragment: str = "") -> str:
    """The documented error answer: ``status`` and a JSON body ``[{"status": "..."}]``."""
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith("application/json"), reply
    body = reply.json()
    assert isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict), reply
    assert isinstance(body[0]["status"], str), reply
    assert set(body[0]) <= {"status", "rejected"}, reply
    assert fragment in body[0]["status"], reply
    return str(body[0]["status"])


# -- nodes ------------------------------------------------------------------------------------------


@dataclass
class Node:
    proc: NodeProcess
    dir: Path
    event_port: int
    api_port: int
    metrics_port: int

    @property
    def api(self) -> Client:
        return Client(self.api_port, self.dir / "certs" / "node.pem")

    def log(self) -> str:
        return self.proc.log()


def write_config(
    tmp: Path,
    hashes: dict[str, str],
    *,
    scanners: int = 9,
    http_extra: str = "",
    export_credentials: bool = False,
    exports_extra: str = "",
    service_extra: str = "",
    workers: int = 1,
    ports: tuple[int, int, int] = (0, 0, 0),
) -> tuple[Path, int, int, int]:
    """The node's config and its (event, API, metrics) ports: 0 (bound by the node, read from its READY)
    unless ``ports`` names them."""
    port, api_port, metrics_port = ports
    config = example_config(
        tmp,
        port=port,
        api_port=api_port,
        users=f'<User name="{USER}" password_hash="{hashes[USER]}"/>',
        extra_service=f"<MetricsConnectionString>127.0.0.1:{metrics_port}</MetricsConnectionString>" + service_extra,
        workers=workers,
    )
    text = config.read_text()
    replacements = [
        ("<ScannersCount>9</ScannersCount>", f"<ScannersCount>{scanners}</ScannersCount>"),
        ("<Users>", http_extra + "<Users>"),
        ("</IoCExports>", exports_extra + "</IoCExports>"),
    ]
    if export_credentials:
        replacements.append(
            (
                '<IoCExport name="malicious_urls"',
                f'<IoCExport name="malicious_urls" user="{EXPORTER}" password_hash="{hashes[EXPORTER]}"',
            )
        )
    for old, new in replacements:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    config.write_text(text)
    return config, port, api_port, metrics_port


@contextmanager
def api_node(tmp: Path, hashes: dict[str, str], **kwargs: Any) -> Iterator[Node]:
    config, _, _, _ = write_config(tmp, hashes, **kwargs)
    with running_node(config) as proc:
        node = Node(proc, tmp, proc.port, proc.api_port, proc.metrics_port)
        yield node
        assert proc.proc.poll() is None, "the node died"
        assert "Traceback" not in node.log(), node.log()


API_EXPORT = '<IoCExport name="api_pushed" sources="Export Supplier" fields="indicator,category,source,threat"/>'


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, hashes: dict[str, str]) -> Iterator[Node]:
    """The shared node: example config, one API user, the URL export with its own user, metrics."""
    with api_node(tmp_path_factory.mktemp("api"), hashes, export_credentials=True, exports_extra=API_EXPORT) as started:
        yield started


def detections(node: Node, event: str) -> list[str]:
    """Detection lines of one event sent on the event port (the finished line checked and removed)."""
    lines = exchange(node.event_port, FLAGS + b"1 " + event.encode() + b"\n").decode().splitlines()
    assert lines and lines[-1] == "1 LookupFinished", lines
    assert all(line.startswith("1 ") for line in lines), lines
    return [line[2:] for line in lines[:-1]]


def lookup(node: Node, *objects: str, version: str = "1.1") -> list[dict[str, Any]]:
    reply = node.api.post(f"/api/{version}/lookup", [{"object": o} for o in objects])
    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("application/json")
    result: list[dict[str, Any]] = reply.json()
    assert [r["object"] for r in result] == list(objects)
    return result


def categories(result: dict[str, Any]) -> list[str]:
    return sorted(c["category"] for c in result["categories"])


def supplier_path(name: str, version: str = "1.1") -> str:
    return f"/api/{version}/suppliers/{quote(name, safe='')}"


def add_supplier(node: Node, name: str, **attrs: Any) -> dict[str, Any]:
    reply = node.api.post("/api/1.1/suppliers", [{"name": name, **attrs}])
    assert reply.status == 201, reply
    details: dict[str, Any] = reply.json()[0]
    return details


def put_indicators(node: Node, supplier: str, items: list[Any], version: str = "1.1") -> Reply:
    return node.api.put(supplier_path(supplier, version) + "/indicators", items)


def indicator_count(node: Node, supplier: str) -> int:
    reply = node.api.get(supplier_path(supplier))
    assert reply.status == 200, reply
    return int(reply.json()[0]["indicators"])


def db_state(node: Node) -> tuple[Any, ...]:
    """Everything the API can tell about what is stored: suppliers (with counts) and tags."""
    listed = node.api.get("/api/1.1/suppliers")
    assert listed.status == 200, listed
    details = [node.api.get(supplier_path(s["name"])).json() for s in listed.json()]
    tags = node.api.get("/api/1.1/tags")
    assert tags.status == 200, tags
    return details, tags.json()


def metric(node: Node, name: str, label: str = "") -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5) as response:
        body = response.read().decode()
    for line in body.splitlines():
        if line.startswith(name + ("{" + label + "}" if label else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def cert_fingerprint(pem: str) -> str:
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


# -- lookup -----------------------------------------------------------------------------------------


def test_lookup_of_the_example_feeds(node: Node) -> None:
    result = lookup(
        node,
        "http://fakess123.nu",
        "http://benign-but-listed.example/download",
        "198.51.100.77",
        "203.0.113.7",
        "c912705b4bbb14ec7e78fa8b370532c9",
        "https://static.evil-cdn.example/payload/x.js",
        "a7396d61caffe18a4cffbb3b428c9b60.com",
        "http://example.org/index.html",
    )
    url, fp_listed, ip, cidr, md5, mask, domain, clean = result
    assert url == {
        "object": "http://fakess123.nu",
        "result": "detected",
        "categories": [
            {
                "category": "Malicious_URL",
                "detected_indicator": "http://fakess123.nu",
                "context": {"threat": "Trojan-Downloader.Win32.Example", "first_seen": "2026-01-04"},
                "feed": "malicious_urls.json",
                "confidence": 100,
            }
        ],
    }
    # Listed by FalsePositive: the Adware feed record is suppressed, the InternalTI record is not.
    assert fp_listed == {
        "object": "http://benign-but-listed.example/download",
        "result": "detected",
        "categories": [
            {
                "category": "InternalTI",
                "detected_indicator": "http://benign-but-listed.example/download",
                "context": {"owner": "SOC", "note": "abused in campaign 42"},
                "feed": "internal_ti.json",
                "confidence": 100,
            }
        ],
    }
    assert ip["result"] == "detected"
    assert sorted(ip["categories"], key=lambda c: c["category"]) == [
        {
            "category": "IP_Reputation",
            "detected_indicator": "198.51.100.77",
            "context": {"threat": "TOR exit", "geo": "de"},
            "feed": "ip_reputation.csv",
            "confidence": 80,
        },
        {
            "category": "InternalTI",
            "detected_indicator": "198.51.100.77",
            "context": {"owner": "SOC", "note": "confirmed C2 in incident 2026-17"},
            "feed": "internal_ti.json",
            "confidence": 100,
        },
    ]
    assert cidr["categories"] == [
        {
            "category": "IP_Reputation",
            "detected_indicator": "203.0.113.0/24",
            "context": {"threat": "Scanner", "geo": "us"},
            "feed": "ip_reputation.csv",
            "confidence": 80,
        }
    ]
    assert md5["categories"] == [
        {
            "category": "Malicious_Hash",
            "detected_indicator": "C912705B4BBB14EC7E78FA8B370532C9",
            "context": {"file_type": "PE32", "detection": "Trojan.Win32.Agent"},
            "feed": "malicious_hashes.json",
            "confidence": 100,
        }
    ]
    assert [(c["category"], c["detected_indicator"]) for c in mask["categories"]] == [
        ("Malicious_URL", "*.evil-cdn.example/payload/*")
    ]
    assert [(c["category"], c["detected_indicator"], c["context"]) for c in domain["categories"]] == [
        ("Botnet_CnC_Domain", "a7396d61caffe18a4cffbb3b428c9b60.com", {"family": "ExampleBot"})
    ]
    assert clean == {"object": "http://example.org/index.html", "result": "not detected", "categories": []}
    # Every served version, in either spelling, answers the same.
    for version in ("1.0", "1.2", "v.1.1", "v.1.0"):
        assert lookup(node, "http://fakess123.nu", "198.51.100.77", version=version)[0] == url


def test_lookup_answers_as_event_matching_does(node: Node) -> None:
    lines = detections(node, "src=10.1.2.7 dst=198.51.100.77 url=http://benign-but-listed.example/download")
    assert not any("Adware" in line for line in lines)
    assert sum("category=InternalTI" in line for line in lines) == 2
    assert any("category=IP_Reputation matchedIndicator=198.51.100.77" in line for line in lines)


# -- versions, routes, methods, Accept, credentials: the check order ---------------------------------


def test_api_versions_and_unknown_requests(node: Node) -> None:
    api = node.api
    for version in ("1.0", "1.1", "1.2", "v.1.1", "v.1.2"):
        reply = api.get(f"/api/{version}/suppliers")
        assert reply.status == 200, (version, reply)
        assert {"name": "FalsePositive", "status": "enabled"} in reply.json()
    assert_error(api.post("/api/8.0/lookup", [{"object": "x"}]), 404, "unsupported API version '8.0'")
    assert_error(api.post("/api/v.8.0/lookup", [{"object": "x"}]), 404, "unsupported API version")
    assert_error(api.post("/api/1.3/lookup", [{"object": "x"}]), 404, "served: 1.0, 1.1, 1.2")
    assert_error(api.post("/api/v1.1/lookup", [{"object": "x"}]), 404, "unsupported API version")
    assert_error(api.get("/api/1.1/nothing"), 404, "unsupported request")
    assert_error(api.get("/api/1.1/suppliers/a/b/c"), 404, "unsupported request")
    assert_error(api.get("/api/1.1"), 404)
    assert_error(api.get("/api"), 404)
    assert_error(api.get("/"), 404)
    assert_error(api.get("/index.html"), 404)
    assert_error(api.post("/api/1.1/lookup;x", [{"object": "x"}]), 404)  # ;params are not special
    # tags arrived with 1.1
    assert_error(api.get("/api/1.0/tags"), 404, "unsupported request")
    assert_error(api.put("/api/1.0/tags/x", {"weight": 1}), 404)
    assert api.get("/api/1.1/tags").status == 200
    assert api.get("/api/1.2/tags").status == 200


def test_method_not_allowed_names_the_allowed_ones(node: Node) -> None:
    api = node.api
    for method, target, allowed in [
        ("GET", "/api/1.1/lookup", "POST"),
        ("PUT", "/api/1.1/lookup", "POST"),
        ("DELETE", "/api/1.1/suppliers", "GET, POST"),
        ("PATCH", "/api/1.1/suppliers/InternalTI", "DELETE, GET, PUT"),
        ("POST", "/api/1.1/suppliers/InternalTI/indicators", "DELETE, PUT"),
        ("POST", "/api/1.1/tags/x", "DELETE, GET, PUT"),
        ("POST", "/api/openapi.json", "GET"),
    ]:
        reply = api.request(method, target)
        assert_error(reply, 405, "not allowed")
        assert reply.headers["allow"] == allowed, (method, target)


def test_accept_must_allow_json(node: Node) -> None:
    api = node.api
    body = [{"object": "http://fakess123.nu"}]
    for accept in ("text/html", "text/csv", "application/xml, text/plain"):
        assert_error(api.post("/api/1.1/lookup", body, headers={"Accept": accept}), 406, "application/json")
    for accept in ("application/json", "application/*", "*/*", "text/html, application/json;q=0.1", "APPLICATION/JSON"):
        assert api.post("/api/1.1/lookup", body, headers={"Accept": accept}).status == 200, accept
    # order: route and method first, then Accept
    assert_error(api.get("/api/1.1/lookup", headers={"Accept": "text/html"}), 405)
    assert_error(api.get("/api/1.1/nothing", headers={"Accept": "text/html"}), 404)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        basic(USER, "wrong password"),
        basic("mallory", PASSWORD),
        basic("Alice", PASSWORD),
        basic(USER, PASSWORD + " "),
        basic(USER, ""),
        basic(EXPORTER, EXPORT_PASSWORD),  # a user of the export task only
        "Basic !!!notbase64",
        "Basic " + base64.b64encode(b"no colon").decode(),
        "Basic " + base64.b64encode(b"alice:\xff").decode(),
        "Bearer " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
        "basic",
        "Basic " + "A" * 5000,
    ],
    ids=lambda a: "none" if a is None else a[:30],
)
def test_wrong_credentials_get_401(node: Node, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    reply = node.api.post("/api/1.1/lookup", [{"object": "x"}], headers=headers, auth=None)
    assert_error(reply, 401, "authentication required")
    assert reply.headers["www-authenticate"] == 'Basic realm="threatgate"'
    # The same answer whatever was wrong: a client cannot tell a known user from an unknown one.
    assert reply.body == b'[{"status": "authentication required"}]'


def test_check_order_around_credentials(node: Node) -> None:
    api = node.api
    assert_error(api.get("/api/1.1/suppliers/%zz", auth=None), 400, "malformed %-escape")  # 1. path
    assert_error(api.get("/api/8.0/suppliers", auth=None), 404, "unsupported API version")  # 2. version
    assert_error(api.get("/api/1.1/nothing", auth=None), 401)  # 3. credentials before the route ...
    assert_error(api.get("/api/1.1/lookup", auth=None), 401)  # ... and before the method
    assert_error(api.post("/api/1.1/lookup", b"{not json", auth=None), 401)  # ... and long before the body
    assert_error(api.get("/api/openapi.json", auth=None), 401)
    assert api.get("/api/openapi.json").status == 200


# -- suppliers and indicators -----------------------------------------------------------------------


def test_pushed_indicators_detect_in_event_matching_at_once(node: Node) -> None:
    name = "Flow Supplier"
    event = "src=10.0.0.1 dst=100.64.1.200 url=http://flow.example/dl"
    assert detections(node, event) == []
    details = add_supplier(node, name, confidence=70, vendor="ACME")
    assert details == {"name": name, "status": "enabled", "confidence": 70, "retention": 0, "vendor": "ACME"}
    assert node.api.get(supplier_path(name)).json() == [{**details, "indicators": 0}]

    started = time.monotonic()
    reply = put_indicators(
        node,
        name,
        [
            {"indicator": "http://flow.example/dl", "context": {"threat": "Dropper", "score": 7}},
            {"indicator": "100.64.1.200"},
        ],
    )
    assert reply.status == 200 and reply.json() == [{"status": "2 indicator(s) stored"}], reply
    lines = detections(node, event)  # right after the answer: no wait, no restart
    assert time.monotonic() - started < 1.0
    assert sorted(lines) == [
        f"category={name} matchedIndicator=100.64.1.200 confidence=70 source=default supplier={name}",
        f"category={name} matchedIndicator=http://flow.example/dl confidence=70 source=default "
        f"threat=Dropper score=7 supplier={name}",
    ]
    found = lookup(node, "http://flow.example/dl")[0]
    assert found["categories"] == [
        {
            "category": name,
            "detected_indicator": "http://flow.example/dl",
            "context": {"threat": "Dropper", "score": "7", "supplier": name},
            "feed": name,
            "confidence": 70,
        }
    ]
    assert indicator_count(node, name) == 2

    # Same normalised indicator again: replaced, not added.
    reply = put_indicators(node, name, [{"indicator": "HTTP://FLOW.example:80/dl", "context": {"threat": "v2"}}])
    assert reply.status == 200, reply
    assert indicator_count(node, name) == 2
    assert any("threat=v2" in line for line in detections(node, event))

    # Attributes apply at once too.
    reply = node.api.put(supplier_path(name), [{"confidence": 20}])
    assert reply.status == 200 and reply.json()[0]["confidence"] == 20, reply
    assert all("confidence=20" in line for line in detections(node, event))

    # Delete one indicator (the other request item is no indicator at all: not found, not an error).
    reply = node.api.delete(
        supplier_path(name) + "/indicators", [{"indicator": "http://flow.example/dl"}, {"indicator": "x y"}]
    )
    assert reply.status == 200, reply
    assert reply.json() == [{"status": "1 indicator(s) deleted", "deleted": 1, "requested": 2}]
    assert [line.split(" confidence")[0] for line in detections(node, event)] == [
        f"category={name} matchedIndicator=100.64.1.200"
    ]
    assert lookup(node, "http://flow.example/dl")[0]["result"] == "not detected"

    reply = node.api.delete(supplier_path(name))
    assert reply.status == 200 and reply.json() == [{"status": f"supplier {name} deleted"}], reply
    assert detections(node, event) == []
    assert_error(node.api.get(supplier_path(name)), 404, "does not exist")
    assert name not in [s["name"] for s in node.api.get("/api/1.1/suppliers").json()]


def test_partial_success_is_202_with_the_rejected_items(node: Node) -> None:
    name = "Partial Supplier"
    add_supplier(node, name)
    assert node.api.post("/api/1.1/tags", [{"name": "partial-tag"}]).status == 201
    reply = put_indicators(
        node,
        name,
        [
            {"indicator": "not an indicator"},
            {"indicator": "good.partial.example", "tags": ["partial-tag"]},
            {"indicator": 5},
            {"indicator": "tagged.partial.example", "tags": ["no-such-tag"]},
            "just a string",
            {"indicator": "x.partial.example", "colour": "red"},
        ],
    )
    assert reply.status == 202, reply
    body = reply.json()
    assert body[0]["status"] == "1 indicator(s) stored, 5 rejected"
    assert body[0]["rejected"] == [
        {"index": 0, "indicator": "not an indicator", "error": "not a valid URL, domain, IP address, CIDR or hash"},
        {"index": 2, "indicator": "5", "error": "indicator must be a non-empty string"},
        {"index": 3, "indicator": "tagged.partial.example", "error": "unknown tag(s): no-such-tag"},
        {"index": 4, "indicator": "", "error": "expected an object"},
        {"index": 5, "indicator": "x.partial.example", "error": "unknown field(s): colour"},
    ]
    assert indicator_count(node, name) == 1
    assert lookup(node, "http://good.partial.example")[0]["categories"][0]["context"] == {
        "tags": "partial-tag",
        "supplier": name,
    }

    # Nothing valid: 400, the first problem in the status, nothing stored.
    before = db_state(node)
    reply = put_indicators(node, name, [{"indicator": "nope nope"}, {"indicator": "y.partial.example", "tags": ["x"]}])
    status = assert_error(reply, 400, "no indicator stored; item 0: not a valid URL")
    assert [r["index"] for r in reply.json()[0]["rejected"]] == [0, 1], status
    assert db_state(node) == before
    # An unknown supplier is 404 whatever the body.
    assert_error(put_indicators(node, "No Such Supplier", [{"indicator": "a.example"}]), 404, "does not exist")
    assert_error(put_indicators(node, "No Such Supplier", [{"indicator": 5}]), 404, "does not exist")
    assert db_state(node) == before


def test_disabled_supplier_stops_detecting(node: Node) -> None:
    name = "Toggle Supplier"
    add_supplier(node, name)
    assert put_indicators(node, name, [{"indicator": "http://toggle.example/x"}]).status == 200
    event = "url=http://toggle.example/x"
    assert len(detections(node, event)) == 1
    reply = node.api.put(supplier_path(name), {"status": "disabled"})
    assert reply.status == 200 and reply.json()[0]["status"] == "disabled", reply
    assert detections(node, event) == []
    assert lookup(node, "http://toggle.example/x")[0]["result"] == "not detected"
    assert {"name": name, "status": "disabled"} in node.api.get("/api/1.1/suppliers").json()
    assert indicator_count(node, name) == 1  # kept, just not matched
    assert node.api.put(supplier_path(name), [{"status": "enabled"}]).status == 200
    assert len(detections(node, event)) == 1


def test_a_deleted_and_recreated_supplier_starts_empty(node: Node) -> None:
    # The supplier store keeps unchanged suppliers' snapshots between pushes: a re-created name (which
    # SQLite may give the same row id) must not inherit the deleted supplier's indicators.
    name = "Recreated Supplier"
    add_supplier(node, name)
    assert put_indicators(node, name, [{"indicator": "http://recreated.example/x"}]).status == 200
    event = "url=http://recreated.example/x"
    assert len(detections(node, event)) == 1
    assert node.api.delete(supplier_path(name)).status == 200
    assert detections(node, event) == []
    add_supplier(node, name)
    assert detections(node, event) == []
    assert indicator_count(node, name) == 0
    # Another supplier's push leaves this one's (new) indicators alone, and vice versa.
    add_supplier(node, "Neighbour Supplier")
    assert put_indicators(node, name, [{"indicator": "http://recreated.example/y"}]).status == 200
    assert put_indicators(node, "Neighbour Supplier", [{"indicator": "http://neighbour.example/z"}]).status == 200
    assert len(detections(node, "url=http://recreated.example/y")) == 1
    assert len(detections(node, "url=http://neighbour.example/z")) == 1


def test_renaming_a_supplier_renames_its_detections(node: Node) -> None:
    add_supplier(node, "Old Name")
    assert put_indicators(node, "Old Name", [{"indicator": "http://rename.example/x"}]).status == 200
    reply = node.api.put(supplier_path("Old Name"), {"name": "New Name"})
    assert reply.status == 200 and reply.json()[0]["name"] == "New Name", reply
    assert [line.split(" matched")[0] for line in detections(node, "url=http://rename.example/x")] == [
        "category=New Name"
    ]
    assert_error(node.api.get(supplier_path("Old Name")), 404)
    assert_error(node.api.put(supplier_path("New Name"), {"name": "InternalTI"}), 409, "already exists")


def test_builtin_suppliers_through_the_api(node: Node) -> None:
    api = node.api
    assert_error(api.delete("/api/1.1/suppliers/FalsePositive"), 403, "cannot be deleted")
    assert_error(api.delete("/api/1.1/suppliers/InternalTI"), 403, "cannot be deleted")
    assert_error(api.put("/api/1.1/suppliers/InternalTI", {"name": "Mine"}), 403, "cannot be renamed")
    # InternalTI detects even what FalsePositive lists ...
    value = "http://benign-but-listed.example/other"
    assert detections(node, f"url={value}") == []
    assert put_indicators(node, "InternalTI", [{"indicator": value, "context": {"owner": "api"}}]).status == 200
    assert [line.split(" matched")[0] for line in detections(node, f"url={value}")] == ["category=InternalTI"]
    # ... and FalsePositive suppresses feed detections (from API 1.0 on: no flag needed).
    target = "http://malicious.example/p/index.php"
    assert lookup(node, target)[0]["result"] == "detected"
    assert put_indicators(node, "FalsePositive", [{"indicator": target}], version="1.0").status == 200
    assert lookup(node, target)[0] == {"object": target, "result": "false positive", "categories": []}
    assert detections(node, f"url={target}") == []
    for supplier, indicator in (("InternalTI", value), ("FalsePositive", target)):
        reply = api.delete(supplier_path(supplier) + "/indicators", [{"indicator": indicator}])
        assert reply.status == 200 and reply.json()[0]["deleted"] == 1, reply
    assert lookup(node, target)[0]["result"] == "detected"
    assert detections(node, f"url={value}") == []


def test_false_positive_marking_needs_api_1_2(node: Node) -> None:
    name = "FP Marker"
    target = "http://mixed.example/Login"
    event = f"url={target}"
    add_supplier(node, name)
    try:
        assert categories(lookup(node, target)[0]) == ["Malicious_URL"]
        assert len(detections(node, event)) == 1
        # 1.1: refused item by item
        reply = put_indicators(node, name, [{"indicator": target, "false_positive": True}])
        assert_error(reply, 400, "needs API version 1.2")
        reply = put_indicators(
            node, name, [{"indicator": target, "false_positive": True}, {"indicator": "fp-ok.example"}]
        )
        assert reply.status == 202, reply
        assert reply.json()[0]["rejected"] == [
            {"index": 0, "indicator": target, "error": "false_positive marking needs API version 1.2"}
        ]
        assert indicator_count(node, name) == 1
        assert categories(lookup(node, target)[0]) == ["Malicious_URL"]
        # 1.2: the mark suppresses the feed detection in lookups and in event matching
        reply = put_indicators(node, name, [{"indicator": target, "false_positive": True}], version="1.2")
        assert reply.status == 200, reply
        assert lookup(node, target, version="1.2")[0] == {
            "object": target,
            "result": "false positive",
            "categories": [],
        }
        assert detections(node, event) == []
        # unmarking (same indicator, false_positive false) detects again
        reply = put_indicators(node, name, [{"indicator": target, "false_positive": False}], version="1.2")
        assert reply.status == 200, reply
        assert sorted(line.split(" matched")[0] for line in detections(node, event)) == [
            "category=FP Marker",
            "category=Malicious_URL",
        ]
    finally:
        node.api.delete(supplier_path(name))
    assert categories(lookup(node, target)[0]) == ["Malicious_URL"]


def test_tags(node: Node) -> None:
    api = node.api
    reply = api.post("/api/1.1/tags", [{"name": "Tag One", "description": "first", "weight": 10}])
    assert reply.status == 201 and reply.json() == [{"name": "Tag One", "description": "first", "weight": 10}], reply
    assert_error(api.post("/api/1.1/tags", {"name": "Tag One"}), 409, "already exists")
    assert api.get("/api/1.1/tags/Tag%20One").json() == [{"name": "Tag One", "description": "first", "weight": 10}]
    reply = api.put("/api/1.1/tags/tag-two", {"weight": 5})
    assert reply.status == 201 and reply.json() == [{"name": "tag-two", "description": "", "weight": 5}], reply
    reply = api.put("/api/1.1/tags/tag-two", [{"description": "second"}])
    assert reply.status == 200 and reply.json() == [{"name": "tag-two", "description": "second", "weight": 5}], reply
    assert_error(api.put("/api/1.1/tags/tag-two", {"name": "tag-three"}), 400, "cannot be renamed")
    listed = api.get("/api/1.1/tags").json()
    assert {"name": "Tag One", "description": "first", "weight": 10} in listed
    assert [t["name"] for t in listed] == sorted(t["name"] for t in listed)

    add_supplier(node, "Tagged Supplier")
    reply = put_indicators(
        node, "Tagged Supplier", [{"indicator": "http://tagged.example/x", "tags": ["Tag One", "tag-two"]}]
    )
    assert reply.status == 200, reply
    assert detections(node, "url=http://tagged.example/x")[0].endswith("tags=Tag One,tag-two supplier=Tagged Supplier")
    # Deleting a tag removes it from every indicator, at once.
    reply = api.delete("/api/1.1/tags/Tag%20One")
    assert reply.status == 200 and reply.json() == [{"status": "tag Tag One deleted"}], reply
    assert detections(node, "url=http://tagged.example/x")[0].endswith("tags=tag-two supplier=Tagged Supplier")
    assert_error(api.get("/api/1.1/tags/Tag%20One"), 404, "does not exist")
    assert_error(api.delete("/api/1.1/tags/Tag%20One"), 404, "does not exist")
    assert "Tag One" not in [t["name"] for t in api.get("/api/1.1/tags").json()]


def test_path_tricks_that_resolve(node: Node) -> None:
    api = node.api
    add_supplier(node, "My Supplier")
    assert api.get("/api/1.1/suppliers/My%20Supplier").json()[0]["name"] == "My Supplier"
    reply = api.put("/api/1.1/suppliers/My%20Supplier/indicators", [{"indicator": "http://my-supplier.example/"}])
    assert reply.status == 200, reply
    assert detections(node, "url=http://my-supplier.example/")[0].startswith("category=My Supplier ")
    for target in (
        "//api//1.1//suppliers//My%20Supplier",
        "/api/1.1/./suppliers/My%20Supplier/",
        "/api/1.1/suppliers/x/../My%20Supplier",
        "/api/1.1/suppliers/x/%2e%2e/My%20Supplier",
        "/api/1.1/suppliers/My%20Supplier?x=../../y",
        "/api/1.1/suppliers/My%20Supplier#fragment",
        "/api/1.1/suppliers/My Supplier".replace(" ", "%20").replace("S", "%53"),
        "/%61pi/1.1/suppliers/My%20Supplier",
    ):
        reply = api.get(target)
        assert reply.status == 200 and reply.json()[0]["name"] == "My Supplier", (target, reply)
    assert api.get("//api//1.1//suppliers").status == 200
    assert api.delete("/api/1.1/suppliers/My%20Supplier").status == 200


# -- bad input: documented status and body, nothing stored, the node keeps serving ------------------


def _send(method: str, target: str, body: Any = None, **kwargs: Any) -> Callable[[Node], Reply]:
    return lambda node: node.api.request(method, target, body, **kwargs)


def _raw(data: bytes) -> Callable[[Node], Reply]:
    return lambda node: node.api.raw(data)


def _too_long_declared(node: Node) -> Reply:
    """Content-Length over the limit and only a few bytes: the answer comes at once, unread body or not."""
    head = request_bytes("PUT", "/api/1.1/suppliers/Guard/indicators", headers=(f"Content-Length: {MAX_BODY + 1}",))
    with node.api.connect(timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(head + b'[{"indicator": "http://guard-413.example/"}')
        reply = read_reply(sock)
        assert time.monotonic() - started < 3
    assert reply.headers["connection"] == "close"  # the unread rest is never parsed as a request
    return reply


def _too_long_chunked(node: Node) -> Reply:
    """A chunked body that grows past the limit: read up to the limit, then 413."""
    head = request_bytes("PUT", "/api/1.1/suppliers/Guard/indicators", headers=("Transfer-Encoding: chunked",))
    chunk = b"%x\r\n" % (1 << 20) + b" " * (1 << 20) + b"\r\n"
    with node.api.connect(timeout=10) as sock:
        sock.sendall(head + b"1\r\n[\r\n")
        try:
            for _ in range(MAX_BODY // len(chunk) + 2):
                sock.sendall(chunk)
            sock.sendall(b"1\r\n]\r\n0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node answered and closed while we were still sending
        return read_reply(sock)


def _many_headers(node: Node) -> Reply:
    headers = tuple(f"X-Header-{i}: {i}" for i in range(200))
    return node.api.raw(request_bytes("GET", "/api/1.1/suppliers", headers=headers))


DEEP = b"[" * 100_000 + b"]" * 100_000
LOOKUP = "/api/1.1/lookup"
GUARD = "/api/1.1/suppliers/Guard"

BAD_INPUT: list[tuple[str, Callable[[Node], Reply], int, str]] = [
    # lookup bodies
    ("malformed-json", _send("POST", LOOKUP, b'[{"object": "x"'), 400, "not valid JSON"),
    ("object-not-string", _send("POST", LOOKUP, [{"object": 1}]), 400, 'item 0: expected {"object": "<string>"}'),
    ("object-null", _send("POST", LOOKUP, [{"object": None}]), 400, "item 0"),
    ("extra-key", _send("POST", LOOKUP, [{"object": "x", "y": 1}]), 400, "item 0"),
    ("not-an-array", _send("POST", LOOKUP, {"object": "x"}), 400, "non-empty JSON array"),
    ("empty-array", _send("POST", LOOKUP, []), 400, "non-empty JSON array"),
    ("item-not-object", _send("POST", LOOKUP, ["http://fakess123.nu"]), 400, "item 0"),
    ("json-null", _send("POST", LOOKUP, b"null"), 400, "non-empty JSON array"),
    ("empty-body", _send("POST", LOOKUP, b""), 400, "empty request body"),
    ("invalid-utf8", _send("POST", LOOKUP, b'[{"object": "\xff\xfe"}]'), 400, "not valid UTF-8"),
    ("utf16", _send("POST", LOOKUP, '[{"object": "x"}]'.encode("utf-16")), 400, "not valid UTF-8"),
    ("encoded-surrogate", _send("POST", LOOKUP, b'[{"object": "\xed\xa0\x80"}]'), 400, "not valid UTF-8"),
    ("escaped-surrogate", _send("POST", LOOKUP, b'[{"object": "\\ud800"}]'), 400, "surrogate"),
    ("deep-nesting", _send("POST", LOOKUP, DEEP), 400, "not valid JSON"),
    ("trailing-garbage", _send("POST", LOOKUP, b'[{"object": "x"}] x'), 400, "not valid JSON"),
    # supplier and indicator bodies
    ("put-indicators-object", _send("PUT", GUARD + "/indicators", {"indicator": "a.example"}), 400, "array"),
    ("put-indicators-empty", _send("PUT", GUARD + "/indicators", []), 400, "non-empty JSON array"),
    ("put-indicators-wrong-type", _send("PUT", GUARD + "/indicators", [{"indicator": 5}]), 400, "no indicator stored"),
    (
        "put-indicators-bad-flag",
        _send("PUT", "/api/1.2/suppliers/Guard/indicators", [{"indicator": "a.example", "false_positive": "yes"}]),
        400,
        "false_positive must be true or false",
    ),
    (
        "put-indicators-surrogate",
        _send("PUT", GUARD + "/indicators", b'[{"indicator": "http://a.example/\\udc00"}]'),
        400,
        "surrogate",
    ),
    ("put-indicators-unknown-supplier", _send("PUT", GUARD + "x/indicators", [{"indicator": "a.example"}]), 404, ""),
    ("delete-indicators-wrong-type", _send("DELETE", GUARD + "/indicators", [{"indicator": 5}]), 400, "item 0"),
    ("delete-indicators-empty", _send("DELETE", GUARD + "/indicators", []), 400, "non-empty JSON array"),
    ("supplier-name-type", _send("POST", "/api/1.1/suppliers", [{"name": 5}]), 400, "name"),
    ("supplier-name-newline", _send("POST", "/api/1.1/suppliers", [{"name": "evil\n"}]), 400, "must not"),
    ("supplier-name-slash", _send("POST", "/api/1.1/suppliers", [{"name": "a/b"}]), 400, "must not"),
    ("supplier-two-objects", _send("POST", "/api/1.1/suppliers", [{"name": "a"}, {"name": "b"}]), 400, "JSON object"),
    ("supplier-confidence-type", _send("POST", "/api/1.1/suppliers", {"name": "N", "confidence": "high"}), 400, ""),
    ("supplier-unknown-field", _send("POST", "/api/1.1/suppliers", {"name": "N", "id": 3}), 400, "unknown"),
    ("supplier-vendor-surrogate", _send("POST", "/api/1.1/suppliers", b'{"name": "N", "vendor": "\\ud800"}'), 400, ""),
    ("supplier-exists", _send("POST", "/api/1.1/suppliers", {"name": "Guard"}), 409, "already exists"),
    ("supplier-rename-taken", _send("PUT", GUARD, {"name": "InternalTI"}), 409, "already exists"),
    ("supplier-update-type", _send("PUT", GUARD, {"status": "paused"}), 400, "enabled or disabled"),
    ("builtin-rename", _send("PUT", "/api/1.1/suppliers/InternalTI", {"name": "X"}), 403, "cannot be renamed"),
    ("builtin-delete", _send("DELETE", "/api/1.1/suppliers/FalsePositive"), 403, "cannot be deleted"),
    ("unknown-supplier-delete", _send("DELETE", "/api/1.1/suppliers/Nobody"), 404, "does not exist"),
    ("tag-missing-name", _send("POST", "/api/1.1/tags", {"weight": 1}), 400, "missing tag name"),
    ("tag-weight", _send("POST", "/api/1.1/tags", {"name": "t", "weight": 101}), 400, "weight"),
    ("tag-rename", _send("PUT", "/api/1.1/tags/guard-tag", {"name": "other"}), 400, "cannot be renamed"),
    ("tag-exists", _send("POST", "/api/1.1/tags", {"name": "guard-tag"}), 409, "already exists"),
    # paths
    ("dot-dot", _send("GET", "/api/1.1/suppliers/../x"), 404, "unsupported request"),
    ("dot-dot-encoded", _send("GET", "/api/1.1/suppliers/%2e%2e/x"), 404, "unsupported request"),
    ("dot-dot-delete", _send("DELETE", "/api/1.1/suppliers/Guard/.."), 405, "not allowed"),
    ("encoded-slash", _send("GET", "/api/1.1/suppliers/a%2Fb"), 400, "must not"),
    ("encoded-slash-climb", _send("DELETE", "/api/1.1/suppliers/..%2F..%2FGuard"), 400, "must not"),
    ("bad-escape", _send("GET", "/api/1.1/suppliers/%zz"), 400, "malformed %-escape"),
    ("bad-utf8-path", _send("GET", "/api/1.1/suppliers/%ff"), 400, "not UTF-8"),
    ("nul-in-path", _send("DELETE", "/api/1.1/suppliers/Guard%00"), 400, "control character"),
    ("newline-in-path", _send("DELETE", "/api/1.1/suppliers/Guard%0a"), 400, "control character"),
    ("absolute-form", _send("GET", "https://127.0.0.1/api/1.1/suppliers"), 400, "not an absolute path"),
    ("asterisk-form", _raw(request_bytes("OPTIONS", "*", headers=("Connection: close",))), 400, "absolute path"),
    # HTTP itself
    ("too-many-headers", _many_headers, 400, "malformed HTTP request"),
    (
        "header-too-long",
        _raw(request_bytes("GET", "/api/1.1/tags", headers=("X-Long: " + "a" * 9000,))),
        400,
        "malformed HTTP request: a request line or header field longer than 8190 bytes",
    ),
    (
        "request-line-too-long",
        _raw(request_bytes("GET", "/" + "a" * 9000)),
        400,
        "malformed HTTP request: a request line or header field longer than 8190 bytes",
    ),
    ("bad-request-line", _raw(b"GARBAGE\r\n\r\n"), 400, "malformed HTTP request: Invalid method encountered"),
    ("bad-content-length", _raw(request_bytes("POST", LOOKUP, headers=("Content-Length: abc",))), 400, "malformed"),
    (
        "content-length-and-chunked",
        _raw(request_bytes("POST", LOOKUP, b"0\r\n\r\n", headers=("Content-Length: 5", "Transfer-Encoding: chunked"))),
        400,
        "malformed HTTP request",
    ),
    (
        "bad-chunk-size",
        _raw(request_bytes("POST", LOOKUP, b"zz\r\n[]\r\n0\r\n\r\n", headers=("Transfer-Encoding: chunked",))),
        400,
        "chunk size",
    ),
    (
        "chunk-longer-than-declared",
        _raw(request_bytes("POST", LOOKUP, b"2\r\n[]]]\r\n0\r\n\r\n", headers=("Transfer-Encoding: chunked",))),
        400,
        "malformed HTTP request",
    ),
    ("declared-body-over-64mib", _too_long_declared, 413, "over the 67108864 byte limit"),
    ("chunked-body-over-64mib", _too_long_chunked, 413, "over the 67108864 byte limit"),
]


@pytest.fixture(scope="module")
def guard(node: Node) -> None:
    """A supplier, an indicator and a tag that bad requests aim at (and must leave alone)."""
    add_supplier(node, "Guard", confidence=55)
    assert node.api.post("/api/1.1/tags", {"name": "guard-tag"}).status == 201
    reply = put_indicators(node, "Guard", [{"indicator": "http://guard.example/x", "tags": ["guard-tag"]}])
    assert reply.status == 200, reply


@pytest.mark.parametrize(("send", "status", "fragment"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
@pytest.mark.usefixtures("guard")
def test_bad_input_gets_its_status_stores_nothing_and_the_node_keeps_serving(
    node: Node, send: Callable[[Node], Reply], status: int, fragment: str
) -> None:
    before = db_state(node)
    assert_error(send(node), status, fragment)
    assert db_state(node) == before
    assert lookup(node, "http://guard.example/x")[0]["categories"][0]["confidence"] == 55
    assert any(line.startswith("category=Guard ") for line in detections(node, "url=http://guard.example/x"))
    assert node.proc.proc.poll() is None


def test_bad_input_is_counted(node: Node) -> None:
    reasons = ("api_invalid_body", "api_bad_path", "api_unauthorized", "api_body_too_large", "api_malformed_request")

    def counters() -> dict[str, float]:
        out = {r: metric(node, "threatgate_bad_input_total", f'reason="{r}"') for r in reasons}
        for status in ("200", "400", "401", "413"):
            out[status] = metric(node, "threatgate_api_requests_total", f'status="{status}"')
        return out

    before = counters()
    node.api.post(LOOKUP, b"[")
    node.api.get("/api/1.1/suppliers/%zz")
    node.api.get("/api/1.1/suppliers", auth=None)
    _too_long_declared(node)
    node.api.raw(b"GARBAGE\r\n\r\n")
    lookup(node, "x")
    after = counters()
    for key in reasons:
        assert after[key] >= before[key] + 1, key
    assert after["400"] >= before["400"] + 2  # the parser's 400 is answered before the API sees it
    assert after["401"] >= before["401"] + 1
    assert after["413"] >= before["413"] + 1
    assert after["200"] >= before["200"] + 1
    assert metric(node, "threatgate_api_lookup_objects_total") >= 1


# -- IoC exports ------------------------------------------------------------------------------------


def test_ioc_export_csv(node: Node) -> None:
    reply = node.api.get("/ioc_exports/malicious_urls", auth=(EXPORTER, EXPORT_PASSWORD))
    assert reply.status == 200, reply
    assert reply.headers["content-type"] == "text/csv; charset=utf-8"
    assert reply.headers["content-disposition"] == "attachment;filename=malicious_urls.csv"
    assert reply.body.decode() == EXPECTED_URL_EXPORT


def test_ioc_export_credentials_and_errors(node: Node) -> None:
    api = node.api
    # The task has its own user: the API users do not get in, nor does anyone without credentials.
    for auth in ((USER, PASSWORD), None, (EXPORTER, "wrong")):
        reply = api.get("/ioc_exports/malicious_urls", auth=auth)
        assert_error(reply, 401, "authentication required")
        assert reply.headers["www-authenticate"] == 'Basic realm="threatgate"'
    assert_error(api.get("/ioc_exports/nope", auth=None), 401)  # credentials first: no task names leak
    assert_error(api.get("/ioc_exports/nope"), 404, "no enabled export task 'nope'")
    assert_error(api.get("/ioc_exports"), 404)
    assert_error(api.get("/ioc_exports/malicious_urls/x"), 404)
    reply = api.post("/ioc_exports/malicious_urls", b"", auth=(EXPORTER, EXPORT_PASSWORD))
    assert_error(reply, 405, "allowed: GET")
    assert reply.headers["allow"] == "GET"
    # the exporter is not an API user
    assert_error(api.get("/api/1.1/suppliers", auth=(EXPORTER, EXPORT_PASSWORD)), 401)
    assert api.get("//ioc_exports/./malicious_urls", auth=(EXPORTER, EXPORT_PASSWORD)).status == 200


def test_ioc_export_follows_pushes(node: Node) -> None:
    api = node.api
    header = "#indicator,category,source,threat\n"
    assert api.get("/ioc_exports/api_pushed").body.decode() == header
    add_supplier(node, "Export Supplier")
    reply = put_indicators(
        node, "Export Supplier", [{"indicator": "http://export.example/a", "context": {"threat": "T1"}}]
    )
    assert reply.status == 200, reply
    body = api.get("/ioc_exports/api_pushed").body.decode()  # update_frequency 0: regenerated after the push
    assert body == header + '"http://export.example/a","Export Supplier","Export Supplier","T1"\n'
    assert api.delete(supplier_path("Export Supplier")).status == 200
    assert api.get("/ioc_exports/api_pushed").body.decode() == header


def test_ioc_export_leaves_out_false_positive_marks(node: Node) -> None:
    add_supplier(node, "Export Supplier")
    try:
        reply = put_indicators(
            node,
            "Export Supplier",
            [
                {"indicator": "http://export.example/b"},
                {"indicator": "http://fp-export.example/x"},  # suppressed by the mark below: never detected
                {"indicator": "fp-export.example", "false_positive": True},
            ],
            version="1.2",
        )
        assert reply.status == 200, reply
        assert lookup(node, "http://fp-export.example/x")[0]["result"] == "false positive"
        body = node.api.get("/ioc_exports/api_pushed").body.decode()
        assert "export.example/b" in body
        assert "fp-export.example" not in body  # neither the mark nor what it suppresses
    finally:
        node.api.delete(supplier_path("Export Supplier"))


# -- TLS material, persistence across restarts ------------------------------------------------------


def test_tls_pair_and_api_state_survive_restarts(tmp_path: Path, hashes: dict[str, str]) -> None:
    config, _, _, _ = write_config(tmp_path, hashes)
    cert, key = tmp_path / "certs" / "node.pem", tmp_path / "certs" / "node.key"
    database = tmp_path / "state" / "node.sqlite3"
    assert not cert.exists() and not key.exists()
    proc = NodeProcess(config)
    try:
        proc.wait_ready()
        created = proc.wait_for_log(
            rf"created self-signed TLS certificate (\S+) \(key (\S+)\) for .*SHA-256 fingerprint ({FINGERPRINT})",
            after=0,
        )
        node = Node(proc, tmp_path, proc.port, proc.api_port, proc.metrics_port)
        assert (created.group(1), created.group(2)) == (str(cert), str(key))
        assert stat_mode(key) == 0o600
        assert stat_mode(database) == 0o600
        pem = cert.read_text()
        assert created.group(3) == cert_fingerprint(pem)
        with node.api.connect() as sock:
            assert sock.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(pem)

        assert node.api.post("/api/1.1/tags", {"name": "persist-tag", "description": "kept"}).status == 201
        add_supplier(node, "Persist", confidence=42)
        add_supplier(node, "Persist Off")
        reply = put_indicators(
            node,
            "Persist",
            [
                {"indicator": "http://persist.example/x", "context": {"k": "v"}, "tags": ["persist-tag"]},
                {"indicator": "100.64.2.99"},
            ],
        )
        assert reply.status == 200, reply
        assert put_indicators(node, "Persist Off", [{"indicator": "http://persist-off.example/"}]).status == 200
        assert node.api.put(supplier_path("Persist Off"), {"status": "disabled"}).status == 200
        reply = put_indicators(
            node, "Persist", [{"indicator": "http://mixed.example/Login", "false_positive": True}], version="1.2"
        )
        assert reply.status == 200, reply
        state = db_state(node)
        # A crash right after the answers: whatever was answered is on disk.
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(10)
    finally:
        proc.stop()

    for previous_stop in ("SIGKILL", "SIGTERM"):
        with running_node(config) as proc:
            node = Node(proc, tmp_path, proc.port, proc.api_port, proc.metrics_port)
            text = proc.log()
            assert "created self-signed" not in text
            loaded = re.search(
                rf"loaded TLS certificate {re.escape(str(cert))} .*SHA-256 fingerprint ({FINGERPRINT})", text
            )
            assert loaded and loaded.group(1) == created.group(3), text
            assert cert.read_text() == pem  # the pair is reused, never replaced
            assert db_state(node) == state, previous_stop
            lines = detections(node, "src=10.0.0.1 dst=100.64.2.99 url=http://persist.example/x")
            assert sorted(lines) == [
                "category=Persist matchedIndicator=100.64.2.99 confidence=42 source=default supplier=Persist",
                "category=Persist matchedIndicator=http://persist.example/x confidence=42 source=default "
                "k=v tags=persist-tag supplier=Persist",
            ]
            assert detections(node, "url=http://persist-off.example/") == []  # still disabled
            assert detections(node, "url=http://mixed.example/Login") == []  # still marked
            assert lookup(node, "http://mixed.example/Login")[0]["result"] == "false positive"
            assert node.api.get("/api/1.1/tags/persist-tag").json()[0]["description"] == "kept"
        assert proc.proc.returncode == 0  # a clean stop


def _half_pair(tmp_path: Path, missing: str) -> tuple[subprocess.CompletedProcess[str], Path, Path, bytes]:
    from threatgate.net.tls import ensure_server_pair

    config = example_config(tmp_path)
    cert, key = tmp_path / "certs" / "node.pem", tmp_path / "certs" / "node.key"
    ensure_server_pair(str(cert), str(key), common_name="test", hosts=["127.0.0.1"])
    gone, kept = (key, cert) if missing == "key" else (cert, key)
    gone.unlink()
    kept_bytes = kept.read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "threatgate", "node", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, gone, kept, kept_bytes


@pytest.mark.parametrize("missing", ["key", "cert"])
def test_half_a_tls_pair_stops_the_node_with_a_clear_message(tmp_path: Path, missing: str) -> None:
    result, gone, kept, kept_bytes = _half_pair(tmp_path, missing)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output  # a configuration problem
    assert "Traceback" not in output, output
    what = "private key" if missing == "key" else "certificate"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"threatgate: cannot start: TLS {what} {gone} is missing"), output
    assert "REST API listening" not in output and "node listening" not in output
    assert not gone.exists()  # never "repaired" behind the operator's back
    assert kept.read_bytes() == kept_bytes


# -- 425 while feeds load, 429 over ScannersCount -------------------------------------------------


BIG_FEED_RECORDS = 300_000
"""Enough URL records that loading takes a few seconds, so the API is up while feeds still load."""


def test_425_while_feeds_are_loading(tmp_path: Path, hashes: dict[str, str]) -> None:
    # Ports named in the config: the API is used before READY, and the event port must refuse until then.
    config, port, api_port, metrics_port = write_config(tmp_path, hashes, ports=(free_port(), free_port(), free_port()))
    (tmp_path / "feeds" / "big.json").write_text(
        "[" + ",".join(f'{{"url":"http://h{i}.big.example/p"}}' for i in range(BIG_FEED_RECORDS)) + "]"
    )
    text = config.read_text()
    config.write_text(text.replace("</Feeds>", '<Feed filename="feeds/big.json" category="Big"/></Feeds>', 1))
    proc = NodeProcess(config, port)
    try:
        proc.wait_for_log(r"REST API listening")
        node = Node(proc, tmp_path, port, api_port, metrics_port)
        api = node.api
        reply = api.post(LOOKUP, [{"object": "http://fakess123.nu"}])
        assert_error(reply, 425, "feeds are still loading")
        assert reply.headers["retry-after"] == "1"
        with pytest.raises(ConnectionRefusedError):  # events are accepted only once feeds are loaded
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert_error(api.get("/api/1.1/suppliers"), 425)
        assert_error(api.put("/api/1.1/suppliers/InternalTI/indicators", [{"indicator": "a.example"}]), 425)
        assert_error(api.get("/ioc_exports/malicious_urls"), 425)
        assert "node listening for events" not in proc.log()  # all of that was during loading
        # the checks before it come first (whether loading or not)
        assert_error(api.post(LOOKUP, [{"object": "x"}], auth=None), 401)
        assert_error(api.post("/api/8.0/lookup", [{"object": "x"}]), 404)
        assert_error(api.get(LOOKUP), 405)

        proc.wait_ready(timeout=60)
        result = lookup(node, "http://fakess123.nu", "http://h123.big.example/p")
        assert [r["result"] for r in result] == ["detected", "detected"]
        assert api.get("/api/1.1/suppliers/InternalTI").json()[0]["indicators"] == 0  # the 425 stored nothing
    finally:
        proc.stop()


def test_429_when_more_requests_than_scanners(tmp_path: Path, hashes: dict[str, str]) -> None:
    with api_node(tmp_path, hashes, scanners=1) as node:
        api = node.api
        body = json.dumps([{"object": "http://fakess123.nu"}]).encode()
        with api.connect() as held:
            # One request in progress (its body half sent) holds the only scanner ...
            held.sendall(request_bytes("POST", LOOKUP, headers=(f"Content-Length: {len(body)}",)) + body[:10])
            deadline = time.monotonic() + 10
            while True:
                reply = api.get("/api/1.1/suppliers")
                if reply.status == 429 or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            # ... so the next one is told to come back.
            assert_error(reply, 429, "too many requests in progress")
            assert reply.headers["retry-after"] == "1"
            assert_error(api.get("/api/1.1/suppliers", auth=None), 401)  # credentials are checked first
            assert_error(api.get("/api/1.1/nothing"), 404)
            # The held request, finished, is answered normally.
            held.sendall(body[10:])
            reply = read_reply(held)
            assert reply.status == 200 and reply.json()[0]["result"] == "detected", reply
        assert api.get("/api/1.1/suppliers").status == 200
        assert "more API requests than ScannersCount (1); answering 429" in node.log()
        # A client that disconnects mid-body gives its scanner back.
        with api.connect() as quitter:
            quitter.sendall(request_bytes("POST", LOOKUP, headers=(f"Content-Length: {len(body)}",)) + body[:10])
            deadline = time.monotonic() + 10
            while api.get("/api/1.1/suppliers").status != 429 and time.monotonic() < deadline:
                time.sleep(0.01)
        deadline = time.monotonic() + 10
        while (status := api.get("/api/1.1/suppliers").status) != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200
        assert lookup(node, "http://fakess123.nu")[0]["result"] == "detected"


# -- slow clients ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_node(tmp_path_factory: pytest.TempPathFactory, hashes: dict[str, str]) -> Iterator[Node]:
    timeouts = (
        "<RequestHeaderTimeout>1</RequestHeaderTimeout>"
        "<RequestBodyTimeout>1</RequestBodyTimeout>"
        "<IdleTimeout>2</IdleTimeout>"
    )
    with api_node(tmp_path_factory.mktemp("slow"), hashes, http_extra=timeouts) as started:
        yield started


def test_header_timeout_drops_a_slow_client(slow_node: Node) -> None:
    with slow_node.api.connect() as sock:
        sock.sendall(b"GET /api/1.1/suppliers HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
        elapsed, received = wait_closed(sock, 5)
    assert 0.5 < elapsed < 3.5
    assert received == b""
    slow_node.proc.wait_for_log(r"request headers not complete within 1 s; connection closed")
    assert slow_node.api.get("/api/1.1/suppliers").status == 200
    assert "Traceback" not in slow_node.log()


def test_header_timeout_is_not_reset_by_dripping_bytes(slow_node: Node) -> None:
    """Slowloris: one byte at a time keeps the connection busy, but the deadline runs from the first byte."""
    request = request_bytes("GET", "/api/1.1/suppliers", headers=("X-Padding: " + "a" * 100,))
    with slow_node.api.connect() as sock:
        started = time.monotonic()
        closed = False
        for byte in request[:-4]:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            sock.settimeout(0.1)
            try:
                if not sock.recv(1):
                    closed = True
                    break
            except TimeoutError:
                pass
            if time.monotonic() - started > 6:
                break
        assert closed, "the node kept a dripping client past its header timeout"
    assert time.monotonic() - started < 3.5
    assert slow_node.api.get("/api/1.1/suppliers").status == 200


def test_body_timeout_answers_408_and_stores_nothing(slow_node: Node) -> None:
    before = db_state(slow_node)
    with slow_node.api.connect() as sock:
        sock.sendall(
            request_bytes("PUT", "/api/1.1/suppliers/InternalTI/indicators", headers=("Content-Length: 100",))
            + b'[{"indicato'
        )
        started = time.monotonic()
        reply = read_reply(sock)
        assert time.monotonic() - started < 3.5
    assert reply.headers["connection"] == "close"
    assert_error(reply, 408, "request body not received within 1 s")
    assert db_state(slow_node) == before
    assert slow_node.api.get("/api/1.1/suppliers").status == 200


def test_idle_connections_are_closed(slow_node: Node) -> None:
    with slow_node.api.connect() as sock:  # TLS done, then silence
        elapsed, received = wait_closed(sock, 6)
    assert elapsed < 4.5 and received == b""
    with socket.create_connection(("127.0.0.1", slow_node.api_port), timeout=6) as raw:  # not even TLS
        started = time.monotonic()
        assert raw.recv(100) == b""
        assert time.monotonic() - started < 3.5
    assert slow_node.api.get("/api/1.1/suppliers").status == 200
