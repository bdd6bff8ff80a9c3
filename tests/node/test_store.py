"""Tests for threatgate.node.store: candidate lookups over loaded feeds (and confirmation through Matcher)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from threatgate.config.node import FeedSettings, NodeConfig, RuleType, load_node_config
from threatgate.node import normalize
from threatgate.node.feeds import FeedSnapshot, Kind, load_feed
from threatgate.node.matcher import Matcher
from threatgate.node.store import Candidate, IndicatorStore, merged

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

RECORDS: list[dict[str, Any]] = [
    {"mask": "x.example/a/*", "t": "host-exact mask"},  # 0
    {"mask": "*.y.example/dl/*", "t": "subdomain mask"},  # 1
    {"mask": "z.example/*/b.php", "t": "star in path"},  # 2
    {"mask": "cdn*.w.example/p", "t": "star in host"},  # 3
    {"url": "http://u.example/path?q=1", "t": "exact url"},  # 4
    {"domain": "d.example", "t": "exact domain"},  # 5
    {"domain": "*.s.example", "t": "star domain"},  # 6
    {"domain": "t.example", "include_subdomains": True, "t": "flag domain"},  # 7
    {"ip": "10.1.2.3", "t": "exact ip"},  # 8
    {"ip": "10.0.0.0/8", "t": "/8"},  # 9
    {"ip": "172.16.5.0/24", "t": "/24"},  # 10
    {"ip": "192.168.1.0/30", "t": "/30"},  # 11
    {"ip": "2001:db8::/32", "t": "v6 /32"},  # 12
    {"ip": "2001:db8:0:1::5", "t": "v6 exact"},  # 13
    {"md5": "44D88612FEA8A8F36DE82E1278ABB02F", "t": "md5"},  # 14
    {"sha256": "a" * 64, "t": "sha256"},  # 15
    {"url": "http://u.example/other", "t": "url on a domain-listed host"},  # 16
]
SLOT = 3


def feed_settings(path: Path, **kwargs: Any) -> FeedSettings:
    return FeedSettings(
        path=str(path), name=path.name, category=kwargs.pop("category", "Test"), format="json", **kwargs
    )


def write_feed(path: Path, records: list[dict[str, Any]], **kwargs: Any) -> FeedSnapshot:
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return load_feed(feed_settings(path, **kwargs))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> IndicatorStore:
    snap = write_feed(tmp_path_factory.mktemp("store") / "all.json", RECORDS)
    assert snap.report.malformed == 0
    return IndicatorStore({SLOT: snap})


def refs(out: list[Candidate]) -> list[tuple[int, int, str]]:
    return [(c.slot, c.record_no, Kind.NAMES[c.kind]) for c in out]


def url_refs(store: IndicatorStore, url: str) -> list[tuple[int, int, str]]:
    value = normalize.normalize_url(url)
    assert value is not None
    out: list[Candidate] = []
    store.lookup_url(value, out)
    return refs(out)


def domain_refs(store: IndicatorStore, domain: str) -> list[tuple[int, int, str]]:
    out: list[Candidate] = []
    store.lookup_domain(domain, out)
    return refs(out)


def ip_refs(store: IndicatorStore, ip: str) -> list[tuple[int, int, str]]:
    value = normalize.normalize_ip(ip)
    assert value is not None
    out: list[Candidate] = []
    store.lookup_ip(value, out)
    return refs(out)


def test_IndicatorStore_sizes(store: IndicatorStore) -> None:
    assert len(store) == len(RECORDS)
    assert store.mask_count == 4
    assert store.nbytes > 0
    assert "masks=4" in repr(store)


# -- URLs and masks -------------------------------------------------------------------------------


def test_IndicatorStore_lookup_url_exact(store: IndicatorStore) -> None:
    assert url_refs(store, "http://u.example/path?q=1") == [(SLOT, 4, "url")]
    assert url_refs(store, "HTTP://WWW.U.Example:80/./path?q=1") == [(SLOT, 4, "url")]
    assert url_refs(store, "http://u.example/other") == [(SLOT, 16, "url")]


def test_IndicatorStore_lookup_url_exact_is_not_prefix(store: IndicatorStore) -> None:
    assert url_refs(store, "http://u.example/path") == []
    assert url_refs(store, "http://u.example/path?q=12") == []


def test_IndicatorStore_lookup_url_host_exact_mask(store: IndicatorStore) -> None:
    assert url_refs(store, "http://x.example/a/b") == [(SLOT, 0, "mask")]
    assert url_refs(store, "http://x.example/a/index.html?x=1") == [(SLOT, 0, "mask")]
    assert url_refs(store, "http://sub.x.example/a/b") == []  # no "*." in the mask: host must be exact
    assert url_refs(store, "http://x.example/b/a/") == []


def test_IndicatorStore_lookup_url_subdomain_mask(store: IndicatorStore) -> None:
    assert url_refs(store, "http://y.example/dl/f.exe") == [(SLOT, 1, "mask")]
    assert url_refs(store, "http://q.y.example/dl/f.exe") == [(SLOT, 1, "mask")]
    assert url_refs(store, "https://a.b.y.example/dl/x/y") == [(SLOT, 1, "mask")]
    assert url_refs(store, "http://q.y.example/other") == []
    assert url_refs(store, "http://yy.example/dl/f") == []


def test_IndicatorStore_lookup_url_star_in_path(store: IndicatorStore) -> None:
    assert url_refs(store, "http://z.example/dir/b.php") == [(SLOT, 2, "mask")]
    assert url_refs(store, "http://z.example/a/b/c/b.php") == [(SLOT, 2, "mask")]
    assert url_refs(store, "http://z.example/b.php") == []
    assert url_refs(store, "http://z.example/dir/b.php5") == []


def test_IndicatorStore_lookup_url_star_in_host(store: IndicatorStore) -> None:
    assert url_refs(store, "http://cdn7.w.example/p") == [(SLOT, 3, "mask")]
    assert url_refs(store, "http://cdn.w.example/p") == [(SLOT, 3, "mask")]
    assert url_refs(store, "http://img.w.example/p") == []


def test_IndicatorStore_lookup_url_probes_host_as_domain(store: IndicatorStore) -> None:
    assert url_refs(store, "http://d.example/anything") == [(SLOT, 5, "domain")]
    assert url_refs(store, "http://a.s.example/x") == [(SLOT, 6, "domain_suffix")]


def test_IndicatorStore_lookup_url_probes_host_as_ip(store: IndicatorStore) -> None:
    assert url_refs(store, "http://10.1.2.3/x") == [(SLOT, 8, "ip"), (SLOT, 9, "cidr")]
    assert url_refs(store, "http://[2001:db8::9]/x") == [(SLOT, 12, "cidr")]


def test_IndicatorStore_lookup_url_miss(store: IndicatorStore) -> None:
    assert url_refs(store, "http://clean.example/index.html") == []


# -- domains --------------------------------------------------------------------------------------


def test_IndicatorStore_lookup_domain_exact_record_does_not_cover_subdomains(store: IndicatorStore) -> None:
    assert domain_refs(store, "d.example") == [(SLOT, 5, "domain")]
    assert domain_refs(store, "a.d.example") == []


@pytest.mark.parametrize("domain", ["s.example", "a.s.example", "a.b.c.s.example"])
def test_IndicatorStore_lookup_domain_star_record_covers_domain_and_subdomains(
    store: IndicatorStore, domain: str
) -> None:
    assert domain_refs(store, domain) == [(SLOT, 6, "domain_suffix")]


@pytest.mark.parametrize("domain", ["t.example", "x.t.example"])
def test_IndicatorStore_lookup_domain_include_subdomains_flag(store: IndicatorStore, domain: str) -> None:
    assert domain_refs(store, domain) == [(SLOT, 7, "domain_suffix")]


@pytest.mark.parametrize("domain", ["example", "xs.example", "s.example.com", "ds.example", "clean.example"])
def test_IndicatorStore_lookup_domain_miss(store: IndicatorStore, domain: str) -> None:
    assert domain_refs(store, domain) == []


# -- IPs and CIDRs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("10.1.2.3", [(SLOT, 8, "ip"), (SLOT, 9, "cidr")]),
        ("10.255.255.255", [(SLOT, 9, "cidr")]),
        ("10.0.0.0", [(SLOT, 9, "cidr")]),
        ("11.0.0.0", []),
        ("172.16.5.0", [(SLOT, 10, "cidr")]),
        ("172.16.5.255", [(SLOT, 10, "cidr")]),
        ("172.16.6.0", []),
        ("192.168.1.0", [(SLOT, 11, "cidr")]),
        ("192.168.1.3", [(SLOT, 11, "cidr")]),
        ("192.168.1.4", []),
        ("2001:db8::1", [(SLOT, 12, "cidr")]),
        ("2001:db8:0:1::5", [(SLOT, 13, "ip"), (SLOT, 12, "cidr")]),
        ("2001:db9::1", []),
        ("8.8.8.8", []),
    ],
)
def test_IndicatorStore_lookup_ip_exact_and_cidr(store: IndicatorStore, ip: str, expected: list[Any]) -> None:
    assert ip_refs(store, ip) == expected


def test_IndicatorStore_lookup_ip_longest_prefix_first(tmp_path: Path) -> None:
    snap = write_feed(tmp_path / "n.json", [{"ip": "10.0.0.0/8"}, {"ip": "10.1.0.0/16"}, {"ip": "10.1.2.0/24"}])
    store = IndicatorStore({0: snap})
    assert ip_refs(store, "10.1.2.3") == [(0, 2, "cidr"), (0, 1, "cidr"), (0, 0, "cidr")]
    assert ip_refs(store, "10.1.3.3") == [(0, 1, "cidr"), (0, 0, "cidr")]


# -- hashes ---------------------------------------------------------------------------------------


def test_IndicatorStore_lookup_hash(store: IndicatorStore) -> None:
    out: list[Candidate] = []
    store.lookup_hash("44d88612fea8a8f36de82e1278abb02f", out)
    store.lookup_hash("a" * 64, out)
    store.lookup_hash("b" * 32, out)
    assert refs(out) == [(SLOT, 14, "hash"), (SLOT, 15, "hash")]
    assert out[0].probe == "44d88612fea8a8f36de82e1278abb02f"


def test_IndicatorStore_kinds_are_separate_namespaces(store: IndicatorStore) -> None:
    out: list[Candidate] = []
    store.lookup_hash("d.example", out)
    store.lookup_domain("10.1.2.3", out)
    assert out == []


# -- several feeds, empty stores, merged() --------------------------------------------------------


def test_IndicatorStore_empty_store_answers_nothing() -> None:
    store = IndicatorStore()
    out: list[Candidate] = []
    store.lookup_url("evil.example/a", out)
    store.lookup_ip("10.0.0.1", out)
    store.lookup_hash("a" * 32, out)
    assert out == []
    assert len(store) == 0


def test_IndicatorStore_same_indicator_in_two_slots(tmp_path: Path) -> None:
    a = write_feed(tmp_path / "a.json", [{"ip": "10.0.0.1"}, {"domain": "evil.example"}])
    b = write_feed(tmp_path / "b.json", [{"domain": "evil.example"}])
    store = IndicatorStore({1: a, 7: b})
    assert sorted(domain_refs(store, "evil.example")) == [(1, 1, "domain"), (7, 0, "domain")]


def test_IndicatorStore_merged_replaces_and_removes_slots(tmp_path: Path) -> None:
    a = write_feed(tmp_path / "a.json", [{"domain": "a.example"}])
    b = write_feed(tmp_path / "b.json", [{"domain": "b.example"}])
    b2 = write_feed(tmp_path / "b2.json", [{"domain": "b2.example"}])
    base = IndicatorStore({0: a, 1: b})
    new = merged(base, [(1, b2)])
    assert domain_refs(new, "b.example") == []
    assert domain_refs(new, "b2.example") == [(1, 0, "domain")]
    assert domain_refs(new, "a.example") == [(0, 0, "domain")]
    assert domain_refs(base, "b.example") == [(1, 0, "domain")]  # the old store is untouched
    removed = merged(new, [(0, None)])
    assert domain_refs(removed, "a.example") == []
    assert set(removed.snapshots) == {1}
    assert domain_refs(merged(None, [(5, a)]), "a.example") == [(5, 0, "domain")]


def test_IndicatorStore_many_keys_no_false_candidates(tmp_path: Path) -> None:
    feed = [{"ip": f"10.{i // 256}.{i % 256}.1"} for i in range(3000)]
    store = IndicatorStore({0: write_feed(tmp_path / "many.json", feed)})
    assert ip_refs(store, "10.5.7.1") == [(0, 5 * 256 + 7, "ip")]
    misses = sum(len(ip_refs(store, f"11.{i // 256}.{i % 256}.1")) for i in range(3000))
    assert misses == 0


# -- confirmation through Matcher: no false hit when the record no longer holds the indicator -----


@pytest.fixture(scope="module")
def config() -> NodeConfig:
    return load_node_config(str(EXAMPLES / "node.conf"))


def damage_record(snap: FeedSnapshot, old: bytes, new: bytes) -> None:
    """Overwrite the first ``old`` of the snapshot's bytes (the stored normalised value comes first).

    The store then holds a key whose record reads back as another value: exactly what a 64-bit key
    collision looks like to the matcher, which must confirm every candidate against its record.
    """
    assert len(old) == len(new)
    buffer = snap.index.buffer
    assert isinstance(buffer, bytearray)  # an in-memory snapshot
    at = buffer.index(old, 256)  # past the header and section table
    buffer[at : at + len(old)] = new


def rewrite_in_place(path: Path, old: bytes, new: bytes) -> None:
    """Overwrite bytes of the same file (same inode, same length), as a careless in-place edit would."""
    assert len(old) == len(new)
    data = path.read_bytes()
    at = data.index(old)
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(new)


def test_Matcher_lookup_confirms_url_record(tmp_path: Path, config: NodeConfig) -> None:
    snap = write_feed(tmp_path / "u.json", [{"url": "http://evil.example/a", "threat": "X"}])
    hits = Matcher(config, IndicatorStore({0: snap})).lookup(RuleType.URL, "http://EVIL.example/a")
    assert [(h.indicator.raw, h.context) for h in hits] == [("http://evil.example/a", (("threat", "X"),))]


def test_Matcher_lookup_record_read_back_as_another_value_is_no_hit(tmp_path: Path, config: NodeConfig) -> None:
    # The store holds the key of "evil.example/a" (a candidate, exactly like a 64-bit collision), but
    # the record read back holds another URL: the matcher must not report it.
    path = tmp_path / "u.json"
    snap = write_feed(path, [{"url": "http://evil.example/a", "threat": "X"}])
    store = IndicatorStore({0: snap})
    out: list[Candidate] = []
    store.lookup_url("evil.example/a", out)
    assert refs(out) == [(0, 0, "url")]
    damage_record(snap, b"evil.example/a", b"good.example/a")
    assert Matcher(config, store).lookup(RuleType.URL, "http://evil.example/a") == []


def test_Matcher_lookup_hash_record_read_back_as_another_value_is_no_hit(tmp_path: Path, config: NodeConfig) -> None:
    path = tmp_path / "h.json"
    snap = write_feed(path, [{"md5": "44d88612fea8a8f36de82e1278abb02f"}])
    damage_record(snap, b"44d88612", b"00000000")
    assert Matcher(config, IndicatorStore({0: snap})).lookup(RuleType.MD5, "44d88612fea8a8f36de82e1278abb02f") == []


def test_Matcher_lookup_cidr_record_read_back_as_another_value_is_no_hit(tmp_path: Path, config: NodeConfig) -> None:
    path = tmp_path / "c.json"
    snap = write_feed(path, [{"ip": "10.0.0.0/8"}])
    damage_record(snap, b"4/8/10", b"4/8/11")
    assert Matcher(config, IndicatorStore({0: snap})).lookup(RuleType.IP, "10.1.2.3") == []


def test_Matcher_lookup_record_read_back_damaged_is_no_hit(tmp_path: Path, config: NodeConfig) -> None:
    path = tmp_path / "u.json"
    snap = write_feed(path, [{"url": "http://evil.example/a"}])
    damage_record(snap, b"evil.example/a", b"\xffvil.example/a")
    assert Matcher(config, IndicatorStore({0: snap})).lookup(RuleType.URL, "http://evil.example/a") == []


def test_Matcher_lookup_file_rewritten_in_place_still_reads_loaded_version(tmp_path: Path, config: NodeConfig) -> None:
    path = tmp_path / "u.json"
    snap = write_feed(path, [{"url": "http://evil.example/a", "threat": "old"}])
    rewrite_in_place(path, b"http://evil.example/a", b"http://good.example/a")  # cp, curl -o, >: same inode
    hits = Matcher(config, IndicatorStore({0: snap})).lookup(RuleType.URL, "http://evil.example/a")
    assert [h.context for h in hits] == [(("threat", "old"),)]


def test_Matcher_lookup_file_replaced_by_rename_still_reads_loaded_version(tmp_path: Path, config: NodeConfig) -> None:
    path = tmp_path / "u.json"
    snap = write_feed(path, [{"url": "http://evil.example/a", "threat": "old"}])
    replacement = tmp_path / "new.json"
    replacement.write_text(json.dumps([{"url": "http://other.example/zzzzzzzzzzzzzz"}]))
    replacement.replace(path)  # the atomic way
    hits = Matcher(config, IndicatorStore({0: snap})).lookup(RuleType.URL, "http://evil.example/a")
    assert [h.context for h in hits] == [(("threat", "old"),)]


def test_Matcher_lookup_mask_record_read_back_as_another_mask_is_no_hit(tmp_path: Path, config: NodeConfig) -> None:
    # A mask record is a candidate for every URL under its host; when the record read back is a mask
    # that does not match the URL, the hit must not be confirmed.
    path = tmp_path / "m.json"
    snap = write_feed(path, [{"mask": "evil.example/payload/*", "threat": "X"}])
    store = IndicatorStore({0: snap})
    out: list[Candidate] = []
    store.lookup_url("evil.example/payload/x.js", out)
    assert refs(out) == [(0, 0, "mask")]
    damage_record(snap, b"evil.example/payload/*", b"good.example/payload/*")
    assert Matcher(config, store).lookup(RuleType.URL, "http://evil.example/payload/x.js") == []


def test_a_record_that_cannot_be_read_back_is_counted(tmp_path: Path, config: NodeConfig) -> None:
    """Damaged snapshot bytes (a disk error after the check) lose the detection: never silently, it is counted."""
    snap = write_feed(tmp_path / "u.json", [{"url": "http://evil.example/a"}])
    assert snap.read_failures == 0
    damage_record(snap, b"evil.example/a", b"\xffvil.example/a")
    assert Matcher(config, IndicatorStore({0: snap})).lookup(RuleType.URL, "http://evil.example/a") == []
    assert snap.read_failures == 1


def test_a_record_the_disk_cannot_read_is_counted_and_tried_again(tmp_path: Path, config: NodeConfig) -> None:
    """An I/O error under a mapped snapshot (pread fails) loses that detection, counted; the next event tries again."""
    from threatgate.node.snapshots import SnapshotDir

    path = tmp_path / "u.json"
    path.write_text(json.dumps([{"url": "http://evil.example/a"}]), encoding="utf-8")
    settings = FeedSettings(path=str(path), name="u.json", category="C", format="json")
    snap = SnapshotDir(str(tmp_path / "snaps")).load(settings)
    matcher = Matcher(config, IndicatorStore({0: snap}))
    good_fd = snap.index._fd  # noqa: SLF001 - the descriptor records are read from
    snap.index._fd = os.open(tmp_path, os.O_RDONLY)  # noqa: SLF001 - a directory: pread fails (EISDIR)
    assert matcher.lookup(RuleType.URL, "http://evil.example/a") == []
    assert snap.read_failures == 1
    os.close(snap.index._fd)  # noqa: SLF001
    snap.index._fd = good_fd  # noqa: SLF001 - the disk is back
    assert len(matcher.lookup(RuleType.URL, "http://evil.example/a")) == 1


def test_a_mask_record_the_disk_cannot_read_is_counted(tmp_path: Path, config: NodeConfig) -> None:
    from threatgate.node.snapshots import SnapshotDir

    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"mask": "evil.example/payload/*"}]), encoding="utf-8")
    settings = FeedSettings(path=str(path), name="m.json", category="C", format="json")
    snap = SnapshotDir(str(tmp_path / "snaps")).load(settings)
    store = IndicatorStore({0: snap})
    snap.index._fd = os.open(tmp_path, os.O_RDONLY)  # noqa: SLF001 - a directory: pread fails (EISDIR)
    snap.index._masks.clear()  # noqa: SLF001 - nothing parsed yet: the mask is read from the file
    out: list[Candidate] = []
    store.lookup_url("evil.example/payload/x.js", out)
    assert out == [] and snap.read_failures == 1


async def test_the_node_counts_and_logs_records_it_could_not_read_back(
    tmp_path: Path, config: NodeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    from threatgate.node.service import NodeService

    node = NodeService(config)
    snap = write_feed(tmp_path / "u.json", [{"url": "http://evil.example/a"}])
    node._snapshots = {0: snap}  # noqa: SLF001 - the loaded versions, as reload_feeds leaves them
    damage_record(snap, b"evil.example/a", b"\xffvil.example/a")
    for _ in range(2):
        assert Matcher(config, IndicatorStore({0: snap})).lookup(RuleType.URL, "http://evil.example/a") == []
    with caplog.at_level(logging.ERROR, logger="threatgate.node"):
        node._account_read_failures()  # noqa: SLF001 - what the watch loop runs every second
        node._account_read_failures()  # noqa: SLF001 - nothing new: nothing counted twice
    assert node.stats.feed_read_failures == {snap.name: 2}
    assert "2 record(s) could not be read from the loaded version's snapshot" in caplog.text


def test_IndicatorStore_candidates_by_probe_then_slot_then_record(tmp_path: Path) -> None:
    a = write_feed(
        tmp_path / "a.json",
        [{"ip": "10.0.0.0/8"}, {"url": "http://x.example/p"}, {"ip": "10.1.0.0/16"}, {"url": "http://x.example/p"}],
    )
    b = write_feed(tmp_path / "b.json", [{"ip": "10.1.2.0/24"}, {"url": "http://x.example/p"}, {"ip": "10.0.0.0/8"}])
    store = IndicatorStore({7: b, 2: a})  # slot order, not insertion order
    assert url_refs(store, "http://x.example/p") == [(2, 1, "url"), (2, 3, "url"), (7, 1, "url")]
    # Most specific first across feeds; equal prefixes by slot, then record.
    assert ip_refs(store, "10.1.2.3") == [(7, 0, "cidr"), (2, 2, "cidr"), (2, 0, "cidr"), (7, 2, "cidr")]
    assert ip_refs(store, "10.9.9.9") == [(2, 0, "cidr"), (7, 2, "cidr")]
    assert ip_refs(store, "11.0.0.1") == []
