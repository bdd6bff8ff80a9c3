"""The ``indicator_column`` and ``context_columns`` attributes of ``<Feed>``: read, checked, validated."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.abusech import FEODO, URLHAUS
from threatgate.config.node import NodeConfig, load_node_config
from threatgate.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
THREATGATE = Path(sys.executable).parent / "threatgate"

URLHAUS_FEED = (
    '<Feed filename="feeds/urlhaus.csv" category="URLhaus" confidence="90" '
    'context_columns="threat, tags,urlhaus_link" actionable_fields="urlhaus_link"/>'
)
FEODO_FEED = (
    '<Feed filename="feeds/feodo_ipblocklist.csv" category="Feodo_CnC" indicator_column="dst_ip" '
    'context_columns="dst_port,malware,c2_status"/>'
)


def config_with_feeds(tmp_path: Path, feeds: str) -> Path:
    """The example config with ``feeds`` as its only <Feed> lines, next to the abuse.ch sample files."""
    (tmp_path / "feeds").mkdir(exist_ok=True)
    (tmp_path / "feeds" / "urlhaus.csv").write_text(URLHAUS, encoding="utf-8")
    (tmp_path / "feeds" / "feodo_ipblocklist.csv").write_text(FEODO, encoding="utf-8")
    (tmp_path / "feeds" / "urls.json").write_text('[{"url": "http://a.example/x"}]', encoding="utf-8")
    text = (ROOT / "examples" / "node.conf").read_text(encoding="utf-8")
    text, n = re.subn(r"(<Feeds[^>]*>).*?(</Feeds>)", lambda m: m.group(1) + feeds + m.group(2), text, flags=re.S)
    assert n == 1
    text = re.sub(r"<IoCExports>.*?</IoCExports>", "", text, flags=re.S)  # it names a feed category
    path = tmp_path / "node.conf"
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, feeds: str) -> NodeConfig:
    return load_node_config(str(config_with_feeds(tmp_path, feeds)))


def error_for(tmp_path: Path, feed: str) -> str:
    path = config_with_feeds(tmp_path, feed)
    with pytest.raises(ConfigError) as info:
        load_node_config(str(path))
    assert info.value.element == "Feed"
    assert "<Feed" in path.read_text(encoding="utf-8").splitlines()[info.value.line - 1]
    return str(info.value)


def test_feed_columns_read(tmp_path: Path) -> None:
    urlhaus, feodo = load(tmp_path, URLHAUS_FEED + FEODO_FEED).feeds.feeds
    assert (urlhaus.indicator_column, urlhaus.context_columns) == ("", ("threat", "tags", "urlhaus_link"))
    assert (feodo.indicator_column, feodo.context_columns) == ("dst_ip", ("dst_port", "malware", "c2_status"))


def test_feed_columns_default_to_none(tmp_path: Path) -> None:
    (feed,) = load(tmp_path, '<Feed filename="feeds/urlhaus.csv" category="URLhaus"/>').feeds.feeds
    assert (feed.indicator_column, feed.context_columns) == ("", None)


@pytest.mark.parametrize(
    ("feed", "problem"),
    [
        (
            '<Feed filename="feeds/urls.json" category="U" indicator_column="url"/>',
            'indicator_column applies to CSV feeds only (this feed has format="json")',
        ),
        (
            '<Feed filename="feeds/urls.json" category="U" context_columns="threat"/>',
            'context_columns applies to CSV feeds only (this feed has format="json")',
        ),
        (
            '<Feed filename="feeds/feodo_ipblocklist.csv" category="F" indicator_column=" "/>',
            "indicator_column is empty: name the CSV column that holds the indicator, or leave it out",
        ),
        (
            '<Feed filename="feeds/feodo_ipblocklist.csv" category="F" indicator_column="dst_ip" '
            'context_columns="malware,DST_IP"/>',
            "context_columns names 'dst_ip', the indicator column: the indicator is never record context",
        ),
        (
            '<Feed filename="feeds/urlhaus.csv" category="U" context_columns="threat" actionable_fields="tags"/>',
            "actionable_fields tags not in context_columns: an actionable field must be kept",
        ),
    ],
)
def test_feed_columns_refused(tmp_path: Path, feed: str, problem: str) -> None:
    assert error_for(tmp_path, feed).endswith(problem)


# -- threatgate validate: the columns are checked against the files --------------------------------


def run_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(THREATGATE), "validate", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def test_feed_columns_cli_validate_accepts_abusech_feeds(tmp_path: Path) -> None:
    result = run_validate(config_with_feeds(tmp_path, URLHAUS_FEED + FEODO_FEED))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "node config OK" in result.stdout


def test_feed_columns_cli_validate_names_the_file_and_the_missing_column(tmp_path: Path) -> None:
    feeds = URLHAUS_FEED.replace("tags,", "tag,") + FEODO_FEED.replace('"dst_ip"', '"ip_address"')
    path = config_with_feeds(tmp_path, feeds)
    result = run_validate(path)
    assert result.returncode == 2, result
    assert result.stdout == ""
    urlhaus, feodo = tmp_path / "feeds" / "urlhaus.csv", tmp_path / "feeds" / "feodo_ipblocklist.csv"
    line = next(i for i, t in enumerate(path.read_text().splitlines(), start=1) if "<Feed" in t)
    assert result.stderr.splitlines() == [
        f"{path}:{line}: <Feed> urlhaus.csv: does not load: {urlhaus}: context_columns: 'tag' is not a column "
        "of the CSV header (did you mean 'tags'?); the columns are id, dateadded, url, url_status, last_online, "
        "threat, tags, urlhaus_link, reporter",
        f"{path}:{line}: <Feed> feodo_ipblocklist.csv: does not load: {feodo}: CSV header ['first_seen_utc', "
        "'dst_ip', 'dst_port', 'c2_status', 'last_online', 'malware'] (line 9) has no indicator column: neither it "
        "nor a comment line before it has the column 'ip_address' (indicator_column)",
    ]
