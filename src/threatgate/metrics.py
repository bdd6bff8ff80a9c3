"""Metrics: plain integer counters on the hot path, exported through prometheus-client at scrape time.

Incrementing a prometheus-client ``Counter`` takes a lock and a label lookup; per event that would
cost more than the matching itself.  Components therefore bump attributes of a :class:`NodeStats`
and a custom collector turns them into metric families when ``/metrics`` is scraped.

Every ``/metrics`` also carries what a Prometheus user expects of any process: prometheus-client's
process (``process_*``: CPU, memory, file descriptors, start time), platform (``python_info``) and
garbage-collector (``python_gc_*``) collectors, and ``threatgate_build_info{version,python}`` 1.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from threatgate._version import __version__
from threatgate.config.common import Address
from threatgate.stats import BalancerStats, BoundaryStats, Gauges, LabelledGauges, NodeStats

if TYPE_CHECKING:  # imported where the server starts: a worker process needs NodeStats, never aiohttp
    from aiohttp import web

    from threatgate.net.gate import Gate, Listening

SERVER = "threatgate"
"""The ``Server`` header of every HTTP answer threatgate sends: no versions for a scanner to match."""


Counters = list[tuple[str, str, int]]  # (name, help, value)
Tables = list[tuple[str, str, str, dict[str, int]]]  # (name, help, label, label value -> count)


class _TableCollector(Collector):
    """Plain counters, labelled counter tables, labelled gauge tables and live gauges, at scrape time."""

    def __init__(self, gauges: Gauges, labelled: LabelledGauges | None = None) -> None:
        self._gauges = gauges
        self._labelled = labelled or {}
        self._boundary: BoundaryStats | None = None

    def counters(self) -> Counters:
        return []

    def tables(self) -> Tables:
        return []

    def gauge_tables(self) -> Tables:
        return []

    def collect(self) -> Iterator[Metric]:
        for name, doc, value in self.counters():
            yield CounterMetricFamily(name, doc, value=value)
        for name, doc, label, table in self.tables():
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, value in sorted(table.items()):
                family.add_metric([key], value)
            yield family
        for name, doc, label, table in self.gauge_tables():
            gauge = GaugeMetricFamily(name, doc, labels=[label])
            for key, value in sorted(table.items()):
                gauge.add_metric([key], value)
            yield gauge
        for name, (doc, getter) in self._gauges.items():
            yield GaugeMetricFamily(name, doc, value=getter())
        for name, (doc, label, values) in self._labelled.items():
            live = GaugeMetricFamily(name, doc, labels=[label])
            for key, level in sorted(values().items()):
                live.add_metric([key], level)
            yield live
        if self._boundary is not None:
            dropped = CounterMetricFamily(
                "threatgate_output_dropped_lines",
                "Output lines (detections, alerts) not delivered, by destination and reason",
                labels=["destination", "reason"],
            )
            for (destination, reason), value in sorted(self._boundary.output_dropped.items()):
                dropped.add_metric([destination, reason], value)
            yield dropped


class StatsCollector(_TableCollector):
    """Exports a :class:`NodeStats` plus live gauges supplied as callables."""

    def __init__(
        self, stats: NodeStats | Callable[[], NodeStats], gauges: Gauges, labelled: LabelledGauges | None = None
    ) -> None:
        """``stats``: the counters, or what gives them at each scrape (a node with workers sums its processes)."""
        super().__init__(gauges, labelled)
        self._source = stats if callable(stats) else None
        self._stats = self._boundary = stats if isinstance(stats, NodeStats) else NodeStats()

    def collect(self) -> Iterator[Metric]:
        if self._source is not None:
            self._stats = self._boundary = self._source()
        yield from super().collect()
        for name, doc, labels, values in (
            (
                "threatgate_snapshot_rebuilds",
                "Snapshot files refused (truncated, corrupt, foreign) and rebuilt, by feed and reason",
                ["feed", "reason"],
                self._stats.snapshot_rebuilds,
            ),
            (
                "threatgate_snapshot_loads",
                "Feed versions loaded from a snapshot, by feed and how (mapped: unchanged, not parsed; built)",
                ["feed", "how"],
                self._stats.snapshot_loads,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=labels)
            for key, value in sorted(values.items()):
                family.add_metric(list(key), value)
            yield family

    def counters(self) -> Counters:
        s = self._stats
        return [
            ("threatgate_events", "Events matched", s.events),
            ("threatgate_detections", "Detection lines produced", s.detections),
            ("threatgate_finished_lines", "FinishedEventFormat lines produced", s.finished_lines),
            ("threatgate_suppressed_detections", "Detections suppressed by the FalsePositive supplier", s.suppressed),
            ("threatgate_ignored_events", "Events dropped by ignore rules", s.ignored),
            ("threatgate_feed_reloads", "Feed reload cycles", s.reloads),
            ("threatgate_api_lookup_objects", "Objects looked up through the REST API", s.lookups),
            ("threatgate_api_lookup_detections", "REST lookup objects that detected", s.lookup_detections),
        ]

    def tables(self) -> Tables:
        s = self._stats
        return [
            ("threatgate_bad_input", "Bad input seen at a boundary, by reason", "reason", s.bad_input),
            ("threatgate_connections", "Event connections, by outcome", "outcome", s.connections),
            ("threatgate_category_detections", "Detections by category", "category", s.per_category),
            ("threatgate_source_detections", "Detections by feed or API supplier", "source", s.per_source),
            (
                "threatgate_engine_events",
                "Events by matching path: compiled (no candidate indicator), confirmed (candidates confirmed against "
                "the stored records), reference (the whole event on the reference matcher)",
                "path",
                s.engine_events,
            ),
            (
                "threatgate_feed_load_failures",
                "Feed loads that failed (previous version kept)",
                "feed",
                s.feed_failures,
            ),
            (
                "threatgate_feed_read_failures",
                "Records that could not be read back from a loaded feed version: their detections were lost",
                "feed",
                s.feed_read_failures,
            ),
            ("threatgate_alerts", "Service alerts raised, by name", "alert", s.alerts),
            (
                "threatgate_api_requests",
                "REST API answers, by HTTP status (/healthz and /readyz probes not included)",
                "status",
                s.api_requests,
            ),
            ("threatgate_api_probes", "Liveness and readiness probes answered, by path", "path", s.api_probes),
        ]

    def gauge_tables(self) -> Tables:
        s = self._stats
        return [
            ("threatgate_feed_records", "Records of each feed in the live store", "feed", s.feed_records),
            (
                "threatgate_feed_malformed_records",
                "Malformed records skipped in the last load",
                "feed",
                s.feed_malformed,
            ),
            (
                "threatgate_feed_last_load_timestamp_seconds",
                "When each enabled feed last loaded (Unix time; 0: no version loaded)",
                "feed",
                s.feed_loaded_at,
            ),
            (
                "threatgate_feed_skipped_records",
                "Unsupported records skipped in the last load (STIX patterns, MISP to_ids=false...)",
                "feed",
                s.feed_skipped,
            ),
        ]


class BalancerCollector(_TableCollector):
    """Exports a :class:`BalancerStats` plus live gauges."""

    def __init__(self, stats: BalancerStats, gauges: Gauges, labelled: LabelledGauges | None = None) -> None:
        super().__init__(gauges, labelled)
        self._stats = stats
        self._boundary = stats

    def counters(self) -> Counters:
        s = self._stats
        return [
            ("threatgate_balancer_events_in", "Events received from clients", s.events_in),
            ("threatgate_balancer_events_answered", "Events answered to their client", s.events_out),
            ("threatgate_balancer_detections", "Detection lines delivered", s.detections),
            ("threatgate_balancer_dispatched", "Events sent to instances (redispatches included)", s.dispatched),
            ("threatgate_balancer_redispatched", "Events sent again after their instance failed", s.redispatched),
        ]

    def tables(self) -> Tables:
        s = self._stats
        return [
            ("threatgate_bad_input", "Bad input seen at a boundary, by reason", "reason", s.bad_input),
            ("threatgate_connections", "Client connections, by outcome", "outcome", s.connections),
            ("threatgate_balancer_dropped", "Events or lines not delivered, by reason", "reason", s.dropped),
            (
                "threatgate_balancer_refused_lines",
                "Instance lines refused by the correlator",
                "reason",
                s.dropped_lines,
            ),
            (
                "threatgate_balancer_unmatched_events",
                "Events answered without matching (their finished line carries error=<reason>)",
                "reason",
                s.unmatched,
            ),
            ("threatgate_balancer_transitions", "Instance state changes", "kind", s.transitions),
            ("threatgate_api_requests", "REST gateway answers, by HTTP status", "status", s.api_requests),
            ("threatgate_gateway_failures", "Gateway upstream failures, by instance or kind", "what", s.api_retries),
            ("threatgate_alerts", "Service alerts received from nodes, by name", "alert", s.alerts),
            (
                "threatgate_balancer_readiness_polls",
                "The balancer's own /readyz polls of instances (not gateway requests), by result",
                "result",
                s.readiness_polls,
            ),
        ]


class BuildInfo(Collector):
    """``threatgate_build_info{version,python}`` 1: which release (and Python) a process runs."""

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "threatgate_build_info",
            "Always 1; the labels say which threatgate and Python run",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info


def registry_for(collector: Collector) -> CollectorRegistry:
    """A registry with ``collector`` and the process, platform, garbage-collector and build-info collectors."""
    registry = CollectorRegistry()
    registry.register(collector)
    registry.register(BuildInfo())
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


async def _no_server_header(_: web.Request, response: web.StreamResponse) -> None:
    """Name no software version to whoever scrapes (aiohttp would send ``Server: Python/... aiohttp/...``)."""
    response.headers["Server"] = SERVER


class MetricsServer:
    """A running ``/metrics`` endpoint: where it listens, and how to stop it."""

    def __init__(self, runner: web.AppRunner, listening: Listening) -> None:
        self.runner = runner
        self.listening = listening

    @property
    def address(self) -> Any:
        """The bound address (``getsockname()``): port 0 in the configuration is a picked port here."""
        return self.listening.sockets[0].getsockname()

    async def close(self) -> None:
        self.listening.close()
        await self.runner.cleanup()


async def start_metrics_server(
    address: Address,
    collector: Collector,
    *more: Collector,
    before: Callable[[], Awaitable[None]] | None = None,
    gate: Gate | None = None,
) -> MetricsServer:
    """Serve ``collector`` (and ``more``) as Prometheus text on ``http://address/metrics``.

    ``before`` runs before each scrape (a node with workers asks them for fresh counters); ``gate`` is the
    port's door (``<AllowedSources ports="metrics">``, net/gate.py), none: every source.
    """
    from aiohttp import web

    from threatgate.net.gate import Gate as _Gate

    registry = registry_for(collector)
    for extra in more:
        registry.register(extra)

    async def metrics(_: web.Request) -> web.Response:
        if before is not None:
            await before()
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.on_response_prepare.append(_no_server_header)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    door = gate if gate is not None else _Gate("metrics", stats=BoundaryStats(), log=logging.getLogger(__name__))
    try:
        listening = await door.start_server(runner.server, address.host, address.port)
    except BaseException:
        await runner.cleanup()
        raise
    return MetricsServer(runner, listening)
