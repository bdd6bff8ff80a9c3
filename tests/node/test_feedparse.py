"""Differential tests of threatgate.node.feedparse: ``parse_feed`` gives exactly the reference loader's answer.

The reference is today's loader: ``load_feed`` (what it accepts, its kinds and keys, its report and
errors) with every record read back (``read_record`` + ``indicator_of`` + ``record_context``), as a
detection would.  The inputs are the generated feeds, the published examples and abuse.ch layouts,
hand-written hostile files, and hypothesis-generated feeds (invalid UTF-8, NUL, quotes, huge fields,
missing columns, duplicate headers, BOM, comments...).
"""

from __future__ import annotations

import csv
import gc
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import abusech
from threatgate.config.node import FeedSettings
from threatgate.errors import FeedError
from threatgate.node import feedparse
from threatgate.node.feedparse import ParsedFeed, classify_column, parse_feed
from threatgate.node.feeds import (
    INDICATOR_FIELDS,
    LoadReport,
    classify,
    parse_columns,
)
from threatgate.node.generate import generate

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "feeds"

Row = tuple[int, str, str, bool, tuple[tuple[str, str], ...]]
Answer = tuple[list[Row], LoadReport, list[str]] | str
"""The rows, report and header of a feed, or the text of the FeedError that refuses it."""


def feed_settings(path: Path, fmt: str, **kwargs: Any) -> FeedSettings:
    return FeedSettings(path=str(path), name=path.name, category="Test", format=fmt, **kwargs)  # type: ignore[arg-type]


def reference(settings: FeedSettings) -> Answer:
    """What the reference loader answers (``feeds.parse_columns``, the record-by-record reader the snapshot
    format was checked against), with every key checked against ``key_of``."""
    try:
        parsed = parse_columns(settings, Path(settings.path).read_bytes())
    except FeedError as exc:
        return str(exc)
    return rows_of(parsed), parsed.report, parsed.header


def fast(settings: FeedSettings) -> Answer:
    try:
        parsed = parse_feed(settings, Path(settings.path).read_bytes())
    except FeedError as exc:
        return str(exc)
    return rows_of(parsed), parsed.report, parsed.header


def rows_of(parsed: ParsedFeed) -> list[Row]:
    n = len(parsed.values)
    assert len(parsed.kinds) == len(parsed.raws) == len(parsed.subdomains) == len(parsed.contexts) == n
    return list(zip(parsed.kinds, parsed.values, parsed.raws, parsed.subdomains, parsed.contexts, strict=True))


def assert_same(settings: FeedSettings) -> Answer:
    """parse_feed answers as the reference does (and, for a feed that loads, the answer is returned)."""
    try:
        expected = reference(settings)
    except (RecursionError, ValueError, csv.Error):  # the reference crashes: parse_feed must not
        try:
            parse_feed(settings, Path(settings.path).read_bytes())
        except FeedError:
            pass
        return "the reference crashes"
    got = fast(settings)
    if isinstance(expected, str) or isinstance(got, str):
        assert got == expected
        return got
    assert got[2] == expected[2], "header"
    for i, (mine, theirs) in enumerate(zip(got[0], expected[0], strict=False)):
        assert mine == theirs, f"record {i}"
    assert len(got[0]) == len(expected[0])
    assert got[1] == expected[1], "report"
    return got


def write(tmp_path: Path, name: str, content: bytes | str, **kwargs: Any) -> FeedSettings:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
    return feed_settings(path, "csv" if name.endswith(".csv") else "json", **kwargs)


# -- whole files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["urls.json", "domains.json", "ips.csv", "hashes.csv"])
def test_parse_feed_generated_feeds_as_the_reference(tmp_path: Path, name: str) -> None:
    generate(str(tmp_path), indicators=4000, events=0, hit_rate=0.0, seed=7, port=9999)
    answer = assert_same(feed_settings(tmp_path / name, "json" if name.endswith("json") else "csv"))
    assert not isinstance(answer, str) and len(answer[0]) >= 600 and answer[1].malformed == 0


@pytest.mark.parametrize(
    "name",
    [
        "botnet_domains.json",
        "false_positives.json",
        "internal_ti.json",
        "malicious_hashes.json",
        "malicious_urls.json",
        "ip_reputation.csv",
    ],
)
def test_parse_feed_example_feeds_as_the_reference(name: str) -> None:
    assert_same(feed_settings(EXAMPLES / name, "json" if name.endswith("json") else "csv"))


@pytest.mark.parametrize(
    ("text", "kwargs"),
    [
        (abusech.URLHAUS, {}),
        (abusech.URLHAUS, {"context_columns": ("threat", "Tags", "reporter")}),
        (abusech.FEODO, {"indicator_column": "dst_ip"}),
        (abusech.FEODO_COMMENTED_HEADER, {"indicator_column": "dst_ip", "context_columns": ("malware",)}),
        (abusech.FEODO, {"indicator_column": "dst_ipp"}),
        (abusech.URLHAUS, {"context_columns": ("threats",)}),
    ],
)
def test_parse_feed_abusech_layouts_as_the_reference(tmp_path: Path, text: str, kwargs: dict[str, Any]) -> None:
    assert_same(write(tmp_path, "abuse.csv", text, **kwargs))


HOSTILE_JSON = [
    "",
    "[]",
    "[",
    "\ufeff[]",
    '{"url": "http://a.example/x"}',
    '[{"url": "http://a.example/x"}',
    '[{"url": "http://a.example/x"} {"url": "http://b.example/y"}]',
    '[,,{"url": "http://a.example/x"},,]',
    '[{"url": "http://a.example/x", "n": 123456789012345678901234567890}]',
    '[{"url": "http://a.example/x", "n": 1e400}, {"url": "http://b.example/x", "n": NaN}]',
    '[{"url": "http://a.example/x", "n": -9223372036854775809, "f": 1.5, "z": -0}]',
    '[{"url": "http://a.example/\\ud800"}, {"domain": "x.example", "c": "\\udc80"}]',
    '[1, "x", null, [1], {"url": 5}, {"indicator": null, "url": "http://a.example/p"}, {"threat": "no indicator"}]',
    '[{"domain": "A.Example", "include_subdomains": "Yes"}, {"domain": "b.example", "subdomains": 1}]',
    '[{"domain": "c.example", "include_subdomains": true, "subdomains": "no"}]',
    '[{"threat": "x", "url": "http://a.example/p", "tags": ["a", "b"], "meta": {"k": 1}, "none": null}]',
    '[{"url": "http://a.example/p", "url": "http://b.example/q"}]',
    '[{"url": "http://a.example/p", "note": "line\\nbreak\\u2028and\\u0000nul"}]',
    '[{"url": "HTTP://WWW.Example.COM/A/../b//c?x=1#frag", "c": "ünïcödé"}]',
    '[{"mask": "*.cdn.example/a/*"}, {"mask": "host.example/b/*"}, {"url": "*.x.example"}, {"mask": "a.example/p"}]',
    '[{"ip": "10.0.0.0/8"}, {"ip": "010.001.002.003"}, {"ip": "::ffff:1.2.3.4"}, {"ip": "1.2.3.4/32"}, '
    '{"ip": "1.2.3.4/33"}]',
    '[{"md5": "44D88612FEA8A8F36DE82E1278ABB02F"}, {"sha1": " abc "}, {"sha256": "' + "A" * 64 + '"}]',
    '[{"indicator": "' + "b" * 32 + '"}, {"indicator": "1.2.3.4"}, {"indicator": "a.example"}, {"indicator": "x/y"}]',
    '[{"url": "http://a.example/p", "big": "' + "x" * 5000 + '"}]',
    '[{"url": "http://a.example/p"}]\n\n  ',
    "[" + "[" * 2000 + "]" * 2000 + "]",
]


@pytest.mark.parametrize("text", HOSTILE_JSON, ids=range(len(HOSTILE_JSON)))
def test_parse_feed_hostile_json_as_the_reference(tmp_path: Path, text: str) -> None:
    assert_same(write(tmp_path, "f.json", text))


HOSTILE_CSV = [
    "",
    "\n\n",
    "# only a comment\n",
    "ip,threat\n",
    "ip,threat\n1.2.3.4,x",
    "\ufeffip,threat\n1.2.3.4,x\n",
    "ip,threat\r\n1.2.3.4,x\r\n5.6.7.8,y\r\r\n",
    "ip,threat\n1.2.3.4,x\n\n   \n#comment,with,commas\n5.6.7.8\n9.9.9.9,a,b\n",
    'ip,threat\n1.2.3.4,"quoted, with comma"\n"5.6.7.8","multi\nline"\n',
    'ip,threat\n1.2.3.4,"unterminated\n5.6.7.8,x\n',
    "ip,threat,threat\n1.2.3.4,a,b\n",
    "IP,Url\n1.2.3.4,http://a.example/p\n",
    "url,URL,ip\nhttp://a.example/p,x,1.2.3.4\n",
    "url,url\nhttp://a.example/p,http://b.example/q\n",
    "Indicator,indicator\nx,y\n",
    "domain,include_subdomains\na.example,yes\nb.example, TRUE \nc.example,no\n*.d.example,0\nwww.e.example,1\n",
    "indicator\n" + "b" * 32 + "\n1.2.3.4\n10.0.0.0/24\na.example\nhttp://a.example/p\n*.x.example/y/*\n\n \n",
    "ip,threat\n1.2.3.4,\x00nul\n5.6.7.8,tab\there\n9.9.9.9," + "y" * 3000 + "\n",
    "ip,threat\n1.2.3.4,ünï\n5.6.7.8,\u2028\n",
    "md5,detection\n44D88612FEA8A8F36DE82E1278ABB02F,EICAR\nnot-a-hash,x\n",
    "ip;threat\n1.2.3.4;x\n5.6.7.8,y\n",
    "ip,threat,seen\r\n1.2.3.4,x,1\r\n5.6.7.8,y,2\r\n",
    "ip,threat,seen\n1.2.3.4,x,1\n#5.6.7.8,y,2\n9.9.9.9,,\n",
    "ip,threat,seen\n1.2.3.4,x,1\n5.6.7.8,y\n1.1.1.1,a,b,c\n",
    "ip,threat,seen\n1.2.3.4,ünï,1\n::1,\x00,2\nwww.x.example,a\rb,3",
    "domain,threat,seen\nbücher.example,x,1\nWWW.A.example,y,2\n*.b.example,z,3\nKELVIN.\u212a.example,w,4\n",
    "indicator,threat,seen\n" + "B" * 64 + ",x,1\n10.0.0.0/8,y,2\nhttp://Ünï.example/p,z,3\n*.c.example/d/*,w,4\n",
]


@pytest.mark.parametrize("text", HOSTILE_CSV, ids=range(len(HOSTILE_CSV)))
def test_parse_feed_hostile_csv_as_the_reference(tmp_path: Path, text: str) -> None:
    delimiter = ";" if text.startswith("ip;") else ","
    assert_same(write(tmp_path, "f.csv", text, delimiter=delimiter))


def test_parse_feed_invalid_utf8_is_the_reference_error(tmp_path: Path) -> None:
    for name in ("f.json", "f.csv"):
        answer = assert_same(
            write(tmp_path, name, b'[{"ip": "1.2.3.4", "c": "\xff"}]' if name == "f.json" else b"ip\n1.2.3.4\xfe\n")
        )
        assert isinstance(answer, str) and "not UTF-8" in answer


def test_parse_feed_refuses_other_formats(tmp_path: Path) -> None:
    with pytest.raises(FeedError, match="JSON and CSV"):
        parse_feed(feed_settings(tmp_path / "x", "stix"), b"{}")


# -- hypothesis: hostile feeds ------------------------------------------------------------------------

_INDICATORS = st.sampled_from(
    [
        "http://a.example/p",
        "HTTPS://Web-1.Phish.Example/wp/1/gate.js?id=ab",
        "a.example",
        "*.b.example",
        "www.c.example",
        "www.a.example/p",
        "http://WWW.b.example/q?x=1",
        "*.www.d.example",
        "*.www.e.example/x/*",
        "www",
        "http://www/x",
        "wwwx.example",
        "1.2.3.4",
        "10.1.0.0/16",
        "::1",
        "b" * 32,
        "D" * 40,
        "*.cdn.example/x/*",
        "host.example/y/*",
        "http://a.example",
        "ftp://x.example/a/./b",
        "a://b.example/c",
        "http://[::1]/x",
        "ünï.example",
        " a.example ",
        "",
        "http://0x7f000001/x",
        "a.example/p?",
        "a.example/p/",
        "x" * 300,
    ]
)
_TEXT = st.text(alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Z", "Cc")), max_size=12)
_CELL = st.one_of(
    _INDICATORS,
    _TEXT,
    st.sampled_from(["yes", "TRUE", "0", "", " ", '"', "#x", "a,b", "\r", "a\rb"]),
    st.sampled_from(['"a,b"', '"x""y"', '"multi\nline"', '"1.2.3.4"', '"http://a.example/p"', 'a"b"c', '""']),
)
_NAMES = st.sampled_from(
    [*INDICATOR_FIELDS, "include_subdomains", "threat", "Threat", "first_seen", "IP", "Url", "dst_ip", "c", "#c"]
)


@st.composite
def json_feeds(draw: st.DrawFn) -> bytes:
    value = st.one_of(
        _CELL,
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.none(),
        st.lists(st.integers(), max_size=2),
    )
    record = st.dictionaries(_NAMES, value, max_size=5)
    items = draw(st.lists(st.one_of(record, record, record, value), max_size=12))
    indent = draw(st.sampled_from([None, 0, 1]))
    text = json.dumps(items, indent=indent, ensure_ascii=draw(st.booleans()))
    return draw(_mutated(text.encode("utf-8", "surrogatepass")))


@st.composite
def csv_feeds(draw: st.DrawFn) -> tuple[bytes, str]:
    delimiter = draw(st.sampled_from([",", ";", "\t"]))
    header = draw(st.lists(_NAMES, min_size=1, max_size=5))
    lines = [draw(st.sampled_from(["", "# banner", "#"])) + delimiter.join(header)]
    for _ in range(draw(st.integers(0, 10))):
        width = len(header) + draw(st.sampled_from([0, 0, 0, 0, -1, 1]))
        lines.append(delimiter.join(draw(_CELL) for _ in range(max(width, 1))))
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["", "  ", "# comment", "#a,b"])))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    text = eol.join(lines) + draw(st.sampled_from(["", eol]))
    return draw(_mutated(text.encode())), delimiter


@st.composite
def _mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """Sometimes a hostile byte edit: invalid UTF-8, NUL, a quote, a BOM, a cut."""
    edit = draw(st.sampled_from(["none", "none", "none", "insert", "bom", "cut"]))
    if edit == "bom":
        return b"\xef\xbb\xbf" + data
    if edit == "cut" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if edit == "insert":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.sampled_from([b"\xff", b"\x00", b'"', b"\xed\xa0\x80", b",", b"\n"])) + data[at:]
    return data


_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(data=json_feeds())
def test_parse_feed_hypothesis_json_as_the_reference(tmp_path: Path, data: bytes) -> None:
    assert_same(write(tmp_path, "h.json", data))


@_SETTINGS
@given(feed=csv_feeds(), column=st.sampled_from(["", "", "dst_ip", "IP", "c"]), keep=st.booleans())
def test_parse_feed_hypothesis_csv_as_the_reference(
    tmp_path: Path, feed: tuple[bytes, str], column: str, keep: bool
) -> None:
    data, delimiter = feed
    kwargs: dict[str, Any] = {"delimiter": delimiter, "indicator_column": column}
    if keep:
        kwargs["context_columns"] = ("threat",)
    assert_same(write(tmp_path, "h.csv", data, **kwargs))


# -- the column classifier ----------------------------------------------------------------------------

_URLISH = st.text(alphabet="aAbWw.-_0129x:/?*@%#[]+~! \t", max_size=30)
_SCHEMED = st.builds(
    lambda s, rest: s + rest, st.sampled_from(["", "http://", "HTTPS://", "a://", "ab://", "x-1+://", "www."]), _URLISH
)


@settings(max_examples=400, deadline=None)
@given(
    raws=st.lists(st.one_of(_URLISH, _SCHEMED, _INDICATORS, _TEXT), max_size=30),
    field=st.sampled_from([*INDICATOR_FIELDS]),
    flagged=st.booleans(),
)
def test_classify_column_is_classify_for_every_row(raws: list[str], field: str, flagged: bool) -> None:
    flags = [flagged and i % 2 == 0 for i in range(len(raws))]
    kinds, values = classify_column(raws, field, flags)
    for i, raw in enumerate(raws):
        expected = classify(raw, field, flags[i])
        got = None if kinds[i] < 0 else (int(kinds[i]), values[i])
        assert got == (None if expected is None else (expected.kind, expected.value)), repr(raw)


def test_classify_column_takes_the_fast_shapes_for_generated_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generated feeds' values never reach the per-value classifier (that is what makes them fast)."""
    calls: list[str] = []
    monkeypatch.setattr(feedparse, "classify", lambda raw, *a: calls.append(raw))
    rng = random.Random(1)
    urls = [f"http{'s' * rng.randint(0, 1)}://w-{i}.phish.example/a/{i:x}/x.js?id=1" for i in range(50)]
    masks = [f"*.cdn{i}.example/doc/*" for i in range(5)] + [f"host{i}.example/doc/*" for i in range(5)]
    classify_column(urls + masks, "url")
    classify_column([f"{i:08x}1.c2.test" for i in range(50)] + ["*.x-1.dyn.test"], "domain")
    classify_column([f"100.64.0.{i}" for i in range(50)] + ["10.0.0.0/24", "10.0.1.0/25"], "ip")
    classify_column(["0f" * 16, "AB" * 20, "c" * 64], "indicator")
    assert calls == []


@pytest.mark.parametrize("name", ["urls.json", "domains.json", "ips.csv", "hashes.csv"])
def test_parse_feed_reads_the_generated_feeds_by_columns(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No record of a generated feed goes through a per-record reader (the reason parse_feed is fast)."""
    generate(str(tmp_path), indicators=4000, events=0, hit_rate=0.0, seed=3, port=9999)

    def per_record(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a per-record reader was used")

    for slow in ("_json_reference", "_json_one_by_one", "_csv_rows_one_by_one", "_csv_rows_fast", "classify"):
        monkeypatch.setattr(feedparse, slow, per_record)
    path = tmp_path / name
    settings_ = feed_settings(path, "json" if name.endswith("json") else "csv")
    parsed = parse_feed(settings_, path.read_bytes())
    assert len(parsed.values) >= 600 and parsed.report.malformed == 0


def test_parse_feed_reads_a_quoted_csv_without_the_line_by_line_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """abuse.ch quotes every field: one csv reader for the body, not the reference loop (only the first
    record, read to find the commented header, goes through it)."""
    one_by_one = feedparse._csv_rows_one_by_one

    def only_lists(settings: FeedSettings, layout: Any, lines: Any, *args: Any) -> None:
        assert isinstance(lines, list), "the body was read line by line"
        one_by_one(settings, layout, lines, *args)

    monkeypatch.setattr(feedparse, "_csv_rows_one_by_one", only_lists)
    parsed = parse_feed(write(tmp_path, "u.csv", abusech.URLHAUS).model_copy(), abusech.URLHAUS.encode())
    assert len(parsed.values) == 5


@pytest.mark.parametrize("enabled", [True, False])
def test_parse_feed_restores_the_garbage_collector(tmp_path: Path, enabled: bool) -> None:
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        parse_feed(feed_settings(tmp_path / "f.json", "json"), b'[{"url": "http://a.example/p"}]')
        with pytest.raises(FeedError):
            parse_feed(feed_settings(tmp_path / "f.json", "json"), b"{")
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


def test_importing_feedparse_leaves_pyarrow_for_the_first_parse() -> None:
    """The node imports ParsedFeed on start-up (snapshots); pyarrow's import (~60 ms) waits for a parse."""
    code = "import sys, threatgate.node.feedparse; print('pyarrow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
