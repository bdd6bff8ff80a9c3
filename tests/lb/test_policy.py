"""Tests for threatgate.lb.policy: weighted least-outstanding placement (one event, and a batch at once)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threatgate.lb.policy import Candidate, allocate

BIG = 10**9


def cand(key: str, weight: float = 1, outstanding: int = 0, capacity: int = BIG) -> Candidate:
    return Candidate(key, weight, outstanding, capacity)


def score(c: Candidate) -> float:
    return (c.outstanding + 1) / c.weight


def place_one(candidates: list[Candidate], rng: random.Random) -> Candidate | None:
    """Where :func:`allocate` puts a single event (None: nowhere)."""
    placed = allocate(candidates, 1, rng)
    assert sum(n for _, n in placed) == len(placed) <= 1
    return placed[0][0] if placed else None


# -- one event ---------------------------------------------------------------------------------------------


def test_place_one_returns_None_without_candidates() -> None:
    assert place_one([], random.Random(0)) is None


@pytest.mark.parametrize(
    "candidates",
    [
        pytest.param([cand("a", capacity=0)], id="no-capacity"),
        pytest.param([cand("a", capacity=-1)], id="negative-capacity"),
        pytest.param([cand("a", weight=0)], id="weight-0"),
        pytest.param([cand("a", weight=0), cand("b", capacity=0), cand("c", weight=-1)], id="none-usable"),
    ],
)
def test_place_one_returns_None_when_no_candidate_is_usable(candidates: list[Candidate]) -> None:
    assert place_one(candidates, random.Random(0)) is None


def test_place_one_skips_weight_0_and_capacity_0_even_when_they_score_best() -> None:
    good = cand("good", outstanding=1000)
    candidates = [cand("drained", weight=0), cand("full", capacity=0), good, cand("down", weight=0, capacity=0)]
    rng = random.Random(1)
    assert all(place_one(candidates, rng) is good for _ in range(200))


def test_place_one_single_usable_candidate_is_returned_as_is() -> None:
    only = cand("a", weight=3, outstanding=7, capacity=1)
    assert place_one([only], random.Random(0)) is only
    assert only == cand("a", weight=3, outstanding=7, capacity=1)  # not modified


@pytest.mark.parametrize(
    ("a", "b", "winner"),
    [
        pytest.param(cand("a", outstanding=0), cand("b", outstanding=1), "a", id="fewer-outstanding"),
        pytest.param(cand("a", outstanding=5), cand("b", outstanding=2), "b", id="fewer-outstanding-second"),
        pytest.param(cand("a", weight=1, outstanding=1), cand("b", weight=2, outstanding=2), "b", id="weight"),
        pytest.param(cand("a", weight=1, outstanding=0), cand("b", weight=3, outstanding=3), "a", id="weight-loses"),
        pytest.param(cand("a", outstanding=3, capacity=1), cand("b", outstanding=4), "a", id="capacity-irrelevant"),
    ],
)
def test_place_one_of_two_takes_the_lower_score(a: Candidate, b: Candidate, winner: str) -> None:
    for seed in range(50):
        chosen = place_one([a, b], random.Random(seed))
        assert chosen is not None and chosen.key == winner
        chosen = place_one([b, a], random.Random(seed))
        assert chosen is not None and chosen.key == winner


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param(cand("a"), cand("b"), id="equal"),
        pytest.param(cand("a", weight=1, outstanding=1), cand("b", weight=2, outstanding=3), id="equal-score"),
    ],
)
def test_place_one_breaks_ties_at_random(a: Candidate, b: Candidate) -> None:
    assert score(a) == score(b)
    rng = random.Random(1234)
    counts = Counter(str(c.key) for c in (place_one([a, b], rng) for _ in range(4000)) if c is not None)
    assert counts.total() == 4000
    assert 0.45 < counts["a"] / 4000 < 0.55


def test_place_one_is_deterministic_for_a_seeded_rng() -> None:
    candidates = [cand(k) for k in "abcde"]
    runs = []
    for _ in range(2):
        rng = random.Random(99)
        runs.append([getattr(place_one(candidates, rng), "key", None) for _ in range(100)])
    assert runs[0] == runs[1]
    assert set(runs[0]) == set("abcde")


def test_place_one_of_several_takes_the_lowest_score() -> None:
    # Exact least-outstanding over all of them (what the balancer does), not two random choices.
    candidates = [cand("a", outstanding=1), cand("b", outstanding=2), cand("c", weight=2, outstanding=9), cand("d")]
    rng = random.Random(5)
    assert [score(c) for c in candidates] == [2, 3, 5, 1]
    assert {str(getattr(place_one(candidates, rng), "key", None)) for _ in range(300)} == {"d"}


def test_place_one_does_not_modify_the_candidates() -> None:
    candidates = [cand("a", outstanding=1), cand("b", weight=2), cand("c", capacity=3)]
    before = [Candidate(c.key, c.weight, c.outstanding, c.capacity) for c in candidates]
    rng = random.Random(0)
    for _ in range(50):
        place_one(candidates, rng)
    assert candidates == before


def simulate_weighted(seed: int, picks: int, target_outstanding: int) -> float:
    """Share of events placed on the weight-1 instance (vs a weight-2 one) under a steady load.

    Each pick adds an outstanding event; whenever more than ``target_outstanding`` are out, a random
    outstanding event (any instance, all equally fast) finishes.
    """
    rng = random.Random(seed)
    one, two = cand("one", weight=1), cand("two", weight=2)
    placed = Counter[str]()
    for _ in range(picks):
        chosen = place_one([one, two], rng)
        assert chosen is not None
        chosen.outstanding += 1
        placed[str(chosen.key)] += 1
        while one.outstanding + two.outstanding > target_outstanding:
            r = rng.randrange(one.outstanding + two.outstanding)
            (one if r < one.outstanding else two).outstanding -= 1
    return placed["one"] / picks


def test_place_one_weight_2_gets_about_twice_the_events_of_weight_1() -> None:
    share = simulate_weighted(seed=2024, picks=20_000, target_outstanding=200)
    # (outstanding + 1) / weight balances at o1 + 1 = (o2 + 1) / 2: 1/3 minus a little for the "+ 1".
    assert share == pytest.approx(1 / 3, abs=0.02)


def test_place_one_weight_2_share_holds_under_a_light_load_too() -> None:
    share = simulate_weighted(seed=7, picks=20_000, target_outstanding=30)
    assert share == pytest.approx(1 / 3, abs=0.03)


def test_place_one_sends_fewer_events_to_a_slow_instance() -> None:
    # Same weight; each outstanding event finishes in a step with probability 0.5 (fast) or 0.1 (slow).
    rng = random.Random(42)
    fast, slow = cand("fast"), cand("slow")
    finish = {"fast": 0.5, "slow": 0.1}
    placed = Counter[str]()
    for _ in range(20_000):
        chosen = place_one([fast, slow], rng)
        assert chosen is not None
        chosen.outstanding += 1
        placed[str(chosen.key)] += 1
        for c in (fast, slow):
            c.outstanding -= sum(1 for _ in range(c.outstanding) if rng.random() < finish[str(c.key)])
    assert placed["slow"] < placed["fast"] / 2
    assert placed["slow"] > 0  # not starved: it still gets events when it catches up


def test_place_one_respects_capacity_as_instances_fill_up() -> None:
    a, b = cand("a", capacity=2), cand("b", capacity=3)
    rng = random.Random(0)
    order = []
    while (chosen := place_one([a, b], rng)) is not None:
        chosen.outstanding += 1
        chosen.capacity -= 1
        order.append(chosen.key)
    assert Counter(order) == {"a": 2, "b": 3}


# -- allocate ---------------------------------------------------------------------------------------------


def total(result: list[tuple[Candidate, int]]) -> dict[str, int]:
    return {str(c.key): n for c, n in result}


def test_allocate_nothing_to_place_or_nowhere_to_place_it() -> None:
    rng = random.Random(0)
    assert allocate([cand("a")], 0, rng) == []
    assert allocate([cand("a")], -3, rng) == []
    assert allocate([], 5, rng) == []
    assert allocate([cand("a", capacity=0), cand("b", weight=0)], 5, rng) == []


def test_allocate_single_usable_candidate_takes_up_to_its_capacity() -> None:
    a = cand("a", capacity=3)
    rng = random.Random(0)
    assert allocate([a, cand("b", weight=0)], 2, rng) == [(a, 2)]
    assert allocate([a, cand("b", capacity=0)], 10, rng) == [(a, 3)]


def test_allocate_fills_the_least_loaded_first() -> None:
    rng = random.Random(0)
    assert total(allocate([cand("a", outstanding=10), cand("b")], 5, rng)) == {"b": 5}
    assert total(allocate([cand("a", outstanding=10), cand("b")], 10, rng)) == {"b": 10}
    # past the point where the scores meet, both get events and end up level (up to a tie)
    given = total(allocate([cand("a", outstanding=10), cand("b")], 21, rng))
    assert given["a"] + given["b"] == 21
    assert abs((10 + given["a"]) - given["b"]) <= 1


def test_allocate_splits_by_weight() -> None:
    result = total(
        allocate([cand("one", weight=1), cand("two", weight=2), cand("off", weight=0)], 300, random.Random(3))
    )
    assert result["one"] == pytest.approx(100, abs=1)
    assert result["two"] == pytest.approx(200, abs=1)
    assert sum(result.values()) == 300


def test_allocate_stops_at_total_capacity() -> None:
    result = total(
        allocate([cand("a", capacity=2), cand("b", capacity=3), cand("c", capacity=0)], 100, random.Random(0))
    )
    assert result == {"a": 2, "b": 3}


def test_allocate_breaks_ties_at_random() -> None:
    firsts = Counter(str(allocate([cand("a"), cand("b")], 1, random.Random(seed))[0][0].key) for seed in range(400))
    assert 150 < firsts["a"] < 250


candidates_st = st.lists(
    st.builds(
        Candidate,
        key=st.just(""),
        weight=st.integers(0, 5),
        outstanding=st.integers(0, 40),
        capacity=st.integers(0, 30),
    ),
    max_size=5,
).map(lambda cs: [Candidate(f"i{n}", c.weight, c.outstanding, c.capacity) for n, c in enumerate(cs)])


@settings(max_examples=300, database=None, derandomize=True)
@given(candidates=candidates_st, count=st.integers(0, 120), seed=st.integers(0, 2**32))
def test_allocate_is_least_outstanding_water_filling(candidates: list[Candidate], count: int, seed: int) -> None:
    before = [Candidate(c.key, c.weight, c.outstanding, c.capacity) for c in candidates]
    result = allocate(candidates, count, random.Random(seed))
    assert candidates == before  # the caller updates its own counts
    given_to = {str(c.key): n for c, n in result}
    assert len(given_to) == len(result)  # each instance at most once
    usable = [c for c in candidates if c.capacity > 0 and c.weight > 0]
    assert all(n > 0 for n in given_to.values())
    assert set(given_to) <= {str(c.key) for c in usable}
    assert sum(given_to.values()) == min(count, sum(c.capacity for c in usable))
    for c in usable:
        assert given_to.get(str(c.key), 0) <= c.capacity
    # Every event went to a lowest score at the time: the last one an instance got scored no more than
    # the next one any instance with room left would get.
    for i in usable:
        gi = given_to.get(str(i.key), 0)
        if not gi:
            continue
        last = (i.outstanding + gi) / i.weight
        for j in usable:
            gj = given_to.get(str(j.key), 0)
            if j is not i and gj < j.capacity:
                assert last <= (j.outstanding + gj + 1) / j.weight + 1e-9, (i, gi, j, gj)


def test_allocate_agrees_with_picking_one_by_one_for_two_instances() -> None:
    # With two instances place_one() is exact least-score placement, which allocate() does in one pass.
    rng = random.Random(11)
    for _ in range(300):
        a = cand("a", weight=rng.randint(1, 4), outstanding=rng.randint(0, 20), capacity=rng.randint(1, 30))
        b = cand("b", weight=rng.randint(1, 4), outstanding=rng.randint(0, 20), capacity=rng.randint(1, 30))
        count = rng.randint(1, 50)
        batch = total(allocate([a, b], count, random.Random(rng.random())))
        one_by_one = Counter[str]()
        sim = [Candidate(c.key, c.weight, c.outstanding, c.capacity) for c in (a, b)]
        for _ in range(count):
            chosen = place_one(sim, rng)
            if chosen is None:
                break
            chosen.outstanding += 1
            chosen.capacity -= 1
            one_by_one[str(chosen.key)] += 1
        # equal up to how ties were broken
        for key in ("a", "b"):
            assert abs(batch.get(key, 0) - one_by_one[key]) <= 1, (a, b, count, batch, one_by_one)


def test_allocate_lanes_with_a_share_of_their_instances_weight_take_that_instances_share() -> None:
    """The balancer gives each lane of an instance with n lanes the weight w / n: the instance's lanes together
    take what one connection of weight w would, per event and per batch, and split it evenly."""
    lanes = [
        cand("a#0", 0.5),
        cand("a#1", 0.5),
        cand("b#0", 1),
        cand("c#0", 2 / 3),
        cand("c#1", 2 / 3),
        cand("c#2", 2 / 3),
    ]
    given = {c.key: n for c, n in allocate(lanes, 9_000, random.Random(3))}
    per_node = Counter({str(key)[0]: 0 for key in given})
    for key, n in given.items():
        per_node[str(key)[0]] += n
    assert abs(per_node["a"] - per_node["b"]) <= 3 and abs(per_node["c"] - 2 * per_node["b"]) <= 6, per_node
    assert max(given["c#0"], given["c#1"], given["c#2"]) - min(given["c#0"], given["c#1"], given["c#2"]) <= 1
    rng = random.Random(4)
    out = {c.key: 0 for c in lanes}
    for _ in range(6_000):
        chosen = place_one(lanes, rng)
        assert chosen is not None
        chosen.outstanding += 1
        out[chosen.key] += 1
    assert abs((out["a#0"] + out["a#1"]) - out["b#0"]) < 150 and abs(out["a#0"] - out["a#1"]) < 150, out
