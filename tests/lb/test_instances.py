"""Tests for threatgate.lb.instances: the instance state table, lane counts and resizing."""

from __future__ import annotations

from threatgate.config.balancer import InstanceSettings
from threatgate.lb.instances import (
    TRANSITIONS,
    Change,
    Instance,
    InstanceState,
    Resize,
    lane_count,
    next_state,
    plan_resize,
)


def test_every_instance_state_change_is_in_the_table() -> None:
    S = InstanceState
    assert next_state(S.DOWN, Change.CHECKS_PASSED) is S.UP
    assert next_state(S.UP, Change.FAILED) is S.DOWN
    assert next_state(S.UP, Change.DRAIN) is S.DRAIN and next_state(S.DRAIN, Change.DRAINED) is S.MAINT
    assert next_state(S.MAINT, Change.ENABLE) is S.DOWN and next_state(S.DRAIN, Change.ENABLE) is S.UP
    # What the table does not name does not happen: MAINT is not checked, UP is not "enabled" again.
    assert next_state(S.MAINT, Change.CHECKS_PASSED) is None and next_state(S.MAINT, Change.FAILED) is None
    assert next_state(S.UP, Change.ENABLE) is None and next_state(S.UP, Change.CHECKS_PASSED) is None
    assert all(before is not after for (before, _), after in TRANSITIONS.items())


def test_lane_count_and_resize_plans() -> None:
    assert lane_count("auto", None) == 1 and lane_count("auto", 4) == 4 and lane_count(2, 4) == 2
    assert plan_resize([], [], 2) == Resize(open=(0, 1))
    assert plan_resize([(0, True)], [1], 3) == Resize(open=(2,), revive=(1,))
    assert plan_resize([(0, True), (2, True)], [], 3) == Resize(open=(1,))
    # Shrinking retires a lane without a connection first (the one whose worker died), then the highest.
    assert plan_resize([(0, False), (1, True), (2, True)], [], 1) == Resize(retire=(0, 2))
    assert plan_resize([(0, True)], [], 1) == Resize() and not plan_resize([(0, True)], [], 1)


def test_an_instance_resizes_its_lanes_and_drops_idle_retired_ones_at_once() -> None:
    inst = Instance(InstanceSettings(host="127.0.0.1", matching_port=1, connections=3), rise=2, fall=3)
    assert [lane.key for lane in inst.lanes] == ["127.0.0.1:1#0", "127.0.0.1:1#1", "127.0.0.1:1#2"]
    assert inst.state is InstanceState.DOWN and inst.active_lanes == 3
    inst.lanes[1].owned[7] = 0.0  # lane 1 owes an event: it drains; lane 2 owes nothing: dropped
    inst.settings = InstanceSettings(host="127.0.0.1", matching_port=1, connections=1)
    added, retired, dropped = inst.resize()
    assert added == [] and [lane.index for lane in retired] == [2, 1] and [lane.index for lane in dropped] == [2]
    assert [(lane.index, lane.retiring) for lane in inst.lanes] == [(0, False), (1, True)] and inst.active_lanes == 1
    inst.settings = InstanceSettings(host="127.0.0.1", matching_port=1, connections=2)
    added, retired, dropped = inst.resize()
    assert [lane.index for lane in added] == [1] and not inst.lanes[1].retiring  # revived, not a new one
    disabled = Instance(InstanceSettings(host="127.0.0.1", matching_port=2, enabled=False), rise=2, fall=3)
    assert disabled.state is InstanceState.MAINT
