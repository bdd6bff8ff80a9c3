"""Tests for threatgate.node.exports: an IoC export lists what the node detects, nothing the FalsePositive
supplier suppresses in matching (its decision checked against the matcher's own lookups)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from threatgate.config.node import FeedSettings, IoCExportSettings, NodeConfig, load_node_config
from threatgate.node.exports import FalsePositives, render_export
from threatgate.node.feeds import FeedSnapshot, indicator_of, load_feed
from threatgate.node.matcher import Matcher
from threatgate.node.store import IndicatorStore

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

FALSE_POSITIVES = [
    {"url": "http://vendor.example/update/*"},  # a mask
    {"domain": "*.cdn.example"},  # a domain and every sub-domain
    {"domain": "exact.example"},
    {"ip": "10.0.0.0/8"},
    {"ip": "192.0.2.7"},
    {"md5": "d41d8cd98f00b204e9800998ecf8427e"},
    {"url": "http://listed.example/one/page"},
]
THREATS = [  # (record, suppressed by FALSE_POSITIVES)
    ({"url": "http://vendor.example/update/setup.exe"}, True),  # the mask covers it
    ({"url": "http://vendor.example/other"}, False),
    ({"url": "http://a.cdn.example/x.js"}, True),  # its host is a marked sub-domain
    ({"domain": "cdn.example"}, True),
    ({"domain": "deep.a.cdn.example"}, True),
    ({"domain": "cdn.example.org"}, False),
    ({"domain": "exact.example"}, True),
    ({"domain": "sub.exact.example"}, False),  # only exact.example itself is marked
    ({"url": "http://exact.example/path"}, True),  # its host is
    ({"ip": "10.20.30.40"}, True),
    ({"url": "http://10.1.1.1/login"}, True),
    ({"ip": "11.0.0.1"}, False),
    ({"ip": "192.0.2.7"}, True),
    ({"ip": "192.0.2.8"}, False),
    ({"md5": "D41D8CD98F00B204E9800998ECF8427E"}, True),
    ({"md5": "0cc175b9c0f1b6a831c399e269772661"}, False),
    ({"url": "http://listed.example/one/page"}, True),
    ({"url": "http://listed.example/one/other"}, False),
]
PATTERNS = [  # (record, suppressed): a pattern goes only when every value it covers is suppressed
    ({"ip": "10.9.0.0/16"}, True),  # inside the marked /8
    ({"ip": "10.0.0.0/8"}, True),
    ({"ip": "8.0.0.0/6"}, False),  # wider than the marked /8: other addresses still detect
    ({"domain": "*.x.cdn.example"}, True),
    ({"domain": "*.exact.example"}, False),  # exact.example is marked, its sub-domains are not
    ({"url": "http://vendor.example/update/*"}, True),  # the very mask
    ({"url": "http://vendor.example/*"}, False),
]


def write_feed(tmp_path: Path, name: str, records: list[dict[str, Any]], **kwargs: Any) -> FeedSnapshot:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    settings = FeedSettings(
        path=str(path), name=name, category=kwargs.pop("category", "Threat"), format="json", **kwargs
    )
    return load_feed(settings)


@pytest.fixture
def snapshots(tmp_path: Path) -> list[FeedSnapshot]:
    threats = write_feed(tmp_path, "threats.json", [r for r, _ in THREATS + PATTERNS])
    fps = write_feed(tmp_path, "fp.json", FALSE_POSITIVES, supplier="FalsePositive", category="FalsePositive")
    internal = write_feed(
        tmp_path, "internal.json", [{"ip": "10.20.30.40"}], supplier="InternalTI", category="InternalTI"
    )
    return [threats, fps, internal]


@pytest.fixture(scope="module")
def example_config() -> NodeConfig:
    return load_node_config(str(EXAMPLES / "node.conf"))


@pytest.mark.parametrize(("record", "suppressed"), THREATS + PATTERNS, ids=lambda v: json.dumps(v))
def test_false_positives_decide_each_indicator(
    snapshots: list[FeedSnapshot], record: dict[str, Any], suppressed: bool
) -> None:
    indicator = indicator_of(record)
    assert indicator is not None
    assert FalsePositives(snapshots).suppresses(indicator) is suppressed


def test_false_positives_agree_with_the_matcher(snapshots: list[FeedSnapshot], example_config: NodeConfig) -> None:
    """For every exact indicator: left out of exports exactly when looking it up answers "false positive"."""
    matcher = Matcher(example_config, IndicatorStore(dict(enumerate(snapshots))))
    fps = FalsePositives(snapshots)
    for record, _ in THREATS:
        [raw] = record.values()
        indicator = indicator_of(record)
        assert indicator is not None
        hits, suppressed = matcher.lookup_object(raw)
        assert fps.suppresses(indicator) is (suppressed > 0), (raw, hits, suppressed)


def test_an_export_leaves_out_what_false_positive_suppresses(snapshots: list[FeedSnapshot]) -> None:
    task = IoCExportSettings(name="all", fields=("indicator", "category"), create_header=False)
    rows = render_export(task, snapshots).decode().splitlines()
    kept = [json.dumps(next(iter(r.values()))) for r, suppressed in THREATS + PATTERNS if not suppressed]
    assert rows[: len(kept)] == [f'{value},"Threat"' for value in kept]
    # InternalTI still detects a value FalsePositive marks (the matcher keeps its hits): it is exported.
    assert rows[len(kept) :] == ['"10.20.30.40","InternalTI"']


def test_an_export_without_false_positives_lists_every_indicator(tmp_path: Path) -> None:
    threats = write_feed(tmp_path, "threats.json", [r for r, _ in THREATS])
    task = IoCExportSettings(name="all", fields=("indicator",), create_header=False)
    assert len(render_export(task, [threats]).decode().splitlines()) == len(THREATS)
