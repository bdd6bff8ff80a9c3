"""balancer/console.py: the handlers behind a plain aiohttp server, with a stand-in balancer.

Every console path needs a login (401 without), the form login sets the session cookie, Basic works
too, failed logins are logged without the password and limited (429), and the event stream pushes
the state.  The same over the balancer's real TLS listener: tests/integration/test_console.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import RawTestServer
from aiohttp.web_request import BaseRequest

from threatgate.balancer.alerts import AlertRecord
from threatgate.balancer.console import Console
from threatgate.balancer.console_auth import COOKIE
from threatgate.balancer.pins import PinStore
from threatgate.config.balancer import BalancerConfig
from threatgate.node.auth import hash_password
from threatgate.stats import BalancerStats
from threatgate.wire.paths import normalize_path

PASSWORD = "correct horse"
HASH = hash_password(PASSWORD)
PATHS = [
    ("GET", "/console/"),
    ("GET", "/console"),
    ("GET", "/console/index.html"),
    ("GET", "/console/console.js"),
    ("GET", "/console/console.css"),
    ("GET", "/console/api/state"),
    ("GET", "/console/api/events"),
    ("GET", "/console/no-such-page"),
    ("POST", "/console/logout"),
    ("POST", "/console/login"),
    ("GET", "/console/login"),
]


class Host:
    def __init__(self, config: BalancerConfig) -> None:
        self.config = config
        self.stats = BalancerStats()
        self.instances: dict[str, Any] = {}
        self.backlog: deque[int] = deque()
        self.listener = type("L", (), {"active": set()})()
        self.detections: dict[str, Any] = {}

    def instance_rows(self) -> list[dict[str, Any]]:
        return []

    def detection_statistics(self) -> dict[str, Any]:
        return self.detections


class Parts:
    def __init__(self, tmp: Path) -> None:
        self.views: dict[str, Any] = {}
        self.pins = PinStore(str(tmp))
        self.refused: dict[str, str] = {}
        self.recent: deque[AlertRecord] = deque([AlertRecord(1.0, "127.0.0.1:1", "KL_ALERT_UpdatedFeed", "x")])


def config(users: tuple[tuple[str, str], ...] = (("ops", HASH),)) -> BalancerConfig:
    return BalancerConfig(
        path="b.conf",
        listen_host="127.0.0.1",
        matching_port=0,
        api_port=0,
        cybertrace_port=0,
        scanners_count=1,
        cert_path="c",
        key_path="k",
        cert_dir="p",
        instances=(),
        allowed=(),
        users=users,
    )


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[str, Console, ClientSession]]:
    host = Host(config())
    parts = Parts(tmp_path)
    console = Console(host, parts, parts, parts)

    async def handler(request: BaseRequest) -> web.StreamResponse:
        return await console.handle(request, normalize_path(request.raw_path))

    server = RawTestServer(handler)
    await server.start_server()
    async with ClientSession(cookie_jar=None) as session:
        yield str(server.make_url("")).rstrip("/"), console, session
    await console.close()
    await server.close()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def login(base: str, session: ClientSession, password: str = PASSWORD) -> Any:
    return await session.post(
        base + "/console/login", data={"user": "ops", "password": password}, allow_redirects=False
    )


async def test_every_console_path_needs_a_login(served: tuple[str, Console, ClientSession]) -> None:
    base, _, session = served
    for method, path in PATHS:
        async with session.request(method, base + path, allow_redirects=False) as r:
            assert r.status == 401, (method, path, r.status)
            assert r.headers["Cache-Control"] == "no-store"
            assert "WWW-Authenticate" in r.headers
    async with session.get(base + "/console/") as r:
        page = await r.text()
        assert '<form method="post" action="/console/login">' in page and "<style>" in page
    async with session.get(base + "/console/api/state") as r:
        assert r.headers["WWW-Authenticate"].startswith("Basic ")
        assert await r.json() == [{"status": "console login required"}]


async def test_form_login_sets_a_session_cookie_and_logout_ends_it(
    served: tuple[str, Console, ClientSession],
) -> None:
    base, console, session = served
    async with await login(base, session) as r:
        assert r.status == 303 and r.headers["Location"] == "/console/"
        cookie = r.headers["Set-Cookie"]
    for attribute in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/console/", "Max-Age="):
        assert attribute in cookie
    token = cookie.split(";")[0].split("=", 1)[1]
    headers = {"Cookie": f"{COOKIE}={token}"}
    async with session.get(base + "/console/api/state", headers=headers) as r:
        assert r.status == 200
        state = await r.json()
    assert state["user"] == "ops" and state["alerts"]["recent"][0]["name"] == "KL_ALERT_UpdatedFeed"
    for page, kind in (("/console/", "text/html"), ("/console/console.js", "text/javascript")):
        async with session.get(base + page, headers=headers) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith(kind)
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    async with session.get(base + "/console/nothing", headers=headers) as r:
        assert r.status == 404
    async with session.post(base + "/console/logout", headers=headers, allow_redirects=False) as r:
        assert r.status == 303 and "Max-Age=0" in r.headers["Set-Cookie"]
    async with session.get(base + "/console/api/state", headers=headers) as r:
        assert r.status == 401
    assert len(console.sessions) == 0


async def test_basic_auth_is_an_alternative(served: tuple[str, Console, ClientSession]) -> None:
    base, _, session = served
    async with session.get(base + "/console/api/state", headers={"Authorization": basic("ops", PASSWORD)}) as r:
        assert r.status == 200
    async with session.get(base + "/console/api/state", headers={"Authorization": basic("ops", "nope")}) as r:
        assert r.status == 401


async def test_failed_logins_are_logged_without_the_password_and_limited(
    served: tuple[str, Console, ClientSession], caplog: pytest.LogCaptureFixture
) -> None:
    base, console, session = served
    caplog.set_level(logging.WARNING, "threatgate.console")
    for _ in range(5):
        async with await login(base, session, "wrong-secret") as r:
            assert r.status == 401
            assert "wrong user name or password" in await r.text()
    async with await login(base, session, PASSWORD) as r:  # the right one, too late
        assert r.status == 429
        assert 1 <= int(r.headers["Retry-After"]) <= 10
    async with session.get(base + "/console/api/state", headers={"Authorization": basic("ops", PASSWORD)}) as r:
        assert r.status == 429 and "Retry-After" in r.headers
    failed = [r for r in caplog.records if "failed login from" in r.getMessage()]
    assert len(failed) == 5 and all(r.levelno == logging.WARNING for r in failed)
    assert "'ops'" in failed[0].getMessage() and "127.0.0.1" in failed[0].getMessage()
    assert not any("wrong-secret" in r.getMessage() or PASSWORD in r.getMessage() for r in caplog.records)
    assert console.host.stats.bad_input["console_login_failed"] == 5


async def test_a_login_posted_from_another_site_is_refused(served: tuple[str, Console, ClientSession]) -> None:
    base, _, session = served
    async with session.post(
        base + "/console/login",
        data={"user": "ops", "password": PASSWORD},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    ) as r:
        assert r.status == 403


async def test_the_event_stream_pushes_the_state(served: tuple[str, Console, ClientSession]) -> None:
    base, console, session = served
    headers = {"Authorization": basic("ops", PASSWORD)}
    async with session.get(base + "/console/api/events", headers=headers) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        states = []
        async with asyncio.timeout(10):
            async for line in r.content:
                if line.startswith(b"data: {") and line.strip() != b"data: {}":
                    states.append(json.loads(line[6:]))
                    console.host.detections = {"hour": {"malicious_url": len(states)}}  # type: ignore[attr-defined]
                    console._state = None  # no reuse: the next push is built anew
                    if len(states) == 3:
                        break
    assert [s["detections"].get("hour") for s in states] == [None, {"malicious_url": 1}, {"malicious_url": 2}]
    assert console.streams == 0 or console.streams == 1  # the handler notices the close at its next write


async def test_a_user_removed_from_the_config_loses_the_session(served: tuple[str, Console, ClientSession]) -> None:
    base, console, session = served
    async with await login(base, session) as r:
        token = r.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    console.host.config = config(users=(("someone", HASH),))  # type: ignore[misc]
    async with session.get(base + "/console/api/state", headers={"Cookie": f"{COOKIE}={token}"}) as r:
        assert r.status == 401


def test_the_start_says_where_the_console_is_and_when_nobody_can_log_in(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "threatgate.console")
    parts = Parts(tmp_path)
    Console(Host(config()), parts, parts, parts).started("https://127.0.0.1:8443/console/")
    Console(Host(config(users=())), parts, parts, parts).started("https://127.0.0.1:8443/console/")
    first, second = caplog.records
    assert (first.levelno, first.getMessage()) == (
        logging.INFO,
        "operator console on https://127.0.0.1:8443/console/ (1 user(s))",
    )
    assert second.levelno == logging.WARNING
    assert "no <Users> in b.conf, so nobody can log in (threatgate users add --config b.conf NAME" in (
        second.getMessage()
    )


async def test_logout_needs_a_post(served: tuple[str, Console, ClientSession]) -> None:
    base, console, session = served
    headers = {"Authorization": basic("ops", PASSWORD)}
    async with session.get(base + "/console/logout", headers=headers) as r:
        assert r.status == 405 and r.headers["Allow"] == "POST"
    async with session.put(base + "/console/api/state", headers=headers) as r:
        assert r.status == 405


async def test_closing_the_console_ends_its_event_streams(served: tuple[str, Console, ClientSession]) -> None:
    base, console, session = served
    async with session.get(base + "/console/api/events", headers={"Authorization": basic("ops", PASSWORD)}) as r:
        await r.content.readuntil(b"event: state")
        assert console.streams == 1
        await console.close()
        async with asyncio.timeout(5):
            await r.content.read()  # to the end: the server finished the answer
    assert console.streams == 0
