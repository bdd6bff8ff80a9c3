"""Tests for threatgate.stats.sum_stats: a node's stats summed over its master and worker processes."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threatgate import stats
from threatgate.stats import MASTER_GAUGES, SUMMED, NodeStats, sum_stats

FIELDS = {f.name for f in dataclasses.fields(NodeStats)}
HINTS = typing.get_type_hints(NodeStats)


def test_every_field_is_either_summed_or_a_master_gauge() -> None:
    # Fails when a field is added to NodeStats (or BoundaryStats) and not classified in stats.py.
    assert SUMMED | MASTER_GAUGES == FIELDS, "classify the new NodeStats field in stats.SUMMED or MASTER_GAUGES"
    assert not SUMMED & MASTER_GAUGES


def value_of(name: str) -> st.SearchStrategy[Any]:
    """Values of a NodeStats field by its type: counts, or tables keyed by a few labels."""
    hint = HINTS[name]
    counts = st.integers(min_value=0, max_value=10**12)
    if hint is int:
        return counts
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
