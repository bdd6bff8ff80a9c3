"""node/api.py: the node's REST API driven through its ``APIHost`` port, without a node or sockets.

A stand-in host gives the config, counters, readiness, credentials, a matcher and the supplier database (a
real SQLite file); requests are aiohttp's mocked requests.  What must hold: the checks run in the documented
order with their statuses (400 path, 404 version, 401, 404/405 route, 406, 425, 429, the body's 413/400), so
nothing is stored by a request that fails one; probes answer without credentials and are counted apart;
lookups answer per object; a supplier write reaches the database and the node is told what changed; in a
cluster a write goes through the cluster port and answers its revision as ``ETag``.
The served API (TLS, the real node, every route): tests/integration/test_node_api.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from aiohttp import StreamReader, web
from aiohttp.test_utils import make_mocked_request

from threatgate.config.node import NodeConfig, load_node_config
from threatgate.errors import ClusterError
from threatgate.node.api import NodeAPI, _accepts_json, _base_revision
from threatgate.node.suppliers import SupplierDB
from threatgate.stats import NodeStats, detection_statistics

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GOOD = "Basic good"


@pytest.fixture(scope="module")
def example() -> NodeConfig:
    return load_node_config(str(EXAMPLES / "node.conf"))


class Auth:
    async def authenticate(self, header: str | None) -> str | None:
        return "alice" if header == GOOD else None


class Matcher:
    """Detects ``evil.example``, suppresses ``fp.example``."""

    def lookup_objects(self, objects: list[str]) -> list[tuple[list[Any], int]]:
        hit = SimpleNamespace(
            snapshot=SimpleNamespace(settings=SimpleNamespace(category="C2", name="feed.json", confidence=90)),
            indicator=SimpleNamespace(raw="evil.example"),
            context=(("threat", "x"),),
        )
        return [([hit] if o == "evil.example" else [], int(o == "fp.example")) for o in objects]


class Exports:
    async def handle(self, request: Any, segments: tuple[str, ...]) -> web.StreamResponse:
        return web.json_response({"export": segments[1]})


class Host:
    """What NodeAPI reads of its node: the APIHost port."""

    def __init__(self, config: NodeConfig, db: SupplierDB) -> None:
        self.config = config
        self.stats = NodeStats()
        self.ready = True
        self.auth = Auth()
        self.matcher = Matcher()
        self.exports = Exports()
        self.cluster: Any = None
        self.db = db
        self.applied: list[set[str] | None] = []

    def readiness(self) -> dict[str, Any]:
        return {"ready": self.ready, "role": "standalone"}

    async def statistics(self) -> dict[str, Any]:
        return detection_statistics(self.stats, 1700000000.5)

    async def db_call(self, fn: Callable[[SupplierDB], Any]) -> Any:
        return fn(self.db)

    async def apply_suppliers(self, changed: Collection[str] | None) -> None:
        self.applied.append(None if changed is None else set(changed))


@pytest.fixture
def host(example: NodeConfig, tmp_path: Path) -> Iterator[Host]:
    db = SupplierDB(str(tmp_path / "suppliers.db"))
    try:
        yield Host(example, db)
    finally:
        db.close()


async def ask(
    api: NodeAPI, method: str, path: str, body: object = None, *, auth: str | None = GOOD, **headers: str
) -> tuple[int, Any, web.StreamResponse]:
    """One request through ``api.handle``: (status, decoded JSON body, the response)."""
    if auth is not None:
        headers["Authorization"] = auth
    payload = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers.setdefault("Content-Length", str(len(data)))
        payload.feed_data(data)
    payload.feed_eof()
    request = make_mocked_request(method, path, headers=headers, payload=payload)
    response = await NodeAPI.handle(api, request)
    assert isinstance(response, web.Response) and isinstance(response.body, bytes)
    return response.status, json.loads(response.body) if response.body else None, response


async def test_a_lookup_answers_each_object_and_is_counted(host: Host) -> None:
    api = NodeAPI(host)
    objects = [{"object": o} for o in ("evil.example", "fine.example", "fp.example")]
    status, body, _ = await ask(api, "POST", "/api/1.1/lookup", objects)
    assert status == 200
    assert body == [
        {
            "object": "evil.example",
            "result": "detected",
            "categories": [
                {
                    "category": "C2",
                    "detected_indicator": "evil.example",
                    "context": {"threat": "x"},
                    "feed": "feed.json",
                    "confidence": 90,
                }
            ],
        },
        {"object": "fine.example", "result": "not detected", "categories": []},
        {"object": "fp.example", "result": "false positive", "categories": []},
    ]
    assert (host.stats.lookups, host.stats.lookup_detections, host.stats.api_requests) == (3, 1, {"200": 1})


@pytest.mark.parametrize(
    ("method", "path", "extra", "status", "message"),
    [
        ("GET", "/api/1.1/a%0ab", {}, 400, "control character"),
        ("GET", "/api/9.9/suppliers", {}, 404, "unsupported API version '9.9'"),
        ("GET", "/api/1.1/suppliers", {"auth": None}, 401, "authentication required"),
        ("GET", "/api/1.1/nothing", {}, 404, "unsupported request GET nothing"),
        ("PATCH", "/api/1.1/suppliers", {}, 405, "method PATCH not allowed here; allowed: GET, POST"),
        ("GET", "/api/1.0/tags", {}, 404, "unsupported request"),  # tags came with 1.1
        ("GET", "/api/1.1/suppliers", {"Accept": "text/html"}, 406, "only application/json responses"),
        ("GET", "/elsewhere", {}, 404, "unsupported request GET /elsewhere"),
    ],
)
async def test_each_check_answers_its_documented_status(
    host: Host, method: str, path: str, extra: dict[str, Any], status: int, message: str
) -> None:
    got, body, _ = await ask(NodeAPI(host), method, path, **extra)
    assert got == status and message in body[0]["status"]
    assert host.stats.api_requests == {str(status): 1}


async def test_credentials_are_checked_before_the_route_so_a_stranger_learns_nothing(host: Host) -> None:
    status, _, response = await ask(NodeAPI(host), "PATCH", "/api/1.1/nothing", auth="Basic bad")
    assert status == 401 and response.headers["WWW-Authenticate"] == 'Basic realm="threatgate"'


async def test_a_node_still_loading_answers_425_and_a_full_one_429(host: Host) -> None:
    api = NodeAPI(host)
    host.ready = False
    status, _, response = await ask(api, "GET", "/api/1.1/suppliers")
    assert (status, response.headers["Retry-After"]) == (425, "1")
    host.ready = True
    api.inflight = host.config.service.scanners_count
    status, _, response = await ask(api, "GET", "/api/1.1/suppliers")
    assert (status, response.headers["Retry-After"]) == (429, "1")
    assert host.stats.bad_input == {"api_too_many_requests": 1}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty request body; expected JSON"),
        (b"\xff", "request body is not valid UTF-8"),
        (b"[1,", "request body is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "request body is not valid JSON"),
        (b'[{"object": "\\ud800"}]', "request body holds a \\u escape of an unpaired UTF-16 surrogate"),
        (b"[]", 'expected a non-empty JSON array of {"object": "..."} items'),
        (b'[{"object": 1}]', 'item 0: expected {"object": "<string>"}'),
    ],
)
async def test_a_bad_body_is_400_and_nothing_is_looked_up(host: Host, body: bytes, message: str) -> None:
    status, answer, _ = await ask(NodeAPI(host), "POST", "/api/1.1/lookup", body)
    assert status == 400 and answer[0]["status"].startswith(message)
    assert host.stats.lookups == 0 and host.stats.bad_input == {"api_invalid_body": 1}


async def test_a_body_over_the_limit_is_413_before_it_is_read(host: Host) -> None:
    status, _, response = await ask(NodeAPI(host), "POST", "/api/1.1/lookup", b"[]", **{"Content-Length": str(10**9)})
    assert status == 413 and response.keep_alive is False


async def test_probes_need_no_credentials_and_are_counted_apart(host: Host) -> None:
    api = NodeAPI(host)
    assert (await ask(api, "GET", "/healthz", auth=None))[:2] == (200, {"alive": True})
    host.ready = False
    assert (await ask(api, "GET", "/readyz", auth=None))[:2] == (503, {"ready": False, "role": "standalone"})
    assert (await ask(api, "POST", "/readyz", auth=None))[0] == 405
    assert host.stats.api_probes == {"/healthz": 1, "/readyz": 2} and host.stats.api_requests == {}


async def test_statz_needs_no_credentials_and_answers_the_detection_counters(host: Host) -> None:
    api = NodeAPI(host)
    host.stats.events, host.stats.detections = 10, 3
    host.stats.per_category, host.stats.per_source = {"C2": 2, "Phishing": 1}, {"urls": 3}
    host.stats.top_indicators.update({"evil.example": 2, "bad.example": 1})
    status, body, _ = await ask(api, "GET", "/statz", auth=None)
    assert status == 200
    assert body == {
        "detections": {
            "total": 3,
            "by_category": {"C2": 2, "Phishing": 1},
            "by_source": {"urls": 3},
            "top_indicators": [["evil.example", 2], ["bad.example", 1]],
        },
        "events": 10,
        "since": 1700000000,
    }
    assert (await ask(api, "DELETE", "/statz", auth=None))[0] == 405
    assert host.stats.api_probes == {"/statz": 2} and host.stats.api_requests == {}


async def test_a_supplier_is_added_read_and_deleted_and_the_node_told(host: Host) -> None:
    api = NodeAPI(host)
    status, body, _ = await ask(api, "POST", "/api/1.1/suppliers", [{"name": "ACME", "confidence": 70}])
    assert status == 201 and body[0]["name"] == "ACME" and body[0]["confidence"] == 70
    assert (await ask(api, "POST", "/api/1.1/suppliers", [{"name": "ACME"}]))[0] == 409
    status, body, _ = await ask(api, "GET", "/api/1.1/suppliers/ACME")
    assert status == 200 and body[0]["indicators"] == 0
    assert (await ask(api, "DELETE", "/api/1.1/suppliers/ACME"))[:2] == (200, [{"status": "supplier ACME deleted"}])
    assert (await ask(api, "GET", "/api/1.1/suppliers/ACME"))[0] == 404
    assert host.applied == [{"ACME"}, {"ACME"}]


class Cluster:
    """The cluster agent as a write sees it: runs the write, answers revision 8 (or refuses)."""

    def __init__(self, refuse: ClusterError | None = None) -> None:
        self.bases: list[int | None] = []
        self.refuse = refuse

    async def commit_suppliers(self, base: int | None, write: Callable[[], Any], unchanged: Any = None) -> Any:
        self.bases.append(base)
        if self.refuse is not None:
            raise self.refuse
        return await write(), SimpleNamespace(revision=8)


async def test_in_a_cluster_a_write_goes_through_the_cluster_and_answers_its_revision(host: Host) -> None:
    api = NodeAPI(host)
    host.cluster = Cluster()
    status, _, response = await ask(api, "POST", "/api/1.1/tags", [{"name": "apt"}], **{"If-Match": '"7"'})
    assert (status, response.headers["ETag"], host.cluster.bases) == (201, '"8"', [7])
    status, _, response = await ask(api, "GET", "/api/1.1/tags")  # reads stay local
    assert status == 200 and "ETag" not in response.headers and host.cluster.bases == [7]
    host.cluster = Cluster(ClusterError("not the Control", 503))
    status, body, _ = await ask(api, "DELETE", "/api/1.1/tags/apt")
    assert (status, body) == (503, [{"status": "not the Control"}])
    assert host.stats.bad_input == {"api_cluster_refused": 1}


def test_if_match_names_a_revision_or_anything() -> None:
    assert [_base_revision(v) for v in (None, "*", '"12"', 'W/"3"', "4")] == [None, None, 12, 3, 4]
    with pytest.raises(ClusterError, match="If-Match must name a settings revision") as bad:
        _base_revision('"abc"')
    assert bad.value.status == 400


def test_accept_allows_json_in_any_of_its_spellings() -> None:
    assert _accepts_json(None) and _accepts_json("") and _accepts_json("text/html, application/json;q=0.9")
    assert _accepts_json("*/*") and _accepts_json("application/*")
    assert not _accepts_json("text/html") and not _accepts_json("application/xml")


async def test_exports_and_the_openapi_document_are_answered_too(host: Host) -> None:
    api = NodeAPI(host)
    assert (await ask(api, "GET", "/ioc_exports/task1"))[:2] == (200, {"export": "task1"})
    status, document, _ = await ask(api, "GET", "/api/openapi.json")
    assert status == 200 and document["openapi"] == "3.0.3"
    assert (await ask(api, "GET", "/api/openapi.json", auth=None))[0] == 401
