"""node/pcre.py: a Python regex translated to PCRE2 gives Python's values, or is refused.

Checked through the native engine (node/_engine) against Python's re on random patterns and subjects,
on the examples and pitfalls found in review, and on rules seen in the field; what PCRE2 would answer
differently (empty-loop captures, Unicode case folding) is refused so the source goes to the reference path.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from threatgate.errors import UnsupportedRegex
from threatgate.node import _engine
from threatgate.node.pcre import to_pcre2

_ATOMS = [
    "a",
    "b",
    "x",
    "=",
    r"\.",
    ".",
    r"\d",
    r"\w",
    r"\s",
    r"\S",
    r"\W",
    r"\D",
    "[a-f0-9]",
    "[^ =]",
    "[A-Z_]",
    r"[\s=]",
    r"[^\d\s]",
    r"\x1c",
    "\t",
    r"\b",
    r"\B",
    "^",
    "$",
    r"\A",
    r"\Z",
    "(?=a)",
    "(?!b)",
    "(?<=x)",
    "(?<!=)",
    "[.]",
    "-",
    "/",
    ":",
]
_QUANTS = ["", "", "", "*", "+", "?", "{1,3}", "*?", "+?", "??", "{2}", "*+", "++", "{0,2}?"]
_SUBJECT = st.text(alphabet="abxAB=. \t\n\x1c\x1f09_-/:fZ", max_size=40)


@st.composite
def _patterns(draw: st.DrawFn, depth: int = 0) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 9 if depth < 2 else 6))
        if kind <= 6:
            atom = draw(st.sampled_from(_ATOMS))
        else:
            inner = draw(_patterns(depth + 1))
            alt = draw(_patterns(depth + 1)) if kind == 9 else None
            body = f"{inner}|{alt}" if alt is not None else inner
            atom = draw(st.sampled_from(["({})", "(?:{})", "(?i:{})", "(?>{})", "(?s:{})"])).format(body)
        parts.append(atom + draw(st.sampled_from(_QUANTS)))
    return "".join(parts)


def _python_values(pattern: re.Pattern[str], extract_all: bool, text: str) -> list[str]:
    from threatgate.node.matcher import _values

    class _R:  # the two attributes matcher._values reads
        def __init__(self) -> None:
            self.pattern = pattern
            self.extract_all = extract_all

    return _values(_R(), text)  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_patterns(), st.sampled_from(["", "(?i)", "(?m)", "(?s)", "(?im)", "(?a)", "(?ai)"]), st.booleans(), _SUBJECT)
def test_translated_regex_gives_pythons_values(body: str, flags: str, extract_all: bool, text: str) -> None:
    try:
        pattern = re.compile(flags + body)
    except re.error:
        assume(False)
        return
    try:
        source, options = to_pcre2(pattern)
    except UnsupportedRegex:
        assume(False)
        return
    assume(_engine.compile_error(source, options) is None)
    groups = pattern.groups
    mode = 2 if groups > 1 else (0 if extract_all else 1)
    try:
        got = _engine.step_values(source, options, groups, mode, int(extract_all), text)
    except RuntimeError:  # a PCRE2 limit: the engine hands the event to the reference path
        assume(False)
        return
    assert got == _python_values(pattern, extract_all, text), (pattern.pattern, source, text)


@pytest.mark.parametrize(
    "pattern",
    [r"\s+", r"[^\s]", r"(?i)[k]", r"\Z", r"(?m)^x", r"a(?=b)", r"(\d)+", r"(?P<n>a)(?P=n)", r"(a)?(?(1)b|c)"],
)
def test_translation_examples_agree_with_python(pattern: str) -> None:
    compiled = re.compile(pattern)
    source, options = to_pcre2(compiled)
    assert _engine.compile_error(source, options) is None
    for text in ["x\x1cy", "abab", "Kk", "a\nx\n", "x\n", "123", "aa", "ab", "c", "acb"]:
        mode = 2 if compiled.groups > 1 else 0
        assert _engine.step_values(source, options, compiled.groups, mode, 1, text) == _python_values(
            compiled, True, text
        ), text


@pytest.mark.parametrize(
    ("pattern", "text"),
    [
        (r"(?=1)(?:ip=)?(1[\d.]*)", "1.2.3.4"),  # PCRE2 10.42's start-of-match optimisation loses this match
        (r"(?a)ip=(\S+)", "ip=1.2.3.4\x1cx"),  # under re.ASCII, \x1c is not a space
        (r"\B", ""),  # Python's \B never matches an empty string
        (r"x\B", "xy"),
    ],
)
def test_translation_pitfalls_found_in_review(pattern: str, text: str) -> None:
    compiled = re.compile(pattern)
    source, options = to_pcre2(compiled)
    assert _engine.compile_error(source, options) is None
    for extract_all in (False, True):
        mode = 2 if compiled.groups > 1 else (0 if extract_all else 1)
        got = _engine.step_values(source, options, compiled.groups, mode, int(extract_all), text)
        assert got == _python_values(compiled, extract_all, text)


@pytest.mark.parametrize("pattern", [r"(|1\.2\.3\.4){0,2}", r"(a*)*", r"(?:x?)+", r"(?a:\s)"])
def test_translation_refuses_what_pcre2_answers_differently(pattern: str) -> None:
    with pytest.raises(UnsupportedRegex):
        to_pcre2(re.compile(pattern))


def test_translation_refuses_unicode_case_folding() -> None:
    # U+212A KELVIN SIGN matches "k" under IGNORECASE in Python; PCRE2 without UTF would not.
    with pytest.raises(UnsupportedRegex, match="IGNORECASE"):
        to_pcre2(re.compile("(?i)\u212a"))


@pytest.mark.parametrize(
    "rule",
    [
        r"^(\d+)\s",
        r"url=(\S+)",
        r"(?:src|dst)=(\d{1,3}(?:\.\d{1,3}){3})",
        r"md5=([\da-fA-F]{32})",
        r"\b([a-fA-F0-9]{64})\b",
        r"(?i)(?:https?|ftp)://[^\s\"'<>]+",
        r"(?<=request=)\S+",
        r"(?P<host>[a-z0-9.-]+\.[a-z]{2,})(?::\d+)?",
        r"dhost=(\S+)|shost=(\S+)",
        r"suser=([^\s=]+(?:\s(?!\w+=)[^\s=]+)*)",
        r"msg=\"((?:[^\"\\]|\\.)*)\"",
        r"(?m)^\s*query:\s*(\S+)$",
        r"(?x) src= ( \d+ (?: \.\d+ ){3} )",
    ],
)
def test_rules_seen_in_the_field_run_on_the_compiled_engine(rule: str) -> None:
    source, options = to_pcre2(re.compile(rule))
    assert _engine.compile_error(source, options) is None
