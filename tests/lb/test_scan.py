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
