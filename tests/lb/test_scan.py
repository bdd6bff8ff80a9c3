"""Tests for threatgate.lb._scan: the compiled reply scanner gives exactly what its Python reference gives.

The reference (``lb/correlation.py`` ``finished_ids_reference``: a regular expression, a split, ``int()``)
is the definition; the C scanner is run beside it over hand-picked edges and generated reads.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threatgate.lb import correlation
from threatgate.lb.correlation import finished_ids_reference

_scan = pytest.importorskip("threatgate.lb._scan", reason="the compiled scanner is not built (setup.py build_ext)")


def test_the_correlator_uses_the_compiled_scanner_when_built() -> None:
    assert correlation.finished_ids is _scan.finished_ids


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n",
        b"1 LookupFinished\n",
        b"1 LookupFinished\n22 LookupFinished\n",
        b"1 LookupFinished",  # no LF at the end
        b"1 LookupFinished\r\n",
        b"1  LookupFinished\n",
        b" 1 LookupFinished\n",
        b"+1 LookupFinished\n",
        b"1_0 LookupFinished\n",
        b"LookupFinished\n",
        b"1 LookupFinished error=x\n",
        b"1 LookupFinishedX\n",
        b"1 category=x\n1 LookupFinished\n",
        b"007 LookupFinished\n",
        b"9999999999999999999 LookupFinished\n",  # 19 digits: the most an id has
        b"10000000000000000000 LookupFinished\n",  # 20 digits
        "١ LookupFinished\n".encode(),  # a digit, but not an ASCII one
        b"1 LookupFinished\n\n2 LookupFinished\n",
        b"1 LookupFinished\n2 Lookup",
    ],
)
def test_edges(data: bytes) -> None:
    assert _scan.finished_ids(data) == finished_ids_reference(data)


line = st.one_of(
    st.integers(0, 10**20).map(lambda n: f"{n} LookupFinished\n".encode()),
    st.sampled_from([b"\n", b"1 LookupFinished\r\n", b"5 category=x\n", b"LookupFinished\n", b" LookupFinished\n"]),
    st.binary(max_size=24),
)


@settings(max_examples=500, database=None, derandomize=True)
@given(st.lists(line, max_size=12))
def test_generated_reads(lines: list[bytes]) -> None:
    data = b"".join(lines)
    assert _scan.finished_ids(data) == finished_ids_reference(data)
    assert _scan.finished_ids(bytearray(data)) == finished_ids_reference(data)  # any bytes-like read


events_st = st.lists(st.text(max_size=30), min_size=0, max_size=10)


@settings(max_examples=300, database=None, derandomize=True)
@given(events_st, st.integers(1, 10**19 - 1))
def test_tag_lines_gives_the_reference_bytes_or_none_for_what_cannot_encode(events: list[str], first: int) -> None:
    ids = list(range(first, first + len(events)))
    table = dict(zip(ids, events, strict=True))
    got = _scan.tag_lines(ids, table)
    want = correlation.tag_lines_reference(ids, table)
    if got is None:  # a lone surrogate: the reference replaces it, the correlator then uses the reference
        assert any("\ud800" <= ch <= "\udfff" for event in events for ch in event)
    else:
        assert got == want


def test_tag_lines_edges() -> None:
    assert _scan.tag_lines([], {}) == b""
    assert _scan.tag_lines([1, 10**19 - 1], {1: "é", 10**19 - 1: ""}) == "1 é\n9999999999999999999 \n".encode()
    assert _scan.tag_lines([3], {3: "bad\udcff"}) is None
    with pytest.raises(KeyError):
        _scan.tag_lines([5], {})
    with pytest.raises(TypeError):
        _scan.tag_lines((1,), {1: "x"})  # type: ignore[arg-type]


def test_the_correlator_encodes_a_batch_for_the_wire_as_the_lines_it_lists() -> None:
    from threatgate.lb.correlation import Correlator

    c = Correlator()
    ids = list(c.submit_many("client", ["a", "é", "bad\udcff"]))
    lines: list[str] = []
    other = Correlator()
    other.submit_many("client", ["a", "é", "bad\udcff"])
    sent, data = c.dispatch_encoded(ids, "n1")
    assert other.dispatch_many(ids, "n1", lines) == sent == ids
    assert data == ("\n".join(lines) + "\n").encode("utf-8", "replace")
    assert c.dispatch_encoded(ids[:1], "n2")[1] == b"1 a\n" and c.owner(ids[0]) == "n2"
