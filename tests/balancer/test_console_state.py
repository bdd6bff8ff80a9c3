"""balancer/console_state.py: the console's state from plain inputs (no balancer, no sockets)."""

from __future__ import annotations

from typing import Any

from threatgate.balancer.alerts import AlertRecord
from threatgate.balancer.console_state import PinInfo, RateMeter, Totals, build_state, cluster_state
from threatgate.balancer.readiness import Readiness, View

A, B, C = "127.0.0.1:10001", "127.0.0.1:10002", "127.0.0.1:10003"
D1, D2 = "a" * 64, "b" * 64


def row(key: str, state: str = "UP", why: str = "", **counts: int) -> dict[str, Any]:
    base = {"inflight": 0, "dispatched": 0, "answered": 0, "redispatched": 0, "lanes": 1, "weight": 1}
    return {"instance": key, "state": state, "why": why, **base, **counts}


def view(key: str, role: str = "standalone", sha256: str | None = None, **fields: Any) -> View:
    return View(key, api="443", answer=Readiness(ready=True, role=role, sha256=sha256, **fields))


def totals(**kw: Any) -> Totals:
    base: dict[str, Any] = {
        "clients": 0,
        "events_in": 0,
        "events_out": 0,
        "detections": 0,
        "dispatched": 0,
        "redispatched": 0,
        "backlog": 0,
        "pending": 0,
        "dropped": {},
        "dropped_lines": {},
        "unmatched": {},
    }
    return Totals(**{**base, **kw})


def state(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "now": 100.0,
        "wall": 1.7e9,
        "rows": [row(A), row(B)],
        "views": {},
        "pins": {},
        "last_errors": {},
        "totals": totals(),
        "alerts": [],
        "alert_counts": {},
        "detections": {},
        "meter": RateMeter(),
        "user": "ops",
    }
    return build_state(**{**args, **kw})


def test_instances_with_state_why_pin_and_last_error() -> None:
    got = state(
        rows=[row(A, answered=5, inflight=2, redispatched=1), row(B, "DOWN", "cannot connect: refused")],
        pins={A: PinInfo("AB:CD", "pinned"), B: PinInfo("EF:01", "refused: pinned EF:01, presented 23:45")},
        last_errors={B: "cannot connect: refused"},
    )
    a, b = got["instances"]
    assert (a["instance"], a["state"], a["inflight"], a["answered"], a["redispatched"]) == (A, "UP", 2, 5, 1)
    assert (a["pin"], a["pin_state"], a["last_error"]) == ("AB:CD", "pinned", "")
    assert (b["state"], b["why"], b["last_error"]) == ("DOWN", "cannot connect: refused", "cannot connect: refused")
    assert b["pin_state"].startswith("refused")
    assert got["summary"] == {"UP": 1, "DOWN": 1, "DRAIN": 0, "MAINT": 0}
    assert got["user"] == "ops"


def test_an_instance_without_a_pin_or_a_view() -> None:
    [a, _] = state()["instances"]
    assert (a["pin"], a["pin_state"], a["role"], a["digest"], a["readiness"]) == (
        None,
        "not pinned yet",
        "unknown",
        None,
        "not polled",
    )


def test_a_differing_digest_is_flagged() -> None:
    views = {A: view(A, "control", D1, revision=7, epoch=2), B: view(B, "secondary", D1), C: view(C, "secondary", D2)}
    got = state(rows=[row(A), row(B), row(C)], views=views)
    flags = {i["instance"]: i["digest_differs"] for i in got["instances"]}
    assert flags == {A: False, B: False, C: True}
    assert got["instances"][0]["digest"] == D1[:12] and got["instances"][0]["revision"] == 7
    assert got["digests"] == {"majority": D1[:12], "differing": [C]}


def test_agreeing_digests_flag_nothing() -> None:
    views = {A: view(A, "control", D1), B: view(B, "secondary", D1)}
    got = state(views=views)
    assert not any(i["digest_differs"] for i in got["instances"])
    assert got["digests"]["differing"] == []


def test_a_readiness_error_is_the_last_error_when_the_dispatcher_has_none() -> None:
    views = {A: View(A, api="443", error="cannot connect: timed out")}
    [a, _] = state(views=views)["instances"]
    assert a["last_error"] == "cannot connect: timed out"
    assert a["readiness"].startswith("unreachable")


def test_rates_are_measured_over_a_window() -> None:
    meter = RateMeter(window=1.0)
    state(now=0.0, rows=[row(A, answered=0)], totals=totals(events_in=0, events_out=0), meter=meter)
    half = state(now=0.5, rows=[row(A, answered=50)], totals=totals(events_in=80), meter=meter)
    assert half["totals"]["eps_in"] == 0  # not a window yet
    got = state(now=2.0, rows=[row(A, answered=300)], totals=totals(events_in=400, events_out=300), meter=meter)
    assert got["totals"]["eps_in"] == 200.0
    assert got["totals"]["eps_answered"] == 150.0
    assert got["instances"][0]["eps"] == 150.0
    again = state(now=2.2, rows=[row(A, answered=300)], totals=totals(events_in=400, events_out=300), meter=meter)
    assert again["totals"]["eps_in"] == 200.0  # kept until the next window


def test_a_removed_instance_is_forgotten_by_the_meter() -> None:
    meter = RateMeter()
    state(now=0.0, meter=meter)
    state(now=2.0, rows=[row(A)], meter=meter)
    assert "answered:" + B not in meter._marks


def test_totals_and_drops() -> None:
    got = state(
        totals=totals(clients=3, detections=12, backlog=4, pending=9, dropped={"no_reply_back": 2}, unmatched={"x": 1})
    )
    t = got["totals"]
    assert (t["clients"], t["detections"], t["backlog"], t["pending"]) == (3, 12, 4, 9)
    assert t["dropped"] == {"no_reply_back": 2} and t["unmatched"] == {"x": 1}


def test_alerts_latest_first_and_counts_by_number() -> None:
    alerts = [AlertRecord(1.0, "p:1", "KL_ALERT_A", "one"), AlertRecord(2.0, "p:1", "KL_ALERT_B", "two")]
    got = state(alerts=alerts, alert_counts={"KL_ALERT_A": 1, "KL_ALERT_B": 5})
    assert [a["line"] for a in got["alerts"]["recent"]] == ["two", "one"]
    assert list(got["alerts"]["counts"]) == ["KL_ALERT_B", "KL_ALERT_A"]


def test_detection_statistics_are_passed_through() -> None:
    stats = {"hour": {"malicious_url": 3}, "per_instance": {A: 3}}
    assert state(detections=stats)["detections"] == stats
    assert state()["detections"] == {}


def test_cluster_state() -> None:
    assert cluster_state([view(A), view(B)])["mode"] == "standalone"
    views = [view(A, "control", D1, epoch=3, cluster_id="c1"), view(B, "secondary", D1, epoch=3)]
    got = cluster_state(views)
    assert got == {
        "mode": "cluster",
        "cluster_id": "c1",
        "control": A,
        "epoch": 3,
        "emergency": [],
        "writes": f"the Control {A}",
    }
    frozen = cluster_state([view(B, "secondary", D1, epoch=4, emergency="no Control since 12:00")])
    assert frozen["control"] is None and frozen["emergency"] == [f"{B}: no Control since 12:00"]
    assert "no Control node" in frozen["writes"]
