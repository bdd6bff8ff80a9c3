"""The balancer's REST gateway: HTTPS on api_port, allow-listed, forwarded to nodes with pinned TLS.

Checks, in order (each answer is a JSON body ``[{"status": ...}]``):
1. the request target is a path (absolute-form and malformed targets: 400);
2. it normalises (:mod:`threatgate.wire.paths`: percent-decoding, dot segments, repeated slashes)
   and the method plus normalised path is in ``<AllowedRequests>`` (403 naming both), so no encoding
   trick reaches a request that is not allowed.  ``/api/v.1.1`` and ``/api/1.1`` are one version;
3. fewer requests in progress than the cap (429);
4. the body arrives within the timeout and is at most 64 MiB (408 / 413); it is buffered so a
   retry can replay it.

The operator console (:mod:`threatgate.balancer.console`) is answered here, never forwarded: a request
whose normalised path starts with ``/console`` goes to it after check 1 and before check 2 (so
``<AllowedRequests>`` neither opens nor closes it, and ``/console/../api/...`` is an API request).

Then a read (GET, HEAD, POST lookup) goes to one UP node, balanced by requests in progress, and is
retried on another node when the first fails before answering.  A write (anything else) goes to
every enabled node (503 before any node is touched when one is known to be down; 502 with each
node's result when one fails part-way, logged as drift) unless the nodes' ``/readyz`` answers show a
Control/Secondary cluster (:mod:`threatgate.balancer.readiness`): then to the Control alone, which
distributes it, and 503 when no Control is reachable.  The upstream path is rebuilt from the
normalised segments, so a node receives exactly the request that was allowed.

Every upstream connection is pinned (:mod:`threatgate.balancer.pins`): the pool
(:mod:`threatgate.net.pinned`) checks the SHA-256 of the node's certificate after the handshake and
before sending a byte of the request, and reuses a connection only under the pin it was checked against.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import ssl
import time
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

from aiohttp import web
from aiohttp.web_request import BaseRequest

from threatgate.balancer.pins import Pin, PinStore
from threatgate.balancer.upstream import BalancerView
from threatgate.config.common import Address
from threatgate.config.node import MAX_BODY_SIZE
from threatgate.errors import FileWriteError, PathError, PeerCertificateMismatch, PinMismatch, UpstreamFailed
from threatgate.lb.instances import Instance, InstanceState
from threatgate.log import RateLimitedLog
from threatgate.net.body import read_body
from threatgate.net.describe import body_text, describe
from threatgate.net.gate import gate_for
from threatgate.net.http import HTTPServer, json_error
from threatgate.net.pinned import PinnedPool, client_context
from threatgate.net.tls import ensure_server_pair, fingerprint_sha256, server_context
from threatgate.wire.paths import canonical_version, normalize_path, render_path

log = logging.getLogger("threatgate.gateway")

RECHECK_INTERVAL = 2.0
"""Seconds between looks at the certificates of instances refused for a pin mismatch."""
MISMATCH = (
    "HTTPS connection with the instance has not been established, "
    "since the server certificate does not match the one expected"
)
HOP_BY_HOP = frozenset(
    {
        "connection",
        "expect",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-real-ip",
    }
)
"""Request headers never copied upstream (hop-by-hop per RFC 9110 §7.6.1, and the ones we set).

``Expect: 100-continue`` is answered here (the body is buffered before anything goes upstream); sent on,
it would make the client side wait for a ``100 Continue`` the node never sends, until UpstreamTimeout.
"""
RESPONSE_DROP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server", "date"}
)
READ_METHODS = frozenset({"GET", "HEAD"})
ROUTES_KEPT = 1024
"""Distinct (method, target) verdicts remembered (:meth:`Gateway._route`); past that they start over."""


@dataclass(frozen=True, slots=True)
class Route:
    """The checks' verdict on one (method, request target): normalised segments, allowed, upstream target."""

    segments: tuple[str, ...]
    allowed: bool
    upstream: str  # the path rebuilt from the normalised segments, plus the query as sent
    write: bool


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def is_write(method: str, segments: tuple[str, ...]) -> bool:
    """Writes change a node (fan-out to all); a lookup is a POST that changes nothing."""
    if method in READ_METHODS:
        return False
    return not (method == "POST" and segments[-1:] == ("lookup",))


async def fetch_certificate(host: str, port: int, connect_timeout: float) -> bytes:
    """The DER certificate a TLS server presents (for trust on first use; nothing is sent)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # no verification possible before the pin exists: that is TOFU
    async with asyncio.timeout(connect_timeout):
        _, writer = await asyncio.open_connection(host, port, ssl=ctx)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    finally:
        writer.close()
    if not der:
        raise OSError(f"{host}:{port} presented no certificate")
    return bytes(der)


class WriteTarget(Protocol):
    """Where a write goes (:class:`threatgate.balancer.readiness.WriteRoute`): the Control, every node, or 503."""

    @property
    def control(self) -> str | None: ...
    @property
    def refusal(self) -> str | None: ...


class WriteRouter(Protocol):
    """Decides where a REST write goes (:class:`threatgate.balancer.readiness.ReadinessMonitor`)."""

    async def route_write(self) -> WriteTarget: ...


class ConsoleRoutes(Protocol):
    """The operator console (balancer/console.py ``Console``): answers ``/console/...`` itself."""

    async def handle(self, request: BaseRequest, segments: tuple[str, ...]) -> web.StreamResponse: ...
    def started(self, url: str) -> None: ...
    async def close(self) -> None: ...


class GatewayHost(BalancerView, Protocol):
    """What :class:`Gateway` reads of the balancer (``BalancerService`` is one), at every request."""

    @property
    def rng(self) -> random.Random: ...
    @property
    def readiness(self) -> WriteRouter: ...


class Gateway:
    """HTTPS listener on api_port and the pinned client pool toward the nodes."""

    def __init__(self, service: GatewayHost) -> None:
        self.service = service
        self.pins = PinStore(service.config.cert_dir)
        self.inflight: dict[str, int] = {}  # instance key -> requests in progress
        self.active = 0
        self.warn = RateLimitedLog(log)
        self.http: HTTPServer | None = None
        self._pools: dict[tuple[str, int], PinnedPool] = {}  # (host, api_port) -> its pinned connections
        self._client_tls: ssl.SSLContext | None = None
        self._pin_locks: dict[str, asyncio.Lock] = {}
        self._routes: dict[tuple[str, str], Route] = {}
        self._routes_for: object = None  # the allow-list the remembered routes were decided under
        self.refused: dict[str, str] = {}  # instance key -> why it is out of REST rotation (its pin)
        self._rechecked = 0.0
        self._rechecks: set[asyncio.Task[None]] = set()
        self.console: ConsoleRoutes | None = None  # set by the composition root (balancer/app.py)

    def count(self, reason: str) -> None:
        self.service.stats.bump(self.service.stats.bad_input, "api_" + reason)

    async def start(self) -> None:
        config = self.service.config
        await asyncio.to_thread(
            ensure_server_pair,
            config.cert_path,
            config.key_path,
            common_name=f"threatgate balancer {config.listen_host}",
            hosts=sorted({config.listen_host, "127.0.0.1", "localhost"} - {"0.0.0.0", "::"}),
            client_auth=True,  # also the client certificate the balancer presents to nodes (balancer/lanes_tls.py)
        )
        await self.open_client()
        self.http = HTTPServer(
            self.handle,
            address=config.address(config.api_port),
            gate=gate_for(
                "api",
                stats=self.service.stats,
                log=log,
                handshake_timeout=10.0,
                sources=config.allowed_sources.networks("api"),
                tls=server_context(config.cert_path, config.key_path),
            ),
            header_timeout=10.0,
            idle_timeout=75.0,
            count=self.count,
        )
        await self.http.start()
        log.info("REST gateway listening on https://%s:%d", config.listen_host, self.http.bound_port)
        if self.console is not None:
            self.console.started(f"https://{Address(config.listen_host, self.http.bound_port)}/console/")

    async def open_client(self) -> None:
        """Get ready to open pinned connections to the nodes (one keep-alive pool per node, made on first use)."""
        self._client_tls = client_context()

    def _pool(self, host: str, port: int) -> PinnedPool:
        pool = self._pools.get((host, port))
        if pool is None:
            assert self._client_tls is not None, "open_client() first"
            pool = self._pools[(host, port)] = PinnedPool(host, port, self._client_tls)
        return pool

    async def close(self) -> None:
        for task in list(self._rechecks):
            task.cancel()
        if self.console is not None:
            await self.console.close()  # ends its event streams, which would hold the listener's close
        if self.http is not None:
            await self.http.close()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    # -- requests -----------------------------------------------------------------------------

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        response = await self._handle(request)
        self.service.stats.bump(self.service.stats.api_requests, str(response.status))
        return response

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        method = request.method
        target = request.raw_path
        try:
            route = self._route(method, target)
        except PathError as exc:
            self.count("bad_path")
            return json_error(400, str(exc))
        segments = route.segments
        if segments[:1] == ("console",) and self.console is not None:
            return await self.console.handle(request, segments)
        if not route.allowed:
            self.count("forbidden")
            shown = render_path(segments)[:200]
            self.warn("request %s %s refused by AllowedRequests", method[:20], shown)
            return json_error(403, f"request {method[:20]} {shown} is not allowed by the balancer (AllowedRequests)")
        if self.active >= self.service.config.max_api_requests:
            self.count("too_many_requests")
            return json_error(429, "too many requests in progress at the balancer; retry later", {"Retry-After": "1"})
        self.active += 1
        try:
            body = await read_body(
                request,
                limit=MAX_BODY_SIZE,
                within=self.service.config.api_body_timeout,
                count=self.count,
                late="request body not received in time",
                expect_continue=True,
            )
            if isinstance(body, web.Response):
                return body
            path = route.upstream
            headers = self._upstream_headers(request)
            if route.write:
                to = await self.service.readiness.route_write()
                if to.refusal is not None:
                    self.service.stats.bump(self.service.stats.api_retries, "no_control")
                    return json_error(503, f"write refused, no instance was changed: {to.refusal}")
                if to.control is not None:
                    return await self._to_control(self.service.instances[to.control], method, path, headers, body)
                return await self._fan_out(method, path, headers, body)
            return await self._one(method, path, headers, body)
        finally:
            self.active -= 1

    def _route(self, method: str, target: str) -> Route:
        """What the checks decide about ``method target``, remembered per (method, target) and allow-list.

        Clients repeat the same few requests (``POST /api/1.1/lookup``): normalising, matching the
        allow-list and re-encoding the path once, not per request.  A new allow-list (SIGHUP) starts over.

        Raises:
            PathError: the target does not normalise (never remembered: rare, and counted each time).
        """
        rules = self.service.config.allowed
        if rules is not self._routes_for:
            self._routes.clear()
            self._routes_for = rules
        key = (method, target)
        route = self._routes.get(key)
        if route is None:
            segments = canonical_version(normalize_path(target))
            upstream = "/" + "/".join(quote(s, safe="") for s in segments)
            query = target.partition("?")[2]
            if query:
                upstream += "?" + query
            route = Route(segments, self._allowed(method, segments), upstream, is_write(method, segments))
            if len(self._routes) >= ROUTES_KEPT:
                self._routes.clear()
            self._routes[key] = route
        return route

    def _allowed(self, method: str, segments: tuple[str, ...]) -> bool:
        return any(
            rule.method == method and _match_canonical(rule.pattern.segments, segments)
            for rule in self.service.config.allowed
        )

    @staticmethod
    def _upstream_headers(request: BaseRequest) -> dict[str, str]:
        # Every Connection line counts (a header named in the second one is hop-by-hop too), and a repeated
        # field keeps all its values, in order, on one line (RFC 9110 §5.3): a dict would keep the last only.
        connection_tokens = {
            t.strip().lower() for line in request.headers.getall("Connection", ()) for t in line.split(",")
        }
        headers: dict[str, str] = {}
        spelling: dict[str, str] = {}  # lower-case name -> the name as first sent
        for name, value in request.headers.items():
            low = name.lower()
            if low in HOP_BY_HOP or low in connection_tokens:
                continue
            if low in spelling:
                headers[spelling[low]] += ("; " if low == "cookie" else ", ") + value
            else:
                spelling[low] = name
                headers[name] = value
        remote = request.remote or ""
        previous = ", ".join(request.headers.getall("X-Forwarded-For", ()))
        headers["X-Forwarded-For"] = f"{previous}, {remote}" if previous else remote
        headers["X-Forwarded-Proto"] = "https"
        headers["X-Real-IP"] = remote
        return headers

    # -- reads: one node, retried on another --------------------------------------------------

    def _up(self) -> list[Instance]:
        return [i for i in self.service.instances.values() if i.state is InstanceState.UP and i.settings.enabled]

    async def _one(self, method: str, path: str, headers: dict[str, str], body: bytes) -> web.StreamResponse:
        """A read: the least busy UP instance, the next one when it fails.

        Instances refused for a certificate that does not match their pin come last: only when no
        other could answer (so a request never alternates between 500 and 200), and then the TLS
        handshake checks the pin again before any byte is sent.
        """
        tried: list[str] = []
        self._recheck_refused()
        refused = self.refused
        candidates = sorted(
            self._up(), key=lambda i: (i.key in refused, self.inflight.get(i.key, 0), self.service.rng.random())
        )
        mismatch: PinMismatch[Instance] | None = None
        for inst in candidates:
            try:
                answer = await self.forward(inst, method, path, headers, body)
            except PinMismatch as exc:
                mismatch = mismatch or exc
                continue
            except UpstreamFailed as exc:
                tried.append(f"{inst.key}: {exc}")
                self.service.stats.bump(self.service.stats.api_retries, inst.key)
                continue
            return _response(answer)
        if mismatch is not None:
            return self._mismatch(mismatch)
        detail = "; ".join(tried) if tried else "no instance is UP"
        return json_error(503, f"no instance could answer the request: {detail}")

    # -- writes: the cluster's Control, or every enabled node ----------------------------------

    async def _to_control(
        self, inst: Instance, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> web.StreamResponse:
        """A write in a cluster: the Control alone changes settings and hands them to the Secondaries.

        Never retried on another node: a Secondary would refuse it (409), and a write the Control may
        have applied before the connection broke must not be applied twice.
        """
        try:
            return _response(await self.forward(inst, method, path, headers, body))
        except PinMismatch as exc:
            return self._mismatch(exc)
        except UpstreamFailed as exc:
            self.service.stats.bump(self.service.stats.api_retries, inst.key)
            return json_error(503, f"the Control node {inst.key} did not answer the write: {exc}")

    async def _fan_out(self, method: str, path: str, headers: dict[str, str], body: bytes) -> web.StreamResponse:
        enabled = [i for i in self.service.instances.values() if i.settings.enabled]
        self._recheck_refused()
        down = [i.key for i in enabled if i.state is not InstanceState.UP]
        refused = [i.key for i in enabled if i.key in self.refused]
        if not enabled or down or refused:
            why = (
                f"instance(s) {', '.join(down)} DOWN"
                if down
                else f"instance(s) {', '.join(refused)} refused (certificate does not match the pin)"
                if refused
                else "no enabled instance"
            )
            return json_error(503, f"write refused before any instance was changed: {why}, so nodes would drift apart")
        results = await asyncio.gather(
            *(self._try_forward(i, method, path, headers, body) for i in enabled), return_exceptions=False
        )
        for result in results:
            if isinstance(result, PinMismatch):
                log.error("write %s %s: %s; nodes may have drifted", method, path, result)
        failed = [(i, r) for i, r in zip(enabled, results, strict=True) if not isinstance(r, Answer) or r.status >= 300]
        answers = [r for r in results if isinstance(r, Answer)]
        if not failed:
            return _response(answers[0])
        if len(failed) == len(enabled) and answers and len({(a.status, a.body) for a in answers}) == 1:
            return _response(answers[0])  # every node refused the same way (e.g. 400 or 404): no drift
        report = []
        for inst, result in zip(enabled, results, strict=True):
            if isinstance(result, Answer):
                report.append({"instance": inst.key, "status": result.status, "body": _json_or_text(result.body)})
            else:
                report.append({"instance": inst.key, "status": 0, "error": str(result)})
        log.error(
            "write %s %s reached the nodes unevenly; they have drifted apart: %s",
            method,
            path,
            "; ".join(_outcome(inst.key, result) for inst, result in zip(enabled, results, strict=True)),
        )
        self.service.stats.bump(self.service.stats.api_retries, "drift")
        payload = [
            {"status": "the write succeeded on some instances only; nodes have drifted apart", "results": report}
        ]
        return web.Response(status=502, body=json.dumps(payload).encode(), content_type="application/json")

    async def _try_forward(
        self, inst: Instance, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Answer | Exception:
        try:
            return await self.forward(inst, method, path, headers, body)
        except (PinMismatch, UpstreamFailed) as exc:
            return exc

    # -- one upstream request ---------------------------------------------------------------------

    async def pin_of(self, inst: Instance) -> Pin:
        """The instance's pin, saving the presented certificate on first use."""
        pin = self._cached_pin(inst)
        if pin is not None:
            return pin
        lock = self._pin_locks.setdefault(inst.key, asyncio.Lock())
        async with lock:
            pin = self._cached_pin(inst)  # saved by a request that held the lock before us
            if pin is not None:
                return pin
            try:
                der = await fetch_certificate(inst.settings.host, inst.settings.api_port, 10.0)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                raise UpstreamFailed(f"cannot read its certificate: {describe(exc)}") from None
            try:
                pin = await asyncio.to_thread(self.pins.save, inst.settings, der)
            except FileWriteError as exc:  # CertDirPath not writable: this node cannot be used, the others can
                self.warn("instance %s: cannot save its reference certificate: %s", inst.key, exc)
                raise UpstreamFailed(f"cannot save the reference certificate: {exc}") from None
            log.warning(
                "instance %s: no reference certificate yet; saved the one it presented as %s (SHA-256 %s)",
                inst.key,
                pin.path,
                pin.fingerprint,
            )
            return pin

    def _cached_pin(self, inst: Instance) -> Pin | None:
        try:
            return self.pins.cached(inst.settings)
        except ValueError as exc:  # a damaged pin file
            raise UpstreamFailed(str(exc)) from None
        except OSError as exc:  # CertDirPath unusable (a file, no permission): never taken for "no pin"
            raise UpstreamFailed(f"cannot read the reference certificate: {describe(exc)}") from None

    async def forward(
        self,
        inst: Instance,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        client_timeout: float | None = None,
        *,
        probe: bool = False,
    ) -> Answer:
        """Send one request to ``inst`` over a pinned connection (``client_timeout`` seconds, else UpstreamTimeout).

        ``probe``: the balancer's own ``/readyz`` poll, not a user's request: a pin mismatch it meets
        takes the instance out of REST rotation all the same, but is not counted as a gateway failure.

        Raises:
            PinMismatch: the node presented another certificate (nothing was sent).
            UpstreamFailed: no answer (connect, TLS, timeout, disconnect before the answer).
        """
        pin = self._cached_pin(inst) or await self.pin_of(inst)  # no coroutine when the pin is known
        settings = inst.settings
        pool = self._pool(settings.host, settings.api_port)
        timeout = client_timeout or self.service.config.api_upstream_timeout
        key = inst.key
        inflight = self.inflight
        inflight[key] = inflight.get(key, 0) + 1
        try:
            answer = await pool.request(pin.sha256, method, path, headers, body, timeout)
        except PeerCertificateMismatch as exc:
            mismatch = PinMismatch(inst, pin.fingerprint, _colon(exc.got))
            self._refuse(mismatch, pin, count=not probe)
            raise mismatch from None
        finally:
            inflight[key] -= 1
        if self.refused:
            self._readmit(inst, pin)
        kept = {k: v for k, v in answer.headers if k.lower() not in RESPONSE_DROP}
        return Answer(answer.status, kept, answer.body)

    def _refuse(self, exc: PinMismatch[Instance], pin: Pin, *, count: bool = True) -> None:
        """Take the instance out of REST rotation (logged once per refusal, counted every time but for probes)."""
        inst = exc.instance
        if count:
            self.service.stats.bump(self.service.stats.api_retries, "pin_mismatch")
        why = f"pinned {exc.expected}, presented {exc.got}"
        if self.refused.get(inst.key) == why:
            return
        self.refused[inst.key] = why
        s = inst.settings
        log.error(
            "instance %s port %d: %s (pinned %s SHA-256 %s, presented %s); out of REST rotation until its "
            "certificate matches again or the pin is renewed (threatgate balancer pins --renew %s)",
            s.host,
            s.api_port,
            MISMATCH,
            pin.path,
            exc.expected,
            exc.got,
            inst.key,
        )

    def _readmit(self, inst: Instance, pin: Pin) -> None:
        if self.refused.pop(inst.key, None) is not None:
            log.info(
                "instance %s: certificate matches its pin (SHA-256 %s) again: back in REST rotation",
                inst.key,
                pin.fingerprint,
            )

    def _recheck_refused(self) -> None:
        """Start a look at refused instances' certificates (at most every 2 s), in the background: a user
        request never waits for it.  A renewed pin or a node that presents the pinned certificate again
        brings them back without a request byte sent."""
        if not self.refused or time.monotonic() - self._rechecked < RECHECK_INTERVAL:
            return
        self._rechecked = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._recheck(), name="pin-recheck")
        self._rechecks.add(task)
        task.add_done_callback(self._rechecks.discard)

    async def _recheck(self) -> None:
        for key in list(self.refused):
            inst = self.service.instances.get(key)
            if inst is None:
                self.refused.pop(key, None)
                continue
            try:
                pin = self._cached_pin(inst)
                der = await fetch_certificate(inst.settings.host, inst.settings.api_port, 5.0)
            except (UpstreamFailed, OSError, TimeoutError, ssl.SSLError):
                continue
            if pin is not None and hashlib.sha256(der).digest() == pin.sha256:
                self._readmit(inst, pin)

    def _mismatch(self, exc: PinMismatch[Instance]) -> web.Response:
        s = exc.instance.settings
        payload = [{"status": MISMATCH, "instance": s.host, "port": s.api_port, "matching_port": s.matching_port}]
        return web.Response(status=500, body=json.dumps(payload).encode(), content_type="application/json")


def _match_canonical(pattern: tuple[str, ...], segments: tuple[str, ...]) -> bool:
    pattern = canonical_version(pattern)
    if len(pattern) != len(segments):
        return False
    for want, got in zip(pattern, segments, strict=True):
        if want.startswith("{") and want.endswith("}"):
            if not got:  # a placeholder is one non-empty segment ("/api/v./lookup" has an empty version)
                return False
            continue
        if want != got:
            return False
    return True


def _colon(digest: bytes) -> str:
    return ":".join(f"{b:02X}" for b in digest)


def _outcome(key: str, result: Answer | Exception) -> str:
    """One node's part of a write, for the drift log: ``127.0.0.1:9999 HTTP 409 (why)`` or ``... no answer (why)``."""
    if not isinstance(result, Answer):
        return f"{key} no answer ({result})"
    if result.status < 300:
        return f"{key} HTTP {result.status}"
    return f"{key} HTTP {result.status} ({body_text(result.body)})"


def _json_or_text(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body[:500].decode("utf-8", "replace")


def _response(answer: Answer) -> web.Response:
    return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


__all__ = ["Gateway", "MISMATCH", "fetch_certificate", "fingerprint_sha256", "is_write"]
