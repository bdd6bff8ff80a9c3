"""Tests for threatgate.balancer.statistics: /statz answers in, deployment windows and metrics out.

The core takes ``now`` from the test (a fake clock: plain numbers); the poller is driven through a
stand-in gateway, as the readiness monitor's tests do.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from threatgate.balancer.gateway import Answer
from threatgate.balancer.statistics import (
    DAY_MINUTES,
    MAX_KEYS,
    OTHER,
    Counts,
    Report,
    Statistics,
    StatisticsPoller,
    parse_statz,
)
from threatgate.config.balancer import InstanceSettings
from threatgate.errors import PinMismatch, UpstreamFailed
from threatgate.lb.instances import Instance
from threatgate.stats import BalancerStats, NodeStats, TopN, detection_statistics

T0 = 1_800_000_000.0  # a whole minute (divisible by 60)


def statz(detections: dict[str, int], since: int = 100, events: int = 0, top: dict[str, int] | None = None) -> bytes:
    stats = NodeStats(events=events, detections=sum(detections.values()), per_category=dict(detections))
    stats.per_source = {"feed": stats.detections} if stats.detections else {}
    stats.top_indicators = TopN(counts=dict(top or {}))
    return json.dumps(detection_statistics(stats, since)).encode()


def report(detections: dict[str, int], since: int = 100, events: int = 0, top: dict[str, int] | None = None) -> Report:
    return parse_statz(200, statz(detections, since, events, top))


# -- parsing -----------------------------------------------------------------------------------------------


def test_a_node_answer_is_read_whole() -> None:
    got = report({"C2": 2, "Phishing": 1}, since=7, events=9, top={"evil.example": 2, "bad.example": 1})
    assert got.since == 7
    assert got.counts == Counts(9, 3, {"C2": 2, "Phishing": 1}, {"feed": 3})
    assert got.top == (("evil.example", 2), ("bad.example", 1))


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (404, b"{}", "HTTP 404"),
        (200, b"<html>", "not JSON"),
        (200, b"[]", "no statistics object"),
        (200, b'{"detections": {"total": -1}, "events": 0, "since": 1}', "detections.total is not a count"),
        (200, b'{"detections": {"total": true}, "events": 0, "since": 1}', "detections.total is not a count"),
        (200, b'{"detections": {"total": 1, "by_category": {"a": "1"}}, "events": 0, "since": 1}', "by_category"),
        (200, b'{"detections": {"total": 1, "top_indicators": [["a"]]}, "events": 0, "since": 1}', "top_indicators"),
        (200, b'{"detections": {"total": 1}, "events": 0}', "since is not a count"),
    ],
)
def test_anything_else_is_refused_with_a_reason(status: int, body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_statz(status, body)


def test_too_many_categories_keep_the_largest_and_fold_the_rest() -> None:
    many = {f"c{i:04d}": i + 1 for i in range(MAX_KEYS + 50)}
    got = report(many).counts.by_category
    assert len(got) == MAX_KEYS
    assert got[OTHER] == sum(sorted(many.values())[:51])
    assert "c0299" in got and "c0000" not in got


# -- windows by difference --------------------------------------------------------------------------------


def test_the_first_answer_is_a_baseline_and_later_ones_count_by_difference() -> None:
    s = Statistics(started=T0)
    assert s.observe("a", T0, report({"C2": 100}, events=1000)).empty  # detected at unknown times: no window
    delta = s.observe("a", T0 + 5, report({"C2": 103, "Phishing": 1}, events=1010))
    assert delta == Counts(10, 4, {"C2": 3, "Phishing": 1}, {"feed": 4})
    s.observe("b", T0 + 1, report({}))
    s.observe("b", T0 + 6, report({"C2": 2}))
    hour = s.window(T0 + 10, 60)
    assert (hour.detections, hour.by_category) == (6, {"C2": 5, "Phishing": 1})
    assert s.accumulated().by_category == {"C2": 5, "Phishing": 1}


def test_a_node_started_after_the_balancer_began_watching_counts_whole() -> None:
    s = Statistics(started=T0)
    assert s.observe("old", T0 + 1, report({"C2": 50}, since=int(T0) - 3600)).empty  # baseline
    assert s.observe("new", T0 + 1, report({"C2": 5}, since=int(T0) + 1)).detections == 5
    assert s.window(T0 + 2, 60).detections == 5 and s.tracks["new"].restarts == 0


def test_a_restart_counts_from_zero_whether_since_changed_or_a_counter_went_down() -> None:
    s = Statistics(started=T0)
    s.observe("a", T0, report({"C2": 10}))
    s.observe("a", T0 + 1, report({"C2": 12}))
    assert s.observe("a", T0 + 2, report({"C2": 3}, since=200)).detections == 3  # new start: all of it is new
    assert s.observe("a", T0 + 3, report({"C2": 1}, since=200)).detections == 1  # went down, same since
    assert s.observe("a", T0 + 4, report({"Phishing": 1}, since=200)).detections == 1  # a category vanished
    s.observe("a", T0 + 5, report({"C2": 3, "Phishing": 1}, since=200))
    # One category went down though the total went up: restarted all the same.
    assert s.observe("a", T0 + 6, report({"C2": 1, "Phishing": 5}, since=200)).detections == 6
    assert s.tracks["a"].restarts == 4
    assert s.window(T0 + 7, 60).detections == 2 + 3 + 1 + 1 + 3 + 6
    assert s.accumulated().detections == 16  # monotonic: a Prometheus counter


def test_hour_and_day_windows_and_the_per_minute_series() -> None:
    s = Statistics(started=T0)
    s.observe("a", T0, report({}))
    total = 0
    # One detection a minute for two days: the hour holds 60, the day 1440, the ring no more than a day.
    for minute in range(1, 2 * DAY_MINUTES + 1):
        total += 1
        s.observe("a", T0 + minute * 60 + 1, report({"C2": total}))
    now = T0 + 2 * DAY_MINUTES * 60 + 30
    assert s.window(now, 60).detections == 60
    assert s.window(now, DAY_MINUTES).detections == DAY_MINUTES
    assert len(s.tracks["a"].buckets) == DAY_MINUTES
    series = s.series(now)
    assert len(series) == 60 and all(m["detections"] == 1 for m in series)
    assert series[-1]["minute"] == int(now // 60) * 60 and series[0]["minute"] == series[-1]["minute"] - 59 * 60
    # An hour later without any answer: nothing in the last hour, the day still counts what it saw.
    later = now + 3600
    assert s.window(later, 60).detections == 0
    assert s.window(later, DAY_MINUTES).detections == DAY_MINUTES - 60


def test_a_gap_in_the_polls_lands_in_the_minute_of_the_next_answer() -> None:
    s = Statistics(started=T0)
    s.observe("a", T0, report({"C2": 1}))
    s.failed("a", "cannot connect")
    assert s.tracks["a"].error == "cannot connect"
    s.observe("a", T0 + 600, report({"C2": 9}))
    series = s.series(T0 + 600)
    assert [m["detections"] for m in series if m["detections"]] == [8]
    assert series[-1]["detections"] == 8 and s.tracks["a"].error is None


def test_a_removed_instance_keeps_its_counts_in_the_counters_but_leaves_the_windows() -> None:
    s = Statistics(started=T0)
    s.observe("a", T0, report({}))
    s.observe("a", T0 + 1, report({"C2": 4}))
    s.keep_only(["b"])
    assert "a" not in s.tracks
    assert s.accumulated().by_category == {"C2": 4}
    assert s.window(T0 + 2, 60).detections == 0


def test_the_report_sums_instances_and_merges_their_top_indicators() -> None:
    s = Statistics(started=T0)
    for key, top in (("a", {"evil.example": 5, "x.example": 1}), ("b", {"evil.example": 1, "10.0.0.1": 3})):
        s.observe(key, T0, report({}))
        s.observe(key, T0 + 1, report({"C2": 2}, events=4, top=top))
    s.failed("b", "timed out")
    got = s.report(T0 + 2)
    assert got["last_hour"]["detections"] == 4 and got["last_day"]["by_category"] == {"C2": 4}
    assert got["nodes_total"]["events"] == 8
    assert got["top_indicators"] == [["evil.example", 6], ["10.0.0.1", 3], ["x.example", 1]]
    assert got["instances"]["a"]["last_hour"]["detections"] == 2 and got["instances"]["a"]["error"] is None
    assert got["instances"]["b"]["error"] == "timed out" and got["instances"]["b"]["age"] == 1.0
    json.dumps(got)  # JSON-ready for the console


# -- the poller -----------------------------------------------------------------------------------------


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


def make_poller(clock: list[float], readiness: bool = True) -> tuple[StatisticsPoller, StandInGateway, list[str]]:
    instances = {}
    for port, enabled, api in ((9000, True, True), (9100, True, True), (9200, False, True), (9300, True, False)):
        s = InstanceSettings(host="127.0.0.1", matching_port=port, api_port=port + 1, api_port_set=api, enabled=enabled)
        instances[s.key] = Instance(s, rise=1, fall=1)
    service = SimpleNamespace(
        config=SimpleNamespace(readiness=readiness, health=SimpleNamespace(interval=1.0, timeout=1.0)),
        instances=instances,
        stats=BalancerStats(),
    )
    gateway = StandInGateway()
    poller = StatisticsPoller(service, gateway, clock=lambda: clock[0])  # type: ignore[arg-type]
    return poller, gateway, list(instances)


def poller_inst(poller: StatisticsPoller, key: str) -> Instance:
    return poller.service.instances[key]


def scrape(poller: StatisticsPoller) -> dict[str, float]:
    class One(Collector):
        def collect(self) -> Any:
            return poller.families()

    registry = CollectorRegistry()
    registry.register(One())
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def test_the_poller_asks_the_enabled_instances_with_an_api_port_and_fills_the_metrics() -> None:
    clock = [T0]
    poller, gateway, keys = make_poller(clock)
    a, b = keys[0], keys[1]
    gateway.answers = {a: Answer(200, {}, statz({"C2": 1})), b: UpstreamFailed("cannot connect")}
    await poller.poll()
    assert sorted(gateway.asked) == [(a, "GET", "/statz"), (b, "GET", "/statz")]
    clock[0] += 2
    gateway.answers = {
        a: Answer(200, {}, statz({"C2": 4}, events=7)),
        b: PinMismatch(poller_inst(poller, b), "AA", "BB"),
    }
    await poller.poll()
    got = poller.report()
    assert got["last_hour"]["by_category"] == {"C2": 3}
    assert got["instances"][b]["error"] == "certificate mismatch: pinned AA, presented BB"
    metrics = scrape(poller)
    assert metrics['threatgate_balancer_deployment_detections_total{category="C2"}'] == 3
    assert metrics['threatgate_balancer_deployment_source_detections_total{source="feed"}'] == 3
    assert metrics[f'threatgate_balancer_instance_detections_total{{instance="{a}"}}'] == 3
    assert metrics["threatgate_balancer_deployment_events_total"] == 7
    clock[0] += 2
    gateway.answers[a] = Answer(404, {}, b'{"error": "unsupported request"}')
    await poller.poll()
    assert poller.report()["instances"][a]["error"] == "unexpected /statz answer: HTTP 404"


async def test_no_polls_while_readiness_checks_are_off() -> None:
    poller, gateway, _ = make_poller([T0], readiness=False)
    await poller.poll()
    assert gateway.asked == [] and poller.report()["instances"] == {}
