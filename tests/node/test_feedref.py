"""node/feedref.py: the reference reader of JSON and CSV feeds, called directly on bytes.

It is the definition the fast parser (node/feedparse.py) must equal (tests/node/test_feedparse.py compares
the two); here its own answers are pinned: records and their context, malformed records counted with
where and why, whole-file refusals, and the CSV header rules (banner comments, a header in a comment line,
``indicator_column``, ``context_columns``, quoted newlines, ``include_subdomains``).
"""

from __future__ import annotations

from typing import Any

import pytest

from threatgate.config.node import FeedSettings
from threatgate.errors import FeedError
from threatgate.node.feedref import parse_columns
from threatgate.node.records import Kind, ParsedFeed


def parse(text: str, fmt: str = "csv", **kwargs: Any) -> ParsedFeed:
    settings = FeedSettings(path="/feeds/f", name="f", category="T", format=fmt, **kwargs)  # type: ignore[arg-type]
    return parse_columns(settings, text.encode("utf-8"))


def refusal(text: str, fmt: str = "csv", **kwargs: Any) -> str:
    with pytest.raises(FeedError) as caught:
        parse(text, fmt, **kwargs)
    return str(caught.value)


# -- JSON ---------------------------------------------------------------------------------------------------


def test_json_records_become_rows_with_their_context() -> None:
    parsed = parse('[{"url": "http://Evil.example/a", "threat": "x", "n": 2}, {"ip": "192.0.2.1"}]', "json")
    assert list(parsed.kinds) == [Kind.URL, Kind.IP]
    assert parsed.values == ["evil.example/a", "192.0.2.1"]
    assert parsed.raws == ["http://Evil.example/a", "192.0.2.1"]
    assert parsed.contexts == [(("threat", "x"), ("n", "2")), ()]
    assert parsed.report.records == 2 and parsed.report.malformed == 0


def test_json_bad_records_are_counted_with_where_and_why_and_the_rest_load() -> None:
    text = '[\n{"url": "http://a.example/"},\n{"url": },\n5,\n{"threat": "t"},\n{"ip": "999.1.1.1"},\n{"md5": "x"}\n]'
    parsed = parse(text, "json")
    assert parsed.report.records == 1
    assert parsed.report.examples == [
        "record 2 (line 3): invalid JSON: Expecting value",
        "record 3: expected an object, got int",
        "record 4: no indicator field (one of indicator, mask, url, domain, ip, md5, sha1, sha256)",
        "record 5: ip='999.1.1.1' is not a valid indicator",
        "record 6: md5='x' is not a valid indicator",
    ]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"url": "x"}', '/feeds/f: a JSON feed must be an array of records, found \'{"url": "x"}\''),
        ('[{"url": "http://a.example/"}', "/feeds/f: truncated JSON feed: it does not end with ']'"),
        ("[" + "[" * 10_000 + "]" * 10_000 + "]", "/feeds/f: record 1: cannot be read: "),
    ],
)
def test_json_that_is_not_a_feed_is_refused_whole(text: str, error: str) -> None:
    assert refusal(text, "json").startswith(error)


def test_an_empty_array_and_whitespace_are_an_empty_feed() -> None:
    assert parse(" \n[ ]\n", "json").report.records == 0


def test_bytes_that_are_not_utf8_are_refused() -> None:
    settings = FeedSettings(path="/feeds/f", name="f", category="T", format="json")
    with pytest.raises(FeedError, match=r"^/feeds/f: not UTF-8 \(byte 2\)$"):
        parse_columns(settings, b'["\xff"]')


# -- CSV ----------------------------------------------------------------------------------------------------


def test_csv_rows_read_by_header_with_comments_blank_lines_and_crlf() -> None:
    parsed = parse("# banner\n\nurl,threat\r\nhttp://a.example/x,t1\r\n# a comment\nhttp://b.example/y,t2\n")
    assert parsed.values == ["a.example/x", "b.example/y"]
    assert parsed.contexts == [(("threat", "t1"),), (("threat", "t2"),)]
    assert parsed.header == ["url", "threat"]


def test_csv_header_in_the_last_comment_line_as_urlhaus_publishes_it() -> None:
    parsed = parse("# URLhaus\n# id,dateadded,url\n1,2024-01-01,http://a.example/x\n")
    assert parsed.values == ["a.example/x"] and parsed.contexts == [(("id", "1"), ("dateadded", "2024-01-01"))]


def test_csv_quoted_fields_keep_delimiters_and_newlines() -> None:
    parsed = parse('url;note\n"http://a.example/x";"one; two\nthree"\n', delimiter=";")
    assert parsed.contexts == [(("note", "one; two three"),)]  # a newline in context is blanked


def test_csv_bad_rows_are_counted_by_line() -> None:
    parsed = parse("ip,threat\n192.0.2.1,a\n192.0.2.2\nnot-an-ip,b\n")
    assert parsed.report.records == 1
    assert parsed.report.examples == [
        "line 3: 1 fields, header has 2",
        "line 4: ip='not-an-ip' is not a valid indicator",
    ]


def test_indicator_column_names_the_column_and_a_non_field_name_is_classified_by_shape() -> None:
    parsed = parse("first_seen,dst_ip,port\n2024,192.0.2.1,443\n", indicator_column="DST_IP")
    assert list(parsed.kinds) == [Kind.IP] and parsed.header == ["first_seen", "indicator", "port"]
    assert parsed.contexts == [(("first_seen", "2024"), ("port", "443"))]


def test_include_subdomains_column_flags_a_domain() -> None:
    parsed = parse("domain,Include_Subdomains\na.example,yes\nb.example,no\n")
    assert list(parsed.kinds) == [Kind.DOMAIN_SUFFIX, Kind.DOMAIN]
    assert parsed.subdomains == [True, False]


def test_context_columns_keep_only_those_matched_without_case() -> None:
    parsed = parse("url,Threat,tags\nhttp://a.example/x,t,z\n", context_columns=("threat",))
    assert parsed.contexts == [(("Threat", "t"),)]


@pytest.mark.parametrize(
    ("text", "kwargs", "error"),
    [
        ("", {}, "/feeds/f: empty CSV feed (no header row)"),
        ("# only\n# comments\n", {}, "/feeds/f: only comment lines, none of them a CSV header: an indicator column"),
        (
            "adress,threat\nx,y\n",
            {"indicator_column": "address"},
            "/feeds/f: CSV header ['adress', 'threat'] (line 1) has no indicator column: neither it nor a comment "
            "line before it has the column 'address' (indicator_column) (did you mean 'adress'?)",
        ),
        (
            "ip,url,indicator\n1,2,3\n",
            {"indicator_column": "url"},
            "/feeds/f: line 1: the indicator is column 2 ('url'), but column 3 is also named 'indicator'",
        ),
        (
            "url,threat\nhttp://a.example/,t\n",
            {"context_columns": ("thraet",)},
            "/feeds/f: context_columns: 'thraet' is not a column of the CSV header (did you mean 'threat'?)",
        ),
        (
            "url,threat\nhttp://a.example/,t\n",
            {"context_columns": ("URL",)},
            "/feeds/f: context_columns: 'URL' is the indicator column, never record context",
        ),
    ],
)
def test_a_csv_without_a_usable_header_or_with_a_bad_setting_is_refused(
    text: str, kwargs: dict[str, Any], error: str
) -> None:
    assert refusal(text, **kwargs).startswith(error)


def test_a_column_spelled_like_an_earlier_field_makes_the_indicator_read_back_as_indicator() -> None:
    parsed = parse("mask,url\nm,http://a.example/x\n", indicator_column="url")
    assert parsed.header == ["mask", "indicator"] and list(parsed.kinds) == [Kind.URL]
    assert parsed.contexts == [(("mask", "m"),)]
    assert parse("ip,url\n192.0.2.1,http://a.example/x\n", indicator_column="url").header == ["ip", "url"]


def test_a_column_spelled_like_the_same_field_also_makes_it_indicator() -> None:
    parsed = parse("url,url\nhttp://a.example/x,http://b.example/y\n")
    assert parsed.header == ["indicator", "url"] and parsed.values == ["a.example/x"]
    assert parsed.contexts == [(("url", "http://b.example/y"),)]


def test_a_comment_line_never_spans_lines_whatever_its_quotes() -> None:
    parsed = parse('# it is "quoted\nurl,threat\nhttp://a.example/x,t\n')
    assert parsed.values == ["a.example/x"]


def test_a_row_with_more_fields_than_the_header_is_malformed() -> None:
    parsed = parse("url,threat\nhttp://a.example/x,t,extra\n")
    assert parsed.report.examples == ["line 2: 3 fields, header has 2"]
