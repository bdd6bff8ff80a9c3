"""The example configs stay one configuration: node1.conf and node2.conf are node.conf on other ports.

The README's balancer and cluster sections run on node1/node2 (tests/test_readme.py); an edit to
node.conf that is not made to them too fails here, so the three never drift apart.
"""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"
PORTS = {1: (10001, 10443, 9441), 2: (10002, 10444, 9442)}


@pytest.mark.parametrize("n", sorted(PORTS))
def test_nodeN_conf_is_node_conf_on_its_own_ports(n: int) -> None:
    events, api, cluster = PORTS[n]
    text = (EXAMPLES / f"node{n}.conf").read_text()
    back = (
        text.replace(f"127.0.0.1:{events}", "127.0.0.1:9999")
        .replace(f"127.0.0.1:{api}", "127.0.0.1:8443")
        .replace(f"certs/node{n}.", "certs/node.")
        .replace(f"state/node{n}.", "state/node.")
    )
    head, _, cluster_part = back.partition("  <!-- Off until the README's cluster section turns it on")
    assert cluster_part, "the <Cluster> element of the example is missing"
    assert f"<ConnectionString>127.0.0.1:{cluster}</ConnectionString>" in cluster_part
    want = (EXAMPLES / "node.conf").read_text()
    comment = "<!-- A threatgate node, laid out like CyberTrace's kl_feed_service.conf (docs/configuration.md). -->"
    mine = f"<!-- Node {n} of the balancer and cluster examples (README): examples/node.conf on other ports. -->"
    assert head.replace(mine, comment) + "</Configuration>\n" == want


def test_the_example_balancer_points_at_node1_and_node2() -> None:
    text = (EXAMPLES / "balancer.conf").read_text()
    for events, api, _ in PORTS.values():
        assert f'matching_port="{events}" api_port="{api}"' in text
