"""The node process's composition root: build the node service and, with ``<Cluster>``, its cluster
agent, wire one to the other through their ports, and run them.

The parts never reach for each other: :class:`~threatgate.node.service.NodeService` sees the agent as
its ``ControlPlane`` port and the agent sees the node as its ``ClusterNode`` port; this module is the
one place that knows both concrete classes (``threatgate node`` starts here).
"""

from __future__ import annotations

import asyncio

from threatgate import runtime
from threatgate.config.node import NodeConfig
from threatgate.node.service import NodeService


def run_node(config: NodeConfig) -> None:
    """Run until SIGTERM/SIGINT (uvloop when installed).

    Raises:
        ClusterError: ``<Cluster>`` is configured but this node is not a member (or its state is damaged).
    """
    runtime.run(_serve_node(config))


async def _serve_node(config: NodeConfig) -> None:
    if config.cluster is not None:
        # Imported only for a cluster member: a standalone node never loads the cluster package.
        from threatgate.cluster.agent import ClusterAgent, prepare

        config, state, identity, doc = await asyncio.to_thread(prepare, config)
        assert config.cluster is not None
        node = NodeService(config)
        node.cluster = ClusterAgent(node, config.cluster, state, identity, doc)
    else:
        node = NodeService(config)
    await runtime.serve(node)
