"""The balancer process's composition root (``threatgate balancer`` starts here).

The one module that knows the concrete classes on both sides of the balancer's ports: it builds the
edge (:class:`~threatgate.balancer.service.BalancerService`, which holds the sans-IO dispatcher), the
REST gateway, the readiness monitor, the detection statistics poller, the service-alert listener and the admin
socket, hands each the edge as its port (``GatewayHost``, ``ReadinessHost``, ``StatisticsHost``, ``AlertHost``)
and the edge its parts (``GatewayPart``, ``ReadinessPart``, ``StatisticsPart``, ``AlertPart``), and runs the
whole through :func:`threatgate.runtime.serve`.
The operator console (``Console``) reads the edge (``ConsoleHost``) and the parts through its own
ports and is handed to the gateway, which answers ``/console/`` with it.
"""

from __future__ import annotations

import random

from threatgate import runtime
from threatgate.balancer.admin import AdminServer
from threatgate.balancer.alerts import AlertListener
from threatgate.balancer.console import Console
from threatgate.balancer.gateway import Gateway
from threatgate.balancer.readiness import ReadinessMonitor
from threatgate.balancer.service import BalancerService
from threatgate.balancer.statistics import StatisticsPoller
from threatgate.config.balancer import BalancerConfig


def build_balancer(config: BalancerConfig, rng: random.Random | None = None) -> BalancerService:
    """The balancer's parts, built and wired (not started)."""
    service = BalancerService(config, rng)
    gateway = Gateway(service)
    readiness = ReadinessMonitor(service, gateway)
    alerts = AlertListener(service)
    gateway.console = Console(service, readiness, gateway, alerts)
    service.wire(
        gateway=gateway,
        readiness=readiness,
        alerts=alerts,
        admin=AdminServer(service, config.admin_socket) if config.admin_socket else None,
        statistics=StatisticsPoller(service, gateway),
    )
    return service


def run_balancer(config: BalancerConfig) -> None:
    """Run until SIGTERM/SIGINT (uvloop when installed)."""
    runtime.run(runtime.serve(build_balancer(config)))
