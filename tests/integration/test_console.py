"""The operator console over the balancer's real TLS listener, with two real nodes, and in a real browser.

- every console path answers 401 without a login, ``/console/../api/...`` stays an API request (the
  allow-list decides it), and the allow-list never closes the console;
- the form login gives a session that reads the state; the event stream pushes it every second;
- Debian's chromium, headless, driven by selenium through chromedriver: log in, both instances UP, one
  node SIGKILLed shows DOWN within 10 s, the detection count equals what the client received; a
  screenshot is saved (its path is printed).  Skipped only when chromium or chromedriver is missing
  (scripts/test installs both).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    EXAMPLES,
    REPLY_FLAGS,
    BalancerProcess,
    HTTPSClient,
    NodeProcess,
    answers_in_order,
    balancer_config,
    basic_auth,
    example_config,
    running_balancer,
    stream,
    wait_for_log_count,
)
from threatgate.balancer.console_auth import COOKIE
from threatgate.node.auth import hash_password

PASSWORD = "console pass 1"
STARTUP_TIMEOUT = 60.0
PATHS = [
    ("GET", "/console/"),
    ("GET", "/console"),
    ("GET", "/console/index.html"),
    ("GET", "/console/console.js"),
    ("GET", "/console/console.css"),
    ("GET", "/console/api/state"),
    ("GET", "/console/api/events"),
    ("GET", "/console/missing"),
    ("GET", "/console/login"),
    ("POST", "/console/login"),
    ("POST", "/console/logout"),
    ("GET", "/api/1.1/../../console/api/state"),
    ("GET", "/console//api//state"),
    ("GET", "/console/api/%73tate"),
]


@dataclass
class Deployment:
    nodes: list[NodeProcess]
    balancer: BalancerProcess
    https: HTTPSClient

    def key(self, i: int) -> str:
        return f"127.0.0.1:{self.nodes[i].port}"


@contextmanager
def deployment(tmp: Path) -> Iterator[Deployment]:
    """Two nodes on the example config (their REST API polled for readiness) behind a balancer with a console user."""
    procs: list[NodeProcess] = []
    try:
        for i in range(2):
            (tmp / f"node{i}").mkdir()
            procs.append(NodeProcess(example_config(tmp / f"node{i}"), 0))
        for proc in procs:
            proc.wait_ready(timeout=STARTUP_TIMEOUT)
        path = tmp / "kl_balancer.conf"
        users = f'<Users><User name="ops" password_hash="{hash_password(PASSWORD)}"/></Users>'
        balancer_config(path, instances=[p.port for p in procs], extra=users)
        text = path.read_text()
        for proc in procs:
            port = f'matching_port="{proc.port}"'
            text = text.replace(port, f'{port} api_port="{proc.api_port}"')
        path.write_text(text)
        with running_balancer(path) as balancer:
            wait_for_log_count(balancer, r"instance 127\.0\.0\.1:\d+ is UP", 2, timeout=STARTUP_TIMEOUT)
            https = HTTPSClient(balancer.bound["api"][1], tmp / "certs" / "balancer.pem")
            yield Deployment(procs, balancer, https)
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployment(tmp_path_factory.mktemp("console")) as d:
        yield d


def login(https: HTTPSClient, password: str = PASSWORD) -> str:
    """The session token of a form login."""
    body = urllib.parse.urlencode({"user": "ops", "password": password}).encode()
    reply = https.request("POST", "/console/login", body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status == 303, reply
    match = re.match(rf"{COOKIE}=([^;]+);", reply.headers["set-cookie"])
    assert match, reply.headers
    return match[1]


def test_every_console_path_needs_a_login(deployed: Deployment) -> None:
    for method, path in PATHS:
        reply = deployed.https.request(method, path)
        assert reply.status == 401, (method, path, reply.status, reply.body[:200])
    wrong = deployed.https.request("GET", "/console/api/state", headers={"Authorization": basic_auth("ops", "no")})
    assert wrong.status == 401
    deployed.balancer.wait_for_log(r"WAR threatgate.console: failed login from 127\.0\.0\.1 as 'ops'")
    assert "'no'" not in deployed.balancer.log()


def test_a_dot_segment_does_not_escape_from_the_console(deployed: Deployment) -> None:
    """``/console/../api/...`` is an API request: the allow-list refuses it (the example allows no tags)."""
    for target in ("/console/../api/1.1/tags", "/console/%2e%2e/api/1.1/tags"):
        reply = deployed.https.request("GET", target, headers={"Authorization": basic_auth("ops", PASSWORD)})
        assert reply.status == 403, (target, reply)
        assert "is not allowed by the balancer (AllowedRequests)" in reply.json()[0]["status"]


def test_login_reads_the_state_over_tls(deployed: Deployment) -> None:
    url = f"https://127.0.0.1:{deployed.https.port}/console/"
    assert f"operator console on {url} (1 user(s))" in deployed.balancer.log()
    token = login(deployed.https)
    reply = deployed.https.request("GET", "/console/api/state", headers={"Cookie": f"{COOKIE}={token}"})
    assert reply.status == 200
    state = reply.json()
    rows = {i["instance"]: i for i in state["instances"]}
    assert set(rows) == {deployed.key(0), deployed.key(1)}
    assert all(i["state"] == "UP" for i in rows.values())
    page = deployed.https.request("GET", "/console/", headers={"Cookie": f"{COOKIE}={token}"})
    assert page.status == 200 and b'<script src="/console/console.js"' in page.body
    basic = deployed.https.request("GET", "/console/api/state", headers={"Authorization": basic_auth("ops", PASSWORD)})
    assert basic.status == 200


def sse_states(https: HTTPSClient, token: str, count: int, timeout: float = 15) -> list[dict[str, object]]:
    """The first ``count`` states of ``/console/api/events`` (read off a raw TLS socket, chunked framing and all)."""
    states: list[dict[str, object]] = []
    with https.connect(timeout) as sock:
        sock.sendall(
            f"GET /console/api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {COOKIE}={token}\r\n\r\n".encode()
        )
        buf = b""
        deadline = time.monotonic() + timeout
        while len(states) < count and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
            states = [json.loads(m[1]) for m in re.finditer(rb"event: state\ndata: (\{.*?\})\n\n", buf)][:count]
    return states


def test_the_event_stream_delivers_updates(deployed: Deployment) -> None:
    token = login(deployed.https)
    states = sse_states(deployed.https, token, 3)
    assert len(states) == 3
    times = [float(s["time"]) for s in states]  # type: ignore[arg-type]
    assert times == sorted(times) and times[-1] - times[0] >= 1.0  # pushed anew, about every second


# -- a real browser --------------------------------------------------------------------------------------


STATISTICS_JS = """
const count = (text) => parseInt((text || "").replace(/\\D/g, "") || "-1", 10);
const out = {instances: {}, hour: {}, day: {}, sources: {}, widths: {}, minutes: null, label: "", indicators: 0};
document.querySelectorAll("table.stat-instances tbody tr").forEach((r) => {
  const f = (name) => r.querySelector(`td[data-field="${name}"]`).textContent;
  out.instances[r.dataset.instance] = {hour: count(f("hour")), day: count(f("day")), total: count(f("total")),
    restarts: count(f("restarts")), error: f("error")};
});
document.querySelectorAll("#stat-categories tbody tr").forEach((r) => {
  out.hour[r.dataset.key] = count(r.querySelector('td[data-window="hour"] .value').textContent);
  out.day[r.dataset.key] = count(r.querySelector('td[data-window="day"] .value').textContent);
  out.widths[r.dataset.key] = parseFloat(r.querySelector('td[data-window="hour"] .bar').style.width);
});
document.querySelectorAll("#stat-sources tbody tr").forEach((r) => {
  const n = count(r.querySelector('td[data-window="hour"] .value').textContent);
  if (n > 0) out.sources[r.dataset.key] = n;
});
const fig = document.querySelector("figure.minutes");
if (fig) {
  out.minutes = parseInt(fig.dataset.total, 10);
  out.label = fig.querySelector("svg").getAttribute("aria-label");
}
out.indicators = document.querySelectorAll("#stat-indicators tbody tr").length;
return out;
"""
"""Reads the statistics view off the page in one go (it is rebuilt every second)."""


def chromium_paths() -> tuple[str, str]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/test installs them)")
    return browser, driver


@pytest.mark.timeout(300)
def test_the_console_in_a_real_browser(tmp_path: Path) -> None:
    browser, driver_path = chromium_paths()
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.accept_insecure_certs = True  # the balancer's self-signed certificate
    with deployment(tmp_path) as d:
        chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
        try:
            wait = WebDriverWait(chrome, 20, poll_frequency=0.1)
            basic = {"Authorization": basic_auth("ops", PASSWORD)}
            base = f"https://127.0.0.1:{d.https.port}"
            chrome.get(base + "/console/")
            # The login form is styled (its inline style allowed by hash) and works from the keyboard alone:
            # the user field has the focus, Tab goes to the password, Enter submits.
            # Waited for, not read once: the element found right after the navigation may belong to a document
            # being replaced (a stale reference, seen once in a full run).
            styled = WebDriverWait(chrome, 20, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,))
            styled.until(
                lambda c: (
                    c.find_element(By.CSS_SELECTOR, ".login-box").value_of_css_property("border-top-width") == "1px"
                )
            )
            assert styled.until(lambda c: c.switch_to.active_element.get_attribute("id") == "user")
            chrome.switch_to.active_element.send_keys("ops", Keys.TAB, PASSWORD, Keys.ENTER)

            def state_of(key: str) -> str | None:
                rows = chrome.find_elements(By.CSS_SELECTOR, f'tr[data-instance="{key}"]')
                return rows[0].get_attribute("data-state") if rows else None

            wait.until(lambda _: state_of(d.key(0)) == "UP" and state_of(d.key(1)) == "UP")

            # Events through the balancer: the console's detection count is what the client got back.
            payload = REPLY_FLAGS + (EXAMPLES / "events.txt").read_bytes() * 20
            answers = answers_in_order(stream(d.balancer.port, payload))
            detections = sum(len(a) for a in answers)
            assert detections > 0

            def shown() -> int:
                return int(chrome.find_element(By.ID, "detections-total").text.replace(",", "") or "-1")

            wait.until(lambda _: shown() == detections)

            # The statistics view: once the poller has asked both nodes again (every health-check
            # interval), the per-instance table and the category bars show what the nodes detected.
            def statistics() -> dict[str, Any]:
                figures: dict[str, Any] = chrome.execute_script(STATISTICS_JS)
                return figures

            def settled() -> dict[str, Any] | None:
                s = statistics()
                totals = [row["total"] for row in s["instances"].values()]
                hours = [row["hour"] for row in s["instances"].values()]
                return s if len(totals) == 2 and sum(totals) == detections and sum(hours) == detections else None

            stats = WebDriverWait(chrome, 30, poll_frequency=0.2).until(lambda _: settled())
            assert stats is not None
            assert set(stats["instances"]) == {d.key(0), d.key(1)}
            assert all(row["day"] == row["hour"] and row["error"] == "" for row in stats["instances"].values())
            report = d.https.request("GET", "/console/api/state", headers=basic).json()["detections"]
            categories = report["last_hour"]["by_category"]
            assert categories and sum(categories.values()) > 0
            assert stats["hour"] == categories and stats["day"] == report["last_day"]["by_category"]
            assert stats["sources"] == {k: n for k, n in report["last_hour"]["by_source"].items() if n}
            widest = max(categories, key=categories.__getitem__)
            assert stats["widths"][widest] == pytest.approx(100.0, abs=0.1)  # one scale: the largest figure
            for key, n in categories.items():
                assert stats["widths"][key] == pytest.approx(100 * n / categories[widest], abs=0.1), key
            assert stats["minutes"] == detections  # the per-minute chart adds up to the last hour
            peak = max(m["detections"] for m in report["per_minute"])
            assert f"{detections:,} detections in the last 60 minutes; peak {peak:,} a minute at " in stats["label"]
            assert stats["indicators"] == len(report["top_indicators"]) > 0

            # One node killed: DOWN on the page within 10 s, without a reload.
            d.nodes[1].signal(signal.SIGKILL)
            killed = time.monotonic()
            WebDriverWait(chrome, 10, poll_frequency=0.1).until(lambda _: state_of(d.key(1)) == "DOWN")
            took = time.monotonic() - killed
            assert state_of(d.key(0)) == "UP"
            assert shown() == detections
            # its statistics poll fails too: the per-instance row says why, in red
            WebDriverWait(chrome, 15, poll_frequency=0.2).until(lambda _: statistics()["instances"][d.key(1)]["error"])
            row = f'table.stat-instances tr[data-instance="{d.key(1)}"]'
            failing = chrome.find_element(By.CSS_SELECTOR, f"{row} td.error")
            assert failing.value_of_css_property("color") == "rgba(179, 38, 30, 1)"
            badge = chrome.find_element(By.CSS_SELECTOR, f'tr[data-instance="{d.key(1)}"] .badge.DOWN')
            assert badge.is_displayed()
            screenshot = tmp_path / "console.png"
            chrome.save_screenshot(str(screenshot))
            print(f"\nconsole screenshot: {screenshot} (node DOWN on the page {took:.1f} s after SIGKILL)")
            assert screenshot.stat().st_size > 10_000
            chrome.set_window_size(390, 1800)  # a phone: the instances become cards, nothing wider than the screen
            wide = chrome.execute_script("return document.documentElement.scrollWidth > window.innerWidth")
            phone = tmp_path / "console-phone.png"
            chrome.save_screenshot(str(phone))
            print(f"console screenshot on a phone-sized window: {phone}")
            assert wide is False
            inner = chrome.execute_script(  # nor does a statistics table scroll sideways inside its box
                "return [...document.querySelectorAll('#detections .scroll')]"
                ".filter((b) => b.scrollWidth > b.clientWidth + 1).map((b) => b.parentElement.textContent.slice(0, 40))"
            )
            assert inner == []
            chrome.execute_script("document.getElementById('stat-categories').scrollIntoView()")
            phone_stats = tmp_path / "console-phone-statistics.png"
            chrome.save_screenshot(str(phone_stats))
            print(f"the statistics on a phone-sized window: {phone_stats}")
            chrome.set_window_size(1400, 1500)
            chrome.execute_script("document.getElementById('detections-title').scrollIntoView()")
            laptop_stats = tmp_path / "console-statistics.png"
            chrome.save_screenshot(str(laptop_stats))
            print(f"the statistics on a laptop-sized window: {laptop_stats}")
            chrome.find_element(By.CSS_SELECTOR, "form.logout button").click()  # logs out: the login form again
            wait.until(lambda _: chrome.find_elements(By.ID, "login"))
            assert "/console/" in chrome.current_url and not chrome.get_cookies()
        except Exception:
            chrome.save_screenshot(str(tmp_path / "console-failed.png"))
            print(f"\nconsole screenshot at the failure: {tmp_path / 'console-failed.png'}")
            print("page text:", chrome.find_element(By.TAG_NAME, "body").text[:3000])
            print("browser log:", chrome.get_log("browser"))  # type: ignore[no-untyped-call]
            raise
        finally:
            chrome.quit()


def test_a_user_added_with_the_cli_logs_in_after_a_reload(deployed: Deployment) -> None:
    config = deployed.balancer.config
    added = subprocess.run(
        [sys.executable, "-m", "threatgate", "users", "add", "--config", str(config), "--password-stdin", "bob"],
        input="bob's password\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    assert "a running balancer's console uses it after a reload" in added.stdout
    bob = {"Authorization": basic_auth("bob", "bob's password")}
    assert deployed.https.request("GET", "/console/api/state", headers=bob).status == 401
    mark = deployed.balancer.log_offset()
    deployed.balancer.signal(signal.SIGHUP)
    deployed.balancer.wait_for_log("configuration reloaded", after=mark)
    assert deployed.https.request("GET", "/console/api/state", headers=bob).status == 200
    assert (
        deployed.https.request(
            "GET", "/console/api/state", headers={"Authorization": basic_auth("ops", PASSWORD)}
        ).status
        == 200
    )
