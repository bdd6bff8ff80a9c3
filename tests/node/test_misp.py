"""Tests for threatgate.node.misp: MISP feed directories (manifest.json + <uuid>.json) into MemorySnapshot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from threatgate.config.node import FeedSettings, NodeConfig, RuleType, load_node_config
from threatgate.errors import FeedError
from threatgate.node import misp
from threatgate.node.feeds import Kind, MemorySnapshot, feed_identity, indicator_of, load_feed, record_context
from threatgate.node.matcher import Matcher
from threatgate.node.misp import load_misp
from threatgate.node.store import IndicatorStore

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FEED_DIR = EXAMPLES / "feeds" / "misp"
PHISH = "9a937b89-4d5d-46f7-86df-06a495225f41"
EICAR = "12991fb7-c36f-482d-84b3-79476d41ff3c"
EICAR_MD5 = "44d88612fea8a8f36de82e1278abb02f"
EICAR_SHA1 = "3395856ce81f2b7382dee72602f798b642f14140"
DATE = "Oct 11 22:14:15"
UUID = "00000000-0000-4000-8000-00000000000a"


def misp_settings(path: Path) -> FeedSettings:
    return FeedSettings(path=str(path), name=path.name, category="MISP_Test", format="misp")


def attribute(atype: str, value: str, to_ids: Any = True, **extra: Any) -> dict[str, Any]:
    attr: dict[str, Any] = {"uuid": "a", "type": atype, "category": "Network activity", "value": value}
    if to_ids is not None:
        attr["to_ids"] = to_ids
    attr.update(extra)
    return attr


def write_feed(directory: Path, events: dict[str, Any], manifest: Any = None) -> Path:
    """A feed directory with one file per event (a value that is not a dict is written as raw text)."""
    directory.mkdir(parents=True, exist_ok=True)
    for uuid, event in events.items():
        text = event if isinstance(event, str) else json.dumps(event)
        (directory / f"{uuid}.json").write_text(text, encoding="utf-8")
    if manifest is None:
        manifest = {uuid: {"info": "x"} for uuid in events}
    (directory / "manifest.json").write_text(
        manifest if isinstance(manifest, str) else json.dumps(manifest), encoding="utf-8"
    )
    return directory


def event(*attributes: Any, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"uuid": UUID, "info": "test event", "threat_level_id": "3", "Attribute": list(attributes)}
    body.update(fields)
    return {"Event": body}


def load_attributes(tmp_path: Path, *attributes: Any) -> MemorySnapshot:
    return load_misp(misp_settings(write_feed(tmp_path / "feed", {UUID: event(*attributes)})))


def loaded(snap: MemorySnapshot) -> list[tuple[str, str]]:
    return [next(iter(r.items())) for r in snap.records]


@pytest.fixture(scope="module")
def example() -> MemorySnapshot:
    return load_misp(misp_settings(FEED_DIR))


@pytest.fixture(scope="module")
def matcher(example: MemorySnapshot) -> Matcher:
    config: NodeConfig = load_node_config(str(EXAMPLES / "node.conf"))
    return Matcher(config, IndicatorStore({0: example.finish()}))


# -- the shipped example --------------------------------------------------------------------------


def test_load_misp_example_counts(example: MemorySnapshot) -> None:
    report = example.report
    assert report.records == 12
    assert report.skipped == 5
    assert report.malformed == 0
    assert report.per_kind == {"url": 1, "domain": 3, "ip": 4, "hash": 4}
    assert report.skip_examples == [
        f"event {PHISH} attribute 6: ip-src: to_ids is false",
        f"event {PHISH} attribute 7: attribute type 'email-src' is not looked up",
        f"event {PHISH} attribute 8: text: to_ids is false",
        f"event {EICAR} object 0 attribute 0: filename: to_ids is false",
        f"event {EICAR} object 0 attribute 2: size-in-bytes: to_ids is false",
    ]


def test_load_misp_example_indicators_and_kinds(example: MemorySnapshot) -> None:
    assert loaded(example) == [
        ("url", "http://login.example.com.phish-kit.test/account/verify"),
        ("domain", "phish-kit.test"),
        ("domain", "cdn.phish-kit.test"),
        ("ip", "192.0.2.150"),
        ("ip", "203.0.113.45"),
        ("domain", "mail.phish-kit.test"),
        ("ip", "192.0.2.25"),
        ("md5", EICAR_MD5),
        ("sha256", "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"),
        ("sha1", "5d3d93e09df1eb459844b6268b7b725ab6f43427"),
        ("ip", "2001:db8::c2"),
        ("sha1", EICAR_SHA1),
    ]
    assert list(example.kinds) == [Kind.URL] + [Kind.DOMAIN] * 2 + [Kind.IP] * 2 + [Kind.DOMAIN, Kind.IP] + [
        Kind.HASH
    ] * 3 + [Kind.IP, Kind.HASH]
    snap = example.finish()
    for record_no, record in enumerate(example.records):
        stored = snap.record(record_no)
        found = indicator_of(record)
        assert stored is not None and found is not None
        assert (stored.kind, stored.value, stored.raw) == (found.kind, found.value, found.raw)
        assert stored.context == tuple(record_context(record))


def test_load_misp_example_context_fields(example: MemorySnapshot) -> None:
    tags = 'tlp:white,misp-galaxy:threat-actor="Example Phisher"'
    assert example.records[0] == {
        "url": "http://login.example.com.phish-kit.test/account/verify",
        "event_uuid": PHISH,
        "event_info": "Phishing campaign against example.com customers",
        "category": "Network activity",
        "type": "url",
        "comment": "landing page",
        "tags": tags,
        "threat_level_id": "2",
        "org": "Example CERT",
    }
    assert list(example.records[1]) == [  # empty comment left out; field order is the rendering order
        "domain",
        "event_uuid",
        "event_info",
        "category",
        "type",
        "tags",
        "threat_level_id",
        "org",
    ]
    # domain|ip: two records with the same context
    assert example.records[5]["type"] == example.records[6]["type"] == "domain|ip"
    assert {k: v for k, v in example.records[5].items() if k != "domain"} == {
        k: v for k, v in example.records[6].items() if k != "ip"
    }
    # No tags on the second event; the multi-line comment is on one line.
    assert "tags" not in example.records[7]
    assert example.records[8]["comment"] == "EICAR test file same sample as the MD5"
    assert example.records[9]["filename"] == "dropper.exe"
    assert example.records[11] == {
        "sha1": EICAR_SHA1,
        "event_uuid": EICAR,
        "event_info": "EICAR dropper",
        "category": "Payload delivery",
        "type": "sha1",
        "object": "file",
        "threat_level_id": "1",
        "org": "Example SOC",
    }


def test_load_misp_example_identity_is_the_manifest(example: MemorySnapshot) -> None:
    assert example.identity == feed_identity(example.settings)
    assert example.identity[1] == (FEED_DIR / "manifest.json").stat().st_size


@pytest.mark.parametrize(
    ("rule_type", "value", "event_uuid"),
    [
        (RuleType.URL, "http://login.example.com.phish-kit.test/account/verify", PHISH),
        (RuleType.DOMAIN, "phish-kit.test", PHISH),
        (RuleType.DOMAIN, "cdn.phish-kit.test", PHISH),
        (RuleType.DOMAIN, "mail.phish-kit.test", PHISH),
        (RuleType.IP, "192.0.2.25", PHISH),
        (RuleType.IP, "203.0.113.45", PHISH),
        (RuleType.IP, "2001:db8:0:0::c2", EICAR),
        (RuleType.MD5, EICAR_MD5, EICAR),
        (RuleType.SHA1, EICAR_SHA1.upper(), EICAR),
        (RuleType.HASH, "5d3d93e09df1eb459844b6268b7b725ab6f43427", EICAR),
    ],
)
def test_load_misp_example_detects_through_matcher(
    matcher: Matcher, rule_type: RuleType, value: str, event_uuid: str
) -> None:
    hits = matcher.lookup(rule_type, value)
    assert len(hits) == 1
    assert dict(hits[0].context)["event_uuid"] == event_uuid


@pytest.mark.parametrize(
    ("rule_type", "value"),
    [
        (RuleType.IP, "192.0.2.200"),  # to_ids false
        (RuleType.DOMAIN, "login.example.com"),
        (RuleType.IP, "203.0.113.46"),
    ],
)
def test_load_misp_example_skipped_attributes_detect_nothing(matcher: Matcher, rule_type: RuleType, value: str) -> None:
    assert matcher.lookup(rule_type, value) == []


def test_load_misp_example_detection_line(matcher: Matcher) -> None:
    lines = matcher.match(["9 src=203.0.113.45 dst=10.0.0.1"], date=DATE)
    assert lines == [
        "9 category=MISP_Test matchedIndicator=203.0.113.45 confidence=100 source=default "
        f"event_uuid={PHISH} event_info=Phishing campaign against example.com customers category=Network activity "
        'type=ip-dst|port tags=tlp:white,misp-galaxy:threat-actor="Example Phisher" threat_level_id=2 '
        "org=Example CERT\n"
    ]


# -- attributes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attr", "expected"),
    [
        (attribute("url", "http://a.example/x"), [("url", "http://a.example/x")]),
        (attribute("domain", "a.example"), [("domain", "a.example")]),
        (attribute("hostname", "www.a.example"), [("domain", "www.a.example")]),
        (attribute("ip-src", "192.0.2.1"), [("ip", "192.0.2.1")]),
        (attribute("ip-dst", "198.51.100.0/24"), [("ip", "198.51.100.0/24")]),
        (attribute("ip-src|port", "192.0.2.1|1234"), [("ip", "192.0.2.1")]),
        (attribute("ip-dst|port", "2001:db8::1|443"), [("ip", "2001:db8::1")]),
        (attribute("domain|ip", "a.example|192.0.2.9"), [("domain", "a.example"), ("ip", "192.0.2.9")]),
        (attribute("md5", EICAR_MD5), [("md5", EICAR_MD5)]),
        (attribute("sha1", EICAR_SHA1), [("sha1", EICAR_SHA1)]),
        (attribute("sha256", "a" * 64), [("sha256", "a" * 64)]),
        (attribute("filename|md5", f"x.exe|{EICAR_MD5}"), [("md5", EICAR_MD5)]),
        (attribute("filename|sha1", f"a|b.exe|{EICAR_SHA1}"), [("sha1", EICAR_SHA1)]),
        (attribute("filename|sha256", "y.dll|" + "b" * 64), [("sha256", "b" * 64)]),
        (attribute("url", "http://a.example/x", to_ids="1"), [("url", "http://a.example/x")]),
        (attribute("url", "http://a.example/x", to_ids=1), [("url", "http://a.example/x")]),
        (attribute("url", "http://a.example/x", to_ids="True"), [("url", "http://a.example/x")]),
    ],
)
def test_load_misp_attribute_types(tmp_path: Path, attr: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    snap = load_attributes(tmp_path, attr)
    assert loaded(snap) == expected
    assert (snap.report.malformed, snap.report.skipped) == (0, 0)


def test_load_misp_filename_is_context(tmp_path: Path) -> None:
    snap = load_attributes(tmp_path, attribute("filename|sha1", f"a|b.exe|{EICAR_SHA1}"))
    assert snap.records[0]["filename"] == "a|b.exe"


@pytest.mark.parametrize(
    ("attr", "why"),
    [
        (attribute("url", "http://a.example/x", to_ids=False), "url: to_ids is false"),
        (attribute("url", "http://a.example/x", to_ids="0"), "url: to_ids is false"),
        (attribute("url", "http://a.example/x", to_ids=0), "url: to_ids is false"),
        (attribute("url", "http://a.example/x", to_ids=None), "url: to_ids is false"),
        (attribute("url", "http://a.example/x", to_ids=[True]), "url: to_ids is false"),
        (attribute("url", "http://a.example/x", deleted=True), "deleted"),
        (attribute("link", "http://a.example/report"), "attribute type 'link' is not looked up"),
        (attribute("sha512", "c" * 128), "attribute type 'sha512' is not looked up"),
        (attribute("email-src", "a@b.example"), "attribute type 'email-src' is not looked up"),
    ],
)
def test_load_misp_skipped_attributes(tmp_path: Path, attr: dict[str, Any], why: str) -> None:
    snap = load_attributes(tmp_path, attr)
    assert (snap.report.records, snap.report.malformed, snap.report.skipped) == (0, 0, 1)
    assert snap.report.skip_examples == [f"event {UUID} attribute 0: {why}"]


@pytest.mark.parametrize(
    ("attr", "why"),
    [
        (attribute("ip-dst", "999.1.1.1"), "ip-dst '999.1.1.1' is not a valid ip"),
        (attribute("domain", "not a domain!"), "is not a valid domain"),
        (attribute("md5", "a" * 64), "is not a valid md5"),
        (attribute("sha256", EICAR_MD5), "is not a valid sha256"),
        (attribute("ip-dst|port", "192.0.2.1"), "expected <address>|<port>"),
        (attribute("domain|ip", "a.example"), "expected <domain>|<address>"),
        (attribute("filename|md5", EICAR_MD5), "expected <filename>|<hash>"),
        (attribute("url", 5), "type and value must be strings"),
        ({"value": "192.0.2.1", "to_ids": True}, "type and value must be strings"),
        ("not an attribute", "expected an object, got str"),
    ],
)
def test_load_misp_malformed_attributes(tmp_path: Path, attr: Any, why: str) -> None:
    snap = load_attributes(tmp_path, attr, attribute("ip-dst", "192.0.2.7"))
    assert loaded(snap) == [("ip", "192.0.2.7")]
    assert (snap.report.malformed, snap.report.skipped) == (1, 0)
    assert snap.report.examples[0].startswith(f"event {UUID} attribute 0: ")
    assert why in snap.report.examples[0]


def test_load_misp_domain_ip_with_one_bad_half(tmp_path: Path) -> None:
    snap = load_attributes(tmp_path, attribute("domain|ip", "a.example|999.0.0.1"))
    assert loaded(snap) == [("domain", "a.example")]
    assert snap.report.malformed == 1


def test_load_misp_objects(tmp_path: Path) -> None:
    body = event(
        Object=[
            {"name": "domain-ip", "Attribute": [attribute("domain", "o.example"), attribute("ip-dst", "192.0.2.5")]},
            {"Attribute": [attribute("url", "http://nameless.example/x")]},
            "not an object",
            {"name": "broken", "Attribute": {"not": "a list"}},
            {"name": "empty"},
        ]
    )
    snap = load_misp(misp_settings(write_feed(tmp_path / "feed", {UUID: body})))
    assert loaded(snap) == [("domain", "o.example"), ("ip", "192.0.2.5"), ("url", "http://nameless.example/x")]
    assert [r["object"] for r in snap.records] == ["domain-ip", "domain-ip", "object"]
    assert snap.report.examples == [
        f"event {UUID} object 2: expected an object, got str",
        f"event {UUID} object 3: Attribute is not a list",
    ]


def test_load_misp_event_context_tolerates_odd_shapes(tmp_path: Path) -> None:
    body = event(
        attribute("domain", "a.example", comment="two\nlines"),
        info="multi\nline info",
        Tag=[{"name": "t1"}, "not a tag", {"colour": "#fff"}, {"name": "t2"}],
        Orgc="not an object",
        threat_level_id=None,
    )
    snap = load_misp(misp_settings(write_feed(tmp_path / "feed", {UUID: body})))
    assert snap.records == [
        {
            "domain": "a.example",
            "event_uuid": UUID,
            "event_info": "multi line info",
            "category": "Network activity",
            "type": "domain",
            "comment": "two lines",
            "tags": "t1,t2",
        }
    ]


def test_load_misp_event_uuid_falls_back_to_the_manifest_key(tmp_path: Path) -> None:
    body = {"Event": {"Attribute": [attribute("domain", "a.example")]}}
    snap = load_misp(misp_settings(write_feed(tmp_path / "feed", {UUID: body})))
    assert snap.records[0]["event_uuid"] == UUID


# -- hostile or broken feeds ----------------------------------------------------------------------


def test_load_misp_manifest_key_outside_the_directory_is_never_read(tmp_path: Path) -> None:
    feed = tmp_path / "feed"
    # A valid event one level up: a manifest naming "../secret" must not load it.
    (tmp_path / "secret.json").write_text(json.dumps(event(attribute("domain", "secret.example"))), encoding="utf-8")
    (tmp_path / "feed" / "sub").mkdir(parents=True)
    (tmp_path / "feed" / "sub" / "x.json").write_text(json.dumps(event(attribute("domain", "sub.example"))))
    manifest = {"../secret": {}, "sub/x": {}, "..": {}, "/etc/passwd": {}, "a.b": {}, "": {}, UUID: {}}
    snap = load_misp(misp_settings(write_feed(feed, {UUID: event(attribute("domain", "ok.example"))}, manifest)))
    assert loaded(snap) == [("domain", "ok.example")]
    assert snap.report.malformed == 6
    assert snap.report.examples[0] == "manifest key '../secret': not a UUID-like event name; no file is read for it"


def test_load_misp_missing_or_broken_event_is_counted_others_load(tmp_path: Path) -> None:
    good = "00000000-0000-4000-8000-000000000001"
    events: dict[str, Any] = {
        good: event(attribute("domain", "ok.example")),
        "00000000-0000-4000-8000-000000000002": "{not json",
        "00000000-0000-4000-8000-000000000003": json.dumps([1, 2]),
        "00000000-0000-4000-8000-000000000004": json.dumps({"Event": "x"}),
        "00000000-0000-4000-8000-000000000005": json.dumps(event(Attribute={"not": "a list"})),
    }
    manifest = {uuid: {} for uuid in [*events, "00000000-0000-4000-8000-000000000006"]}
    snap = load_misp(misp_settings(write_feed(tmp_path / "feed", events, manifest)))
    assert loaded(snap) == [("domain", "ok.example")]
    assert snap.report.malformed == 5
    examples = snap.report.examples
    assert "invalid JSON" in examples[0]
    assert examples[1].endswith('expected {"Event": {...}}')
    assert examples[2].endswith('expected {"Event": {...}}')
    assert examples[3].endswith("Attribute is not a list")
    assert examples[4].startswith("event 00000000-0000-4000-8000-000000000006: cannot read")


def test_load_misp_event_without_attributes(tmp_path: Path) -> None:
    snap = load_misp(misp_settings(write_feed(tmp_path / "feed", {UUID: {"Event": {"info": "empty"}}})))
    assert (snap.report.records, snap.report.malformed, snap.report.skipped) == (0, 0, 0)


def test_load_misp_empty_manifest(tmp_path: Path) -> None:
    snap = load_misp(misp_settings(write_feed(tmp_path / "feed", {}, {})))
    assert snap.report.records == 0


@pytest.mark.parametrize(
    ("manifest", "error"),
    [
        ("[]", "must be a JSON object keyed by event UUID"),
        ('"x"', "must be a JSON object keyed by event UUID"),
        ("{", "invalid JSON"),
        ("", "invalid JSON"),
    ],
)
def test_load_misp_bad_manifest_is_feed_error(tmp_path: Path, manifest: str, error: str) -> None:
    feed = write_feed(tmp_path / "feed", {UUID: event(attribute("domain", "a.example"))}, manifest)
    with pytest.raises(FeedError, match=error):
        load_misp(misp_settings(feed))


def test_load_misp_missing_manifest_or_directory_is_feed_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeedError, match="manifest.json: cannot read"):
        load_feed(misp_settings(tmp_path / "empty"))
    with pytest.raises(FeedError, match="cannot read"):
        load_feed(misp_settings(tmp_path / "missing"))


def test_load_misp_oversized_event_is_feed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    feed = tmp_path / "feed"
    shutil.copytree(FEED_DIR, feed)
    limit = max(p.stat().st_size for p in feed.iterdir()) - 1
    monkeypatch.setattr(misp, "MAX_EVENT_FILE_SIZE", limit)
    with pytest.raises(FeedError, match="more than the limit"):
        load_misp(misp_settings(feed))
    monkeypatch.setattr(misp, "MAX_EVENT_FILE_SIZE", limit + 1)
    assert load_misp(misp_settings(feed)).report.records == 12


def test_load_misp_identity_follows_the_manifest(tmp_path: Path) -> None:
    feed = write_feed(tmp_path / "feed", {UUID: event(attribute("domain", "a.example"))})
    settings = misp_settings(feed)
    snap = load_misp(settings)
    assert snap.identity == feed_identity(settings) != (-1, -1, -1)
    (feed / "manifest.json").write_text(json.dumps({UUID: {"info": "changed"}}), encoding="utf-8")
    assert feed_identity(settings) != snap.identity
