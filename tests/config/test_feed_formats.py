"""Tests for the format attribute of <Feed> (json, csv, stix, misp) and loading such feeds from a config."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from threatgate.config.node import NodeConfig, load_node_config
from threatgate.errors import ConfigError, FeedError
from threatgate.node.feeds import load_feed
from threatgate.node.matcher import Matcher
from threatgate.node.store import IndicatorStore

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DATE = "Oct 11 22:14:15"


def config_with_feeds(tmp_path: Path, feeds: str) -> Path:
    """The example config with its <Feed> lines replaced by ``feeds``, next to a copy of the example feeds."""
    if not (tmp_path / "feeds").exists():
        shutil.copytree(EXAMPLES / "feeds", tmp_path / "feeds")
    text = (EXAMPLES / "node.conf").read_text(encoding="utf-8")
    text, n = re.subn(r"(<Feeds[^>]*>).*?(</Feeds>)", lambda m: m.group(1) + feeds + m.group(2), text, flags=re.S)
    assert n == 1
    path = tmp_path / "node.conf"
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, feeds: str) -> NodeConfig:
    return load_node_config(str(config_with_feeds(tmp_path, feeds)))


def error_for(tmp_path: Path, feeds: str) -> ConfigError:
    path = config_with_feeds(tmp_path, feeds)
    with pytest.raises(ConfigError) as info:
        load_node_config(str(path))
    err = info.value
    assert err.element == "Feed"
    assert "<Feed" in path.read_text(encoding="utf-8").splitlines()[err.line - 1]
    return err


STIX_FEED = '<Feed filename="feeds/stix_bundle.json" format="stix" confidence="90" category="STIX_Intel"/>'
MISP_FEED = '<Feed filename="feeds/misp" format="misp" confidence="80" category="MISP_Intel"/>'


def test_feed_format_stix_and_misp_load(tmp_path: Path) -> None:
    config = load(tmp_path, STIX_FEED + MISP_FEED)
    stix, misp = config.feeds.feeds
    assert (stix.format, stix.name, stix.category, stix.confidence) == ("stix", "stix_bundle.json", "STIX_Intel", 90)
    assert Path(stix.path) == tmp_path / "feeds" / "stix_bundle.json"
    assert (misp.format, misp.name, misp.category) == ("misp", "misp", "MISP_Intel")
    assert Path(misp.path) == tmp_path / "feeds" / "misp"
    snaps = [load_feed(f) for f in config.feeds.feeds]
    assert [(s.report.records, s.report.skipped, s.report.malformed) for s in snaps] == [(10, 2, 0), (12, 5, 0)]


def test_feed_format_is_case_insensitive(tmp_path: Path) -> None:
    config = load(tmp_path, STIX_FEED.replace('"stix"', '" STIX "') + MISP_FEED.replace('"misp"', '"Misp"'))
    assert [f.format for f in config.feeds.feeds] == ["stix", "misp"]


def test_feed_format_defaults(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '<Feed filename="feeds/misp" category="A"/>'
        '<Feed filename="feeds/ip_reputation.csv" category="B"/>'
        '<Feed filename="feeds/stix_bundle.json" category="C"/>',
    )
    assert [f.format for f in config.feeds.feeds] == ["misp", "csv", "json"]
    # A STIX bundle is never guessed: without format="stix" it is read as a JSON feed, and is not one.
    with pytest.raises(FeedError, match="must be an array"):
        load_feed(config.feeds.feeds[2])


def test_feed_format_disabled_misp_feed_may_be_missing(tmp_path: Path) -> None:
    config = load(tmp_path, '<Feed filename="feeds/nowhere" format="misp" enabled="false" category="A"/>')
    assert config.feeds.feeds[0].enabled is False


@pytest.mark.parametrize(
    ("feed", "problem"),
    [
        ('<Feed filename="feeds/stix_bundle.json" format="xml" category="A"/>', "expected json, csv, stix or misp"),
        ('<Feed filename="feeds/stix_bundle.json" format="misp" category="A"/>', "must be a directory holding"),
        ('<Feed filename="feeds/nowhere" format="misp" category="A"/>', "must be a directory holding manifest.json"),
        ('<Feed filename="feeds" format="misp" category="A"/>', "must be a directory holding manifest.json"),
        ('<Feed filename="feeds/misp" format="json" category="A"/>', 'is a directory (format="misp"'),
        ('<Feed filename="feeds/misp" format="stix" category="A"/>', "is a directory"),
        ('<Feed filename="feeds/nothing.json" format="stix" category="A"/>', "does not exist"),
    ],
)
def test_feed_format_errors(tmp_path: Path, feed: str, problem: str) -> None:
    err = error_for(tmp_path, feed)
    assert problem in err.problem


def test_feed_formats_detect_through_the_matcher(tmp_path: Path) -> None:
    config = load(tmp_path, STIX_FEED + MISP_FEED)
    store = IndicatorStore({slot: load_feed(f) for slot, f in enumerate(config.feeds.feeds)})
    matcher = Matcher(config, store)
    lines = matcher.match(["1 md5=44D88612FEA8A8F36DE82E1278ABB02F"], date=DATE)
    assert [line.split(" source=")[0] for line in lines] == [
        "1 category=STIX_Intel matchedIndicator=44d88612fea8a8f36de82e1278abb02f confidence=90",
        "1 category=MISP_Intel matchedIndicator=44d88612fea8a8f36de82e1278abb02f confidence=80",
    ]
    assert "stix_id=indicator--fd2ca9e1-74f0-4ff2-9dd0-730ef5d33051" in lines[0]
    assert "event_info=EICAR dropper" in lines[1]
