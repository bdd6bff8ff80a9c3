"""The node's REST API (CyberTrace-compatible): lookup, suppliers, indicators, tags, IoC exports.

Request checks run in a fixed order, each with its documented status, so a client always learns
the first thing that is wrong and nothing is stored by a request that fails any of them:

1. the request target normalises (:mod:`threatgate.wire.paths`)      400
2. the API version exists                                            404
3. credentials (HTTP Basic, see :mod:`threatgate.node.auth`)          401
4. the request exists (404), for this method (405), in this version (404)
5. ``Accept`` allows JSON                                            406
6. feeds have finished loading                                       425
7. fewer requests in progress than ScannersCount                     429
8. the body: size (413), read in time (408), JSON (400), shape (400)

Routes are data (:data:`threatgate.node.routes.ROUTES`); the OpenAPI document is generated from the
same table (:mod:`threatgate.node.openapi`), so the two cannot drift apart. What the API needs of its
node is the narrow :class:`APIHost` port, not the node service itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson
from aiohttp import web
from aiohttp.web_request import BaseRequest

from threatgate.config.node import MAX_BODY_SIZE, NodeConfig
from threatgate.errors import ClusterError, PathError, RequestError
from threatgate.log import RateLimitedLog
from threatgate.net.body import read_body
from threatgate.net.http import json_error, unauthorized
from threatgate.node import suppliers as sup
from threatgate.node.auth import Authenticator
from threatgate.node.matcher import Hit
from threatgate.node.routes import ROUTES, VERSIONS, Route
from threatgate.stats import NodeStats
from threatgate.wire.paths import api_version, normalize_path

log = logging.getLogger("threatgate.api")

JSON_TYPES = ("application/json", "application/*", "*/*")
PROBES = (("healthz",), ("readyz",), ("statz",))
"""The unauthenticated liveness, readiness and statistics paths (normalised segments), counted apart from
user requests: what a load balancer polls."""
PATH_CACHE_SIZE = 1024

Result = tuple[int, Any]
RouteHandler = Callable[["Call"], Awaitable[Result]]
T = TypeVar("T")


class ObjectLookup(Protocol):
    """The matcher as the lookup route uses it."""

    def lookup_objects(self, objects: list[str]) -> list[tuple[list[Hit], int]]: ...


class Revision(Protocol):
    """The settings revision a cluster write produced (its ``ETag``)."""

    @property
    def revision(self) -> int: ...


class SupplierCommitter(Protocol):
    """The cluster agent as a REST write sees it: run the write on the Control, publish the result."""

    async def commit_suppliers(
        self,
        base: int | None,
        write: Callable[[], Awaitable[Any]],
        unchanged: Callable[[Any], bool] | None = None,
    ) -> tuple[Any, Revision]: ...


class ExportHandler(Protocol):
    """Answers ``/ioc_exports/...`` (:class:`threatgate.node.exports.Exports`)."""

    async def handle(self, request: BaseRequest, segments: tuple[str, ...]) -> web.StreamResponse: ...


class APIHost(Protocol):
    """What :class:`NodeAPI` reads and calls of its node (``NodeService`` is one).

    Read through at every request, never copied: a reload replaces the config, the matcher and the
    export tasks. Properties, so that the node's own attribute types may be narrower.
    """

    @property
    def config(self) -> NodeConfig: ...
    @property
    def stats(self) -> NodeStats: ...
    @property
    def ready(self) -> bool: ...
    @property
    def auth(self) -> Authenticator: ...
    @property
    def matcher(self) -> ObjectLookup: ...
    @property
    def exports(self) -> ExportHandler: ...
    @property
    def cluster(self) -> SupplierCommitter | None: ...
    def readiness(self) -> dict[str, Any]: ...
    async def statistics(self) -> dict[str, Any]: ...
    async def db_call(self, fn: Callable[[sup.SupplierDB], T]) -> T: ...
    async def apply_suppliers(self, changed: Collection[str] | None) -> None: ...


@dataclass(slots=True)
class Call:
    """One authenticated, routed request."""

    request: BaseRequest
    version: int
    params: dict[str, str]
    body: Any = None


def _status(message: str) -> list[dict[str, str]]:
    return [{"status": message}]


class NodeAPI:
    """Answers HTTP requests for one node."""

    def __init__(self, node: APIHost) -> None:
        self.node = node
        self.inflight = 0
        self.warn = RateLimitedLog(log)
        self._handlers: dict[str, RouteHandler] = {r.name: getattr(self, "_" + r.name) for r in ROUTES}
        self._openapi: bytes | None = None
        self._paths: dict[str, tuple[str, ...]] = {}  # raw target -> normalised segments (clients repeat them)

    def count(self, reason: str) -> None:
        self.node.stats.bump(self.node.stats.bad_input, "api_" + reason)

    # -- entry point --------------------------------------------------------------------------

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        """Answer one request; count it in ``api_requests`` by status, or, a probe, in ``api_probes`` by path.

        Probes are load balancers' polls (a balancer asks every node's ``/readyz`` each health-check
        interval), not user requests: counted apart, they do not drown the requests users send.
        """
        stats = self.node.stats
        segments = self._segments(request.raw_path)
        if isinstance(segments, web.Response):
            response: web.StreamResponse = segments
        elif segments in PROBES:
            stats.bump(stats.api_probes, "/" + segments[0])
            return await self._probe(request, segments[0])
        else:
            response = await self._handle(request, segments)
        stats.bump(stats.api_requests, str(response.status))
        return response

    def _segments(self, raw_path: str) -> tuple[str, ...] | web.Response:
        """The normalised path (cached: clients repeat their paths), or the 400 answer to one that does not."""
        segments = self._paths.get(raw_path)
        if segments is None:
            try:
                segments = normalize_path(raw_path)
            except PathError as exc:
                self.count("bad_path")
                return json_error(400, str(exc))
            if len(self._paths) >= PATH_CACHE_SIZE:
                self._paths.clear()
            self._paths[raw_path] = segments
        return segments

    async def _handle(self, request: BaseRequest, segments: tuple[str, ...]) -> web.StreamResponse:
        if segments[:1] == ("ioc_exports",):
            return await self.node.exports.handle(request, segments)
        if segments == ("api", "openapi.json"):
            return await self._openapi_json(request) if await self._authenticated(request) else unauthorized()
        if len(segments) < 2 or segments[0] != "api":
            return json_error(404, f"unsupported request {request.method} {request.path[:200]}")
        version = VERSIONS.get(api_version(segments[1]))
        if version is None:
            return json_error(404, f"unsupported API version {segments[1][:40]!r}; served: {', '.join(VERSIONS)}")
        if not await self._authenticated(request):
            return unauthorized()
        return await self._route(request, version, segments[2:])

    async def _probe(self, request: BaseRequest, which: str) -> web.Response:
        """Unauthenticated liveness (``/healthz``), readiness (``/readyz``) and statistics (``/statz``)
        for load balancers.

        Readiness carries the cluster role, applied revision and digest (no secret: the digest of
        settings reveals nothing an attacker could use), so ``threatgate balancer status`` can flag
        a node whose settings differ from the others'.  Statistics are operational counters and the
        most matched indicators (threat-intelligence values from the feeds, not users' data), as
        ``/metrics`` shows them without credentials too; the balancer sums them over its nodes.
        """
        if request.method not in ("GET", "HEAD"):
            return json_error(405, "method not allowed here; allowed: GET", {"Allow": "GET"})
        if which == "healthz":
            return web.json_response({"alive": True})
        if which == "statz":
            return web.json_response(await self.node.statistics())
        body = self.node.readiness()
        return web.json_response(body, status=200 if body["ready"] else 503)

    async def _authenticated(self, request: BaseRequest) -> bool:
        if await self.node.auth.authenticate(request.headers.get("Authorization")) is not None:
            return True
        self.count("unauthorized")
        return False

    async def _route(self, request: BaseRequest, version: int, rest: tuple[str, ...]) -> web.StreamResponse:
        method = request.method.upper()
        matched: list[tuple[Route, dict[str, str]]] = []
        for route in ROUTES:
            params = route.pattern.match(rest)
            if params is not None and route.since <= version:
                matched.append((route, params))
        if not matched:
            return json_error(404, f"unsupported request {request.method} {'/'.join(rest)[:200]}")
        found = next(((r, p) for r, p in matched if r.method == method), None)
        if found is None:
            allowed = ", ".join(sorted({r.method for r, _ in matched}))
            return json_error(
                405, f"method {request.method[:20]} not allowed here; allowed: {allowed}", {"Allow": allowed}
            )
        route, params = found
        if not _accepts_json(request.headers.get("Accept")):
            return json_error(406, "only application/json responses are available (check the Accept header)")
        if not self.node.ready:
            return json_error(425, "feeds are still loading; retry shortly", {"Retry-After": "1"})
        if self.inflight >= self.node.config.service.scanners_count:
            self.count("too_many_requests")
            self.warn(
                "more API requests than ScannersCount (%d); answering 429", self.node.config.service.scanners_count
            )
            return json_error(429, "too many requests in progress; retry later", {"Retry-After": "1"})
        self.inflight += 1
        try:
            call = Call(request, version, params)
            if route.body is not None:
                error = await self._read_body(call)
                if error is not None:
                    return error
            try:
                handler = self._handlers[route.name]
                headers: dict[str, str] = {}
                cluster = self.node.cluster
                if cluster is not None and method != "GET" and route.name != "lookup":
                    base = _base_revision(request.headers.get("If-Match"))
                    (status, payload), doc = await cluster.commit_suppliers(base, lambda: handler(call))
                    headers["ETag"] = f'"{doc.revision}"'
                else:
                    status, payload = await handler(call)
            except ClusterError as exc:
                self.count("cluster_refused")
                return json_error(exc.status, str(exc))
            except RequestError as exc:
                if exc.status == 400:
                    self.count("invalid_body")
                return json_error(exc.status, str(exc))
            except Exception:
                log.exception("API request %s %s failed", method, request.path[:200])
                return json_error(500, "internal error; see the node's log")
        finally:
            self.inflight -= 1
        return web.Response(status=status, body=_json_bytes(payload), content_type="application/json", headers=headers)

    async def _read_body(self, call: Call) -> web.Response | None:
        timeout = self.node.config.http.body_timeout if self.node.config.http else 60.0
        data = await read_body(call.request, limit=MAX_BODY_SIZE, within=timeout, count=self.count)
        if isinstance(data, web.Response):
            return data
        if not data:
            self.count("invalid_body")
            return json_error(400, "empty request body; expected JSON")
        try:
            # Decoded here, strictly: json.loads(bytes) would also accept UTF-16/32 and UTF-8 surrogates.
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            self.count("invalid_body")
            return json_error(400, "request body is not valid UTF-8")
        try:
            call.body = json.loads(text)
        except RecursionError:
            self.count("invalid_body")
            return json_error(400, "request body is not valid JSON: nested too deeply")
        except ValueError as exc:
            self.count("invalid_body")
            return json_error(400, f"request body is not valid JSON: {exc}")
        if b"\\u" in data and _has_lone_surrogate(call.body):
            self.count("invalid_body")
            return json_error(400, "request body holds a \\u escape of an unpaired UTF-16 surrogate (not valid text)")
        return None

    # -- lookup -------------------------------------------------------------------------------

    async def _lookup(self, call: Call) -> Result:
        body = call.body
        if not isinstance(body, list) or not body:
            raise RequestError('expected a non-empty JSON array of {"object": "..."} items')
        objects: list[str] = []
        for i, item in enumerate(body):
            value = item.get("object") if isinstance(item, dict) else None
            if not isinstance(value, str) or len(item) != 1:
                raise RequestError(f'item {i}: expected {{"object": "<string>"}}')
            objects.append(value)
        matcher = self.node.matcher
        out: list[dict[str, Any]] = []
        detected = 0
        for value, (hits, suppressed) in zip(objects, matcher.lookup_objects(objects), strict=True):
            if hits:
                detected += 1
                out.append({"object": value, "result": "detected", "categories": [_category(h) for h in hits]})
            else:
                out.append(
                    {"object": value, "result": "false positive" if suppressed else "not detected", "categories": []}
                )
        stats = self.node.stats
        stats.lookups += len(objects)
        stats.lookup_detections += detected
        return 200, out

    # -- suppliers ----------------------------------------------------------------------------

    async def _list_suppliers(self, call: Call) -> Result:
        suppliers = await self.node.db_call(lambda db: db.suppliers())
        return 200, [s.summary() for s in suppliers]

    async def _get_supplier(self, call: Call) -> Result:
        name = sup.check_name(call.params["name"])

        def read(db: sup.SupplierDB) -> dict[str, Any]:
            s = db.supplier(name)
            return {**s.details(), "indicators": db.indicator_count(s.id)}

        return 200, [await self.node.db_call(read)]

    async def _add_supplier(self, call: Call) -> Result:
        fields = sup.supplier_fields(call.body, partial=False)
        supplier = await self.node.db_call(lambda db: db.add_supplier(fields))
        await self.node.apply_suppliers({supplier.name})
        log.info("supplier %s added through the API", supplier.name)
        return 201, [supplier.details()]

    async def _update_supplier(self, call: Call) -> Result:
        name = sup.check_name(call.params["name"])
        fields = sup.supplier_fields(call.body, partial=True)
        supplier = await self.node.db_call(lambda db: db.update_supplier(name, fields))
        await self.node.apply_suppliers({name, supplier.name})
        return 200, [supplier.details()]

    async def _delete_supplier(self, call: Call) -> Result:
        name = sup.check_name(call.params["name"])
        await self.node.db_call(lambda db: db.delete_supplier(name))
        await self.node.apply_suppliers({name})
        log.info("supplier %s deleted through the API", name)
        return 200, _status(f"supplier {name} deleted")

    async def _put_indicators(self, call: Call) -> Result:
        name = sup.check_name(call.params["name"])
        pushes, rejected = sup.parse_indicators(call.body, allow_fp=call.version >= 12)
        stored = 0
        if pushes:
            _, stored, more = await self.node.db_call(lambda db: db.put_indicators(name, pushes))
            rejected = sorted(rejected + more, key=lambda r: r.index)
        else:
            await self.node.db_call(lambda db: db.supplier(name))  # 404 before 400 for an unknown supplier
        if not stored:
            self.count("invalid_body")
            first = rejected[0]
            return 400, [
                {"status": f"no indicator stored; item {first.index}: {first.error}", "rejected": _rej(rejected)}
            ]
        await self.node.apply_suppliers({name})
        if rejected:
            self.count("indicators_rejected")
            return 202, [
                {"status": f"{stored} indicator(s) stored, {len(rejected)} rejected", "rejected": _rej(rejected)}
            ]
        return 200, _status(f"{stored} indicator(s) stored")

    async def _delete_indicators(self, call: Call) -> Result:
        name = sup.check_name(call.params["name"])
        indicators = sup.parse_deletions(call.body)
        _, deleted = await self.node.db_call(lambda db: db.delete_indicators(name, indicators))
        if deleted:
            await self.node.apply_suppliers({name})
        return 200, [{"status": f"{deleted} indicator(s) deleted", "deleted": deleted, "requested": len(call.body)}]

    # -- tags ---------------------------------------------------------------------------------

    async def _list_tags(self, call: Call) -> Result:
        return 200, await self.node.db_call(lambda db: db.tags())

    async def _get_tag(self, call: Call) -> Result:
        name = sup.check_name(call.params["tag"], "tag")
        return 200, [await self.node.db_call(lambda db: db.tag(name))]

    async def _add_tag(self, call: Call) -> Result:
        fields = sup.tag_fields(call.body, partial=False)
        return 201, [await self.node.db_call(lambda db: db.add_tag(fields))]

    async def _put_tag(self, call: Call) -> Result:
        name = sup.check_name(call.params["tag"], "tag")
        fields = sup.tag_fields(call.body, partial=True)
        tag, created = await self.node.db_call(lambda db: db.put_tag(name, fields))
        return (201 if created else 200), [tag]

    async def _delete_tag(self, call: Call) -> Result:
        name = sup.check_name(call.params["tag"], "tag")
        changed = await self.node.db_call(lambda db: db.delete_tag(name))
        if changed:
            await self.node.apply_suppliers(changed)
        return 200, _status(f"tag {name} deleted")

    # -- OpenAPI ------------------------------------------------------------------------------

    async def _openapi_json(self, request: BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return json_error(405, "method not allowed here; allowed: GET", {"Allow": "GET"})
        if self._openapi is None:
            from threatgate.node.openapi import openapi_document

            self._openapi = json.dumps(openapi_document(), indent=1).encode()
        return web.Response(body=self._openapi, content_type="application/json")


def _base_revision(value: str | None) -> int | None:
    """``If-Match: "12"``: the settings revision a write starts from (409 when it is no longer current)."""
    if value is None or value.strip() == "*":
        return None
    text = value.strip().removeprefix("W/").strip('"')
    if not text.isdigit() or len(text) > 18:
        raise ClusterError(f'If-Match must name a settings revision like "12", got {value[:40]!r}', 400)
    return int(text)


def _category(hit: Hit) -> dict[str, Any]:
    settings = hit.snapshot.settings
    return {
        "category": settings.category,
        "detected_indicator": hit.indicator.raw,
        "context": dict(hit.context),
        "feed": settings.name,
        "confidence": settings.confidence,
    }


def _rej(rejected: list[sup.Rejected]) -> list[dict[str, Any]]:
    return [r.as_json() for r in rejected[:100]]


def _has_lone_surrogate(value: Any) -> bool:
    """JSON allows ``"\\ud800"`` alone; such a string cannot be stored or sent on as UTF-8."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _json_bytes(payload: Any) -> bytes:
    """The answer's JSON: orjson (a 100-object lookup answer costs a fifth of json's time), else json for
    what orjson refuses (a lone surrogate a client sent in an object, echoed back)."""
    try:
        return orjson.dumps(payload)
    except TypeError:
        return json.dumps(payload, separators=(",", ":")).encode()


def _accepts_json(accept: str | None) -> bool:
    if not accept:
        return True
    for item in accept.split(","):
        media = item.split(";", 1)[0].strip().lower()
        if media in JSON_TYPES:
            return True
    return False
