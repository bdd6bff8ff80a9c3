"""The indicator store: every loaded feed merged into one compact, immutable lookup structure.

Rules:
1. Immutable once built.  A reload builds a new store and swaps one reference, so matching never
   sees a half-built store and never waits for a reload (the Suricata iprep / Zeek REREAD model).
2. Memory is ~30 bytes per indicator whatever the feed size: a sorted ``int64`` array of keys
   (``hash(value) ^ salt[kind]``), a parallel ``int64`` array of record references
   (``slot << 32 | record number``), a 2-probe Bloom bitmap of 2-4 bytes per key, and per record its
   byte offset and length in the feed.  Record context is read back only for a detection, from the
   private copy of the bytes each feed version was loaded from (see :mod:`threatgate.node.feeds`).
3. Lookups answer *candidates*; the caller confirms each by reading the record back and comparing
   its normalised indicator, which also rules out 64-bit hash collisions.

Theory of operation: most probed values are not indicators.  The bitmap answers those in two
``bytes`` indexing operations (~0.1 µs) without touching numpy; only a bitmap hit pays for a
``searchsorted`` on the key array.  Domains are probed once per label suffix, IPs once per CIDR prefix
length present, URLs additionally against masks indexed by their literal host suffix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from threatgate.node.feeds import SALTS, FeedSnapshot, Kind, Mask
from threatgate.node.normalize import parse_ip

_U64 = 0xFFFF_FFFF_FFFF_FFFF
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
        self.snapshots: dict[int, FeedSnapshot] = dict(snapshots or {})
        keys_parts: list[npt.NDArray[np.int64]] = []
        refs_parts: list[npt.NDArray[np.int64]] = []
        masks: dict[str, list[tuple[int, Mask]]] = {}
        cidr_lengths: dict[int, set[int]] = {4: set(), 6: set()}
        for slot, snap in self.snapshots.items():
            kinds = np.frombuffer(snap.kinds, dtype=np.int8) if len(snap.kinds) else np.zeros(0, np.int8)
            keys = np.frombuffer(snap.keys, dtype=np.int64) if len(snap.keys) else np.zeros(0, np.int64)
            keep = np.flatnonzero(kinds >= 0)
            keys_parts.append(keys[keep])
            refs_parts.append(keep.astype(np.int64) | np.int64(slot << 32))
            for host, mask in snap.masks:
                masks.setdefault(host, []).append((slot, mask))
            for version, plen in snap.cidrs:
                cidr_lengths[version].add(plen)
        keys_all = np.concatenate(keys_parts) if keys_parts else np.zeros(0, np.int64)
        refs_all = np.concatenate(refs_parts) if refs_parts else np.zeros(0, np.int64)
        del keys_parts, refs_parts
        order = np.argsort(keys_all, kind="stable")
        self._keys = keys_all[order]
        del keys_all
        self._refs = refs_all[order]
        del refs_all, order
        self._masks = masks
        self._cidr4 = tuple(sorted(cidr_lengths[4], reverse=True))
        self._cidr6 = tuple(sorted(cidr_lengths[6], reverse=True))
        self._bits, self._bitmask = _bloom(self._keys)
        present = np.zeros(len(SALTS), dtype=bool)
        for snap in self.snapshots.values():
            if len(snap.kinds):
                kinds = np.frombuffer(snap.kinds, dtype=np.int8)
                present[np.unique(kinds[kinds >= 0])] = True
        self._has = tuple(bool(x) for x in present)

    def __len__(self) -> int:
        return len(self._keys) + sum(len(v) for v in self._masks.values())

    def __repr__(self) -> str:
        return f"<IndicatorStore feeds={len(self.snapshots)} keys={len(self._keys)} masks={self.mask_count}>"

    @property
    def mask_count(self) -> int:
        return sum(len(v) for v in self._masks.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the lookup arrays (not counting the per-feed offset arrays)."""
        return int(self._keys.nbytes + self._refs.nbytes + len(self._bits))

    # -- probes -------------------------------------------------------------------------------

    def _refs_of(self, key: int) -> list[int]:
        """Record references stored under ``key`` (after the bitmap said "maybe")."""
        keys = self._keys
        lo = int(np.searchsorted(keys, key))
        hi = lo
        n = len(keys)
        while hi < n and keys[hi] == key:
            hi += 1
        return [int(r) for r in self._refs[lo:hi]]

    def _probe(self, kind: int, value: str, out: list[Candidate]) -> None:
        key = hash(value) ^ SALTS[kind]
        # Two Bloom probes inline: most values are not indicators and stop here in ~0.1 µs.
        u = key & _U64
        mask = self._bitmask
        bits = self._bits
        i = u & mask
        if not (bits[i >> 3] >> (i & 7)) & 1:
            return
        i = (u >> 32) & mask
        if not (bits[i >> 3] >> (i & 7)) & 1:
            return
        for ref in self._refs_of(key):
            out.append(Candidate(ref >> 32, ref & 0xFFFF_FFFF, kind, value))

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
        lengths = self._cidr4 if ":" not in value else self._cidr6
        if not lengths:
            return
        parsed = parse_ip(value)
        if parsed is None:
            return
        version, number = parsed
        bits = 32 if version == 4 else 128
        for plen in lengths:
            self._probe(Kind.CIDR, f"{version}/{plen}/{number >> (bits - plen)}", out)

    def lookup_url(self, value: str, out: list[Candidate]) -> None:
        """Candidates for a normalised URL: exact URL, masks, and its host as a domain or IP."""
        if self._has[Kind.URL]:
            self._probe(Kind.URL, value, out)
        host = _HOST.match(value).group()  # type: ignore[union-attr]  # always matches, maybe ""
        if not host:
            return
        if self._masks:
            self._probe_masks(host, value, out)
        if host[-1:].isdigit() or host.startswith("["):
            self.lookup_ip(host.strip("[]"), out)
        else:
            self.lookup_domain(host, out)

    def _probe_masks(self, host: str, url: str, out: list[Candidate]) -> None:
        masks = self._masks
        rest = url[len(host) :] or "/"
        suffix = host
        while True:
            for slot, mask in masks.get(suffix, ()):
                if (mask.subdomains or suffix is host) and mask.matches(rest):
                    out.append(Candidate(slot, mask.record_no, Kind.MASK, url))
            dot = suffix.find(".")
            if dot < 0:
                break
            suffix = suffix[dot + 1 :]
        for slot, mask in masks.get("", ()):
            if mask.matches(url):
                out.append(Candidate(slot, mask.record_no, Kind.MASK, url))


def _bloom(keys: npt.NDArray[np.int64]) -> tuple[bytes, int]:
    """A 2-probe Bloom bitmap over ``keys`` with ~16 bits per key (false-positive rate ~1.4 %)."""
    n_bits = 1 << max(6, int(len(keys) * 16).bit_length())
    mask = n_bits - 1
    bitmap = np.zeros(n_bits // 8, dtype=np.uint8)
    if len(keys):
        u = keys.view(np.uint64)
        for shift in (0, 32):
            pos = (u >> np.uint64(shift)) & np.uint64(mask)
            np.bitwise_or.at(bitmap, pos >> np.uint64(3), np.left_shift(1, (pos & np.uint64(7))).astype(np.uint8))
            del pos
    return bitmap.tobytes(), mask


def merged(base: IndicatorStore | None, replace: Iterable[tuple[int, FeedSnapshot | None]]) -> IndicatorStore:
    """A new store: ``base``'s snapshots with some slots replaced (None removes the slot)."""
    snapshots = dict(base.snapshots) if base is not None else {}
    for slot, snap in replace:
        if snap is None:
            snapshots.pop(slot, None)
        else:
            snapshots[slot] = snap
    return IndicatorStore(snapshots)
