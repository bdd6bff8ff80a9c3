"""Tests for threatgate.node.feedwatch: when a changed feed file is due for a reload."""

from __future__ import annotations

from threatgate.node.feedwatch import MISSING, FeedWatch, Identity

V1: Identity = (10, 100, 1_000)
V2: Identity = (10, 120, 2_000)  # rewritten in place: same inode
V2_GROWING: Identity = (10, 60, 1_500)  # a cp still writing


def test_FeedWatch_unchanged_file_is_never_due() -> None:
    watch: FeedWatch[int] = FeedWatch(settle=0.5)
    for now in range(10):
        assert watch.observe(float(now), {0: V1}, {0: V1}) == []
    assert watch.pending == 0


def test_FeedWatch_a_change_is_due_once_stable_for_a_poll() -> None:
    watch: FeedWatch[int] = FeedWatch(settle=0.5)
    assert watch.observe(0.0, {0: V2}, {0: V1}) == []  # seen once: may still be written
    assert watch.pending == 1
    assert watch.observe(1.0, {0: V2}, {0: V1}) == [0]
    assert watch.pending == 0


def test_FeedWatch_a_file_still_being_written_waits() -> None:
    watch: FeedWatch[int] = FeedWatch(settle=0.5)
    assert watch.observe(0.0, {0: V2_GROWING}, {0: V1}) == []
    assert watch.observe(1.0, {0: V2}, {0: V1}) == []  # changed again: start over
    assert watch.observe(2.0, {0: V2}, {0: V1}) == [0]


def test_FeedWatch_settle_is_a_time_not_a_count() -> None:
    watch: FeedWatch[int] = FeedWatch(settle=0.5)
    assert watch.observe(0.0, {0: V2}, {0: V1}) == []
    assert watch.observe(0.2, {0: V2}, {0: V1}) == []  # polled again too soon
    assert watch.observe(0.5, {0: V2}, {0: V1}) == [0]


def test_FeedWatch_a_tried_version_is_not_due_again_even_if_it_failed() -> None:
    watch: FeedWatch[int] = FeedWatch(settle=0.5)
    watch.observe(0.0, {0: V2}, {0: V1})
    assert watch.observe(1.0, {0: V2}, {0: V1}) == [0]
    # The caller tried V2 (say it failed to parse) and recorded it: no retry, no second alert.
    for now in (2.0, 3.0, 4.0):
        assert watch.observe(now, {0: V2}, {0: V2}) == []


def test_FeedWatch_due_again_when_the_caller_did_not_record_a_try() -> None:
    watch: FeedWatch[int] = FeedWatch(settle=0.5)
    watch.observe(0.0, {0: V2}, {0: V1})
    assert watch.observe(1.0, {0: V2}, {0: V1}) == [0]
    assert watch.observe(2.0, {0: V2}, {0: V1}) == []
    assert watch.observe(3.0, {0: V2}, {0: V1}) == [0]


def test_FeedWatch_a_deleted_file_is_a_change() -> None:
    watch: FeedWatch[int] = FeedWatch(settle=0.5)
    assert watch.observe(0.0, {0: MISSING}, {0: V1}) == []
    assert watch.observe(1.0, {0: MISSING}, {0: V1}) == [0]
    assert watch.observe(2.0, {0: MISSING}, {0: MISSING}) == []


def test_FeedWatch_a_change_reverted_before_it_settled_is_nothing() -> None:
    watch: FeedWatch[int] = FeedWatch(settle=0.5)
    assert watch.observe(0.0, {0: V2}, {0: V1}) == []
    assert watch.observe(1.0, {0: V1}, {0: V1}) == []
    assert watch.pending == 0


def test_FeedWatch_never_tried_feed_is_due_once_stable() -> None:
    watch: FeedWatch[str] = FeedWatch(settle=0.5)
    assert watch.observe(0.0, {"new.json": V1}, {}) == []
    assert watch.observe(1.0, {"new.json": V1}, {}) == ["new.json"]


def test_FeedWatch_feeds_are_independent_and_unwatched_ones_forgotten() -> None:
    watch: FeedWatch[int] = FeedWatch(settle=0.5)
    assert watch.observe(0.0, {0: V2, 1: V1}, {0: V1, 1: V1}) == []
    assert watch.observe(1.0, {0: V2, 1: V2}, {0: V1, 1: V1}) == [0]
    assert watch.observe(2.0, {1: V2}, {1: V1}) == [1]  # feed 0 no longer watched (disabled)
    assert watch.observe(2.5, {0: V2}, {0: V1}) == []  # watched again: starts over
    assert watch.pending == 1
