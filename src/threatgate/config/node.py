"""The node configuration: a kl_feed_service.conf-style XML file, loaded into frozen models.

Element names follow the documented CyberTrace layout (see docs/configuration.md); extensions are
optional elements in the same style.  :func:`load_node_config` is the only entry point: it raises
:class:`~threatgate.errors.ConfigError` with ``file:line: <Element>: problem`` and never exits.
"""

from __future__ import annotations

import enum
import os
import re
from typing import Annotated, Literal

import pydantic

from threatgate.config.common import (
    Address,
    Frozen,
    build,
    compile_regex,
    field_range,
    parse_address,
    parse_bool,
    parse_field,
    parse_metrics_address,
    resolve_path,
)
from threatgate.config.destinations import parse_destination
from threatgate.config.passwords import check_hash_format
from threatgate.config.security import AllowedSources, TLSListener, read_allowed_sources, read_tls_listener
from threatgate.config.xml import Node, read_checked, read_xml

DEFAULT_MAX_EVENT_SIZE = 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 600
"""Seconds an event connection may send nothing before it is closed (HAProxy's ``timeout client``).

Long enough for a quiet SIEM source between bursts, short enough that a connection left open by a
crashed or misbehaving client gives its scanner slot back; a client that reconnects loses nothing.
When every slot is taken, a newcomer may also evict the longest-idle connection (net/events.py)."""
"""1 MiB, as the issue asks; syslog relays commonly cap messages at 64 KiB (rsyslog maxMessageSize),
so a longer "event" is almost always a client that never sends a newline."""

MAX_SCANNERS = 20
"""CyberTrace documents ScannersCount as 1-20, default 9 (one TCP connection per scanner)."""

RESERVED_NAMES = frozenset(
    {
        "SourceId",
        "MatchedIndicator",
        "RecordContext",
        "Category",
        "ActionableFields",
        "Confidence",
        "IndicatorInfo",
        "Date",
        "Alert",
        "ParamName",
        "ParamValue",
    }
)
"""Pattern names a rule may not take (CyberTrace reserves the first seven; the rest are ours)."""

_RULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
PATTERN_RE = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")
"""How a ``%Name%`` pattern looks inside a format string."""


class RuleType(enum.Enum):
    """What a regex rule extracts; CONTEXT values are rendered, never looked up."""

    URL = "URL"
    DOMAIN = "DOMAIN"
    IP = "IP"
    MD5 = "MD5"
    SHA1 = "SHA1"
    SHA256 = "SHA256"
    HASH = "HASH"
    CONTEXT = "CONTEXT"


class Rule(Frozen):
    """One typed extraction rule: ``<NAME type="URL" extract="all">regex</NAME>``."""

    name: str
    type: RuleType
    extract_all: bool
    pattern: re.Pattern[str]
    line: int


class ReplaceRule(Frozen):
    """A normalizing replace rule: every match of ``pattern`` becomes ``output`` (``\\n`` splits the event)."""

    pattern: re.Pattern[str]
    output: str

    @property
    def template(self) -> str:
        """``output`` as an ``re.sub`` template: taken literally (no group references)."""
        return self.output.replace("\\", "\\\\")


class Source(Frozen):
    """An event source: rules picked by sender IP or syslog host name, else ``default``."""

    id: str
    ips: frozenset[str] = frozenset()
    hostnames: frozenset[str] = frozenset()
    replace: tuple[ReplaceRule, ...] = ()
    ignore: tuple[re.Pattern[str], ...] = ()
    rules: tuple[Rule, ...] = ()


class InputSettings(Frozen):
    listen: Address
    tls: TLSListener | None = None
    """``<TLS>``: events over TLS, on the port itself or on a second one (config/security.py)."""
    event_delimiter: re.Pattern[str] | None = None
    max_event_size: int = pydantic.Field(default=DEFAULT_MAX_EVENT_SIZE, ge=64, le=64 * 1024 * 1024)
    sources: tuple[Source, ...]


class OutputSettings(Frozen):
    destination: Address
    event_format: str
    record_field_format: str
    actionable_field_format: str
    finished_format: str = "%REQ% LookupFinished"
    finished_enabled: bool = False
    alert_format: str | None = None
    alert_destination: Address | None = None
    retries_count: int = pydantic.Field(default=3, ge=0, le=10)
    retries_timeout: float = pydantic.Field(default=10.0, ge=0, le=60)


FeedFormat = Literal["json", "csv", "stix", "misp"]
Supplier = Literal["feed", "FalsePositive", "InternalTI"]


class FeedSettings(Frozen):
    """One ``<Feed>``: a file of indicator records with the category and confidence they detect as."""

    path: str
    name: str
    enabled: bool = True
    confidence: int = pydantic.Field(default=100, ge=0, le=100)
    category: str
    format: FeedFormat
    supplier: Supplier = "feed"
    actionable_fields: tuple[str, ...] = ()
    delimiter: str = ","
    indicator_column: str = ""
    """CSV only: the column holding the indicator (empty: the first of ``feeds.INDICATOR_FIELDS``)."""
    context_columns: tuple[str, ...] | None = None
    """CSV only: the columns kept as record context (None: every column but the indicator)."""
    line: int = 0


class FeedsSettings(Frozen):
    update_frequency: int = pydantic.Field(default=30, ge=0, le=1440)
    per_scan_detect_limit: int = pydantic.Field(default=0, ge=0, le=1_000_000)
    feeds: tuple[FeedSettings, ...] = ()
    snapshot_dir: str = ""
    """``<Feeds snapshot_dir>``: where loaded feed versions are kept as snapshot files (node/snapshots.py);
    by default beside the supplier database, named after it, else ``state/<config stem>.snapshots``.
    Empty (a configuration built in code): a temporary directory of the process."""


class ServiceSettings(Frozen):
    scanners_count: int = pydantic.Field(default=9, ge=1, le=MAX_SCANNERS)
    metrics: Address | None = None
    handshake_timeout: float = pydantic.Field(default=10.0, gt=0, le=3600)
    idle_timeout: float = pydantic.Field(default=DEFAULT_IDLE_TIMEOUT, ge=0, le=86400)
    """``<IdleTimeout>``: an event connection that sends nothing for this long is closed (0: never)."""
    drain_timeout: float = pydantic.Field(default=10.0, gt=0, le=3600)
    """``<DrainTimeout>``: at SIGTERM, seconds to deliver the replies and detections of events already read
    before connections are cut and the process exits (docs/operations.md, "Stopping: the drain")."""


MAX_WORKERS = 64


class ScanSettings(Frozen):
    """``<ScanSettings>``: how many processes match events (CyberTrace 5's element of the same name holds
    ScanningThreadsPerScanner; threatgate's parallelism is processes, see docs/architecture.md "Workers")."""

    workers: Annotated[int, pydantic.Field(ge=1, le=MAX_WORKERS)] | Literal["auto"] = "auto"
    """``<Workers>``: worker processes matching events, 1-64, or ``auto``: one per CPU the process may use.
    One worker is today's single process: the node matches in the process that listens."""


def resolve_workers(value: int | Literal["auto"], cpus: int) -> int:
    """The number of worker processes ``<Workers>`` asks for, given the CPUs the process may use.

    ``cpus`` is passed in by the edge (``len(os.sched_getaffinity(0))``), so this stays pure.
    """
    if value == "auto":
        return max(1, min(MAX_WORKERS, cpus))
    return value


MAX_BODY_SIZE = 64 * 1024 * 1024
"""CyberTrace documents 64 MB (67,108,864 bytes) as the largest lookup body."""

_USER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}\Z")
_EXPORT_NAME = re.compile(r"[A-Za-z0-9_-]{2,64}\Z")
EXPORT_DELIMITERS = {",": ",", ";": ";", "space": " ", " ": " ", "\\t": "\t", "\t": "\t"}
EXPORT_FREQUENCIES = (0, 30, 60, 120, 240, 480, 960, 1440)
MAX_EXPORT_RECORDS = 50_000


class HTTPServerSettings(Frozen):
    """``<HTTPServer>``: the REST API over HTTPS (absent: no API, no API suppliers)."""

    listen: Address
    cert_path: str
    key_path: str
    users: tuple[tuple[str, str], ...] = ()  # (name, password hash)
    database: str
    header_timeout: float = pydantic.Field(default=10.0, gt=0, le=3600)
    body_timeout: float = pydantic.Field(default=60.0, gt=0, le=3600)
    idle_timeout: float = pydantic.Field(default=75.0, gt=0, le=3600)


class IoCExportSettings(Frozen):
    """One ``<IoCExport>`` task: a CSV of indicators served at ``/ioc_exports/<name>``."""

    name: str
    enabled: bool = True
    delimiter: str = ","
    update_frequency: int = pydantic.Field(default=0, ge=0, le=1440)  # and one of EXPORT_FREQUENCIES
    create_header: bool = True
    records_limit: int = pydantic.Field(default=MAX_EXPORT_RECORDS, ge=1, le=MAX_EXPORT_RECORDS)
    sources: tuple[str, ...] = ()  # feed categories, feed names or supplier names; empty = all
    fields: tuple[str, ...] = ("indicator", "category", "source", "confidence")
    user: str | None = None
    password_hash: str | None = None


class EtcdSettings(Frozen):
    """``<Cluster><Etcd>``: keep the settings in etcd and elect the Control through a lease."""

    endpoints: tuple[str, ...]
    prefix: str = "/threatgate"
    lease_ttl: int = pydantic.Field(default=5, ge=2, le=300)
    election: bool = True
    ca_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = None


class ClusterSettings(Frozen):
    """``<Cluster>``: this node's place in a Control/Secondary cluster (docs/cluster.md).

    Only local things live here; role, cluster id and members live in the state directory, written
    by ``threatgate cluster init|join`` and kept across restarts.
    """

    listen: Address
    state_dir: str
    heartbeat: float = pydantic.Field(default=2.0, ge=0.1, le=60)
    fall: int = pydantic.Field(default=3, ge=1, le=100)
    keep_revisions: int = pydantic.Field(default=20, ge=2, le=10_000)
    request_timeout: float = pydantic.Field(default=5.0, ge=0.1, le=300)
    etcd: EtcdSettings | None = None


NODE_PORTS = ("events", "api", "metrics", "cluster")
"""The node's listening ports by the names ``<AllowedSources ports=>`` uses (and X_THREATGATE_LISTEN)."""


class NodeConfig(Frozen):
    """Everything a node needs, validated: produced only by :func:`load_node_config`."""

    path: str
    input: InputSettings
    output: OutputSettings
    feeds: FeedsSettings
    service: ServiceSettings
    scan: ScanSettings = ScanSettings()
    http: HTTPServerSettings | None = None
    exports: tuple[IoCExportSettings, ...] = ()
    cluster: ClusterSettings | None = None
    allowed_sources: AllowedSources = AllowedSources()
    """``<AllowedSources ports=>``: who may connect to each listening port (config/security.py)."""

    @property
    def rule_names(self) -> frozenset[str]:
        return frozenset(rule.name for source in self.input.sources for rule in source.rules)

    def summary(self) -> str:
        """The one line ``threatgate validate`` prints for a valid file."""
        n_rules = sum(len(s.rules) for s in self.input.sources)
        enabled = sum(1 for f in self.feeds.feeds if f.enabled)
        return (
            f"{self.path}: node config OK: events on {self.input.listen}, {len(self.input.sources)} source(s), "
            f"{n_rules} rule(s), {enabled}/{len(self.feeds.feeds)} feed(s) enabled, "
            f"ScannersCount {self.service.scanners_count}, Workers {self.scan.workers}"
        )


def _read_rule(node: Node) -> Rule:
    if not _RULE_NAME.match(node.tag):
        raise node.error(f"rule name {node.tag!r} must be a letter or _ followed by letters, digits or _")
    if node.tag in RESERVED_NAMES:
        raise node.error(f"rule name {node.tag!r} is reserved for an output pattern")
    raw_type = node.attrs.get("type", "CONTEXT").strip().upper()
    try:
        rule_type = RuleType(raw_type)
    except ValueError:
        known = ", ".join(t.value for t in RuleType)
        raise node.error(f"unknown rule type {raw_type!r}; expected one of {known}") from None
    extract = node.attrs.get("extract", "first").strip().lower()
    if extract not in ("all", "first"):
        raise node.error(f"extract={extract!r}: expected all or first")
    pattern = compile_regex(node, node.value, "regex")
    return Rule(name=node.tag, type=rule_type, extract_all=extract == "all", pattern=pattern, line=node.line)


def _read_normalizing(node: Node) -> tuple[tuple[ReplaceRule, ...], tuple[re.Pattern[str], ...]]:
    replace: list[ReplaceRule] = []
    ignore: list[re.Pattern[str]] = []
    for child in node.elements():
        if child.tag == "Replace":
            if "input" not in child.attrs:
                raise child.error("missing attribute input (the regex to replace)")
            pattern = compile_regex(child, child.attrs["input"], "input regex")
            output = child.attrs.get("output", "").replace("\\n", "\n")
            try:
                pattern.sub(output.replace("\\", "\\\\"), "")
            except re.error as exc:
                raise child.error(f"output {output!r}: {exc}") from None
            replace.append(ReplaceRule(pattern=pattern, output=output))
        elif child.tag == "Ignore":
            raw = child.attrs.get("input", child.value)
            if not raw:
                raise child.error("empty ignore regex")
            ignore.append(compile_regex(child, raw, "ignore regex"))
        else:
            raise node.unknown_child(child, ("Replace", "Ignore"))
    return tuple(replace), tuple(ignore)


def _read_source(node: Node) -> Source:
    source_id = node.attrs.get("id", "").strip()
    if not source_id:
        raise node.error("missing attribute id")
    ips = frozenset(x.strip() for x in node.attrs.get("ip", "").split(",") if x.strip())
    hostnames = frozenset(x.strip().lower() for x in node.attrs.get("hostname", "").split(",") if x.strip())
    replace: tuple[ReplaceRule, ...] = ()
    ignore: tuple[re.Pattern[str], ...] = ()
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for child in node.elements():
        if child.tag == "NormalizingRules":
            replace, ignore = _read_normalizing(child)
            continue
        rule = _read_rule(child)
        if rule.name in seen:
            raise child.error(
                f"rule {rule.name} defined twice in source {source_id!r} (first at line {seen[rule.name]})"
            )
        seen[rule.name] = child.line
        rules.append(rule)
    return Source(id=source_id, ips=ips, hostnames=hostnames, replace=replace, ignore=ignore, rules=tuple(rules))


def _read_input(node: Node) -> InputSettings:
    listen = parse_address(node.require("ConnectionString"), listen=True)
    delimiter = None
    delim_node = node.only("EventDelimiter")
    if delim_node is not None and delim_node.text:
        delimiter = compile_regex(delim_node, delim_node.text, "EventDelimiter")
        if delimiter.search("") is not None:
            raise delim_node.error("EventDelimiter matches the empty string, which would split between every byte")
    size_node = node.only("MaxEventSize")
    max_size = DEFAULT_MAX_EVENT_SIZE
    if size_node is not None:
        max_size = parse_field(size_node, size_node.value, "MaxEventSize", InputSettings, "max_event_size")
    regexps = node.require("RegExps")
    sources: list[Source] = []
    seen: dict[str, int] = {}
    for child in regexps.elements():
        if child.tag != "Source":
            raise regexps.unknown_child(child, ("Source",))
        source = _read_source(child)
        if source.id in seen:
            raise child.error(f"source id {source.id!r} defined twice (first at line {seen[source.id]})")
        seen[source.id] = child.line
        sources.append(source)
    if "default" not in seen:
        raise regexps.error('a <Source id="default"> is mandatory')
    return InputSettings(listen=listen, event_delimiter=delimiter, max_event_size=max_size, sources=tuple(sources))


def _check_patterns(node: Node, fmt: str, allowed: frozenset[str]) -> None:
    for name in PATTERN_RE.findall(fmt):
        if name not in allowed:
            raise node.error(f"unknown pattern %{name}% in {fmt!r}; known: {', '.join(sorted(allowed))}")


EVENT_PATTERNS = frozenset(
    {"Date", "Category", "MatchedIndicator", "SourceId", "Confidence", "RecordContext", "ActionableFields"}
)
FIELD_PATTERNS = frozenset({"ParamName", "ParamValue"})


def _read_output(node: Node, rule_names: frozenset[str]) -> OutputSettings:
    destination = parse_destination(node.require("ConnectionString"))
    data: dict[str, object] = {"destination": destination}
    lines: dict[str, Node] = {}
    for tag, key, allowed in (
        ("EventFormat", "event_format", EVENT_PATTERNS | rule_names),
        ("RecordFieldContextFormat", "record_field_format", FIELD_PATTERNS),
        ("ActionableFieldContextFormat", "actionable_field_format", FIELD_PATTERNS),
    ):
        child = node.require(tag)
        if not child.text.strip():
            raise child.error("must not be empty")
        _check_patterns(child, child.text, allowed)
        data[key] = child.text
        lines[key] = child
    finished = node.only("FinishedEventFormat")
    if finished is not None:
        _check_patterns(finished, finished.text, frozenset({"Date", "SourceId", "RecordContext"}) | rule_names)
        if finished.text.strip():
            data["finished_format"] = finished.text
        data["finished_enabled"] = parse_bool(finished, "enabled", False)
    alert = node.only("AlertFormat")
    if alert is not None and alert.text.strip():
        _check_patterns(alert, alert.text, frozenset({"Date", "Alert", "RecordContext"}))
        data["alert_format"] = alert.text
    alert_to = node.only("AlertConnectionString")
    if alert_to is not None and parse_bool(alert_to, "enabled", False):
        data["alert_destination"] = parse_destination(alert_to)
    retries = node.only("EventSendingRetriesCount")
    if retries is not None:
        data["retries_count"] = parse_field(
            retries, retries.value, "EventSendingRetriesCount", OutputSettings, "retries_count"
        )
    retry_timeout = node.only("EventSendingRetriesTimeout")
    if retry_timeout is not None:
        data["retries_timeout"] = parse_field(
            retry_timeout, retry_timeout.value, "EventSendingRetriesTimeout", OutputSettings, "retries_timeout"
        )
    return build(node, OutputSettings, data, lines)


def _read_feed(node: Node) -> FeedSettings:
    raw_name = node.attrs.get("filename")
    if raw_name is None:
        raise node.error("missing attribute filename")
    path = resolve_path(node, raw_name)
    enabled = parse_bool(node, "enabled", True)
    fmt = node.attrs.get("format", "").strip().lower()
    if not fmt:
        # A STIX bundle is a .json file too: it is never guessed (format="stix" is explicit), so an
        # existing JSON feed keeps its meaning.  A directory can only be a MISP feed.
        fmt = "misp" if os.path.isdir(path) else "csv" if path.lower().endswith(".csv") else "json"
    if fmt not in ("json", "csv", "stix", "misp"):
        raise node.error(f"format={fmt!r}: expected json, csv, stix or misp")
    if enabled and fmt == "misp":
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            raise node.error(f"MISP feed {path} must be a directory holding manifest.json")
    elif enabled and not os.path.isfile(path):
        if os.path.isdir(path):
            raise node.error(f'feed file {path} is a directory (format="misp" reads a MISP feed directory)')
        raise node.error(f"feed file {path} does not exist")
    supplier = node.attrs.get("supplier", "feed").strip()
    if supplier not in ("feed", "FalsePositive", "InternalTI"):
        raise node.error(f"supplier={supplier!r}: expected FalsePositive or InternalTI (or leave it out)")
    category = node.attrs.get("category", "").strip()
    if not category:
        category = {"FalsePositive": "FalsePositive", "InternalTI": "InternalTI"}.get(supplier, "")
    if not category:
        raise node.error("missing attribute category")
    delimiter = node.attrs.get("delimiter", ",")
    if delimiter == "\\t":
        delimiter = "\t"
    if len(delimiter) != 1 or delimiter in '"\r\n':
        raise node.error(f"delimiter={delimiter!r}: expected one character (not a quote or newline)")
    actionable_fields = tuple(x.strip() for x in node.attrs.get("actionable_fields", "").split(",") if x.strip())
    indicator_column, context_columns = _read_feed_columns(node, fmt, actionable_fields)
    data = {
        "path": path,
        "name": os.path.basename(path),
        "enabled": enabled,
        "confidence": parse_field(node, node.attrs.get("confidence"), "confidence", FeedSettings, "confidence", 100),
        "category": category,
        "format": fmt,
        "supplier": supplier,
        "actionable_fields": actionable_fields,
        "delimiter": delimiter,
        "indicator_column": indicator_column,
        "context_columns": context_columns,
        "line": node.line,
    }
    return build(node, FeedSettings, data)


def _read_feed_columns(node: Node, fmt: str, actionable_fields: tuple[str, ...]) -> tuple[str, tuple[str, ...] | None]:
    """``indicator_column`` and ``context_columns`` of a ``<Feed>``: CSV only, checked against each other.

    Whether the columns exist is only known when the file is read: the feed loader refuses a
    header without them (and ``threatgate validate`` loads every feed).
    """
    raw_indicator = node.attrs.get("indicator_column")
    raw_context = node.attrs.get("context_columns")
    for name, raw in (("indicator_column", raw_indicator), ("context_columns", raw_context)):
        if raw is not None and fmt != "csv":
            raise node.error(f'{name} applies to CSV feeds only (this feed has format="{fmt}")')
    indicator = (raw_indicator or "").strip()
    if raw_indicator is not None and not indicator:
        raise node.error("indicator_column is empty: name the CSV column that holds the indicator, or leave it out")
    if raw_context is None:
        return indicator, None
    context = tuple(x.strip() for x in raw_context.split(",") if x.strip())
    folded = {c.lower() for c in context}
    if indicator and indicator.lower() in folded:
        raise node.error(
            f"context_columns names {indicator!r}, the indicator column: the indicator is never record context"
        )
    missing = [f for f in actionable_fields if f.lower() not in folded]
    if missing:
        raise node.error(
            f"actionable_fields {', '.join(missing)} not in context_columns: an actionable field must be kept"
        )
    return indicator, context


def _read_feeds(node: Node | None, root: Node, http: HTTPServerSettings | None) -> FeedsSettings:
    raw_dir = node.attrs.get("snapshot_dir") if node is not None else None
    if node is not None and raw_dir is not None:
        snapshot_dir = resolve_path(node, raw_dir)
    elif http is not None:  # one directory per node: two nodes sharing one would remove each other's files
        snapshot_dir = os.path.splitext(http.database)[0] + ".snapshots"  # state/node1.sqlite3 -> state/node1.snapshots
    else:  # per configuration file: nodes whose configs share a directory do not share snapshots
        stem = os.path.splitext(os.path.basename(root.path))[0] or "node"
        snapshot_dir = resolve_path(root, f"state/{stem}.snapshots")
    if node is None:
        return FeedsSettings(snapshot_dir=snapshot_dir)
    feeds = []
    for child in node.elements():
        if child.tag != "Feed":
            raise node.unknown_child(child, ("Feed",))
        feeds.append(_read_feed(child))
    return FeedsSettings(
        update_frequency=parse_field(
            node, node.attrs.get("update_frequency"), "update_frequency", FeedsSettings, "update_frequency", 30
        ),
        per_scan_detect_limit=parse_field(
            node,
            node.attrs.get("per_scan_detect_limit"),
            "per_scan_detect_limit",
            FeedsSettings,
            "per_scan_detect_limit",
            0,
        ),
        feeds=tuple(feeds),
        snapshot_dir=snapshot_dir,
    )


def _read_service(node: Node | None) -> ServiceSettings:
    if node is None:
        return ServiceSettings()
    data: dict[str, object] = {}
    scanners = node.only("ScannersCount")
    if scanners is not None:
        data["scanners_count"] = parse_field(
            scanners, scanners.value, "ScannersCount", ServiceSettings, "scanners_count"
        )
    metrics = node.only("MetricsConnectionString")
    if metrics is not None and parse_bool(metrics, "enabled", True):
        data["metrics"] = parse_metrics_address(metrics)
    handshake = node.only("HandshakeTimeout")
    if handshake is not None:
        data["handshake_timeout"] = parse_field(
            handshake, handshake.value, "HandshakeTimeout", ServiceSettings, "handshake_timeout"
        )
    idle = node.only("IdleTimeout")
    if idle is not None:
        data["idle_timeout"] = parse_field(idle, idle.value, "IdleTimeout", ServiceSettings, "idle_timeout")
    drain = node.only("DrainTimeout")
    if drain is not None:
        data["drain_timeout"] = parse_field(drain, drain.value, "DrainTimeout", ServiceSettings, "drain_timeout")
    return build(node, ServiceSettings, data)


def _read_scan(node: Node | None) -> ScanSettings:
    if node is None:
        return ScanSettings()
    data: dict[str, object] = {}
    workers = node.only("Workers")
    if workers is not None:
        raw = workers.value.strip()
        if raw.lower() == "auto":
            data["workers"] = "auto"
        else:
            data["workers"] = parse_field(workers, raw, "Workers (a number or auto)", ScanSettings, "workers")
    return build(node, ScanSettings, data)


def _check_password_hash(node: Node, stored: str) -> str:
    try:
        check_hash_format(stored)
    except ValueError as exc:
        raise node.error(f"password_hash: {exc} (make one with `threatgate users add`)") from None
    return stored


def read_user_list(users_node: Node) -> tuple[tuple[str, str], ...]:
    """``<Users><User name= password_hash=/>...</Users>`` as (name, hash) pairs, checked.

    The node's ``<HTTPServer><Users>`` and the balancer's ``<Users>`` (its console) share the format.
    """
    users: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for child in users_node.elements():
        if child.tag != "User":
            raise users_node.unknown_child(child, ("User",))
        name = child.attrs.get("name", "")
        if not _USER_NAME.match(name):
            raise child.error(f"user name {name!r}: expected 1-64 of A-Z a-z 0-9 _ . @ -")
        if name in seen:
            raise child.error(f"user {name!r} defined twice (first at line {seen[name]})")
        if "password" in child.attrs:
            raise child.error("plaintext password attributes are refused; store a hash with `threatgate users add`")
        seen[name] = child.line
        users.append((name, _check_password_hash(child, child.attrs.get("password_hash", ""))))
    return tuple(users)


def _read_http(node: Node | None) -> HTTPServerSettings | None:
    if node is None:
        return None
    if not parse_bool(node, "enabled", True):
        node.ignore()  # a disabled section is not read, so not checked either
        return None
    listen_node = node.only("ConnectionString")
    listen = parse_address(listen_node, listen=True) if listen_node is not None else Address("127.0.0.1", 443)
    paths: dict[str, str] = {}
    for tag, key, default in (
        ("CertificatePath", "cert_path", "certs/node.pem"),
        ("PrivateKeyPath", "key_path", "certs/node.key"),
        ("Database", "database", "state/node.sqlite3"),
    ):
        child = node.only(tag)
        paths[key] = resolve_path(child or node, child.value if child is not None else default)
    users = read_user_list(node.only("Users") or Node("Users", {}, node.line, node.path))
    data: dict[str, object] = {"listen": listen, "users": users, **paths}
    for tag, key in (
        ("RequestHeaderTimeout", "header_timeout"),
        ("RequestBodyTimeout", "body_timeout"),
        ("IdleTimeout", "idle_timeout"),
    ):
        child = node.only(tag)
        if child is not None:
            data[key] = parse_field(child, child.value, tag, HTTPServerSettings, key)
    resources_ip = node.only("ResourcesIP")
    if resources_ip is not None:
        resources_ip.ignore()  # CyberTrace's: accepted for compatibility, unused (docs/configuration.md)
    return build(node, HTTPServerSettings, data)


def _split_list(raw: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (raw or "").split(",") if x.strip())


def _read_export(node: Node) -> IoCExportSettings:
    name = node.attrs.get("name", "")
    if not _EXPORT_NAME.match(name):
        raise node.error(f"name={name!r}: expected 2-64 of A-Z a-z 0-9 _ -")
    raw_delim = node.attrs.get("delimiter", ",")
    if raw_delim not in EXPORT_DELIMITERS:
        raise node.error(f"delimiter={raw_delim!r}: expected one of , ; space \\t")
    freq = parse_field(
        node, node.attrs.get("update_frequency"), "update_frequency", IoCExportSettings, "update_frequency", 0
    )
    if freq not in EXPORT_FREQUENCIES:
        raise node.error(f"update_frequency={freq}: expected one of {', '.join(map(str, EXPORT_FREQUENCIES))}")
    user = node.attrs.get("user")
    password_hash = node.attrs.get("password_hash")
    if (user is None) != (password_hash is None):
        raise node.error("user and password_hash go together (both or neither)")
    data: dict[str, object] = {
        "name": name,
        "enabled": parse_bool(node, "enabled", True),
        "delimiter": EXPORT_DELIMITERS[raw_delim],
        "update_frequency": freq,
        "create_header": parse_bool(node, "create_header", True),
        "records_limit": parse_field(
            node,
            node.attrs.get("records_limit"),
            "records_limit",
            IoCExportSettings,
            "records_limit",
            MAX_EXPORT_RECORDS,
        ),
        "sources": _split_list(node.attrs.get("sources")),
        "user": user,
        "password_hash": _check_password_hash(node, password_hash) if password_hash is not None else None,
    }
    fields = _split_list(node.attrs.get("fields"))
    if fields:
        data["fields"] = fields
    return build(node, IoCExportSettings, data)


def _read_exports(node: Node | None) -> tuple[IoCExportSettings, ...]:
    if node is None:
        return ()
    exports: list[IoCExportSettings] = []
    seen: dict[str, int] = {}
    for child in node.elements():
        if child.tag != "IoCExport":
            raise node.unknown_child(child, ("IoCExport",))
        task = _read_export(child)
        if task.name in seen:
            raise child.error(f"export task {task.name!r} defined twice (first at line {seen[task.name]})")
        seen[task.name] = child.line
        exports.append(task)
    return tuple(exports)


def _seconds(node: Node, what: str, lo: float, hi: float) -> float:
    try:
        value = float(node.value)
    except ValueError:
        raise node.error(f"{what} must be a number of seconds, got {node.value[:40]!r}") from None
    if not lo <= value <= hi:
        raise node.error(f"{what} must be {lo:g}-{hi:g} seconds")
    return value


def _read_etcd(node: Node) -> EtcdSettings:
    endpoints = tuple(e for e in _split_list(node.attrs.get("endpoints")) if e)
    if not endpoints:
        raise node.error('endpoints="http://host:2379,..." is required')
    for endpoint in endpoints:
        if not re.fullmatch(r"https?://[^/\s]+", endpoint):
            raise node.error(f"endpoint {endpoint!r}: expected http(s)://host:port")
    prefix = node.attrs.get("prefix", "/threatgate")
    if not re.fullmatch(r"/[\w./-]{0,200}", prefix):
        raise node.error(f"prefix {prefix!r}: expected /name (letters, digits, _ . / -)")
    data: dict[str, object] = {
        "endpoints": endpoints,
        "prefix": prefix.rstrip("/") or "/threatgate",
        "lease_ttl": parse_field(node, node.attrs.get("lease_ttl"), "lease_ttl", EtcdSettings, "lease_ttl", 5),
        "election": parse_bool(node, "election", True),
    }
    for attr, key in (("ca", "ca_path"), ("cert", "cert_path"), ("key", "key_path")):
        if attr in node.attrs:
            data[key] = resolve_path(node, node.attrs[attr])
    if ("cert_path" in data) != ("key_path" in data):
        raise node.error("cert and key go together")
    return build(node, EtcdSettings, data)


def _read_cluster(node: Node | None, http: HTTPServerSettings | None) -> ClusterSettings | None:
    if node is None:
        return None
    if not parse_bool(node, "enabled", True):
        node.ignore()
        return None
    if http is None:
        raise node.error("a cluster node needs <HTTPServer> (its API, users and supplier database are clustered)")
    state = node.only("StateDirectory")
    data: dict[str, object] = {
        "listen": parse_address(node.require("ConnectionString")),
        "state_dir": resolve_path(state or node, state.value if state is not None else "state/cluster"),
    }
    for tag, key in (("HeartbeatInterval", "heartbeat"), ("RequestTimeout", "request_timeout")):
        timing = node.only(tag)
        if timing is not None:
            data[key] = _seconds(timing, tag, *field_range(ClusterSettings, key))
    fall = node.only("FallCount")
    if fall is not None:
        data["fall"] = parse_field(fall, fall.value, "FallCount", ClusterSettings, "fall")
    keep = node.only("KeepRevisions")
    if keep is not None:
        data["keep_revisions"] = parse_field(keep, keep.value, "KeepRevisions", ClusterSettings, "keep_revisions")
    etcd = node.only("Etcd")
    if etcd is not None:
        data["etcd"] = _read_etcd(etcd)
    return build(node, ClusterSettings, data)


def read_users(path: str) -> dict[str, str]:
    """The API users (name -> password hash) of node config ``path``, read alone.

    A running node re-reads its users when the file changes (node/auth.py): only ``<HTTPServer>`` is
    read, so a feed file briefly missing while a feed updater replaces it cannot keep a user added or
    removed meanwhile from taking effect.

    Raises:
        ConfigError: the file is not a node config, or its ``<HTTPServer>`` is invalid.
    """
    root = read_xml(path)
    if root.tag != "Configuration":
        raise root.error("root element must be <Configuration> for a node config")
    http = _read_http(root.only("HTTPServer"))
    return dict(http.users) if http is not None else {}


def node_config_from_xml(root: Node) -> NodeConfig:
    """Build a :class:`NodeConfig` from a parsed tree whose root is ``<Configuration>``.

    Every element and attribute must be read by one of the readers above: what none asked for is
    refused (:func:`~threatgate.config.xml.read_checked`: ``unknown attribute 'x' (did you mean 'y'?)``).
    """
    return read_checked(root, _read_configuration)


def _read_configuration(root: Node) -> NodeConfig:
    if root.tag != "Configuration":
        raise root.error("root element must be <Configuration> for a node config")
    inputs = root.require("InputSettings")
    input_settings = _read_input(inputs)
    rule_names = frozenset(r.name for s in input_settings.sources for r in s.rules)
    http = _read_http(root.only("HTTPServer"))
    default_cert = http.cert_path if http is not None else resolve_path(root, "certs/node.pem")
    default_key = http.key_path if http is not None else resolve_path(root, "certs/node.key")
    tls = read_tls_listener(inputs.only("TLS"), default_cert=default_cert, default_key=default_key)
    if tls is not None:
        input_settings = input_settings.model_copy(update={"tls": tls})
    return NodeConfig(
        path=root.path,
        input=input_settings,
        allowed_sources=read_allowed_sources(root, NODE_PORTS),
        output=_read_output(root.require("OutputSettings"), rule_names),
        feeds=_read_feeds(root.only("Feeds"), root, http),
        service=_read_service(root.only("ServiceSettings")),
        scan=_read_scan(root.only("ScanSettings")),
        http=http,
        exports=_read_exports(root.only("IoCExports")),
        cluster=_read_cluster(root.only("Cluster"), http),
    )


def load_node_config(path: str) -> NodeConfig:
    """Read and validate a node configuration file.

    Raises:
        ConfigError: with file:line, the element and what is wrong.
    """
    return node_config_from_xml(read_xml(path))
