"""Tests for threatgate.lb.health: rise/fall of active checks and passive failures (HAProxy's terms)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threatgate.lb.health import Health


def passes(h: Health, n: int) -> list[bool]:
    return [h.check_passed() for _ in range(n)]


def fails(h: Health, n: int, error: str = "no PONG") -> list[bool]:
    return [h.check_failed(error) for _ in range(n)]


def down_health(rise: int = 2, fall: int = 3) -> Health:
    """An instance that has been checked before (DOWN): ``rise`` passes bring it UP."""
    return Health(rise=rise, fall=fall, checked=True)


def up_health(rise: int = 2, fall: int = 3) -> Health:
    h = down_health(rise=rise, fall=fall)
    passes(h, rise)
    assert h.up
    return h


def test_Health_starts_DOWN_with_HAProxy_defaults() -> None:
    h = Health()
    assert (h.rise, h.fall) == (2, 3)
    assert not h.up
    assert (h.successes, h.failures, h.transitions, h.last_error) == (0, 0, 0, "")


def test_Health_a_never_checked_instance_is_UP_at_its_first_pass() -> None:
    """A balancer (re)started in front of running nodes serves at once, not after ``rise`` intervals."""
    h = Health(rise=3, fall=2)
    assert not h.up and not h.checked
    assert h.check_passed() is True
    assert h.up and h.transitions == 1 and h.successes == 1


def test_Health_a_first_failure_means_rise_applies() -> None:
    h = Health(rise=3, fall=2)
    assert h.check_failed("refused") is False
    assert h.checked
    assert passes(h, 3) == [False, False, True]


def test_Health_reset_for_MAINT_needs_rise_checks_again() -> None:
    h = Health(rise=2, fall=2)
    assert h.check_passed() is True
    h.reset()
    assert not h.up
    assert passes(h, 2) == [False, True]


def test_Health_rises_after_rise_consecutive_passes_and_reports_it_once() -> None:
    h = down_health(rise=3, fall=2)
    assert passes(h, 2) == [False, False]
    assert not h.up
    assert h.check_passed() is True
    assert h.up and h.transitions == 1
    assert passes(h, 5) == [False] * 5  # already UP: no new transition
    assert h.transitions == 1


def test_Health_rise_1_comes_up_on_the_first_pass() -> None:
    h = Health(rise=1, fall=1)
    assert h.check_passed() is True
    assert h.up


def test_Health_a_failure_while_rising_restarts_the_count() -> None:
    h = down_health(rise=2, fall=3)
    assert h.check_passed() is False
    assert h.check_failed("refused") is False  # DOWN already: no transition
    assert h.successes == 0 and h.failures == 1
    assert h.check_passed() is False  # one pass again, not two
    assert not h.up
    assert h.check_passed() is True
    assert h.up


def test_Health_falls_after_fall_consecutive_failures_and_reports_it_once() -> None:
    h = up_health(rise=2, fall=3)
    assert fails(h, 2) == [False, False]
    assert h.up
    assert h.check_failed("timeout") is True
    assert not h.up and h.transitions == 2
    assert h.last_error == "timeout"
    assert fails(h, 4) == [False] * 4  # already DOWN
    assert h.transitions == 2


def test_Health_a_pass_while_falling_restarts_the_count() -> None:
    h = up_health(rise=2, fall=3)
    fails(h, 2)
    assert h.check_passed() is False
    assert h.failures == 0
    assert fails(h, 2) == [False, False]
    assert h.up
    assert h.check_failed("x") is True


def test_Health_last_error_is_kept_while_DOWN_and_cleared_when_UP() -> None:
    h = Health(rise=2, fall=1)
    h.check_failed("cannot connect: Connection refused")
    assert h.last_error == "cannot connect: Connection refused"
    h.check_passed()
    assert h.last_error == "cannot connect: Connection refused"  # not UP yet
    h.check_passed()
    assert h.last_error == ""
    h.check_failed("answered b'HTTP' instead of PONG")
    assert not h.up
    assert h.last_error == "answered b'HTTP' instead of PONG"


def test_Health_passive_failure_takes_an_UP_instance_DOWN_at_once() -> None:
    h = up_health(rise=2, fall=3)
    assert h.passive_failure("event connection lost") is True
    assert not h.up
    assert h.transitions == 2
    assert h.last_error == "event connection lost"
    assert (h.successes, h.failures) == (0, 3)  # as if it had failed `fall` checks
    # It must pass `rise` checks again before it gets events.
    assert h.check_passed() is False
    assert h.check_passed() is True
    assert h.up and h.transitions == 3


def test_Health_passive_failure_of_a_DOWN_instance_is_no_transition_but_restarts_the_rise() -> None:
    h = down_health(rise=3, fall=3)
    passes(h, 2)
    assert h.passive_failure("reply timeout") is False
    assert not h.up and h.transitions == 0
    assert h.successes == 0
    assert h.last_error == "reply timeout"
    assert passes(h, 3) == [False, False, True]


def test_Health_passive_failure_resets_a_partial_fall_count_consistently() -> None:
    h = up_health(rise=1, fall=5)
    fails(h, 2)
    assert h.passive_failure("broken") is True
    assert h.failures == 5
    assert h.check_failed("still") is False
    assert h.failures == 6


@settings(max_examples=200, database=None, derandomize=True)
@given(
    rise=st.integers(1, 4),
    fall=st.integers(1, 4),
    outcomes=st.lists(st.sampled_from(["pass", "fail", "passive"]), max_size=40),
)
def test_Health_matches_a_model_of_rise_and_fall(rise: int, fall: int, outcomes: list[str]) -> None:
    h = Health(rise=rise, fall=fall)
    up, run_pass, run_fail, transitions, checked = False, 0, 0, 0, False
    for outcome in outcomes:
        first, checked = not checked, True
        if outcome == "pass":
            run_pass, run_fail = run_pass + 1, 0
            changed = not up and (first or run_pass >= rise)
            assert h.check_passed() is changed
        elif outcome == "fail":
            run_pass, run_fail = 0, run_fail + 1
            changed = up and run_fail >= fall
            assert h.check_failed("e") is changed
        else:
            run_pass = 0
            changed = up
            if up:
                run_fail = fall
            assert h.passive_failure("p") is changed
        if changed:
            up = not up
            transitions += 1
        assert h.up is up
        assert h.transitions == transitions
        assert (h.successes, h.failures) == (run_pass, run_fail)


@pytest.mark.parametrize(("rise", "fall"), [(1, 1), (2, 3), (5, 2)])
def test_Health_full_cycle_counts_two_transitions(rise: int, fall: int) -> None:
    h = down_health(rise=rise, fall=fall)
    assert passes(h, rise)[-1] is True
    assert fails(h, fall)[-1] is True
    assert h.transitions == 2
