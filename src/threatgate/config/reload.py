"""What a SIGHUP can apply in place and what needs a restart, for the node and the balancer alike.

Rules:
1. Every field of :class:`~threatgate.config.node.NodeConfig` and
   :class:`~threatgate.config.balancer.BalancerConfig` is listed below (tests/config/test_reload.py
   fails on a new field that is not): either :data:`LIVE` (applied by the reload) or the name of
   the element an operator writes, when the running process cannot change it (sockets it listens
   on, files it loaded once).
2. A reload compares the file with the configuration the process *started* with: a restart
   element that differs is reported by :func:`restart_needed` (and logged, in the same words on
   both, as ``configuration reload: needs a restart: <element>, ...``), and stays reported, with
   ``threatgate_config_restart_required`` at 1, until the file matches the running process again
   or the process restarts.  Pure: no I/O; the services log and export.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pydantic

LIVE = ""
"""A field the reload applies in place (docs/configuration.md, "Reloading")."""

RESTART_WARNING = "configuration reload: needs a restart: %s (running with the value it started with)"

NODE_FIELDS: Mapping[str, str] = {
    "path": LIVE,
    "input.listen": "InputSettings/ConnectionString",
    "input.event_delimiter": LIVE,  # new connections
    "input.max_event_size": LIVE,  # new connections
    "input.sources": LIVE,
    "input.tls": "InputSettings/TLS",  # the listening sockets and their certificates are set up once
    "allowed_sources": LIVE,  # every port's gate takes the new list (net/gate.py Gates); connections stay
    "output.destination": LIVE,  # a new sender; the old one's queue is handed over
    "output.event_format": LIVE,
    "output.record_field_format": LIVE,
    "output.actionable_field_format": LIVE,
    "output.finished_format": LIVE,
    "output.finished_enabled": LIVE,
    "output.alert_format": LIVE,
    "output.alert_destination": LIVE,
    "output.retries_count": LIVE,
    "output.retries_timeout": LIVE,
    "feeds.update_frequency": LIVE,  # from the next scheduled reload
    "feeds.per_scan_detect_limit": LIVE,
    "feeds.feeds": LIVE,
    "feeds.snapshot_dir": "Feeds@snapshot_dir",
    "service.scanners_count": LIVE,
    "service.metrics": "ServiceSettings/MetricsConnectionString",
    "service.handshake_timeout": LIVE,  # new connections
    "service.idle_timeout": LIVE,  # the next sweep
    "scan.workers": "ScanSettings/Workers",  # the worker processes are started once
    "service.drain_timeout": LIVE,  # read at SIGTERM
    "http.listen": "HTTPServer/ConnectionString",
    "http.cert_path": "HTTPServer/CertificatePath",
    "http.key_path": "HTTPServer/PrivateKeyPath",
    "http.users": LIVE,
    "http.database": "HTTPServer/Database",
    "http.header_timeout": LIVE,
    "http.body_timeout": LIVE,
    "http.idle_timeout": "HTTPServer/IdleTimeout",
    "exports": LIVE,
    "cluster.listen": "Cluster/ConnectionString",
    "cluster.state_dir": "Cluster/StateDirectory",
    "cluster.heartbeat": "Cluster/HeartbeatInterval",
    "cluster.fall": "Cluster/FallCount",
    "cluster.keep_revisions": "Cluster/KeepRevisions",
    "cluster.request_timeout": "Cluster/RequestTimeout",
    "cluster.etcd": "Cluster/Etcd",
}
"""NodeConfig, by dotted field path.  ``http.*``/``cluster.*`` read as None when the element is absent,
so adding or removing ``<HTTPServer>`` or ``<Cluster>`` reports its restart elements."""

BALANCER_FIELDS: Mapping[str, str] = {
    "path": LIVE,
    "listen_host": "Balancer",
    "matching_port": "Balancer@matching_port",
    "api_port": "Balancer@api_port",
    "cybertrace_port": "Balancer@cybertrace_port",
    "scanners_count": LIVE,
    "matching_tls": "MatchingTLS",
    "alert_tls": "AlertTLS",
    "client_cert_path": "ClientCertificatePath",
    "client_key_path": "ClientPrivateKeyPath",
    "allowed_sources": LIVE,  # every port's gate takes the new list (net/gate.py Gates); connections stay
    "event_delimiter": LIVE,  # new connections
    "max_event_size": LIVE,  # new connections
    "idle_timeout": LIVE,  # the next sweep
    "max_event_wait": LIVE,  # the next tick
    "max_client_pending": LIVE,  # the next batch of each client
    "cert_path": "SSLCertificatePath",
    "key_path": "SSLPrivateKeyPath",
    "cert_dir": "CertDirPath",
    "admin_socket": "AdminSocket",
    "users": LIVE,  # the console checks logins against the running configuration's users
    "instances": LIVE,  # added, removed, enabled, disabled, weight, ports; connections: lanes opened or retired
    "allowed": LIVE,
    "health": LIVE,
    "readiness": LIVE,
    "reply_timeout": LIVE,
    "max_inflight_events": LIVE,
    "max_pending_events": LIVE,
    "output": LIVE,  # a new sender; the old one's queue is handed over
    "metrics": "MetricsConnectionString",
    "alert_forward": LIVE,  # a new sender, as output
    "max_api_requests": LIVE,
    "api_body_timeout": LIVE,
    "api_upstream_timeout": LIVE,
    "handshake_timeout": LIVE,  # new connections
    "drain_timeout": LIVE,  # read at SIGTERM
    "stats_interval": LIVE,
    "canaries": LIVE,  # read by threatgate drill when it starts, never by the balancer
}
"""BalancerConfig, by field name."""


def field_value(config: pydantic.BaseModel, path: str) -> object:
    """The value at dotted ``path``; None when a section on the way is absent."""
    value: object = config
    for part in path.split("."):
        if value is None:
            return None
        value = getattr(value, part)
    return value


def restart_needed(running: pydantic.BaseModel, new: pydantic.BaseModel, fields: Mapping[str, str]) -> list[str]:
    """The restart elements whose value differs between ``running`` and ``new``, in table order."""
    names: list[str] = []
    for path, element in fields.items():
        if element != LIVE and element not in names and field_value(running, path) != field_value(new, path):
            names.append(element)
    return names


class RestartTracker:
    """Remembers the configuration a process started with and what a reload could not apply."""

    def __init__(self, started: pydantic.BaseModel, fields: Mapping[str, str]) -> None:
        self.started = started
        self.fields = fields
        self.pending: list[str] = []

    def reloaded(self, new: pydantic.BaseModel, log: logging.Logger) -> list[str]:
        """Compare ``new`` with the start-up configuration; log a WARNING naming what needs a restart."""
        self.pending = restart_needed(self.started, new, self.fields)
        if self.pending:
            log.warning(RESTART_WARNING, ", ".join(self.pending))
        return self.pending

    def gauge(self) -> float:
        """``threatgate_config_restart_required``: 1 while the file differs in a restart element."""
        return 1.0 if self.pending else 0.0
