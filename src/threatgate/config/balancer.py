"""The balancer configuration: CyberTrace's kl_balancer.conf (``<Config>``), loaded into frozen models.

The documented elements keep their names and meaning (docs/configuration.md, "Balancer"); every
extension is an optional element in the same style with a default that needs no tuning.
:func:`load_balancer_config` raises :class:`~threatgate.errors.ConfigError` with ``file:line``.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

import pydantic

from threatgate.config.common import (
    Address,
    Frozen,
    build,
    compile_regex,
    parse_bool,
    parse_field,
    parse_metrics_address,
    resolve_path,
)
from threatgate.config.destinations import parse_destination
from threatgate.config.node import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_EVENT_SIZE, read_user_list
from threatgate.config.security import AllowedSources, TLSListener, read_allowed_sources, read_tls_listener
from threatgate.config.xml import Node, read_checked, read_xml
from threatgate.errors import ConfigError
from threatgate.wire.paths import RoutePattern

MAX_SCANNERS = 100
"""kl_balancer.conf documents scanners_count as 1-100 simultaneous connections."""
MAX_LANES = 64
"""Most event connections ("lanes") the balancer opens to one instance: ``connections`` 1-64, and a node's
``/readyz`` ``event_connections`` above it is clamped to it (as ``<Workers>`` on a node is 1-64)."""

DEFAULT_ALLOWED = (
    ("POST", "/api/{version}/lookup"),
    ("GET", "/api/{version}/suppliers"),
    ("GET", "/api/{version}/suppliers/{name}"),
    ("GET", "/api/{version}/tags"),
    ("GET", "/ioc_exports/{task}"),
)
"""Read-only requests, allowed when ``<AllowedRequests>`` is absent."""

_HOST = re.compile(r"[A-Za-z0-9._:-]{1,253}\Z")
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"})


class InstanceSettings(Frozen):
    """One ``<Instance matching_port= api_port= enabled= weight= connections=>host</Instance>``."""

    host: str
    matching_port: int = pydantic.Field(ge=1, le=65535)
    api_port: int = pydantic.Field(default=443, ge=1, le=65535)
    enabled: bool = True
    weight: int = pydantic.Field(default=1, ge=1, le=100)
    connections: Annotated[int, pydantic.Field(ge=1, le=MAX_LANES)] | Literal["auto"] = "auto"
    """Event connections ("lanes") to open to the node: a number, or ``auto`` = what the node's ``/readyz``
    says (``event_connections``: one per worker process), 1 when it says nothing or is not polled."""
    tls: bool = False
    """``tls="true"``: events to this node go over TLS, its certificate checked against the instance's pin
    (the one the REST gateway keeps: ``<CertDirPath>/<INSTANCE>_<matching_port>.pem``)."""
    api_port_set: bool = False
    """Whether ``api_port`` was written: readiness is polled only then (443 by default may be anything)."""
    line: int = 0

    @property
    def key(self) -> str:
        """Identity of the instance across reloads: ``host:matching_port`` (also names its pin file)."""
        return f"{self.host}:{self.matching_port}"

    @property
    def address(self) -> Address:
        return Address(self.host, self.matching_port)


class AllowedRequest(Frozen):
    method: str
    pattern: RoutePattern
    text: str


class HealthCheckSettings(Frozen):
    """Active checks (PING -> PONG) in HAProxy's terms: every ``interval`` s, ``rise``/``fall`` in a row."""

    interval: float = pydantic.Field(default=2.0, gt=0, le=3600)
    timeout: float = pydantic.Field(default=2.0, gt=0, le=3600)
    rise: int = pydantic.Field(default=2, ge=1, le=100)
    fall: int = pydantic.Field(default=3, ge=1, le=100)


MAX_CANARY_EVENT = 65536
"""Bytes of one canary event (``<Drill><Canary>``): a test event, far below any MaxEventSize."""
MAX_CANARIES = 1000


class CanarySettings(Frozen):
    """One ``<Drill><Canary expect="Category,...">event text</Canary>``: a test event for ``threatgate drill``
    and the detections every answer to it must carry (each a text its detection line contains, usually
    the category; ``expect=""``: no detection)."""

    event: str = pydantic.Field(min_length=1, max_length=MAX_CANARY_EVENT)
    expect: tuple[str, ...] = ()
    line: int = 0


BALANCER_PORTS = ("events", "api", "alerts", "metrics")
"""The balancer's listening ports by the names ``<AllowedSources ports=>`` uses (and X_THREATGATE_LISTEN)."""


class BalancerConfig(Frozen):
    """Everything a balancer needs, validated: produced only by :func:`load_balancer_config`."""

    path: str
    listen_host: str
    # The balancer's own listening ports: 0 asks the kernel for a free one (reported at start-up).
    matching_port: int = pydantic.Field(ge=0, le=65535)
    api_port: int = pydantic.Field(ge=0, le=65535)
    cybertrace_port: int = pydantic.Field(ge=0, le=65535)
    scanners_count: int = pydantic.Field(ge=1, le=MAX_SCANNERS)
    event_delimiter: re.Pattern[str] | None = None
    max_event_size: int = pydantic.Field(default=DEFAULT_MAX_EVENT_SIZE, ge=64, le=64 * 1024 * 1024)
    cert_path: str
    key_path: str
    cert_dir: str
    instances: tuple[InstanceSettings, ...]
    allowed: tuple[AllowedRequest, ...]
    health: HealthCheckSettings = HealthCheckSettings()
    readiness: bool = True
    """``<ReadinessCheck enabled=>``: poll each instance's ``/readyz`` (cluster roles, write routing)."""
    reply_timeout: float = pydantic.Field(default=30.0, gt=0, le=3600)
    max_inflight_events: int = pydantic.Field(default=20_000, ge=1, le=10_000_000)
    max_pending_events: int = pydantic.Field(default=100_000, ge=1, le=100_000_000)
    output: Address | None = None
    metrics: Address | None = None
    alert_forward: Address | None = None
    max_api_requests: int = pydantic.Field(default=100, ge=1, le=100_000)
    api_body_timeout: float = pydantic.Field(default=60.0, gt=0, le=3600)
    api_upstream_timeout: float = pydantic.Field(default=30.0, gt=0, le=3600)
    handshake_timeout: float = pydantic.Field(default=10.0, gt=0, le=3600)
    idle_timeout: float = pydantic.Field(default=DEFAULT_IDLE_TIMEOUT, ge=0, le=86400)
    """``<IdleTimeout>``: a client connection that sends nothing and waits for nothing this long is closed."""
    drain_timeout: float = pydantic.Field(default=10.0, gt=0, le=3600)
    """``<DrainTimeout>``: at SIGTERM, seconds to answer the events already read before cutting the clients."""
    max_event_wait: float = pydantic.Field(default=0, ge=0, le=86400)
    """``<MaxEventWait>``: seconds an event may wait for an instance before it is answered with an error
    finished line (0: wait for as long as it takes, the default: no event is ever answered unmatched)."""
    max_client_pending: int = pydantic.Field(default=0, ge=0, le=100_000_000)
    """``<MaxPendingEventsPerClient>``: unanswered events of one client before only that client is paused
    (0: MaxPendingEvents)."""
    stats_interval: float = pydantic.Field(default=3600.0, gt=0, le=86400)
    users: tuple[tuple[str, str], ...] = ()
    """``<Users><User name= password_hash=/></Users>``: who may log in to the operator console
    (balancer/console.py); the hashes are a node's (``threatgate users add --config balancer.conf NAME``)."""
    admin_socket: str | None = None
    """``<AdminSocket>``: the local UNIX socket of run-time control (``threatgate balancer instance``), mode
    0600; by default next to the configuration file (``kl_balancer.conf`` -> ``kl_balancer.sock``);
    ``enabled="false"``: none.  None in a configuration built in code."""
    matching_tls: TLSListener | None = None
    """``<MatchingTLS>``: events over TLS on matching_port, or on a second port (``port=``) beside it."""
    alert_tls: TLSListener | None = None
    """``<AlertTLS>``: service alerts over TLS on cybertrace_port, or on a second port beside it."""
    client_cert_path: str = ""
    client_key_path: str = ""
    """``<ClientCertificatePath>``/``<ClientPrivateKeyPath>``: what the balancer presents to nodes whose event
    port asks for a client certificate; by default its own SSLCertificatePath pair ("" in code: none)."""
    allowed_sources: AllowedSources = AllowedSources()
    """``<AllowedSources ports=>``: who may connect to each listening port (config/security.py)."""
    canaries: tuple[CanarySettings, ...] = ()
    """``<Drill><Canary>``: the failover drill's test events (``threatgate drill``); the balancer itself does
    not use them."""

    def address(self, port: int) -> Address:
        return Address(self.listen_host, port)

    @property
    def client_pending_limit(self) -> int:
        """Unanswered events one client may have before it alone stops being read."""
        return self.max_client_pending or self.max_pending_events

    def summary(self) -> str:
        enabled = sum(1 for i in self.instances if i.enabled)
        return (
            f"{self.path}: balancer config OK: events on {self.address(self.matching_port)}, "
            f"API on port {self.api_port}, alerts on port {self.cybertrace_port}, "
            f"{enabled}/{len(self.instances)} instance(s) enabled, scanners_count {self.scanners_count}, "
            f"{len(self.allowed)} allowed request(s)"
        )

    def warnings(self) -> list[str]:
        """Valid but probably not meant: ``threatgate validate`` prints these and still succeeds."""
        out: list[str] = []
        if self.output is None:
            out.append(
                "no enabled <OutputConnectionString>: detections of clients without X-KF-ReplyBack will be dropped "
                "(counted in threatgate_output_dropped_lines_total); set it to the SIEM's host:port, or have "
                "every client send X-KF-ReplyBack"
            )
        return out


def _read_instance(node: Node) -> InstanceSettings:
    host = node.value.strip()
    if not host:
        raise node.error("empty instance address: the element's text is the instance's host name or IP")
    if not _HOST.match(host.strip("[]")) or host.strip("[]") in (".", ".."):
        # The text also names the pinned-certificate file <CertDirPath>/<INSTANCE>_<port>.pem.
        raise node.error(f"instance address {host[:80]!r}: expected a host name or an IP address")
    data = {
        "host": host.strip("[]"),
        "matching_port": parse_field(
            node, node.attrs.get("matching_port"), "matching_port", InstanceSettings, "matching_port"
        ),
        "api_port": parse_field(node, node.attrs.get("api_port"), "api_port", InstanceSettings, "api_port", 443),
        "enabled": parse_bool(node, "enabled", True),
        "tls": parse_bool(node, "tls", False),
        "weight": parse_field(node, node.attrs.get("weight"), "weight", InstanceSettings, "weight", 1),
        "connections": _read_connections(node),
        "api_port_set": "api_port" in node.attrs,
        "line": node.line,
    }
    return build(node, InstanceSettings, data)


def _read_connections(node: Node) -> int | Literal["auto"]:
    """``connections="auto|1-64"`` (absent: auto)."""
    raw = node.attrs.get("connections")
    if raw is None or raw.strip().lower() == "auto":
        return "auto"
    text = raw.strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_LANES:
        raise node.error(
            f"connections={text!r}: expected auto (as many as the node's /readyz says) or a number 1-{MAX_LANES}"
        )
    return int(text)


def _read_allowed(node: Node | None) -> tuple[AllowedRequest, ...]:
    if node is None:
        return tuple(
            AllowedRequest(method=m, pattern=RoutePattern.parse(p), text=f"{m} {p}") for m, p in DEFAULT_ALLOWED
        )
    out: list[AllowedRequest] = []
    for child in node.elements():
        if child.tag != "Request":
            raise node.unknown_child(child, ("Request",))
        method = child.attrs.get("method", "").strip().upper()
        if method not in _METHODS:
            raise child.error(f"method={method!r}: expected one of {', '.join(sorted(_METHODS))}")
        path = child.attrs.get("path", "").strip()
        if not path.startswith("/") or any(c in path for c in "?#%\\ "):
            raise child.error(f"path={path!r}: expected an absolute path without query, %-escapes or spaces")
        out.append(AllowedRequest(method=method, pattern=RoutePattern.parse(path), text=f"{method} {path}"))
    return tuple(out)


def _read_health(node: Node | None) -> HealthCheckSettings:
    if node is None:
        return HealthCheckSettings()
    data = {
        "interval": parse_field(node, node.attrs.get("interval"), "interval", HealthCheckSettings, "interval", 2),
        "timeout": parse_field(node, node.attrs.get("timeout"), "timeout", HealthCheckSettings, "timeout", 2),
        "rise": parse_field(node, node.attrs.get("rise"), "rise", HealthCheckSettings, "rise", 2),
        "fall": parse_field(node, node.attrs.get("fall"), "fall", HealthCheckSettings, "fall", 3),
    }
    return build(node, HealthCheckSettings, data)


UNUSED = ("LicensePath", "LicenseDirPath")
"""CyberTrace's elements a balancer does not need: accepted for compatibility, not read."""


def balancer_config_from_xml(root: Node) -> BalancerConfig:
    """Build a :class:`BalancerConfig` from a parsed tree whose root is ``<Config>``.

    What no reader below asks for is refused (:func:`~threatgate.config.xml.read_checked`).
    """
    return read_checked(root, _read_config)


def _read_instances(root: Node, listen: tuple[str, int]) -> tuple[InstanceSettings, ...]:
    instances_node = root.only("Instances")
    if instances_node is None:
        raise root.error("missing mandatory element <Instances>")
    instances: list[InstanceSettings] = []
    for child in instances_node.elements():
        if child.tag != "Instance":
            raise instances_node.unknown_child(child, ("Instance",))
        instances.append(_read_instance(child))
    seen: dict[str, int] = {}
    for inst in instances:
        if inst.key in seen:
            raise ConfigError(
                root.path, inst.line, "Instance", f"instance {inst.key} listed twice (first at line {seen[inst.key]})"
            )
        seen[inst.key] = inst.line
    if not instances:
        raise instances_node.error("no <Instance>: the balancer needs at least one node")
    for inst in instances:
        if (inst.host, inst.matching_port) == listen:
            raise ConfigError(
                root.path, inst.line, "Instance", f"instance {inst.key} is this balancer's own event port (a loop)"
            )
    return tuple(instances)


def _read_config(root: Node) -> BalancerConfig:
    if root.tag != "Config":
        raise root.error("root element must be <Config> for a balancer config")
    for tag in UNUSED:
        unused = root.only(tag)
        if unused is not None:
            unused.ignore()
    balancer = root.only("Balancer")
    if balancer is None:
        raise root.error("missing mandatory element <Balancer>")
    host = balancer.value.strip().strip("[]")
    if not host:
        raise balancer.error("empty listen address: the element's text is the address to listen on")
    ports = {
        name: parse_field(balancer, balancer.attrs.get(name), name, BalancerConfig, name)
        for name in ("matching_port", "api_port", "cybertrace_port")
    }
    fixed = [port for port in ports.values() if port != 0]  # each 0 is a different port, picked at bind
    if len(set(fixed)) < len(fixed):
        raise balancer.error(f"matching_port, api_port and cybertrace_port must differ: {ports}")
    data: dict[str, object] = {
        "path": root.path,
        "listen_host": host,
        **ports,
        "scanners_count": parse_field(
            balancer, balancer.attrs.get("scanners_count"), "scanners_count", BalancerConfig, "scanners_count"
        ),
    }
    delim = root.only("EventDelimiter")
    if delim is not None and delim.text:
        pattern = compile_regex(delim, delim.text, "EventDelimiter")
        if pattern.search("") is not None:
            raise delim.error("EventDelimiter matches the empty string, which would split between every byte")
        data["event_delimiter"] = pattern
    for tag, key, default in (
        ("SSLCertificatePath", "cert_path", "certs/balancer.pem"),
        ("SSLPrivateKeyPath", "key_path", "certs/balancer.key"),
        ("CertDirPath", "cert_dir", "pins"),
    ):
        opt = root.only(tag)
        data[key] = resolve_path(opt or root, opt.value if opt is not None else default)
    for tag, key, same in (
        ("ClientCertificatePath", "client_cert_path", "cert_path"),
        ("ClientPrivateKeyPath", "client_key_path", "key_path"),
    ):
        opt = root.only(tag)
        data[key] = resolve_path(opt, opt.value) if opt is not None else data[same]
    for tag, key in (("MatchingTLS", "matching_tls"), ("AlertTLS", "alert_tls")):
        data[key] = read_tls_listener(
            root.only(tag), default_cert=str(data["cert_path"]), default_key=str(data["key_path"]), listen_host=host
        )
    data["allowed_sources"] = read_allowed_sources(root, BALANCER_PORTS)
    data["instances"] = _read_instances(root, (host, ports["matching_port"]))
    data["allowed"] = _read_allowed(root.only("AllowedRequests"))
    data["health"] = _read_health(root.only("HealthCheck"))
    readiness = root.only("ReadinessCheck")
    if readiness is not None:
        data["readiness"] = parse_bool(readiness, "enabled", True)
    for tag, key in (
        ("MaxEventSize", "max_event_size"),
        ("ReplyTimeout", "reply_timeout"),
        ("MaxInflightEvents", "max_inflight_events"),
        ("MaxPendingEvents", "max_pending_events"),
        ("HandshakeTimeout", "handshake_timeout"),
        ("IdleTimeout", "idle_timeout"),
        ("DrainTimeout", "drain_timeout"),
        ("MaxEventWait", "max_event_wait"),
        ("MaxPendingEventsPerClient", "max_client_pending"),
        ("StatisticsInterval", "stats_interval"),
        ("MaxConcurrentRequests", "max_api_requests"),
        ("RequestBodyTimeout", "api_body_timeout"),
        ("UpstreamTimeout", "api_upstream_timeout"),
    ):
        opt = root.only(tag)
        if opt is not None:
            data[key] = parse_field(opt, opt.value, tag, BalancerConfig, key)
    forward = root.only("AlertForwardConnectionString")
    if forward is not None and parse_bool(forward, "enabled", True):
        data["alert_forward"] = parse_destination(forward)
    metrics = root.only("MetricsConnectionString")
    if metrics is not None and parse_bool(metrics, "enabled", True):
        data["metrics"] = parse_metrics_address(metrics)
    output = root.only("OutputConnectionString")
    if output is not None and parse_bool(output, "enabled", True):
        data["output"] = parse_destination(output)
    users = root.only("Users")
    if users is not None:
        data["users"] = read_user_list(users)
    admin = root.only("AdminSocket")
    if admin is None:
        data["admin_socket"] = default_admin_socket(root.path)
    elif parse_bool(admin, "enabled", True):
        data["admin_socket"] = resolve_path(admin, admin.value) if admin.value else default_admin_socket(root.path)
    data["canaries"] = _read_drill(root.only("Drill"))
    return build(root, BalancerConfig, data)


def _read_drill(node: Node | None) -> tuple[CanarySettings, ...]:
    """``<Drill>`` with one ``<Canary expect="...">event</Canary>`` per test event (at least one)."""
    if node is None:
        return ()
    out: list[CanarySettings] = []
    for child in node.elements():
        if child.tag != "Canary":
            raise node.unknown_child(child, ("Canary",))
        event = child.value
        if not event or "\n" in event or "\r" in event:
            raise child.error("a canary is one event on one line: the element's text, not empty")
        if len(event.encode()) > MAX_CANARY_EVENT:
            raise child.error(f"canary event longer than {MAX_CANARY_EVENT} bytes")
        raw = child.attrs.get("expect")
        if raw is None:
            raise child.error('missing expect="...": the detections expected (e.g. the category), "" for none')
        expect = tuple(part.strip() for part in raw.split(",") if part.strip())
        out.append(CanarySettings(event=event, expect=expect, line=child.line))
    if not out:
        raise node.error("<Drill> without <Canary>: add at least one test event")
    if len(out) > MAX_CANARIES:
        raise node.error(f"more than {MAX_CANARIES} canaries")
    return tuple(out)


def default_admin_socket(config_path: str) -> str:
    """The admin socket next to the configuration file: its name with ``.sock`` for the extension."""
    stem = os.path.splitext(os.path.abspath(config_path))[0]
    return stem + ".sock"


def load_balancer_config(path: str) -> BalancerConfig:
    """Read and validate a balancer configuration file.

    Raises:
        ConfigError: with file:line, the element and what is wrong.
    """
    return balancer_config_from_xml(read_xml(path))
