"""Tests for threatgate.stats.sum_stats: a node's stats summed over its master and worker processes."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threatgate import stats
from threatgate.stats import INDICATOR_CHARS, MASTER_GAUGES, SKETCHES, SUMMED, NodeStats, TopN, sum_stats

FIELDS = {f.name for f in dataclasses.fields(NodeStats)}
HINTS = typing.get_type_hints(NodeStats)


def test_every_field_is_either_summed_or_a_master_gauge() -> None:
    # Fails when a field is added to NodeStats (or BoundaryStats) and not classified in stats.py.
    assert SUMMED | MASTER_GAUGES | SKETCHES == FIELDS, "classify the new NodeStats field in stats.py"
    assert not SUMMED & MASTER_GAUGES and not SKETCHES & (SUMMED | MASTER_GAUGES)


def value_of(name: str) -> st.SearchStrategy[Any]:
    """Values of a NodeStats field by its type: counts, or tables keyed by a few labels."""
    hint = HINTS[name]
    counts = st.integers(min_value=0, max_value=10**12)
    if hint is int:
        return counts
    if hint is TopN:
        return st.dictionaries(st.sampled_from(["x", "y", "z"]), counts, max_size=3).map(lambda d: TopN(counts=d))
    key_type = typing.get_args(hint)[0]
    labels = st.sampled_from(["a", "b", "c"])
    keys = st.tuples(labels, labels) if key_type == tuple[str, str] else labels
    return st.dictionaries(keys, counts, max_size=3)


stats_strategy = st.builds(NodeStats, **{name: value_of(name) for name in sorted(FIELDS)})


@given(stats_strategy, st.lists(stats_strategy, max_size=4))
@settings(max_examples=150, deadline=None)
def test_sum_stats_adds_counters_key_by_key_and_takes_gauges_from_the_master(
    master: NodeStats, workers: list[NodeStats]
) -> None:
    snapshot = [dataclasses.replace(p) for p in (master, *workers)]
    total = sum_stats(master, workers)
    parts = [master, *workers]
    for name in FIELDS:
        got = getattr(total, name)
        if name in MASTER_GAUGES:
            assert got == getattr(master, name) and got is not getattr(master, name), name
        elif name in SKETCHES:
            keys = {k for p in parts for k in getattr(p, name).counts}
            assert got.counts == {k: sum(getattr(p, name).counts.get(k, 0) for p in parts) for k in keys}, name
        elif HINTS[name] is int:
            assert got == sum(getattr(p, name) for p in parts), name
        else:
            keys = {k for p in parts for k in getattr(p, name)}
            assert got == {k: sum(getattr(p, name).get(k, 0) for p in parts) for k in keys}, name
    assert [dataclasses.asdict(p) for p in parts] == [dataclasses.asdict(p) for p in snapshot]  # parts unchanged


def test_sum_stats_examples() -> None:
    master = NodeStats(reloads=2, feed_records={"urls": 10}, api_requests={"200": 3})
    a = NodeStats(events=5, connections={"accepted": 1}, feed_records={"urls": 10}, output_dropped={("d", "full"): 2})
    b = NodeStats(events=7, connections={"accepted": 2, "refused": 1}, output_dropped={("d", "full"): 1})
    total = sum_stats(master, [a, b])
    assert total.events == 12 and total.reloads == 2
    assert total.connections == {"accepted": 3, "refused": 1}
    assert total.output_dropped == {("d", "full"): 3}
    assert total.feed_records == {"urls": 10}  # every worker maps the master's store: not counted again
    assert total.api_requests == {"200": 3}
    assert sum_stats(master, []).reloads == 2


def test_an_unclassified_field_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats, "SUMMED", SUMMED - {"events"})
    with pytest.raises(TypeError, match=r"NodeStats\.events"):
        sum_stats(NodeStats(), [])


# -- the TopN sketch ------------------------------------------------------------------------------


def test_topn_counts_exactly_while_under_capacity() -> None:
    sketch = TopN(capacity=3)
    sketch.update({"a": 2, "b": 1})
    sketch.add("a")
    sketch.add("c", 5)
    assert sketch.top() == [("c", 5), ("a", 3), ("b", 1)]
    assert sketch.top(1) == [("c", 5)]


def test_topn_stays_bounded_and_a_new_key_takes_the_smallest_place() -> None:
    sketch = TopN(capacity=2)
    sketch.update({"a": 10, "b": 1})
    sketch.add("c", 2)  # replaces b (1): starts from 1, an overestimate bounded by the smallest count
    assert sketch.counts == {"a": 10, "c": 3}
    for i in range(1000):
        sketch.add(f"k{i}")
    assert len(sketch.counts) == 2


def test_topn_cuts_long_keys() -> None:
    sketch = TopN()
    sketch.add("u" * 10_000)
    assert [len(k) for k in sketch.counts] == [INDICATOR_CHARS]


@given(st.lists(st.integers(min_value=0, max_value=500), max_size=2000), st.integers(min_value=0, max_value=3))
@settings(max_examples=100, deadline=None)
def test_topn_finds_every_heavy_hitter_across_merged_parts(noise: list[int], parts: int) -> None:
    # Two heavy keys well above total/capacity, amid many distinct light ones, spread over parts.
    capacity = 20
    stream = [f"n{v}" for v in noise] + ["heavy1"] * 300 + ["heavy2"] * 200
    stream.sort(key=hash)
    sketches = [TopN(capacity) for _ in range(parts + 1)]
    for i, key in enumerate(stream):
        sketches[i % len(sketches)].add(key)
    merged = TopN.merged(sketches, capacity)
    assert len(merged.counts) <= capacity
    top = [k for k, _ in merged.top(2)]
    assert top == ["heavy1", "heavy2"]
    for key in ("heavy1", "heavy2"):  # never underestimated
        assert merged.counts[key] >= stream.count(key)


def test_topn_merge_does_not_change_its_parts() -> None:
    a, b = TopN(counts={"x": 1}), TopN(counts={"x": 2, "y": 1})
    assert TopN.merged([a, b]).counts == {"x": 3, "y": 1}
    assert a.counts == {"x": 1} and b.counts == {"x": 2, "y": 1}


def test_sum_stats_merges_top_indicators_and_sources() -> None:
    a = NodeStats(per_source={"urls": 2}, top_indicators=TopN(counts={"evil.example": 2}))
    b = NodeStats(per_source={"urls": 1, "ips": 1}, top_indicators=TopN(counts={"evil.example": 1, "10.0.0.1": 1}))
    total = sum_stats(NodeStats(), [a, b])
    assert total.per_source == {"urls": 3, "ips": 1}
    assert total.top_indicators.top() == [("evil.example", 3), ("10.0.0.1", 1)]
