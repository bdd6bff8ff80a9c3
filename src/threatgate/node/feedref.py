"""The reference reader of JSON and CSV feeds: record by record, the definition the fast parser
(:mod:`threatgate.node.feedparse`) must equal, and its fallback for files orjson refuses.

CSV layout rules (comments, header, ``indicator_column``, ``context_columns``): see
:mod:`threatgate.node.feeds`.
"""

from __future__ import annotations

import csv
import difflib
import itertools
import json
import re
from collections.abc import Iterator
from typing import Any

from threatgate.config.node import FeedSettings
from threatgate.errors import FeedError
from threatgate.node.records import (
    _SUBDOMAIN_FIELDS,
    _TRUTHY,
    INDICATOR_FIELDS,
    ParsedFeed,
    add_row,
    classify,
    indicator_of,
    record_context,
)

_JSON_GAP = re.compile(r"[\s,]*")


def _csv_row(line: str, delimiter: str) -> list[str]:
    if '"' not in line:
        return line.split(delimiter)
    return next(csv.reader([line], delimiter=delimiter), [])


def parse_columns(settings: FeedSettings, data: bytes) -> ParsedFeed:
    """The reference parser of JSON and CSV feed bytes into columns (see ``feedparse.parse_feed``).

    Raises:
        FeedError: not UTF-8, or not a feed at all.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FeedError(f"{settings.path}: not UTF-8 (byte {exc.start})") from None
    parsed = ParsedFeed()
    if settings.format == "json":
        _load_json(settings, parsed, text)
    else:
        _load_csv(settings, parsed, text)
    return parsed


def _load_json(settings: FeedSettings, parsed: ParsedFeed, text: str) -> None:
    path = settings.path
    start = _JSON_GAP.match(text, 0)
    pos = start.end() if start else 0
    if not text.startswith("[", pos):
        raise FeedError(f"{path}: a JSON feed must be an array of records, found {text[pos : pos + 20]!r}")
    end_of_array = len(text.rstrip()) - 1
    if end_of_array <= pos or text[end_of_array] != "]":
        raise FeedError(f"{path}: truncated JSON feed: it does not end with ']'")
    pos += 1
    decoder = json.JSONDecoder()
    raw_decode = decoder.raw_decode
    gap = _JSON_GAP.match
    report = parsed.report
    n = 0
    while True:
        m = gap(text, pos)
        pos = m.end() if m else pos
        if pos >= end_of_array:
            break
        n += 1
        try:
            obj, end = raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            report.bad(f"record {n} (line {exc.lineno})", f"invalid JSON: {exc.msg}")
            nxt = text.find("\n", exc.pos)
            pos = end_of_array if nxt < 0 else nxt
            continue
        except (ValueError, RecursionError) as exc:  # an integer of 4,300 digits, nesting 1,000 deep
            raise FeedError(f"{path}: record {n}: cannot be read: {str(exc)[:100] or type(exc).__name__}") from None
        if not isinstance(obj, dict):
            report.bad(f"record {n}", f"expected an object, got {type(obj).__name__}")
            pos = end
            continue
        indicator = indicator_of(obj)
        if indicator is None:
            report.bad(f"record {n}", _why_no_indicator(obj))
        else:
            add_row(parsed, indicator, tuple(record_context(obj)))
        pos = end


def _why_no_indicator(record: dict[str, Any]) -> str:
    for name in INDICATOR_FIELDS:
        if name in record:
            return f"{name}={str(record[name])[:80]!r} is not a valid indicator"
    return f"no indicator field (one of {', '.join(INDICATOR_FIELDS)})"


_Line = tuple[int, int, str]
"""(start offset, line number, logical line) of a CSV file."""


def _lines(text: str) -> Iterator[_Line]:
    """(start offset, line number, logical line) with quoted newlines kept inside one CSV row."""
    pos = 0
    lineno = 0
    size = len(text)
    while pos < size:
        end = text.find("\n", pos)
        if end < 0:
            end = size
        line_start = pos
        lineno += 1
        first = lineno
        comment = text.startswith("#", line_start)  # a comment never spans lines, whatever its quotes
        while not comment and text.count('"', line_start, end) % 2 and end < size:  # a quoted field spans lines
            nxt = text.find("\n", end + 1)
            end = size if nxt < 0 else nxt
            lineno += 1
        yield line_start, first, text[line_start:end]
        pos = end + 1


def _load_csv(settings: FeedSettings, parsed: ParsedFeed, text: str) -> None:
    delimiter = settings.delimiter
    lines = _lines(text)
    header, header_line, first_row = _find_csv_header(settings, lines)
    col, field_name, sub_col = _csv_columns(settings, header, header_line)
    names = list(header)
    names[col] = field_name
    if sub_col >= 0:
        names[sub_col] = header[sub_col].lower()
    parsed.header = names
    keep = None
    if settings.context_columns is not None:
        keep = _csv_context_columns(settings, header, names, col)
    width = len(header)
    report = parsed.report
    for _start, lineno, line in itertools.chain(first_row, lines):
        row_text = line.rstrip("\r")
        if not row_text.strip() or row_text.startswith("#"):
            continue
        row = _csv_row(row_text, delimiter)
        if len(row) != width:
            report.bad(f"line {lineno}", f"{len(row)} fields, header has {width}")
            continue
        flag = sub_col >= 0 and row[sub_col].strip().lower() in _TRUTHY
        indicator = classify(row[col], field_name, flag)
        if indicator is None:
            report.bad(f"line {lineno}", f"{field_name}={row[col][:80]!r} is not a valid indicator")
            continue
        add_row(parsed, indicator, tuple(record_context(dict(zip(names, row, strict=True)), keep)))


def _find_csv_header(settings: FeedSettings, lines: Iterator[_Line]) -> tuple[list[str], int, list[_Line]]:
    """The header row, its line number, and the first data row when it was read to decide (or none).

    Feeds are published with a banner of ``#`` comment lines, and some (abuse.ch URLhaus) put the
    header itself in the last comment line: ``# id,dateadded,url,...``.  The header is the first
    uncommented row when that row names the indicator column; otherwise the *last* comment line
    before it that does, and the uncommented row is the first record.  A row "names the indicator
    column" when it has ``indicator_column``, or (when that is not set) one of ``INDICATOR_FIELDS``.

    Raises:
        FeedError: no row or comment line before the first record is such a header.
    """
    path = settings.path
    want = settings.indicator_column.lower()
    commented: tuple[list[str], int] | None = None
    names: list[str] = []  # every cell of the rows tried, for the "did you mean" of an error
    for start, lineno, line in lines:
        stripped = line.strip()
        if not stripped:
            continue
        is_comment = line.startswith("#")  # as for records: "#" first, as _lines has it
        cells = _header_cells(stripped.lstrip("#") if is_comment else stripped, settings.delimiter)
        found = _names_indicator(cells, want)
        if is_comment:
            if found:
                commented = (cells, lineno)
            names.extend(cells)
            continue
        if found:
            return cells, lineno, []
        if commented is not None:
            return commented[0], commented[1], [(start, lineno, line)]
        raise FeedError(f"{path}: {_no_header(settings, cells, lineno, names + cells)}")
    if commented is not None:
        return commented[0], commented[1], []  # a header and no record: an empty feed
    if names:
        raise FeedError(f"{path}: only comment lines, none of them a CSV header: {_wanted(settings)}")
    raise FeedError(f"{path}: empty CSV feed (no header row)")


def _header_cells(text: str, delimiter: str) -> list[str]:
    return [h.strip().lstrip("#").strip() for h in _csv_row(text, delimiter)]


def _names_indicator(cells: list[str], want: str) -> bool:
    lowered = {c.lower() for c in cells}
    if want:
        return want in lowered
    return any(f in lowered for f in INDICATOR_FIELDS)


def _wanted(settings: FeedSettings) -> str:
    if settings.indicator_column:
        return f"the column {settings.indicator_column!r} (indicator_column)"
    return f"an indicator column (one of {', '.join(INDICATOR_FIELDS)})"


def _no_header(settings: FeedSettings, cells: list[str], lineno: int, names: list[str]) -> str:
    """Why the first record row is not a header and no comment line before it is one either."""
    hint = _did_you_mean(settings.indicator_column, names) if settings.indicator_column else ""
    return (
        f"CSV header {cells[:12]!r} (line {lineno}) has no indicator column: neither it nor a comment "
        f"line before it has {_wanted(settings)}{hint}"
    )


def _did_you_mean(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), list(dict.fromkeys(n.lower() for n in names if n)), n=1)
    if not close:
        return ""
    spelled = next(n for n in names if n.lower() == close[0])
    return f" (did you mean {spelled!r}?)"


def _csv_columns(settings: FeedSettings, header: list[str], header_line: int) -> tuple[int, str, int]:
    """(indicator column, the field name it is read back under, include_subdomains column or -1).

    The indicator column is read back under its own name when that is one of ``INDICATOR_FIELDS``
    (which also says how it is classified: ``md5`` must be a hash...), else as ``indicator``
    (classified by shape: Feodo Tracker's ``dst_ip``).  Records are read back by name, and
    :func:`indicator_of` takes the first of ``INDICATOR_FIELDS`` present, so when another column
    is spelled like a field that comes first (or the same), the indicator is read back as
    ``indicator``, and the header is refused when a second column is literally ``indicator``.
    """
    lowered = [h.lower() for h in header]
    want = settings.indicator_column.lower()
    if want:
        col = lowered.index(want)
        field_name = want if want in INDICATOR_FIELDS else "indicator"
    else:
        col, field_name = next((lowered.index(f), f) for f in INDICATOR_FIELDS if f in lowered)
    rank = INDICATOR_FIELDS.index(field_name)
    if any(i != col and h in INDICATOR_FIELDS[: rank + 1] for i, h in enumerate(header)):
        field_name = "indicator"
        clash = next((i for i, h in enumerate(header) if i != col and h == "indicator"), -1)
        if clash >= 0:
            raise FeedError(
                f"{settings.path}: line {header_line}: the indicator is column {col + 1} ({header[col]!r}), but "
                f"column {clash + 1} is also named 'indicator'; rename one of them"
            )
    sub_col = next((lowered.index(f) for f in _SUBDOMAIN_FIELDS if f in lowered), -1)
    return col, field_name, sub_col


def _csv_context_columns(settings: FeedSettings, header: list[str], names: list[str], col: int) -> frozenset[str]:
    """The names (as read back, ``names``) of the columns ``context_columns`` keeps, matched case-insensitively.

    Raises:
        FeedError: a name that is not a column of the header (a typo would silently drop context),
            or the indicator column itself.
    """
    by_name = {h.lower(): names[i] for i, h in enumerate(header) if i != col}
    kept: set[str] = set()
    for name in settings.context_columns or ():
        found = by_name.get(name.lower())
        if found is not None:
            kept.add(found)
            continue
        if name.lower() == header[col].lower():
            why = "is the indicator column, never record context"
        else:
            why = "is not a column of the CSV header" + _did_you_mean(name, header)
        raise FeedError(f"{settings.path}: context_columns: {name!r} {why}; the columns are {', '.join(header)[:300]}")
    return frozenset(kept)
