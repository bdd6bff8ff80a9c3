"""Table-driven tests for threatgate.node.normalize (see docs/normalization.md for the rules)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threatgate.config.node import load_node_config
from threatgate.node import normalize as norm
from threatgate.node.engine import make_matcher
from threatgate.node.feeds import load_feed
from threatgate.node.normalize import (
    hash_kind,
    normalize_domain,
    normalize_hash,
    normalize_ip,
    normalize_ipv4_host,
    normalize_url,
    parse_ip,
)
from threatgate.node.store import IndicatorStore

# ---------------------------------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------------------------------

URL_CASES: list[tuple[str, str | None]] = [
    # Kaspersky reference vectors (normalize_url/pkg/url/testdata/urls.csv) and documented examples
    ("https://www.example.com:443/?q=hello%20world#fragment", "example.com/?q=hello world"),
    ("http://example.com:80", "example.com"),
    ("http://www.example.com/../a/b/../c/./d.html", "example.com/a/c/d.html"),
    ("http://github.com@520966948", "31.13.83.36"),
    # scheme: default added, any scheme removed, slashes after it are not significant
    ("http://example.com/a", "example.com/a"),
    ("HTTPS://EXAMPLE.COM/A", "example.com/a"),
    ("ftp://example.com/file.txt", "example.com/file.txt"),
    ("example.com/a", "example.com/a"),
    ("//example.com/a", "example.com/a"),
    ("http:example.com/a", "example.com/a"),
    ("http:///example.com", "example.com"),
    ("hxxp://evil.com/x", "evil.com/x"),
    # www. prefix
    ("http://www.example.com/", "example.com"),
    ("www.www.example.com", "example.com"),
    ("http://www2.example.com", "www2.example.com"),
    ("http://wwwexample.com", "wwwexample.com"),
    # port
    ("https://example.com:8443/a", "example.com/a"),
    ("example.com:", "example.com"),
    ("localhost:8080/x", "localhost/x"),
    ("http://example.com:abc/", None),
    # host case and dots
    ("http://Ex.AMPLE.Com", "ex.ample.com"),
    ("http://example..com./", "example.com"),
    ("http://.example.com", "example.com"),
    ("http://sub_domain.example.com/", "sub_domain.example.com"),
    # dot segments (RFC 3986 section 5.2.4), also when percent-encoded
    ("http://example.com/a/%2e%2E/b", "example.com/b"),
    ("http://example.com/a/b/..", "example.com/a"),
    ("http://example.com/a/..?q", "example.com/?q"),
    ("http://example.com/../../a", "example.com/a"),
    ("http://example.com/.hidden/..file", "example.com/.hidden/..file"),
    # ... removed before repeated slashes collapse (RFC 3986 5.2.4, WHATWG): an empty segment is a
    # segment, so ".." after "//" removes it and cannot climb past a path a feed lists
    # (expected values checked against WHATWG's URL parser, then trailing "/" dropped)
    ("http://example.com/foo/bar//..", "example.com/foo/bar"),
    ("http://example.com/foo/bar//..?q", "example.com/foo/bar/?q"),
    ("http://example.com/foo/bar//../baz", "example.com/foo/bar/baz"),
    ("http://example.com/foo/bar//%2e%2E", "example.com/foo/bar"),
    ("http://example.com/foo/bar///../..", "example.com/foo/bar"),
    ("http://example.com/a//b/../..", "example.com/a"),
    ("http://example.com/a/.//..", "example.com/a"),
    ("http://example.com/a\\\\..", "example.com/a"),
    ("http://example.com//..", "example.com"),
    ("http://example.com/./", "example.com"),
    ("http://example.com/a/./b/.", "example.com/a/b"),
    ("http://example.com/a/b/../../..", "example.com"),
    ("http://example.com/a/b/../../..?q", "example.com/?q"),
    ("http://example.com/a/b/%2e%2e", "example.com/a"),
    ("http://example.com/a/b/%2e%2e?q", "example.com/a/?q"),
    ("http://example.com/a/b/.%2E/../c", "example.com/c"),
    # repeated slashes in path and query
    ("http://example.com//a///b", "example.com/a/b"),
    ("http://example.com/a?u=http://x//y", "example.com/a?u=http:/x/y"),
    # backslash is a path separator
    ("http://example.com\\a\\b", "example.com/a/b"),
    ("http:\\\\example.com\\a\\..\\b", "example.com/b"),
    ("http://example.com/a%5cb", "example.com/a/b"),
    # percent-decoding: once, UTF-8, path and query lowercased
    ("http://example.com/%41%42c", "example.com/abc"),
    ("http://example.com/a%2Fb", "example.com/a/b"),
    ("http://example.com/caf%C3%A9", "example.com/café"),
    ("http://example.com/%FF", "example.com/%ff"),
    ("http://example.com/100%", "example.com/100%"),
    ("http://example.com/%2541", "example.com/%2541"),
    ("http://example.com/a%3Fb", "example.com/a%3fb"),
    ("http://example.com/a?x=%23y", "example.com/a?x=%23y"),
    ("http://%65xample.com/", "example.com"),
    ("http://example.com/A?B=C&D=E", "example.com/a?b=c&d=e"),
    # "+" is never a space; %2B is "+"
    ("http://example.com/?q=a+b", "example.com/?q=a+b"),
    ("http://example.com/?q=a%2Bb", "example.com/?q=a+b"),
    # NUL dropped
    ("http://example.com/?q=a%00b", "example.com/?q=ab"),
    ("http://example.com/a%00b", "example.com/ab"),
    ("http://example.com/?%00", "example.com"),
    # fragment removed
    ("http://example.com/a#frag", "example.com/a"),
    ("http://example.com/#a?b", "example.com"),
    # userinfo removed (last "@" wins)
    ("http://user:pass@example.com/a", "example.com/a"),
    ("http://a@b@example.com/", "example.com"),
    # IDN host -> punycode
    ("http://пример.рф/", "xn--e1afmkfd.xn--p1ai"),
    ("http://ПРИМЕР.РФ/Путь", "xn--e1afmkfd.xn--p1ai/путь"),
    ("http://www.bücher.de", "xn--bcher-kva.de"),
    ("http://пример。рф", "xn--e1afmkfd.xn--p1ai"),
    ("http://xn--e1afmkfd.xn--p1ai/", "xn--e1afmkfd.xn--p1ai"),
    # IPv4 hosts in octal, hex, integer and short forms (inet_aton)
    ("http://0300.0250.0.1/", "192.168.0.1"),
    ("http://0xC0A80001/", "192.168.0.1"),
    ("http://3232235521/", "192.168.0.1"),
    ("http://192.168.1/", "192.168.0.1"),
    ("http://0xc0.0xa8.0x00.0x01", "192.168.0.1"),
    ("http://192.168.0.1:8080/a", "192.168.0.1/a"),
    ("http://www.0x7f.1", "127.0.0.1"),
    ("http://08.1.2.3/", "08.1.2.3"),
    ("http://1.2.3.256/", "1.2.3.256"),
    # IPv6 hosts: compressed, lowercase, always bracketed, port and zone dropped
    ("http://[2001:DB8:0:0:0:0:0:1]/", "[2001:db8::1]"),
    ("http://[2001:db8::1]:8080/a", "[2001:db8::1]/a"),
    ("2001:db8::1", "[2001:db8::1]"),
    ("http://[::ffff:192.0.2.1]/", "[::ffff:192.0.2.1]"),
    ("http://[fe80::1%25eth0]/", "[fe80::1]"),
    ("http://[2001:db8::zz]/", None),
    ("http://[2001:db8::1/", None),
    ("http://[::1]x/", None),
    # trailing slash: dropped unless a query follows; an empty path before a query becomes "/"
    ("example.com/", "example.com"),
    ("example.com/a/", "example.com/a"),
    ("example.com/a/?q=1", "example.com/a/?q=1"),
    ("example.com?q=1", "example.com/?q=1"),
    ("example.com/?", "example.com"),
    ("example.com/a?", "example.com/a"),
    # whitespace
    ("  http://example.com/a  ", "example.com/a"),
    ("http://exa\tmple.com/\n", "example.com"),
    ("http://example.com/a%20", "example.com/a%20"),
    ("http://example.com/a b", "example.com/a b"),
    # literal "*" is an ordinary character without allow_wildcard (host: invalid)
    ("http://example.com/*", "example.com/*"),
    ("http://example.com/a%2Ab", "example.com/a*b"),
    ("http://*.example.com/", None),
    # garbage
    ("", None),
    ("   ", None),
    ("http://", None),
    ("http://exa mple.com", None),
    ("http://exa<mple.com", None),
    ("http://ex!.com", None),
    ("http://ex%zzample.com", None),
    ("http://@/", None),
    ("http://:80/", None),
    ("http://[]/", None),
    ("http://.../", None),
    ("javascript:alert(1)", None),
    ("about:blank", None),
]


@pytest.mark.parametrize(("raw", "expected"), URL_CASES)
def test_normalize_url(raw: str, expected: str | None) -> None:
    assert normalize_url(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), [c for c in URL_CASES if c[1] is not None])
def test_normalize_url_is_idempotent_on_table(raw: str, expected: str) -> None:
    assert normalize_url(expected) == expected


WILDCARD_CASES: list[tuple[str, str | None]] = [
    ("*.example.com/path/*", "*.example.com/path/*"),
    ("example.com/*/x", "example.com/*/x"),
    ("example.com/*", "example.com/*"),
    ("http://*.Example.com:*/A/*", "*.example.com/a/*"),
    ("http://www.*.example.com/*", "*.example.com/*"),
    ("*.пример.рф/*", "*.xn--e1afmkfd.xn--p1ai/*"),
    ("example.com/a%2Ab", "example.com/a%2ab"),  # an escaped star stays a literal, never a wildcard
    ("example.com/?q=*", "example.com/?q=*"),
    ("https://www.example.com:443/?q=hello%20world#fragment", "example.com/?q=hello world"),
    ("*", "*"),
    ("http://ex ample.com/*", None),
]


@pytest.mark.parametrize(("raw", "expected"), WILDCARD_CASES)
def test_normalize_url_wildcard(raw: str, expected: str | None) -> None:
    assert normalize_url(raw, allow_wildcard=True) == expected
    if expected is not None:
        assert normalize_url(expected, allow_wildcard=True) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "http://host.example.com/a/b?c=d",
        "HTTP://Host.Example.COM/a/b?c=d",
        "example.com",
        "https://cdn.example.org/static/js/app.min.js",
        "example.com/a/?q=1",
        "example.com/?q=1",
    ],
)
def test_fast_path_taken_for_simple_urls(raw: str) -> None:
    assert norm._FAST_URL.fullmatch(raw.lower()) is not None
    assert normalize_url(raw) == norm._normalize_url_slow(raw, False)


@pytest.mark.parametrize(
    "raw",
    [
        "http://www.example.com/",
        "http://example.com:80/",
        "http://example.com/a/",
        "http://example.com//a",
        "http://example.com/./a",
        "http://example.com/a%20b",
        "http://example.com/a\\b",
        "http://example.com/#x",
        "http://u@example.com/",
        "http://0x7f000001/",
        "http://1.2.3.4/",
        "http://example.com./",
        "http://exämple.com/",
        "example.com?q",
        "example.com/?",
        "example.com/?a//b",
        "c://example.com",
    ],
)
def test_fast_path_rejects_what_needs_work(raw: str) -> None:
    assert norm._FAST_URL.fullmatch(raw.lower()) is None


# ---------------------------------------------------------------------------------------------------------------
# Domains
# ---------------------------------------------------------------------------------------------------------------

DOMAIN_CASES: list[tuple[str, str | None]] = [
    ("example.com", "example.com"),
    ("Example.COM.", "example.com"),
    ("  example.com\n", "example.com"),
    ("www.example.com", "example.com"),
    ("http://www.evil.com/x", "evil.com"),
    ("evil.com:8080", "evil.com"),
    ("пример.рф", "xn--e1afmkfd.xn--p1ai"),
    ("xn--e1afmkfd.xn--p1ai", "xn--e1afmkfd.xn--p1ai"),
    (".example.com", "example.com"),
    ("ex..com", "ex.com"),
    ("localhost", "localhost"),
    ("sub_domain.example.com", "sub_domain.example.com"),
    ("www.com", "com"),  # Go reference parity: "www." is stripped whenever something follows
    ("*.example.com", None),
    ("1.2.3.4", None),
    ("0x7f000001", None),
    ("http://1.2.3.4/x", None),
    ("[::1]", None),
    ("::1", None),
    ("example.123", None),
    ("", None),
    ("exa mple.com", None),
    ("exa!mple.com", None),
]


@pytest.mark.parametrize(("raw", "expected"), DOMAIN_CASES)
def test_normalize_domain(raw: str, expected: str | None) -> None:
    assert normalize_domain(raw) == expected
    if expected is not None:
        assert normalize_domain(expected) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("*.example.com", "*.example.com"), ("*.Пример.рф.", "*.xn--e1afmkfd.xn--p1ai"), ("a.*.com", "a.*.com")],
)
def test_normalize_domain_wildcard(raw: str, expected: str) -> None:
    assert normalize_domain(raw, allow_wildcard=True) == expected


@pytest.mark.parametrize("domain", ["example.com", "WWW.Example.com.", "пример.рф", "a..b.example.com"])
def test_domain_matches_url_host(domain: str) -> None:
    url = normalize_url(f"http://www.{domain}/x")
    assert url is not None
    assert url.partition("/")[0] == normalize_domain(domain)


# ---------------------------------------------------------------------------------------------------------------
# IP addresses
# ---------------------------------------------------------------------------------------------------------------

IP_CASES: list[tuple[str, str | None]] = [
    ("1.2.3.4", "1.2.3.4"),
    (" 1.2.3.4 ", "1.2.3.4"),
    ("0.0.0.0", "0.0.0.0"),
    ("255.255.255.255", "255.255.255.255"),
    ("010.001.002.003", "10.1.2.3"),  # zero-padded octets are decimal for IP indicators
    ("1.2.3.04", "1.2.3.4"),
    ("2001:DB8::1", "2001:db8::1"),
    ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("fe80::1%eth0", "fe80::1"),
    ("::ffff:1.2.3.4", "::ffff:1.2.3.4"),
    ("::", "::"),
    ("256.1.1.1", None),
    ("1.2.3", None),
    ("1.2.3.4.5", None),
    ("1.2.3.", None),
    ("1.2.3.0004", None),
    ("0x1.2.3.4", None),
    ("3232235521", None),
    ("1.2.3.4/24", None),
    ("1.2.3.4:80", None),
    ("+1.2.3.4", None),
    ("١.٢.٣.٤", None),
    ("2001:db8::g", None),
    ("[::1", None),
    ("", None),
    ("example.com", None),
]


@pytest.mark.parametrize(("raw", "expected"), IP_CASES)
def test_normalize_ip(raw: str, expected: str | None) -> None:
    assert normalize_ip(raw) == expected
    if expected is not None:
        assert normalize_ip(expected) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1.2.3.4", (4, 0x01020304)),
        ("255.255.255.255", (4, 0xFFFFFFFF)),
        (" 10.0.0.1\n", (4, 0x0A000001)),
        ("010.0.0.1", (4, 0x0A000001)),
        ("::1", (6, 1)),
        ("[::1]", (6, 1)),
        ("2001:db8::1", (6, 0x20010DB8000000000000000000000001)),
        ("256.0.0.1", None),
        ("1.2.3", None),
        ("0xa.0.0.1", None),
        ("", None),
        ("::g", None),
    ],
)
def test_parse_ip(raw: str, expected: tuple[int, int] | None) -> None:
    assert parse_ip(raw) == expected


IPV4_HOST_CASES: list[tuple[str, str | None]] = [
    ("0300.0250.0.1", "192.168.0.1"),
    ("0xC0A80001", "192.168.0.1"),
    ("3232235521", "192.168.0.1"),
    ("192.168.1", "192.168.0.1"),
    ("0xa40300b", "10.64.48.11"),
    ("0112.0175.0117.0150", "74.125.79.104"),
    ("0xa.0x40.0x30.0xb", "10.64.48.11"),
    ("30.31.8225", "30.31.32.33"),
    ("30.2039841", "30.31.32.33"),
    ("192.168.65535", "192.168.255.255"),
    ("0377.0377.0377.0377", "255.255.255.255"),
    ("0x", "0.0.0.0"),
    ("0000000000000001", "0.0.0.1"),
    ("1.2.3.4", "1.2.3.4"),
    ("4294967296", None),
    ("1.2.3.256", None),
    ("08.1.2.3", None),
    ("0x1g", None),
    ("1.2.3.4.5", None),
    ("1..2", None),
    ("", None),
    (" 1.2.3.4", None),
    ("9" * 5000, None),
]


@pytest.mark.parametrize(("raw", "expected"), IPV4_HOST_CASES)
def test_normalize_ipv4_host(raw: str, expected: str | None) -> None:
    assert normalize_ipv4_host(raw) == expected


# ---------------------------------------------------------------------------------------------------------------
# Hashes
# ---------------------------------------------------------------------------------------------------------------

MD5 = "d41d8cd98f00b204e9800998ecf8427e"
SHA1 = "da39a3ee5e6b4b0d3255bfef95601890afd80709"
SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

HASH_CASES: list[tuple[str, str | None, str | None]] = [
    (MD5, MD5, "MD5"),
    (MD5.upper(), MD5, "MD5"),
    (f"  {SHA1}\n", SHA1, "SHA1"),
    (SHA256, SHA256, "SHA256"),
    (MD5[:-1], None, None),
    (MD5 + "0", None, None),
    (MD5[:-1] + "g", None, None),
    ("0x" + MD5[2:], None, None),
    ("", None, None),
    ("a" * 128, None, None),
    ("٠" * 32, None, None),
]


@pytest.mark.parametrize(("raw", "expected", "kind"), HASH_CASES)
def test_normalize_hash(raw: str, expected: str | None, kind: str | None) -> None:
    assert normalize_hash(raw) == expected
    assert hash_kind(raw) == kind


# ---------------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------------

# Tokens that hit every branch: schemes, separators, escapes (valid, invalid, double, non-UTF-8), dot segments,
# numeric hosts, IPv6 brackets, IDN and IDNA dot variants, whitespace, NUL and wildcards.
_TOKENS = [
    "http://", "HTTPS://", "hxxp:", "//", "/", "\\", "?", "#", "@", ":", ":80", "[", "]", "::", "::1", ".", "..",
    "www.", "WWW.", "a", "B", "z", "0", "1", "9", "0x", "0X1f", "010", "255", "256", "4294967296", "example",
    ".com", "-", "_", "*", "+", "%", "%2e", "%2E", "%2f", "%5c", "%25", "%41", "%ff", "%c3%a9", "%c3", "%00",
    "%20", "%3f", "%23", "%2a", "%2A", " ", "\t", "\n", "\x00", "é", "П", "ß", "。", "．", "⒈", "\u200d",
    "xn--", "ab", "%zz", "İ", "K", "\x85", "\xa0",
]  # fmt: skip
url_like = st.lists(st.sampled_from(_TOKENS), max_size=24).map("".join)
any_text = st.one_of(st.text(max_size=64), url_like)


@settings(max_examples=1500, deadline=None)
@given(raw=any_text, wildcard=st.booleans())
def test_url_idempotent_total_and_fast_path_agrees(raw: str, wildcard: bool) -> None:
    result = normalize_url(raw, allow_wildcard=wildcard)
    assert result == norm._normalize_url_slow(raw, wildcard)
    if result is not None:
        assert result
        assert normalize_url(result, allow_wildcard=wildcard) == result


@settings(max_examples=500, deadline=None)
@given(
    host=st.from_regex(r"[a-z][a-z0-9\-]{0,10}(\.[a-z0-9\-]{1,10}){0,3}\.[a-z]{2,6}", fullmatch=True),
    path=st.from_regex(r"(/[a-z0-9_.~\-]{1,8}){0,4}", fullmatch=True),
    query=st.from_regex(r"(\?[a-z0-9=&]{1,12})?", fullmatch=True),
    scheme=st.sampled_from(["", "http://", "HTTPS://", "ftp://"]),
)
def test_simple_urls_fast_path_equals_slow_path(host: str, path: str, query: str, scheme: str) -> None:
    raw = scheme + host + path + query
    assert normalize_url(raw) == norm._normalize_url_slow(raw, False)


@settings(max_examples=500, deadline=None)
@given(raw=any_text, wildcard=st.booleans())
def test_domain_idempotent_and_total(raw: str, wildcard: bool) -> None:
    result = normalize_domain(raw, allow_wildcard=wildcard)
    if result is not None:
        assert normalize_domain(result, allow_wildcard=wildcard) == result


@settings(max_examples=500, deadline=None)
@given(raw=st.one_of(st.text(max_size=48), url_like, st.ip_addresses().map(str)))
def test_ip_idempotent_and_total(raw: str) -> None:
    result = normalize_ip(raw)
    assert (result is None) == (parse_ip(raw) is None)
    if result is not None:
        assert normalize_ip(result) == result
        assert parse_ip(result) == parse_ip(raw)
    host = normalize_ipv4_host(raw)
    if host is not None:
        assert normalize_ipv4_host(host) == host


@settings(max_examples=300, deadline=None)
@given(address=st.ip_addresses())
def test_parse_ip_agrees_with_ipaddress(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert parse_ip(str(address)) == (address.version, int(address))
    assert normalize_ip(address.exploded) == normalize_ip(str(address))


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(st.text(max_size=70), st.text("0123456789abcdefABCDEF", min_size=30, max_size=66)))
def test_hash_idempotent_and_total(raw: str) -> None:
    result = normalize_hash(raw)
    if result is not None:
        assert normalize_hash(result) == result
        assert hash_kind(result) is not None


# ---------------------------------------------------------------------------------------------------------------
# The same tables through a matcher, on both engines (the compiled engine has its own normalisation fast paths)
# ---------------------------------------------------------------------------------------------------------------

ENGINE_TABLES: dict[str, tuple[str, str, list[tuple[str, str | None]]]] = {
    # rule type: (feed field, rule type, cases)
    "URL": ("url", "URL", URL_CASES),
    "DOMAIN": ("domain", "DOMAIN", DOMAIN_CASES),
    "IP": ("ip", "IP", IP_CASES),
    "HASH": ("indicator", "HASH", [(raw, expected) for raw, expected, _ in HASH_CASES]),
}


def _detections_by_event(
    tmp_path: Path, rule_type: str, field: str, cases: list[tuple[str, str | None]]
) -> dict[int, set[str]]:
    """Detections by event: event ``i`` carries case i's raw text, event ``len(cases) + i`` its normal form;
    the feed lists every normal form once."""
    listed = sorted({expected for _, expected in cases if expected is not None})
    (tmp_path / "feed.json").write_text(json.dumps([{field: value} for value in listed]), encoding="utf-8")
    (tmp_path / "node.conf").write_text(
        f"""<?xml version="1.0"?>
<Configuration>
  <InputSettings>
    <ConnectionString>127.0.0.1:9999</ConnectionString>
    <RegExps>
      <Source id="default">
        <REQ type="CONTEXT">^(\\d+) </REQ>
        <RE_V type="{rule_type}" extract="first">^\\d+ v=(.+)$</RE_V>
      </Source>
    </RegExps>
  </InputSettings>
  <OutputSettings>
    <ConnectionString>127.0.0.1:9998</ConnectionString>
    <EventFormat>%REQ%\t%MatchedIndicator%</EventFormat>
    <RecordFieldContextFormat>%ParamName%=%ParamValue%</RecordFieldContextFormat>
    <ActionableFieldContextFormat>%ParamName%:%ParamValue%</ActionableFieldContextFormat>
    <FinishedEventFormat enabled="false">%REQ%</FinishedEventFormat>
  </OutputSettings>
  <Feeds><Feed filename="feed.json" category="Listed" confidence="100"/></Feeds>
</Configuration>
""",
        encoding="utf-8",
    )
    config = load_node_config(str(tmp_path / "node.conf"))
    store = IndicatorStore({0: load_feed(config.feeds.feeds[0])})
    events = [f"{i} v={raw}" for i, (raw, _) in enumerate(cases)]
    events += [f"{len(cases) + i} v={expected}" for i, (_, expected) in enumerate(cases) if expected is not None]
    found: dict[int, set[str]] = {i: set() for i in range(2 * len(cases))}
    for line in make_matcher(config, store).match(events, date="Oct 11 22:14:15"):
        number, indicator = line.rstrip("\n").split("\t", 1)
        found[int(number)].add(indicator)
    return found


@pytest.mark.parametrize("table", sorted(ENGINE_TABLES))
def test_every_table_case_detects_what_its_normal_form_detects_on_each_engine(
    engine: str, table: str, tmp_path: Path
) -> None:
    """The raw text of a case detects exactly the records its normal form detects (the same normalisation
    on the event path as in the table), an invalid one detects nothing; most normal forms are listed
    records, so the comparison is not vacuous.  Cases whose raw text cannot sit on one event line
    (empty, surrounding blanks, a newline) are left out."""
    field, rule_type, cases = ENGINE_TABLES[table]
    cases = [(raw, expected) for raw, expected in cases if raw.strip() and "\n" not in raw and raw == raw.strip()]
    found = _detections_by_event(tmp_path, rule_type, field, cases)
    for i, (raw, expected) in enumerate(cases):
        if expected is None:
            assert found[i] == set(), (engine, raw)
        else:
            assert found[i] == found[len(cases) + i], (engine, raw, expected)
    valid = [i for i, (_, expected) in enumerate(cases) if expected is not None]
    assert sum(1 for i in valid if found[i]) >= 0.8 * len(valid), (engine, found)
