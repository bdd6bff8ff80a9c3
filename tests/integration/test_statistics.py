"""Detection statistics end to end: two real nodes (one with two worker processes) behind a real balancer.

Events with known detections go through the balancer; each node's ``/statz`` (unauthenticated, over its
TLS) then counts what it detected, and the balancer's deployment-wide counters on its ``/metrics``, fed by
its ``/statz`` polls through the pinned gateway, equal the detection lines the client received.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    BIND_ANY,
    FINISHED_LINE,
    REPLY_FLAGS,
    BalancerProcess,
    GatewayPorts,
    HTTPSClient,
    NodeProcess,
    example_config,
    gateway_config,
    keep_bound_ports,
    prometheus_samples,
    stream,
    wait_for_log_count,
    wait_until,
)

DETECTION = re.compile(r"category=(\S+) matchedIndicator=(\S+)")
EVENTS = (
    [b"url=http://fakess123.nu"] * 30  # examples/feeds/malicious_urls.json
    + [b"src=192.0.2.0 dst=10.1.1.1"] * 20  # examples/feeds/ip_reputation.csv
    + [b"url=http://clean.example/ src=10.9.9.9"] * 10  # nothing
)


@contextmanager
def two_nodes(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    procs: list[NodeProcess] = []
    try:
        for name, workers in (("n1", 2), ("n2", 1)):
            directory = tmp_path / name
            directory.mkdir()
            config = example_config(
                directory,
                workers=workers,
                extra_service="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
            )
            procs.append(NodeProcess(config))
        for proc in procs:
            proc.wait_ready()
            keep_bound_ports(proc)  # a restart comes back on the ports the balancer knows
        yield procs
        for proc in procs:
            assert "Traceback" not in proc.log(), proc.log()
    finally:
        for proc in procs:
            proc.stop()


def statz(node: NodeProcess) -> dict[str, Any]:
    reply = HTTPSClient(node.api_port, node.config.parent / "certs" / "node.pem").request("GET", "/statz")
    assert reply.status == 200, reply
    body: dict[str, Any] = reply.json()
    return body


def summed(tables: list[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for table in tables:
        total.update(table)
    return dict(total)


@pytest.mark.timeout(240)
def test_detections_counted_on_each_node_and_summed_by_the_balancer(tmp_path: Path) -> None:
    with two_nodes(tmp_path) as nodes:
        config = tmp_path / "balancer.conf"
        gateway_config(
            config,
            instances=[(n.port, n.api_port) for n in nodes],
            extra="<MetricsConnectionString>127.0.0.1:0</MetricsConnectionString>",
            ports=BIND_ANY,
        )
        balancer = BalancerProcess(config)
        try:
            balancer.wait_ready()
            ports = GatewayPorts.bound_by(balancer)
            metrics = balancer.metrics_port
            wait_for_log_count(balancer, r"instance 127\.0\.0\.1:\d+ is UP", 2, after=0)
            keys = [f"127.0.0.1:{n.port}" for n in nodes]

            def polled() -> bool:  # each node's first answer (the baseline) before any event
                samples = prometheus_samples(metrics)
                return all(f'threatgate_balancer_instance_detections_total{{instance="{k}"}}' in samples for k in keys)

            wait_until(polled, "a /statz answer from each node")
            payload = REPLY_FLAGS + b"".join(b"%d %s\n" % (i, e) for i, e in enumerate(EVENTS, 1))
            lines = stream(ports.matching, payload)
            assert lines.count(FINISHED_LINE) == len(EVENTS)
            hits = [m.groups() for m in map(DETECTION.search, lines) if m]
            by_category = dict(Counter(c for c, _ in hits))
            assert by_category.keys() >= {"Malicious_URL", "IP_Reputation"}, lines[:20]

            # Each node counts what it detected; both together are what the client received.
            answers = [statz(n) for n in nodes]
            assert sum(a["detections"]["total"] for a in answers) == len(hits)
            assert sum(a["events"] for a in answers) == len(EVENTS)
            assert all(a["detections"]["total"] > 0 for a in answers), "the balancer spread the events"
            assert summed([a["detections"]["by_category"] for a in answers]) == by_category
            by_source = summed([a["detections"]["by_source"] for a in answers])
            assert by_source["malicious_urls.json"] == 30 and by_source["ip_reputation.csv"] == 20
            assert sum(by_source.values()) == len(hits)
            top = summed([dict(a["detections"]["top_indicators"]) for a in answers])
            assert top == dict(Counter(i for _, i in hits))

            # The balancer's deployment-wide counters, from its own polls: the same figures.
            def deployment() -> dict[str, float]:
                samples = prometheus_samples(metrics)
                prefix = 'threatgate_balancer_deployment_detections_total{category="'
                return {k[len(prefix) : -2]: v for k, v in samples.items() if k.startswith(prefix)}

            wait_until(lambda: deployment() == by_category, f"the balancer's counters at {by_category}")
            samples = prometheus_samples(metrics)
            assert samples["threatgate_balancer_deployment_events_total"] == len(EVENTS)
            assert samples['threatgate_balancer_deployment_source_detections_total{source="malicious_urls.json"}'] == 30
            per_instance = [samples[f'threatgate_balancer_instance_detections_total{{instance="{k}"}}'] for k in keys]
            assert per_instance == [a["detections"]["total"] for a in answers]

            # A node restarts: its counters start again from zero; the balancer's go on counting from there.
            mark = balancer.log_offset()
            nodes[1].stop()
            nodes[1] = NodeProcess(nodes[1].config, nodes[1].port)
            nodes[1].wait_ready()
            assert statz(nodes[1])["detections"]["total"] == 0
            balancer.wait_for_log(rf"instance {re.escape(keys[1])} is UP", after=mark)
            lines = stream(ports.matching, payload)
            assert lines.count(FINISHED_LINE) == len(EVENTS)
            again = dict(Counter(c for c, _ in (m.groups() for m in map(DETECTION.search, lines) if m)))
            twice = dict(Counter(by_category) + Counter(again))
            wait_until(lambda: deployment() == twice, f"the balancer's counters at {twice} after the restart")
            assert prometheus_samples(metrics)["threatgate_balancer_deployment_events_total"] == 2 * len(EVENTS)
            assert "Traceback" not in balancer.log(), balancer.log()
        finally:
            balancer.stop()
