"""Snapshots shared with worker processes by descriptor: snapfile.map_fd, to_memfd, in_memfd and SnapshotRef.

A worker receives each snapshot as an open descriptor (SCM_RIGHTS) plus a small picklable SnapshotRef,
and must then find exactly what the master finds.  The descriptors here really cross an AF_UNIX
socket (``socket.send_fds``), which duplicates them as it would into another process.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import ipaddress
import json
import mmap
import os
import pickle
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from threatgate.config.node import FeedSettings, load_node_config
from threatgate.errors import SnapshotInvalid
from threatgate.node import normalize, snapfile
from threatgate.node.engine import make_matcher
from threatgate.node.feedparse import ParsedFeed
from threatgate.node.feeds import FeedSnapshot, Kind, SnapshotRef, add_row, classify
from threatgate.node.matcher import MatchStats
from threatgate.node.snapfile import build, map_fd, to_memfd, write_atomic
from threatgate.node.snapshots import SnapshotDir
from threatgate.node.store import Candidate, IndicatorStore
from threatgate.node.suppliers import Supplier, supplier_snapshots
from threatgate.wire.framing import FramedEvent

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FEED = bytes(range(32))
SETTINGS = bytes(range(32, 64))

MIXED: list[dict[str, Any]] = [  # every kind, masks of each shape, nested and IPv6 CIDRs
    {"mask": "x.example/a/*", "t": "host-exact mask"},
    {"mask": "*.y.example/dl/*", "t": "subdomain mask"},
    {"mask": "z.example/*/b.php", "t": "star in path"},
    {"mask": "cdn*.w.example/p", "t": "star in host"},
    {"url": "http://u.example/path?q=1", "t": "exact url"},
    {"domain": "d.example", "t": "exact domain"},
    {"domain": "*.s.example", "t": "star domain"},
    {"ip": "10.1.2.3", "t": "exact ip"},
    {"ip": "10.0.0.0/8", "t": "/8"},
    {"ip": "10.1.0.0/16", "t": "/16 inside the /8"},
    {"ip": "172.16.5.0/24", "t": "/24"},
    {"ip": "2001:db8::/32", "t": "v6 /32"},
    {"ip": "2001:db8:0:1::5", "t": "v6 exact"},
    {"md5": "44D88612FEA8A8F36DE82E1278ABB02F", "t": "md5"},
    {"sha256": "a" * 64, "t": "sha256", "note": "пример"},
]


def parsed_of(*raws: str) -> ParsedFeed:
    parsed = ParsedFeed()
    for n, raw in enumerate(raws):
        indicator = classify(raw, "indicator")
        assert indicator is not None, raw
        add_row(parsed, indicator, (("n", str(n)),))
    return parsed


SAMPLE = parsed_of("http://evil.example/a", "192.0.2.1", "10.0.0.0/8", "2001:db8::/32", "*.s.example", "x.example/a/*")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def passed(fds: list[int]) -> list[int]:
    """``fds`` duplicated through an AF_UNIX socket, as the master sends them to a worker."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        socket.send_fds(left, [b"store"], fds)
        _, received, _, _ = socket.recv_fds(right, 64, len(fds))
    assert len(received) == len(fds)
    return received


@pytest.fixture
def snap_file(tmp_path: Path) -> Path:
    path = tmp_path / "s.tgsnap"
    write_atomic(str(path), build(SAMPLE, FEED, SETTINGS))
    return path


def reason_of(fd: int, feed: bytes | None = None) -> str:
    with pytest.raises(SnapshotInvalid) as info:
        map_fd(fd, feed)
    return info.value.reason


# -- map_fd ---------------------------------------------------------------------------------------


def test_map_fd_reads_what_read_checked_reads(snap_file: Path) -> None:
    by_path = snapfile.read_checked(str(snap_file), FEED, SETTINGS)
    fd = os.open(snap_file, os.O_RDONLY | os.O_CLOEXEC)
    index = map_fd(fd, FEED, SETTINGS)
    assert index.fd == fd and isinstance(index.buffer, mmap.mmap)
    assert [index.record(i) for i in range(len(index))] == [by_path.record(i) for i in range(len(by_path))]
    assert index.report == by_path.report and index.header == by_path.header
    assert [list(a) if not isinstance(a, int | tuple) else a for a in index.engine_view()] == [
        list(a) if not isinstance(a, int | tuple) else a for a in by_path.engine_view()
    ]


def test_map_fd_takes_the_descriptor_and_the_index_closes_it(snap_file: Path) -> None:
    before = open_fds()
    index = map_fd(os.open(snap_file, os.O_RDONLY | os.O_CLOEXEC))
    assert open_fds() > before
    del index
    gc.collect()
    assert open_fds() == before


def test_map_fd_does_not_read_the_checksum(snap_file: Path) -> None:
    # The master checked it (read_checked); a worker maps the same inode without reading it all again.
    data = bytearray(snap_file.read_bytes())
    data[snapfile._CHECKSUM_AT] ^= 1  # noqa: SLF001 - the stored checksum no longer matches the bytes
    snap_file.write_bytes(data)
    with pytest.raises(SnapshotInvalid, match="checksum"):
        snapfile.read_checked(str(snap_file))
    index = map_fd(os.open(snap_file, os.O_RDONLY | os.O_CLOEXEC))
    assert len(index) == len(SAMPLE.values)


def test_map_fd_refuses_what_is_not_a_snapshot_and_closes_the_descriptor(snap_file: Path, tmp_path: Path) -> None:
    original = snap_file.read_bytes()
    cases: list[tuple[bytes, str]] = [
        (b"", "truncated"),
        (original[:100], "truncated"),
        (original[: len(original) // 2], "truncated"),
        (b"NOTSNAP!" + original[8:], "magic"),
        (b"[]" * 200, "magic"),
    ]
    before = open_fds()
    for data, reason in cases:
        snap_file.write_bytes(data)
        assert reason_of(os.open(snap_file, os.O_RDONLY | os.O_CLOEXEC)) == reason, data[:16]
    snap_file.write_bytes(original)
    assert reason_of(os.open(snap_file, os.O_RDONLY | os.O_CLOEXEC), feed=bytes(32)) == "digest"
    corrupt = bytearray(original)
    struct.pack_into("=Q", corrupt, struct.calcsize("=8sIIII16s32s32s"), 10**6)  # the record count lies
    snap_file.write_bytes(corrupt)
    assert reason_of(os.open(snap_file, os.O_RDONLY | os.O_CLOEXEC)) == "corrupt"
    snap_file.write_bytes(original)
    assert reason_of(os.open(snap_file, os.O_WRONLY | os.O_CLOEXEC)) == "unreadable"  # not open for reading
    assert reason_of(os.open(tmp_path, os.O_RDONLY | os.O_CLOEXEC)) == "unreadable"  # a directory
    r, w = os.pipe()
    assert reason_of(r) == "unreadable"
    os.close(w)
    gc.collect()
    assert open_fds() == before  # every refused descriptor was closed


def test_map_fd_of_a_descriptor_that_is_not_open() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(SnapshotInvalid) as info:
        map_fd(r)
    assert info.value.reason == "unreadable" and f"descriptor {r}" in str(info.value)


# -- memfd ----------------------------------------------------------------------------------------


def test_to_memfd_is_sealed_and_close_on_exec() -> None:
    fd = to_memfd(build(SAMPLE, FEED, SETTINGS), "tg-test")
    try:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:tg-test")
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == snapfile.MEMFD_SEALS
        size = os.fstat(fd).st_size
        for attempt in (
            lambda: os.pwrite(fd, b"x", 0),
            lambda: os.ftruncate(fd, size // 2),
            lambda: os.ftruncate(fd, size * 2),
            lambda: mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE),
            lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0),  # F_SEAL_SEAL: no seal can be taken off or added
        ):
            with pytest.raises(PermissionError) as info:
                attempt()
            assert info.value.errno == errno.EPERM
        assert os.fstat(fd).st_size == size
    finally:
        os.close(fd)


def test_memfd_index_finds_what_the_in_memory_index_finds() -> None:
    in_memory = snapfile.in_memory(SAMPLE, FEED, SETTINGS)
    [fd] = passed([to_memfd([in_memory.buffer], "tg-test")])  # an in-memory index's buffer is one chunk
    shared = map_fd(fd, FEED, SETTINGS)
    direct = snapfile.in_memfd(SAMPLE, "tg-test", FEED, SETTINGS)
    for index in (shared, direct):
        assert index.fd is not None and bytes(index.buffer) == bytes(in_memory.buffer)
        assert [index.record(i) for i in range(len(index))] == [in_memory.record(i) for i in range(len(in_memory))]
        assert list(index.keys) == list(in_memory.keys)
        assert index.cidr_rows(4, 10 << 24 | 7) == in_memory.cidr_rows(4, 10 << 24 | 7) != []
        assert index.cidr_rows(6, 0x2001_0DB8 << 96) == in_memory.cidr_rows(6, 0x2001_0DB8 << 96) != []


# -- SnapshotRef and whole stores -----------------------------------------------------------------


def feed_snapshots(tmp_path: Path) -> tuple[dict[int, FeedSnapshot], Any]:
    """Every feed of examples/node.conf (JSON, CSV, STIX, MISP) plus a JSON feed of every kind and mask
    shape, mapped from a snapshot directory by path as the master maps them."""
    config = load_node_config(str(EXAMPLES / "node.conf"))
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(MIXED), encoding="utf-8")
    settings = [f for f in config.feeds.feeds if f.enabled]
    settings.append(FeedSettings(path=str(mixed), name="mixed.json", category="Mixed", format="json"))
    directory = SnapshotDir(str(tmp_path / "snapshots"))
    snapshots = {slot: directory.load(s) for slot, s in enumerate(settings)}
    assert {s.settings.format for s in snapshots.values()} >= {"json", "csv", "stix", "misp"}
    assert all(s.path and s.index.fd is not None for s in snapshots.values())
    return snapshots, config


def through_a_worker_channel(snapshots: dict[int, FeedSnapshot]) -> dict[int, FeedSnapshot]:
    """What a worker rebuilds: the pickled refs and the descriptors, sent as the master sends them."""
    slots = sorted(snapshots)
    message = pickle.dumps([(slot, snapshots[slot].ref()) for slot in slots])
    fds = passed([snapshots[slot].index.fd for slot in slots])  # type: ignore[misc]
    refs: list[tuple[int, SnapshotRef]] = pickle.loads(message)
    return {slot: ref.open(fd) for (slot, ref), fd in zip(refs, fds, strict=True)}


def queries(snapshots: dict[int, FeedSnapshot]) -> Iterator[tuple[str, str]]:
    """(lookup, value) that reach every record of every snapshot, and a few that reach none."""
    for snap in snapshots.values():
        for row in range(len(snap)):
            record = snap.index.record(row)
            if record.kind == Kind.HASH:
                yield "hash", record.value
            elif record.kind in (Kind.DOMAIN, Kind.DOMAIN_SUFFIX):
                yield "domain", record.value
                yield "domain", "sub." + record.value
            elif record.kind == Kind.IP:
                yield "ip", record.value
            elif record.kind == Kind.CIDR:
                version, plen, net = map(int, record.value.split("/"))
                bits = 32 if version == 4 else 128
                first = net << (bits - plen)
                address = ipaddress.IPv4Address(first + 1) if version == 4 else ipaddress.IPv6Address(first + 1)
                yield "ip", normalize.normalize_ip(str(address)) or ""
            else:  # URL or mask: a URL the mask covers
                yield "url", record.value.replace("*.", "a.").replace("*", "x")
    yield from (("url", "clean.example/x"), ("ip", "192.0.2.254"), ("domain", "clean.example"), ("hash", "0" * 32))


def found(store: IndicatorStore, lookup: str, value: str) -> list[tuple[Candidate, Any]]:
    out: list[Candidate] = []
    getattr(store, f"lookup_{lookup}")(value, out)
    return [(c, store.snapshots[c.slot].record(c.record_no)) for c in out]


def test_a_store_of_descriptors_finds_what_the_store_of_paths_finds(tmp_path: Path) -> None:
    snapshots, config = feed_snapshots(tmp_path)
    received = through_a_worker_channel(snapshots)
    for slot, snap in received.items():
        master = snapshots[slot]
        assert snap.index.fd not in (None, master.index.fd)  # its own descriptor of the same file
        assert (snap.settings, snap.identity, snap.path) == (master.settings, master.identity, master.path)
        assert snap.report == master.report and snap.header == master.header and len(snap) == len(master)
    by_path, by_fd = IndicatorStore(snapshots), IndicatorStore(received)
    hits = 0
    for lookup, value in queries(snapshots):
        expected = found(by_path, lookup, value)
        assert found(by_fd, lookup, value) == expected, (lookup, value)
        hits += bool(expected)
    assert hits > 40
    kinds = {c.kind for lookup, value in queries(snapshots) for c, _ in found(by_fd, lookup, value)}
    assert {Kind.CIDR, Kind.MASK, Kind.URL, Kind.HASH, Kind.IP, Kind.DOMAIN} <= kinds
    # The whole event path on both stores: the same lines for the example events, on each engine.
    events: list[FramedEvent] = [*(EXAMPLES / "events.txt").read_text(encoding="utf-8").splitlines()]
    for engine in ("compiled", "reference"):
        answers = []
        for store in (by_path, by_fd):
            stats = MatchStats()
            answers.append(make_matcher(config, store, engine).match(events, date="-", finished=True, stats=stats))
        assert answers[0] == answers[1] and stats.detections > 0, engine


def test_a_ref_refuses_a_descriptor_of_another_snapshot(tmp_path: Path) -> None:
    snapshots, _ = feed_snapshots(tmp_path)
    first, second = snapshots[0], snapshots[1]
    [fd] = passed([second.index.fd])  # type: ignore[list-item]
    with pytest.raises(SnapshotInvalid) as info:
        first.ref().open(fd)
    assert info.value.reason == "digest"


def test_shared_supplier_snapshots_find_what_in_memory_ones_find() -> None:
    supplier = Supplier(7, "ACME", "enabled", 90, 0, "")
    rows = [
        ("evil.example", json.dumps({"threat": "c2"}), json.dumps(["apt"]), 0),
        ("10.9.0.0/16", "{}", "[]", 0),
        ("http://x.example/a/*", "{}", "[]", 0),
        ("good.example", "{}", "[]", 1),  # marked false positive: the second snapshot
    ]
    plain = supplier_snapshots(supplier, rows)
    shared = supplier_snapshots(supplier, rows, shared=True)
    assert [s.index.fd is None for s in plain] == [True, True]
    assert all(s.index.fd is not None for s in shared)
    received = through_a_worker_channel(dict(enumerate(shared)))
    stores = [IndicatorStore(dict(enumerate(s))) for s in (plain, shared, list(received.values()))]
    for lookup, value in (
        ("domain", "evil.example"),
        ("domain", "good.example"),
        ("ip", "10.9.3.4"),
        ("url", "x.example/a/b"),
        ("url", "x.example/b"),
    ):
        expected = found(stores[0], lookup, value)
        assert all(found(store, lookup, value) == expected for store in stores[1:]), (lookup, value)
    assert found(stores[2], "domain", "evil.example")[0][1].context == (
        ("threat", "c2"),
        ("tags", "apt"),
        ("supplier", "ACME"),
    )
