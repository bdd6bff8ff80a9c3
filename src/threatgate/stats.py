"""The counters of a node and of the balancer: plain integers on the hot path (metrics.py exports them).

Apart from metrics.py so a node's worker process counts without importing prometheus-client or
aiohttp: its counters travel to the master (node/pool.py), which sums them (:func:`sum_stats`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

K = TypeVar("K", str, tuple[str, str])

TOP_INDICATORS = 100
"""Matched indicators a process keeps counts of (:class:`TopN`): bounded memory whatever the traffic."""
INDICATOR_CHARS = 256
"""Characters of an indicator kept as a :class:`TopN` key (a long URL is cut: the key stays small)."""

Gauges = dict[str, tuple[str, Callable[[], float]]]
LabelledGauges = dict[str, tuple[str, str, Callable[[], dict[str, float]]]]
"""name -> (help, label name, getter of label value -> value), read at scrape time."""


@dataclass(slots=True)
class BoundaryStats:
    """Counters every service keeps at its edges: bad input by reason, connections by outcome, and
    output lines dropped by destination and reason (threatgate.net.sender)."""

    bad_input: dict[str, int] = field(default_factory=dict)  # reason -> count
    connections: dict[str, int] = field(default_factory=dict)  # outcome -> count
    output_dropped: dict[tuple[str, str], int] = field(default_factory=dict)  # (destination, reason) -> lines

    def bump(self, table: dict[K, int], key: K, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n

    def drop_lines(self, destination: str, reason: str, lines: int) -> None:
        key = (destination, reason)
        self.output_dropped[key] = self.output_dropped.get(key, 0) + lines


@dataclass(slots=True)
class TopN:
    """The most frequent keys of a stream in bounded memory: the space-saving sketch (Metwally et al.).

    Why a sketch: matched indicators are unbounded (every URL of a feed may match once), so they are not
    a Prometheus label nor a plain table; the operator wants the heavy hitters.  At most ``capacity``
    counters are kept; a new key when full takes the place of the smallest, starting from its count.
    Counts are exact while fewer than ``capacity`` distinct keys were seen; beyond that a kept count may
    overestimate by at most the smallest count kept, and any key seen more than total/capacity times is
    kept.  Sketches merge (:meth:`merged`) so a node sums its workers' and a balancer its nodes'.
    """

    capacity: int = TOP_INDICATORS
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, n: int = 1) -> None:
        key = key[:INDICATOR_CHARS]
        counts = self.counts
        if key in counts:
            counts[key] += n
        elif len(counts) < self.capacity:
            counts[key] = n
        else:
            smallest = min(counts, key=counts.__getitem__)  # O(capacity), once per batch and new key at most
            counts[key] = counts.pop(smallest) + n

    def update(self, table: dict[str, int]) -> None:
        for key, n in table.items():
            self.add(key, n)

    def top(self, n: int | None = None) -> list[tuple[str, int]]:
        """The kept keys, most frequent first (ties by key, so the order is stable)."""
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return ranked if n is None else ranked[:n]

    @classmethod
    def merged(cls, parts: Iterable[TopN], capacity: int = TOP_INDICATORS) -> TopN:
        """The sketch of the union of the parts' streams: counts added key by key, the largest kept
        (pure; the parts are not changed)."""
        table: dict[str, int] = {}
        for part in parts:
            for key, n in part.counts.items():
                table[key] = table.get(key, 0) + n
        kept = sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))[:capacity]
        return cls(capacity, dict(kept))


@dataclass(slots=True)
class NodeStats(BoundaryStats):
    """Every counter a node exports (names in docs/operations.md)."""

    events: int = 0
    detections: int = 0
    suppressed: int = 0
    ignored: int = 0
    finished_lines: int = 0
    per_category: dict[str, int] = field(default_factory=dict)
    per_source: dict[str, int] = field(default_factory=dict)  # feed or API supplier -> detections
    top_indicators: TopN = field(default_factory=TopN)  # matched indicators -> detections (heavy hitters)
    feed_records: dict[str, int] = field(default_factory=dict)  # feed -> records in the live store
    feed_malformed: dict[str, int] = field(default_factory=dict)  # feed -> malformed records, last load
    feed_skipped: dict[str, int] = field(default_factory=dict)  # feed -> unsupported records skipped, last load
    feed_failures: dict[str, int] = field(default_factory=dict)  # feed -> failed loads
    feed_read_failures: dict[str, int] = field(default_factory=dict)  # feed -> records not read back (lost hits)
    feed_loaded_at: dict[str, int] = field(default_factory=dict)  # enabled feed -> last good load (Unix s, 0 never)
    snapshot_rebuilds: dict[tuple[str, str], int] = field(default_factory=dict)  # (feed, reason) -> refused files
    snapshot_loads: dict[tuple[str, str], int] = field(default_factory=dict)  # (feed, "mapped"|"built") -> versions
    reloads: int = 0
    alerts: dict[str, int] = field(default_factory=dict)
    api_requests: dict[str, int] = field(default_factory=dict)  # HTTP status -> count (probes not included)
    api_probes: dict[str, int] = field(default_factory=dict)  # /healthz, /readyz -> requests (load balancers)
    engine_events: dict[str, int] = field(default_factory=dict)  # compiled / confirmed / reference -> events
    lookups: int = 0  # objects looked up through the REST API
    lookup_detections: int = 0


MASTER_GAUGES = frozenset({"feed_records", "feed_malformed", "feed_skipped", "feed_loaded_at"})
""":class:`NodeStats` fields that describe the node's feeds as loaded now (gauges): the master loads the
feeds, so its values are the node's, and a worker's copy is not added (every worker maps the same store)."""

SUMMED = frozenset(
    {
        # BoundaryStats: bad input, connections and dropped output lines happen wherever a connection is served.
        "bad_input",
        "connections",
        "output_dropped",
        # The event path: only workers serve events (the master's are 0).
        "events",
        "detections",
        "suppressed",
        "ignored",
        "finished_lines",
        "per_category",
        "per_source",
        "engine_events",
        # Records that could not be read back at detection time: counted by each process that read them.
        "feed_read_failures",
        # Counted by the master alone today (loads, the REST API, alerts it raises); summed all the same, so a
        # part that counts some of them too (a worker's own alert) is never lost.  A worker that hands an
        # alert to the master to raise must not count it itself, or it is counted twice.
        "feed_failures",
        "snapshot_rebuilds",
        "snapshot_loads",
        "reloads",
        "alerts",
        "api_requests",
        "api_probes",
        "lookups",
        "lookup_detections",
    }
)
""":class:`NodeStats` fields that are counters: the node's value is the sum over its processes."""

SKETCHES = frozenset({"top_indicators"})
""":class:`NodeStats` fields that are :class:`TopN` sketches: the node's is the merge of its processes'."""


def sum_stats(master: NodeStats, workers: Iterable[NodeStats]) -> NodeStats:
    """The node's :class:`NodeStats` from its master's and its workers' (pure; the parts are not changed).

    Every field is either a counter (:data:`SUMMED`: integers add, tables add key by key), a sketch
    (:data:`SKETCHES`: merged) or a gauge the master owns (:data:`MASTER_GAUGES`: the master's value,
    copied).  ``workers`` holds each running
    worker's latest cumulative report and, for counters to stay monotonic across restarts, the last
    report of every worker that has exited.  A field in neither set raises ``TypeError``: a new
    ``NodeStats`` field must be classified here (tests/test_metrics.py checks every field).
    """
    parts = [master, *workers]
    values: dict[str, Any] = {}
    for f in dataclasses.fields(NodeStats):
        name = f.name
        if name in MASTER_GAUGES:
            values[name] = dict(getattr(master, name))
        elif name in SKETCHES:
            values[name] = TopN.merged(getattr(part, name) for part in parts)
        elif name not in SUMMED:
            raise TypeError(f"NodeStats.{name} is neither summed, a sketch nor a master gauge: classify it in stats.py")
        elif isinstance(getattr(master, name), dict):
            table: dict[Any, int] = {}
            for part in parts:
                for key, n in getattr(part, name).items():
                    table[key] = table.get(key, 0) + n
            values[name] = table
        else:
            values[name] = sum(getattr(part, name) for part in parts)
    return NodeStats(**values)


def detection_statistics(stats: NodeStats, since: float) -> dict[str, Any]:
    """What a node's ``GET /statz`` answers: its cumulative detection counters since ``since`` (its start,
    Unix seconds), for the balancer to sum over the deployment (docs/operations.md, "Statistics").

    Counters only go up while the node runs (a worker's restart keeps its last report); a balancer that
    sees ``since`` change, or a counter go down, takes the node as restarted and counts from zero.
    """
    return {
        "detections": {
            "total": stats.detections,
            "by_category": dict(sorted(stats.per_category.items())),
            "by_source": dict(sorted(stats.per_source.items())),
            "top_indicators": [[key, n] for key, n in stats.top_indicators.top()],
        },
        "events": stats.events,
        "since": int(since),
    }


@dataclass(slots=True)
class BalancerStats(BoundaryStats):
    """Every counter the balancer's event path keeps (names in docs/operations.md)."""

    events_in: int = 0  # events received from clients
    events_out: int = 0  # events answered (released to their client)
    detections: int = 0  # detection lines released
    dispatched: int = 0  # events sent to instances (redispatches included)
    redispatched: int = 0  # events sent again after their instance failed
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> events or lines not delivered
    dropped_lines: dict[str, int] = field(default_factory=dict)  # reason -> instance lines refused
    unmatched: dict[str, int] = field(default_factory=dict)  # reason -> events answered by an error finished line
    transitions: dict[str, int] = field(default_factory=dict)  # up / down / reply_timeout
    api_requests: dict[str, int] = field(default_factory=dict)  # gateway answers by HTTP status
    api_retries: dict[str, int] = field(default_factory=dict)  # instance key / drift / pin_mismatch -> count
    alerts: dict[str, int] = field(default_factory=dict)  # service alerts received, by name
    readiness_polls: dict[str, int] = field(default_factory=dict)  # its own /readyz polls of nodes, by result
