"""The indicator store: lookups over the snapshots of every loaded feed, one :class:`FeedIndex` per slot.

Rules:
1. Immutable once built.  A reload builds a new store and swaps one reference, so matching never
   sees a half-built store and never waits for a reload (the Suricata iprep / Zeek REREAD model).
2. The store owns no data of its own: each feed's keys, Bloom bitmap, CIDR intervals, masks and
   records are in its snapshot (:mod:`threatgate.node.snapfile`), mapped from the node's snapshot
   directory or built in memory.  Keys are the fixed ``xxh3_64(value, seed=kind)``
   (:func:`~threatgate.node.feeds.key_of`), the same in every process and in the compiled engine.
3. Lookups answer *candidates*; the caller confirms each by reading the stored record and comparing
   its normalised indicator (matcher.py), which also rules out 64-bit hash collisions.
4. Candidate order is deterministic: probe order (exact, then domain suffixes longest first, CIDRs
   most specific first, masks), and within one probe by slot, then record number.

Theory of operation: most probed values are not indicators.  Each feed's Bloom bitmap answers those
in two ``memoryview`` indexing operations without touching the key array; only a bitmap hit pays for a
``bisect`` on it.  A CIDR lookup is one ``bisect`` per feed on disjoint segments, whatever the prefix
lengths present.  Masks are keyed by their literal host, so a URL costs one probe per host suffix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from threatgate.node.feeds import FeedSnapshot, Kind, key_of
from threatgate.node.normalize import parse_ip
from threatgate.node.snapfile import FeedIndex

_HOST = re.compile(r"[^/?]*")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A record that may match: which feed slot, which record, and the probed value to confirm."""

    slot: int
    record_no: int
    kind: int
    probe: str


class IndicatorStore:
    """Lookups over a set of :class:`FeedSnapshot` (indexed by slot number)."""

    def __init__(self, snapshots: dict[int, FeedSnapshot] | None = None) -> None:
        self.snapshots: dict[int, FeedSnapshot] = dict(sorted((snapshots or {}).items()))
        self._feeds: tuple[tuple[int, FeedIndex], ...] = tuple((slot, s.index) for slot, s in self.snapshots.items())
        bitmask = 0
        for _, index in self._feeds:
            bitmask |= index.kinds_bitmask
        self._has = tuple(bool(bitmask >> kind & 1) for kind in range(len(Kind.NAMES)))
        # Per kind, only the feeds holding keys of that kind: a hash is never tested against a URL feed.
        self._by_kind = tuple(
            tuple(f for f in self._feeds if f[1].kinds_bitmask >> kind & 1) for kind in range(len(Kind.NAMES))
        )
        self._cidr4 = tuple(f for f in self._feeds if f[1].has_cidr4)
        self._cidr6 = tuple(f for f in self._feeds if f[1].has_cidr6)
        self._global_masks = tuple((slot, row, mask) for slot, ix in self._feeds for row, mask in ix.global_mask_list)
        self._has_masks = self._has[Kind.MASK] or bool(self._global_masks)

    def __len__(self) -> int:
        return sum(len(index) for _, index in self._feeds)

    def __repr__(self) -> str:
        return f"<IndicatorStore feeds={len(self.snapshots)} records={len(self)} masks={self.mask_count}>"

    @property
    def mask_count(self) -> int:
        return sum(s.report.per_kind.get("mask", 0) for s in self.snapshots.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the lookup sections (keys, record numbers, Bloom bitmaps) over every feed."""
        return sum(ix.keys.nbytes + ix.refs.nbytes + ix.bloom.nbytes for _, ix in self._feeds)

    def engine_views(self) -> list[tuple[Any, ...]]:
        """:meth:`FeedIndex.engine_view` of every feed, in slot order (what the compiled engine reads)."""
        return [index.engine_view() for _, index in self._feeds]

    # -- probes -------------------------------------------------------------------------------

    def _probe(self, kind: int, value: str, out: list[Candidate]) -> None:
        key = key_of(kind, value)
        for slot, index in self._by_kind[kind]:
            if index.maybe(key):
                for row in index.rows_of(key):
                    out.append(Candidate(slot, row, kind, value))

    def lookup_hash(self, value: str, out: list[Candidate]) -> None:
        """Candidates for a normalised (lowercase hex) hash."""
        if self._has[Kind.HASH]:
            self._probe(Kind.HASH, value, out)

    def lookup_domain(self, value: str, out: list[Candidate]) -> None:
        """Candidates for a normalised domain: exact records, and sub-domain records of every suffix."""
        if self._has[Kind.DOMAIN]:
            self._probe(Kind.DOMAIN, value, out)
        if not self._has[Kind.DOMAIN_SUFFIX]:
            return
        suffix = value
        while True:
            self._probe(Kind.DOMAIN_SUFFIX, suffix, out)
            dot = suffix.find(".")
            if dot < 0:
                return
            suffix = suffix[dot + 1 :]

    def lookup_ip(self, value: str, out: list[Candidate]) -> None:
        """Candidates for a normalised IP address: exact records and every CIDR that contains it."""
        if self._has[Kind.IP]:
            self._probe(Kind.IP, value, out)
        feeds = self._cidr4 if ":" not in value else self._cidr6
        if not feeds:
            return
        parsed = parse_ip(value)
        if parsed is None:
            return
        version, number = parsed
        found: list[tuple[int, int, int]] = []  # (-prefix length, slot, record)
        for slot, index in feeds:
            found.extend((-plen, slot, row) for plen, row in index.cidr_rows(version, number))
        if len(feeds) > 1:
            found.sort()
        for _, slot, row in found:
            out.append(Candidate(slot, row, Kind.CIDR, value))

    def lookup_url(self, value: str, out: list[Candidate]) -> None:
        """Candidates for a normalised URL: exact URL, masks, and its host as a domain or IP."""
        if self._has[Kind.URL]:
            self._probe(Kind.URL, value, out)
        host = _HOST.match(value).group()  # type: ignore[union-attr]  # always matches, maybe ""
        if not host:
            return
        if self._has_masks:
            self._probe_masks(host, value, out)
        if host[-1:].isdigit() or host.startswith("["):
            self.lookup_ip(host.strip("[]"), out)
        else:
            self.lookup_domain(host, out)

    def _probe_masks(self, host: str, url: str, out: list[Candidate]) -> None:
        rest = url[len(host) :] or "/"
        if self._has[Kind.MASK]:
            suffix = host
            while True:
                key = key_of(Kind.MASK, suffix)
                for slot, index in self._by_kind[Kind.MASK]:
                    if not index.maybe(key):
                        continue
                    for row in index.rows_of(key):
                        try:
                            mask = index.mask(row)
                        except (OSError, ValueError):  # the disk under the snapshot: that detection is lost
                            self.snapshots[slot].read_failures += 1  # ... and counted, as a record read is
                            continue
                        if (mask.subdomains or suffix is host) and mask.matches(rest):
                            out.append(Candidate(slot, row, Kind.MASK, url))
                dot = suffix.find(".")
                if dot < 0:
                    break
                suffix = suffix[dot + 1 :]
        for slot, row, mask in self._global_masks:
            if mask.matches(url):
                out.append(Candidate(slot, row, Kind.MASK, url))


def merged(base: IndicatorStore | None, replace: Iterable[tuple[int, FeedSnapshot | None]]) -> IndicatorStore:
    """A new store: ``base``'s snapshots with some slots replaced (None removes the slot)."""
    snapshots = dict(base.snapshots) if base is not None else {}
    for slot, snap in replace:
        if snap is None:
            snapshots.pop(slot, None)
        else:
            snapshots[slot] = snap
    return IndicatorStore(snapshots)
