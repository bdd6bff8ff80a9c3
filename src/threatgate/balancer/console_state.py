"""What the operator console shows, as one JSON-ready dict: built from plain inputs, no I/O.

The handlers (balancer/console.py) gather the inputs from the balancer's parts (instance rows,
readiness views, pins, counters, alerts, detection statistics) and :func:`build_state` decides
what the page says: each instance's state and why, its role and settings digest (a digest that
differs from the majority's is flagged), its pin, rates; the totals; the cluster; the alerts.
Rates ("events/s now") come from :class:`RateMeter`, which is fed the counters and ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from threatgate.balancer.alerts import AlertRecord
from threatgate.balancer.readiness import View, compare_digests, route_write, short

RATE_WINDOW = 1.0
"""Seconds a rate is measured over at least: several viewers asking at once see one rate, not noise."""


@dataclass(frozen=True, slots=True)
class PinInfo:
    """An instance's pin as the gateway holds it: the fingerprint (None: not pinned yet) and its state."""

    fingerprint: str | None
    state: str  # "pinned", "not pinned yet", "refused: <why>", "unreadable: <why>"


@dataclass(slots=True)
class RateMeter:
    """Per-second rates of growing counters, each measured over at least :data:`RATE_WINDOW` seconds."""

    window: float = RATE_WINDOW
    _marks: dict[str, tuple[float, int]] = field(default_factory=dict)
    _rates: dict[str, float] = field(default_factory=dict)

    def rate(self, key: str, value: int, now: float) -> float:
        mark = self._marks.get(key)
        if mark is None:
            self._marks[key] = (now, value)
            return 0.0
        then, before = mark
        if now - then >= self.window:
            self._rates[key] = max(0.0, (value - before) / (now - then))
            self._marks[key] = (now, value)
        return self._rates.get(key, 0.0)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the counters not in ``keep`` (instances removed by a reload)."""
        kept = set(keep)
        for table in (self._marks, self._rates):
            for key in [k for k in table if k not in kept]:
                del table[key]


@dataclass(frozen=True, slots=True)
class Totals:
    """The balancer's own figures (BalancerStats and the dispatcher's queues)."""

    clients: int
    events_in: int
    events_out: int
    detections: int
    dispatched: int
    redispatched: int
    backlog: int
    pending: int
    dropped: Mapping[str, int]
    dropped_lines: Mapping[str, int]
    unmatched: Mapping[str, int]


def cluster_state(views: Sequence[View]) -> dict[str, Any]:
    """Control, epoch, emergency mode and where REST writes go, from the readiness views."""
    current = [(v.key, v.current) for v in views if v.skip is None]
    members = [(k, r) for k, r in current if r is not None and r.in_cluster]
    if not members:
        return {"mode": "standalone", "control": None, "epoch": None, "emergency": [], "writes": "every enabled node"}
    controls = sorted(((r.epoch or 0, k) for k, r in members if r.role == "control"), reverse=True)
    epochs = [r.epoch for _, r in members if r.epoch is not None]
    emergency = [f"{k}: {r.emergency}" for k, r in members if r.emergency]
    route = route_write(views)
    writes = route.refusal or (f"the Control {route.control}" if route.control else "every enabled node")
    return {
        "mode": "cluster",
        "cluster_id": next((r.cluster_id for _, r in members if r.cluster_id), None),
        "control": controls[0][1] if controls else None,
        "epoch": max(epochs) if epochs else None,
        "emergency": emergency,
        "writes": writes,
    }


def instance_state(
    row: Mapping[str, Any],
    view: View | None,
    pin: PinInfo,
    last_error: str,
    differing: bool,
    eps: float,
) -> dict[str, Any]:
    """One instance's line of the console (``row``: :func:`threatgate.balancer.admin.instance_row`)."""
    current = view.current if view is not None else None
    digest = current.sha256 if current is not None else None
    return {
        "instance": row["instance"],
        "state": row["state"],
        "why": row["why"],
        "role": view.role if view is not None else "unknown",
        "readiness": view.state if view is not None else "not polled",
        "revision": current.revision if current is not None else None,
        "digest": short(digest) if digest else None,
        "digest_differs": differing,
        "pin": pin.fingerprint,
        "pin_state": pin.state,
        "eps": round(eps, 1),
        "inflight": row["inflight"],
        "dispatched": row["dispatched"],
        "answered": row["answered"],
        "redispatched": row["redispatched"],
        "lanes": row["lanes"],
        "weight": row["weight"],
        "last_error": last_error or (view.error if view is not None and view.error else "") or "",
    }


def build_state(
    *,
    now: float,
    wall: float,
    rows: Sequence[Mapping[str, Any]],
    views: Mapping[str, View],
    pins: Mapping[str, PinInfo],
    last_errors: Mapping[str, str],
    totals: Totals,
    alerts: Sequence[AlertRecord],
    alert_counts: Mapping[str, int],
    detections: Mapping[str, Any],
    meter: RateMeter,
    user: str,
) -> dict[str, Any]:
    """The console's whole state (``/console/api/state``, and each server-sent event)."""
    comparison = compare_digests(views.values())
    differing = set(comparison.differing) if comparison.mismatch else set()
    instances = [
        instance_state(
            row,
            views.get(row["instance"]),
            pins.get(row["instance"], PinInfo(None, "not pinned yet")),
            last_errors.get(row["instance"], ""),
            row["instance"] in differing,
            meter.rate("answered:" + row["instance"], row["answered"], now),
        )
        for row in rows
    ]
    keys = [row["instance"] for row in rows]
    meter.forget([*(f"answered:{k}" for k in keys), "in", "out", "detections"])
    states = [i["state"] for i in instances]
    return {
        "time": wall,
        "user": user,
        "summary": {s: states.count(s) for s in ("UP", "DOWN", "DRAIN", "MAINT")},
        "instances": instances,
        "digests": {
            "majority": short(comparison.majority) if comparison.majority else None,
            "differing": sorted(differing),
        },
        "totals": {
            "clients": totals.clients,
            "events_in": totals.events_in,
            "events_answered": totals.events_out,
            "detections": totals.detections,
            "dispatched": totals.dispatched,
            "redispatched": totals.redispatched,
            "eps_in": round(meter.rate("in", totals.events_in, now), 1),
            "eps_answered": round(meter.rate("out", totals.events_out, now), 1),
            "backlog": totals.backlog,
            "pending": totals.pending,
            "dropped": dict(totals.dropped),
            "dropped_lines": dict(totals.dropped_lines),
            "unmatched": dict(totals.unmatched),
        },
        "cluster": cluster_state(list(views.values())),
        "alerts": {
            "recent": [{"time": a.time, "peer": a.peer, "name": a.name, "line": a.line} for a in reversed(alerts)],
            "counts": dict(sorted(alert_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        },
        "detections": dict(detections),
    }
