"""Feed files: parse JSON and CSV feeds into columns of records, the input of a snapshot.

STIX bundles and MISP feed directories are parsed by :mod:`threatgate.node.stix` and
:mod:`threatgate.node.misp` record by record into a :class:`MemorySnapshot` (a builder of the same
columns); :func:`parse_source` dispatches on ``settings.format``.

Rules:
1. A feed is never held in memory as Python objects once loaded.  Parsing yields columns (kind,
   normalised value, raw indicator text, context pairs per record: :class:`~threatgate.node.feedparse.ParsedFeed`)
   that the snapshot writer (:mod:`threatgate.node.snapfile`) turns into one file the node maps.
2. A malformed record (not an object, no indicator, a value that is not a valid indicator) is
   skipped and counted with its position; it is never fatal.  A file that cannot be a feed at all
   (unreadable, not a JSON array, truncated, no CSV header) raises :class:`FeedError`, so the caller
   keeps the previous version.
3. A loaded version never depends on the feed file staying the same: the file is read once, and every
   record's context is in the snapshot, so a file rewritten in place, truncated, replaced or deleted
   changes nothing for the loaded version; the new content becomes a new version at the next reload
   (the node watches the files: :mod:`threatgate.node.feedwatch`).

Record fields: the indicator is in ``indicator``, or in one of ``mask``/``url``/``domain``/``ip``/
``md5``/``sha1``/``sha256`` (the first of these the record has); every other scalar field is record
context.  A domain record covers sub-domains when written ``*.example.com`` or when a field
``include_subdomains`` (or ``subdomains``) is true.

CSV files are read as the world publishes them (abuse.ch URLhaus, Feodo Tracker): lines starting
with ``#`` are comments, and the header is the first uncommented row that names the indicator
column, or else the last comment line before the first record that does (``# id,dateadded,url,...``).
The Feed attribute ``indicator_column`` names the indicator column (Feodo's ``dst_ip``; it is then
read back as ``indicator``, classified by shape) and ``context_columns`` the columns kept as record
context; a name that is not in the header makes the file refused, never silently ignored.
"""

from __future__ import annotations

import csv
import difflib
import errno
import itertools
import json
import logging
import os
import re
import stat
import threading
import weakref
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import xxhash

from threatgate.config.node import FeedSettings, NodeConfig
from threatgate.errors import FeedError
from threatgate.fs import os_reason
from threatgate.node import normalize

if TYPE_CHECKING:
    from threatgate.node.feedparse import ParsedFeed
    from threatgate.node.snapfile import FeedIndex, Record

INDICATOR_FIELDS = ("indicator", "mask", "url", "domain", "ip", "md5", "sha1", "sha256")
_SUBDOMAIN_FIELDS = ("include_subdomains", "subdomains")
_TRUTHY = frozenset({"true", "1", "yes", "on"})
MAX_BAD_EXAMPLES = 5
"""How many malformed records a load report quotes (the rest are only counted)."""

MAX_CONTEXT_TEXT = 2048
"""Longest context text kept by :func:`context_text` (a MISP event description can be an essay)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_JSON_GAP = re.compile(r"[\s,]*")
_HEX = re.compile(r"[0-9A-Fa-f]+\Z")


class Kind:
    """Indicator kinds, one lookup namespace each (ints: they are packed into store keys)."""

    URL = 0
    DOMAIN = 1
    DOMAIN_SUFFIX = 2
    IP = 3
    CIDR = 4
    HASH = 5
    MASK = 6
    NAMES = ("url", "domain", "domain_suffix", "ip", "cidr", "hash", "mask")


def key_of(kind: int, value: str) -> int:
    """The store key of a normalised ``value`` of ``kind``: unsigned 64-bit, the same in every process.

    ``xxh3_64(value as UTF-8, surrogates passed, seed=kind)`` (docs/architecture.md, "Store keys"): the
    kind as seed keeps ``evil.com`` as a URL and as a domain apart; the compiled engine
    (``_engine.key_of``) computes the same number, and snapshot files store it.
    """
    return xxhash.xxh3_64_intdigest(value.encode("utf-8", "surrogatepass"), seed=kind)


@dataclass(frozen=True, slots=True)
class Indicator:
    """A classified, normalised indicator.  ``value`` is what the store indexes."""

    kind: int
    value: str
    raw: str
    cidr: tuple[int, int, int] | None = None  # (ip version, prefix length, network >> host bits)


def classify(raw: str, field_name: str, subdomains: bool = False) -> Indicator | None:
    """Decide what a feed value is and normalise it; None when it is not a valid indicator.

    The field name narrows the choice (``md5`` must be a hash, ``ip`` an address or CIDR...);
    ``indicator`` and ``mask`` are classified by shape.
    """
    text = raw.strip()
    if not text:
        return None
    if field_name in ("md5", "sha1", "sha256"):
        value = normalize.normalize_hash(text)
        return Indicator(Kind.HASH, value, raw) if value else None
    if field_name == "ip" or (field_name == "indicator" and _looks_like_ip(text)):
        return _classify_ip(text, raw)
    if field_name == "domain":
        return _classify_domain(text, raw, subdomains)
    if field_name == "indicator" and len(text) in (32, 40, 64) and _HEX.match(text):
        return Indicator(Kind.HASH, text.lower(), raw)
    if "*" in text:
        value = normalize.normalize_url(text, allow_wildcard=True)
        if value is None:
            return None
        if value.startswith("*.") and "/" not in value and "*" not in value[2:]:
            return Indicator(Kind.DOMAIN_SUFFIX, value[2:], raw)
        return Indicator(Kind.MASK, value, raw)
    if field_name in ("url", "mask") or "/" in text or "?" in text:
        value = normalize.normalize_url(text)
        if value is None:
            return None
        if "/" not in value and "?" not in value:
            # A URL with nothing after the host is the host: match it like a domain (or IP) record.
            if value.startswith("[") or _looks_like_ip(value):
                return _classify_ip(value.strip("[]"), raw)
            return _classify_domain(value, raw, subdomains)
        return Indicator(Kind.URL, value, raw)
    return _classify_domain(text, raw, subdomains)


def _looks_like_ip(text: str) -> bool:
    return normalize.parse_ip(text.split("/", 1)[0].strip()) is not None


def _classify_ip(text: str, raw: str) -> Indicator | None:
    if "/" in text:
        addr, _, plen_s = text.partition("/")
        parsed = normalize.parse_ip(addr.strip())
        if parsed is None or not plen_s.strip().isdigit():
            return None
        version, number = parsed
        bits = 32 if version == 4 else 128
        plen = int(plen_s)
        if not 0 <= plen <= bits:
            return None
        if plen == bits:
            value = normalize.normalize_ip(addr.strip())
            return Indicator(Kind.IP, value, raw) if value else None
        net = number >> (bits - plen)
        return Indicator(Kind.CIDR, f"{version}/{plen}/{net}", raw, (version, plen, net))
    value = normalize.normalize_ip(text)
    return Indicator(Kind.IP, value, raw) if value else None


def _classify_domain(text: str, raw: str, subdomains: bool) -> Indicator | None:
    if text.startswith("*."):
        text, subdomains = text[2:], True
    value = normalize.normalize_domain(text)
    if value is None:
        return None
    return Indicator(Kind.DOMAIN_SUFFIX if subdomains else Kind.DOMAIN, value, raw)


def indicator_field(record: dict[str, Any]) -> str | None:
    """The field holding a parsed record's indicator: the first of ``INDICATOR_FIELDS`` it has, or None."""
    return next((name for name in INDICATOR_FIELDS if record.get(name) is not None), None)


def indicator_of(record: dict[str, Any]) -> Indicator | None:
    """The indicator a parsed record carries (in its :func:`indicator_field`), or None."""
    name = indicator_field(record)
    if name is None:
        return None
    value = record[name]
    if not isinstance(value, str):
        return None
    flag = False
    for sub in _SUBDOMAIN_FIELDS:
        marker = record.get(sub)
        if marker is not None:
            flag = marker is True or str(marker).strip().lower() in _TRUTHY
    return classify(value, name, flag)


def record_context(record: dict[str, Any], keep: frozenset[str] | None = None) -> list[tuple[str, str]]:
    """The record's context fields in file order: every scalar field except the indicator itself.

    Args:
        keep: only these fields (a CSV feed's ``context_columns``, see ``FeedSnapshot.context_columns``);
            None keeps them all.
    """
    out: list[tuple[str, str]] = []
    indicator = indicator_field(record)
    for name, value in record.items():
        if name == indicator or (keep is not None and name not in keep):
            continue
        text = context_text(value)
        if text is not None:
            out.append((name, text))
    return out


@dataclass(slots=True)
class LoadReport:
    """What a load saw: accepted records per kind, malformed and skipped entries with a few examples.

    *Malformed* means the feed is wrong (invalid JSON, a value that is not an indicator): the feed's
    author should fix it.  *Skipped* means the entry is valid in its format but deliberately not
    loaded (a STIX pattern outside the supported subset, a MISP attribute with ``to_ids`` false):
    nothing is broken, so skipped entries never raise KL_ALERT_FeedLoadedPartially.
    """

    records: int = 0
    malformed: int = 0
    examples: list[str] = field(default_factory=list)
    per_kind: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    skip_examples: list[str] = field(default_factory=list)

    def bad(self, where: str, why: str) -> None:
        self.malformed += 1
        if len(self.examples) < MAX_BAD_EXAMPLES:
            self.examples.append(f"{where}: {why}")

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.skip_examples) < MAX_BAD_EXAMPLES:
            self.skip_examples.append(f"{where}: {why}")

    def log_skipped(self, logger: logging.Logger, feed: str, what: str) -> None:
        """One INFO line per load when something was skipped (never one per record)."""
        if self.skipped:
            logger.info("feed %s: %d %s skipped, e.g. %s", feed, self.skipped, what, "; ".join(self.skip_examples))


@dataclass(slots=True)
class Mask:
    """A URL mask, indexed by its literal host (see ``mask_from``).

    ``*`` is any run of characters.  A mask host ``*.example.com`` covers the domain and every
    sub-domain (the Kaspersky ScanEngine mask grammar); its path part is then matched on its own, so
    a star in the host never reaches into the path.  ``parts`` is the rest of the mask split at its
    stars: the whole mask when the host itself holds a star (indexed under "").
    """

    parts: tuple[str, ...]
    record_no: int
    subdomains: bool = False

    def matches(self, text: str) -> bool:
        """Glob-match ``text`` (the URL after the host, or the whole URL for host-glob masks)."""
        parts = self.parts
        first = parts[0]
        if not text.startswith(first):
            return False
        last = len(parts) - 1
        if last == 0:
            return len(text) == len(first)
        pos = len(first)
        for i in range(1, last):
            found = text.find(parts[i], pos)
            if found < 0:
                return False
            pos = found + len(parts[i])
        tail = parts[last]
        return len(text) - pos >= len(tail) and text.endswith(tail)


def mask_from(value: str, record_no: int) -> tuple[str, Mask]:
    """Index key (literal host, or "" when the host has a star) and the mask of a normalised mask value."""
    host = url_host(value)
    rest = value[len(host) :]
    subdomains = host.startswith("*.")
    if subdomains:
        host = host[2:]
    if "*" in host:
        return "", Mask(tuple(value.split("*")), record_no)
    return host, Mask(tuple((rest or "/").split("*")), record_no, subdomains)


def url_host(url: str) -> str:
    """The host part of a normalised URL (everything before the first ``/`` or ``?``)."""
    cut = len(url)
    for sep in ("/", "?"):
        pos = url.find(sep)
        if 0 <= pos < cut:
            cut = pos
    return url[:cut]


def mask_matches(value: str, url: str) -> bool:
    """Whether the normalised mask ``value`` covers the normalised ``url`` (used to confirm a hit)."""
    key, mask = mask_from(value, 0)
    if not key:
        return mask.matches(url)
    host = url_host(url)
    if host != key and not (mask.subdomains and host.endswith("." + key)):
        return False
    return mask.matches(url[len(host) :] or "/")


_LIVE: weakref.WeakSet[FeedSnapshot] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()  # snapshots are made in worker threads (suppliers) and listed on the event loop


class FeedSnapshot:
    """One loaded version of one feed: its settings, file identity and the index over its snapshot.

    The records live in the snapshot (``index``): a detection reads its record from there, never from
    the feed file, which may have changed since (rule 3).  ``path`` is the snapshot file when the
    version is mapped from the node's snapshot directory, None for one built in memory.
    """

    def __init__(
        self,
        settings: FeedSettings,
        index: FeedIndex,
        path: str | None = None,
        identity: tuple[int, int, int] = (0, 0, 0),
    ) -> None:
        self.settings = settings
        self.index = index
        self.path = path
        self.report: LoadReport = index.report  # from the snapshot's metadata: the same in every process
        self.header: list[str] = index.header  # CSV: column names, the indicator column under its canonical name
        self.read_failures = 0  # records that could not be decoded at detection time (damaged snapshot bytes)
        self.identity = identity  # (inode, size, mtime_ns) of the feed file this version was read from
        with _LIVE_LOCK:
            _LIVE.add(self)

    def ref(self) -> SnapshotRef:
        """What a worker process needs, besides the descriptor (``self.index.fd``), to rebuild this snapshot."""
        index = self.index
        return SnapshotRef(self.settings, self.identity, index.feed_digest, index.settings_digest, self.path)

    @staticmethod
    def live() -> list[FeedSnapshot]:
        """Every snapshot still in memory (the node keeps their files; see snapshots.remove_unused)."""
        with _LIVE_LOCK:
            return list(_LIVE)

    def __repr__(self) -> str:
        return f"<FeedSnapshot {self.settings.name} records={len(self.index)} malformed={self.report.malformed}>"

    def __len__(self) -> int:
        return len(self.index)

    @property
    def name(self) -> str:
        return self.settings.name

    def record(self, record_no: int) -> Record | None:
        """Record ``record_no`` as stored, or None (out of range, or bytes that cannot be read or do not
        decode: counted in ``read_failures``, and the node says so: node/service.py)."""
        if not 0 <= record_no < len(self.index):
            return None
        try:
            return self.index.record(record_no)
        except (OSError, ValueError, UnicodeDecodeError, IndexError):  # OSError: the disk under the snapshot
            self.read_failures += 1
            return None

    def indicator(self, record_no: int) -> Indicator | None:
        """The indicator of record ``record_no`` (None as for :meth:`record`)."""
        record = self.record(record_no)
        return record.indicator() if record is not None else None


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """A :class:`FeedSnapshot` as the master sends it to a worker, beside its descriptor (SCM_RIGHTS).

    Small and picklable: the settings, the identity of the feed file, the digests the snapshot's header
    must carry (so a descriptor sent for the wrong slot is refused, not served) and the snapshot file's
    path, which the worker only shows in log lines (it never removes files; the master does).  The load
    report and the CSV header are in the snapshot itself.
    """

    settings: FeedSettings
    identity: tuple[int, int, int]
    feed_digest: bytes
    settings_digest: bytes
    path: str | None = None

    def open(self, fd: int) -> FeedSnapshot:
        """The snapshot over ``fd`` (taken: see :func:`~threatgate.node.snapfile.map_fd`), as the master has it.

        Raises:
            SnapshotInvalid: the descriptor is not the snapshot this ref describes, or not a snapshot at all.
        """
        from threatgate.node.snapfile import map_fd

        index = map_fd(fd, self.feed_digest, self.settings_digest)
        return FeedSnapshot(self.settings, index, self.path, self.identity)


class MemorySnapshot:
    """Builds a snapshot from records held as dicts: STIX bundles, MISP feeds, indicators pushed through
    the REST API (one file holds many indicators inside nested objects, or there is no file at all).

    ``add_record`` keeps what a detection needs of the record (indicator, context); :meth:`finish`
    writes the columns through the same snapshot writer as JSON and CSV feeds.
    """

    def __init__(self, settings: FeedSettings) -> None:
        from threatgate.node.feedparse import ParsedFeed

        self.settings = settings
        self.parsed = ParsedFeed()
        self.report = self.parsed.report
        self.identity: tuple[int, int, int] = (0, 0, 0)
        self.digest = bytes(32)  # sha256 of the bytes parsed (STIX: the bundle; MISP: manifest and events)
        self.records: list[dict[str, Any]] = []  # the records added, until the builder is dropped (for inspection)

    def __len__(self) -> int:
        return len(self.parsed.values)

    @property
    def kinds(self) -> array[int]:
        """The kind of each record added."""
        return self.parsed.kinds

    def add_record(self, record: dict[str, Any], indicator: Indicator) -> None:
        """Index ``record`` under ``indicator`` (normally ``indicator_of(record)``)."""
        self.records.append(record)
        add_row(self.parsed, indicator, tuple(record_context(record)))

    def finish(self, shared: bool = False) -> FeedSnapshot:
        """The snapshot of the records added: an in-memory index, or with ``shared`` one over a sealed
        memfd that worker processes map (one copy for the master and every worker; ``index.fd``).

        Raises:
            OSError: ``shared`` and no memory for the memfd.
        """
        from threatgate.node.snapfile import in_memfd, in_memory

        index = in_memfd(self.parsed, f"tg-{self.settings.name}") if shared else in_memory(self.parsed)
        return FeedSnapshot(self.settings, index, identity=self.identity)


def add_row(parsed: ParsedFeed, indicator: Indicator, context: tuple[tuple[str, str], ...]) -> None:
    """Append one accepted record to the columns of ``parsed`` (and count it in its report)."""
    kind = indicator.kind
    parsed.kinds.append(kind)
    parsed.values.append(indicator.value)
    parsed.raws.append(indicator.raw)
    parsed.subdomains.append(kind == Kind.DOMAIN_SUFFIX or (kind == Kind.MASK and indicator.value.startswith("*.")))
    parsed.contexts.append(context)
    report = parsed.report
    name = Kind.NAMES[kind]
    report.per_kind[name] = report.per_kind.get(name, 0) + 1
    report.records += 1


def feed_identity(settings: FeedSettings) -> tuple[int, int, int]:
    """(inode, size, mtime_ns) of what a reload must watch; (-1, -1, -1) when it is missing.

    For a MISP feed (a directory) that is its ``manifest.json``, which a feed update rewrites.
    """
    path = os.path.join(settings.path, "manifest.json") if settings.format == "misp" else settings.path
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_document(path: str, limit: int) -> tuple[bytes, os.stat_result]:
    """The whole content of the regular file ``path`` and its stat, refusing more than ``limit`` bytes.

    For formats parsed as one JSON document (STIX bundles, MISP events), where the file is held in
    memory as Python objects several times its size, so the size must be bounded before reading.
    ``O_NONBLOCK`` keeps a FIFO put in place of a file from hanging the loader; the read is capped
    too, so a file that grows after the check cannot get past the bound either.

    Raises:
        OSError: cannot open or read it, or it is not a regular file.
        FeedError: it is larger than ``limit`` bytes.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_size > limit:
            raise FeedError(f"{path}: {st.st_size} bytes, more than the limit of {limit}")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, min(1 << 24, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise FeedError(f"{path}: grew past the limit of {limit} bytes while being read")
        return b"".join(chunks), st
    finally:
        os.close(fd)


def parse_document(path: str, data: bytes | str) -> Any:
    """``data`` parsed as one JSON document (a UTF-8 byte order mark is tolerated).

    Raises:
        FeedError: not UTF-8 or not JSON (also when nested too deeply for the parser).
    """
    try:
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise FeedError(f"{path}: not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FeedError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer too long, or nesting too deep
        raise FeedError(f"{path}: invalid JSON: {str(exc)[:100]}") from None


def context_text(value: object) -> str | None:
    """A scalar as record context text with control characters blanked, or None for anything else.

    Detection lines are LF-framed, so a newline inside context (MISP comments often have them) would
    split one detection into two lines at the SIEM.  Long texts are cut at ``MAX_CONTEXT_TEXT``.
    """
    if value is None or isinstance(value, dict | list):
        return None
    if value is True or value is False:
        text = "true" if value else "false"
    else:
        text = str(value)
    if not text.isprintable():
        text = _CONTROL.sub(" ", text)
    return text[:MAX_CONTEXT_TEXT]


def _csv_row(line: str, delimiter: str) -> list[str]:
    if '"' not in line:
        return line.split(delimiter)
    return next(csv.reader([line], delimiter=delimiter), [])


def load_feed(settings: FeedSettings) -> FeedSnapshot:
    """Parse the feed file (or MISP feed directory) named by ``settings`` into an in-memory snapshot.

    The node builds snapshots in a worker process and maps them from its snapshot directory
    (:mod:`threatgate.node.snapshots`); this in-process form serves ``threatgate validate``, tests and
    benchmarks.

    Raises:
        FeedError: the file cannot be read or is not a feed at all (keep the previous version).
    """
    from threatgate.node.snapfile import in_memory

    parsed, identity, _ = parse_source(settings)
    snapshot = FeedSnapshot(settings, in_memory(parsed))
    snapshot.identity = identity
    return snapshot


def parse_source(settings: FeedSettings) -> tuple[ParsedFeed, tuple[int, int, int], bytes]:
    """Read and parse the feed of ``settings``: its columns, the identity read and the sha256 of its bytes.

    Raises:
        FeedError: the feed cannot be read or is not a feed at all.
    """
    import hashlib

    # Imported here: both modules build on this one (MemorySnapshot, classify), so a top-level
    # import would be circular.
    if settings.format == "stix":
        from threatgate.node.stix import load_stix

        return _parsed(load_stix(settings))
    if settings.format == "misp":
        from threatgate.node.misp import load_misp

        return _parsed(load_misp(settings))
    from threatgate.node.feedparse import parse_feed

    data, st = _read_feed_file(settings.path)
    digest = hashlib.sha256(data).digest()
    return parse_feed(settings, data), (st.st_ino, st.st_size, st.st_mtime_ns), digest


def _parsed(built: MemorySnapshot) -> tuple[ParsedFeed, tuple[int, int, int], bytes]:
    return built.parsed, built.identity, built.digest


def parse_columns(settings: FeedSettings, data: bytes) -> ParsedFeed:
    """The reference parser of JSON and CSV feed bytes into columns (see ``feedparse.parse_feed``).

    Raises:
        FeedError: not UTF-8, or not a feed at all.
    """
    from threatgate.node.feedparse import ParsedFeed

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FeedError(f"{settings.path}: not UTF-8 (byte {exc.start})") from None
    parsed = ParsedFeed()
    if settings.format == "json":
        _load_json(settings, parsed, text)
    else:
        _load_csv(settings, parsed, text)
    return parsed


def _read_feed_file(path: str) -> tuple[bytes, os.stat_result]:
    """The whole content of the regular file ``path`` and its stat taken *before* reading.

    The stat is the version's identity: if the file changes while it is read, the watcher sees an
    identity other than the loaded one and loads it again.  ``O_NONBLOCK`` keeps a FIFO put in place
    of the file from hanging the loader.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise FeedError(f"{path}: cannot open: {os_reason(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FeedError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(), st
    except OSError as exc:
        raise FeedError(f"{path}: cannot read: {os_reason(exc)}") from None
    finally:
        os.close(fd)


def check_feed_files(config: NodeConfig) -> tuple[list[str], list[str]]:
    """Load every enabled feed of ``config`` as the node would (``threatgate validate``): (errors, warnings).

    An error is a feed that does not load at all (the node would start without it and not be ready);
    a warning, a feed that loads with malformed records skipped.  Each line starts with the config
    file and the ``<Feed>`` element's line.  A missing feed file never gets here: the configuration
    itself is refused for it.
    """
    errors: list[str] = []
    warnings: list[str] = []
    for feed in config.feeds.feeds:
        if not feed.enabled:
            continue
        where = f"{config.path}:{feed.line}: <Feed> {feed.name}"
        try:
            report = parse_source(feed)[0].report
        except FeedError as exc:
            errors.append(f"{where}: does not load: {exc}")
            continue
        if report.malformed:
            warnings.append(
                f"{where}: warning: {report.malformed} malformed record(s) will be skipped, "
                f"e.g. {'; '.join(report.examples)}"
            )
    return errors, warnings


def _load_json(settings: FeedSettings, parsed: ParsedFeed, text: str) -> None:
    path = settings.path
    start = _JSON_GAP.match(text, 0)
    pos = start.end() if start else 0
    if not text.startswith("[", pos):
        raise FeedError(f"{path}: a JSON feed must be an array of records, found {text[pos : pos + 20]!r}")
    end_of_array = len(text.rstrip()) - 1
    if end_of_array <= pos or text[end_of_array] != "]":
        raise FeedError(f"{path}: truncated JSON feed: it does not end with ']'")
    pos += 1
    decoder = json.JSONDecoder()
    raw_decode = decoder.raw_decode
    gap = _JSON_GAP.match
    report = parsed.report
    n = 0
    while True:
        m = gap(text, pos)
        pos = m.end() if m else pos
        if pos >= end_of_array:
            break
        n += 1
        try:
            obj, end = raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            report.bad(f"record {n} (line {exc.lineno})", f"invalid JSON: {exc.msg}")
            nxt = text.find("\n", exc.pos)
            pos = end_of_array if nxt < 0 else nxt
            continue
        except (ValueError, RecursionError) as exc:  # an integer of 4,300 digits, nesting 1,000 deep
            raise FeedError(f"{path}: record {n}: cannot be read: {str(exc)[:100] or type(exc).__name__}") from None
        if not isinstance(obj, dict):
            report.bad(f"record {n}", f"expected an object, got {type(obj).__name__}")
            pos = end
            continue
        indicator = indicator_of(obj)
        if indicator is None:
            report.bad(f"record {n}", _why_no_indicator(obj))
        else:
            add_row(parsed, indicator, tuple(record_context(obj)))
        pos = end


def _why_no_indicator(record: dict[str, Any]) -> str:
    for name in INDICATOR_FIELDS:
        if name in record:
            return f"{name}={str(record[name])[:80]!r} is not a valid indicator"
    return f"no indicator field (one of {', '.join(INDICATOR_FIELDS)})"


_Line = tuple[int, int, str]
"""(start offset, line number, logical line) of a CSV file."""


def _lines(text: str) -> Iterator[_Line]:
    """(start offset, line number, logical line) with quoted newlines kept inside one CSV row."""
    pos = 0
    lineno = 0
    size = len(text)
    while pos < size:
        end = text.find("\n", pos)
        if end < 0:
            end = size
        line_start = pos
        lineno += 1
        first = lineno
        comment = text.startswith("#", line_start)  # a comment never spans lines, whatever its quotes
        while not comment and text.count('"', line_start, end) % 2 and end < size:  # a quoted field spans lines
            nxt = text.find("\n", end + 1)
            end = size if nxt < 0 else nxt
            lineno += 1
        yield line_start, first, text[line_start:end]
        pos = end + 1


def _load_csv(settings: FeedSettings, parsed: ParsedFeed, text: str) -> None:
    delimiter = settings.delimiter
    lines = _lines(text)
    header, header_line, first_row = _find_csv_header(settings, lines)
    col, field_name, sub_col = _csv_columns(settings, header, header_line)
    names = list(header)
    names[col] = field_name
    if sub_col >= 0:
        names[sub_col] = header[sub_col].lower()
    parsed.header = names
    keep = None
    if settings.context_columns is not None:
        keep = _csv_context_columns(settings, header, names, col)
    width = len(header)
    report = parsed.report
    for _start, lineno, line in itertools.chain(first_row, lines):
        row_text = line.rstrip("\r")
        if not row_text.strip() or row_text.startswith("#"):
            continue
        row = _csv_row(row_text, delimiter)
        if len(row) != width:
            report.bad(f"line {lineno}", f"{len(row)} fields, header has {width}")
            continue
        flag = sub_col >= 0 and row[sub_col].strip().lower() in _TRUTHY
        indicator = classify(row[col], field_name, flag)
        if indicator is None:
            report.bad(f"line {lineno}", f"{field_name}={row[col][:80]!r} is not a valid indicator")
            continue
        add_row(parsed, indicator, tuple(record_context(dict(zip(names, row, strict=True)), keep)))


def _find_csv_header(settings: FeedSettings, lines: Iterator[_Line]) -> tuple[list[str], int, list[_Line]]:
    """The header row, its line number, and the first data row when it was read to decide (or none).

    Feeds are published with a banner of ``#`` comment lines, and some (abuse.ch URLhaus) put the
    header itself in the last comment line: ``# id,dateadded,url,...``.  The header is the first
    uncommented row when that row names the indicator column; otherwise the *last* comment line
    before it that does, and the uncommented row is the first record.  A row "names the indicator
    column" when it has ``indicator_column``, or (when that is not set) one of ``INDICATOR_FIELDS``.

    Raises:
        FeedError: no row or comment line before the first record is such a header.
    """
    path = settings.path
    want = settings.indicator_column.lower()
    commented: tuple[list[str], int] | None = None
    names: list[str] = []  # every cell of the rows tried, for the "did you mean" of an error
    for start, lineno, line in lines:
        stripped = line.strip()
        if not stripped:
            continue
        is_comment = line.startswith("#")  # as for records: "#" first, as _lines has it
        cells = _header_cells(stripped.lstrip("#") if is_comment else stripped, settings.delimiter)
        found = _names_indicator(cells, want)
        if is_comment:
            if found:
                commented = (cells, lineno)
            names.extend(cells)
            continue
        if found:
            return cells, lineno, []
        if commented is not None:
            return commented[0], commented[1], [(start, lineno, line)]
        raise FeedError(f"{path}: {_no_header(settings, cells, lineno, names + cells)}")
    if commented is not None:
        return commented[0], commented[1], []  # a header and no record: an empty feed
    if names:
        raise FeedError(f"{path}: only comment lines, none of them a CSV header: {_wanted(settings)}")
    raise FeedError(f"{path}: empty CSV feed (no header row)")


def _header_cells(text: str, delimiter: str) -> list[str]:
    return [h.strip().lstrip("#").strip() for h in _csv_row(text, delimiter)]


def _names_indicator(cells: list[str], want: str) -> bool:
    lowered = {c.lower() for c in cells}
    if want:
        return want in lowered
    return any(f in lowered for f in INDICATOR_FIELDS)


def _wanted(settings: FeedSettings) -> str:
    if settings.indicator_column:
        return f"the column {settings.indicator_column!r} (indicator_column)"
    return f"an indicator column (one of {', '.join(INDICATOR_FIELDS)})"


def _no_header(settings: FeedSettings, cells: list[str], lineno: int, names: list[str]) -> str:
    """Why the first record row is not a header and no comment line before it is one either."""
    hint = _did_you_mean(settings.indicator_column, names) if settings.indicator_column else ""
    return (
        f"CSV header {cells[:12]!r} (line {lineno}) has no indicator column: neither it nor a comment "
        f"line before it has {_wanted(settings)}{hint}"
    )


def _did_you_mean(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), list(dict.fromkeys(n.lower() for n in names if n)), n=1)
    if not close:
        return ""
    spelled = next(n for n in names if n.lower() == close[0])
    return f" (did you mean {spelled!r}?)"


def _csv_columns(settings: FeedSettings, header: list[str], header_line: int) -> tuple[int, str, int]:
    """(indicator column, the field name it is read back under, include_subdomains column or -1).

    The indicator column is read back under its own name when that is one of ``INDICATOR_FIELDS``
    (which also says how it is classified: ``md5`` must be a hash...), else as ``indicator``
    (classified by shape: Feodo Tracker's ``dst_ip``).  Records are read back by name, and
    :func:`indicator_of` takes the first of ``INDICATOR_FIELDS`` present, so when another column
    is spelled like a field that comes first (or the same), the indicator is read back as
    ``indicator``, and the header is refused when a second column is literally ``indicator``.
    """
    lowered = [h.lower() for h in header]
    want = settings.indicator_column.lower()
    if want:
        col = lowered.index(want)
        field_name = want if want in INDICATOR_FIELDS else "indicator"
    else:
        col, field_name = next((lowered.index(f), f) for f in INDICATOR_FIELDS if f in lowered)
    rank = INDICATOR_FIELDS.index(field_name)
    if any(i != col and h in INDICATOR_FIELDS[: rank + 1] for i, h in enumerate(header)):
        field_name = "indicator"
        clash = next((i for i, h in enumerate(header) if i != col and h == "indicator"), -1)
        if clash >= 0:
            raise FeedError(
                f"{settings.path}: line {header_line}: the indicator is column {col + 1} ({header[col]!r}), but "
                f"column {clash + 1} is also named 'indicator'; rename one of them"
            )
    sub_col = next((lowered.index(f) for f in _SUBDOMAIN_FIELDS if f in lowered), -1)
    return col, field_name, sub_col


def _csv_context_columns(settings: FeedSettings, header: list[str], names: list[str], col: int) -> frozenset[str]:
    """The names (as read back, ``names``) of the columns ``context_columns`` keeps, matched case-insensitively.

    Raises:
        FeedError: a name that is not a column of the header (a typo would silently drop context),
            or the indicator column itself.
    """
    by_name = {h.lower(): names[i] for i, h in enumerate(header) if i != col}
    kept: set[str] = set()
    for name in settings.context_columns or ():
        found = by_name.get(name.lower())
        if found is not None:
            kept.add(found)
            continue
        if name.lower() == header[col].lower():
            why = "is the indicator column, never record context"
        else:
            why = "is not a column of the CSV header" + _did_you_mean(name, header)
        raise FeedError(f"{settings.path}: context_columns: {name!r} {why}; the columns are {', '.join(header)[:300]}")
    return frozenset(kept)
