"""node/spread.py: least connections over READY workers; ScannersCount node-wide."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from threatgate.node.spread import ScannerSlots, Spread, shed_from


def test_connections_arriving_together_land_on_different_workers() -> None:
    spread = Spread(2)
    spread.set_ready(0, True)
    spread.set_ready(1, True)
    first = spread.assign(1.0)
    assert first is not None
    spread.opened(first, 1)
    second = spread.assign(1.0)
    assert second is not None and second != first
    spread.opened(second, 2)
    assert (spread.connections(0), spread.connections(1)) == (1, 1)


def test_only_ready_workers_are_chosen_and_none_when_none_is_ready() -> None:
    spread = Spread(3)
    assert spread.assign(0.0) is None
    spread.set_ready(2, True)
    assert [spread.assign(float(t)) for t in range(3)] == [2, 2, 2]


def test_ties_go_to_the_worker_assigned_least_recently() -> None:
    spread = Spread(2)
    spread.set_ready(0, True)
    spread.set_ready(1, True)
    # PING connections open and close at once: the counts stay equal, the choice alternates.
    picks = []
    for t in range(4):
        w = spread.assign(float(t))
        assert w is not None
        spread.opened(w, t)
        spread.closed(w, t)
        picks.append(w)
    assert picks == [0, 1, 0, 1]


def test_a_gone_worker_loses_its_connections_and_readiness() -> None:
    spread = Spread(2)
    spread.set_ready(0, True)
    spread.set_ready(1, True)
    spread.opened(0, 7)
    spread.opened(0, 8)
    assert spread.worker_gone(0) == [7, 8]
    assert spread.connections(0) == 0
    assert spread.ready == {1}
    assert spread.assign(0.0) == 1


def test_scanner_slots_grant_up_to_scanners_count_node_wide() -> None:
    slots = ScannerSlots(2)
    assert slots.request(0, 1)
    assert slots.request(1, 2)
    assert not slots.request(1, 3)
    assert slots.request(0, 1)  # asking again keeps the slot it has
    slots.release(0, 1)
    assert slots.request(1, 3)
    slots.worker_gone(1)
    assert len(slots) == 0


def test_eviction_candidate_is_the_idlest_past_the_floor_that_holds_a_slot() -> None:
    slots = ScannerSlots(3)
    for worker, conn in ((0, 1), (1, 2), (1, 3)):
        slots.request(worker, conn)
    idle = {0: [(1, 100.0)], 1: [(2, 50.0), (3, 95.0), (9, 10.0)]}  # conn 9 holds no slot
    assert slots.eviction_candidate(idle, now=110.0, floor=10.0) == (1, 2)
    assert slots.eviction_candidate(idle, now=110.0, floor=70.0) is None
    assert slots.eviction_candidate({}, now=110.0, floor=0.0) is None
    # One already asked to go for another newcomer is not named twice: the next idlest is.
    assert slots.eviction_candidate(idle, now=110.0, floor=10.0, exclude={(1, 2)}) == (1, 3)


@given(st.lists(st.tuples(st.sampled_from(["req", "rel", "gone"]), st.integers(0, 2), st.integers(0, 5))))
def test_scanner_slots_never_exceed_the_count(ops: list[tuple[str, int, int]]) -> None:
    slots = ScannerSlots(3)
    model: set[tuple[int, int]] = set()
    for op, worker, conn in ops:
        if op == "req":
            granted = slots.request(worker, conn)
            assert granted == ((worker, conn) in model or len(model) < 3)
            if granted:
                model.add((worker, conn))
        elif op == "rel":
            slots.release(worker, conn)
            model.discard((worker, conn))
        else:
            slots.worker_gone(worker)
            model = {k for k in model if k[0] != worker}
        assert len(slots) == len(model) <= 3


def test_the_fullest_worker_sheds_a_connection_until_the_workers_are_even() -> None:
    assert shed_from({0: 2, 1: 0}) == 0  # both lanes reconnected to worker 0 while worker 1 restarted
    assert shed_from({0: 1, 1: 0}) is None  # one apart: moving it would only swap the sides
    assert shed_from({0: 3, 1: 3, 2: 1}) == 0
    assert shed_from({0: 5}) is None
    assert shed_from({}) is None
