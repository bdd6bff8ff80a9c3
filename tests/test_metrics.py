"""metrics.py: plain counters turned into Prometheus families at scrape time, and the ``/metrics`` server.

What must hold: each NodeStats / BalancerStats field reaches its metric with its labels (a counter, a
labelled counter table, a gauge table or a live gauge), a node's counters are read afresh at each scrape
when given as a callable (a node with workers sums its processes then), every scrape carries the process,
platform, GC and build-info families, and the server answers ``/metrics`` naming no software version.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import aiohttp
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from threatgate._version import __version__
from threatgate.config.common import Address
from threatgate.metrics import SERVER, BalancerCollector, StatsCollector, registry_for, start_metrics_server
from threatgate.stats import BalancerStats, NodeStats


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(collector: StatsCollector | BalancerCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return samples(generate_latest(registry_for(collector)).decode())


def test_StatsCollector_exports_counters_tables_gauges_and_live_values() -> None:
    stats = NodeStats(events=5, lookups=2, feed_records={"urls": 10}, snapshot_loads={("urls", "mapped"): 3})
    stats.bump(stats.bad_input, "too_long")
    stats.drop_lines("syslog", "queue_full", 4)
    gauges = {"threatgate_queue_depth": ("Lines queued", lambda: 7.0)}
    labelled = {"threatgate_worker_up": ("Workers up", "worker", lambda: {"w1": 1.0, "w2": 0.0})}
    got = scrape(StatsCollector(stats, gauges, labelled))  # type: ignore[arg-type]
    assert got[("threatgate_events_total", ())] == 5
    assert got[("threatgate_api_lookup_objects_total", ())] == 2
    assert got[("threatgate_bad_input_total", (("reason", "too_long"),))] == 1
    assert got[("threatgate_feed_records", (("feed", "urls"),))] == 10
    assert got[("threatgate_snapshot_loads_total", (("feed", "urls"), ("how", "mapped")))] == 3
    assert got[("threatgate_output_dropped_lines_total", (("destination", "syslog"), ("reason", "queue_full")))] == 4
    assert got[("threatgate_queue_depth", ())] == 7
    assert got[("threatgate_worker_up", (("worker", "w2"),))] == 0


def test_a_callable_source_is_read_at_each_scrape() -> None:
    current = [NodeStats(events=1)]
    registry = registry_for(StatsCollector(lambda: current[0], {}))
    assert samples(generate_latest(registry).decode())[("threatgate_events_total", ())] == 1
    current[0] = NodeStats(events=9)
    current[0].drop_lines("alerts", "closed", 2)
    again = samples(generate_latest(registry).decode())
    assert again[("threatgate_events_total", ())] == 9
    assert again[("threatgate_output_dropped_lines_total", (("destination", "alerts"), ("reason", "closed")))] == 2


def test_BalancerCollector_exports_the_balancers_counters_and_tables() -> None:
    stats = BalancerStats(events_in=3, redispatched=1)
    stats.bump(stats.transitions, "down")
    got = scrape(BalancerCollector(stats, {}))
    assert got[("threatgate_balancer_events_in_total", ())] == 3
    assert got[("threatgate_balancer_redispatched_total", ())] == 1
    assert got[("threatgate_balancer_transitions_total", (("kind", "down"),))] == 1
    assert ("threatgate_events_total", ()) not in got  # node counters are the node's


def test_every_scrape_carries_the_build_info_and_the_process_families() -> None:
    got = scrape(BalancerCollector(BalancerStats(), {}))
    build = (("python", platform.python_version()), ("version", __version__))
    assert got[("threatgate_build_info", build)] == 1
    names = {name for name, _ in got}
    assert {"python_info", "python_gc_collections_total"} <= names
    if sys.platform == "linux":
        assert "process_resident_memory_bytes" in names


async def test_the_server_answers_metrics_after_before_and_names_no_version() -> None:
    scrapes: list[int] = []
    stats = NodeStats(events=4)

    async def before() -> None:
        scrapes.append(1)
        stats.events += 1

    server = await start_metrics_server(Address("127.0.0.1", 0), StatsCollector(stats, {}), before=before)
    try:
        host, port = server.address[:2]
        async with aiohttp.ClientSession() as session, session.get(f"http://{host}:{port}/metrics") as reply:
            text = await reply.text()
            assert reply.status == 200 and reply.headers["Server"] == SERVER
            assert reply.headers["Content-Type"].startswith("text/plain")
        assert scrapes == [1]
        assert samples(text)[("threatgate_events_total", ())] == 5  # counted after ``before`` ran
    finally:
        await server.close()


def test_metrics_imports_without_aiohttp() -> None:
    # Worker processes import metrics for NodeStats; aiohttp is only for the master's /metrics server.
    code = "import sys, threatgate.metrics; assert 'aiohttp' not in sys.modules, 'aiohttp imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
