"""Tests for threatgate.wire.paths: request-target normalisation and route patterns (no sockets)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from threatgate.errors import PathError
from threatgate.wire.paths import (
    RoutePattern,
    api_version,
    canonical_version,
    normalize_path,
    render_path,
    version_spellings,
)

# -- normalize_path ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "segments"),
    [
        ("/", ()),
        ("/api/1.1/lookup", ("api", "1.1", "lookup")),
        ("/api/1.1/lookup/", ("api", "1.1", "lookup")),
        # dot segments, removed after decoding; climbing above the root stops at the root
        ("/a/./b", ("a", "b")),
        ("/a/../b", ("b",)),
        ("/a/b/..", ("a",)),
        ("/a/b/../../../../c", ("c",)),
        ("/..", ()),
        ("/../../etc/passwd", ("etc", "passwd")),
        ("/api/1.1/suppliers/../x", ("api", "1.1", "x")),
        ("/api/1.1/suppliers/%2e%2e/x", ("api", "1.1", "x")),
        ("/api/1.1/suppliers/%2E%2E/x", ("api", "1.1", "x")),
        ("/api/1.1/suppliers/.%2e/x", ("api", "1.1", "x")),
        ("/api/1.1/suppliers/%2e./x", ("api", "1.1", "x")),
        ("/a/%2e/b", ("a", "b")),
        ("/api/1.1/suppliers/%2e%2e", ("api", "1.1")),
        # ... but only whole segments: these are names, not dot segments
        ("/a/.../b", ("a", "...", "b")),
        ("/a/..x/b", ("a", "..x", "b")),
        ("/a/.hidden", ("a", ".hidden")),
        # %2F stays inside its segment, so it can only ever fail a name check
        ("/api/1.1/suppliers/a%2Fb", ("api", "1.1", "suppliers", "a/b")),
        ("/api/1.1/suppliers/a%2fb", ("api", "1.1", "suppliers", "a/b")),
        ("/a/%2e%2e%2fb", ("a", "../b")),
        ("/a/..%2F..%2Fetc", ("a", "../../etc")),
        ("/a/%2e%2e%2f", ("a", "../")),
        ("/a/%2F", ("a", "/")),
        # empty segments are dropped
        ("//api//1.1//suppliers", ("api", "1.1", "suppliers")),
        ("///", ()),
        ("//host/a", ("host", "a")),
        # ... after dot segments are removed: ".." after "//" removes the empty segment (RFC 3986, WHATWG)
        ("/a/b//..", ("a", "b")),
        ("/api/1.1/suppliers//../x", ("api", "1.1", "suppliers", "x")),
        ("/a//b/../..", ("a",)),
        ("//..", ()),
        # ;parameters are not special
        ("/api/1.1/lookup;x", ("api", "1.1", "lookup;x")),
        ("/a/..;/b", ("a", "..;", "b")),
        ("/a;/b", ("a;", "b")),
        # percent-decoding as UTF-8, raw non-ASCII kept as is
        ("/api/1.1/suppliers/My%20Supplier", ("api", "1.1", "suppliers", "My Supplier")),
        ("/caf%C3%A9", ("café",)),
        ("/café", ("café",)),
        ("/%F0%9F%98%80", ("\U0001f600",)),
        ("/a%25b", ("a%b",)),
        ("/a%3Fb", ("a?b",)),
        ("/a%23b", ("a#b",)),
        ("/a+b", ("a+b",)),
        # query and fragment are not part of the path, whatever they hold
        ("/api/1.1/lookup?x=1", ("api", "1.1", "lookup")),
        ("/a/b?x=../../c", ("a", "b")),
        ("/a?%zz", ("a",)),
        ("/a?%00", ("a",)),
        ("/a?", ("a",)),
        ("/a#frag/../..", ("a",)),
        ("/a#x?y", ("a",)),
        ("/a?x#y", ("a",)),
    ],
)
def test_normalize_path(target: str, segments: tuple[str, ...]) -> None:
    assert normalize_path(target) == segments


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        # malformed escapes
        ("/%", "malformed %-escape"),
        ("/a%", "malformed %-escape"),
        ("/%2", "malformed %-escape"),
        ("/a%2/b", "malformed %-escape"),
        ("/%zz", "malformed %-escape"),
        ("/%g0", "malformed %-escape"),
        ("/%0g", "malformed %-escape"),
        ("/%%41", "malformed %-escape"),
        ("/ok%41%", "malformed %-escape"),
        ("/%-1", "malformed %-escape"),
        ("/% 1", "malformed %-escape"),
        # invalid UTF-8 once decoded
        ("/%ff", "not UTF-8"),
        ("/%C3", "not UTF-8"),
        ("/%C3%28", "not UTF-8"),
        ("/%80", "not UTF-8"),
        ("/%ED%A0%80", "not UTF-8"),  # an encoded surrogate
        ("/%C0%AF", "not UTF-8"),  # overlong "/"
        ("/%C0%AE%C0%AE", "not UTF-8"),  # overlong ".."
        # control characters, escaped or raw
        ("/%00", "control character"),
        ("/a%00b", "control character"),
        ("/a%0ab", "control character"),
        ("/a%0D%0Ab", "control character"),
        ("/%09", "control character"),
        ("/%1f", "control character"),
        ("/%7F", "control character"),
        ("/a\x00b", "control character"),
        ("/a\x01b", "control character"),
        ("/a\tb", "control character"),
        ("/a\x7fb", "control character"),
        # not origin-form
        ("", "not an absolute path"),
        ("*", "not an absolute path"),
        ("a/b", "not an absolute path"),
        ("?x=1", "not an absolute path"),
        ("#x", "not an absolute path"),
        ("http://127.0.0.1/api/1.1/suppliers", "not an absolute path"),
        ("https://host:8443/api/1.1/lookup", "not an absolute path"),
        ("127.0.0.1:8443", "not an absolute path"),
        (" /a", "not an absolute path"),
        ("%2Fa", "not an absolute path"),
    ],
)
def test_normalize_path_refuses(target: str, problem: str) -> None:
    with pytest.raises(PathError, match=problem):
        normalize_path(target)


def test_path_error_is_a_value_error_with_a_bounded_message() -> None:
    assert issubclass(PathError, ValueError)
    with pytest.raises(PathError) as info:
        normalize_path("http://" + "x" * 10_000)
    assert len(str(info.value)) < 200
    with pytest.raises(PathError) as info:
        normalize_path("/" + "%zz" * 10_000)
    assert len(str(info.value)) < 200


def test_dot_segments_climb_only_within_the_path() -> None:
    """However many ``..`` follow, nothing escapes the root: only the tail after them remains."""
    for n in range(1, 6):
        assert normalize_path("/api" + "/.." * n + "/x") == ("x",)
        assert normalize_path("/api" + "/%2e%2e" * n + "/x") == ("x",)


def test_render_path() -> None:
    assert render_path(()) == "/"
    assert render_path(("api", "1.1", "lookup")) == "/api/1.1/lookup"
    assert render_path(("a/b", "c d")) == "/a/b/c d"  # for messages: not re-encoded


# -- RoutePattern --------------------------------------------------------------------------------


def test_route_pattern_parse() -> None:
    assert RoutePattern.parse("suppliers/{name}/indicators").segments == ("suppliers", "{name}", "indicators")
    assert RoutePattern.parse("/lookup/").segments == ("lookup",)
    assert RoutePattern.parse("a//b").segments == ("a", "b")
    assert RoutePattern.parse("").segments == ()
    assert str(RoutePattern.parse("/suppliers/{name}/")) == "suppliers/{name}"


def test_route_pattern_match() -> None:
    pattern = RoutePattern.parse("suppliers/{name}/indicators")
    assert pattern.match(("suppliers", "s1", "indicators")) == {"name": "s1"}
    assert pattern.match(("suppliers", "a/b", "indicators")) == {"name": "a/b"}  # from %2F: the handler refuses it
    assert pattern.match(("suppliers", "{name}", "indicators")) == {"name": "{name}"}
    assert pattern.match(("suppliers", "s1")) is None
    assert pattern.match(("suppliers", "s1", "indicators", "x")) is None
    assert pattern.match(("Suppliers", "s1", "indicators")) is None  # literals are case-sensitive
    assert pattern.match(("suppliers", "s1", "indicator")) is None
    assert pattern.match(()) is None
    assert RoutePattern.parse("lookup").match(("lookup",)) == {}
    assert RoutePattern.parse("lookup").match(("lookup;x",)) is None
    assert RoutePattern.parse("").match(()) == {}
    assert RoutePattern.parse("tags/{tag}").match(("tags", "")) == {"tag": ""}  # normalize_path never yields ""
    two = RoutePattern.parse("{a}/x/{b}")
    assert two.match(("1", "x", "2")) == {"a": "1", "b": "2"}


def test_normalised_targets_route_as_expected() -> None:
    pattern = RoutePattern.parse("suppliers/{name}/indicators")

    def route(target: str) -> dict[str, str] | None:
        segments = normalize_path(target)
        assert segments[:2] == ("api", "1.1")
        return pattern.match(segments[2:])

    assert route("/api/1.1/suppliers/My%20Supplier/indicators") == {"name": "My Supplier"}
    assert route("//api/1.1/./suppliers//s1/indicators/?x") == {"name": "s1"}
    assert route("/api/1.1/suppliers/s1/x/../indicators") == {"name": "s1"}
    assert route("/api/1.1/suppliers/s1/%2e%2e/s2/indicators") == {"name": "s2"}
    assert route("/api/1.1/suppliers/s1%2Findicators") is None


# -- properties ----------------------------------------------------------------------------------

_TOKENS = st.sampled_from(
    ["/", "/", "//", ".", "..", "%", "%2e", "%2E", "%2f", "%2F", "%25", "%00", "%0a", "%ff", "%C3", "%A9", "%e2%82%ac"]
    + ["%ED%A0%80", "%z", "%2", ";", ";x", "?", "#", "a", "b", "é", " ", "\x00", "\x7f", "\t", "~", "+", "*", ":"]
)
_TARGETS = st.one_of(
    st.lists(_TOKENS, max_size=30).map("".join),
    st.lists(_TOKENS, max_size=30).map(lambda parts: "/" + "".join(parts)),
    st.text(max_size=60),
    st.text(max_size=60).map(lambda s: "/" + s),
)


@given(_TARGETS)
@example("/%2e%2e/%2E./.%2e/..")
@example("/a/%2e%2e%2f..")
@example("/\udcff")
def test_normalize_path_raises_only_path_error_and_yields_clean_segments(target: str) -> None:
    try:
        segments = normalize_path(target)
    except PathError:
        return
    assert isinstance(segments, tuple)
    for segment in segments:
        assert isinstance(segment, str)
        assert segment not in ("", ".", "..")
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in segment)


@given(_TARGETS)
def test_normalize_path_is_idempotent_on_plain_output(target: str) -> None:
    """Rendering the segments again (when none holds a character with path syntax) normalises to the same."""
    try:
        segments = normalize_path(target)
    except PathError:
        return
    if any(c in segment for segment in segments for c in "/%?#"):
        return
    assert normalize_path(render_path(segments)) == segments


_SEGMENT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", ".."))


@given(st.lists(_SEGMENT, max_size=8))
def test_percent_encoded_segments_decode_back(segments: list[str]) -> None:
    """Any name, fully percent-encoded (``/``, ``.`` and ``%`` included), is exactly one segment again."""
    target = "/" + "/".join(quote(s, safe="") for s in segments)
    assert normalize_path(target) == tuple(segments)
    # encoding every byte, dots too, changes nothing
    target = "/" + "/".join("".join(f"%{b:02X}" for b in s.encode()) for s in segments)
    assert normalize_path(target) == tuple(segments)


# -- the API version: one spelling ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segments", "want"),
    [
        (("api", "v.1.1", "lookup"), ("api", "1.1", "lookup")),
        (("api", "1.1", "lookup"), ("api", "1.1", "lookup")),
        (("api", "v.1.2", "suppliers", "v.x"), ("api", "1.2", "suppliers", "v.x")),  # the version segment only
        (("api", "v."), ("api", "")),  # an empty version: no placeholder takes it (below)
        (("ioc_exports", "v.1.1"), ("ioc_exports", "v.1.1")),  # only under /api
        (("API", "v.1.1"), ("API", "v.1.1")),
        (("api",), ("api",)),
        ((), ()),
    ],
)
def test_canonical_version(segments: tuple[str, ...], want: tuple[str, ...]) -> None:
    assert canonical_version(segments) == want


@given(st.lists(st.sampled_from(["api", "v.1.1", "1.1", "v.", "v.v.1", "lookup", "x"]), max_size=5))
def test_canonical_is_idempotent_except_for_a_doubled_prefix(segments: list[str]) -> None:
    once = canonical_version(tuple(segments))
    if segments[1:2] != ["v.v.1"]:
        assert canonical_version(once) == once


@pytest.mark.parametrize(
    ("segment", "version"), [("v.1.1", "1.1"), ("1.1", "1.1"), ("v.", ""), ("v.v.1", "v.1"), ("V.1.1", "V.1.1")]
)
def test_api_version(segment: str, version: str) -> None:
    assert api_version(segment) == version


def test_version_spellings_plain_first_then_prefixed() -> None:
    assert version_spellings(v for v in ("1.1", "1.2")) == ["1.1", "1.2", "v.1.1", "v.1.2"]
    assert version_spellings([]) == []
