"""Tests for threatgate.node.stix: STIX 2.x bundles into MemorySnapshot, and the pattern parser."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threatgate.config.node import FeedSettings, NodeConfig, RuleType, load_node_config
from threatgate.errors import FeedError
from threatgate.node import stix
from threatgate.node.feeds import Kind, MemorySnapshot, feed_identity, indicator_of, load_feed, record_context
from threatgate.node.matcher import Matcher
from threatgate.node.stix import Comparison, PatternError, UnsupportedPattern, load_stix, parse_pattern
from threatgate.node.store import IndicatorStore

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BUNDLE = EXAMPLES / "feeds" / "stix_bundle.json"
EICAR_MD5 = "44d88612fea8a8f36de82e1278abb02f"
EICAR_SHA256 = "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"
DATE = "Oct 11 22:14:15"
PAYLOAD_URL = "http://malicious.example.com/dl/payload.exe"


def stix_settings(path: Path | str = "mem.json") -> FeedSettings:
    return FeedSettings(path=str(path), name=Path(path).name, category="STIX_Test", format="stix")


def indicator(pattern: str, **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "type": "indicator",
        "spec_version": "2.1",
        "id": "indicator--00000000-0000-4000-8000-000000000001",
        "pattern": pattern,
        "pattern_type": "stix",
        "valid_from": "2026-01-01T00:00:00Z",
    }
    obj.update(extra)
    return obj


def bundle(*objects: Any) -> str:
    return json.dumps({"type": "bundle", "id": "bundle--00000000-0000-4000-8000-000000000000", "objects": objects})


def load_objects(*objects: Any) -> MemorySnapshot:
    return load_stix(stix_settings(), bundle(*objects))


def loaded(snap: MemorySnapshot) -> list[tuple[str, str]]:
    """(record field, value) of each record, in order."""
    return [next(iter(r.items())) for r in snap.records]


@pytest.fixture(scope="module")
def example() -> MemorySnapshot:
    return load_stix(stix_settings(BUNDLE))


@pytest.fixture(scope="module")
def matcher(example: MemorySnapshot) -> Matcher:
    config: NodeConfig = load_node_config(str(EXAMPLES / "node.conf"))
    return Matcher(config, IndicatorStore({0: example.finish()}))


# -- the shipped example --------------------------------------------------------------------------


def test_load_stix_example_counts(example: MemorySnapshot) -> None:
    report = example.report
    assert report.records == 10
    assert report.skipped == 2
    assert report.malformed == 0
    assert report.examples == []
    assert report.per_kind == {"url": 2, "domain": 2, "ip": 3, "cidr": 1, "hash": 2}
    assert report.skip_examples == [
        "object 9 (indicator--6f636644-3b88-4579-b04f-755cd3600641): "
        "unsupported pattern: AND (only OR can be looked up)",
        "object 10 (indicator--f511512c-cfc9-46db-b29b-6887bc1cded4): unsupported pattern: operator MATCHES",
    ]


def test_load_stix_example_indicators_and_kinds(example: MemorySnapshot) -> None:
    assert loaded(example) == [
        ("url", "http://malicious.example.com/dl/payload.exe"),
        ("domain", "c2.botnet.test"),
        ("ip", "198.51.100.23"),
        ("ip", "198.51.100.128/25"),
        ("ip", "2001:db8::bad:1"),
        ("md5", EICAR_MD5),
        ("sha256", EICAR_SHA256),
        ("domain", "phish.example.com"),
        ("url", "http://login.example.test/verify.php"),
        ("ip", "192.0.2.66"),
    ]
    assert list(example.kinds) == [
        Kind.URL,
        Kind.DOMAIN,
        Kind.IP,
        Kind.CIDR,
        Kind.IP,
        Kind.HASH,
        Kind.HASH,
        Kind.DOMAIN,
        Kind.URL,
        Kind.IP,
    ]
    assert example.parsed.values[0] == "malicious.example.com/dl/payload.exe"
    assert example.parsed.values[5] == EICAR_MD5
    assert example.parsed.values[3] == f"4/25/{(198 << 24 | 51 << 16 | 100 << 8 | 128) >> 7}"


def test_load_stix_example_context_fields(example: MemorySnapshot) -> None:
    assert example.records[0] == {
        "url": "http://malicious.example.com/dl/payload.exe",
        "stix_id": "indicator--a0bf8a89-5483-4607-8b40-3a4b0e4ac2e0",
        "name": "Payload download URL",
        "indicator_types": "malicious-activity",
        "valid_from": "2026-01-05T09:10:00Z",
        "confidence": "85",
    }
    assert example.records[1] == {
        "domain": "c2.botnet.test",
        "stix_id": "indicator--bb113a85-b577-4df0-a099-2dfcc4ac1423",
        "name": "Botnet C2 domain",
        "indicator_types": "malicious-activity,attribution",
        "valid_from": "2026-01-05T09:11:00Z",
        "labels": "botnet,c2",
    }
    # Every comparison of the OR pattern carries the indicator's context.
    assert {r["stix_id"] for r in example.records[7:]} == {"indicator--7c884da6-1e95-4892-a200-cc8acaca33ed"}


def test_load_stix_example_records_read_back_as_their_indicator(example: MemorySnapshot) -> None:
    snap = example.finish()
    for record_no, record in enumerate(example.records):
        stored = snap.record(record_no)
        found = indicator_of(record)
        assert stored is not None and found is not None
        assert (stored.kind, stored.value, stored.raw) == (found.kind, found.value, found.raw)
        assert stored.context == tuple(record_context(record))
    assert snap.record(len(example.records)) is None


def test_load_stix_example_identity_is_the_file(example: MemorySnapshot) -> None:
    assert example.identity == feed_identity(example.settings)
    assert example.identity[1] == os.path.getsize(BUNDLE)


@pytest.mark.parametrize(
    ("rule_type", "value", "stix_id"),
    [
        (RuleType.URL, PAYLOAD_URL, "indicator--a0bf8a89-5483-4607-8b40-3a4b0e4ac2e0"),
        (RuleType.DOMAIN, "c2.botnet.test", "indicator--bb113a85-b577-4df0-a099-2dfcc4ac1423"),
        (RuleType.IP, "198.51.100.23", "indicator--aa517b36-f232-4947-b7b7-fc3a9ebd8d02"),
        (RuleType.IP, "198.51.100.200", "indicator--7b280f65-b0b3-4d40-a477-45214fa8da8f"),
        (RuleType.IP, "2001:DB8:0::BAD:1", "indicator--411eb6be-1d51-4f5c-a91a-a19adb7e907e"),
        (RuleType.MD5, EICAR_MD5.upper(), "indicator--fd2ca9e1-74f0-4ff2-9dd0-730ef5d33051"),
        (RuleType.HASH, EICAR_SHA256, "indicator--85afe2cd-2eff-4628-9d97-18e98bc99d48"),
        (RuleType.URL, "https://phish.example.com/anything", "indicator--7c884da6-1e95-4892-a200-cc8acaca33ed"),
        (RuleType.URL, "http://login.example.test/verify.php", "indicator--7c884da6-1e95-4892-a200-cc8acaca33ed"),
        (RuleType.IP, "192.0.2.66", "indicator--7c884da6-1e95-4892-a200-cc8acaca33ed"),
    ],
)
def test_load_stix_example_detects_through_matcher(
    matcher: Matcher, rule_type: RuleType, value: str, stix_id: str
) -> None:
    hits = matcher.lookup(rule_type, value)
    assert len(hits) == 1
    assert dict(hits[0].context)["stix_id"] == stix_id


@pytest.mark.parametrize(
    ("rule_type", "value"),
    [
        (RuleType.MD5, "eceefe3f38ebf47690cc547c0eeb9799"),  # only inside the AND pattern
        (RuleType.URL, "https://cdn7.example.net/x"),  # only the MATCHES pattern
        (RuleType.DOMAIN, "botnet.test"),  # a parent of a listed domain
        (RuleType.IP, "198.51.100.127"),  # just below the /25
    ],
)
def test_load_stix_example_skipped_patterns_detect_nothing(matcher: Matcher, rule_type: RuleType, value: str) -> None:
    assert matcher.lookup(rule_type, value) == []


def test_load_stix_example_detection_line(matcher: Matcher) -> None:
    lines = matcher.match(["7 src=10.0.0.1 dst=198.51.100.200"], date=DATE)
    assert lines == [
        "7 category=STIX_Test matchedIndicator=198.51.100.128/25 confidence=100 source=default "
        "stix_id=indicator--7b280f65-b0b3-4d40-a477-45214fa8da8f name=Bulletproof hosting range "
        "indicator_types=malicious-activity valid_from=2026-01-05T09:13:00Z\n"
    ]


# -- pattern parser -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("[url:value = 'http://a.example/x']", [("url", "http://a.example/x")]),
        ("[url:value='http://a.example/x']", [("url", "http://a.example/x")]),
        ("  [ url:value\t=\n'http://a.example/x' ]  ", [("url", "http://a.example/x")]),
        ("[domain-name:value = 'a.example']", [("domain", "a.example")]),
        ("[ipv4-addr:value = '192.0.2.1']", [("ip", "192.0.2.1")]),
        ("[ipv6-addr:value = '2001:db8::/32']", [("ip", "2001:db8::/32")]),
        ("[file:hashes.MD5 = 'x']", [("md5", "x")]),
        ("[file:hashes.md5 = 'x']", [("md5", "x")]),
        ("[file:hashes.'MD5' = 'x']", [("md5", "x")]),
        ("[file:hashes.'SHA-1' = 'x']", [("sha1", "x")]),
        ("[file:hashes.SHA1 = 'x']", [("sha1", "x")]),
        ("[file:hashes.'sha-1' = 'x']", [("sha1", "x")]),
        ("[file:hashes.'SHA-256' = 'x']", [("sha256", "x")]),
        ("[file:hashes.SHA256 = 'x']", [("sha256", "x")]),
        ("[file:hashes.'Sha256' = 'x']", [("sha256", "x")]),
        ("[url:'value' = 'x']", [("url", "x")]),
        ("[url:value = 'it\\'s']", [("url", "it's")]),
        ("[url:value = 'a\\\\b']", [("url", "a\\b")]),
        ("[url:value = 'a]b OR c']", [("url", "a]b OR c")]),
        ("[url:value = '']", [("url", "")]),
        (
            "[url:value = 'a' OR domain-name:value = 'b'] OR [ipv4-addr:value = 'c']",
            [("url", "a"), ("domain", "b"), ("ip", "c")],
        ),
        ("([url:value = 'a'] OR ([url:value = 'b']))", [("url", "a"), ("url", "b")]),
        ("[(url:value = 'a' OR (url:value = 'b'))]", [("url", "a"), ("url", "b")]),
    ],
)
def test_parse_pattern_supported(pattern: str, expected: list[tuple[str, str]]) -> None:
    assert [(c.field, c.value) for c in parse_pattern(pattern)] == expected


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("[file:name = 'x']", "object path file:name"),
        ("[email-addr:value = 'a@b.example']", "object path email-addr:value"),
        ("[file:hashes.'SHA-512' = 'x']", "object path file:hashes.'SHA-512'"),
        ("[url:VALUE = 'x']", "object path url:VALUE"),
        ("[URL:value = 'x']", "object path URL:value"),
        ("[url:value MATCHES '^a']", "operator MATCHES"),
        ("[url:value LIKE 'a%']", "operator LIKE"),
        ("[url:value != 'a']", "operator !="),
        ("[url:value IN ('a', 'b')]", "operator IN"),
        ("[url:value NOT = 'a']", "operator NOT ="),
        ("[ipv4-addr:value ISSUBSET '192.0.2.0/24']", "operator ISSUBSET"),
        ("[file:size > 5]", "operator >"),
        ("[EXISTS file:name]", "EXISTS"),
        ("[url:value = 5]", "url:value = 5: the value is not a string"),
        ("[file:extensions.'windows-pebinary-ext'.sections[*].entropy > 7]", "operator >"),
    ],
)
def test_parse_pattern_unsupported_comparison(pattern: str, why: str) -> None:
    (comp,) = parse_pattern(pattern)
    assert comp.field == ""
    assert comp.unsupported == why


def test_parse_pattern_or_keeps_supported_branches() -> None:
    comps = parse_pattern("[file:hashes.MD5 = 'a' OR file:hashes.'SHA-512' = 'b' OR url:value IN ('c')]")
    assert comps == [
        Comparison("file:hashes.MD5", "md5", "a"),
        Comparison("file:hashes.'SHA-512'", "", "b", "object path file:hashes.'SHA-512'"),
        Comparison("url:value", "", "", "operator IN"),
    ]


@pytest.mark.parametrize(
    ("pattern", "keyword"),
    [
        ("[url:value = 'a' AND domain-name:value = 'b']", "AND"),
        ("[url:value = 'a' OR domain-name:value = 'b' AND url:value = 'c']", "AND"),
        ("[url:value = 'a'] AND [url:value = 'b']", "AND"),
        ("[url:value = 'a'] FOLLOWEDBY [url:value = 'b']", "FOLLOWEDBY"),
        ("[url:value = 'a'] WITHIN 300 SECONDS", "WITHIN"),
        ("[url:value = 'a'] REPEATS 5 TIMES", "REPEATS"),
        ("[url:value = 'a'] START t'2026-01-01T00:00:00Z' STOP t'2026-02-01T00:00:00Z'", "START"),
        ("([url:value = 'a'] OR [url:value = 'b']) WITHIN 5 SECONDS", "WITHIN"),
        ("[url:value MATCHES 'x' AND url:value = 'y']", "AND"),
        ("(" * 40 + "[url:value = 'a']" + ")" * 40, "nested more than"),
    ],
)
def test_parse_pattern_structural_is_unsupported(pattern: str, keyword: str) -> None:
    with pytest.raises(UnsupportedPattern, match=keyword):
        parse_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "error"),
    [
        ("", "empty pattern"),
        ("   ", "empty pattern"),
        ("url:value = 'a'", "expected '\\[' or '\\(' starting an observation"),
        ("[url:value = 'a'", "expected '\\]' closing an observation, found the end"),
        ("[url:value = 'a'] OR", "found the end"),
        ("[url:value = 'a' 'b']", "found 'b'"),
        ("[url:value = 'a' or url:value = 'b']", "found 'or'"),
        ("[url:value = 'unterminated]", "unterminated string"),
        ("[url:value = 'a\\nb']", "invalid escape"),
        ("[url:value]", "expected an operator"),
        ("[url:value = ]", "missing value"),
        ("[url:value ~ 'a']", "expected an operator"),
        ("[url = 'a']", "expected ':'"),
        ("[:value = 'a']", "expected an object path"),
        ("[url:value IN ('a', 'b']", "expected '\\)'|unbalanced"),
        ("[[[[", "expected an object path"),
        ('{"not": "a pattern"}', "starting an observation"),
    ],
)
def test_parse_pattern_invalid(pattern: str, error: str) -> None:
    with pytest.raises(PatternError, match=error):
        parse_pattern(pattern)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("[]()'\\:.=!<> ORAND url value-name,*5\n\x00é")), max_size=60))
def test_parse_pattern_garbage_never_raises_anything_else(pattern: str) -> None:
    try:
        comps = parse_pattern(pattern)
    except (PatternError, UnsupportedPattern):
        return
    assert all(isinstance(c, Comparison) for c in comps)


# -- objects into records -------------------------------------------------------------------------


def test_load_stix_or_pattern_loads_supported_branches_and_counts_the_rest() -> None:
    snap = load_objects(indicator("[url:value = 'http://a.example/x' OR file:hashes.'SHA-512' = 'ab']"))
    assert loaded(snap) == [("url", "http://a.example/x")]
    assert snap.report.skipped == 1
    assert snap.report.skip_examples == [
        "object 0 (indicator--00000000-0000-4000-8000-000000000001): "
        "unsupported pattern: object path file:hashes.'SHA-512'"
    ]


def test_load_stix_duplicate_comparisons_load_once() -> None:
    snap = load_objects(indicator("[url:value = 'http://a.example/x'] OR [url:value = 'http://a.example/x']"))
    assert snap.report.records == 1


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("[ipv4-addr:value = '999.1.1.1']", "ipv4-addr:value '999.1.1.1' is not a valid indicator"),
        ("[ipv4-addr:value = '2001:db8::1']", "ipv4-addr:value '2001:db8::1' is not an IPv4 address"),
        ("[ipv6-addr:value = '192.0.2.1']", "ipv6-addr:value '192.0.2.1' is not an IPv6 address"),
        ("[ipv4-addr:value = '192.0.2.0/33']", "is not a valid indicator"),
        ("[domain-name:value = 'not a domain!']", "is not a valid indicator"),
        ("[url:value = '']", "is not a valid indicator"),
        (f"[file:hashes.MD5 = '{EICAR_SHA256}']", "is not a MD5 (32 hex digits)"),
        ("[file:hashes.'SHA-256' = 'zz']", "is not a SHA256 (64 hex digits)"),
        (f"[file:hashes.SHA1 = '{'g' * 40}']", "is not a valid indicator"),
    ],
)
def test_load_stix_rejected_value_is_malformed(pattern: str, why: str) -> None:
    snap = load_objects(indicator(pattern), indicator("[url:value = 'http://ok.example/']"))
    assert snap.report.records == 1
    assert snap.report.malformed == 1
    assert snap.report.skipped == 0
    assert snap.report.examples[0].startswith("object 0 (indicator--")
    assert why in snap.report.examples[0]


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        (indicator("[url:value = 'http://a.example/']", revoked=True), "revoked"),
        (indicator("rule x { condition: true }", pattern_type="yara"), "pattern_type 'yara' is not supported"),
        (indicator("[url:value = 'a'] FOLLOWEDBY [url:value = 'b']"), "unsupported pattern: FOLLOWEDBY"),
        (indicator("[url:value LIKE 'http://%']"), "unsupported pattern: operator LIKE"),
    ],
)
def test_load_stix_skipped_objects(obj: dict[str, Any], why: str) -> None:
    snap = load_objects(obj)
    assert snap.report.records == 0
    assert snap.report.malformed == 0
    assert snap.report.skipped == 1
    assert why in snap.report.skip_examples[0]


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        (indicator("[url:value = 'a"), "invalid pattern: unterminated string"),
        (indicator("definitely not a pattern"), "invalid pattern"),
        ({"type": "indicator", "id": "indicator--x"}, "no pattern"),
        (indicator(["[url:value = 'a']"]), "no pattern"),
        (5, "object 0: expected an object, got int"),
        ("indicator", "object 0: expected an object, got str"),
    ],
)
def test_load_stix_malformed_objects(obj: Any, why: str) -> None:
    snap = load_objects(obj, indicator("[url:value = 'http://ok.example/x']"))
    assert snap.report.records == 1
    assert snap.report.malformed == 1
    assert why in snap.report.examples[0]


def test_load_stix_non_indicator_objects_ignored_silently() -> None:
    snap = load_objects(
        {"type": "identity", "id": "identity--1", "name": "x"},
        {"type": "malware", "id": "malware--1", "pattern": "[url:value = 'http://a.example/x']"},
        {"type": "relationship", "id": "relationship--1"},
        {"no": "type"},
    )
    assert (snap.report.records, snap.report.malformed, snap.report.skipped) == (0, 0, 0)


def test_load_stix_2_0_bundle() -> None:
    data = json.dumps(
        {
            "type": "bundle",
            "id": "bundle--1",
            "spec_version": "2.0",
            "objects": [
                {
                    "type": "indicator",
                    "id": "indicator--2",
                    "labels": ["malicious-activity"],
                    "pattern": "[domain-name:value = 'old.example']",
                    "valid_from": "2017-01-01T00:00:00Z",
                }
            ],
        }
    )
    snap = load_stix(stix_settings(), data.encode())
    assert snap.records == [
        {
            "domain": "old.example",
            "stix_id": "indicator--2",
            "valid_from": "2017-01-01T00:00:00Z",
            "labels": "malicious-activity",
        }
    ]


def test_load_stix_context_is_one_line_and_only_scalars() -> None:
    snap = load_objects(
        indicator(
            "[url:value = 'http://a.example/x']",
            name="line one\nline two\r\tend",
            confidence={"nested": 1},
            labels=["a", {"x": 1}, "b\nc", None],
            indicator_types="not-a-list",
        )
    )
    record = snap.records[0]
    assert record["name"] == "line one line two  end"
    assert "confidence" not in record
    assert record["labels"] == "a,b c"
    assert record["indicator_types"] == "not-a-list"


def test_load_stix_from_str_and_bytes_without_a_file() -> None:
    text = bundle(indicator("[url:value = 'http://a.example/x']"))
    for data in (text, text.encode(), b"\xef\xbb\xbf" + text.encode()):
        snap = load_stix(stix_settings("/nonexistent/feed.json"), data)
        assert snap.report.records == 1
        assert snap.identity == (0, 0, 0)


def test_load_stix_empty_objects() -> None:
    snap = load_objects()
    assert (snap.report.records, snap.report.malformed, snap.report.skipped) == (0, 0, 0)


# -- not a bundle: FeedError ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"not json", "invalid JSON"),
        (b"", "invalid JSON"),
        (b'{"type": "bundle", "objects": [', "invalid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[]", "must be a bundle"),
        (b'"bundle"', "must be a bundle"),
        (b'{"type": "indicator", "objects": []}', "must be a bundle"),
        (b'{"objects": []}', "must be a bundle"),
        (b'{"type": "bundle"}', 'no "objects" array'),
        (b'{"type": "bundle", "objects": {"a": 1}}', 'no "objects" array'),
        (b'{"type": "bundle", "objects": null}', 'no "objects" array'),
        (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
        (b'{"type": "bundle", "objects": [' + b"1" * 5000 + b"]}", "invalid JSON"),
    ],
)
def test_load_stix_not_a_bundle_is_feed_error(data: bytes, error: str) -> None:
    with pytest.raises(FeedError, match=error):
        load_stix(stix_settings(), data)


def test_load_stix_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FeedError, match="cannot read"):
        load_feed(stix_settings(tmp_path / "missing.json"))
    with pytest.raises(FeedError, match="not a regular file"):
        load_feed(stix_settings(tmp_path))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(FeedError, match="not a regular file"):  # and it does not block waiting for a writer
        load_feed(stix_settings(fifo))


def test_load_stix_oversized_file_is_feed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.json"
    path.write_text(bundle(indicator("[url:value = 'http://a.example/x']")), encoding="utf-8")
    monkeypatch.setattr(stix, "MAX_BUNDLE_SIZE", path.stat().st_size - 1)
    with pytest.raises(FeedError, match="more than the limit"):
        load_feed(stix_settings(path))
    monkeypatch.setattr(stix, "MAX_BUNDLE_SIZE", path.stat().st_size)
    assert load_feed(stix_settings(path)).report.records == 1
