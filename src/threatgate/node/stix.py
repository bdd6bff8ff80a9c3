"""STIX 2.1 (and 2.0) bundles as feeds: indicator objects whose patterns compare one observable.

Rules:
1. Only ``indicator`` objects with ``pattern_type`` "stix" (or none, as in STIX 2.0) are read; every
   other object (identity, malware, relationship...) is ignored without being counted.
2. A pattern is parsed by a small, strict parser for the subset a lookup can answer: observations
   ``[ <path> = '<string>' (OR ...)* ]`` joined by OR, parentheses allowed.  Supported paths are
   ``url:value``, ``domain-name:value``, ``ipv4-addr:value``, ``ipv6-addr:value`` (CIDR allowed)
   and ``file:hashes.<MD5|SHA-1|SHA1|SHA-256|SHA256>`` (hash name quoted or not, any case).
3. Every supported comparison becomes one record: the indicator under the field name
   :func:`~threatgate.node.feeds.classify` expects (``url``, ``domain``, ``ip``, ``md5``, ``sha1``,
   ``sha256``), then context (``stix_id``, ``name``, ``indicator_types``, ``valid_from``,
   ``confidence``, ``labels``).
4. What cannot be looked up is *skipped* (``LoadReport.skip``): a pattern using AND, FOLLOWEDBY or a
   qualifier (WITHIN, REPEATS, START/STOP) as a whole, because no single value proves it; inside an
   OR-only pattern just the comparison that uses another path, operator or a non-string value,
   because each OR branch detects on its own.  Revoked indicators are skipped; other pattern types
   (yara, sigma, snort...) are skipped.  What is *wrong* is counted malformed (``LoadReport.bad``):
   a pattern that does not parse, a value the path's type rejects, an entry that is not an object.
5. A file that is not a bundle (not JSON, no ``"type": "bundle"``, no ``objects`` array, larger than
   :data:`MAX_BUNDLE_SIZE`) raises :class:`FeedError`: the caller keeps the previous version.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from threatgate.config.node import FeedSettings
from threatgate.errors import FeedError
from threatgate.fs import os_reason
from threatgate.node.feedsnapshot import MemorySnapshot
from threatgate.node.records import classify, context_text, parse_document, read_document

log = logging.getLogger("threatgate.node")

MAX_BUNDLE_SIZE = 256 * 1024 * 1024
"""A bundle is parsed into Python objects (several times its size), so its size is bounded."""

MAX_NESTING = 32
"""Deepest parenthesis/bracket nesting a pattern may use; deeper is valid STIX but never seen in feeds."""

_HASHES = {"MD5": "md5", "SHA-1": "sha1", "SHA1": "sha1", "SHA-256": "sha256", "SHA256": "sha256"}
_HASH_LENGTH = {"md5": 32, "sha1": 40, "sha256": 64}
_VALUE_PATHS = {"url": "url", "domain-name": "domain", "ipv4-addr": "ip", "ipv6-addr": "ip"}
_STRUCTURAL = frozenset({"AND", "FOLLOWEDBY", "WITHIN", "REPEATS", "START", "STOP"})
"""Keywords that make a whole pattern unsupported: a single observed value never satisfies them."""

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>'(?:[^'\\]|\\.)*')
      | (?P<word>[A-Za-z0-9_][A-Za-z0-9_-]*)
      | (?P<punct>!=|<>|<=|>=|\S)
    )""",
    re.X | re.S,
)
_ESCAPE = re.compile(r"\\(.)", re.S)


class PatternError(ValueError):
    """The pattern is not valid STIX patterning (counted malformed)."""


class UnsupportedPattern(ValueError):
    """The pattern is valid but a lookup cannot decide it (counted skipped)."""


@dataclass(frozen=True, slots=True)
class Comparison:
    """One comparison of an OR-only pattern.

    ``field`` is the record field the value goes under (``url``, ``domain``, ``ip``, ``md5``...),
    or "" when the comparison cannot be looked up; ``unsupported`` then says why.
    """

    path: str
    field: str
    value: str
    unsupported: str = ""


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "str", "word", "punct" or "end"
    text: str  # the string's content (unescaped) for "str", else the token as written


_END = _Token("end", "")


def _tokenize(pattern: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    size = len(pattern)
    match = _TOKEN.match
    while True:
        m = match(pattern, pos)
        if m is None:  # only trailing whitespace is left
            return tokens
        kind = m.lastgroup or "punct"
        text = m.group(kind)
        if kind == "str":
            text = _ESCAPE.sub(_unescape, text[1:-1])
        elif text == "'":
            raise PatternError(f"unterminated string at character {m.start(kind)}")
        tokens.append(_Token(kind, text))
        pos = m.end()
        if pos >= size:
            return tokens


def _unescape(m: re.Match[str]) -> str:
    char = m.group(1)
    if char not in ("'", "\\"):
        raise PatternError(f"invalid escape \\{char} in a string (only \\' and \\\\ are allowed)")
    return char


class _Parser:
    """Recursive descent over the tokens; collects comparisons, raises on anything else."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.out: list[Comparison] = []

    def peek(self, ahead: int = 0) -> _Token:
        i = self.pos + ahead
        return self.tokens[i] if i < len(self.tokens) else _END

    def take(self) -> _Token:
        tok = self.peek()
        self.pos += 1
        return tok

    def accept(self, kind: str, text: str) -> bool:
        tok = self.peek()
        if tok.kind == kind and tok.text == text:
            self.pos += 1
            return True
        return False

    def expect(self, text: str, where: str) -> None:
        if not self.accept("punct", text):
            raise PatternError(f"expected {text!r} {where}, found {_show(self.peek())}")

    def structural(self) -> None:
        """Raise for a keyword that joins or qualifies observations in a way we cannot look up."""
        tok = self.peek()
        if tok.kind == "word" and tok.text in _STRUCTURAL:
            raise UnsupportedPattern(f"{tok.text} (only OR can be looked up)")

    def pattern(self) -> list[Comparison]:
        if not self.tokens:
            raise PatternError("empty pattern")
        self.observations(0)
        tok = self.peek()
        if tok.kind != "end":
            raise PatternError(f"unexpected {_show(tok)} after the pattern")
        return self.out

    def observations(self, depth: int) -> None:
        self.observation(depth)
        while self.accept("word", "OR"):
            self.observation(depth)
        self.structural()

    def observation(self, depth: int) -> None:
        if depth >= MAX_NESTING:
            raise UnsupportedPattern(f"nested more than {MAX_NESTING} levels")
        if self.accept("punct", "("):
            self.observations(depth + 1)
            self.expect(")", "closing a group of observations")
        elif self.accept("punct", "["):
            self.comparisons(depth + 1)
            self.structural()
            self.expect("]", "closing an observation")
        else:
            raise PatternError(f"expected '[' or '(' starting an observation, found {_show(self.peek())}")
        self.structural()  # a qualifier right after the observation

    def comparisons(self, depth: int) -> None:
        self.comparison_term(depth)
        while self.accept("word", "OR"):
            self.comparison_term(depth)

    def comparison_term(self, depth: int) -> None:
        if depth >= MAX_NESTING:
            raise UnsupportedPattern(f"nested more than {MAX_NESTING} levels")
        if self.accept("punct", "("):
            self.comparisons(depth + 1)
            self.structural()
            self.expect(")", "closing a group of comparisons")
        else:
            self.comparison()

    def comparison(self) -> None:
        if self.accept("word", "EXISTS"):
            path, _ = self.path()
            self.out.append(Comparison(path, "", "", "EXISTS"))
            return
        path, field = self.path()
        negated = self.accept("word", "NOT")
        operator = self.take()
        if not _is_operator(operator):
            raise PatternError(f"{path}: expected an operator, found {_show(operator)}")
        value = self.peek()
        if value.kind == "end" or _is_punct(value, "]", ")", "["):
            raise PatternError(f"{path}: missing value after {operator.text}")
        if not negated and operator.text == "=" and value.kind == "str":
            self.pos += 1  # what follows is checked by the caller (OR, AND, ']' or ')')
            if field:
                self.out.append(Comparison(path, field, value.text))
            else:
                self.out.append(Comparison(path, "", value.text, f"object path {path}"))
            return
        if negated or operator.text != "=":
            why = f"operator {'NOT ' if negated else ''}{operator.text}"
        else:
            why = f"{path} = {value.text[:40]}: the value is not a string"
        self.skip_operand()
        self.out.append(Comparison(path, "", "", why))

    def path(self) -> tuple[str, str]:
        """``object-type:property(.component|[index])*`` as written, and the record field it maps to."""
        obj = self.take()
        if obj.kind != "word":
            raise PatternError(f"expected an object path, found {_show(obj)}")
        self.expect(":", f"after object type {obj.text!r}")
        parts: list[str] = []
        shown = obj.text + ":"
        first = self.take()
        if first.kind not in ("word", "str"):
            raise PatternError(f"expected a property name after {shown!r}, found {_show(first)}")
        parts.append(first.text)
        shown += _show_part(first)
        while True:
            if self.accept("punct", "."):
                part = self.take()
                if part.kind not in ("word", "str"):
                    raise PatternError(f"expected a property name after {shown + '.'!r}, found {_show(part)}")
                parts.append(part.text)
                shown += "." + _show_part(part)
            elif _is_punct(self.peek(), "[") and _is_punct(self.peek(2), "]"):
                index = self.peek(1)  # list index: [*] or [n]
                self.pos += 3
                parts.append("[" + index.text + "]")
                shown += "[" + index.text + "]"
            else:
                return shown, _field_of(obj.text, parts)

    def skip_operand(self) -> None:
        """Move past the value of an unsupported comparison (a literal, or a set for IN)."""
        depth = 0
        while True:
            tok = self.peek()
            if tok.kind == "end":
                if depth:
                    raise PatternError("unbalanced '(' in a value set")
                return
            if depth == 0 and (_is_punct(tok, "]", ")") or (tok.kind == "word" and tok.text in ("OR", "AND"))):
                return
            if _is_punct(tok, "("):
                depth += 1
            elif _is_punct(tok, ")"):
                depth -= 1
            self.pos += 1


def _field_of(obj_type: str, parts: list[str]) -> str:
    """The record field of a supported path, "" for any other."""
    if len(parts) == 1 and parts[0] == "value":
        return _VALUE_PATHS.get(obj_type, "")
    if obj_type == "file" and len(parts) == 2 and parts[0] == "hashes":
        return _HASHES.get(parts[1].upper(), "")
    return ""


def _show(tok: _Token) -> str:
    return "the end" if tok.kind == "end" else repr(tok.text[:40])


def _is_punct(tok: _Token, *texts: str) -> bool:
    return tok.kind == "punct" and tok.text in texts


_OPERATORS = frozenset({"=", "!=", "<>", "<", ">", "<=", ">="})
_WORD_OPERATORS = frozenset({"MATCHES", "LIKE", "IN", "ISSUBSET", "ISSUPERSET"})


def _is_operator(tok: _Token) -> bool:
    return (tok.kind == "punct" and tok.text in _OPERATORS) or (tok.kind == "word" and tok.text in _WORD_OPERATORS)


def _show_part(tok: _Token) -> str:
    return "'" + tok.text.replace("\\", "\\\\").replace("'", "\\'") + "'" if tok.kind == "str" else tok.text


def parse_pattern(pattern: str) -> list[Comparison]:
    """The comparisons of an OR-only STIX pattern, in order.

    Raises:
        PatternError: the text is not a STIX pattern (or uses a construct outside what we parse).
        UnsupportedPattern: valid, but AND, FOLLOWEDBY or a qualifier make it undecidable by one value.
    """
    return _Parser(_tokenize(pattern)).pattern()


def _check(field: str, path: str, value: str) -> str:
    """Why ``value`` does not fit the path's type beyond what classify() checks; "" if it does."""
    if path.startswith("ipv4-addr:") and ":" in value:
        return "is not an IPv4 address"
    if path.startswith("ipv6-addr:") and ":" not in value:
        return "is not an IPv6 address"
    expected = _HASH_LENGTH.get(field)
    if expected is not None and len(value.strip()) != expected:
        return f"is not a {field.upper()} ({expected} hex digits)"
    return ""


def _joined(value: object) -> str | None:
    if isinstance(value, list):
        items = [text for text in (context_text(v) for v in value) if text]
        return ",".join(items) if items else None
    return context_text(value)


def _context(obj: dict[str, Any]) -> dict[str, Any]:
    context: dict[str, Any] = {}
    for key, name in (
        ("id", "stix_id"),
        ("name", "name"),
        ("indicator_types", "indicator_types"),
        ("valid_from", "valid_from"),
        ("confidence", "confidence"),
        ("labels", "labels"),
    ):
        text = _joined(obj.get(key))
        if text:
            context[name] = text
    return context


def _where(index: int, obj: dict[str, Any]) -> str:
    ident = obj.get("id")
    label = ident[:100] if isinstance(ident, str) and ident.isprintable() else "no id"
    return f"object {index} ({label})"


def _load_indicator(snapshot: MemorySnapshot, index: int, obj: dict[str, Any]) -> None:
    report = snapshot.report
    where = _where(index, obj)
    if obj.get("revoked") is True:
        report.skip(where, "revoked")
        return
    pattern_type = obj.get("pattern_type", "stix")
    if pattern_type != "stix":
        shown = pattern_type[:40] if isinstance(pattern_type, str) else pattern_type
        report.skip(where, f"pattern_type {shown!r} is not supported (only stix)")
        return
    pattern = obj.get("pattern")
    if not isinstance(pattern, str):
        report.bad(where, "no pattern (or not a string)")
        return
    try:
        comparisons = parse_pattern(pattern)
    except UnsupportedPattern as exc:
        report.skip(where, f"unsupported pattern: {exc}")
        return
    except PatternError as exc:
        report.bad(where, f"invalid pattern: {exc}")
        return
    context = _context(obj)
    seen: set[tuple[str, str]] = set()
    for comp in comparisons:
        if not comp.field:
            report.skip(where, f"unsupported pattern: {comp.unsupported}")
            continue
        if (comp.field, comp.value) in seen:
            continue
        seen.add((comp.field, comp.value))
        problem = _check(comp.field, comp.path, comp.value)
        indicator = None if problem else classify(comp.value, comp.field)
        if indicator is None:
            report.bad(where, f"{comp.path} {comp.value[:80]!r} {problem or 'is not a valid indicator'}")
            continue
        record: dict[str, Any] = {comp.field: comp.value}
        record.update(context)
        snapshot.add_record(record, indicator)


def load_stix(settings: FeedSettings, data: bytes | str | None = None) -> MemorySnapshot:
    """Load the STIX bundle in ``data``, or read from ``settings.path`` when ``data`` is None.

    Raises:
        FeedError: unreadable, too large, not JSON, or not a bundle (keep the previous version).
    """
    path = settings.path
    snapshot = MemorySnapshot(settings)
    if data is None:
        try:
            data, st = read_document(path, MAX_BUNDLE_SIZE)
        except OSError as exc:
            raise FeedError(f"{path}: cannot read: {os_reason(exc)}") from None
        snapshot.identity = (st.st_ino, st.st_size, st.st_mtime_ns)
    snapshot.digest = hashlib.sha256(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data).digest()
    bundle = parse_document(path, data)
    del data
    if not isinstance(bundle, dict) or bundle.get("type") != "bundle":
        raise FeedError(f'{path}: a STIX feed must be a bundle: a JSON object with "type": "bundle"')
    objects = bundle.get("objects")
    if not isinstance(objects, list):
        raise FeedError(f'{path}: the bundle has no "objects" array')
    report = snapshot.report
    for index, obj in enumerate(objects):
        if not isinstance(obj, dict):
            report.bad(f"object {index}", f"expected an object, got {type(obj).__name__}")
        elif obj.get("type") == "indicator":
            _load_indicator(snapshot, index, obj)
    report.log_skipped(log, settings.name, "STIX pattern(s) or comparison(s)")
    return snapshot
