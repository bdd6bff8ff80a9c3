"""The compiled engine against the reference matcher: same lines, byte for byte, whatever the input.

Whole batches through both engines on random rule sets, feeds and hostile events, and the choices the
compiled engine makes (a Python-only construct or a replace rule sends that source to the reference path,
logged once, same answers).  The regex translation (node/pcre.py) has its own tests in
tests/node/test_pcre.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threatgate.config.node import NodeConfig, load_node_config
from threatgate.node import _engine
from threatgate.node.engine import CompiledMatcher, engine_choice, make_matcher
from threatgate.node.feeds import load_feed
from threatgate.node.matcher import Matcher, MatchStats
from threatgate.node.snapshots import SnapshotDir
from threatgate.node.store import IndicatorStore
from threatgate.wire.framing import FramedEvent, LineFramer, Oversized

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DATE = "Oct 11 22:14:15"

# -- 1. the native helpers ---------------------------------------------------------------------------------


def test_an_empty_finished_format_renders_an_empty_line(tmp_path: Path) -> None:
    config = _config(tmp_path, *FORMATS[0], 0)
    config = config.model_copy(update={"output": config.output.model_copy(update={"finished_format": ""})})
    store = _store(config)
    events: list[FramedEvent] = ["1 url=http://fine.example/", "2 url=http://evil.example/a"]
    want = Matcher(config, store).match(events, date=DATE, finished=True)
    assert make_matcher(config, store, "compiled").match(events, date=DATE, finished=True) == want


def test_key_of_is_xxh3_of_utf8_with_the_kind_as_seed() -> None:
    import xxhash

    for kind, value in [(0, "evil.example/a"), (5, "d41d8cd98f00b204e9800998ecf8427e"), (1, "пример.рф")]:
        data = value.encode("utf-8", "surrogatepass")
        assert _engine.key_of(kind, data) == xxhash.xxh3_64_intdigest(data, seed=kind)


# -- 2. whole batches, both engines ---------------------------------------------------------------------

RULES = {
    "default": r"""
      <Source id="default">
        <REQ type="CONTEXT">^(\d+)\s</REQ>
        <RE_URL type="URL" extract="all">url=(\S+)</RE_URL>
        <RE_IP type="IP" extract="all">(?:src|dst)=(\S+)</RE_IP>
        <RE_DOMAIN type="DOMAIN" extract="first">host=(\S+)</RE_DOMAIN>
        <RE_MD5 type="MD5" extract="first">md5=([\da-fA-F]{32})</RE_MD5>
        <RE_HASH type="HASH" extract="all">(?:sha|hash)=(\S+)|file=(\S+)</RE_HASH>
        <USER type="CONTEXT">suser=(\w+)</USER>
      </Source>
      <Source id="fw" ip="10.9.9.9">
        <NormalizingRules><Ignore>action=drop\b</Ignore></NormalizingRules>
        <RE_IP type="IP" extract="first">dst=(\S+)</RE_IP>
      </Source>
      <Source id="dns" hostname="dns01">
        <NormalizingRules><Ignore>query=localhost\b</Ignore></NormalizingRules>
        <RE_DOMAIN type="DOMAIN" extract="all">query=(\S+)</RE_DOMAIN>
      </Source>
      <Source id="rw" hostname="rw01">
        <NormalizingRules>
          <Replace input="uri=" output="url="/>
          <Replace input="\|\|" output="&#10;"/>
          <Ignore>action=drop</Ignore>
        </NormalizingRules>
        <USER type="CONTEXT">suser=(\w+)</USER>
      </Source>
      <Source id="mangle" hostname="mg01">
        <NormalizingRules><Replace input="x*" output="-"/><Replace input="u??" output="+"/></NormalizingRules>
        <REQ type="CONTEXT">(?:\S{1,30})</REQ>
      </Source>
      <Source id="uni" hostname="uni01">
        <NormalizingRules><Replace input="uri=" output="url=é"/></NormalizingRules>
      </Source>
""",
}

FEEDS: list[tuple[str, str, list[dict[str, Any]]]] = [
    (
        "urls.json",
        'category="Bad_URL" confidence="70"',
        [
            {"url": "http://evil.example/a", "threat": "A"},
            {"url": "evil.example/b?x=1", "threat": "B"},
            {"mask": "*.cdn.example/payload/*", "threat": "mask"},
            {"mask": "*evil*", "threat": "star host"},
            {"url": "http://[2001:db8::1]/x", "threat": "v6 url"},
        ],
    ),
    (
        "ips.json",
        'category="Bad_IP" confidence="60"',
        [
            {"ip": "10.1.2.3", "threat": "exact"},
            {"ip": "10.0.0.0/8", "threat": "cidr8"},
            {"ip": "10.1.0.0/16", "threat": "cidr16"},
            {"ip": "2001:db8::/32", "threat": "v6 cidr"},
            {"ip": "2001:db8::5", "threat": "v6"},
        ],
    ),
    (
        "domains.json",
        'category="Bad_Domain" confidence="90"',
        [
            {"domain": "bad.example", "threat": "exact"},
            {"domain": "*.dyn.test", "threat": "suffix"},
            {"domain": "xn--e1afmkfd.xn--p1ai", "threat": "idn"},
        ],
    ),
    (
        "hashes.json",
        'category="Bad_Hash" confidence="100"',
        [
            {"md5": "d41d8cd98f00b204e9800998ecf8427e", "threat": "empty"},
            {"sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "threat": "sha"},
        ],
    ),
    ("fp.json", 'supplier="FalsePositive"', [{"ip": "10.1.2.4"}, {"url": "http://evil.example/a"}]),
    ("iti.json", 'supplier="InternalTI" category="InternalTI"', [{"ip": "10.1.2.4", "owner": "SOC"}]),
]

FORMATS = [
    ("%REQ% category=%Category% matched=%MatchedIndicator% src=%SourceId% %RecordContext%", "%REQ% LookupFinished"),
    (
        "%Date% %REQ% %Category%%RecordContext% %ActionableFields% u=%USER% url=%RE_URL%",
        "%Date% %REQ% LookupFinished%RecordContext% %SourceId% u=%USER% d=%RE_DOMAIN% h=%RE_HASH% é",
    ),
]


def _config(directory: Path, event_format: str, finished_format: str, limit: int) -> NodeConfig:
    directory.mkdir(parents=True, exist_ok=True)
    feed_xml = []
    for name, attrs, records in FEEDS:
        (directory / name).write_text(json.dumps(records), encoding="utf-8")
        feed_xml.append(f'<Feed filename="{name}" {attrs}/>')
    text = f"""<?xml version="1.0"?>
<Configuration>
  <InputSettings>
    <ConnectionString>127.0.0.1:9999</ConnectionString>
    <RegExps>{RULES["default"]}</RegExps>
  </InputSettings>
  <OutputSettings>
    <ConnectionString>127.0.0.1:9998</ConnectionString>
    <EventFormat>{event_format}</EventFormat>
    <RecordFieldContextFormat>%ParamName%=%ParamValue%</RecordFieldContextFormat>
    <ActionableFieldContextFormat> %ParamName%:%ParamValue%</ActionableFieldContextFormat>
    <FinishedEventFormat enabled="true">{finished_format}</FinishedEventFormat>
  </OutputSettings>
  <Feeds per_scan_detect_limit="{limit}">{"".join(feed_xml)}</Feeds>
</Configuration>
"""
    (directory / "node.conf").write_text(text, encoding="utf-8")
    return load_node_config(str(directory / "node.conf"))


def _store(config: NodeConfig, snapshots: Path | None = None) -> IndicatorStore:
    """The config's feeds built in memory, or written to snapshot files and mapped (records read with pread)."""
    if snapshots is None:
        return IndicatorStore({slot: load_feed(f) for slot, f in enumerate(config.feeds.feeds) if f.enabled})
    directory = SnapshotDir(str(snapshots))
    return IndicatorStore({slot: directory.load(f) for slot, f in enumerate(config.feeds.feeds) if f.enabled})


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[CompiledMatcher, Matcher]]:
    out = []
    for i, (event_format, finished_format) in enumerate(FORMATS):
        for limit in (0, 1):
            directory = tmp_path_factory.mktemp(f"c{i}{limit}")
            config = _config(directory, event_format, finished_format, limit)
            store = _store(config, directory / "snapshots" if limit else None)
            compiled = make_matcher(config, store, "compiled")
            assert isinstance(compiled, CompiledMatcher)
            out.append((compiled, Matcher(config, store)))
    return out


_VALUES = {
    "url": [
        "http://evil.example/a",
        "HTTP://EVIL.example/a",
        "http://www.evil.example/a",
        "evil.example/b?x=1",
        "https://a.cdn.example/payload/x.js",
        "http://cdn.example/payload/",
        "http://fine.example/x",
        "http://bad.example/",
        "http://x.bad.example:8080/p",
        "http://10.1.2.3/x",
        "http://[2001:db8::1]/x",
        "http://0x0a010203/",
        "http://evil.example/a/../a",
        "hxxp://evil.example/a",
        "http://%65vil.example/a",
        "http://sub.dyn.test/q?a",
        "ftp://nothing.test",
        "http://пример.рф/",
        "http://evil.example/a#frag",
    ],
    "src": [
        "10.1.2.3",
        "10.1.2.4",
        "10.200.0.1",
        "192.168.1.1",
        "010.001.002.003",
        "2001:db8::5",
        "2001:DB8::7",
        "::1",
        "256.1.1.1",
        "1.2.3",
        "10.1.2.3 ",
    ],
    "dst": ["10.1.9.9", "8.8.8.8", "2001:db8:0:0::1", "[2001:db8::5]", "fe80::1%eth0"],
    "host": [
        "bad.example",
        "BAD.example",
        "www.bad.example",
        "a.b.dyn.test",
        "dyn.test",
        "ok.test",
        "пример.рф",
        "xn--e1afmkfd.xn--p1ai",
        "1.2.3.4",
        "bad.example.",
    ],
    "md5": ["d41d8cd98f00b204e9800998ecf8427e", "D41D8CD98F00B204E9800998ECF8427E", "0" * 32],
    "sha": ["e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "abc", "0" * 40],
    "file": ["D41D8CD98F00B204E9800998ECF8427E", "x"],
    "query": ["bad.example", "localhost", "q.dyn.test"],
    "suser": ["alice", "bob_2"],
    "action": ["drop", "allow"],
    "uri": ["http://evil.example/a"],
}


@st.composite
def _events(draw: st.DrawFn) -> FramedEvent:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(max_size=60))  # anything at all, surrogates and NUL included
    if kind == 1:
        return Oversized(prefix=f"{draw(st.integers(0, 99))} url=http://evil.example/a", size=10_000)
    fields = draw(st.lists(st.sampled_from(sorted(_VALUES)), max_size=6))
    parts = [f"{name}={draw(st.sampled_from(_VALUES[name]))}" for name in fields]
    head = draw(
        st.sampled_from(
            [
                "",
                "<13>Oct 11 22:14:15 dns01 ",
                "<13>1 2026-10-11T22:14:15Z rw01 ",
                "x ",
                "<1>1 - uni01 ",
                "<1>1 - mg01 ",
            ]
        )
    )
    sep = draw(st.sampled_from([" ", " ", " || "]))
    text = f"{head}{draw(st.integers(0, 999))} " + sep.join(parts)
    if kind == 2:
        text += draw(st.sampled_from(["\x00", "\udc80", "é", "\x1c", "\t", "  "]))
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(_events(), max_size=12),
    st.sampled_from(["", "10.9.9.9", "192.0.2.1"]),
    st.booleans(),
    st.integers(0, 3),
)
def test_both_engines_give_the_same_lines_and_counts(
    pairs: list[tuple[CompiledMatcher, Matcher]], events: list[FramedEvent], peer: str, finished: bool, which: int
) -> None:
    compiled, reference = pairs[which]
    got_stats, want_stats = MatchStats(), MatchStats()
    got = compiled.match(events, date=DATE, peer_ip=peer, finished=finished, stats=got_stats)
    want = reference.match(events, date=DATE, peer_ip=peer, finished=finished, stats=want_stats)
    assert got == want
    assert dataclasses.replace(got_stats, decided=0, confirmed=0) == want_stats
    assert got_stats.decided + got_stats.confirmed <= got_stats.events


_OBJECTS = st.one_of(
    st.sampled_from([v for values in _VALUES.values() for v in values]),
    st.sampled_from(["  10.1.2.3 ", "D41D8CD98F00B204E9800998ECF8427E", "2001:db8::5", "evil.example/b?x=1", ""]),
    st.text(max_size=30),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_OBJECTS, max_size=20))
def test_rest_lookups_answer_the_same_on_both_engines(
    pairs: list[tuple[CompiledMatcher, Matcher]], objects: list[str]
) -> None:
    compiled, reference = pairs[0]

    def plain(results: list[tuple[list[Any], int]]) -> list[tuple[list[tuple[str, int, str]], int]]:
        return [([(h.snapshot.name, h.record_no, h.indicator.raw) for h in hits], n) for hits, n in results]

    assert plain(compiled.lookup_objects(objects)) == plain(reference.lookup_objects(objects))


def test_the_compiled_engine_decides_plain_misses_itself(pairs: list[tuple[CompiledMatcher, Matcher]]) -> None:
    compiled, reference = pairs[0]
    events: list[FramedEvent] = [f"{n} url=http://fine.example/{n} src=192.168.1.{n % 250}" for n in range(200)]
    before = compiled.reference_events + compiled.detect_events
    assert compiled.match(events, date=DATE, finished=True) == reference.match(events, date=DATE, finished=True)
    assert compiled.reference_events + compiled.detect_events == before  # none needed the reference path


def test_the_example_config_and_events_match_exactly_on_both_engines() -> None:
    config = load_node_config(str(EXAMPLES / "node.conf"))
    store = _store(config)
    framer = LineFramer()
    framer.receive_data((EXAMPLES / "events.txt").read_bytes() + b"\n")
    events = framer.next_events()
    compiled = make_matcher(config, store, "compiled")
    assert isinstance(compiled, CompiledMatcher)
    assert compiled.match(events, date=DATE, finished=True) == Matcher(config, store).match(
        events, date=DATE, finished=True
    )


# -- 3. what runs where -------------------------------------------------------------------------------------


def test_a_source_the_engine_cannot_run_goes_to_the_reference_path_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, *FORMATS[0], 0)
    with caplog.at_level(logging.WARNING, logger="threatgate.node.engine"):
        compiled = make_matcher(config, _store(config), "compiled")
    assert isinstance(compiled, CompiledMatcher)
    why = "a replace rule writes characters outside ASCII"
    assert compiled.reference_sources == {"uni": why}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"source uni runs on the reference matcher (slower, same answers): {why}"]
    reference = Matcher(config, _store(config))
    event = "<1>1 - uni01 7 uri=http://evil.example/a"
    before = compiled.reference_events
    assert compiled.match([event], date=DATE, finished=True) == reference.match([event], date=DATE, finished=True)
    assert compiled.reference_events == before + 1


def test_replace_and_ignore_rules_run_in_the_compiled_engine(tmp_path: Path) -> None:
    config = _config(tmp_path, *FORMATS[1], 0)
    compiled = make_matcher(config, _store(config), "compiled")
    assert isinstance(compiled, CompiledMatcher)
    reference = Matcher(config, _store(config))
    events: list[FramedEvent] = [
        "<13>1 2026-10-11T22:14:15Z rw01 7 uri=http://fine.example/a suser=bob",  # rewritten, no hit
        "<13>1 2026-10-11T22:14:15Z rw01 8 action=drop suser=eve",  # ignored after the rewrite
    ]
    got, want = MatchStats(), MatchStats()
    before = compiled.reference_events + compiled.detect_events
    assert compiled.match(events, date=DATE, finished=True, stats=got) == reference.match(
        events, date=DATE, finished=True, stats=want
    )
    assert (got.decided, got.ignored) == (2, 1) and want.ignored == 1
    assert compiled.reference_events + compiled.detect_events == before


def test_engine_choice_reads_the_environment() -> None:
    assert engine_choice({}) == "compiled"
    assert engine_choice({"THREATGATE_ENGINE": " Reference "}) == "reference"
    with pytest.raises(ValueError, match="THREATGATE_ENGINE='fast' is not an engine"):
        engine_choice({"THREATGATE_ENGINE": "fast"})


# -- 4. random feeds: candidates listed by the engine in the store's own order ---------------------------------

_INDICATORS = [
    ("url", "http://evil.example/a"),
    ("url", "evil.example/b?x=1"),
    ("url", "http://10.1.2.3/x"),
    ("mask", "*.cdn.example/payload/*"),
    ("mask", "cdn.example/payload/*"),
    ("mask", "*evil*"),
    ("mask", "fine.example/*"),
    ("domain", "bad.example"),
    ("domain", "*.dyn.test"),
    ("domain", "dyn.test"),
    ("domain", "*.bad.example"),
    ("domain", "fine.example"),
    ("ip", "10.1.2.3"),
    ("ip", "10.0.0.0/8"),
    ("ip", "10.1.0.0/16"),
    ("ip", "10.1.2.0/24"),
    ("ip", "2001:db8::/32"),
    ("ip", "2001:db8::5"),
    ("ip", "2001:db8::/64"),
    ("ip", "192.168.0.0/16"),
    ("md5", "d41d8cd98f00b204e9800998ecf8427e"),
    ("sha256", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
]


@st.composite
def _feed_sets(draw: st.DrawFn) -> list[tuple[str, str, list[dict[str, Any]]]]:
    feeds = []
    for i in range(draw(st.integers(1, 3))):
        picked = draw(st.lists(st.sampled_from(_INDICATORS), min_size=1, max_size=8))
        records = [{field: value, "n": str(j)} for j, (field, value) in enumerate(picked)]
        feeds.append((f"f{i}.json", f'category="C{i}" confidence="{50 + i}"', records))
    if draw(st.booleans()):
        fp = draw(st.lists(st.sampled_from(_INDICATORS), min_size=1, max_size=3))
        feeds.append(("fp.json", 'supplier="FalsePositive"', [{f: v} for f, v in fp]))
        iti = draw(st.lists(st.sampled_from(_INDICATORS), min_size=1, max_size=3))
        feeds.append(("iti.json", 'supplier="InternalTI" category="ITI"', [{f: v, "o": "x"} for f, v in iti]))
    return feeds


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_feed_sets(), st.lists(_events(), min_size=1, max_size=8), st.integers(0, 2), st.booleans(), st.booleans())
def test_random_feeds_give_the_same_lines_on_both_engines(
    tmp_path_factory: pytest.TempPathFactory,
    feeds: list[tuple[str, str, list[dict[str, Any]]]],
    events: list[FramedEvent],
    limit: int,
    as_suppliers: bool,
    mapped: bool,
) -> None:
    from threatgate.node.suppliers import SUPPLIER_SLOT_BASE

    global FEEDS
    saved = FEEDS
    FEEDS = feeds
    directory = tmp_path_factory.mktemp("rf")
    try:
        config = _config(directory, *FORMATS[1], limit)
    finally:
        FEEDS = saved
    snapshots = dict(_store(config, directory / "snapshots" if mapped else None).snapshots)
    if as_suppliers:  # the last feeds as the API supplier store: probed after the feed store
        half = len(snapshots) // 2
        store = IndicatorStore({s: snap for s, snap in snapshots.items() if s < half})
        suppliers = IndicatorStore({SUPPLIER_SLOT_BASE + s: snap for s, snap in snapshots.items() if s >= half})
    else:
        store, suppliers = IndicatorStore(snapshots), None
    compiled, reference = make_matcher(config, store, "compiled"), Matcher(config, store)
    compiled.use_suppliers(suppliers)
    reference.use_suppliers(suppliers)
    got, want = MatchStats(), MatchStats()
    assert compiled.match(events, date=DATE, finished=True, stats=got) == reference.match(
        events, date=DATE, finished=True, stats=want
    )
    assert dataclasses.replace(got, decided=0, confirmed=0) == want
    objects = [v for _, v in _INDICATORS] + ["http://a.cdn.example/payload/x", "10.1.2.99", "x.dyn.test"]
    assert [(len(h), n) for h, n in compiled.lookup_objects(objects)] == [
        (len(h), n) for h, n in reference.lookup_objects(objects)
    ]


def test_the_example_node_runs_every_source_on_the_compiled_engine() -> None:
    config = load_node_config(str(EXAMPLES / "node.conf"))
    compiled = make_matcher(config, _store(config), "compiled")
    assert isinstance(compiled, CompiledMatcher)
    assert compiled.reference_sources == {}


def test_detections_are_confirmed_and_rendered_in_c_from_mapped_snapshots(
    pairs: list[tuple[CompiledMatcher, Matcher]], monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled, reference = pairs[3]  # FORMATS[1] (RecordContext, ActionableFields, Date), limit 1, mapped files
    assert all(snap.index._fd is not None for snap in compiled.store.snapshots.values())
    events: list[FramedEvent] = [
        "1 url=http://evil.example/a src=10.1.2.3 host=a.dyn.test md5=D41D8CD98F00B204E9800998ECF8427E",
        "2 src=10.1.2.4 url=https://a.cdn.example/payload/x.js",
    ]
    want = reference.match(events, date=DATE, finished=True)

    def python_path(*args: object) -> int:
        raise AssertionError("the Python detection code ran")

    monkeypatch.setattr(Matcher, "_detect_candidates", python_path)
    assert compiled.match(events, date=DATE, finished=True) == want
    assert sum("LookupFinished" not in line for line in want) >= 4


def test_a_c_module_built_from_other_source_is_refused_with_the_way_out() -> None:
    code = "import threatgate.node._engine as e; e.INTERFACE = 1; import threatgate.node.engine"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "was built from other source than this threatgate (interface 1, expected 2): rebuild it" in result.stderr
