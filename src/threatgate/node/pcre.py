"""Python regular expressions rewritten for PCRE2, for the compiled engine's ASCII events.

Rules:
1. The PCRE2 text is generated from Python's own parse tree (``re._parser``), never by editing the
   pattern text, so every construct means what Python's parser decided it means.
2. The result is exact for ASCII subjects only: the compiled engine runs it on events made of ASCII
   bytes and hands every other event to the reference matcher.  Categories become explicit ASCII
   classes (Python's ``\\s`` includes ``\\x1c``-``\\x1f``, PCRE2's does not), ``\\Z`` becomes ``\\z``,
   ``^`` under MULTILINE also matches after a final newline (PCRE2_ALT_CIRCUMFLEX).
3. Whatever cannot be proved to give the same answer raises :class:`UnsupportedRegex` with the reason in
   words; the caller then runs that source on the reference path and says so once.  The differential
   tests (tests/node/test_engine_diff.py) compare both engines on random rules and hostile events.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from threatgate.errors import UnsupportedRegex

# Python's own regex parser (typeshed does not describe these private modules, hence Any).
C: Any = importlib.import_module("re._constants")
P: Any = importlib.import_module("re._parser")

__all__ = ["ANCHORED", "CASELESS", "DOTALL", "ENDANCHORED", "MULTILINE", "to_pcre2"]

# PCRE2 option bits (pcre2.h) the engine passes to pcre2_compile.
ANCHORED = 0x80000000
ENDANCHORED = 0x20000000
CASELESS = 0x00000008
DOTALL = 0x00000020
MULTILINE = 0x00000400

_DIGIT = [(0x30, 0x39)]
_WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE = [(0x09, 0x0D), (0x1C, 0x20)]  # str.isspace() over ASCII
_SPACE_ASCII = [(0x09, 0x0D), (0x20, 0x20)]  # \s under re.ASCII: [ \t\n\r\f\v]
NO_START_OPTIMIZE = 0x00010000


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = 0
    for lo, hi in sorted(ranges):
        if lo > pos:
            out.append((pos, lo - 1))
        pos = max(pos, hi + 1)
    if pos <= 0x7F:
        out.append((pos, 0x7F))
    return out


_CATEGORIES: dict[Any, list[tuple[int, int]]] = {
    C.CATEGORY_DIGIT: _DIGIT,
    C.CATEGORY_NOT_DIGIT: _complement(_DIGIT),
    C.CATEGORY_WORD: _WORD,
    C.CATEGORY_NOT_WORD: _complement(_WORD),
    C.CATEGORY_SPACE: _SPACE,
    C.CATEGORY_NOT_SPACE: _complement(_SPACE),
}
_CATEGORIES_ASCII = {
    **_CATEGORIES,
    C.CATEGORY_SPACE: _SPACE_ASCII,
    C.CATEGORY_NOT_SPACE: _complement(_SPACE_ASCII),
}


def _hex(c: int) -> str:
    return f"\\x{{{c:x}}}"


def _klass(ranges: list[tuple[int, int]], negate: bool) -> str:
    """A PCRE2 class over ASCII ``ranges`` (an empty positive class never matches)."""
    if not ranges:
        return "[\\x{0}-\\x{7f}]" if negate else "(*FAIL)"
    body = "".join(_hex(lo) if lo == hi else f"{_hex(lo)}-{_hex(hi)}" for lo, hi in ranges)
    return f"[{'^' if negate else ''}{body}]"


class _Emitter:
    def __init__(self, ascii: bool) -> None:
        self.ascii = ascii  # re.ASCII: \s is [ \t\n\r\f\v] (scoped (?a:...) is refused)
        self.lookaround = False  # PCRE2 10.42 mis-optimises a leading lookahead (fixed upstream, PR #444)

    def literal(self, code: int, caseless: bool) -> bool:
        """Whether ``code`` can match an ASCII character at all; raises when that is unknowable."""
        if code <= 0x7F:
            return True
        if caseless:
            raise UnsupportedRegex("a non-ASCII character under IGNORECASE (Unicode case folding)")
        return False

    def seq(self, items: Any, caseless: bool) -> str:
        return "".join(self.item(op, av, caseless) for op, av in items)

    def item(self, op: Any, av: Any, caseless: bool) -> str:  # noqa: C901 - one branch per opcode
        if op is C.LITERAL:
            return _hex(av) if self.literal(av, caseless) else "(*FAIL)"
        if op is C.NOT_LITERAL:
            return f"[^{_hex(av)}]" if self.literal(av, caseless) else "[\\x{0}-\\x{7f}]"
        if op is C.ANY:
            return "."
        if op is C.IN:
            return self.klass(av, caseless)
        if op is C.BRANCH:
            return "(?:" + "|".join(self.seq(alt, caseless) for alt in av[1]) + ")"
        if op is C.SUBPATTERN:
            group, add, remove, sub = av
            if (add | remove) & re.ASCII:
                raise UnsupportedRegex("a scoped ASCII flag (?a:...)")
            flags = _flags(add, remove)
            if add & re.IGNORECASE:
                caseless = True
            if remove & re.IGNORECASE:
                caseless = False
            inner = self.seq(sub, caseless)
            if flags:
                inner = f"(?{flags}:{inner})"
            return f"({inner})" if group is not None else f"(?:{inner})"
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT):
            lo, hi, sub = av
            if (hi is C.MAXREPEAT or hi > 1) and sub.getwidth()[0] == 0:
                # Python and PCRE2 iterate a repeated body that can match empty differently (captures, spans).
                raise UnsupportedRegex("a repeated group that can match an empty string")
            suffix = "?" if op is C.MIN_REPEAT else "+" if op is C.POSSESSIVE_REPEAT else ""
            bound = f"{{{lo},}}" if hi is C.MAXREPEAT else f"{{{lo},{hi}}}"
            return f"(?:{self.seq(sub, caseless)}){bound}{suffix}"
        if op is C.AT:
            return _AT[av]
        if op in (C.ASSERT, C.ASSERT_NOT):
            self.lookaround = True
            direction, sub = av
            kind = ("=" if op is C.ASSERT else "!") if direction == 1 else ("<=" if op is C.ASSERT else "<!")
            return f"(?{kind}{self.seq(sub, caseless)})"
        if op is C.GROUPREF:
            return f"\\g{{{av}}}"
        if op is C.GROUPREF_EXISTS:
            group, yes, no = av
            return f"(?({group}){self.seq(yes, caseless)}|{self.seq(no, caseless) if no is not None else ''})"
        if op is C.ATOMIC_GROUP:
            return f"(?>{self.seq(av, caseless)})"
        raise UnsupportedRegex(f"the regex construct {op} is not supported by the compiled engine")

    def klass(self, items: Any, caseless: bool) -> str:
        negate = False
        ranges: list[tuple[int, int]] = []
        for op, av in items:
            if op is C.NEGATE:
                negate = True
            elif op is C.LITERAL:
                if self.literal(av, caseless):
                    ranges.append((av, av))
            elif op is C.RANGE:
                lo, hi = av
                if hi > 0x7F and caseless:
                    raise UnsupportedRegex("a non-ASCII range under IGNORECASE (Unicode case folding)")
                if lo <= 0x7F:
                    ranges.append((lo, min(hi, 0x7F)))
            elif op is C.CATEGORY:
                table = _CATEGORIES_ASCII if self.ascii else _CATEGORIES
                if av not in table:
                    raise UnsupportedRegex(f"the class category {av} is not supported by the compiled engine")
                ranges.extend(table[av])
            else:
                raise UnsupportedRegex(f"the class member {op} is not supported by the compiled engine")
        return _klass(_merge(ranges), negate)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


_AT = {
    C.AT_BEGINNING: "^",
    C.AT_BEGINNING_STRING: "\\A",
    C.AT_END: "$",
    C.AT_END_STRING: "\\z",
    C.AT_BOUNDARY: "\\b",
    C.AT_NON_BOUNDARY: "(?!\\A\\z)\\B",  # Python 3.11's \B never matches an empty string; PCRE2's does
}


def _flags(add: int, remove: int) -> str:
    on = "".join(c for f, c in ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s")) if add & f)
    off = "".join(c for f, c in ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s")) if remove & f)
    return on + (f"-{off}" if off else "")


def to_pcre2(pattern: re.Pattern[str]) -> tuple[str, int]:
    """(PCRE2 pattern text, PCRE2 options) giving ``pattern``'s answers on ASCII subjects.

    Raises:
        UnsupportedRegex: a construct without a proven PCRE2 equivalent (the reason, in words).
    """
    if not isinstance(pattern.pattern, str):
        raise UnsupportedRegex("a bytes pattern")
    flags = pattern.flags
    if flags & re.LOCALE:
        raise UnsupportedRegex("the LOCALE flag")
    try:
        tree = P.parse(pattern.pattern, flags)
    except re.error as exc:  # compiled by Python already; a parse error here would be a Python bug
        raise UnsupportedRegex(f"the pattern did not parse again ({exc})") from None
    caseless = bool(tree.state.flags & re.IGNORECASE)
    emitter = _Emitter(bool(tree.state.flags & re.ASCII))
    text = emitter.seq(tree.data, caseless)
    options = NO_START_OPTIMIZE if emitter.lookaround else 0
    if caseless:
        options |= CASELESS
    if tree.state.flags & re.MULTILINE:
        options |= MULTILINE
    if tree.state.flags & re.DOTALL:
        options |= DOTALL
    return text, options
