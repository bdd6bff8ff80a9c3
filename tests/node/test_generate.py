"""threatgate.node.generate: deterministic synthetic feeds whose events detect exactly as expected.txt says."""

from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path

import pytest

from threatgate.config.node import load_node_config
from threatgate.node.feeds import FeedSnapshot, load_feed
from threatgate.node.generate import generate
from threatgate.node.matcher import Matcher
from threatgate.node.store import IndicatorStore
from threatgate.wire.framing import FramedEvent

FILES = ("urls.json", "domains.json", "ips.csv", "hashes.csv", "events.txt", "expected.txt", "node.conf")


def _gen(out: Path, **overrides: object) -> str:
    args: dict[str, object] = {"indicators": 20_000, "events": 2_000, "hit_rate": 0.25, "seed": 7, "port": 19999}
    args.update(overrides)
    return generate(str(out), **args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("gen")
    return out, _gen(out)


def test_summary_and_files(generated: tuple[Path, str]) -> None:
    out, summary = generated
    assert summary.startswith(
        "wrote 20000 indicators (urls 5000, domains 3000, ips 3000, hashes 9000) and 2000 events ("
    )
    assert summary.endswith(f"hits) to {out}")
    assert sorted(os.listdir(out)) == sorted(FILES)
    hits = int(re.search(r"\((\d+) hits\)", summary).group(1))  # type: ignore[union-attr]
    assert 350 <= hits <= 650  # hit_rate 0.25 of 2000
    assert len((out / "expected.txt").read_text().splitlines()) == hits


def test_same_arguments_give_identical_files(generated: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = generated
    _gen(tmp_path)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_other_seed_gives_other_files(generated: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = generated
    _gen(tmp_path, seed=8)
    assert (tmp_path / "urls.json").read_bytes() != (out / "urls.json").read_bytes()
    assert (tmp_path / "events.txt").read_bytes() != (out / "events.txt").read_bytes()


def test_feed_shapes(generated: tuple[Path, str]) -> None:
    out, _ = generated
    for name in ("urls.json", "domains.json"):
        lines = (out / name).read_text().splitlines()
        assert lines[0] == "[" and lines[-1] == "]"
        assert all(line.startswith("{") for line in lines[1:-1])  # one record per line
        records = json.loads((out / name).read_text())
        assert all(1 <= len(r) - 1 <= 2 for r in records)  # indicator plus 1-2 context fields
    urls = json.loads((out / "urls.json").read_text())
    assert sum("mask" in r for r in urls) == 250
    domains = json.loads((out / "domains.json").read_text())
    assert sum(r["domain"].startswith("*.") for r in domains) == 300
    ips = (out / "ips.csv").read_text().splitlines()
    assert ips[0] == "ip,threat,first_seen" and sum("/" in line for line in ips) == 300
    assert len({line.split(",")[0] for line in ips[1:]}) == 3000
    hashes = [line.split(",")[0] for line in (out / "hashes.csv").read_text().splitlines()[1:]]
    assert collections.Counter(len(h) for h in hashes) == {32: 4500, 40: 2250, 64: 2250}
    events = (out / "events.txt").read_text().splitlines()
    assert [int(e.split(" ", 1)[0]) for e in events] == list(range(1, 2001))
    assert all(150 <= len(e) <= 300 for e in events)
    urls_seen = [re.search(r"url=(\S+)", e).group(1) for e in events]  # type: ignore[union-attr]
    assert len(set(urls_seen)) > 0.8 * len(urls_seen)


def test_events_detect_exactly_what_expected_lists(generated: tuple[Path, str]) -> None:
    out, _ = generated
    config = load_node_config(str(out / "node.conf"))
    assert config.input.listen.port == 19999
    assert [f.category for f in config.feeds.feeds] == [
        "Malicious_URL",
        "Botnet_Domain",
        "IP_Reputation",
        "Malicious_Hash",
    ]
    snapshots: dict[int, FeedSnapshot] = {}
    for slot, settings in enumerate(config.feeds.feeds):
        snap = load_feed(settings)
        assert snap.report.malformed == 0, snap.report.examples
        snapshots[slot] = snap
    store = IndicatorStore(snapshots)
    assert len(store) == 20_000
    matcher = Matcher(config, store)
    events: list[FramedEvent] = list((out / "events.txt").read_text().splitlines())
    lines: list[str] = []
    for start in range(0, len(events), 256):
        lines += matcher.match(events[start : start + 256], date="Jan  1 00:00:00", finished=True)
    detections: collections.Counter[tuple[str, str]] = collections.Counter()
    finished: collections.Counter[str] = collections.Counter()
    for line in lines:
        number, rest = line.rstrip("\n").split(" ", 1)
        if rest == "LookupFinished":
            finished[number] += 1
        else:
            detections[(number, rest.split(" ", 1)[0].removeprefix("category="))] += 1
    expected = collections.Counter(tuple(line.split(" ")) for line in (out / "expected.txt").read_text().splitlines())
    assert detections == expected
    assert finished == {str(n): 1 for n in range(1, len(events) + 1)}
    assert set(c for _, c in expected) == {"Malicious_URL", "Botnet_Domain", "IP_Reputation", "Malicious_Hash"}


def test_every_kind_of_hit_detects(tmp_path: Path) -> None:
    """All events hit: URL masks, *. domains and CIDR members are among them and all detect."""
    _gen(tmp_path, indicators=2_000, events=1_500, hit_rate=1.0, seed=3)
    config = load_node_config(str(tmp_path / "node.conf"))
    store = IndicatorStore({slot: load_feed(s) for slot, s in enumerate(config.feeds.feeds)})
    events: list[FramedEvent] = list((tmp_path / "events.txt").read_text().splitlines())
    lines = Matcher(config, store).match(events, date="", finished=True)
    matched = [m.group(1) for line in lines if (m := re.search(r"matchedIndicator=(\S+)", line))]
    assert len(matched) == 1_500
    assert any(v.startswith("*.cdn") or v.startswith("host") for v in matched)  # URL masks
    assert any(v.startswith("*.") and "/" not in v for v in matched)  # sub-domain records
    assert any(re.fullmatch(r"[\d.]+/\d+", v) for v in matched)  # CIDR members


def test_tiny_and_empty(tmp_path: Path) -> None:
    summary = _gen(tmp_path, indicators=1, events=0)
    assert summary == f"wrote 1 indicators (urls 0, domains 0, ips 0, hashes 1) and 0 events (0 hits) to {tmp_path}"
    assert (tmp_path / "urls.json").read_text() == "[\n]\n"
    assert (tmp_path / "events.txt").read_text() == ""
    config = load_node_config(str(tmp_path / "node.conf"))
    assert len(IndicatorStore({i: load_feed(s) for i, s in enumerate(config.feeds.feeds)})) == 1


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        _gen(tmp_path, hit_rate=1.5)
