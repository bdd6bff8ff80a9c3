"""Unit tests of the balancer's readiness view (balancer/readiness.py): no sockets.

The pure decisions (an answer's validation, the majority digest and who differs from it, where a write
goes), the monitor's poll -> views -> gauges and logs cycle over a stand-in gateway, the gateway's write
branch, and the ``<ReadinessCheck>`` and ``api_port`` config.  The ``balancer status`` table is in
tests/balancer/test_status.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from threatgate.balancer.gateway import Answer, Gateway
from threatgate.balancer.readiness import (
    NO_CONTROL,
    Readiness,
    ReadinessMonitor,
    View,
    WriteRoute,
    compare_digests,
    parse_readiness,
    refresh_view,
    route_write,
)
from threatgate.config.balancer import AllowedRequest, InstanceSettings, balancer_config_from_xml
from threatgate.config.xml import parse_xml
from threatgate.errors import ConfigError, PinMismatch, UpstreamFailed
from threatgate.lb.instances import Instance
from threatgate.stats import BalancerStats
from threatgate.wire.paths import RoutePattern

A, B, C = "a" * 64, "b" * 64, "c" * 64


def answer(role: str = "standalone", sha256: str | None = None, **fields: Any) -> Readiness:
    return Readiness(ready=fields.pop("ready", True), role=role, sha256=sha256, **fields)


def view(key: str, role: str = "standalone", sha256: str | None = None, **fields: Any) -> View:
    return View(key, api="443", answer=answer(role, sha256, **fields))


def down(key: str, last: Readiness | None = None, error: str = "cannot connect: Connection refused") -> View:
    return View(key, api="443", answer=last, error=error)


# -- parse_readiness -----------------------------------------------------------------------------------------


def test_a_cluster_answer_is_read_whole() -> None:
    body = {
        "ready": True,
        "role": "control",
        "cluster_id": "c1",
        "node_id": "AB:CD",
        "epoch": 3,
        "revision": 12,
        "sha256": A,
        "emergency": None,
    }
    assert parse_readiness(200, json.dumps(body).encode()) == Readiness(True, "control", "c1", "AB:CD", 3, 12, A, None)


def test_a_loading_node_answers_503_and_is_not_ready() -> None:
    got = parse_readiness(503, b'{"ready": false, "role": "standalone"}')
    assert (got.ready, got.role, got.in_cluster) == (False, "standalone", False)


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (404, b'{"ready": true, "role": "standalone"}', "HTTP 404"),
        (200, b"<html>", "not JSON"),
        (200, b'[{"status": "stand-in"}]', "no readiness object"),
        (200, b'{"ready": "yes", "role": "standalone"}', "no readiness object"),
        (200, b'{"ready": true, "role": "leader"}', "unknown role 'leader'"),
        (200, b'{"ready": true, "role": "control", "epoch": "1"}', "epoch is not a int"),
        (200, b'{"ready": true, "role": "control", "epoch": true}', "epoch is not a int"),
        (200, b'{"ready": true, "role": "control", "sha256": "ABC"}', "sha256 is not a hex digest"),
    ],
)
def test_anything_else_is_refused(status: int, body: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_readiness(status, body)


# -- compare_digests -------------------------------------------------------------------------------------------


def test_agreeing_digests_flag_nobody() -> None:
    got = compare_digests([view("n1", "control", A), view("n2", "secondary", A)])
    assert (got.majority, got.differing, got.mismatch) == (A, (), False)


def test_the_minority_is_flagged() -> None:
    got = compare_digests([view("n1", "control", A), view("n2", "secondary", B), view("n3", "secondary", B)])
    assert (got.majority, got.differing, got.mismatch) == (B, ("n1",), True)


def test_a_tie_goes_to_the_controls_digest() -> None:
    got = compare_digests([view("n1", "secondary", A), view("n2", "control", B)])
    assert (got.majority, got.differing) == (B, ("n1",))


def test_a_tie_without_the_control_has_no_majority_and_flags_everyone() -> None:
    views = [view("n1", "secondary", A), view("n2", "secondary", B), view("n3", "control", C), view("n4", "control", C)]
    assert compare_digests(views).majority == C  # not a tie: two hold C
    got = compare_digests(views[:2])
    assert (got.majority, got.differing) == (None, ("n1", "n2"))


def test_standalone_unreachable_and_digestless_nodes_are_not_compared() -> None:
    views = [
        view("n1", "control", A),
        view("n2", "standalone"),
        down("n3", last=answer("secondary", B)),  # its last answer is not what it holds now
        view("n4", "secondary", None),  # a member without settings yet
        View("n5", skip="no api_port"),
    ]
    got = compare_digests(views)
    assert (got.digests, got.differing, got.mismatch) == ({"n1": A}, (), False)
    assert compare_digests([view("n1"), view("n2")]) == compare_digests([])


# -- route_write -------------------------------------------------------------------------------------------------


def test_standalone_or_unknown_nodes_keep_the_fan_out() -> None:
    assert route_write([]) == WriteRoute(fan_out=True)
    assert route_write([view("n1"), view("n2")]) == WriteRoute(fan_out=True)
    assert route_write([down("n1"), View("n2")]) == WriteRoute(fan_out=True)  # never answered: not a member


def test_in_a_cluster_a_write_goes_to_the_control_alone() -> None:
    views = [view("n1", "secondary", A, epoch=1), view("n2", "control", A, epoch=1), View("n3", skip="disabled")]
    assert route_write(views) == WriteRoute(control="n2")


def test_a_control_that_went_away_freezes_writes() -> None:
    route = route_write([down("n1", last=answer("control", A)), view("n2", "secondary", A, emergency="lost it")])
    assert route.refusal is not None and route.refusal.startswith(NO_CONTROL), route
    assert "n1 unreachable: cannot connect" in route.refusal and "n2 secondary, emergency: lost it" in route.refusal


def test_two_controls_the_highest_epoch_wins_and_a_tie_is_refused() -> None:
    assert route_write([view("n1", "control", A, epoch=1), view("n2", "control", A, epoch=2)]).control == "n2"
    route = route_write([view("n1", "control", A, epoch=2), view("n2", "control", B, epoch=2)])
    assert route.refusal is not None and "n1, n2 all report role control at epoch 2" in route.refusal


def test_standalone_nodes_beside_cluster_members_refuse_writes() -> None:
    route = route_write([view("n1", "control", A), view("n2")])
    assert route.refusal is not None and route.refusal.startswith("standalone instance(s) n2"), route


def test_disabled_and_portless_instances_are_not_asked() -> None:
    base = {"host": "127.0.0.1", "matching_port": 10001}
    stale = View("x", answer=answer("control", A))
    assert refresh_view(stale, InstanceSettings(**base, enabled=False, api_port_set=True)).skip == "disabled"
    assert stale.answer is None  # a disabled instance's old answer routes nothing
    portless = refresh_view(View("x"), InstanceSettings(**base))
    assert (portless.skip, portless.api, portless.role) == ("no api_port", "-", "unknown")
    asked = refresh_view(View("x"), InstanceSettings(**base, api_port=8443, api_port_set=True))
    assert (asked.skip, asked.api, asked.state) == (None, "8443", "not polled yet")


# -- the monitor: polls through the gateway's forward, views, gauges, logs ------------------------------------------


class StandInGateway:
    """Answers ``forward`` from a table: instance key -> Answer or exception."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer | Exception] = {}
        self.asked: list[tuple[str, str, str]] = []

    async def forward(
        self, inst: Instance, method: str, path: str, headers: Any, body: bytes, client_timeout: Any, *, probe: bool
    ) -> Answer:
        assert probe, "the balancer's own polls are probes, not gateway requests"
        self.asked.append((inst.key, method, path))
        got = self.answers[inst.key]
        if isinstance(got, Exception):
            raise got
        return got

    def readyz(self, key: str, role: str, sha256: str | None = None, revision: int | None = None) -> None:
        body = {"ready": True, "role": role, "epoch": 1, "revision": revision, "sha256": sha256}
        self.answers[key] = Answer(200, {}, json.dumps(body).encode())


def make_monitor(*ports: int, readiness: bool = True) -> tuple[ReadinessMonitor, StandInGateway]:
    instances = {}
    for port in ports:
        s = InstanceSettings(host="127.0.0.1", matching_port=port, api_port=port + 1, api_port_set=True)
        instances[s.key] = Instance(s, rise=1, fall=1)
    health = SimpleNamespace(interval=1.0, timeout=1.0)
    service = SimpleNamespace(
        config=SimpleNamespace(readiness=readiness, health=health), instances=instances, stats=BalancerStats()
    )
    gateway = StandInGateway()
    return ReadinessMonitor(service, gateway), gateway  # type: ignore[arg-type]


def scrape(monitor: ReadinessMonitor) -> dict[str, float]:
    class One(Collector):
        def collect(self) -> Any:
            return monitor.families()

    registry = CollectorRegistry()
    registry.register(One())
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def test_polls_fill_the_gauges_and_a_mismatch_is_logged_once_each_way(caplog: pytest.LogCaptureFixture) -> None:
    monitor, gateway = make_monitor(1, 3)
    gateway.readyz("127.0.0.1:1", "control", A, 4)
    gateway.readyz("127.0.0.1:3", "secondary", A, 4)
    caplog.set_level(logging.INFO, "threatgate.balancer")
    await monitor.poll()
    monitor.evaluate()
    assert sorted(gateway.asked) == [("127.0.0.1:1", "GET", "/readyz"), ("127.0.0.1:3", "GET", "/readyz")]
    assert monitor.service.stats.readiness_polls == {"ready": 2}  # counted apart from gateway requests
    assert monitor.service.stats.api_requests == {}
    samples = scrape(monitor)
    assert samples['threatgate_balancer_instance_settings_revision{instance="127.0.0.1:1"}'] == 4
    assert samples['threatgate_balancer_instance_role{instance="127.0.0.1:1",role="control"}'] == 1
    assert samples['threatgate_balancer_instance_role{instance="127.0.0.1:1",role="secondary"}'] == 0
    assert samples['threatgate_balancer_instance_role{instance="127.0.0.1:3",role="secondary"}'] == 1
    assert samples["threatgate_balancer_settings_digest_mismatch"] == 0
    assert [r.getMessage() for r in caplog.records] == [
        "instance 127.0.0.1:1: cluster None, role control, epoch 1, settings r4 aaaaaaaaaaaa",
        "instance 127.0.0.1:3: cluster None, role secondary, epoch 1, settings r4 aaaaaaaaaaaa",
    ]
    caplog.clear()

    gateway.readyz("127.0.0.1:1", "control", B, 5)  # the Control moved on; the Secondary lags
    for polls in range(1, 5):
        await monitor.poll()
        monitor.evaluate()
        assert monitor.mismatch is (polls >= 2)  # one poll could be a change on its way
    assert scrape(monitor)["threatgate_balancer_settings_digest_mismatch"] == 1
    gateway.readyz("127.0.0.1:3", "secondary", B, 5)
    for _ in range(3):
        await monitor.poll()
        monitor.evaluate()
    assert not monitor.mismatch
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "settings digests differ between cluster instances: 127.0.0.1:1 bbbbbbbbbbbb, 127.0.0.1:3 aaaaaaaaaaaa "
            "(differing from the majority: 127.0.0.1:3)",
        ),
        ("INFO", "settings digests agree again: bbbbbbbbbbbb on 2 instance(s)"),
    ]


async def test_failures_make_the_role_unknown_and_keep_the_last_answer(caplog: pytest.LogCaptureFixture) -> None:
    monitor, gateway = make_monitor(1, 3)
    gateway.readyz("127.0.0.1:1", "control", A, 1)
    gateway.readyz("127.0.0.1:3", "secondary", A, 1)
    await monitor.poll()
    inst = next(iter(monitor.service.instances.values()))
    gateway.answers["127.0.0.1:1"] = UpstreamFailed("cannot connect: Connection refused")
    gateway.answers["127.0.0.1:3"] = PinMismatch(inst, "AA:BB", "CC:DD")
    caplog.set_level(logging.INFO, "threatgate.balancer")
    for _ in range(3):
        await monitor.poll()
    control, secondary = monitor.views["127.0.0.1:1"], monitor.views["127.0.0.1:3"]
    assert (control.role, control.state) == ("unknown", "unreachable: cannot connect: Connection refused")
    assert control.answer is not None and control.answer.role == "control"  # still known as a member
    assert secondary.state == "refused: certificate mismatch: pinned AA:BB, presented CC:DD"
    assert len(caplog.records) == 2  # one line per change, not per poll
    assert (await monitor.route_write()).refusal is not None  # a cluster without a reachable Control
    samples = scrape(monitor)
    assert samples['threatgate_balancer_instance_role{instance="127.0.0.1:1",role="unknown"}'] == 1
    assert 'threatgate_balancer_instance_settings_revision{instance="127.0.0.1:1"}' not in samples
    gateway.answers["127.0.0.1:1"] = Answer(200, {}, b"<html>not a node</html>")
    await monitor.poll()
    assert control.state == "unreachable: unexpected /readyz answer: not JSON"


async def test_a_write_asks_instances_never_asked_first_and_nothing_when_disabled() -> None:
    monitor, gateway = make_monitor(1, 3)
    gateway.readyz("127.0.0.1:1", "control", A, 1)
    gateway.readyz("127.0.0.1:3", "secondary", A, 1)
    assert await monitor.route_write() == WriteRoute(control="127.0.0.1:1")  # the balancer just started
    assert len(gateway.asked) == 2
    await monitor.route_write()
    assert len(gateway.asked) == 2  # known now: the periodic polls keep them current

    off, gateway = make_monitor(1, readiness=False)
    off.views = {"127.0.0.1:1": view("127.0.0.1:1", "secondary", A)}  # left from before a reload turned them off
    assert await off.route_write() == WriteRoute(fan_out=True) and gateway.asked == []


async def test_each_round_follows_the_readiness_switch_across_reloads() -> None:
    monitor, gateway = make_monitor(1)
    gateway.readyz("127.0.0.1:1", "control", A, 1)
    await monitor.round()
    assert monitor.views["127.0.0.1:1"].role == "control"
    monitor.service.config.readiness = False  # as a SIGHUP with <ReadinessCheck enabled="false"/>
    await monitor.round()
    assert monitor.views == {} and scrape(monitor) == {"threatgate_balancer_settings_digest_mismatch": 0}
    assert len(gateway.asked) == 1


async def test_the_loop_runs_rounds_until_closed() -> None:
    monitor, gateway = make_monitor(1)
    gateway.readyz("127.0.0.1:1", "control", A, 1)
    asked = asyncio.Event()
    forward = gateway.forward

    async def forward_and_tell(*args: Any, **kwargs: Any) -> Answer:
        asked.set()
        return await forward(*args, **kwargs)

    gateway.forward = forward_and_tell  # type: ignore[method-assign]
    monitor.start()
    try:
        await asyncio.wait_for(asked.wait(), 10)
    finally:
        await monitor.close()
    task = monitor._periodic._task
    assert task is not None and task.done()


# -- the gateway's write branch -------------------------------------------------------------------------------------


def routed_gateway(tmp_path: Path, route: WriteRoute) -> tuple[Gateway, list[str]]:
    settings = InstanceSettings(host="127.0.0.1", matching_port=1, api_port=2, api_port_set=True)
    inst = Instance(settings, rise=1, fall=1)
    allowed = (AllowedRequest(method="DELETE", pattern=RoutePattern.parse("/api/{v}/tags/{t}"), text="x"),)
    config = SimpleNamespace(
        cert_dir=str(tmp_path), allowed=allowed, api_upstream_timeout=5.0, max_api_requests=10, api_body_timeout=5.0
    )

    async def decided() -> WriteRoute:
        return route

    service = SimpleNamespace(
        config=config, stats=BalancerStats(), instances={inst.key: inst}, readiness=SimpleNamespace(route_write=decided)
    )
    gateway = Gateway(service)  # type: ignore[arg-type]
    sent: list[str] = []

    async def forward(inst: Instance, method: str, path: str, headers: Any, body: bytes) -> Answer:
        sent.append(f"{inst.key} {method} {path}")
        if route.control == "fail":
            raise UpstreamFailed("cannot connect: Connection refused")
        return Answer(200, {"ETag": '"8"'}, b"[]")

    gateway.forward = forward  # type: ignore[method-assign]
    return gateway, sent


async def test_a_cluster_write_goes_to_the_control_and_a_frozen_cluster_gets_503(tmp_path: Path) -> None:
    request = make_mocked_request("DELETE", "/api/1.1/tags/x")
    gateway, sent = routed_gateway(tmp_path, WriteRoute(control="127.0.0.1:1"))
    reply = await gateway.handle(request)
    assert (reply.status, reply.headers["ETag"], sent) == (200, '"8"', ["127.0.0.1:1 DELETE /api/1.1/tags/x"])

    gateway, sent = routed_gateway(tmp_path, WriteRoute(refusal=f"{NO_CONTROL}: nobody"))
    reply = await gateway.handle(make_mocked_request("DELETE", "/api/1.1/tags/x"))
    assert reply.status == 503 and sent == []
    assert json.loads(reply.body) == [  # type: ignore[attr-defined]
        {"status": f"write refused, no instance was changed: {NO_CONTROL}: nobody"}
    ]
    assert gateway.service.stats.api_retries == {"no_control": 1}


# -- configuration -------------------------------------------------------------------------------------------------


def balancer_xml(extra: str = "", instance: str = 'matching_port="10001" api_port="10443"') -> str:
    return (
        '<Config><Balancer matching_port="9999" api_port="8443" cybertrace_port="9997" scanners_count="5">'
        f"127.0.0.1</Balancer><Instances><Instance {instance}>127.0.0.1</Instance></Instances>{extra}</Config>"
    )


def load(text: str) -> Any:
    return balancer_config_from_xml(parse_xml(text.encode(), "kl_balancer.conf"))


def test_readiness_checks_are_on_unless_disabled() -> None:
    assert load(balancer_xml()).readiness is True
    assert load(balancer_xml('<ReadinessCheck enabled="false"/>')).readiness is False
    with pytest.raises(ConfigError, match="ReadinessCheck"):
        load(balancer_xml('<ReadinessCheck interval="5"/>'))


def test_an_instance_remembers_whether_its_api_port_was_written() -> None:
    assert load(balancer_xml()).instances[0].api_port_set is True
    portless = load(balancer_xml(instance='matching_port="10001"')).instances[0]
    assert (portless.api_port, portless.api_port_set) == (443, False)


def test_readyz_event_connections() -> None:
    assert parse_readiness(200, b'{"ready": true, "role": "standalone"}').event_connections == 1
    got = parse_readiness(200, b'{"ready": true, "role": "standalone", "event_connections": 4}')
    assert (got.event_connections, got.event_connections_said) == (4, None)
    got = parse_readiness(503, b'{"ready": false, "role": "standalone", "event_connections": 0}')
    assert (got.event_connections, got.event_connections_said) == (1, None)  # no worker ready: still one lane
    got = parse_readiness(200, b'{"ready": true, "role": "standalone", "event_connections": 99}')
    assert (got.event_connections, got.event_connections_said) == (64, 99)
    with pytest.raises(ValueError, match="event_connections is not a int"):
        parse_readiness(200, b'{"ready": true, "role": "standalone", "event_connections": "2"}')
