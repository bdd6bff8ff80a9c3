"""What a feed record is: indicator kinds, classification, record context, the load report, and the
columns (:class:`ParsedFeed`) every feed reader fills; reading a feed document from disk.

The bottom of the feed modules: the readers (:mod:`threatgate.node.feedref`,
:mod:`threatgate.node.feedparse`, :mod:`threatgate.node.stix`, :mod:`threatgate.node.misp`), the
snapshot format (:mod:`threatgate.node.snapfile`) and :mod:`threatgate.node.feeds` build on it, and it
imports none of them. Record fields: see :mod:`threatgate.node.feeds`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
from array import array
from dataclasses import dataclass, field
from typing import Any

import xxhash

from threatgate.config.node import FeedSettings
from threatgate.errors import FeedError
from threatgate.node import normalize

INDICATOR_FIELDS = ("indicator", "mask", "url", "domain", "ip", "md5", "sha1", "sha256")
_SUBDOMAIN_FIELDS = ("include_subdomains", "subdomains")
_TRUTHY = frozenset({"true", "1", "yes", "on"})
MAX_BAD_EXAMPLES = 5
"""How many malformed records a load report quotes (the rest are only counted)."""

MAX_CONTEXT_TEXT = 2048
"""Longest context text kept by :func:`context_text` (a MISP event description can be an essay)."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
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


@dataclass(slots=True)
class ParsedFeed:
    """A parsed feed as columns, one row per accepted record (malformed ones are only in ``report``).

    ``values`` are normalised indicators (a CIDR as ``version/prefix length/network``), ``raws`` the
    indicator text as the feed wrote it (``%MatchedIndicator%``), ``contexts`` the record context as
    :func:`record_context` gives it (``context_columns`` already applied),
    ``subdomains`` whether the record covers sub-domains (a ``DOMAIN_SUFFIX``, or a mask ``*.host/...``).
    """

    kinds: array[int] = field(default_factory=lambda: array("b"))
    values: list[str] = field(default_factory=list)
    raws: list[str] = field(default_factory=list)
    subdomains: list[bool] = field(default_factory=list)
    contexts: list[tuple[tuple[str, str], ...]] = field(default_factory=list)
    report: LoadReport = field(default_factory=LoadReport)
    header: list[str] = field(default_factory=list)


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
