"""The balancer process's composition root (``threatgate balancer`` starts here).

:class:`~threatgate.balancer.service.BalancerService` still builds its own parts (gateway, readiness
monitor, alert listener), each of which sees it only through its port; this is where the process
is assembled and run.
"""

from __future__ import annotations

from threatgate import runtime
from threatgate.balancer.service import BalancerService
from threatgate.config.balancer import BalancerConfig


def run_balancer(config: BalancerConfig) -> None:
    """Run until SIGTERM/SIGINT (uvloop when installed)."""
    runtime.run(runtime.serve(BalancerService(config)))
