"""The operator console: a page, its JSON state and its live updates, served by the REST gateway.

Routes (the gateway hands over every request whose *normalised* path starts with ``/console``, before
``<AllowedRequests>`` is looked at, and never forwards one to a node; ``/console/../api/...``
normalises to ``/api/...`` and is an API request like any other):

- ``GET /console/`` the page (``console_page/index.html``), ``GET /console/<asset>`` its script and style;
- ``GET /console/api/state`` the state as JSON (:func:`threatgate.balancer.console_state.build_state`);
- ``GET /console/api/events`` the same JSON pushed as server-sent events every :data:`PUSH_INTERVAL` s;
- ``POST /console/login`` (form ``user``, ``password``) and ``POST /console/logout``.

Every path needs a login (401 otherwise, the login form for a page, JSON for the rest): a session
cookie from the form, or HTTP Basic with the same users (``<Users>`` of the balancer config).  The
rules (sessions, failed-login limits, cookie attributes) are the sans-IO
:mod:`threatgate.balancer.console_auth`; this module is the asyncio edge.  Passwords are checked by
the node's :class:`~threatgate.node.auth.BasicAuth` (scrypt in a thread, bounded, a success cached),
a form login as the Basic header it amounts to.  The gateway only speaks TLS, so neither the
password nor the cookie ever crosses the network in clear.

The console reaches the balancer through narrow ports (:class:`ConsoleHost` and the parts'
:class:`ReadinessViews`, :class:`PinView`, :class:`AlertLog`), wired in balancer/app.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from importlib import resources
from typing import Any, Protocol, TypeVar

from aiohttp import web
from aiohttp.web_request import BaseRequest

from threatgate.balancer.alerts import AlertRecord
from threatgate.balancer.console_auth import (
    COOKIE_PATH,
    LoginLimiter,
    Sessions,
    cleared_cookie,
    cookie_token,
    parse_login_form,
    session_cookie,
)
from threatgate.balancer.console_state import PinInfo, RateMeter, Totals, build_state
from threatgate.balancer.pins import PinStore
from threatgate.balancer.readiness import View
from threatgate.balancer.upstream import BalancerView
from threatgate.lb.instances import Instance
from threatgate.log import RateLimitedLog
from threatgate.net.body import read_body
from threatgate.net.describe import describe
from threatgate.net.http import json_error
from threatgate.node.auth import BasicAuth, parse_basic

log = logging.getLogger("threatgate.console")

PUSH_INTERVAL = 1.0
"""Seconds between two server-sent events (the page is at most this old)."""
MAX_STREAMS = 32
"""Server-sent event streams open at once; more are refused (503): each costs a state per second."""
STATE_REUSE = 0.5
"""Seconds a built state is reused for other viewers (many open pages cost one build)."""
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
"""The page's files (``console_page/``), by the name they are served under ``/console/``."""
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # not no-referrer: a browser would send "Origin: null" with the login form
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
}
"""On every console answer: nothing cached, framed, sniffed, or loaded from anywhere but the balancer."""
R = TypeVar("R", bound=web.StreamResponse)
REALM = 'Basic realm="threatgate console", charset="UTF-8"'


def _page(name: str) -> bytes:
    return resources.files("threatgate.balancer").joinpath("console_page", name).read_bytes()


class Listening(Protocol):
    @property
    def active(self) -> Collection[object]: ...


class ConsoleHost(BalancerView, Protocol):
    """What the console reads of the balancer (``BalancerService`` is one): the shared view, and more."""

    @property
    def backlog(self) -> Collection[int]: ...
    @property
    def listener(self) -> Listening: ...
    def instance_rows(self) -> list[dict[str, Any]]: ...
    def detection_statistics(self) -> dict[str, Any]: ...


class ReadinessViews(Protocol):
    """The readiness monitor's last ``/readyz`` answers (balancer/readiness.py ``ReadinessMonitor``)."""

    @property
    def views(self) -> Mapping[str, View]: ...


class PinView(Protocol):
    """The gateway's pins and the instances it refused for a pin mismatch (balancer/gateway.py ``Gateway``)."""

    @property
    def pins(self) -> PinStore: ...
    @property
    def refused(self) -> Mapping[str, str]: ...


class AlertLog(Protocol):
    """The last service alerts received (balancer/alerts.py ``AlertListener``)."""

    @property
    def recent(self) -> deque[AlertRecord]: ...


class Console:
    """The console's request handler (the gateway calls :meth:`handle`) and its sessions."""

    def __init__(
        self,
        host: ConsoleHost,
        readiness: ReadinessViews,
        gateway: PinView,
        alerts: AlertLog,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.readiness = readiness
        self.gateway = gateway
        self.alerts = alerts
        self.clock = clock
        self.wall = wall
        self.sessions = Sessions()
        self.limiter = LoginLimiter()
        self.meter = RateMeter()
        self.streams = 0
        self.warn = RateLimitedLog(log)  # refusals of a flood of guesses: not one line each
        self._closing = asyncio.Event()
        self._auth: BasicAuth | None = None
        self._auth_for: object = None  # the users table the authenticator was built from
        self._state: tuple[float, dict[str, Any]] | None = None
        self._assets = {name: _page(name) for name in ASSETS}
        css = _page("console.css").decode()
        login = _page("login.html").decode()
        self._login_css_hash = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
        self._login_page = login.replace("/*CSS*/", css)

    def started(self, url: str) -> None:
        """Say where the console is, and when nobody can log in to it (no ``<Users>``), how to change that."""
        count = len(self.host.config.users)
        if count:
            log.info("operator console on %s (%d user(s))", url, count)
        else:
            log.warning(
                "operator console on %s: no <Users> in %s, so nobody can log in "
                "(threatgate users add --config %s NAME, then reload)",
                url,
                self.host.config.path,
                self.host.config.path,
            )

    async def close(self) -> None:
        """End the event streams (before the gateway's listener closes, so none holds the shutdown)."""
        self._closing.set()

    # -- authentication -------------------------------------------------------------------------

    def _authenticator(self) -> BasicAuth:
        users = self.host.config.users
        if self._auth is None or users is not self._auth_for:
            self._auth = BasicAuth(dict(users))  # a new table (SIGHUP): the old cache goes with the old one
            self._auth_for = users
        return self._auth

    async def _check(self, request: BaseRequest, header: str, user: str | None) -> str | None | web.Response:
        """The user a Basic ``header`` authenticates, None when it does not, or the 429 to send."""
        source = request.remote or "?"
        user = user[:80] if user is not None else None  # as logged and counted: a name is at most 64 characters
        now = self.clock()
        wait = self.limiter.retry_after(source, user, now)
        if wait:
            self.warn("login from %s as %r refused: too many failed logins, retry in %d s", source, user, wait)
            return _with_headers(
                json_error(429, f"too many failed logins; retry in {wait} s", {"Retry-After": str(wait)})
            )
        name = await self._authenticator().authenticate(header)
        if name is None:
            self.limiter.failed(source, user, self.clock())
            self._count("login_failed")
            log.warning("failed login from %s as %r", source, user)
        return name

    async def _user(self, request: BaseRequest) -> str | None | web.Response:
        """Who sent ``request`` (a live session, else Basic), None, or the 429 to send."""
        token = cookie_token(request.headers.get("Cookie"))
        users = frozenset(name for name, _ in self.host.config.users)
        user = self.sessions.user(token, self.clock(), users)
        if user is not None:
            return user
        header = request.headers.get("Authorization")
        if header is None:
            return None
        credentials = parse_basic(header)
        return await self._check(request, header, credentials[0] if credentials else None)

    def _unauthorized(self, request: BaseRequest, segments: tuple[str, ...], message: str = "") -> web.Response:
        """401: the login form for a page, JSON for the rest (with a Basic challenge when no cookie came)."""
        if _wants_page(segments):
            response = self._login_form(401, message)
            response.headers["WWW-Authenticate"] = 'Cookie realm="threatgate console", form-action="/console/login"'
            return response
        headers = {} if request.headers.get("Cookie") else {"WWW-Authenticate": REALM}
        return _with_headers(json_error(401, message or "console login required", headers))

    def _login_form(self, status: int, message: str) -> web.Response:
        """The login page (its style inline, allowed by its hash: nothing else loads before a login)."""
        page = self._login_page.replace("<!--MESSAGE-->", _escape(message))
        response = _with_headers(web.Response(status=status, body=page.encode(), content_type="text/html"))
        response.charset = "utf-8"
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; style-src 'sha256-{self._login_css_hash}'; img-src data:; form-action 'self'; "
            "frame-ancestors 'none'"
        )
        return response

    # -- requests -------------------------------------------------------------------------------

    async def handle(self, request: BaseRequest, segments: tuple[str, ...]) -> web.StreamResponse:
        """Answer a request whose normalised path is ``/console/...`` (``segments`` starts with ``console``)."""
        rest = segments[1:]
        method = request.method
        if rest == ("login",) and method == "POST":
            return await self._login(request)
        user = await self._user(request)
        if isinstance(user, web.Response):
            return user
        if user is None:
            return self._unauthorized(request, segments)
        if method not in ("GET", "HEAD") and not (rest == ("logout",) and method == "POST"):
            return _with_headers(json_error(405, f"method {method[:20]} not allowed here", {"Allow": "GET, HEAD"}))
        if rest == ("logout",):
            if method != "POST":  # a link or an image must not log anybody out
                return _with_headers(json_error(405, "log out with POST", {"Allow": "POST"}))
            return self._logout(request)
        if rest == ("api", "state"):
            return _with_headers(_json(self.state(user)))
        if rest == ("api", "events"):
            return await self._events(request, user)
        name = rest[0] if len(rest) == 1 else "index.html" if not rest else ""
        if name == "login":
            name = "index.html"  # logged in already: the page
        kind = ASSETS.get(name)
        if kind is None:
            return _with_headers(json_error(404, "no such console page"))
        return _with_headers(web.Response(body=self._assets[name], headers={"Content-Type": kind}))

    async def _login(self, request: BaseRequest) -> web.Response:
        if not _same_origin(request):
            return _with_headers(json_error(403, "login from another site refused (Origin)"))
        body = await read_body(request, limit=4096, within=10.0, count=self._count)
        if isinstance(body, web.Response):
            return body
        try:
            name, password = parse_login_form(body)
        except ValueError as exc:  # console_auth.FormError: what is wrong with the form, never the password
            self._count("bad_form")
            return self._unauthorized(request, ("console",), str(exc))
        header = "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()
        user = await self._check(request, header, name)
        if isinstance(user, web.Response):  # too many failures: the form again, saying when to retry
            wait = user.headers.get("Retry-After", "1")
            response = self._login_form(429, f"too many failed logins; retry in {wait} s")
            response.headers["Retry-After"] = wait
            return response
        if user is None:
            return self._unauthorized(request, ("console",), "wrong user name or password")
        token = self.sessions.create(user, self.clock())
        log.info("%s logged in from %s", user, request.remote)
        response = web.Response(status=303, headers={"Location": COOKIE_PATH})
        response.headers["Set-Cookie"] = session_cookie(token, self.sessions.ttl)
        return _with_headers(response)

    def _logout(self, request: BaseRequest) -> web.Response:
        if not _same_origin(request):
            return _with_headers(json_error(403, "logout from another site refused (Origin)"))
        self.sessions.end(cookie_token(request.headers.get("Cookie")))
        response = web.Response(status=303, headers={"Location": COOKIE_PATH})
        response.headers["Set-Cookie"] = cleared_cookie()
        return _with_headers(response)

    def _count(self, reason: str) -> None:
        self.host.stats.bump(self.host.stats.bad_input, "console_" + reason)

    async def _events(self, request: BaseRequest, user: str) -> web.StreamResponse:
        """Server-sent events: the state now, then every :data:`PUSH_INTERVAL` s until the client leaves,
        its session ends, or the balancer stops."""
        if self.streams >= MAX_STREAMS:
            return _with_headers(json_error(503, f"{MAX_STREAMS} console streams open already; retry later"))
        token = cookie_token(request.headers.get("Cookie"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
        _with_headers(response)
        self.streams += 1
        try:
            await response.prepare(request)
            await response.write(b"retry: 2000\n\n")
            while not self._closing.is_set():
                users = frozenset(name for name, _ in self.host.config.users)
                if token and self.sessions.user(token, self.clock(), users) is None:
                    await response.write(b"event: logout\ndata: {}\n\n")
                    break
                if not token and user not in users:
                    break
                data = json.dumps(self.state(user), separators=(",", ":"))
                await response.write(f"event: state\ndata: {data}\n\n".encode())
                try:
                    await asyncio.wait_for(self._closing.wait(), PUSH_INTERVAL)
                except TimeoutError:
                    pass
        except (ConnectionResetError, ConnectionError) as exc:
            log.debug("event stream ended: %s", describe(exc))
        finally:
            self.streams -= 1
        return response

    # -- state ----------------------------------------------------------------------------------

    def state(self, user: str) -> dict[str, Any]:
        """The console's state now (a build less than :data:`STATE_REUSE` s old is reused)."""
        now = self.clock()
        if self._state is not None and now - self._state[0] < STATE_REUSE:
            return {**self._state[1], "user": user}
        host = self.host
        stats = host.stats
        rows = host.instance_rows()
        state = build_state(
            now=now,
            wall=self.wall(),
            rows=rows,
            views=dict(self.readiness.views),
            pins={key: self._pin(inst) for key, inst in host.instances.items()},
            last_errors={key: inst.health.last_error or "" for key, inst in host.instances.items()},
            totals=Totals(
                clients=len(host.listener.active),
                events_in=stats.events_in,
                events_out=stats.events_out,
                detections=stats.detections,
                dispatched=stats.dispatched,
                redispatched=stats.redispatched,
                backlog=len(host.backlog),
                pending=sum(row["inflight"] for row in rows),
                dropped=stats.dropped,
                dropped_lines=stats.dropped_lines,
                unmatched=stats.unmatched,
            ),
            alerts=list(self.alerts.recent),
            alert_counts=stats.alerts,
            detections=host.detection_statistics(),
            meter=self.meter,
            user=user,
        )
        self.sessions.sweep(now)
        self.limiter.sweep(now)
        self._state = (now, state)
        return state

    def _pin(self, inst: Instance) -> PinInfo:
        refused = self.gateway.refused.get(inst.key)
        try:
            pin = self.gateway.pins.cached(inst.settings)
        except (ValueError, OSError) as exc:
            return PinInfo(None, f"unreadable: {describe(exc) if isinstance(exc, OSError) else exc}")
        if pin is None:
            return PinInfo(None, "not pinned yet")
        return PinInfo(pin.fingerprint, f"refused: {refused}" if refused else "pinned")


def _wants_page(segments: tuple[str, ...]) -> bool:
    """A request a person makes by typing the address: answered with the login form, not JSON."""
    rest = segments[1:]
    return rest in ((), ("index.html",), ("login",), ("logout",))


def _same_origin(request: BaseRequest) -> bool:
    """A form post from the console itself: no ``Origin``, or one naming this very host (CSRF)."""
    origin = request.headers.get("Origin")
    return origin is None or origin == f"https://{request.host}"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _json(payload: Any) -> web.Response:
    return web.Response(body=json.dumps(payload).encode(), content_type="application/json")


def _with_headers(response: R) -> R:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


__all__ = ["Console", "ConsoleHost"]
