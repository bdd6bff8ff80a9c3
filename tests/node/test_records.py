"""node/records.py: what a feed record is, whatever the format that carried it.

Indicator classification and normalisation by field and shape, the record's context text, URL masks, the
load report, the columns every reader fills, and reading one JSON document from disk within a size bound.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import xxhash

from threatgate.config.node import FeedSettings
from threatgate.errors import FeedError
from threatgate.node.records import (
    MAX_BAD_EXAMPLES,
    MAX_CONTEXT_TEXT,
    Indicator,
    Kind,
    LoadReport,
    Mask,
    ParsedFeed,
    add_row,
    classify,
    context_text,
    feed_identity,
    indicator_of,
    key_of,
    mask_from,
    mask_matches,
    parse_document,
    read_document,
    record_context,
    url_host,
)

# -- classify -------------------------------------------------------------------------------------

H32 = "44d88612fea8a8f36de82e1278abb02f"


@pytest.mark.parametrize(
    ("raw", "field", "kind", "value"),
    [
        # hashes
        (H32.upper(), "md5", Kind.HASH, H32),
        ("a" * 40, "sha1", Kind.HASH, "a" * 40),
        ("B" * 64, "sha256", Kind.HASH, "b" * 64),
        (H32, "indicator", Kind.HASH, H32),
        # IPs and CIDRs
        ("192.0.2.1", "ip", Kind.IP, "192.0.2.1"),
        ("192.0.2.1", "indicator", Kind.IP, "192.0.2.1"),
        ("010.001.002.003", "ip", Kind.IP, "10.1.2.3"),
        ("2001:DB8::1", "ip", Kind.IP, "2001:db8::1"),
        ("[2001:db8::1]", "ip", Kind.IP, "2001:db8::1"),
        ("2001:db8::1", "indicator", Kind.IP, "2001:db8::1"),
        ("192.0.2.1/32", "ip", Kind.IP, "192.0.2.1"),
        ("203.0.113.0/24", "ip", Kind.CIDR, "4/24/13303921"),
        ("10.0.0.0/8", "indicator", Kind.CIDR, "4/8/10"),
        ("10.9.9.9/8", "ip", Kind.CIDR, "4/8/10"),  # host bits are dropped
        ("0.0.0.0/0", "ip", Kind.CIDR, "4/0/0"),
        ("2001:db8::/32", "ip", Kind.CIDR, "6/32/536939960"),
        # domains
        ("Evil.Example", "domain", Kind.DOMAIN, "evil.example"),
        ("www.evil.example", "domain", Kind.DOMAIN, "evil.example"),
        ("evil.example", "indicator", Kind.DOMAIN, "evil.example"),
        ("*.cnc.example", "domain", Kind.DOMAIN_SUFFIX, "cnc.example"),
        ("*.cnc.example", "indicator", Kind.DOMAIN_SUFFIX, "cnc.example"),
        ("пример.example", "domain", Kind.DOMAIN, "xn--e1afmkfd.example"),
        # URLs (a URL with nothing after the host is its host)
        ("http://evil.example/a", "url", Kind.URL, "evil.example/a"),
        ("HTTP://WWW.Evil.Example:80/p/./index.php", "url", Kind.URL, "evil.example/p/index.php"),
        ("hxxp://evil.example/x", "url", Kind.URL, "evil.example/x"),
        ("evil.example/?q=1", "indicator", Kind.URL, "evil.example/?q=1"),
        ("evil.example/path", "indicator", Kind.URL, "evil.example/path"),
        ("http://fakess123.nu", "url", Kind.DOMAIN, "fakess123.nu"),
        ("http://evil.example/a", "indicator", Kind.URL, "evil.example/a"),
        ("https://evil.example:8443/a?b=c", "indicator", Kind.URL, "evil.example/a?b=c"),
        # dot segments are removed as events' URLs are (normalize_url): ".." after "//" removes the empty segment
        ("http://evil.example/foo/bar//..", "url", Kind.URL, "evil.example/foo/bar"),
        ("http://evil.example/foo/bar//%2e%2e/x", "indicator", Kind.URL, "evil.example/foo/bar/x"),
        ("http://evil.example/a/.//../*", "mask", Kind.MASK, "evil.example/a/*"),
        # masks
        ("*.evil-cdn.example/payload/*", "mask", Kind.MASK, "*.evil-cdn.example/payload/*"),
        ("evil.example/*/x.php", "indicator", Kind.MASK, "evil.example/*/x.php"),
        ("benign-but-listed.example/*", "url", Kind.MASK, "benign-but-listed.example/*"),
        ("cdn*.evil.example/p", "mask", Kind.MASK, "cdn*.evil.example/p"),
        ("*.evil.example", "mask", Kind.DOMAIN_SUFFIX, "evil.example"),
    ],
)
def test_Indicator_classify_table(raw: str, field: str, kind: int, value: str) -> None:
    indicator = classify(raw, field)
    assert indicator is not None, f"{raw!r} in {field} rejected"
    assert (Kind.NAMES[indicator.kind], indicator.value) == (Kind.NAMES[kind], value)
    assert indicator.raw == raw


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("", "indicator"),
        ("   ", "url"),
        ("abc", "md5"),
        (H32 + "0", "md5"),
        ("z" * 32, "md5"),
        ("999.1.1.1", "ip"),
        ("1.2.3.4/33", "ip"),
        ("1.2.3.4/x", "ip"),
        ("evil.example", "ip"),
        ("1.2.3.4", "domain"),
        ("not a domain!", "indicator"),
        ("exa mple.com", "domain"),
        ("http://", "url"),
    ],
)
def test_Indicator_classify_garbage_is_none(raw: str, field: str) -> None:
    assert classify(raw, field) is None


def test_Indicator_classify_subdomain_flag() -> None:
    assert classify("evil.example", "domain", subdomains=True) == Indicator(
        Kind.DOMAIN_SUFFIX, "evil.example", "evil.example"
    )


def test_Indicator_cidr_tuple() -> None:
    indicator = classify("203.0.113.0/24", "ip")
    assert indicator is not None
    assert indicator.cidr == (4, 24, 0xCB0071)


@pytest.mark.parametrize(
    ("record", "kind", "value"),
    [
        ({"indicator": "evil.example", "mask": "x"}, Kind.DOMAIN, "evil.example"),  # first present wins
        ({"threat": "x", "ip": "10.0.0.1"}, Kind.IP, "10.0.0.1"),
        ({"domain": "a.example", "include_subdomains": True}, Kind.DOMAIN_SUFFIX, "a.example"),
        ({"domain": "a.example", "include_subdomains": "yes"}, Kind.DOMAIN_SUFFIX, "a.example"),
        ({"domain": "a.example", "subdomains": "1"}, Kind.DOMAIN_SUFFIX, "a.example"),
        ({"domain": "a.example", "include_subdomains": False}, Kind.DOMAIN, "a.example"),
        ({"domain": "a.example", "include_subdomains": "no"}, Kind.DOMAIN, "a.example"),
    ],
)
def test_Indicator_indicator_of_record(record: dict[str, Any], kind: int, value: str) -> None:
    indicator = indicator_of(record)
    assert indicator is not None
    assert (indicator.kind, indicator.value) == (kind, value)


@pytest.mark.parametrize("record", [{}, {"threat": "x"}, {"url": 5}, {"ip": None}, {"md5": ["a"]}])
def test_Indicator_indicator_of_record_without_indicator(record: dict[str, Any]) -> None:
    assert indicator_of(record) is None


def test_FeedSnapshot_record_context_skips_indicator_and_non_scalars() -> None:
    record = {"threat": "x", "url": "http://a/", "n": 1, "ok": True, "no": False, "none": None, "l": [1], "d": {}}
    assert record_context(record) == [("threat", "x"), ("n", "1"), ("ok", "true"), ("no", "false")]


def test_FeedSnapshot_record_context_skips_the_field_indicator_of_reads() -> None:
    # "url" comes before "domain" in INDICATOR_FIELDS: it is the indicator wherever it stands in the record.
    record = {"domain": "a.example", "url": "http://a.example/x", "threat": "t"}
    indicator = indicator_of(record)
    assert indicator is not None and indicator.value == "a.example/x"
    assert record_context(record) == [("domain", "a.example"), ("threat", "t")]


def test_FeedSnapshot_key_of_differs_per_kind() -> None:
    assert key_of(Kind.URL, "evil.example") != key_of(Kind.DOMAIN, "evil.example")
    assert key_of(Kind.DOMAIN, "evil.example") == key_of(Kind.DOMAIN, "evil.example")


# -- masks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "host", "parts", "subdomains"),
    [
        ("evil.example/a/*", "evil.example", ("/a/", ""), False),
        ("*.evil.example/dl/*", "evil.example", ("/dl/", ""), True),
        ("evil.example/*/x.php", "evil.example", ("/", "/x.php"), False),
        ("cdn*.evil.example/p", "", ("cdn", ".evil.example/p"), False),
        ("evil.example?q=*", "evil.example", ("?q=", ""), False),
    ],
)
def test_Mask_mask_from_indexes_by_literal_host(
    value: str, host: str, parts: tuple[str, ...], subdomains: bool
) -> None:
    key, mask = mask_from(value, 3)
    assert key == host
    assert mask.parts == parts
    assert mask.subdomains is subdomains
    assert mask.record_no == 3


@pytest.mark.parametrize(
    ("parts", "text", "expected"),
    [
        (("/a/", ""), "/a/", True),
        (("/a/", ""), "/a/b/c", True),
        (("/a/", ""), "/b/a/", False),
        (("/", "/x.php"), "/dir/x.php", True),
        (("/", "/x.php"), "/x.php", False),  # the star needs its own "/" on both sides
        (("/", "/x.php"), "/dir/x.php5", False),
        (("/exact",), "/exact", True),
        (("/exact",), "/exactly", False),
        (("/a", "b", "c"), "/a-b-c", True),
        (("/a", "b", "c"), "/a-c-b", False),
        (("/ab", "ba"), "/aba", False),  # parts must not overlap
    ],
)
def test_Mask_matches_glob(parts: tuple[str, ...], text: str, expected: bool) -> None:
    assert Mask(parts, 0).matches(text) is expected


def test_key_of_is_xxh3_of_utf8_with_the_kind_as_seed() -> None:
    assert key_of(Kind.HASH, "ab") == xxhash.xxh3_64_intdigest(b"ab", seed=Kind.HASH)
    assert key_of(Kind.URL, "\udc80") == xxhash.xxh3_64_intdigest(b"\xed\xb2\x80", seed=Kind.URL)  # surrogates pass


@pytest.mark.parametrize(
    ("mask", "url", "covered"),
    [
        ("evil.example/a/*", "evil.example/a/b", True),
        ("evil.example/a/*", "other.example/a/b", False),
        ("evil.example/a/*", "sub.evil.example/a/b", False),
        ("*.evil.example/dl/*", "sub.evil.example/dl/x", True),
        ("*.evil.example/dl/*", "evil.example/dl/x", True),
        ("*.evil.example/dl/*", "notevil.example/dl/x", False),
        ("evil.example/*", "evil.example", True),  # no path is "/"
        ("cdn*.evil.example/p", "cdn7.evil.example/p", True),
        ("cdn*.evil.example/p", "cdn7.evil.example/q", False),
    ],
)
def test_mask_matches_confirms_a_hit_by_host_then_path(mask: str, url: str, covered: bool) -> None:
    assert mask_matches(mask, url) is covered


def test_url_host_is_everything_before_the_first_slash_or_question_mark() -> None:
    assert url_host("a.example/x?y") == "a.example"
    assert url_host("a.example?y/x") == "a.example"
    assert url_host("a.example") == "a.example"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("plain", "plain"),
        (42, "42"),
        (1.5, "1.5"),
        (True, "true"),
        (False, "false"),
        ("line one\nline two\r\x85\u2028end", "line one line two   end"),
        (None, None),
        ([1], None),
        ({"a": 1}, None),
        ("x" * (MAX_CONTEXT_TEXT + 5), "x" * MAX_CONTEXT_TEXT),
    ],
)
def test_context_text_is_one_printable_line_of_a_scalar(value: object, text: str | None) -> None:
    assert context_text(value) == text


def test_LoadReport_counts_all_quotes_a_few_and_logs_skips_once(caplog: pytest.LogCaptureFixture) -> None:
    report = LoadReport()
    for i in range(MAX_BAD_EXAMPLES + 2):
        report.bad(f"record {i}", "not an indicator")
        report.skip(f"record {i}", "to_ids is false")
    assert (report.malformed, report.skipped) == (MAX_BAD_EXAMPLES + 2, MAX_BAD_EXAMPLES + 2)
    assert report.examples[0] == "record 0: not an indicator" and len(report.examples) == MAX_BAD_EXAMPLES
    assert len(report.skip_examples) == MAX_BAD_EXAMPLES
    caplog.set_level(logging.INFO, "threatgate.test")
    report.log_skipped(logging.getLogger("threatgate.test"), "misp", "attributes")
    LoadReport().log_skipped(logging.getLogger("threatgate.test"), "other", "attributes")  # nothing skipped
    assert [r.getMessage() for r in caplog.records] == [
        "feed misp: 7 attributes skipped, e.g. "
        + "; ".join(f"record {i}: to_ids is false" for i in range(MAX_BAD_EXAMPLES))
    ]


def test_add_row_appends_a_column_row_and_counts_its_kind() -> None:
    parsed = ParsedFeed()
    add_row(parsed, Indicator(Kind.DOMAIN_SUFFIX, "a.example", "*.a.example"), (("threat", "x"),))
    add_row(parsed, Indicator(Kind.MASK, "*.b.example/x*", "*.b.example/x*"), ())
    add_row(parsed, Indicator(Kind.MASK, "b.example/x*", "b.example/x*"), ())
    add_row(parsed, Indicator(Kind.URL, "c.example/x", "http://c.example/x"), ())
    assert list(parsed.kinds) == [Kind.DOMAIN_SUFFIX, Kind.MASK, Kind.MASK, Kind.URL]
    assert parsed.subdomains == [True, True, False, False]
    assert parsed.raws[3] == "http://c.example/x" and parsed.contexts[0] == (("threat", "x"),)
    assert (parsed.report.records, parsed.report.per_kind) == (4, {"domain_suffix": 1, "mask": 2, "url": 1})


def test_feed_identity_follows_the_file_or_a_misp_manifest(tmp_path: Path) -> None:
    feed = tmp_path / "a.json"
    settings = FeedSettings(path=str(feed), name="a", category="T", format="json")  # type: ignore[arg-type]
    assert feed_identity(settings) == (-1, -1, -1)
    feed.write_text("[]")
    st = os.stat(feed)
    assert feed_identity(settings) == (st.st_ino, 2, st.st_mtime_ns)
    misp = FeedSettings(path=str(tmp_path), name="m", category="T", format="misp")  # type: ignore[arg-type]
    assert feed_identity(misp) == (-1, -1, -1)
    (tmp_path / "manifest.json").write_text("{}")
    assert feed_identity(misp)[1] == 2


def test_read_document_reads_a_regular_file_within_its_limit(tmp_path: Path) -> None:
    path = tmp_path / "bundle.json"
    path.write_bytes(b"x" * 100)
    data, st = read_document(str(path), 100)
    assert data == b"x" * 100 and st.st_size == 100
    with pytest.raises(FeedError, match=f"{path}: 100 bytes, more than the limit of 99"):
        read_document(str(path), 99)
    with pytest.raises(OSError, match="not a regular file"):
        read_document(str(tmp_path), 100)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):  # opened without blocking, then refused
        read_document(str(fifo), 100)


def test_parse_document_is_json_with_a_tolerated_bom_or_a_feed_error() -> None:
    assert parse_document("f", b"\xef\xbb\xbf[1]") == [1]
    assert parse_document("f", '{"a": 1}') == {"a": 1}
    with pytest.raises(FeedError, match="^f: not UTF-8 \\(byte 1\\)$"):
        parse_document("f", b"[\xff]")
    with pytest.raises(FeedError, match="^f: invalid JSON at line 2 column 1: "):
        parse_document("f", b"[1,\n]")
    with pytest.raises(FeedError, match="^f: invalid JSON: "):
        parse_document("f", "[" * 100_000 + "]" * 100_000)
