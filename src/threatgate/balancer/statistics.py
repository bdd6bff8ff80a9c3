"""Detection statistics for the whole deployment: every node's ``/statz``, summed over time and nodes.

Why: in CyberTrace's High Availability mode "you cannot view detection statistics for all instances on
any particular instance" (issue 16).  Each node counts its detections (by category, by feed or supplier,
and the most matched indicators in a bounded sketch) since it started and answers them, unauthenticated
like ``/readyz``, at ``GET /statz``.  The balancer polls every instance it polls for readiness, over the
gateway's pinned TLS (:meth:`Gateway.forward`), and this module answers windows by difference.

Theory of operation (:class:`Statistics`, sans-IO: every method takes ``now``):
- A node's counters are cumulative since its start (``since``).  Each poll's answer minus the previous
  one is what the node detected meanwhile; it is added to the instance's bucket of the current minute.
  A node that restarted (``since`` changed, or a counter went down) counts from zero: its whole answer
  is new.  The first answer of an instance that started before the balancer began watching (balancer
  just started, instance just added) is a baseline: its detections happened at unknown times, so they
  are in no window; one that started after (``since`` later than ``started``) counts whole.
- Buckets are one per minute, a day of them per instance at most (:data:`DAY_MINUTES`): the last hour
  and the last day are sums of buckets, the chart's per-minute series the last hour's buckets.  What a
  node detected while it could not be polled lands in the minute of the next answer.
- Deployment figures are sums over instances.  ``accumulated`` (every delta since the balancer
  started, kept for removed instances too) only goes up: it backs the Prometheus counters.
- The top indicators are each node's sketch (cumulative since its start), merged: not windowed.

Label sets stay bounded: a node's categories and sources come from its configuration; an answer with
more than :data:`MAX_KEYS` of them keeps the largest and folds the rest into ``(other)``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, Metric

from threatgate import runtime
from threatgate.balancer.upstream import BalancerView, json_answer
from threatgate.errors import PinMismatch, UpstreamFailed
from threatgate.lb.instances import Instance
from threatgate.log import RateLimitedLog
from threatgate.stats import TOP_INDICATORS, TopN

log = logging.getLogger("threatgate.balancer")

MINUTE = 60
HOUR_MINUTES = 60
DAY_MINUTES = 24 * 60
MAX_KEYS = 256
"""Categories (and sources) kept of one answer: a node's are bounded by its config; more is a broken node."""
OTHER = "(other)"
STATZ_HEADERS = {"Accept": "application/json"}


@dataclass(slots=True)
class Counts:
    """Detections (total, by category, by source) and events: one node's cumulative answer, or a delta."""

    events: int = 0
    detections: int = 0
    by_category: dict[str, int] = field(default_factory=dict)
    by_source: dict[str, int] = field(default_factory=dict)

    def add(self, other: Counts) -> None:
        self.events += other.events
        self.detections += other.detections
        for mine, theirs in ((self.by_category, other.by_category), (self.by_source, other.by_source)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n

    def since(self, before: Counts) -> Counts | None:
        """What was counted after ``before`` (an earlier answer of the same node); None when a counter went
        down (the node restarted: its counters started again from zero)."""
        delta = Counts(self.events - before.events, self.detections - before.detections)
        for mine, theirs, out in (
            (self.by_category, before.by_category, delta.by_category),
            (self.by_source, before.by_source, delta.by_source),
        ):
            if any(key not in mine for key in theirs):
                return None
            for key, n in mine.items():
                d = n - theirs.get(key, 0)
                if d < 0:
                    return None
                if d:
                    out[key] = d
        return delta if delta.events >= 0 and delta.detections >= 0 else None

    @property
    def empty(self) -> bool:
        return not (self.events or self.detections)

    def as_dict(self) -> dict[str, Any]:
        return {
            "detections": self.detections,
            "events": self.events,
            "by_category": dict(sorted(self.by_category.items())),
            "by_source": dict(sorted(self.by_source.items())),
        }


@dataclass(frozen=True, slots=True)
class Report:
    """One ``/statz`` answer, validated."""

    since: int
    counts: Counts
    top: tuple[tuple[str, int], ...] = ()


def parse_statz(status: int, body: bytes) -> Report:
    """A node's ``/statz`` answer.

    Raises:
        ValueError: anything but a 200 with the documented object (an older node answers 404).
    """
    data = json_answer(status, body)
    if not isinstance(data, dict) or not isinstance(data.get("detections"), dict):
        raise ValueError("no statistics object")
    det = data["detections"]
    top = det.get("top_indicators", [])
    if not isinstance(top, list) or not all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and _count(p[1]) for p in top
    ):
        raise ValueError("top_indicators is not a list of [indicator, count]")
    counts = Counts(
        events=_number(data.get("events"), "events"),
        detections=_number(det.get("total"), "detections.total"),
        by_category=_table(det.get("by_category"), "by_category"),
        by_source=_table(det.get("by_source"), "by_source"),
    )
    kept = TopN(TOP_INDICATORS)
    kept.update({k: n for k, n in top[: TOP_INDICATORS * 2]})
    return Report(_number(data.get("since"), "since"), counts, tuple(kept.top()))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any, name: str) -> int:
    if not _count(value):
        raise ValueError(f"{name} is not a count")
    return int(value)


def _table(value: Any, name: str) -> dict[str, int]:
    """``{key: count}``, at most :data:`MAX_KEYS` keys (the largest; the rest summed as ``(other)``)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and _count(n) for k, n in value.items()):
        raise ValueError(f"{name} is not a table of counts")
    if len(value) <= MAX_KEYS:
        return dict(value)
    ranked = sorted(value.items(), key=lambda kv: (-kv[1], kv[0]))
    table = dict(ranked[: MAX_KEYS - 1])
    table[OTHER] = table.get(OTHER, 0) + sum(n for _, n in ranked[MAX_KEYS - 1 :])
    return table


@dataclass(slots=True)
class Track:
    """One instance's statistics: its last answer, a day of per-minute deltas, and what it added in all."""

    last: Report | None = None
    buckets: deque[tuple[int, Counts]] = field(default_factory=lambda: deque(maxlen=DAY_MINUTES))
    accumulated: Counts = field(default_factory=Counts)
    restarts: int = 0
    polled_at: float | None = None  # the last good answer (balancer clock)
    error: str | None = None  # why the last poll failed (None: it answered)

    def window(self, now: float, minutes: int) -> Counts:
        """Detections of the last ``minutes`` minutes (the current minute included)."""
        first = int(now // MINUTE) - minutes + 1
        total = Counts()
        for minute, counts in reversed(self.buckets):
            if minute < first:
                break
            total.add(counts)
        return total


class Statistics:
    """The deployment's detection statistics (sans-IO: answers in, figures out)."""

    def __init__(self, started: float = 0.0) -> None:
        self.started = started  # when the balancer began watching (Unix s): a node started later counts whole
        self.tracks: dict[str, Track] = {}
        self.retired = Counts()  # what removed instances added: the counters never go back

    def observe(self, key: str, now: float, report: Report) -> Counts:
        """Take one answer of instance ``key``; returns what it adds to the windows (empty for a baseline)."""
        track = self.tracks.setdefault(key, Track())
        last, track.last = track.last, report
        track.polled_at, track.error = now, None
        if last is None and report.since < self.started:
            return Counts()
        delta = report.counts.since(last.counts) if last is not None and report.since == last.since else None
        if delta is None:  # restarted, or started while watched: everything it counted is new
            track.restarts += last is not None
            delta = Counts()
            delta.add(report.counts)
        if delta.empty:
            return delta
        minute = int(now // MINUTE)
        if track.buckets and track.buckets[-1][0] == minute:
            track.buckets[-1][1].add(delta)
        else:
            bucket = Counts()
            bucket.add(delta)
            track.buckets.append((minute, bucket))
        track.accumulated.add(delta)
        return delta

    def failed(self, key: str, why: str) -> None:
        """A poll of ``key`` got no answer: its figures are kept, marked stale."""
        self.tracks.setdefault(key, Track()).error = why

    def keep_only(self, keys: Iterable[str]) -> None:
        """Forget instances no longer configured (a reload removed them); what they added stays counted."""
        wanted = set(keys)
        for key in [k for k in self.tracks if k not in wanted]:
            self.retired.add(self.tracks.pop(key).accumulated)

    def accumulated(self) -> Counts:
        """Every delta since the balancer started, over all instances (removed ones included): monotonic."""
        total = Counts()
        total.add(self.retired)
        for track in self.tracks.values():
            total.add(track.accumulated)
        return total

    def window(self, now: float, minutes: int) -> Counts:
        total = Counts()
        for track in self.tracks.values():
            total.add(track.window(now, minutes))
        return total

    def series(self, now: float, minutes: int = HOUR_MINUTES) -> list[dict[str, Any]]:
        """The last ``minutes`` minutes, oldest first, one entry per minute (empty minutes included)."""
        current = int(now // MINUTE)
        per_minute: dict[int, Counts] = {}
        for track in self.tracks.values():
            for minute, counts in track.buckets:
                if minute > current - minutes:
                    per_minute.setdefault(minute, Counts()).add(counts)
        out = []
        for minute in range(current - minutes + 1, current + 1):
            counts = per_minute.get(minute, Counts())
            out.append(
                {
                    "minute": minute * MINUTE,
                    "detections": counts.detections,
                    "by_category": dict(sorted(counts.by_category.items())),
                }
            )
        return out

    def top_indicators(self, n: int = TOP_INDICATORS) -> list[tuple[str, int]]:
        """The most matched indicators over every node (each node's since its start), merged."""
        sketches = (TopN(TOP_INDICATORS, dict(t.last.top)) for t in self.tracks.values() if t.last is not None)
        return TopN.merged(sketches).top(n)

    def report(self, now: float) -> dict[str, Any]:
        """Everything the console shows (``BalancerService.detection_statistics``): JSON-ready."""
        instances = {}
        for key, track in sorted(self.tracks.items()):
            last = track.last
            instances[key] = {
                "since": last.since if last is not None else None,
                "total": last.counts.as_dict() if last is not None else None,
                "last_hour": track.window(now, HOUR_MINUTES).as_dict(),
                "last_day": track.window(now, DAY_MINUTES).as_dict(),
                "restarts": track.restarts,
                "age": round(now - track.polled_at, 3) if track.polled_at is not None else None,
                "error": track.error,
            }
        current = Counts()
        for track in self.tracks.values():
            if track.last is not None:
                current.add(track.last.counts)
        return {
            "at": now,
            "last_hour": self.window(now, HOUR_MINUTES).as_dict(),
            "last_day": self.window(now, DAY_MINUTES).as_dict(),
            "per_minute": self.series(now),
            "nodes_total": current.as_dict(),  # each node's counters since its own start, summed
            "top_indicators": [[k, n] for k, n in self.top_indicators()],
            "instances": instances,
        }

    def families(self) -> Iterator[Metric]:
        """The deployment-wide Prometheus counters (sums of deltas since the balancer started)."""
        total = self.accumulated()
        events = CounterMetricFamily(
            "threatgate_balancer_deployment_events", "Events matched by all nodes (from their /statz)"
        )
        events.add_metric([], total.events)
        yield events
        yield _labelled(
            "threatgate_balancer_deployment_detections",
            "Detections by all nodes, by category (from their /statz)",
            "category",
            total.by_category,
        )
        yield _labelled(
            "threatgate_balancer_deployment_source_detections",
            "Detections by all nodes, by feed or API supplier (from their /statz)",
            "source",
            total.by_source,
        )
        yield _labelled(
            "threatgate_balancer_instance_detections",
            "Detections by each node while the balancer watched it (from its /statz)",
            "instance",
            {key: track.accumulated.detections for key, track in self.tracks.items()},
        )


def _labelled(name: str, documentation: str, label: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    """One counter family with a sample per key, in key order."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, n in sorted(counts.items()):
        family.add_metric([key], n)
    return family


class Answer(Protocol):
    @property
    def status(self) -> int: ...
    @property
    def body(self) -> bytes: ...


class StatzClient(Protocol):
    """The gateway as the poller uses it: one request over the instance's pinned TLS connection."""

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
    ) -> Answer: ...


class StatisticsHost(BalancerView, Protocol):
    """What :class:`StatisticsPoller` reads of the balancer (``BalancerService`` is one)."""


class StatisticsPoller:
    """Polls every instance's ``/statz`` each health-check interval, into a :class:`Statistics`.

    The same instances as the readiness checks: enabled, with ``api_port``, and only while
    ``<ReadinessCheck>`` is on (off: the nodes may not be threatgate nodes).
    """

    def __init__(self, service: StatisticsHost, client: StatzClient, clock: Callable[[], float] | None = None) -> None:
        self.service = service
        self.client = client
        self._clock: Callable[[], float] = clock or time.time
        self.statistics = Statistics(started=self._clock())
        self._warn = RateLimitedLog(log, logging.INFO, interval=300)
        self._periodic = runtime.Periodic(
            "statistics polls", self.poll, lambda: self.service.config.health.interval, log
        )

    def start(self) -> None:
        self._periodic.start()

    async def close(self) -> None:
        await self._periodic.close()

    async def poll(self) -> None:
        """Ask every polled instance once (concurrently); forget instances a reload removed."""
        instances = self.service.instances
        self.statistics.keep_only(instances)
        if not self.service.config.readiness:
            return
        asked = [i for i in instances.values() if i.settings.enabled and i.settings.api_port_set]
        await asyncio.gather(*(self._poll_one(inst) for inst in asked))

    async def _poll_one(self, inst: Instance) -> None:
        timeout = self.service.config.health.timeout
        try:
            answer = await self.client.forward(inst, "GET", "/statz", STATZ_HEADERS, b"", timeout, probe=True)
            report = parse_statz(answer.status, answer.body)
        except PinMismatch as exc:
            why = exc.reason
        except (UpstreamFailed, ValueError) as exc:
            why = str(exc) if isinstance(exc, UpstreamFailed) else f"unexpected /statz answer: {exc}"
        else:
            self.statistics.observe(inst.key, self._clock(), report)
            return
        self.statistics.failed(inst.key, why)
        self._warn("instance %s: no detection statistics (%s)", inst.key, why)

    def report(self) -> dict[str, Any]:
        return self.statistics.report(self._clock())

    def families(self) -> Iterator[Metric]:
        yield from self.statistics.families()
