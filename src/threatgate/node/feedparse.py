"""Feed files into columns, fast (issue 13 item 4): the seam between the feed parsers and the snapshot writer.

:func:`parse_feed` turns the bytes of a JSON or CSV feed into a :class:`ParsedFeed`: one column per
record attribute, record ``i`` being row ``i`` of every column.  It is pure (no I/O, no clock): the
caller reads the file and writes the snapshot.

Invariants:
1. One definition of every answer.  The result for any input equals what the reference loader of
   :mod:`threatgate.node.feeds` accepts (``load_feed`` + ``read_record`` + ``indicator_of`` +
   ``record_context``): the same records in file order, kinds, normalised values, raw texts, context
   pairs, malformed count and example texts, the same :class:`FeedError` for a file that is no feed.
   tests/node/test_feedparse.py checks it differentially, on generated, published and hostile feeds.
   The one difference: where the reference stops with a Python error (``csv.Error`` on a CSV line
   with an unbalanced quote, ``RecursionError`` or ``ValueError`` on a JSON record nested too deeply or
   with a 5,000-digit number), a header or JSON file is refused with a :class:`FeedError` and a CSV
   row is counted malformed (``unreadable CSV row``).
2. Fast paths only ever *decide less*.  Whole columns are tested against strict shapes (a
   lower-case hex digest, a canonical dotted quad, a plain ``scheme://host/path`` URL, a plain host
   name) whose normal form the reference normaliser provably gives without work (the input, lowered,
   minus its scheme).  A value that is not of such a shape, or not ASCII, goes one by one through the
   reference ``classify``; a record or file the fast readers do not handle (a quoted CSV field that
   spans lines, a JSON integer beyond 64 bits, which orjson reads as a float, a record whose fields
   are not scalars...) goes through the reference functions or a port of the reference reader.  So
   a fast path can make parsing slower, never different.
3. Columns, not records.  No dict or dataclass per record: JSON goes through orjson (one C call
   for the file), CSV is split once into cells (or read by one ``csv.reader`` when quoted); shapes
   are tested by RE2 over Arrow arrays (pyarrow compute kernels); Python touches a value only when
   it builds the output lists.
4. Malformed records are counted with the reference's example texts (the first
   ``MAX_BAD_EXAMPLES`` in file order), never fatal; the cyclic garbage collector is paused while
   the millions of output objects are built (it would otherwise rescan them over and over) and
   restored as it was.
"""

from __future__ import annotations

import csv
import gc
import importlib
from array import array
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson

from threatgate.config.node import FeedSettings
from threatgate.errors import FeedError
from threatgate.node import feedref
from threatgate.node.records import (
    _SUBDOMAIN_FIELDS,
    _TRUTHY,
    INDICATOR_FIELDS,
    MAX_CONTEXT_TEXT,
    Kind,
    LoadReport,
    ParsedFeed,
    classify,
    context_text,
    indicator_of,
    record_context,
)

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.compute as pc
else:

    class _Lazy:
        """A module imported when first used: importing this module (for ParsedFeed) stays cheap."""

        def __init__(self, name: str) -> None:
            self._name = name

        def __getattr__(self, attr: str) -> Any:
            return getattr(importlib.import_module(self._name), attr)

    pa = _Lazy("pyarrow")
    pc = _Lazy("pyarrow.compute")

__all__ = ["ParsedFeed", "parse_feed"]


_Context = tuple[tuple[str, str], ...]
_Bad = tuple[int, str, str]
"""(file position for ordering, where, why) of a malformed record."""


def parse_feed(settings: FeedSettings, data: bytes) -> ParsedFeed:
    """The columns of a JSON or CSV feed file's bytes (the reference loader's answer, faster).

    Raises:
        FeedError: the bytes are not a feed at all (the caller keeps the previous version).
    """
    if settings.format not in ("json", "csv"):
        raise FeedError(f"{settings.path}: parse_feed reads JSON and CSV feeds, not {settings.format!r}")
    with _gc_paused():
        if settings.format == "json":
            return _parse_json(settings, data)
        return _parse_csv(settings, data, _decode(settings, data))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic collector while millions of acyclic objects are built (rule 4)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _decode(settings: FeedSettings, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FeedError(f"{settings.path}: not UTF-8 (byte {exc.start})") from None


# -- columns of records into a ParsedFeed -------------------------------------------------------------


class _Rows:
    """Candidate records in file order, as columns: kinds (-1: malformed), values, raws, contexts."""

    def __init__(self) -> None:
        self.kinds: list[npt.NDArray[np.int8]] = []
        self.values: list[str | None] = []
        self.raws: list[str] = []
        self.contexts: list[_Context] = []
        self.bad: list[_Bad] = []

    def extend(
        self, kinds: npt.NDArray[np.int8], values: list[str | None], raws: list[str], ctx: list[_Context]
    ) -> None:
        self.kinds.append(kinds)
        self.values.extend(values)
        self.raws.extend(raws)
        self.contexts.extend(ctx)

    def finish(self, header: list[str]) -> ParsedFeed:
        kinds = np.concatenate(self.kinds) if self.kinds else np.zeros(0, np.int8)
        keep = np.flatnonzero(kinds >= 0)
        values, raws, contexts = self.values, self.raws, self.contexts
        if len(keep) != len(kinds):
            rows = keep.tolist()
            values = _take(values, rows)
            raws = _take(raws, rows)
            contexts = _take(contexts, rows)
            kinds = kinds[keep]
        report = LoadReport()
        self.bad.sort(key=itemgetter(0))
        for _, where, why in self.bad:
            report.bad(where, why)
        report.records = len(kinds)
        if len(kinds):
            counts = np.bincount(kinds, minlength=len(Kind.NAMES))
            present, first = np.unique(kinds, return_index=True)
            for kind in present[np.argsort(first)].tolist():  # the reference's dict order: first seen first
                report.per_kind[Kind.NAMES[kind]] = int(counts[kind])
        sub = kinds == Kind.DOMAIN_SUFFIX
        for row in np.flatnonzero(kinds == Kind.MASK).tolist():
            sub[row] = values[row].startswith("*.")  # type: ignore[union-attr]
        return ParsedFeed(
            kinds=array("b", kinds.tobytes()),
            values=values,  # type: ignore[arg-type]  # no None left: the malformed rows were dropped
            raws=raws,
            subdomains=sub.tolist(),
            contexts=contexts,
            report=report,
            header=header,
        )


def _objects(items: list[Any]) -> npt.NDArray[Any]:
    """``items`` as a 1-D object array, each item as it is (numpy would read strings as text, tuples as rows)."""
    return np.fromiter(items, object, count=len(items))


def _take(column: list[Any], rows: list[int]) -> list[Any]:
    """``[column[i] for i in rows]``, by C."""
    if len(rows) < 2:
        return [column[i] for i in rows]
    return list(itemgetter(*rows)(column))


# -- classification of a column -----------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IPV4 = rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}"
_SEG_FIRST = r"a-z0-9\-_~!$&'()+,;=:@"  # normalize._SEG_CHARS without "." (a first character) and "*" (a mask)
_SEG_CHARS = _SEG_FIRST + "."
_QUERY = rf"\?[{_SEG_CHARS}?]+(?:/[{_SEG_CHARS}?]+)*/?"
_L = r"[a-z0-9_\-]"
_NOT_W = r"[a-vx-z0-9_\-]"
_NOT_WWW = rf"(?:{_L}{{1,2}}|{_L}{{4,}}|{_NOT_W}{_L}{{2}}|w{_NOT_W}{_L}|ww{_NOT_W})"
"""A label other than ``www`` (RE2 has no look-ahead): a leading ``www.`` is the reference slow path's to remove."""
_HOST = rf"(?:{_NOT_WWW}\.(?:[a-z0-9_\-]+\.)*)?[a-z][a-z0-9_\-]*"
"""A host name whose first label is not ``www`` and whose last starts with a letter (never an IPv4 spelling)."""
_SCHEME = r"[a-z][a-z0-9+\-]+://"  # two characters or more, as normalize._FAST_URL (and its slow path)

# Strict shapes (RE2 via pyarrow, on the ASCII-lowered value).  Each is a subset of what the reference
# fast path of normalize.py accepts with the same result; see the module docstring, rule 2.
SHAPE_HASH = r"^(?:[0-9a-f]{32}|[0-9a-f]{40}|[0-9a-f]{64})$"
SHAPE_IPV4 = rf"^{_IPV4}$"
SHAPE_CIDR4 = rf"^{_IPV4}/(?:[0-9]|[12][0-9]|3[0-2])$"
SHAPE_URL = rf"^(?:{_SCHEME})?{_HOST}(?:(?:/[{_SEG_FIRST}][{_SEG_CHARS}]*)+(?:/?{_QUERY})?|/{_QUERY})$"
SHAPE_MASK = rf"^(?:{_SCHEME})?(?:\*\.)?{_HOST}(?:/[{_SEG_FIRST}*][{_SEG_CHARS}*]*)+$"
"""A mask ``[scheme://][*.]host/path`` with stars in the path: the reference (fast path for a plain host,
slow path with ``allow_wildcard`` for ``*.host``) gives it lowered, minus its scheme."""
SHAPE_DOMAIN = rf"^{_HOST}$"
SHAPE_STAR_DOMAIN = rf"^\*\.{_HOST}$"
_HAS_SCHEME = rf"^{_SCHEME}"


class _Column:
    """One column of indicator texts being classified: fast shapes first, the rest one by one."""

    def __init__(self, raws: list[str], arrow: pa.Array | None = None) -> None:
        """``arrow``: the same texts as an Arrow array already (a non-ASCII text matches no shape anyway)."""
        self.raws = raws
        self.n = len(raws)
        self.kinds = np.full(self.n, -1, np.int8)
        self.whole: list[str] | None = None  # the values, when one shape decided every row
        self.slots: npt.NDArray[Any] = np.full(self.n, None, object)  # else the values row by row
        self.open = np.ones(self.n, bool)  # not decided yet
        self._arrow = _arrow_strings(raws) if arrow is None else arrow
        self.lower = pc.ascii_lower(self._arrow)
        self._lower_list: list[str] | None = None

    def lowered(self) -> list[str]:
        """The ASCII-lowered texts (the raws themselves when they are lower-case already: no copy)."""
        if self._lower_list is None:
            same = pc.all(pc.equal(self._arrow, self.lower)).as_py() is not False
            self._lower_list = self.raws if same else self.lower.to_pylist()
        return self._lower_list

    def shape(self, pattern: str) -> npt.NDArray[np.intp]:
        """Rows still open whose lowered text has ``pattern`` (never a non-ASCII row: see _arrow_strings)."""
        candidates = np.flatnonzero(self.open)
        if not len(candidates):
            return candidates
        texts = self.lower if len(candidates) == self.n else self.lower.filter(pa.array(self.open))
        hit: npt.NDArray[np.bool_] = pc.match_substring_regex(texts, pattern).to_numpy(zero_copy_only=False)
        return candidates[hit]

    def decide(self, rows: npt.NDArray[np.intp], kind: int | npt.NDArray[np.int8], values: list[str]) -> None:
        if not len(rows):
            return
        self.kinds[rows] = kind
        self.open[rows] = False
        if len(rows) == self.n:
            self.whole = values
            return
        self.slots[rows] = _objects(values)

    def values(self) -> list[str | None]:
        if self.whole is not None:
            return self.whole  # type: ignore[return-value]
        values: list[str | None] = self.slots.tolist()
        return values

    def _mask(self, rows: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
        mask = np.zeros(self.n, bool)
        mask[rows] = True
        return mask

    def pick(self, rows: npt.NDArray[np.intp], column: list[str]) -> list[str]:
        if len(rows) == self.n:
            return column
        return list(map(column.__getitem__, rows.tolist()))

    # -- the shapes -----------------------------------------------------------------------------------

    def hashes(self) -> None:
        rows = self.shape(SHAPE_HASH)
        if len(rows):
            self.decide(rows, Kind.HASH, self.pick(rows, self.lowered()))

    def ipv4(self) -> None:
        rows = self.shape(SHAPE_IPV4)
        if len(rows):
            self.decide(rows, Kind.IP, self.pick(rows, self.raws))  # canonical already: the value is the text

    def cidr4(self) -> None:
        rows = self.shape(SHAPE_CIDR4)
        if not len(rows):
            return
        kinds = np.full(len(rows), Kind.CIDR, np.int8)
        values: list[str] = []
        for i, text in enumerate(self.pick(rows, self.raws)):
            addr, _, plen_s = text.partition("/")
            plen = int(plen_s)
            if plen == 32:
                kinds[i] = Kind.IP
                values.append(addr)
                continue
            a, b, c, d = addr.split(".")
            number = (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d)
            values.append(f"4/{plen}/{number >> (32 - plen)}")
        self.decide(rows, kinds, values)

    def urls(self) -> None:
        rows = self.shape(SHAPE_URL)
        if len(rows):
            self.decide(rows, Kind.URL, self._minus_scheme(rows))

    def _minus_scheme(self, rows: npt.NDArray[np.intp]) -> list[str]:
        """The lowered texts of ``rows`` without their ``scheme://``."""
        low = self.lower if len(rows) == self.n else self.lower.filter(pa.array(self._mask(rows)))
        cut: list[str] = pc.replace_substring_regex(low, _HAS_SCHEME, "", max_replacements=1).to_pylist()
        return cut

    def masks(self) -> None:
        rows = self.shape(SHAPE_MASK)
        if len(rows):
            self.decide(rows, Kind.MASK, self._minus_scheme(rows))

    def domains(self, flags: list[bool] | None, *, star: bool) -> None:
        """Plain host names (and ``*.host`` when ``star``): the reference ``_classify_domain`` fast path."""
        rows = self.shape(SHAPE_DOMAIN)
        if len(rows):
            kinds: int | npt.NDArray[np.int8] = Kind.DOMAIN
            if flags is not None:
                kinds = np.where(np.array(flags, bool)[rows], Kind.DOMAIN_SUFFIX, Kind.DOMAIN).astype(np.int8)
            self.decide(rows, kinds, self.pick(rows, self.lowered()))
        if star:
            rows = self.shape(SHAPE_STAR_DOMAIN)
            if len(rows):
                self.decide(rows, Kind.DOMAIN_SUFFIX, [v[2:] for v in self.pick(rows, self.lowered())])

    def rest(self, field_name: str, flags: list[bool] | None) -> None:
        """Every row no shape decided: the reference ``classify``, one by one."""
        raws, slots, kinds = self.raws, self.slots, self.kinds
        for row in np.flatnonzero(self.open).tolist():
            indicator = classify(raws[row], field_name, flags[row] if flags is not None else False)
            if indicator is not None:
                kinds[row] = indicator.kind
                slots[row] = indicator.value


def _arrow_strings(texts: list[str]) -> pa.Array:
    """``texts`` as an Arrow array of ASCII strings, a non-ASCII text as "" (which no shape matches).

    Filled from one joined ``str`` and the lengths, not object by object: the objects are scattered
    over the heap, and the shapes are ASCII anyway (a non-ASCII value is for the reference normaliser).
    """
    joined = "".join(texts)
    if not joined.isascii():
        texts = [text if text.isascii() else "" for text in texts]
        joined = "".join(texts)
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, texts), np.int64, count=len(texts)), out=offsets[1:])
    return pa.LargeStringArray.from_buffers(len(texts), pa.py_buffer(offsets), pa.py_buffer(joined.encode("ascii")))


def classify_column(
    raws: list[str], field_name: str, flags: list[bool] | None = None, arrow: pa.Array | None = None
) -> tuple[npt.NDArray[np.int8], list[str | None]]:
    """``classify(raws[i], field_name, flags[i])`` for every row: (kinds, -1 when None; values).

    ``arrow``: ``raws`` as an Arrow string array, when the caller has it.
    """
    column = _Column(raws, arrow)
    if field_name in ("md5", "sha1", "sha256"):
        column.hashes()
    elif field_name == "ip":
        column.ipv4()
        column.cidr4()
    elif field_name == "indicator":
        column.hashes()  # before the host names: a 32-hex-digit label is a hash (reference order)
        column.ipv4()
        column.cidr4()
        column.urls()
        column.masks()
        column.domains(flags, star=False)
    elif field_name in ("url", "mask"):
        column.urls()
        column.masks()
    elif field_name == "domain":
        column.domains(flags, star=True)
    column.rest(field_name, flags)
    return column.kinds, column.values()


def _why_not(field_name: str, raw: str) -> str:
    return f"{field_name}={raw[:80]!r} is not a valid indicator"


def _context_texts(column: list[Any]) -> list[str | None]:
    """``context_text`` of every value, without a call per value when they are plain short strings."""
    if set(map(type, column)) <= {str} and "".join(column).isprintable():
        if not column or max(map(len, column)) <= MAX_CONTEXT_TEXT:
            return column
    return list(map(context_text, column))


_Coded = tuple[list[str], list[int] | set[str] | None]
"""A context column: its texts and how equal ones are shared: ``None`` (they are not: most differ),
the set of the distinct texts (share by text), or a code per row into ``texts`` (the distinct texts)."""


def _coded(column: list[Any], *, checked: bool = False) -> _Coded:
    """A context column as texts (``context_text`` of each value; ``checked``: they are already)."""
    texts: list[str] = column if checked else _context_texts(column)  # type: ignore[assignment]
    return texts, _few_distinct(texts)


def _coded_arrow(column: pa.Array) -> _Coded:
    """A context column of CSV cells in Arrow: the distinct values become Python strings, not every cell."""
    encoded = pc.dictionary_encode(column)
    if len(encoded.dictionary) * 4 > len(column):
        return _context_texts(column.to_pylist()), None  # type: ignore[return-value]  # strings: never None
    codes: list[int] = encoded.indices.to_numpy(zero_copy_only=False).tolist()
    return _context_texts(encoded.dictionary.to_pylist()), codes  # type: ignore[return-value]


def _contexts(names: list[str], columns: list[_Coded], n: int) -> list[_Context]:
    """Per row, the tuple of ``(name, text)`` pairs; equal pairs (and one-pair tuples) are shared."""
    if not names:
        return [()] * n
    if len(names) == 1:
        name, (texts, shared) = names[0], columns[0]
        if shared is None:
            return list(zip(zip(repeat(name), texts)))
        if isinstance(shared, set):
            by_text = {text: ((name, text),) for text in shared}
            return list(map(by_text.__getitem__, texts))
        one = [((name, text),) for text in texts]
        return list(map(one.__getitem__, shared))
    pairs: list[Iterable[tuple[str, str]]] = []
    for name, (texts, shared) in zip(names, columns, strict=True):
        if shared is None:
            pairs.append(zip(repeat(name), texts))
        elif isinstance(shared, set):
            pairs.append(map({text: (name, text) for text in shared}.__getitem__, texts))
        else:
            pairs.append(map([(name, text) for text in texts].__getitem__, shared))
    return list(zip(*pairs, strict=True))


def _few_distinct(column: list[str]) -> set[str] | None:
    """The distinct values of a column that has few (a threat name, a date), judged on a sample first."""
    sample = column[:2048]
    if len(set(sample)) * 4 > len(sample):
        return None
    distinct = set(column)
    return distinct if len(distinct) * 4 <= len(column) else None


# -- JSON ---------------------------------------------------------------------------------------------

_LARGE = float(1 << 63)


def _parse_json(settings: FeedSettings, data: bytes) -> ParsedFeed:
    """orjson for the whole file, then columns per record shape; the reference reader when in doubt."""
    try:
        items = orjson.loads(data)
    except orjson.JSONDecodeError:
        items = None
    if not isinstance(items, list):
        return _json_reference(settings, data)
    rows = _Rows()
    n = len(items)
    types = set(map(type, items))
    if types <= {dict}:
        dict_rows = np.arange(n)
    else:
        is_dict = np.fromiter((type(o) is dict for o in items), bool, count=n)
        if not all(abs(o) < _LARGE for o in items if type(o) is float):
            return _json_reference(settings, data)  # see _same_numbers
        for i in np.flatnonzero(~is_dict).tolist():
            rows.bad.append((i + 1, f"record {i + 1}", f"expected an object, got {type(items[i]).__name__}"))
        dict_rows = np.flatnonzero(is_dict)
    if not len(dict_rows):
        return rows.finish([])
    records = items if len(dict_rows) == n else [items[i] for i in dict_rows.tolist()]
    shapes = list(map(tuple, records))  # the keys of each record, in order
    shape_ids = {shape: i for i, shape in enumerate(set(shapes))}
    bulk = _json_bulk(data, records, shapes, shape_ids, dict_rows + 1)
    if bulk is not None:
        bulk.bad.extend(rows.bad)
        return bulk.finish([])
    if not _same_numbers(records):
        return _json_reference(settings, data)
    if len(shape_ids) > 1:
        ids = np.fromiter(map(shape_ids.__getitem__, shapes), np.intp, count=len(records))
    parts: list[tuple[npt.NDArray[np.intp], _Rows]] = []
    for shape, sid in sorted(shape_ids.items(), key=itemgetter(1)):
        members = np.arange(len(records)) if len(shape_ids) == 1 else np.flatnonzero(ids == sid)
        group = records if len(members) == len(records) else [records[i] for i in members.tolist()]
        part = _Rows()
        _json_group(shape, group, dict_rows[members] + 1, part)
        parts.append((dict_rows[members], part))
        rows.bad.extend(part.bad)
    if len(parts) == 1 and len(dict_rows) == n:
        only = parts[0][1]
        only.bad = rows.bad
        return only.finish([])
    return _merge(parts, rows.bad)


_SAME_CLASS = {"mask": "url"}
"""Indicator fields ``classify`` treats alike (a ``mask`` without a star is a URL, a URL with one a mask)."""


def _json_bulk(
    data: bytes,
    records: list[dict[str, Any]],
    shapes: list[tuple[str, ...]],
    shape_ids: dict[tuple[str, ...], int],
    numbers: npt.NDArray[np.intp],
) -> _Rows | None:
    """The common feed in one pass, or None: every field a short printable string, the indicator first.

    The context of such a record is its ``(key, value)`` pairs but the first, built column by column;
    the indicators of all shapes are one column per way of classifying them.
    """
    fields: dict[tuple[str, ...], str] = {}
    for shape in shape_ids:
        name = next((f for f in INDICATOR_FIELDS if f in shape), None)
        if name is None or shape[0] != name or any(s in shape for s in _SUBDOMAIN_FIELDS):
            return None
        fields[shape] = name
    names = set(fields.values())
    if len(names) == 1:
        raws = list(map(itemgetter(names.pop()), records))
        record_fields = None
    else:
        record_fields = list(map(fields.__getitem__, shapes))
        raws = list(map(dict.__getitem__, records, record_fields))
    if set(map(type, raws)) != {str}:
        return None
    contexts = _bulk_contexts(records, shapes, list(shape_ids), _printable_strings(data))
    if contexts is None:
        return None
    classes = sorted({_SAME_CLASS.get(f, f) for f in fields.values()})
    if len(classes) == 1:
        kinds, values = classify_column(raws, classes[0])
    else:
        class_of = {shape: classes.index(_SAME_CLASS.get(f, f)) for shape, f in fields.items()}
        ids = np.fromiter(map(class_of.__getitem__, shapes), np.intp, count=len(shapes))
        kinds = np.full(len(raws), -1, np.int8)
        slots = np.empty(len(raws), object)
        for i, name in enumerate(classes):
            rows = np.flatnonzero(ids == i)
            kinds[rows], got = classify_column(list(map(raws.__getitem__, rows.tolist())), name)
            slots[rows] = _objects(got)
        values = slots.tolist()
    out = _Rows()
    for i in np.flatnonzero(kinds < 0).tolist():
        n = int(numbers[i])
        name = record_fields[i] if record_fields is not None else fields[shapes[i]]
        out.bad.append((n, f"record {n}", _why_not(name, raws[i])))
    out.extend(kinds, values, raws, contexts)
    return out


def _bulk_contexts(
    records: list[dict[str, Any]], shapes: list[tuple[str, ...]], distinct: list[tuple[str, ...]], printable: bool
) -> list[_Context] | None:
    """The contexts of records whose indicator is their first field, column by column per set of keys;
    None when a value is not a short printable string (``printable``: the document's are).

    Columns let equal ``(name, text)`` pairs be shared (:func:`_contexts`), which saves memory and
    the garbage collector's time; records with other context keys are put back in file order.
    """
    sets = {keys: i for i, keys in enumerate(dict.fromkeys(shape[1:] for shape in distinct))}
    if len(sets) == 1:
        (keys,) = sets
        columns = [_plain_text_column(list(map(itemgetter(k), records)), printable) for k in keys]
        if any(column is None for column in columns):
            return None
        return _contexts(list(keys), [_coded(c, checked=True) for c in columns], len(records))  # type: ignore[arg-type]
    set_of = {shape: sets[shape[1:]] for shape in distinct}
    ids = np.fromiter(map(set_of.__getitem__, shapes), np.intp, count=len(shapes))
    out = np.empty(len(records), object)
    for keys, i in sets.items():
        rows = np.flatnonzero(ids == i)
        group = _take(records, rows.tolist())
        columns = [_plain_text_column(list(map(itemgetter(k), group)), printable) for k in keys]
        if any(column is None for column in columns):
            return None
        coded = [_coded(c, checked=True) for c in columns]  # type: ignore[arg-type]
        out[rows] = _objects(_contexts(list(keys), coded, len(group)))
    contexts: list[_Context] = out.tolist()
    return contexts


def _plain_text_column(column: list[Any], printable: bool) -> list[str] | None:
    """``column`` when each value is its own context text (a printable string of at most
    ``MAX_CONTEXT_TEXT`` characters), else None."""
    if set(map(type, column)) != {str} or max(map(len, column)) > MAX_CONTEXT_TEXT:
        return None
    if not printable and not "".join(column).isprintable():
        return None
    return column


def _printable_strings(data: bytes) -> bool:
    """Whether every string of the JSON document ``data`` is printable, judged on its bytes alone.

    JSON forbids raw control characters in strings, so an ASCII document without a backslash (no
    escape) and without DEL (the one non-printable ASCII character it allows) has printable strings.
    """
    return b"\\" not in data and b"\x7f" not in data and data.isascii()


def _merge(parts: list[tuple[npt.NDArray[np.intp], _Rows]], bad: list[_Bad]) -> ParsedFeed:
    """Record columns of several groups put back in file order (``parts``: file positions, columns)."""
    where = np.concatenate([w for w, _ in parts])
    order = np.argsort(where, kind="stable")
    kinds = np.concatenate([k for _, part in parts for k in part.kinds])[order]
    put = itemgetter(*order.tolist())
    out = _Rows()
    out.bad = bad
    n_rows = len(where)
    columns = []
    for attr in ("values", "raws", "contexts"):
        joined = [x for _, part in parts for x in getattr(part, attr)]
        columns.append(list(put(joined)) if n_rows > 1 else joined)
    out.extend(kinds, columns[0], columns[1], columns[2])
    return out.finish([])


def _json_group(shape: tuple[str, ...], group: list[dict[str, Any]], numbers: npt.NDArray[np.intp], out: _Rows) -> None:
    """Records that share one key order: a column per key; records the columns cannot decide go one by one."""
    name = next((f for f in INDICATOR_FIELDS if f in shape), None)
    others = [k for k in shape if k != name]
    plain = name is not None and not any(s in shape for s in _SUBDOMAIN_FIELDS)
    if plain:
        raws = list(map(itemgetter(name), group))
        plain = set(map(type, raws)) == {str}
    texts: list[_Coded] = []
    if plain:
        for key in others:
            column = list(map(itemgetter(key), group))
            if not _scalar_texts(column):
                plain = False
                break
            texts.append(_coded(column))
    if not plain:
        _json_one_by_one(group, numbers, out)
        return
    kinds, values = classify_column(raws, name)  # type: ignore[arg-type]
    for i in np.flatnonzero(kinds < 0).tolist():
        n = int(numbers[i])
        out.bad.append((n, f"record {n}", _why_not(name, raws[i])))  # type: ignore[arg-type]
    out.extend(kinds, values, raws, _contexts(others, texts, len(group)))


def _scalar_texts(column: list[Any]) -> bool:
    """Whether every value is a scalar (None, a list or an object is left out of some records' context)."""
    return set(map(type, column)) <= {str, int, bool, float}


def _same_numbers(records: list[dict[str, Any]]) -> bool:
    """Whether the json module reads every number of ``records`` as orjson did (nested ones too).

    orjson reads an integer beyond 64 bits as a float, the json module as an int, so their texts
    (context, or the quote of a malformed record) would differ.  A float of magnitude below 2**63
    was written as a float in the file (a smaller integer stays an int): both read the same double.
    """
    stack: list[Any] = [chain.from_iterable(map(dict.values, records))]
    while stack:
        for value in stack.pop():
            kind = type(value)
            if kind is float and not abs(value) < _LARGE:
                return False
            if kind is list:
                stack.append(value)
            elif kind is dict:
                stack.append(value.values())
    return True


def _json_one_by_one(group: list[dict[str, Any]], numbers: npt.NDArray[np.intp], out: _Rows) -> None:
    """The reference, record by record (``indicator_of``, ``record_context``, ``_why_no_indicator``)."""
    kinds = np.full(len(group), -1, np.int8)
    values: list[str | None] = []
    raws: list[str] = []
    contexts: list[_Context] = []
    for i, record in enumerate(group):
        indicator = indicator_of(record)
        if indicator is None:
            n = int(numbers[i])
            out.bad.append((n, f"record {n}", feedref._why_no_indicator(record)))
            values.append(None)
            raws.append("")
            contexts.append(())
            continue
        kinds[i] = indicator.kind
        values.append(indicator.value)
        raws.append(indicator.raw)
        contexts.append(tuple(record_context(record)))
    out.extend(kinds, values, raws, contexts)


def _json_reference(settings: FeedSettings, data: bytes) -> ParsedFeed:
    """The reference JSON reader (``feedref.parse_columns``) for a file orjson refuses: record by record."""
    return feedref.parse_columns(settings, data)


# -- CSV ----------------------------------------------------------------------------------------------


class _Tracked:
    """An iterator of CSV lines that remembers the last line it gave (where the fast reader starts)."""

    def __init__(self, lines: Iterator[feedref._Line]) -> None:
        self._lines = lines
        self.last: feedref._Line | None = None

    def __iter__(self) -> _Tracked:
        return self

    def __next__(self) -> feedref._Line:
        self.last = next(self._lines)
        return self.last


@dataclass(slots=True)
class _CsvLayout:
    """What the header says: the indicator column, how it is read back, which columns are context."""

    width: int
    col: int
    field_name: str
    sub_col: int
    names: list[str]
    context: list[tuple[str, int]]  # (name, column) in the order record_context gives them


def _csv_layout(settings: FeedSettings, lines: Iterator[feedref._Line]) -> tuple[_CsvLayout, list[feedref._Line]]:
    header, header_line, first_row = feedref._find_csv_header(settings, lines)
    col, field_name, sub_col = feedref._csv_columns(settings, header, header_line)
    names = list(header)
    names[col] = field_name
    if sub_col >= 0:
        names[sub_col] = header[sub_col].lower()
    keep = None
    if settings.context_columns is not None:
        keep = feedref._csv_context_columns(settings, header, names, col)
    # A record is read back as dict(zip(names, row)): the last of equal names wins, in the place of the first.
    by_name: dict[str, int] = {}
    for i, name in enumerate(names):
        by_name[name] = i
    indicator = next((f for f in INDICATOR_FIELDS if f in by_name), None)
    context = [(n, i) for n, i in by_name.items() if n != indicator and (keep is None or n in keep)]
    return _CsvLayout(len(header), col, field_name, sub_col, names, context), first_row


def _parse_csv(settings: FeedSettings, data: bytes, text: str) -> ParsedFeed:
    lines = _Tracked(feedref._lines(text))
    try:
        layout, first_row = _csv_layout(settings, lines)
    except csv.Error as exc:  # the reference loader stops here with a Python error
        where = f"line {lines.last[1]}: " if lines.last is not None else ""
        raise FeedError(f"{settings.path}: {where}the CSV header cannot be read: {exc}") from None
    cells: list[list[str]] = [[] for _ in range(layout.width)]
    linenos: list[int] = []
    bad: list[_Bad] = []
    if first_row:  # a record read to tell that the header was the comment line before it
        _csv_rows_one_by_one(settings, layout, first_row, cells, linenos, bad)
    pos, lineno = len(text), 0
    if lines.last is not None:
        start, first, line = lines.last
        pos, lineno = start + len(line) + 1, first + line.count("\n") + 1
    body = text[pos:]
    if '"' in body:  # quoted fields: csv once for the body when no field spans lines, else line by line
        quoted = _csv_rows_quoted(settings.delimiter, layout, body, lineno, cells, bad)
        if quoted is None:
            _csv_rows_one_by_one(settings, layout, lines, cells, linenos, bad)
            quoted = np.zeros(0, np.intp)
        numbers = np.concatenate([np.array(linenos, np.intp), quoted])
    else:
        tail = data[pos if len(text) == len(data) else len(text[:pos].encode()) :]  # the body's bytes
        arrow = _csv_arrow_columns(tail, settings.delimiter, layout.width)
        if arrow is not None and not linenos:
            return _csv_finish(layout, None, np.arange(lineno, lineno + len(arrow[0])), bad, arrow)
        flat = _csv_cells_regular(tail, body, settings.delimiter, layout.width)
        if flat is not None:
            for j, column in enumerate(cells):
                column.extend(flat[j :: layout.width])
            more = np.arange(lineno, lineno + len(flat) // layout.width)
        else:
            more = _csv_rows_fast(settings.delimiter, layout, body, lineno, cells, bad)
        numbers = np.concatenate([np.array(linenos, np.intp), more])
    return _csv_finish(layout, cells, numbers, bad)


def _csv_rows_quoted(
    delimiter: str, layout: _CsvLayout, body: str, first: int, cells: list[list[str]], bad: list[_Bad]
) -> npt.NDArray[np.intp] | None:
    """Rows of a body with quotes, by one ``csv.reader`` over its lines; None when that could differ.

    The reference joins a line with an odd number of quotes to the next (a quoted field spanning
    lines) and reads each line alone; one reader over all lines gives the same rows when no record
    line has an odd number of quotes, none holds a CR (the reader refuses it outside quotes, where
    the reference splits such a line) and the reader makes exactly one row per line.
    """
    if len(delimiter) != 1 or delimiter in '"\r\n':
        return None
    lines = body.split("\n")
    if not body or body.endswith("\n"):
        lines.pop()
    if "\r" in body:
        lines = list(map(str.rstrip, lines, repeat("\r")))
    numbers: list[int] = []
    records: list[str] = []
    for i, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            numbers.append(first + i)
            records.append(line)
    if any(map((1).__and__, map(str.count, records, repeat('"')))) or "\r" in "".join(records):
        return None
    try:
        rows = list(csv.reader(records, delimiter=delimiter))
    except csv.Error:
        return None
    if len(rows) != len(records):
        return None
    width = layout.width
    widths = np.fromiter(map(len, rows), np.intp, count=len(rows))
    good = widths == width
    kept = np.array(numbers, np.intp)
    if not good.all():
        for i in np.flatnonzero(~good).tolist():
            bad.append((numbers[i], f"line {numbers[i]}", f"{widths[i]} fields, header has {width}"))
        rows = _take(rows, np.flatnonzero(good).tolist())
        kept = kept[good]
    for j, column in enumerate(cells):
        column.extend(map(itemgetter(j), rows))
    return kept


def _csv_arrow_columns(tail: bytes, delimiter: str, width: int) -> list[pa.Array] | None:
    """The columns of a body whose every line is a record (the usual feed), as Arrow arrays; else None.

    Arrow splits the bytes into lines and cells in C++, and checks that each line has exactly
    ``width`` cells (so none is blank) and that none starts with ``#`` or ends with CR:
    then the cells are those of ``line.split(delimiter)``, the reference's, and no Python string is
    made for a cell until the output needs it.
    """
    if width < 3 or len(delimiter) != 1 or delimiter.isspace() or delimiter in '#\r"' or not tail:
        return None  # two columns (an indicator and one more): str.split is faster (bench/feed_parse.py)
    whole = pa.LargeStringArray.from_buffers(1, pa.py_buffer(np.array([0, len(tail)], np.int64)), pa.py_buffer(tail))
    lines = pc.split_pattern(whole, "\n").flatten()
    if tail.endswith(b"\n"):
        lines = lines.slice(0, len(lines) - 1)  # after the last LF: no line
    cells = pc.split_pattern(lines, delimiter)
    if not (pc.list_value_length(cells).to_numpy(zero_copy_only=False) == width).all():
        return None
    if pc.any(pc.starts_with(lines, "#")).as_py() or pc.any(pc.ends_with(lines, "\r")).as_py():
        return None
    return [pc.list_element(cells, j) for j in range(width)]


def _csv_cells_regular(tail: bytes, body: str, delimiter: str, width: int) -> list[str] | None:
    """Every cell of a body whose every line is a record (the usual feed), row after row; else None.

    Judged on the bytes by numpy, without a string per line: each line has exactly ``width - 1``
    delimiters (so none is blank), none starts with ``#`` or ends with CR.  The delimiter and LF are
    ASCII, and UTF-8 never uses an ASCII byte inside a multi-byte character, so this holds for any text.
    """
    if width < 2 or len(delimiter) != 1 or not delimiter.isascii() or delimiter.isspace() or delimiter in "#\r":
        return None
    if not tail:
        return []
    raw = np.frombuffer(tail, np.uint8)
    is_sep = raw == ord(delimiter)
    is_sep |= raw == 10
    seps = np.flatnonzero(is_sep)
    newlines = seps[raw[seps] == 10]
    if not np.array_equal(np.flatnonzero(raw[seps] == 10), np.arange(width - 1, len(seps), width)):
        return None  # a line with another number of delimiters
    if tail[-1] != 10 and len(seps) % width != width - 1:
        return None  # the last line (without LF) has another number of delimiters
    starts = np.concatenate([[0], newlines[newlines < len(raw) - 1] + 1])
    if (raw[starts] == ord("#")).any() or (raw[newlines - 1] == 13).any() or tail[-1] == 13:
        return None
    flat = body.replace("\n", delimiter).split(delimiter)
    if tail[-1] == 10:
        flat.pop()  # after the last LF: no line
    return flat if len(flat) % width == 0 else None


def _csv_rows_one_by_one(
    settings: FeedSettings,
    layout: _CsvLayout,
    lines: Iterator[feedref._Line] | list[feedref._Line],
    cells: list[list[str]],
    linenos: list[int],
    bad: list[_Bad],
) -> None:
    """Rows as the reference ``_load_csv`` splits them, appended to the columns ``cells``."""
    width = layout.width
    for _, lineno, line in lines:
        row_text = line.rstrip("\r")
        if not row_text.strip() or row_text.startswith("#"):
            continue
        try:
            row = feedref._csv_row(row_text, settings.delimiter)
        except csv.Error as exc:  # the reference loader stops here with a Python error
            bad.append((lineno, f"line {lineno}", f"unreadable CSV row: {exc}"))
            continue
        if len(row) != width:
            bad.append((lineno, f"line {lineno}", f"{len(row)} fields, header has {width}"))
            continue
        for column, value in zip(cells, row, strict=True):
            column.append(value)
        linenos.append(lineno)


def _csv_rows_fast(
    delimiter: str, layout: _CsvLayout, body: str, first: int, cells: list[list[str]], bad: list[_Bad]
) -> npt.NDArray[np.intp]:
    """Rows of a body without quotes: split once into cells; returns the line numbers of the rows kept."""
    lines = body.split("\n")
    if not body or body.endswith("\n"):
        lines.pop()  # the reference yields no line after a final LF
    if "\r" in body:
        lines = list(map(str.rstrip, lines, repeat("\r")))
    width = layout.width
    counts = np.fromiter(map(str.count, lines, repeat(delimiter)), np.intp, count=len(lines))
    fits = counts == width - 1
    skip = np.zeros(len(lines), bool)
    if body.startswith("#") or "\n#" in body:
        for i, line in enumerate(lines):
            skip[i] = line.startswith("#")
    # A blank line is skipped; it can only have the right number of delimiters when they are blanks too.
    maybe_blank = np.ones(len(lines), bool) if width == 1 or delimiter.isspace() else ~fits
    for i in np.flatnonzero(maybe_blank).tolist():
        if not lines[i].strip():
            skip[i] = True
    for i in np.flatnonzero(~fits & ~skip).tolist():
        lineno = first + i
        bad.append((lineno, f"line {lineno}", f"{counts[i] + 1} fields, header has {width}"))
    keep = np.flatnonzero(fits & ~skip)
    if len(keep) != len(lines):
        lines = list(map(lines.__getitem__, keep.tolist()))
    flat = delimiter.join(lines).split(delimiter) if lines else []
    for j, column in enumerate(cells):
        column.extend(flat[j::width])
    return keep + first


def _csv_finish(
    layout: _CsvLayout,
    cells: list[list[str]] | None,
    numbers: npt.NDArray[np.intp],
    bad: list[_Bad],
    arrow: list[pa.Array] | None = None,
) -> ParsedFeed:
    """Classify the indicator column and build the contexts: from Python ``cells`` or ``arrow`` columns."""

    def column(i: int) -> list[str]:
        return cells[i] if cells is not None else arrow[i].to_pylist()  # type: ignore[index]

    raws = column(layout.col)
    flags = None
    if layout.sub_col >= 0:
        marks = column(layout.sub_col)
        truthy = {v: v.strip().lower() in _TRUTHY for v in set(marks)}
        flags = list(map(truthy.__getitem__, marks))
    kinds, values = classify_column(raws, layout.field_name, flags, None if arrow is None else arrow[layout.col])
    for i in np.flatnonzero(kinds < 0).tolist():
        lineno = int(numbers[i])
        bad.append((lineno, f"line {lineno}", _why_not(layout.field_name, raws[i])))
    names = [name for name, _ in layout.context]
    if arrow is not None:
        coded = [_coded_arrow(arrow[i]) for _, i in layout.context]
    else:
        coded = [_coded(column(i)) for _, i in layout.context]
    rows = _Rows()
    rows.bad = bad
    rows.extend(kinds, values, raws, _contexts(names, coded, len(raws)))
    return rows.finish(layout.names)
