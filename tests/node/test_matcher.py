"""Tests for threatgate.node.matcher: framed events in, detection and finished lines out.

Every test runs on both engines (the ``engine`` fixture of tests/conftest.py): matchers are built by
``threatgate.node.engine.make_matcher``, which builds the engine that ``THREATGATE_ENGINE`` names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from threatgate.config.node import NodeConfig, RuleType, load_node_config
from threatgate.errors import ConfigError
from threatgate.node import engine as engine_module
from threatgate.node.engine import engine_choice
from threatgate.node.engine import make_matcher as build_matcher
from threatgate.node.feeds import load_feed
from threatgate.node.matcher import Matcher, MatchStats
from threatgate.node.store import IndicatorStore
from threatgate.wire.framing import FramedEvent, LineFramer, Oversized

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DATE = "Oct 11 22:14:15"

pytestmark = pytest.mark.usefixtures("engine")


def store_for(config: NodeConfig) -> IndicatorStore:
    return IndicatorStore({slot: load_feed(f) for slot, f in enumerate(config.feeds.feeds) if f.enabled})


@pytest.fixture(scope="module")
def example_config() -> NodeConfig:
    return load_node_config(str(EXAMPLES / "node.conf"))


@pytest.fixture(scope="module")
def example(engine: str, example_config: NodeConfig) -> Matcher:
    return build_matcher(example_config, store_for(example_config))


def test_the_engine_fixture_selects_the_engine_that_make_matcher_builds(engine: str, example: Matcher) -> None:
    """The module's matchers are of the fixture's engine: the compiled one is a ``CompiledMatcher`` (a
    build whose engine module has none yet builds the reference matcher for both names)."""
    assert engine_choice() == engine
    compiled = getattr(engine_module, "CompiledMatcher", None)
    if compiled is not None:
        assert isinstance(example, compiled) == (engine == "compiled"), type(example)


def example_events() -> list[FramedEvent]:
    framer = LineFramer()
    framer.receive_data((EXAMPLES / "events.txt").read_bytes())
    framer.receive_data(b"")
    events = framer.next_events()
    assert len(events) == 7
    return events


EXPECTED_EXAMPLE_LINES = [
    "1 category=Malicious_URL matchedIndicator=http://fakess123.nu confidence=100 source=default "
    "threat=Trojan-Downloader.Win32.Example first_seen=2026-01-04",
    "1 category=IP_Reputation matchedIndicator=192.0.2.0 confidence=80 source=default threat=Botnet geo=nl",
    "1 LookupFinished",
    "2 category=Malicious_URL matchedIndicator=http://malicious.example/p/index.php confidence=100 source=default "
    "threat=Phishing first_seen=2026-02-11",
    "2 category=IP_Reputation matchedIndicator=203.0.113.0/24 confidence=80 source=default threat=Scanner geo=us",
    "2 LookupFinished",
    "3 category=Malicious_URL matchedIndicator=*.evil-cdn.example/payload/* confidence=100 source=default "
    "threat=Exploit.Kit first_seen=2026-03-01",
    "3 LookupFinished",
    "4 category=Malicious_Hash matchedIndicator=C912705B4BBB14EC7E78FA8B370532C9 confidence=100 source=default "
    "file_type=PE32 detection=Trojan.Win32.Agent",
    "4 LookupFinished",
    "5 category=InternalTI matchedIndicator=http://benign-but-listed.example/download confidence=100 "
    "source=default owner=SOC note=abused in campaign 42",
    "5 category=IP_Reputation matchedIndicator=198.51.100.77 confidence=80 source=default threat=TOR exit geo=de",
    "5 category=InternalTI matchedIndicator=198.51.100.77 confidence=100 source=default "
    "owner=SOC note=confirmed C2 in incident 2026-17",
    "5 LookupFinished",
    "6 LookupFinished",
    "7 category=Botnet_CnC_Domain matchedIndicator=a7396d61caffe18a4cffbb3b428c9b60.com confidence=90 "
    "source=default family=ExampleBot",
    "7 LookupFinished",
]


# -- the example config, feeds and events ---------------------------------------------------------


def test_Matcher_example_events_exact_lines(example: Matcher) -> None:
    stats = MatchStats()
    lines = example.match(example_events(), date=DATE, finished=True, stats=stats)
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    assert [line[:-1] for line in lines] == EXPECTED_EXAMPLE_LINES
    assert stats.events == 7
    assert stats.detections == 10
    assert stats.suppressed == 1  # the Adware URL detection of event 5
    assert stats.per_category == {
        "Malicious_URL": 3,
        "IP_Reputation": 3,
        "Malicious_Hash": 1,
        "InternalTI": 2,
        "Botnet_CnC_Domain": 1,
    }


def test_Matcher_example_false_positive_suppresses_feed_but_not_internal_ti(example: Matcher) -> None:
    lines = example.match([example_events()[4]], date=DATE)
    url_lines = [line for line in lines if "benign-but-listed" in line]
    assert len(url_lines) == 1
    assert "category=InternalTI" in url_lines[0]
    assert not any("Adware" in line or "Malicious_URL" in line for line in lines)


def test_Matcher_example_cidr_and_mask_hits(example: Matcher) -> None:
    events = example_events()
    event2 = example.match([events[1]], date=DATE)
    assert any("matchedIndicator=203.0.113.0/24" in line and "IP_Reputation" in line for line in event2)
    event3 = example.match([events[2]], date=DATE)
    assert event3 == [
        "3 category=Malicious_URL matchedIndicator=*.evil-cdn.example/payload/* confidence=100 source=default "
        "threat=Exploit.Kit first_seen=2026-03-01\n"
    ]


def test_Matcher_example_one_finished_line_per_event_after_its_detections(example: Matcher) -> None:
    lines = example.match(example_events(), date=DATE, finished=True)
    finished = [i for i, line in enumerate(lines) if line.endswith(" LookupFinished\n")]
    assert [lines[i] for i in finished] == [f"{n} LookupFinished\n" for n in range(1, 8)]
    start = 0
    for n, end in enumerate(finished, start=1):
        assert all(line.startswith(f"{n} category=") for line in lines[start:end])
        start = end + 1


def test_Matcher_without_finished_no_finished_lines(example: Matcher) -> None:
    lines = example.match(example_events(), date=DATE)
    assert [line[:-1] for line in lines] == [x for x in EXPECTED_EXAMPLE_LINES if not x.endswith("LookupFinished")]


def test_Matcher_example_events_one_batch_equals_one_by_one(example: Matcher) -> None:
    events = example_events()
    together = example.match(events, date=DATE, finished=True)
    separately = [line for event in events for line in example.match([event], date=DATE, finished=True)]
    assert together == separately


# -- source selection -----------------------------------------------------------------------------


def test_Matcher_source_by_syslog_hostname_rfc3164(example: Matcher) -> None:
    lines = example.match(["<34>Oct 11 22:14:15 dns01 named: query=evil.cnc.example"], date=DATE, finished=True)
    assert lines == [
        " category=Botnet_CnC_Domain matchedIndicator=*.cnc.example confidence=90 source=dns family=ExampleBot\n",
        " LookupFinished\n",
    ]


def test_Matcher_source_by_syslog_hostname_is_case_insensitive(example: Matcher) -> None:
    lines = example.match(["<34>Oct  1 02:14:15 DNS01 named: query=a7396d61caffe18a4cffbb3b428c9b60.com"], date=DATE)
    assert len(lines) == 1 and "source=dns" in lines[0]


def test_Matcher_source_by_syslog_hostname_rfc5424(example: Matcher) -> None:
    event = "<34>1 2026-03-01T22:14:15.003Z dns01 named - - query=x.cnc.example"
    lines = example.match([event], date=DATE)
    assert len(lines) == 1 and "source=dns" in lines[0] and "Botnet_CnC_Domain" in lines[0]


def test_Matcher_unknown_hostname_falls_back_to_default(example: Matcher) -> None:
    # The default source has no DOMAIN rule, so the same query detects nothing.
    assert example.match(["<34>Oct 11 22:14:15 web01 named: query=evil.cnc.example"], date=DATE) == []


# -- helpers for purpose-built configs ------------------------------------------------------------

EVENT_FORMAT = "%REQ% src=%SourceId% cat=%Category% ind=%MatchedIndicator% conf=%Confidence%"
FINISHED_FORMAT = "%REQ% LookupFinished%RecordContext%"


def make_matcher(
    tmp_path: Path,
    sources: str,
    feeds: list[tuple[str, str, list[dict[str, Any]]]],
    *,
    event_format: str = EVENT_FORMAT,
    finished_format: str = FINISHED_FORMAT,
    feeds_attrs: str = "",
) -> Matcher:
    feed_xml = []
    for name, attrs, records in feeds:
        (tmp_path / name).write_text(json.dumps(records), encoding="utf-8")
        feed_xml.append(f'<Feed filename="{name}" {attrs}/>')
    text = f"""<?xml version="1.0"?>
<Configuration>
  <InputSettings>
    <ConnectionString>127.0.0.1:9999</ConnectionString>
    <RegExps>
{sources}
    </RegExps>
  </InputSettings>
  <OutputSettings>
    <ConnectionString>127.0.0.1:9998</ConnectionString>
    <EventFormat>{event_format}</EventFormat>
    <RecordFieldContextFormat>%ParamName%=%ParamValue%</RecordFieldContextFormat>
    <ActionableFieldContextFormat> %ParamName%:%ParamValue%</ActionableFieldContextFormat>
    <FinishedEventFormat enabled="true">{finished_format}</FinishedEventFormat>
  </OutputSettings>
  <Feeds {feeds_attrs}>
    {"".join(feed_xml)}
  </Feeds>
</Configuration>
"""
    path = tmp_path / "node.conf"
    path.write_text(text, encoding="utf-8")
    config = load_node_config(str(path))
    return build_matcher(config, store_for(config))


DEFAULT_SOURCE = r"""
      <Source id="default">
        <REQ type="CONTEXT">^(\d+)\s</REQ>
        <RE_URL type="URL" extract="all">url=(\S+)</RE_URL>
        <RE_IP type="IP" extract="all">ip=(\S+)</RE_IP>
      </Source>
"""
URL_FEED = (
    "urls.json",
    'category="Bad_URL" confidence="70"',
    [
        {"url": "http://evil.example/a", "threat": "A"},
        {"url": "http://evil.example/b", "threat": "B"},
        {"url": "http://evil.example/c", "threat": "C"},
    ],
)
IP_FEED = (
    "ips.json",
    'category="Bad_IP" confidence="60"',
    [{"ip": "10.1.2.3", "threat": "exact"}, {"ip": "10.0.0.0/8", "threat": "cidr"}],
)


def test_Matcher_source_by_peer_ip(tmp_path: Path) -> None:
    sources = (
        DEFAULT_SOURCE
        + r"""
      <Source id="proxy" ip="10.9.9.9, 10.9.9.10">
        <P_URL type="URL">u=(\S+)</P_URL>
      </Source>
"""
    )
    matcher = make_matcher(tmp_path, sources, [URL_FEED])
    event = "1 u=http://evil.example/a"
    for peer in ("10.9.9.9", "10.9.9.10"):  # every address of the list picks the source
        assert matcher.match([event], date=DATE, peer_ip=peer) == [
            "1 src=proxy cat=Bad_URL ind=http://evil.example/a conf=70\n"
        ]
    for peer in ("10.9.9.11", "10.0.0.1"):
        assert matcher.match([event], date=DATE, peer_ip=peer) == []  # default: no "u=" rule


def test_Matcher_peer_ip_wins_over_syslog_hostname(tmp_path: Path) -> None:
    sources = (
        DEFAULT_SOURCE
        + r"""
      <Source id="proxy" ip="10.9.9.9"><P_URL type="URL">u=(\S+)</P_URL></Source>
      <Source id="dns" hostname="dns01"><D_URL type="URL">d=(\S+)</D_URL></Source>
"""
    )
    matcher = make_matcher(tmp_path, sources, [URL_FEED])
    event = "<34>Oct 11 22:14:15 dns01 app: u=http://evil.example/a d=http://evil.example/b"
    by_ip = matcher.match([event], date=DATE, peer_ip="10.9.9.9")
    by_host = matcher.match([event], date=DATE, peer_ip="10.0.0.1")
    assert by_ip == [" src=proxy cat=Bad_URL ind=http://evil.example/a conf=70\n"]
    assert by_host == [" src=dns cat=Bad_URL ind=http://evil.example/b conf=70\n"]


# -- normalizing rules ----------------------------------------------------------------------------


def test_Matcher_ignore_rule_drops_event_but_emits_finished_line(tmp_path: Path) -> None:
    sources = DEFAULT_SOURCE.replace(
        '<Source id="default">',
        '<Source id="default"><NormalizingRules><Ignore>healthcheck</Ignore></NormalizingRules>',
    )
    matcher = make_matcher(tmp_path, sources, [URL_FEED])
    stats = MatchStats()
    lines = matcher.match(
        ["4 healthcheck url=http://evil.example/a", "5 url=http://evil.example/a"],
        date=DATE,
        finished=True,
        stats=stats,
    )
    assert lines == [
        "4 LookupFinished event_type=LookupFinished sent_events=0 total=\n",
        "5 src=default cat=Bad_URL ind=http://evil.example/a conf=70\n",
        "5 LookupFinished event_type=LookupFinished sent_events=1 total=Bad_URL:1;\n",
    ]
    assert stats.ignored == 1
    assert matcher.match(["4 healthcheck url=http://evil.example/a"], date=DATE) == []


def test_Matcher_example_ignore_rule_of_dns_source(example: Matcher) -> None:
    stats = MatchStats()
    lines = example.match(["<34>Oct 11 22:14:15 dns01 named: query=localhost"], date=DATE, finished=True, stats=stats)
    assert lines == [" LookupFinished\n"]
    assert stats.ignored == 1


def test_Matcher_replace_rule_newline_splits_event_with_one_finished_line(tmp_path: Path) -> None:
    sources = DEFAULT_SOURCE.replace(
        '<Source id="default">',
        r'<Source id="default"><NormalizingRules><Replace input="\s*\|\|\s*" output="\n"/></NormalizingRules>',
    )
    matcher = make_matcher(tmp_path, sources, [URL_FEED])
    event = "7 url=http://evil.example/a || 8 url=http://evil.example/b || junk"
    lines = matcher.match([event], date=DATE, finished=True)
    assert lines == [
        "7 src=default cat=Bad_URL ind=http://evil.example/a conf=70\n",
        "8 src=default cat=Bad_URL ind=http://evil.example/b conf=70\n",
        "7 LookupFinished event_type=LookupFinished sent_events=2 total=Bad_URL:2;\n",
    ]


def test_Matcher_replace_rule_rewrites_before_extraction(tmp_path: Path) -> None:
    sources = DEFAULT_SOURCE.replace(
        '<Source id="default">',
        '<Source id="default"><NormalizingRules><Replace input="hxxp" output="http"/></NormalizingRules>',
    )
    matcher = make_matcher(tmp_path, sources, [URL_FEED])
    assert matcher.match(["1 url=hxxp://evil.example/c"], date=DATE) == [
        "1 src=default cat=Bad_URL ind=http://evil.example/c conf=70\n"
    ]


def test_Matcher_replace_and_ignore_split_parts_independently(tmp_path: Path) -> None:
    sources = DEFAULT_SOURCE.replace(
        '<Source id="default">',
        '<Source id="default"><NormalizingRules><Replace input=";" output="\\n"/>'
        "<Ignore>noise</Ignore></NormalizingRules>",
    )
    matcher = make_matcher(tmp_path, sources, [URL_FEED])
    stats = MatchStats()
    lines = matcher.match(
        ["3 noise url=http://evil.example/a;url=http://evil.example/b"], date=DATE, finished=True, stats=stats
    )
    assert lines == [
        " src=default cat=Bad_URL ind=http://evil.example/b conf=70\n",
        " LookupFinished event_type=LookupFinished sent_events=1 total=Bad_URL:1;\n",
    ]
    assert stats.ignored == 1


def test_Matcher_every_accepted_replace_rule_can_be_applied(tmp_path: Path) -> None:
    """A Replace rule that load_node_config accepts must never make match() raise.

    ``output`` with a backslash group reference that the input regex does not have: either the config
    refuses it (ConfigError at the <Replace> line) or the matcher applies it without an exception.
    """
    sources = DEFAULT_SOURCE.replace(
        '<Source id="default">',
        r'<Source id="default"><NormalizingRules><Replace input="foo" output="x\1y"/></NormalizingRules>',
    )
    try:
        matcher = make_matcher(tmp_path, sources, [URL_FEED])
    except ConfigError as exc:
        assert exc.element == "Replace"
        return
    lines = matcher.match(["1 foo url=http://evil.example/a"], date=DATE, finished=True)
    assert lines[-1].startswith("1 LookupFinished")


# -- extraction -----------------------------------------------------------------------------------


def test_Matcher_extract_first_vs_all(tmp_path: Path) -> None:
    sources = r"""
      <Source id="default">
        <REQ type="CONTEXT">^(\d+)\s</REQ>
        <FIRST type="URL" extract="first">first=(\S+)</FIRST>
        <ALL type="URL" extract="all">all=(\S+)</ALL>
      </Source>
"""
    matcher = make_matcher(tmp_path, sources, [URL_FEED], event_format="%REQ% %FIRST%|%ALL% %MatchedIndicator%")
    first = matcher.match(["1 first=http://evil.example/a first=http://evil.example/b"], date=DATE)
    assert first == ["1 http://evil.example/a| http://evil.example/a\n"]
    every = matcher.match(
        ["2 all=http://evil.example/a all=http://evil.example/b all=http://evil.example/c"], date=DATE
    )
    assert every == [
        "2 |http://evil.example/a http://evil.example/a\n",
        "2 |http://evil.example/b http://evil.example/b\n",
        "2 |http://evil.example/c http://evil.example/c\n",
    ]


def test_Matcher_same_value_twice_detects_once(tmp_path: Path) -> None:
    matcher = make_matcher(tmp_path, DEFAULT_SOURCE, [URL_FEED])
    lines = matcher.match(["1 url=http://evil.example/a url=http://evil.example/a"], date=DATE)
    assert lines == ["1 src=default cat=Bad_URL ind=http://evil.example/a conf=70\n"]


def test_Matcher_rule_without_group_uses_whole_match(tmp_path: Path) -> None:
    sources = r"""
      <Source id="default">
        <H type="MD5" extract="all">\b[0-9a-f]{32}\b</H>
      </Source>
"""
    feed = ("h.json", 'category="Bad_Hash"', [{"md5": "44d88612fea8a8f36de82e1278abb02f"}])
    matcher = make_matcher(tmp_path, sources, [feed], event_format="%H% %Category%", finished_format="%SourceId% done")
    assert matcher.match(["x 44d88612fea8a8f36de82e1278abb02f y"], date=DATE) == [
        "44d88612fea8a8f36de82e1278abb02f Bad_Hash\n"
    ]


def test_Matcher_context_values_are_not_looked_up(tmp_path: Path) -> None:
    sources = r"""
      <Source id="default">
        <REQ type="CONTEXT">req=(\S+)</REQ>
        <RE_URL type="URL">url=(\S+)</RE_URL>
      </Source>
"""
    matcher = make_matcher(tmp_path, sources, [URL_FEED])
    assert matcher.match(["req=http://evil.example/a"], date=DATE, finished=True) == [
        "http://evil.example/a LookupFinished event_type=LookupFinished sent_events=0 total=\n"
    ]


def test_Matcher_default_rule_fallback_runs_only_when_source_rule_finds_nothing(tmp_path: Path) -> None:
    sources = (
        DEFAULT_SOURCE
        + r"""
      <Source id="proxy" ip="10.9.9.9">
        <RE_URL type="URL" extract="all">u=(\S+)</RE_URL>
      </Source>
"""
    )
    matcher = make_matcher(tmp_path, sources, [URL_FEED], event_format="%REQ% %SourceId% %RE_URL% %Category%")
    both = matcher.match(["1 u=http://evil.example/a url=http://evil.example/b"], date=DATE, peer_ip="10.9.9.9")
    assert both == ["1 proxy http://evil.example/a Bad_URL\n"]  # the proxy's own RE_URL found a value
    fallback = matcher.match(["2 url=http://evil.example/b"], date=DATE, peer_ip="10.9.9.9")
    assert fallback == ["2 proxy http://evil.example/b Bad_URL\n"]  # default RE_URL, same name
    # Default rules the proxy does not redefine (REQ, RE_IP) always run for it.
    other = matcher.match(["3 ip=10.1.2.3"], date=DATE, peer_ip="10.9.9.9")
    assert other == []  # no IP feed here, but REQ was still extracted:
    finished = matcher.match(["3 ip=10.1.2.3"], date=DATE, peer_ip="10.9.9.9", finished=True)
    assert finished == ["3 LookupFinished event_type=LookupFinished sent_events=0 total=\n"]


# -- detection limits and output fields -----------------------------------------------------------


def test_Matcher_value_matching_several_records_detects_each(tmp_path: Path) -> None:
    matcher = make_matcher(tmp_path, DEFAULT_SOURCE, [IP_FEED])
    lines = matcher.match(["1 ip=10.1.2.3"], date=DATE)
    assert lines == [
        "1 src=default cat=Bad_IP ind=10.1.2.3 conf=60\n",
        "1 src=default cat=Bad_IP ind=10.0.0.0/8 conf=60\n",
    ]


def test_Matcher_per_scan_detect_limit(tmp_path: Path) -> None:
    matcher = make_matcher(tmp_path, DEFAULT_SOURCE, [IP_FEED], feeds_attrs='per_scan_detect_limit="1"')
    stats = MatchStats()
    lines = matcher.match(["1 ip=10.1.2.3 ip=10.7.7.7"], date=DATE, finished=True, stats=stats)
    assert lines == [
        "1 src=default cat=Bad_IP ind=10.1.2.3 conf=60\n",
        "1 src=default cat=Bad_IP ind=10.0.0.0/8 conf=60\n",  # a different value: its own limit
        "1 LookupFinished event_type=LookupFinished sent_events=2 total=Bad_IP:2;\n",
    ]
    assert stats.detections == 2


def test_Matcher_oversized_marker_gets_finished_line_with_req_from_prefix(example: Matcher) -> None:
    stats = MatchStats()
    marker = Oversized(
        prefix="9 CEF:0|Squid|Proxy|3.5|TCP_MISS|GET|3|src=10.1.2.3 url=http://fakess123.nu/", size=5 << 20
    )
    lines = example.match([marker, "10 nothing here"], date=DATE, finished=True, stats=stats)
    assert lines == ["9 LookupFinished\n", "10 LookupFinished\n"]  # never matched, only finished
    assert stats.oversized == 1
    assert stats.detections == 0
    assert example.match([marker], date=DATE) == []


def test_Matcher_date_passes_through(tmp_path: Path) -> None:
    matcher = make_matcher(
        tmp_path,
        DEFAULT_SOURCE,
        [URL_FEED],
        event_format="%Date% %Category%",
        finished_format="%Date% done",
    )
    date = "2026-03-01T22:14:15.123+02:00 {weird} %REQ%"
    assert matcher.match(["1 url=http://evil.example/a"], date=date, finished=True) == [
        f"{date} Bad_URL\n",
        f"{date} done\n",
    ]


def test_Matcher_finished_record_context_counts_sent_events_and_totals(tmp_path: Path) -> None:
    matcher = make_matcher(tmp_path, DEFAULT_SOURCE, [URL_FEED, IP_FEED])
    lines = matcher.match(
        ["5 url=http://evil.example/a url=http://evil.example/b ip=10.1.2.3", "6 nothing"],
        date=DATE,
        finished=True,
    )
    assert lines[-2:] == [
        "5 LookupFinished event_type=LookupFinished sent_events=4 total=Bad_URL:2;Bad_IP:2;\n",
        "6 LookupFinished event_type=LookupFinished sent_events=0 total=\n",
    ]
    assert len(lines) == 6


def test_Matcher_record_and_actionable_fields(tmp_path: Path) -> None:
    feed = (
        "a.json",
        'category="Bad_URL" actionable_fields="threat,owner"',
        [{"url": "http://evil.example/a", "threat": "Phish", "first_seen": "2026", "owner": "SOC"}],
    )
    matcher = make_matcher(
        tmp_path, DEFAULT_SOURCE, [feed], event_format="%REQ% %MatchedIndicator%%ActionableFields% |%RecordContext%"
    )
    assert matcher.match(["1 url=http://evil.example/a"], date=DATE) == [
        "1 http://evil.example/a threat:Phish owner:SOC | threat=Phish first_seen=2026 owner=SOC\n"
    ]


def test_Matcher_rule_value_field_is_the_detected_value(tmp_path: Path) -> None:
    matcher = make_matcher(tmp_path, DEFAULT_SOURCE, [URL_FEED], event_format="%RE_URL% -> %MatchedIndicator%")
    lines = matcher.match(["1 url=http://EVIL.example/b url=http://evil.example/a"], date=DATE)
    assert lines == [
        "http://EVIL.example/b -> http://evil.example/b\n",
        "http://evil.example/a -> http://evil.example/a\n",
    ]


def test_Matcher_lookup_api_returns_hits(example: Matcher) -> None:
    hits = example.lookup(RuleType.IP, "198.51.100.77")
    assert sorted(h.snapshot.settings.category for h in hits) == ["IP_Reputation", "InternalTI"]
    assert example.lookup(RuleType.URL, "http://benign-but-listed.example/download")[0].snapshot.name == (
        "internal_ti.json"
    )
    assert example.lookup(RuleType.MD5, "44d88612fea8a8f36de82e1278abb02f")[0].context == (
        ("file_type", "text"),
        ("detection", "EICAR-Test-File"),
    )
    assert example.lookup(RuleType.SHA1, "44d88612fea8a8f36de82e1278abb02f") == []  # wrong length for SHA1
    assert example.lookup(RuleType.IP, "not an ip") == []
    assert example.lookup(RuleType.CONTEXT, "anything") == []


def test_Matcher_use_store_swaps_feeds(example_config: NodeConfig) -> None:
    matcher = build_matcher(example_config, IndicatorStore())
    event = "4 md5=c912705b4bbb14ec7e78fa8b370532c9"
    assert matcher.match([event], date=DATE) == []
    matcher.use_store(store_for(example_config))
    lines = matcher.match([event], date=DATE)
    assert len(lines) == 1 and re.search(r"category=Malicious_Hash .*detection=Trojan.Win32.Agent\n$", lines[0])
