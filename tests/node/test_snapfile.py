"""Tests for threatgate.node.snapfile: the snapshot file format, its checks, the fixed key and CIDR intervals."""

from __future__ import annotations

import ipaddress
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threatgate.errors import SnapshotInvalid
from threatgate.node import snapfile
from threatgate.node._engine import key_of as c_key_of
from threatgate.node._engine import keys_of as c_keys_of
from threatgate.node.feedparse import ParsedFeed
from threatgate.node.feeds import Kind, add_row, classify, key_of
from threatgate.node.snapfile import FeedIndex, build, read_checked, segments, write_atomic

FEED = bytes(range(32))
SETTINGS = bytes(range(32, 64))


def parsed_of(*rows: tuple[str, str, tuple[tuple[str, str], ...]]) -> ParsedFeed:
    """Columns of (field, raw indicator, context) rows, classified as a feed loader would."""
    parsed = ParsedFeed()
    for field, raw, context in rows:
        indicator = classify(raw, field)
        assert indicator is not None, raw
        add_row(parsed, indicator, context)
    return parsed


SAMPLE = parsed_of(
    ("url", "http://evil.example/a", (("threat", "Phishing"),)),
    ("ip", "192.0.2.1", (("score", "7"), ("note", "пример"))),
    ("md5", "44D88612FEA8A8F36DE82E1278ABB02F", ()),
    ("ip", "10.0.0.0/8", (("t", "/8"),)),
    ("ip", "10.1.0.0/16", (("t", "/16"),)),
    ("ip", "2001:db8::/32", (("t", "v6"),)),
    ("domain", "*.s.example", ()),
    ("indicator", "x.example/a/*", (("t", "host mask"),)),
    ("indicator", "cdn*.w.example/p", (("t", "star host"),)),
    ("url", "http://evil.example/a", (("dup", "second record, same key"),)),
    ("ip", "192.0.2.2", (("odd\x00name", "v"), ("k", "a\x1eb"))),  # separators inside: stored as JSON
)


def write(tmp_path: Path, parsed: ParsedFeed = SAMPLE) -> Path:
    path = tmp_path / "s.snap"
    write_atomic(str(path), build(parsed, FEED, SETTINGS))
    return path


# -- the fixed key --------------------------------------------------------------------------------


@given(st.sampled_from(range(7)), st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_key_of_is_the_compiled_engines_key(kind: int, value: str) -> None:
    encoded = value.encode("utf-8", "surrogatepass")
    assert key_of(kind, value) == c_key_of(kind, encoded)
    assert snapfile.keys_of(np.array([kind], np.int8), [value]).tolist() == [key_of(kind, value)]


def test_key_of_is_fixed_across_processes() -> None:
    # The documented hash (docs/architecture.md, "Store keys"): xxh3_64 of the UTF-8 value, seed = kind.
    assert key_of(Kind.DOMAIN, "evil.com") == 14174877089463309836
    assert key_of(Kind.URL, "evil.com") != key_of(Kind.DOMAIN, "evil.com")


def test_keys_of_column_matches_one_by_one() -> None:
    values = ["a.example", "b.example/x", "44d88612fea8a8f36de82e1278abb02f", "\ud800lone"]
    kinds = np.array([Kind.DOMAIN, Kind.URL, Kind.HASH, Kind.URL], np.int8)
    assert snapfile.keys_of(kinds, values).tolist() == [key_of(int(k), v) for k, v in zip(kinds, values, strict=True)]
    assert bytes(c_keys_of(kinds[:3].tobytes(), values[:3])) == snapfile.keys_of(kinds[:3], values[:3]).tobytes()


# -- round trip -----------------------------------------------------------------------------------


def test_snapshot_round_trip_through_a_file(tmp_path: Path) -> None:
    path = write(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["s.snap"]  # no temporary file left
    index = read_checked(str(path), FEED, SETTINGS)
    assert isinstance(index.buffer, snapfile.mmap.mmap)
    assert len(index) == len(SAMPLE.values)
    for row in range(len(index)):
        record = index.record(row)
        assert (record.kind, record.value, record.raw, record.context) == (
            SAMPLE.kinds[row],
            SAMPLE.values[row],
            SAMPLE.raws[row],
            SAMPLE.contexts[row],
        )
    assert index.record(6).subdomains and not index.record(0).subdomains
    assert index.report.records == len(SAMPLE.values)
    assert index.report.per_kind == SAMPLE.report.per_kind
    with pytest.raises(IndexError):
        index.record(len(index))


def test_snapshot_keys_sorted_with_their_records_and_bloom(tmp_path: Path) -> None:
    index = read_checked(str(write(tmp_path)))
    keys = list(index.keys)
    assert keys == sorted(keys)
    assert len(keys) == len(SAMPLE.values) - 3 - 1  # CIDRs are not keyed; the star-host mask is listed apart
    url = key_of(Kind.URL, "evil.example/a")
    assert index.maybe(url) and index.rows_of(url) == [0, 9]  # equal keys in record order
    assert index.rows_of(key_of(Kind.MASK, "x.example")) == [7]  # a mask is keyed by its literal host
    assert list(index.global_masks) == [8]
    m = index.bloom_mask + 1
    assert m & (m - 1) == 0 and m >= max(64, 16 * len(keys))
    for key in keys:
        for bit in (key & (m - 1), (key >> 32) & (m - 1)):
            assert index.bloom[bit >> 3] >> (bit & 7) & 1
    absent = sum(index.maybe(key_of(Kind.URL, f"clean{i}.example")) for i in range(2000))
    assert absent < 2000 * 0.2


def test_engine_view_is_what_the_compiled_engine_reads(tmp_path: Path) -> None:
    index = read_checked(str(write(tmp_path)))
    keys, bloom, bloom_mask, kinds_bitmask, c4s, c4e, c6s, c6e, global_parts = index.engine_view()
    assert keys.dtype == np.uint64 and keys.flags.c_contiguous and keys.tolist() == list(index.keys)
    assert bloom.dtype == np.uint8 and bloom_mask == len(bloom) * 8 - 1
    assert kinds_bitmask == sum(1 << k for k in (Kind.URL, Kind.IP, Kind.HASH, Kind.DOMAIN_SUFFIX, Kind.MASK))
    assert c4s.dtype == c4e.dtype == np.uint32
    assert c4s.tolist() == [10 << 24, 10 << 24 | 1 << 16, 10 << 24 | 2 << 16]
    assert c4e.tolist() == [(10 << 24 | 1 << 16) - 1, (10 << 24 | 2 << 16) - 1, (11 << 24) - 1]
    assert c6s.dtype == c6e.dtype == np.uint64
    assert c6s.tolist() == [0x2001_0DB8 << 32, 0] and c6e.tolist() == [(0x2001_0DB8 << 32) | 0xFFFF_FFFF, 2**64 - 1]
    assert global_parts == (("cdn", ".w.example/p"),)


def test_empty_snapshot(tmp_path: Path) -> None:
    path = write(tmp_path, ParsedFeed())
    index = read_checked(str(path))
    assert len(index) == 0 and len(index.keys) == 0 and not index.maybe(key_of(Kind.URL, "x"))
    assert index.cidr_rows(4, 1) == [] and index.cidr_rows(6, 1) == []
    assert index.engine_view()[2] == 63


# -- nothing untrusted is used --------------------------------------------------------------------


def reason_of(path: Path, feed: bytes | None = FEED, settings_digest: bytes | None = SETTINGS) -> str:
    with pytest.raises(SnapshotInvalid) as info:
        read_checked(str(path), feed, settings_digest)
    return info.value.reason


def section_boundaries(path: Path) -> list[int]:
    index = read_checked(str(path))
    return sorted({0, 8, 60, 140, *(o for o, _ in index._sections.values())})  # noqa: SLF001 - the layout under test


def test_truncated_at_every_section_boundary_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path)
    data = path.read_bytes()
    cuts = [c for c in section_boundaries(path) if c < len(data)] + [len(data) - 1]
    for cut in cuts:
        path.write_bytes(data[:cut])
        assert reason_of(path) == "truncated", cut


def test_a_flipped_byte_anywhere_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path)
    data = bytearray(path.read_bytes())
    for at in range(0, len(data), max(1, len(data) // 97)):
        damaged = bytearray(data)
        damaged[at] ^= 0x40
        path.write_bytes(damaged)
        assert reason_of(path) in ("checksum", "magic", "version", "byte_order", "layout", "digest", "corrupt"), at


def test_a_flipped_byte_in_a_section_is_a_checksum_mismatch(tmp_path: Path) -> None:
    path = write(tmp_path)
    data = bytearray(path.read_bytes())
    data[-20] ^= 1
    path.write_bytes(data)
    assert reason_of(path) == "checksum"


def header_patched(path: Path, offset: int, fmt: str, value: object) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(data)


def test_wrong_magic_version_byte_order_layout_and_digests_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path)
    original = path.read_bytes()
    cases = [
        (0, "8s", b"NOTSNAP!", "magic"),
        (8, "=I", snapfile.FORMAT_VERSION + 1, "version"),  # a future version: rebuilt, never guessed at
        (12, "=I", 0x04030201, "byte_order"),  # what a snapshot of the other byte order reads as
        (24, "16s", b"b8a8", "layout"),
    ]
    for offset, fmt, value, reason in cases:
        path.write_bytes(original)
        header_patched(path, offset, fmt, value)
        assert reason_of(path) == reason
    path.write_bytes(original)
    assert reason_of(path, feed=bytes(32)) == "digest"
    assert reason_of(path, settings_digest=bytes(32)) == "digest"
    assert len(read_checked(str(path))) == len(SAMPLE.values)  # the original itself is fine


def test_not_a_snapshot_at_all(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"[]" * 100)
    assert reason_of(path) == "magic"
    path.write_bytes(b"")
    assert reason_of(path) == "truncated"


def test_in_memory_index_checks_structure_too() -> None:
    data = bytearray(b"".join(build(SAMPLE, FEED, SETTINGS)))
    assert snapfile.checksum_ok(data)
    struct.pack_into("=Q", data, struct.calcsize("=8sIIII16s32s32s"), 10**6)  # records count lies
    with pytest.raises(SnapshotInvalid) as info:
        FeedIndex(data)
    assert info.value.reason == "corrupt"


def test_write_atomic_leaves_nothing_when_writing_fails(tmp_path: Path) -> None:
    def chunks() -> list[bytes]:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(str(tmp_path / "s.snap"), iter([b"x", *chunks()]))
    assert os.listdir(tmp_path) == []


# -- CIDR intervals -------------------------------------------------------------------------------


def cidr_oracle(cidrs: list[tuple[int, int, int]], version: int, number: int) -> list[tuple[int, int]]:
    """(prefix length, record) of the CIDRs holding ``number``, most specific first: by brute force."""
    bits = 32 if version == 4 else 128
    found = [(plen, row) for row, (v, plen, net) in enumerate(cidrs) if v == version and number >> (bits - plen) == net]
    return sorted(found, key=lambda f: (-f[0], f[1]))


def cidrs_strategy(version: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    bits = 32 if version == 4 else 128
    # Few distinct high bits, so that CIDRs overlap and nest often.
    base = st.sampled_from([0, 1 << (bits - 1), 0xA << (bits - 4), (1 << bits) - (1 << (bits - 8))])
    return st.lists(
        st.tuples(base, st.integers(0, bits - 1), st.integers(0, (1 << bits) - 1)).map(
            lambda t: (t[1], (t[0] | (t[2] >> 6)) & ((1 << bits) - 1))
        ),
        max_size=25,
    )


@pytest.mark.parametrize("version", [4, 6])
@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_cidr_lookup_is_one_lookup_that_agrees_with_brute_force(version: int, data: st.DataObject) -> None:
    bits = 32 if version == 4 else 128
    chosen = data.draw(cidrs_strategy(version))
    parsed = ParsedFeed()
    cidrs: list[tuple[int, int, int]] = []
    for plen, address in chosen:
        network_type = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
        network = network_type((address, plen), strict=False)
        indicator = classify(str(network), "ip")
        assert indicator is not None and indicator.cidr is not None
        add_row(parsed, indicator, ())
        cidrs.append(indicator.cidr)
    index = FeedIndex(b"".join(build(parsed, FEED, SETTINGS)))
    probes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=20))
    for _, plen, net in cidrs:  # both ends of every network, and just outside them
        start = net << (bits - plen)
        end = start + (1 << (bits - plen)) - 1
        probes += [start, end, max(0, start - 1), min((1 << bits) - 1, end + 1)]
    for number in probes:
        assert index.cidr_rows(version, number) == cidr_oracle(cidrs, version, number), (number, cidrs)


def test_segments_merge_neighbours_with_the_same_cover() -> None:
    # Two adjacent /25 of one /24, both inside a /8: three segments would be two with different covers.
    starts, ends, offsets, refs, plens = segments([(0, 256, 24, 0), (0, 128, 25, 1), (0, 1 << 24, 8, 2)])
    assert starts == [0, 128, 256]
    assert ends == [127, 255, (1 << 24) - 1]
    assert [refs[offsets[i] : offsets[i + 1]] for i in range(3)] == [[1, 0, 2], [0, 2], [2]]
    assert [plens[offsets[i] : offsets[i + 1]] for i in range(3)] == [[25, 24, 8], [24, 8], [8]]
    assert segments([(0, 10, 30, 0), (10, 20, 30, 1)])[0] == [0, 10]  # different covers stay apart


def test_string_columns_with_separators_inside_round_trip() -> None:
    parsed = ParsedFeed()
    for raw in ("a.example", "b.example"):
        indicator = classify(raw, "domain")
        assert indicator is not None
        add_row(parsed, indicator, ())
    parsed.raws[0] = "raw\x1ewith separator"  # as a hostile feed could write it
    parsed.values[1] = "b.example"
    index = FeedIndex(b"".join(build(parsed, FEED, SETTINGS)))
    assert [index.record(i).raw for i in range(2)] == ["raw\x1ewith separator", "b.example"]
    assert index.rows_of(key_of(Kind.DOMAIN, "b.example")) == [1]


@pytest.mark.parametrize("column", [list, bytes, bytearray, lambda flags: np.array(flags, np.uint8)])
def test_subdomains_column_as_bools_or_bytes(column: object) -> None:
    parsed = parsed_of(("domain", "*.a.example", ()), ("domain", "b.example", ()))
    parsed.subdomains = column([True, False])  # type: ignore[operator]
    index = FeedIndex(b"".join(build(parsed, FEED, SETTINGS)))
    assert [index.record(i).subdomains for i in range(2)] == [True, False]


def test_refused_and_dropped_snapshots_leave_no_descriptor_open(tmp_path: Path) -> None:
    path = write(tmp_path)
    before = len(os.listdir("/proc/self/fd"))
    index = read_checked(str(path))
    assert len(os.listdir("/proc/self/fd")) > before  # records are read from the file (and mmap keeps a dup)
    del index
    data = bytearray(path.read_bytes())
    struct.pack_into("=Q", data, struct.calcsize("=8sIIII16s32s32s"), 10**6)  # a structure that lies...
    path.write_bytes(data)
    for _ in range(3):
        assert reason_of(path, None, None) in ("checksum", "corrupt")
    assert len(os.listdir("/proc/self/fd")) == before


def test_cidrs_nested_too_deeply_are_refused_before_they_cost_memory() -> None:
    from threatgate.errors import FeedError
    from threatgate.node.feedparse import ParsedFeed

    parsed = ParsedFeed()
    nested = [
        f"6/{plen}/{0x20010DB8 >> (32 - plen) if plen <= 32 else 0x20010DB8 << (plen - 32)}" for plen in range(8, 108)
    ]
    small = [f"6/127/{(0x20010DB8 << 95) + 2 * i}" for i in range(1000)]
    for value in nested + small:
        parsed.kinds.append(Kind.CIDR)
        parsed.values.append(value)
        parsed.raws.append(value)
        parsed.subdomains.append(False)
        parsed.contexts.append(())
    with pytest.raises(FeedError, match="CIDRs nested too deeply"):
        snapfile.build(parsed, bytes(32), bytes(32))
