"""The snapshot file format: one loaded feed version as one file the node maps instead of parsing.

Invariants:
1. A snapshot is built once from a parsed feed (:class:`~threatgate.node.records.ParsedFeed`) and never
   changed; a new feed version is a new file (its name comes from the feed and settings digests).
2. Every store key is the fixed hash of the store (docs/architecture.md, "Store keys"):
   ``xxh3_64(value as UTF-8 with surrogates passed, seed=kind)``, the same in every process, on every
   machine and in the compiled engine (``_engine.key_of``).  Nothing depends on Python's salted ``hash()``.
3. A file is trusted only when everything checks: magic, format version, byte-order marker, machine
   layout, expected digests, file size, the xxh3_128 checksum of the whole file (read with ``read``,
   never through the mapping, so a check does not make the file resident) and the bounds of every
   section.  Anything else raises :class:`SnapshotInvalid` with the reason; the caller rebuilds.
4. A detection never reads a feed file: the records section holds per record its kind, flags,
   normalised value, raw indicator text (``%MatchedIndicator%``) and context pairs.
5. Sans-IO except :func:`write_atomic` (threatgate.fs, 0600, no fsync: a torn file
   fails the checksum and is rebuilt), :func:`read_checked` (header and checksum by reading the
   file, then ``mmap``), :func:`map_fd` and :func:`to_memfd`; records are read with ``pread``, never
   through the mapping.
6. Worker processes share one copy (docs/architecture.md, "Workers").  The master checks a snapshot
   once (:func:`read_checked`, or it built the bytes itself) and passes the open descriptor; a worker
   maps it with :func:`map_fd`, which checks the structure but not the checksum.  What the descriptor
   points at never changes: a snapshot file is only ever renamed into place, never written again, and
   an in-memory snapshot goes into a sealed memfd (:func:`to_memfd`: no write, no resize).  An index
   owns its descriptor (``FeedIndex.fd``) and closes it when collected.

Layout (all integers native order, which the byte-order marker pins; sections 8-byte aligned)::

    header   magic "TGSNAP\\r\\n", version u32, byte-order marker u32 (0x01020304), header size u32,
             section count u32, layout tag 16 bytes, feed digest 32 bytes (sha256 of the feed bytes),
             settings digest 32 bytes, records u64, keys u64, file size u64, checksum 16 bytes
    table    per section: name 16 bytes, dtype 4 bytes, offset u64, byte length u64
    sections keys u64 (sorted ascending, unsigned), refs u32 (record numbers, parallel to keys),
             bloom u8 (m bits, m a power of two >= 16 bits per key, min 64; a key k may be present
             when bits ``k & (m-1)`` and ``(k >> 32) & (m-1)`` are set, bit i = ``bloom[i >> 3] >> (i & 7) & 1``),
             cidr4_start/cidr4_end u32 (disjoint segments sorted by start, inclusive end), cidr4_off u32
             (per segment, n+1 offsets into cidr4_refs), cidr4_refs u32 and cidr4_plen u8 (the CIDR records
             covering the segment, most specific first, then by record number), the same for IPv6 with
             cidr6_start/cidr6_end u64 holding 2 words per segment (high, low), global_masks u32 (records
             of masks whose host holds a star), rec_kind i8, rec_flags u8 (bit 0: sub-domains, bit 1:
             context stored as JSON), rec_value_off/rec_raw_off/rec_ctx_off u64 (n+1 each) with
             rec_value/rec_raw/rec_ctx bytes (item i is ``blob[off[i]:off[i+1]-1]``: each ends with one
             separator byte, 0x1E, or in the context column the NUL after its last field; an empty
             context may take no bytes, ``off[i] == off[i+1]``), meta (JSON: the load report, the CSV
             header, the kinds bitmask)

The checksum is xxh3_128 over the file with the 16 checksum bytes left out.
"""

from __future__ import annotations

import fcntl
import importlib
import itertools
import json
import mmap
import os
import stat
import struct
import sys
import weakref
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import xxhash

from threatgate import fs
from threatgate.errors import FeedError, SnapshotInvalid
from threatgate.node.records import Indicator, Kind, LoadReport, Mask, ParsedFeed, key_of, mask_from

_c_keys_of: Any
try:  # the compiled engine hashes a whole column at ~12 ns a value; the same numbers as xxhash
    _c_keys_of = importlib.import_module("threatgate.node._engine").keys_of
except ImportError:  # pragma: no cover - an install without the compiled part
    _c_keys_of = None

MAX_CIDR_COVER = 64
"""Interval entries a CIDR may take on average (one per segment it covers): the bound on nesting."""

MAGIC = b"TGSNAP\r\n"
FORMAT_VERSION = 1
BYTE_ORDER_MARK = 0x01020304
LAYOUT = f"{sys.byteorder[0]}{struct.calcsize('P')}a{np.dtype(np.uint64).alignment}".encode().ljust(16, b"\0")
"""What another machine may lay out differently: byte order, pointer size, uint64 alignment."""

_HEAD = struct.Struct("=8sIIII16s32s32sQQQ16s")
_CHECKSUM_AT = _HEAD.size - 16
_ENTRY = struct.Struct("=16s4sQQ")
_ALIGN = 8
_SEP = 0x1E  # the byte after every stored string (a record separator, never inside UTF-8 of other characters)
_SEP_CHAR = "\x1e"
_FIELD_SEP = "\x00"  # between the context fields of one record
_COLUMNS = ("value", "raw", "ctx")
_SPAN = struct.Struct("=QQ")
FLAG_SUBDOMAINS = 1
FLAG_JSON_CONTEXT = 2

SECTIONS: dict[str, str] = {
    "keys": "u8",
    "refs": "u4",
    "bloom": "u1",
    "cidr4_start": "u4",
    "cidr4_end": "u4",
    "cidr4_off": "u4",
    "cidr4_refs": "u4",
    "cidr4_plen": "u1",
    "cidr6_start": "u8",
    "cidr6_end": "u8",
    "cidr6_off": "u4",
    "cidr6_refs": "u4",
    "cidr6_plen": "u1",
    "global_masks": "u4",
    "rec_kind": "i1",
    "rec_flags": "u1",
    "rec_value_off": "u8",
    "rec_raw_off": "u8",
    "rec_ctx_off": "u8",
    "rec_value": "u1",
    "rec_raw": "u1",
    "rec_ctx": "u1",
    "meta": "u1",
}
"""Every section, in file order, with its numpy dtype."""


@dataclass(frozen=True, slots=True)
class Record:
    """One stored record, as a detection renders it."""

    kind: int
    value: str
    raw: str
    context: tuple[tuple[str, str], ...]
    subdomains: bool

    def indicator(self) -> Indicator:
        """The record's indicator (``cidr`` filled in for a CIDR record)."""
        cidr = None
        if self.kind == Kind.CIDR:
            version, plen, net = self.value.split("/")
            cidr = (int(version), int(plen), int(net))
        return Indicator(self.kind, self.value, self.raw, cidr)


# -- keys -----------------------------------------------------------------------------------------


def keys_of(kinds: npt.NDArray[np.int8], values: Sequence[str]) -> npt.NDArray[np.uint64]:
    """The keys of a whole column (the compiled engine's batch hash when it is built)."""
    if _c_keys_of is not None:
        try:
            return np.frombuffer(_c_keys_of(np.ascontiguousarray(kinds).tobytes(), values), dtype=np.uint64)
        except UnicodeEncodeError:
            pass  # a lone surrogate: the C path encodes strictly; hash those values here
    return np.fromiter(map(key_of, kinds.tolist(), values), dtype=np.uint64, count=len(values))


# -- building -------------------------------------------------------------------------------------


def build(parsed: ParsedFeed, feed_digest: bytes, settings_digest: bytes) -> list[Buffer]:
    """The bytes of the snapshot file of ``parsed``, as chunks to write one after the other (sans-IO)."""
    n = len(parsed.values)
    kinds = np.frombuffer(parsed.kinds, dtype=np.int8) if n else np.zeros(0, np.int8)
    sections: dict[str, npt.NDArray[Any] | bytes] = {}
    keys, refs, global_masks, bitmask = _keys(kinds, parsed.values)
    sections["keys"] = keys
    sections["refs"] = refs
    sections["bloom"] = bloom_of(keys)
    for version in (4, 6):
        sections.update(_cidr_sections(version, kinds, parsed.values))
    sections["global_masks"] = global_masks
    sections["rec_kind"] = kinds
    flags = _subdomain_flags(parsed.subdomains, n)
    sections["rec_value_off"], sections["rec_value"] = _strings(parsed.values)
    sections["rec_raw_off"], sections["rec_raw"] = _strings(parsed.raws)
    ctx_off, ctx_blob, json_rows = _contexts(parsed.contexts)
    if json_rows.size:
        flags[json_rows] |= FLAG_JSON_CONTEXT
    sections["rec_flags"] = flags
    sections["rec_ctx_off"], sections["rec_ctx"] = ctx_off, ctx_blob
    report = parsed.report
    meta = {
        "report": {
            "records": report.records,
            "malformed": report.malformed,
            "examples": report.examples,
            "per_kind": report.per_kind,
            "skipped": report.skipped,
            "skip_examples": report.skip_examples,
        },
        "header": parsed.header,
        "kinds_bitmask": bitmask,
    }
    sections["meta"] = json.dumps(meta, ensure_ascii=True).encode()
    return _assemble(sections, feed_digest, settings_digest, n, len(keys))


def _subdomain_flags(subdomains: Any, n: int) -> npt.NDArray[np.uint8]:
    """Bit 0 of ``rec_flags`` from the ``subdomains`` column: a list of bools, or one byte per record
    (bytes, bytearray, a numpy array), as a parser may give it."""
    if isinstance(subdomains, bytes | bytearray | memoryview | np.ndarray):
        flags = np.frombuffer(subdomains, dtype=np.uint8) if not isinstance(subdomains, np.ndarray) else subdomains
        flags = (flags[:n] != 0).astype(np.uint8)
    else:
        flags = np.fromiter(subdomains, dtype=bool, count=n).astype(np.uint8) if n else np.zeros(0, np.uint8)
    if len(flags) != n:
        raise ValueError(f"subdomains column has {len(flags)} rows, the feed {n}")
    return flags


def _keys(
    kinds: npt.NDArray[np.int8], values: list[str]
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint32], npt.NDArray[np.uint32], int]:
    """Sorted keys, their record numbers, the star-host masks, and the kinds bitmask."""
    keyed_strings: list[str] = values
    keyed = kinds != Kind.CIDR
    mask_rows = np.flatnonzero(kinds == Kind.MASK)
    global_rows: list[int] = []
    if mask_rows.size:
        keyed_strings = list(values)
        for row in mask_rows.tolist():
            host, _ = mask_from(values[row], row)
            if host:
                keyed_strings[row] = host
            else:
                global_rows.append(row)
                keyed[row] = False
    all_keys = keys_of(kinds, keyed_strings) if len(values) else np.zeros(0, np.uint64)
    rows = np.flatnonzero(keyed).astype(np.uint32)
    keys = all_keys[rows]
    order = np.argsort(keys)  # numpy's SIMD sort; not stable, so equal keys are put in record order below
    keys = keys[order]
    refs = rows[order]
    del order
    _records_in_order(keys, refs)
    counts = np.bincount(kinds[rows].astype(np.intp), minlength=len(Kind.NAMES)).tolist() if rows.size else []
    bitmask = sum(1 << kind for kind, count in enumerate(counts) if count)
    return keys, refs, np.array(global_rows, dtype=np.uint32), bitmask


def _records_in_order(keys: npt.NDArray[np.uint64], refs: npt.NDArray[np.uint32]) -> None:
    """Within each run of equal keys (a feed listing a value twice), record numbers ascending (in place)."""
    same = np.flatnonzero(keys[1:] == keys[:-1])
    if not same.size:
        return
    where = np.union1d(same, same + 1)  # every position in a run of equal keys, runs kept together
    refs[where] = refs[where][np.lexsort((refs[where], keys[where]))]


def bloom_of(keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """The 2-probe Bloom bitmap over ``keys``: m a power of two >= 16 bits per key, at least 64."""
    m = 64
    while m < 16 * len(keys):
        m <<= 1
    bits = np.zeros(m, dtype=bool)  # one byte per bit while scattering, then packed (faster than ufunc.at)
    mask = np.uint64(m - 1)
    bits[keys & mask] = True
    bits[(keys >> np.uint64(32)) & mask] = True
    bitmap = np.packbits(bits, bitorder="little")
    return bitmap


def _cidr_sections(version: int, kinds: npt.NDArray[np.int8], values: list[str]) -> dict[str, npt.NDArray[Any]]:
    """Disjoint segments covering every CIDR of ``version``, each with the records covering it."""
    bits = 32 if version == 4 else 128
    prefix = f"{version}/"
    spans: list[tuple[int, int, int, int]] = []  # (start, end + 1, prefix length, record)
    for row in np.flatnonzero(kinds == Kind.CIDR).tolist():
        value = values[row]
        if not value.startswith(prefix):
            continue
        _, plen_s, net_s = value.split("/")
        plen = int(plen_s)
        start = int(net_s) << (bits - plen)
        spans.append((start, start + (1 << (bits - plen)), plen, row))
    starts, ends, offsets, refs, plens = segments(spans)
    p = f"cidr{version}_"
    if version == 4:
        return {
            p + "start": np.array(starts, dtype=np.uint32),
            p + "end": np.array(ends, dtype=np.uint32),
            p + "off": np.array(offsets, dtype=np.uint32),
            p + "refs": np.array(refs, dtype=np.uint32),
            p + "plen": np.array(plens, dtype=np.uint8),
        }
    return {
        p + "start": _words(starts),
        p + "end": _words(ends),
        p + "off": np.array(offsets, dtype=np.uint32),
        p + "refs": np.array(refs, dtype=np.uint32),
        p + "plen": np.array(plens, dtype=np.uint8),
    }


def _words(numbers: list[int]) -> npt.NDArray[np.uint64]:
    out = np.zeros(2 * len(numbers), dtype=np.uint64)
    if numbers:
        out[0::2] = [x >> 64 for x in numbers]
        out[1::2] = [x & 0xFFFF_FFFF_FFFF_FFFF for x in numbers]
    return out


def segments(
    spans: Iterable[tuple[int, int, int, int]],
) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """Disjoint segments of half-open ``(start, stop, prefix length, record)`` spans (sans-IO, pure).

    Returns (starts, inclusive ends, offsets (n+1), records, prefix lengths): segment i is covered by
    ``records[offsets[i]:offsets[i+1]]``, most specific first then by record number.  Neighbouring
    segments with the same cover are merged; addresses no span covers have no segment.
    """
    spans = sorted(spans)
    if not spans:
        return [], [], [0], [], []
    if all(a[1] <= b[0] for a, b in itertools.pairwise(spans)):  # disjoint (the common case): one each
        return (
            [s for s, _, _, _ in spans],
            [e - 1 for _, e, _, _ in spans],
            list(range(len(spans) + 1)),
            [r for _, _, _, r in spans],
            [p for _, _, p, _ in spans],
        )
    bounds = sorted({s for s, _, _, _ in spans} | {e for _, e, _, _ in spans})
    where = {b: i for i, b in enumerate(bounds)}
    # Each segment lists every CIDR covering it: deep nesting multiplies that (100 nested IPv6 networks
    # over 40,000 small ones took a gigabyte).  Refuse such a feed before building it.
    total = sum(where[stop] - where[start] for start, stop, _, _ in spans)
    if total > MAX_CIDR_COVER * len(spans) + 4096:
        raise FeedError(
            f"CIDRs nested too deeply: {len(spans)} networks would take {total} interval entries "
            f"(at most {MAX_CIDR_COVER} per network); remove the covering networks or split the feed"
        )
    cover: list[list[tuple[int, int]]] = [[] for _ in range(len(bounds) - 1)]
    for start, stop, plen, row in spans:
        for i in range(where[start], where[stop]):
            cover[i].append((-plen, row))
    starts: list[int] = []
    ends: list[int] = []
    offsets = [0]
    refs: list[int] = []
    plens: list[int] = []
    last: list[tuple[int, int]] | None = None
    for i, members in enumerate(cover):
        if not members:
            last = None
            continue
        members.sort()
        if members == last and ends[-1] + 1 == bounds[i]:
            ends[-1] = bounds[i + 1] - 1
            continue
        starts.append(bounds[i])
        ends.append(bounds[i + 1] - 1)
        refs.extend(row for _, row in members)
        plens.extend(-p for p, _ in members)
        offsets.append(len(refs))
        last = members
    return starts, ends, offsets, refs, plens


def _strings(items: list[str]) -> tuple[npt.NDArray[np.uint64], bytes]:
    """A column of strings as one blob (each item followed by the separator byte) and n+1 offsets."""
    n = len(items)
    if not n:
        return np.zeros(1, np.uint64), b""
    blob = (_SEP_CHAR.join(items) + _SEP_CHAR).encode("utf-8", "surrogatepass")
    ends = np.flatnonzero(np.frombuffer(blob, dtype=np.uint8) == _SEP).astype(np.uint64) + np.uint64(1)
    if len(ends) != n:  # hostile text with separators inside: offsets from each item's own length
        encoded = [s.encode("utf-8", "surrogatepass") + b"\x1e" for s in items]
        blob = b"".join(encoded)
        ends = np.cumsum(np.fromiter(map(len, encoded), dtype=np.uint64, count=n))
    return np.concatenate((np.zeros(1, np.uint64), ends)), blob


def _contexts(
    contexts: list[tuple[tuple[str, str], ...]],
) -> tuple[npt.NDArray[np.uint64], bytes, npt.NDArray[np.intp]]:
    """The context column: every field of every record NUL-terminated, records back to back.

    Fast path: one ``join`` over all the fields (C loops only); the NULs found in the encoded bytes are
    the ends of the fields, and each record ends where its last field does (an empty context has no
    bytes: its end offset is its start).  A column where some name or value holds a NUL is encoded
    record by record instead, those records as JSON.
    """
    n = len(contexts)
    lengths = np.fromiter(map(len, contexts), dtype=np.int64, count=n)
    fields_before = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(2 * lengths, out=fields_before[1:])
    total = int(fields_before[-1])
    flat = itertools.chain.from_iterable(itertools.chain.from_iterable(contexts))
    blob = (_FIELD_SEP.join(flat) + (_FIELD_SEP if total else "")).encode("utf-8", "surrogatepass")
    field_ends = np.flatnonzero(np.frombuffer(blob, dtype=np.uint8) == 0)
    if len(field_ends) == total:
        off = np.zeros(n + 1, dtype=np.uint64)
        has = fields_before > 0
        off[has] = field_ends[fields_before[has] - 1].astype(np.uint64) + np.uint64(1)
        return off, blob, np.zeros(0, np.intp)
    del blob, field_ends
    rows = list(map(_FIELD_SEP.join, map(itertools.chain.from_iterable, contexts)))
    json_rows: list[int] = []
    for i, ctx in enumerate(contexts):
        if rows[i].count(_FIELD_SEP) != 2 * len(ctx) - (1 if ctx else 0):
            rows[i] = json.dumps([list(p) for p in ctx], ensure_ascii=True)
            json_rows.append(i)
    off2, blob2 = _strings(rows)
    return off2, blob2, np.array(json_rows, dtype=np.intp)


def _assemble(
    sections: dict[str, npt.NDArray[Any] | bytes], feed_digest: bytes, settings_digest: bytes, records: int, keys: int
) -> list[Buffer]:
    table_size = _ENTRY.size * len(SECTIONS)
    pos = _aligned(_HEAD.size + table_size)
    entries = []
    bodies: list[Buffer] = []
    for name, dtype in SECTIONS.items():
        data = sections[name]
        view = memoryview(data) if isinstance(data, bytes) else np.ascontiguousarray(data, dtype=np.dtype(dtype)).data
        raw = view.cast("B")
        entries.append(_ENTRY.pack(name.encode(), dtype.encode(), pos, len(raw)))
        pad = _aligned(len(raw)) - len(raw)
        bodies.append(raw)  # no copy of the (possibly large) section
        if pad:
            bodies.append(bytes(pad))
        pos += len(raw) + pad
    head = _HEAD.pack(
        MAGIC,
        FORMAT_VERSION,
        BYTE_ORDER_MARK,
        _HEAD.size,
        len(SECTIONS),
        LAYOUT,
        feed_digest,
        settings_digest,
        records,
        keys,
        pos,
        b"\0" * 16,
    )
    table = b"".join(entries)
    gap = b"\0" * (_aligned(_HEAD.size + table_size) - _HEAD.size - table_size)
    h = xxhash.xxh3_128()
    h.update(head[:_CHECKSUM_AT])
    for chunk in (table, gap, *bodies):
        h.update(chunk)
    head = head[:_CHECKSUM_AT] + h.digest()
    return [head, table, gap, *bodies]


Buffer = bytes | memoryview
"""A chunk of a snapshot: bytes, or a view of an array (written without a copy)."""


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# -- writing and reading files --------------------------------------------------------------------


def write_atomic(path: str, chunks: Iterable[Buffer]) -> None:
    """Write ``chunks`` to ``path`` atomically (:func:`threatgate.fs.write_atomic`, 0600).

    No ``fsync``: a file that a crash leaves torn (renamed before its blocks reached the disk) fails
    the checksum at the next start and is rebuilt, so durability would only buy a faster restart after
    a power loss, at the price of a flush of hundreds of MB on every feed change.  At worst a crash
    leaves a ``.tmp`` file, which the snapshot directory's clean-up removes.

    Raises:
        FileWriteError: the file cannot be written.
    """
    fs.write_atomic(path, chunks, 0o600, durable=False)


def check_header(head: bytes, size: int, feed_digest: bytes | None, settings_digest: bytes | None) -> None:
    """Check a snapshot's fixed header against the file size and the expected digests (sans-IO).

    Raises:
        SnapshotInvalid: with the reason (``truncated``, ``magic``, ``byte_order``, ``version``,
            ``layout``, ``digest``).
    """
    if len(head) < _HEAD.size:
        raise SnapshotInvalid("truncated", f"{len(head)} bytes, shorter than the header")
    magic, version, bom, _, _, layout, fdig, sdig, _, _, file_size, _ = _HEAD.unpack_from(head)
    if magic != MAGIC:
        raise SnapshotInvalid("magic", f"not a threatgate snapshot (magic {magic!r})")
    if bom != BYTE_ORDER_MARK:
        raise SnapshotInvalid("byte_order", f"written with another byte order (marker {bom:#010x})")
    if version != FORMAT_VERSION:
        raise SnapshotInvalid("version", f"format version {version}, this threatgate reads {FORMAT_VERSION}")
    if layout != LAYOUT:
        tag = layout.rstrip(bytes(1))
        raise SnapshotInvalid("layout", f"written on another machine layout ({tag!r})")
    if file_size != size:
        reason = "truncated" if size < file_size else "corrupt"
        raise SnapshotInvalid(reason, f"{size} bytes, the header says {file_size}")
    if feed_digest is not None and fdig != feed_digest:
        raise SnapshotInvalid("digest", "made from other feed bytes")
    if settings_digest is not None and sdig != settings_digest:
        raise SnapshotInvalid("digest", "made with other feed settings")


def checksum_ok(buffer: bytes | memoryview) -> bool:
    """Whether an in-memory snapshot's checksum matches (the file check is :func:`read_checked`)."""
    view = memoryview(buffer)
    h = xxhash.xxh3_128()
    h.update(view[:_CHECKSUM_AT])
    h.update(view[_CHECKSUM_AT + 16 :])
    return h.digest() == bytes(view[_CHECKSUM_AT : _CHECKSUM_AT + 16])


def read_checked(path: str, feed_digest: bytes | None = None, settings_digest: bytes | None = None) -> FeedIndex:
    """Check the snapshot file ``path`` by reading it, then map it read-only.

    Raises:
        SnapshotInvalid: the file must not be trusted (see :func:`check_header`; also ``checksum``).
        OSError: it cannot be opened or read.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, _HEAD.size, 0)
        check_header(head, size, feed_digest, settings_digest)
        h = xxhash.xxh3_128()
        h.update(head[:_CHECKSUM_AT])
        pos = _HEAD.size
        while pos < size:
            chunk = os.pread(fd, min(1 << 22, size - pos), pos)
            if not chunk:
                raise SnapshotInvalid("truncated", f"ends at byte {pos} while being read")
            h.update(chunk)
            pos += len(chunk)
        if h.digest() != head[_CHECKSUM_AT:]:
            raise SnapshotInvalid("checksum", "checksum mismatch: the file is damaged")
        mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise
    try:
        return FeedIndex(mapped, fd)
    except BaseException:
        os.close(fd)
        raise


def map_fd(fd: int, feed_digest: bytes | None = None, settings_digest: bytes | None = None) -> FeedIndex:
    """Map the snapshot open on ``fd`` read-only: a descriptor a worker received from the master.

    The header, the machine layout, the expected digests (when given: they tie the descriptor to the
    snapshot the master meant) and the bounds of every section are checked as :func:`read_checked`
    checks them, but **not the checksum**: the master checked it when it mapped the file (or built the
    bytes itself, for a memfd), the descriptor refers to that same inode, and nothing writes a
    snapshot after it is renamed into place (a memfd is sealed).  Reading the whole file again in
    every worker would cost seconds per gigabyte at each start and restart of a worker.

    Ownership: ``map_fd`` takes ``fd`` in every case.  On success the index keeps it for ``pread`` of
    records and closes it when it is collected (:attr:`FeedIndex.fd`); when the snapshot is refused,
    ``fd`` is closed before the exception is raised.  A caller that must keep its descriptor passes
    ``os.dup(fd)``.

    Raises:
        SnapshotInvalid: the reasons of :func:`check_header` and ``corrupt``, or ``unreadable``: not an
            open descriptor, not a regular file (a memfd is one), not open for reading, or not mappable.
    """
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotInvalid("unreadable", f"descriptor {fd} is not a regular file")
        size = st.st_size
        check_header(os.pread(fd, _HEAD.size, 0), size, feed_digest, settings_digest)
        mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        index = FeedIndex(mapped, fd)
    except OSError as exc:
        _close_quietly(fd)
        raise SnapshotInvalid("unreadable", f"descriptor {fd}: {fs.os_reason(exc)}") from None
    except BaseException:
        _close_quietly(fd)
        raise
    return index


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:  # not an open descriptor in the first place
        pass


MEMFD_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
"""The seals of a snapshot memfd: its bytes and size can never change, nor can the seals be removed."""


def to_memfd(chunks: Iterable[Buffer | bytearray | mmap.mmap], name: str) -> int:
    """Write a snapshot's bytes (the chunks of :func:`build`, or an in-memory index's ``buffer``) into a new
    sealed memfd and return its descriptor (close-on-exec; the caller owns it: :func:`map_fd` takes it).

    The memfd is anonymous shared memory: every process that maps it shares its pages, so the master
    and its workers hold one copy of an in-memory (API supplier) snapshot, as they do of a file.  It is
    sealed (:data:`MEMFD_SEALS`) so a worker can trust that the bytes it mapped stay what the master
    built: a mapping can never be cut short under a reader (no ``SIGBUS``).  ``name`` shows in
    ``/proc/<pid>/maps`` (``/memfd:<name> (deleted)``) and needs no uniqueness.

    Raises:
        OSError: no memory for it (``ENOMEM``, ``ENOSPC``), or too many descriptors open.
    """
    label = name.encode("utf-8", "replace").replace(b"\0", b"?")[:200]  # the kernel takes up to 249 bytes
    fd = os.memfd_create(os.fsdecode(label), os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            while view:
                view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def in_memfd(
    parsed: ParsedFeed, name: str, feed_digest: bytes = bytes(32), settings_digest: bytes = bytes(32)
) -> FeedIndex:
    """Like :func:`in_memory`, but over a sealed memfd that worker processes can map (the API supplier
    store of a node with workers).  The sections go straight from :func:`build` into the memfd: one copy
    of the bytes, where :func:`in_memory` makes a joined ``bytes`` and then a ``bytearray`` of it."""
    return map_fd(to_memfd(build(parsed, feed_digest, settings_digest), name))


# -- the index over a snapshot's bytes ------------------------------------------------------------


class FeedIndex:
    """Lookups over one snapshot's bytes (an ``mmap`` of its file, or ``bytes`` for in-memory ones).

    Python lookups use ``memoryview`` casts (C-level ``bisect`` on them, no copies); the compiled
    engine gets numpy views from :meth:`engine_view`.  Pages are touched only where looked at: the
    records section only for candidates.
    """

    def __init__(self, buffer: bytes | bytearray | mmap.mmap, fd: int | None = None) -> None:
        """``fd``: the snapshot file, read with ``pread`` for records (owned: closed with the index)."""
        self.buffer = buffer
        self._fd = fd
        view = memoryview(buffer)
        self._view = view
        check_header(bytes(view[: _HEAD.size]), len(view), None, None)
        fields = _HEAD.unpack_from(view)
        self.feed_digest: bytes = fields[6]
        self.settings_digest: bytes = fields[7]
        self.records: int = fields[8]
        count = fields[4]
        table_end = _HEAD.size + count * _ENTRY.size
        if count != len(SECTIONS) or table_end > len(view):
            raise SnapshotInvalid("corrupt", f"{count} sections, expected {len(SECTIONS)}")
        self._sections: dict[str, tuple[int, int]] = {}
        for i, (name, dtype) in enumerate(SECTIONS.items()):
            raw_name, raw_dtype, offset, length = _ENTRY.unpack_from(view, _HEAD.size + i * _ENTRY.size)
            itemsize = np.dtype(dtype).itemsize
            if (
                raw_name.rstrip(b"\0") != name.encode()
                or raw_dtype.rstrip(b"\0") != dtype.encode()
                or offset % _ALIGN
                or offset < table_end
                or offset + length > len(view)
                or length % itemsize
            ):
                raise SnapshotInvalid("corrupt", f"section {i} ({raw_name.rstrip(bytes(1))!r}) out of bounds")
            self._sections[name] = (offset, length)
        self._check_counts(fields[9])
        try:
            meta = json.loads(bytes(self._bytes("meta")))
            self.kinds_bitmask: int = int(meta["kinds_bitmask"])
            self.header: list[str] = list(meta["header"])
            self.report = LoadReport(**meta["report"])
        except (ValueError, KeyError, TypeError) as exc:  # checksummed, yet not what this version writes
            raise SnapshotInvalid("corrupt", f"its metadata cannot be read: {exc}") from None
        self.keys = self._cast("keys", "Q")
        self.refs = self._cast("refs", "I")
        self.bloom = self._cast("bloom", "B")
        self.bloom_mask = len(self.bloom) * 8 - 1
        self._c4 = (self._cast("cidr4_start", "I"), self._cast("cidr4_end", "I"))
        self._c4_off = self._cast("cidr4_off", "I")
        self._c4_refs = self._cast("cidr4_refs", "I")
        self._c4_plen = self._cast("cidr4_plen", "B")
        self._c6_words = (self._cast("cidr6_start", "Q"), self._cast("cidr6_end", "Q"))
        self._c6: tuple[list[int], list[int]] | None = None  # 128-bit starts and ends, made at the first lookup
        self._c6_off = self._cast("cidr6_off", "I")
        self._c6_refs = self._cast("cidr6_refs", "I")
        self._c6_plen = self._cast("cidr6_plen", "B")
        self.has_cidr4 = len(self._c4[0]) > 0
        self.has_cidr6 = len(self._c6_words[0]) > 0
        self.global_masks = self._cast("global_masks", "I")
        self._kind = self._cast("rec_kind", "b")
        self._flags = self._cast("rec_flags", "B")
        # Records are read with pread from a file (never through the mapping: the kernel maps 64 KiB around
        # every page touched, so reading records for hits would make most of a large file resident).
        self._offs = tuple(self._sections[f"rec_{c}_off"][0] for c in _COLUMNS)
        self._blobs = tuple(self._sections[f"rec_{c}"] for c in _COLUMNS)
        self._masks: dict[int, Mask] = {}
        self.global_mask_list = tuple((row, self.mask(row)) for row in self.global_masks)
        if fd is not None:  # last: an index refused above leaves the descriptor to its caller
            weakref.finalize(self, os.close, fd)

    @property
    def fd(self) -> int | None:
        """The descriptor of the snapshot file or memfd, or None for bytes in memory.

        Owned by the index (closed when it is collected): send it (``socket.send_fds`` duplicates it into
        the receiver), never close it.
        """
        return self._fd

    def _bytes(self, name: str) -> memoryview:
        offset, length = self._sections[name]
        return self._view[offset : offset + length]

    def _cast(self, name: str, fmt: Literal["B", "b", "I", "Q"]) -> memoryview[int]:
        return self._bytes(name).cast(fmt)

    def _check_counts(self, keys: int) -> None:
        """Section lengths must agree with each other and the header, so no lookup reads out of bounds."""
        n = self.records
        length = {name: ln // np.dtype(SECTIONS[name]).itemsize for name, (_, ln) in self._sections.items()}
        bloom = length["bloom"]
        problems = [
            length["keys"] != keys or length["refs"] != keys,
            bloom < 8 or bloom & (bloom - 1),
            length["rec_kind"] != n or length["rec_flags"] != n,
            any(length[f"rec_{c}_off"] != n + 1 for c in ("value", "raw", "ctx")),
            length["cidr4_end"] != length["cidr4_start"] or length["cidr4_off"] != length["cidr4_start"] + 1,
            length["cidr6_end"] != length["cidr6_start"] or 2 * (length["cidr6_off"] - 1) != length["cidr6_start"],
            length["cidr4_plen"] != length["cidr4_refs"] or length["cidr6_plen"] != length["cidr6_refs"],
        ]
        if any(problems):
            raise SnapshotInvalid("corrupt", "section sizes do not agree with each other")

    def __len__(self) -> int:
        return self.records

    def __repr__(self) -> str:
        return f"<FeedIndex records={self.records} keys={len(self.keys)}>"

    # -- lookups --------------------------------------------------------------------------------

    def maybe(self, key: int) -> bool:
        """The Bloom test: False means ``key`` is certainly absent."""
        bloom, m = self.bloom, self.bloom_mask
        i = key & m
        if not (bloom[i >> 3] >> (i & 7)) & 1:
            return False
        i = (key >> 32) & m
        return bool((bloom[i >> 3] >> (i & 7)) & 1)

    def rows_of(self, key: int) -> list[int]:
        """Record numbers stored under ``key``, in record order."""
        keys = self.keys
        lo = bisect_left(keys, key)
        if lo == len(keys) or keys[lo] != key:
            return []
        return list(self.refs[lo : bisect_right(keys, key, lo)])

    def cidr_rows(self, version: int, number: int) -> list[tuple[int, int]]:
        """(prefix length, record) of every CIDR record holding the address, most specific first."""
        starts: Sequence[int]
        ends: Sequence[int]
        if version == 4:
            starts, ends = self._c4
            off, refs, plens = self._c4_off, self._c4_refs, self._c4_plen
        else:
            if self._c6 is None:
                w6s, w6e = self._c6_words
                self._c6 = (
                    [w6s[i] << 64 | w6s[i + 1] for i in range(0, len(w6s), 2)],
                    [w6e[i] << 64 | w6e[i + 1] for i in range(0, len(w6e), 2)],
                )
            starts, ends = self._c6
            off, refs, plens = self._c6_off, self._c6_refs, self._c6_plen
        i = bisect_right(starts, number) - 1
        if i < 0 or number > ends[i]:
            return []
        lo, hi = off[i], off[i + 1]
        return list(zip(plens[lo:hi], refs[lo:hi], strict=True))

    def mask(self, row: int) -> Mask:
        """The mask of record ``row`` (parsed once, then cached)."""
        mask = self._masks.get(row)
        if mask is None:
            mask = mask_from(self.value(row), row)[1]
            self._masks[row] = mask
        return mask

    # -- records --------------------------------------------------------------------------------

    def kind(self, row: int) -> int:
        return int(self._kind[row])

    def _string(self, column: int, row: int) -> str:
        at = self._offs[column] + 8 * row
        start, stop = _SPAN.unpack(self._read(at, 16))
        blob_at, blob_length = self._blobs[column]
        if not start <= stop <= blob_length:
            raise ValueError(f"record {row}: damaged offsets")
        if start == stop:  # an empty context takes no bytes (every other item ends with its separator)
            return ""
        return str(self._read(blob_at + start, stop - 1 - start), "utf-8", "surrogatepass")

    def _read(self, offset: int, length: int) -> bytes:
        if self._fd is not None:
            data = os.pread(self._fd, length, offset)
            if len(data) != length:
                raise ValueError(f"short read at {offset}")
            return data
        return bytes(self._view[offset : offset + length])

    def value(self, row: int) -> str:
        """The normalised indicator of record ``row``."""
        return self._string(0, row)

    def record(self, row: int) -> Record:
        """Record ``row`` as stored (raises IndexError out of range, ValueError when its bytes are damaged)."""
        if not 0 <= row < self.records:
            raise IndexError(row)
        flags = self._flags[row]
        text = self._string(2, row)
        context: tuple[tuple[str, str], ...]
        if flags & FLAG_JSON_CONTEXT:
            context = tuple((str(n), str(v)) for n, v in json.loads(text))
        elif text:
            parts = text.split(_FIELD_SEP)
            context = tuple(zip(parts[0::2], parts[1::2], strict=True))
        else:
            context = ()
        return Record(self.kind(row), self.value(row), self._string(1, row), context, bool(flags & FLAG_SUBDOMAINS))

    # -- the compiled engine's view -------------------------------------------------------------

    def _array(self, name: str) -> npt.NDArray[Any]:
        offset, length = self._sections[name]
        dtype = np.dtype(SECTIONS[name])
        return np.frombuffer(self.buffer, dtype=dtype, count=length // dtype.itemsize, offset=offset)

    def engine_view(self) -> tuple[Any, ...]:
        """``(keys, bloom, bloom_mask, kinds_bitmask, cidr4_start, cidr4_end, cidr6_start, cidr6_end,
        global_mask_parts)`` for the compiled engine (numpy views over the snapshot, no copies)."""
        return (
            self._array("keys"),
            self._array("bloom"),
            self.bloom_mask,
            self.kinds_bitmask,
            self._array("cidr4_start"),
            self._array("cidr4_end"),
            self._array("cidr6_start"),
            self._array("cidr6_end"),
            tuple(mask.parts for _, mask in self.global_mask_list),
        )


def engine_records_view(index: FeedIndex) -> tuple[Any, ...]:
    """What the compiled engine reads to list candidates exactly as :class:`IndicatorStore` does and to
    confirm and render them: ``(refs, cidr4_off, cidr4_refs, cidr4_plen, cidr6_off, cidr6_refs, cidr6_plen,
    global_masks, rec_kind, rec_flags)`` as numpy views over the snapshot, then how to read the record
    strings: ``(fd or -1, the bytes when in memory, (offsets of the value, raw, context offset arrays),
    (their blobs' offsets), (their blobs' lengths), the index)`` -- with ``pread`` from the file, like
    :meth:`FeedIndex._string`, so a hit never makes the records section resident."""
    names = ("refs", "cidr4_off", "cidr4_refs", "cidr4_plen", "cidr6_off", "cidr6_refs", "cidr6_plen")
    arrays = tuple(index._array(name) for name in (*names, "global_masks", "rec_kind", "rec_flags"))
    fd = index._fd if index._fd is not None else -1
    reader = (
        fd,
        index.buffer if fd < 0 else None,
        tuple(index._offs),
        tuple(at for at, _ in index._blobs),
        tuple(length for _, length in index._blobs),
        index,
    )
    return (*arrays, reader)


def in_memory(parsed: ParsedFeed, feed_digest: bytes = bytes(32), settings_digest: bytes = bytes(32)) -> FeedIndex:
    """A :class:`FeedIndex` over a snapshot built in memory (the API supplier store, tests, validate)."""
    return FeedIndex(bytearray(b"".join(build(parsed, feed_digest, settings_digest))))
