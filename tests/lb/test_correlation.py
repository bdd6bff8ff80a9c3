"""Tests for threatgate.lb.correlation: request ids, ownership, exactly-once and in-order release.

The unit tests pin each rule of the Correlator through the API the balancer calls (runs of one line or id as
well as batches); the state machine at the end drives it with simulated CyberTrace nodes through any
interleaving, delay, duplication and failure and checks that every event's results reach its client
exactly once, complete, and in submission order.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from threatgate.lb.correlation import FINISHED, Answered, Correlator, Drop, split_id


class Release(NamedTuple):
    """One event's complete answer as its client gets it (one entry of an :class:`Answered` run)."""

    client: Hashable
    request_id: int
    lines: tuple[str, ...]
    finished_line: str


def releases(answered: list[Answered]) -> list[Release]:
    return [Release(run.client, rid, lines, fin) for run in answered for rid, lines, fin in run.answers]


def send(c: Correlator, request_id: int, instance: Hashable) -> str:
    """Dispatch one event the balancer's way (a run of one); returns the tagged line sent."""
    out: list[str] = []
    assert c.dispatch_many([request_id], instance, out) == [request_id]
    return out[0]


def on_line(c: Correlator, instance: Hashable, line: str) -> list[Release] | Drop:
    """One reply line through the batch path: the releases it completes, or why it was dropped."""
    answered, drops = c.on_lines(instance, [line], [])
    return drops[0] if drops else releases(answered)


def reply(request_id: int, detections: Sequence[str] = ()) -> list[str]:
    """What a CyberTrace node whose EventFormat and FinishedEventFormat start with ``%REQ%`` writes back."""
    req = request_id
    return [f"{req} {d}" for d in detections] + [f"{req} {FINISHED}"]


def feed(c: Correlator, instance: Hashable, lines: Sequence[str]) -> list[Release]:
    """Deliver lines that must all be accepted; returns every release they complete."""
    out: list[Release] = []
    for line in lines:
        result = on_line(c, instance, line)
        assert not isinstance(result, Drop), (line, result)
        out.extend(result)
    return out


def no_drops(c: Correlator) -> bool:
    return all(n == 0 for n in c.dropped.values())


# -- ids and tagging ---------------------------------------------------------------------------------


def test_Correlator_ids_are_unique_and_increasing_across_clients() -> None:
    c = Correlator()
    ids = [c.submit(client, f"ev{i}") for i in range(5) for client in ("a", "b", "c")]
    assert ids == list(range(1, 16))
    assert c.pending == 15


def test_Correlator_first_id_is_configurable_and_ids_are_never_reused_after_release() -> None:
    c = Correlator(first_id=1000)
    first = c.submit("a", "x")
    send(c, first, "n1")
    assert [r.request_id for r in feed(c, "n1", reply(first))] == [first]
    second = c.submit("a", "y")
    assert (first, second) == (1000, 1001)


def test_Correlator_sends_id_space_event() -> None:
    c = Correlator()
    event = "CEF:0|Squid|Proxy|3.5|TCP_MISS|GET|3|src=10.1.2.3 url=http://fakess123.nu/"
    rid = c.submit("a", event)
    tagged = send(c, rid, "n1")
    assert tagged == f"{rid} {event}"
    assert split_id(tagged) == (rid, event)


def test_Correlator_submit_does_not_dispatch() -> None:
    c = Correlator()
    rid = c.submit("a", "x")
    assert c.is_pending(rid)
    assert c.unowned() == [rid]
    assert c.owned_by("n1") == 0
    send(c, rid, "n1")
    assert c.unowned() == []
    assert c.owned_by("n1") == 1
    assert repr(c) == "<Correlator pending=1 owned=1 clients=1>"


# -- buffering and order -------------------------------------------------------------------------------


def test_Correlator_detection_lines_are_buffered_until_LookupFinished() -> None:
    c = Correlator()
    rid = c.submit("a", "url=http://evil.example/")
    send(c, rid, "n1")
    assert on_line(c, "n1", f"{rid} Category=Malicious_URL|MatchedIndicator=evil.example") == []
    assert on_line(c, "n1", f"{rid} Category=Phishing_URL|MatchedIndicator=evil.example") == []
    assert c.pending == 1
    assert on_line(c, "n1", f"{rid} {FINISHED}") == [
        Release(
            "a",
            rid,
            (
                "Category=Malicious_URL|MatchedIndicator=evil.example",
                "Category=Phishing_URL|MatchedIndicator=evil.example",
            ),
            FINISHED,
        )
    ]
    assert c.pending == 0
    assert c.owned_by("n1") == 0
    assert not c.is_pending(rid)
    assert no_drops(c)


def test_Correlator_event_without_detections_releases_only_the_finished_line() -> None:
    c = Correlator()
    rid = c.submit("a", "x")
    send(c, rid, "n1")
    assert on_line(c, "n1", f"{rid} {FINISHED}") == [Release("a", rid, (), FINISHED)]


def test_Correlator_finished_line_may_carry_more_fields_but_must_be_the_whole_word() -> None:
    c = Correlator()
    rid = c.submit("a", "x")
    send(c, rid, "n1")
    assert on_line(c, "n1", f"{rid} {FINISHED}X") == []  # a detection that merely starts with the word
    assert on_line(c, "n1", f"{rid} {FINISHED} count=1") == [
        Release("a", rid, (f"{FINISHED}X",), f"{FINISHED} count=1")
    ]


def test_Correlator_detection_line_may_be_empty() -> None:
    c = Correlator()
    rid = c.submit("a", "x")
    send(c, rid, "n1")
    assert on_line(c, "n1", f"{rid} ") == []
    assert on_line(c, "n1", f"{rid} {FINISHED}") == [Release("a", rid, ("",), FINISHED)]


def test_Correlator_releases_per_client_in_submission_order_when_finishes_arrive_out_of_order() -> None:
    c = Correlator()
    r1, r2, r3 = (c.submit("a", f"ev{i}") for i in range(3))
    send(c, r1, "n1")
    send(c, r2, "n2")
    send(c, r3, "n1")
    assert feed(c, "n1", reply(r3, ["d3"])) == []  # r3 waits for r1 and r2
    assert c.pending == 3
    assert c.unowned() == []  # a finished event is not handed out again
    assert c.owned_by("n1") == 1  # r1 only: r3 is answered
    assert feed(c, "n1", reply(r1, ["d1a", "d1b"])) == [Release("a", r1, ("d1a", "d1b"), FINISHED)]
    assert feed(c, "n2", reply(r2)) == [
        Release("a", r2, (), FINISHED),
        Release("a", r3, ("d3",), FINISHED),
    ]
    assert c.pending == 0
    assert no_drops(c)


def test_Correlator_clients_are_independent() -> None:
    c = Correlator()
    slow = c.submit("a", "slow")
    fast = [c.submit("b", f"fast{i}") for i in range(3)]
    send(c, slow, "n1")
    for rid in fast:
        send(c, rid, "n2")
    on_line(c, "n1", f"{slow} partial")
    for rid in fast:
        assert feed(c, "n2", reply(rid, [f"d{rid}"])) == [Release("b", rid, (f"d{rid}",), FINISHED)]
    assert c.pending == 1
    assert feed(c, "n1", [f"{slow} {FINISHED}"]) == [Release("a", slow, ("partial",), FINISHED)]


def test_Correlator_interleaved_lines_of_several_events_of_one_node() -> None:
    c = Correlator()
    r1 = c.submit("a", "x")
    r2 = c.submit("b", "y")
    send(c, r1, "n1")
    send(c, r2, "n1")
    lines = [f"{r2} y0", f"{r1} x0", f"{r2} y1", f"{r2} {FINISHED}", f"{r1} x1", f"{r1} {FINISHED}"]
    assert feed(c, "n1", lines) == [Release("b", r2, ("y0", "y1"), FINISHED), Release("a", r1, ("x0", "x1"), FINISHED)]


# -- what is dropped -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("abc", id="no-digits"),
        pytest.param(" 1 x", id="leading-space"),
        pytest.param("-1 x", id="negative"),
        pytest.param("+1 x", id="plus-sign"),
        pytest.param("1x", id="no-space"),
        pytest.param("1", id="id-only"),
        pytest.param("1\tx", id="tab"),
        pytest.param("\u0661 x", id="arabic-indic-digit"),
        pytest.param("\uff11 x", id="fullwidth-digit"),
        pytest.param("\u00b9 x", id="superscript-digit"),
        pytest.param("1" * 20 + " x", id="20-digits"),
        pytest.param(FINISHED, id="bare-LookupFinished"),
    ],
)
def test_Correlator_line_without_an_id_is_dropped_NO_ID(line: str) -> None:
    c = Correlator()
    rid = c.submit("a", "x")
    send(c, rid, "n1")
    assert split_id(line) is None
    assert on_line(c, "n1", line) is Drop.NO_ID
    assert c.dropped[Drop.NO_ID] == 1
    assert c.pending == 1


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("1 x", (1, "x")),
        ("1 ", (1, "")),
        ("42 a b  c", (42, "a b  c")),
        ("007 x", (7, "x")),
        ("1" * 19 + " x", (int("1" * 19), "x")),
    ],
)
def test_split_id_accepts_ascii_digits_then_space(line: str, expected: tuple[int, str]) -> None:
    assert split_id(line) == expected


def test_Correlator_line_from_a_non_owner_is_dropped_NOT_OWNER() -> None:
    c = Correlator()
    mine = c.submit("a", "x")
    theirs = c.submit("b", "y")
    send(c, mine, "n1")
    send(c, theirs, "n2")
    assert on_line(c, "n1", f"{theirs} injected") is Drop.NOT_OWNER
    assert on_line(c, "n1", f"{theirs} {FINISHED}") is Drop.NOT_OWNER
    assert c.dropped[Drop.NOT_OWNER] == 2
    assert feed(c, "n2", reply(theirs, ["real"])) == [Release("b", theirs, ("real",), FINISHED)]


def test_Correlator_line_for_an_undispatched_event_is_dropped_NOT_OWNER() -> None:
    c = Correlator()
    rid = c.submit("a", "x")
    assert on_line(c, "n1", f"{rid} {FINISHED}") is Drop.NOT_OWNER
    assert c.unowned() == [rid]


def test_Correlator_unknown_and_retired_ids_are_dropped_UNKNOWN_ID() -> None:
    c = Correlator()
    rid = c.submit("a", "x")
    send(c, rid, "n1")
    assert on_line(c, "n1", f"{rid + 1} x") is Drop.UNKNOWN_ID  # never issued
    assert on_line(c, "n1", "0 x") is Drop.UNKNOWN_ID
    feed(c, "n1", reply(rid))
    assert on_line(c, "n1", f"{rid} late") is Drop.UNKNOWN_ID  # retired
    assert on_line(c, "n1", f"{rid} {FINISHED}") is Drop.UNKNOWN_ID
    assert c.dropped == {Drop.NO_ID: 0, Drop.UNKNOWN_ID: 4, Drop.NOT_OWNER: 0}


def test_Correlator_duplicated_LookupFinished_is_dropped_while_waiting_and_after_release() -> None:
    c = Correlator()
    r1 = c.submit("a", "x")
    r2 = c.submit("a", "y")
    send(c, r1, "n1")
    send(c, r2, "n1")
    assert on_line(c, "n1", f"{r2} d") == []
    assert on_line(c, "n1", f"{r2} {FINISHED}") == []
    # r2 is answered but not released (r1 first): its owner may not add to it or finish it again.
    assert on_line(c, "n1", f"{r2} {FINISHED}") is Drop.NOT_OWNER
    assert on_line(c, "n1", f"{r2} d") is Drop.NOT_OWNER
    assert feed(c, "n1", [f"{r1} {FINISHED}"]) == [Release("a", r1, (), FINISHED), Release("a", r2, ("d",), FINISHED)]
    assert on_line(c, "n1", f"{r2} {FINISHED}") is Drop.UNKNOWN_ID
    assert on_line(c, "n1", f"{r1} {FINISHED}") is Drop.UNKNOWN_ID
    assert c.dropped == {Drop.NO_ID: 0, Drop.UNKNOWN_ID: 2, Drop.NOT_OWNER: 2}


def test_Correlator_client_event_that_looks_like_a_reply_cannot_complete_anything() -> None:
    # The victim's event gets id 123; the attacker sends an event that spells "123 LookupFinished".
    c = Correlator(first_id=123)
    victim = c.submit("victim", "url=http://evil.example/")
    forged = c.submit("attacker", f"{victim} {FINISHED}")
    assert forged != victim
    send(c, victim, "n1")
    sent = send(c, forged, "n1")  # the same node: ownership alone would not stop it
    # The node sees "<forged> 123 LookupFinished" and, echoing the event as its detection, writes it back
    # behind the attacker's own id.
    lines = reply(forged, [sent.partition(" ")[2]])
    assert lines == [f"{forged} {victim} {FINISHED}", f"{forged} {FINISHED}"]
    assert on_line(c, "n1", lines[0]) == []
    assert c.is_pending(victim)
    assert on_line(c, "n1", lines[1]) == [Release("attacker", forged, (f"{victim} {FINISHED}",), FINISHED)]
    assert c.is_pending(victim)
    assert feed(c, "n1", reply(victim, ["hit"])) == [Release("victim", victim, ("hit",), FINISHED)]
    assert no_drops(c)


def test_Correlator_client_event_with_its_own_id_prefix_keeps_the_balancer_id_first() -> None:
    c = Correlator()
    rid = c.submit("a", "999999 x")
    tagged = send(c, rid, "n1")
    assert tagged == f"{rid} 999999 x"
    assert split_id(tagged) == (rid, "999999 x")


# -- failures and disconnects ------------------------------------------------------------------------


def test_Correlator_instance_lost_returns_unfinished_ids_in_submission_order_and_clears_their_lines() -> None:
    c = Correlator()
    ids = [c.submit(client, f"ev{i}") for i in range(3) for client in ("a", "b")]
    for rid in reversed(ids):  # dispatch order differs from submission order
        send(c, rid, "n1" if rid != ids[1] else "n2")
    done = ids[4]
    feed(c, "n1", reply(done, ["d"]))  # answered, waiting for a's earlier events: not lost
    on_line(c, "n1", f"{ids[0]} partial")
    lost = c.instance_lost("n1")
    assert lost == [ids[0], ids[2], ids[3], ids[5]]
    assert c.unowned() == lost
    assert c.owned_by("n1") == 0
    assert c.owned_by("n2") == 1
    assert c.instance_lost("n1") == []  # idempotent
    send(c, ids[0], "n2")
    # The redispatched event is answered from scratch: the partial line from n1 is gone.
    assert feed(c, "n2", reply(ids[0], ["full"])) == [Release("a", ids[0], ("full",), FINISHED)]
    assert c.unowned() == [ids[2], ids[3], ids[5]]


def test_Correlator_late_lines_from_a_lost_instance_are_dropped_before_and_after_redispatch() -> None:
    c = Correlator()
    rid = c.submit("a", "x")
    send(c, rid, "n1")
    on_line(c, "n1", f"{rid} d0")
    assert c.instance_lost("n1") == [rid]
    # still in the network from n1:
    assert on_line(c, "n1", f"{rid} d1") is Drop.NOT_OWNER
    send(c, rid, "n2")
    assert c.owner(rid) == "n2"
    assert on_line(c, "n1", f"{rid} d1") is Drop.NOT_OWNER
    assert on_line(c, "n1", f"{rid} {FINISHED}") is Drop.NOT_OWNER
    assert on_line(c, "n2", f"{rid} d0") == []
    assert on_line(c, "n1", f"{rid} {FINISHED}") is Drop.NOT_OWNER  # interleaved with the new owner
    assert feed(c, "n2", [f"{rid} d1", f"{rid} {FINISHED}"]) == [Release("a", rid, ("d0", "d1"), FINISHED)]
    assert on_line(c, "n1", f"{rid} {FINISHED}") is Drop.UNKNOWN_ID
    assert c.dropped == {Drop.NO_ID: 0, Drop.UNKNOWN_ID: 1, Drop.NOT_OWNER: 4}


def test_Correlator_dispatch_to_a_new_owner_discards_the_previous_owners_lines() -> None:
    # Regression: dispatch() used to keep lines buffered from the previous owner, so reassigning an
    # owned event (e.g. on a reply timeout) released n1's partial answer plus n2's whole answer.
    c = Correlator()
    rid = c.submit("a", "x")
    send(c, rid, "n1")
    on_line(c, "n1", f"{rid} det")
    send(c, rid, "n2")
    assert c.owned_by("n1") == 0
    assert on_line(c, "n1", f"{rid} {FINISHED}") is Drop.NOT_OWNER
    assert feed(c, "n2", [f"{rid} det", f"{rid} {FINISHED}"]) == [Release("a", rid, ("det",), FINISHED)]


def test_Correlator_dispatch_of_an_answered_event_is_refused() -> None:
    # Regression: it used to make the answered event count as owned by the new instance until release.
    c = Correlator()
    r1 = c.submit("a", "x")
    r2 = c.submit("a", "y")
    send(c, r1, "n1")
    send(c, r2, "n1")
    feed(c, "n1", [f"{r2} d", f"{r2} {FINISHED}"])
    out: list[str] = []
    assert c.dispatch_many([r2], "n2", out) == [] and out == []  # answered: not sent again
    assert c.owned_by("n2") == 0
    assert feed(c, "n1", [f"{r1} {FINISHED}"]) == [Release("a", r1, (), FINISHED), Release("a", r2, ("d",), FINISHED)]


def test_Correlator_client_gone_forgets_its_events_and_later_replies_are_UNKNOWN_ID() -> None:
    c = Correlator()
    a1 = c.submit("a", "x")
    b1 = c.submit("b", "y")
    a2 = c.submit("a", "z")
    a3 = c.submit("a", "w")
    send(c, a1, "n1")
    send(c, b1, "n1")
    send(c, a3, "n2")
    feed(c, "n2", reply(a3))  # answered, not released
    on_line(c, "n1", f"{a1} partial")
    assert c.client_gone("a") == [(a1, "n1"), (a2, None), (a3, None)]
    assert c.pending == 1
    assert c.unowned() == []
    assert c.owned_by("n1") == 1
    assert on_line(c, "n1", f"{a1} more") is Drop.UNKNOWN_ID
    assert on_line(c, "n1", f"{a1} {FINISHED}") is Drop.UNKNOWN_ID
    assert c.instance_lost("n1") == [b1]
    assert c.client_gone("a") == []
    assert c.client_gone("never-seen") == []


def test_Correlator_a_reconnecting_client_key_sees_nothing_of_its_previous_session() -> None:
    c = Correlator()
    old = c.submit("a", "x")
    send(c, old, "n1")
    on_line(c, "n1", f"{old} stale")
    c.client_gone("a")
    new = c.submit("a", "y")
    send(c, new, "n1")
    assert on_line(c, "n1", f"{old} {FINISHED}") is Drop.UNKNOWN_ID
    assert feed(c, "n1", reply(new, ["fresh"])) == [Release("a", new, ("fresh",), FINISHED)]


def test_Correlator_client_gone_releases_nothing_for_the_other_clients() -> None:
    c = Correlator()
    a1 = c.submit("a", "x")
    b1 = c.submit("b", "y")
    send(c, a1, "n1")
    send(c, b1, "n1")
    c.client_gone("a")
    assert feed(c, "n1", reply(b1)) == [Release("b", b1, (), FINISHED)]
    assert c.pending == 0


def test_Correlator_same_key_again_after_instance_lost_answers_afresh() -> None:
    # The balancer names instances by node: a node that failed and came back has the same key.
    c = Correlator()
    rid = c.submit("a", "x")
    send(c, rid, "n1")
    on_line(c, "n1", f"{rid} old")
    assert c.instance_lost("n1") == [rid]
    send(c, rid, "n1")
    assert c.owner(rid) == "n1"
    assert feed(c, "n1", [f"{rid} new", f"{rid} {FINISHED}"]) == [Release("a", rid, ("new",), FINISHED)]


def test_Correlator_owner_follows_dispatch_finish_and_loss() -> None:
    c = Correlator()
    r1 = c.submit("a", "x")
    r2 = c.submit("a", "y")
    assert c.owner(r1) is None
    send(c, r1, "n1")
    send(c, r2, "n2")
    assert (c.owner(r1), c.owner(r2)) == ("n1", "n2")
    feed(c, "n2", [f"{r2} {FINISHED}"])
    assert c.owner(r2) is None  # answered, waiting for r1
    c.instance_lost("n1")
    assert c.owner(r1) is None
    assert c.owner(12345) is None


# -- batch paths (what the balancer calls) -------------------------------------------------------------


def test_Correlator_submit_many_gives_consecutive_ids_in_order_with_submit() -> None:
    c = Correlator(first_id=10)
    assert c.submit("a", "x") == 10
    ids = c.submit_many("b", ["p", "q", "r"])
    assert list(ids) == [11, 12, 13]
    assert c.submit("a", "y") == 14
    assert list(c.submit_many("a", [])) == []
    assert c.unowned() == [10, 11, 12, 13, 14]
    assert [send(c, rid, "n1") for rid in (13, 12, 11)] == ["13 r", "12 q", "11 p"]
    assert feed(c, "n1", [f"13 {FINISHED}", f"11 {FINISHED}"]) == [Release("b", 11, (), FINISHED)]
    assert feed(c, "n1", [f"12 {FINISHED}"]) == [Release("b", 12, (), FINISHED), Release("b", 13, (), FINISHED)]


def test_Correlator_dispatch_many_tags_skips_what_is_gone_or_answered_and_discards_old_lines() -> None:
    c = Correlator()
    a1, a2, a3 = (c.submit("a", f"ev{i}") for i in range(3))
    b1 = c.submit("b", "gone")
    send(c, a1, "n1")
    on_line(c, "n1", f"{a1} partial")
    send(c, a3, "n1")
    feed(c, "n1", [f"{a3} {FINISHED}"])  # answered, waiting for a1 and a2
    c.client_gone("b")
    out = ["already there"]
    assert c.dispatch_many([a1, b1, a2, a3, 999], "n2", out) == [a1, a2]
    assert out == ["already there", f"{a1} ev0", f"{a2} ev1"]
    assert (c.owner(a1), c.owner(a2), c.owner(a3)) == ("n2", "n2", None)
    assert on_line(c, "n1", f"{a1} {FINISHED}") is Drop.NOT_OWNER
    assert feed(c, "n2", [f"{a2} {FINISHED}", f"{a1} full", f"{a1} {FINISHED}"]) == [
        Release("a", a1, ("full",), FINISHED),
        Release("a", a2, (), FINISHED),
        Release("a", a3, (), FINISHED),
    ]


def test_Correlator_on_lines_releases_runs_per_client_and_reports_finished_ids_and_drops() -> None:
    c = Correlator()
    a1 = c.submit("a", "x")
    b1 = c.submit("b", "y")
    a2 = c.submit("a", "z")
    b2 = c.submit("b", "w")
    for rid in (a1, b1, a2, b2):
        send(c, rid, "n1")
    finished: list[int] = []
    lines = [
        f"{a2} {FINISHED}",
        f"{b1} hit",
        f"{b1} hit2",
        "",  # an empty line (e.g. "\r\n" after the "\r" was stripped) is skipped, not counted
        "garbage",
        f"{b1} {FINISHED}",
        f"{a1} {FINISHED} count=0",
        f"{a1} {FINISHED}",  # a duplicate within the batch: answered but not yet released
        f"{b2} partial",
        f"{b2 + 1} x",
    ]
    answered, drops = c.on_lines("n1", lines, finished)
    assert finished == [a2, b1, a1]
    assert drops == [Drop.NO_ID, Drop.NOT_OWNER, Drop.UNKNOWN_ID]
    assert c.dropped == {Drop.NO_ID: 1, Drop.UNKNOWN_ID: 1, Drop.NOT_OWNER: 1}
    assert [(run.client, run.answers, run.detections, run.plain) for run in answered] == [
        ("a", [(a1, (), f"{FINISHED} count=0"), (a2, (), FINISHED)], 0, False),
        ("b", [(b1, ("hit", "hit2"), FINISHED)], 2, False),
    ]
    assert c.pending == 1
    answered, drops = c.on_lines("n1", [f"{b2} {FINISHED}", f"{a1} {FINISHED}"], finished)
    assert drops == [Drop.UNKNOWN_ID]
    assert [(run.client, run.answers, run.detections, run.plain) for run in answered] == [
        ("b", [(b2, ("partial",), FINISHED)], 1, False)
    ]
    assert finished == [a2, b1, a1, b2]


def test_Correlator_on_lines_plain_run_has_no_detections_and_plain_finished_lines() -> None:
    c = Correlator()
    ids = c.submit_many("a", ["x", "y", "z"])
    out: list[str] = []
    c.dispatch_many(list(ids), "n1", out)
    answered, drops = c.on_lines("n1", [f"{rid} {FINISHED}" for rid in reversed(ids)], [])
    assert drops == []
    assert [(run.client, run.answers, run.detections, run.plain) for run in answered] == [
        ("a", [(rid, (), FINISHED) for rid in ids], 0, True)
    ]


def test_Correlator_an_empty_line_is_skipped_not_dropped() -> None:
    c = Correlator()
    rid = c.submit("a", "x")
    send(c, rid, "n1")
    finished: list[int] = []
    answered, drops = c.on_lines("n1", ["", f"{rid} {FINISHED}", ""], finished)
    assert (releases(answered), drops, finished) == ([Release("a", rid, (), FINISHED)], [], [rid])
    assert no_drops(c)


def test_Correlator_finish_local_answers_in_order_without_detections_and_disowns_the_event() -> None:
    c = Correlator()
    r1 = c.submit("a", "x")
    big = c.submit("a", "too large")
    r3 = c.submit("a", "z")
    send(c, r1, "n1")
    send(c, big, "n1")
    on_line(c, "n1", f"{big} partial")
    assert c.finish_local_runs(big) == []  # r1 first
    assert c.unowned() == [r3]
    assert on_line(c, "n1", f"{big} late") is Drop.NOT_OWNER
    assert feed(c, "n1", [f"{r1} {FINISHED}"]) == [Release("a", r1, (), FINISHED), Release("a", big, (), FINISHED)]
    runs = c.finish_local_runs(r3, f"{FINISHED} oversized")
    assert [(run.client, run.answers, run.detections, run.plain) for run in runs] == [
        ("a", [(r3, (), f"{FINISHED} oversized")], 0, False)
    ]
    assert c.pending == 0
    assert c.dropped == {Drop.NO_ID: 0, Drop.UNKNOWN_ID: 0, Drop.NOT_OWNER: 1}


# -- property: simulated nodes, any interleaving, delay, duplication and failure -------------------------

Conn = tuple[str, int]  # one event connection to a node: (node name, connection generation)

MISBEHAVING_NO_ID = ["abc", " 1 x", "1x", "-1 x", "\u0661 x", FINISHED, f"x {FINISHED}"]
FORGED_RESTS = ["forged", FINISHED, f"{FINISHED} x", "Category=Injected"]


def line_id(line: str) -> int | None:
    """The model's reading of a reply line's request id: ASCII digits (at most 19), then a space."""
    head, space, _ = line.partition(" ")
    if not space or not 0 < len(head) <= 19 or not all("0" <= ch <= "9" for ch in head):
        return None
    return int(head)


def detections(name: str, k: int) -> tuple[str, ...]:
    """The ground truth for event ``<name>:<k>``; every other detection merely starts with the finished word."""
    return tuple(f"{FINISHED if i % 2 else ''}det {name} #{i}" for i in range(k))


def node_lines(tagged: str) -> list[str]:
    """The simulated node: event ``<name>:<k>`` yields its k detection lines, then LookupFinished."""
    req, _, event = tagged.partition(" ")
    name, _, k = event.rpartition(":")
    return reply(int(req), detections(name, int(k)))


@dataclass(slots=True)
class Ev:
    rid: int
    client: str
    session: int
    text: str
    expected: tuple[str, ...]  # ground truth: the detection lines of this event
    owner: Hashable | None = None  # the Correlator key of the connection answering it
    finished: bool = False
    released: int = 0
    gone: bool = False  # its client disconnected before it was released

    @property
    def live(self) -> bool:
        return not self.gone and self.released == 0


@dataclass(slots=True)
class Node:
    name: str
    epoch: int = 0
    up: bool = True
    inflight: dict[int, deque[str]] = field(default_factory=dict)  # rid -> lines still to write

    @property
    def conn(self) -> Conn:
        return (self.name, self.epoch)


class CorrelationMachine(RuleBasedStateMachine):
    """Clients submit events; simulated CyberTrace nodes answer them over FIFO connections.

    Two ways to name an instance, drawn per run:

    * per connection (node name, generation): a node that failed and came back is a new instance
      key, and lines still in the network on the dead connection may arrive at any time later, also
      after the node is back and has been given the same events again;
    * per node (the name only, as the balancer does): lines of a dead connection may arrive until
      the node's new connection opens; then the old one is gone (the balancer aborts a failed
      connection and reads no more from it).  The Correlator cannot tell two connections under one
      key apart, so that part is the caller's.

    Lines arrive one at a time (``on_line``) or a connection's whole backlog at once (``on_lines``,
    the balancer's path).  The model predicts the verdict on every line; the event text alone decides
    what a release must hold.
    """

    def __init__(self) -> None:
        super().__init__()
        self.c = Correlator()
        self.per_connection = True
        self.events: dict[int, Ev] = {}
        self.nodes: list[Node] = []
        self.network: dict[Conn, deque[str]] = {}  # lines written on a connection, not yet arrived
        self.delivered: list[tuple[Conn, str]] = []
        self.order: dict[str, list[int]] = {}  # client -> ids of its current session, not yet released
        self.session: dict[str, int] = {}
        self.last_id = 0
        self.serial = 0
        self.failures = 0
        self.disconnects = 0
        self.local = 0
        self.expected_dropped = dict.fromkeys(Drop, 0)
        self.as_bytes = False

    @initialize(
        n_clients=st.integers(1, 3),
        n_nodes=st.integers(1, 3),
        per_connection=st.booleans(),
        first_id=st.sampled_from([1, 7, 10**18]),
        initial=st.binary(max_size=8),
        as_bytes=st.booleans(),
    )
    def setup(
        self, n_clients: int, n_nodes: int, per_connection: bool, first_id: int, initial: bytes, as_bytes: bool
    ) -> None:
        self.c = Correlator(first_id=first_id)
        self.as_bytes = as_bytes
        self.per_connection = per_connection
        self.last_id = first_id - 1
        self.nodes = [Node(f"n{i}") for i in range(n_nodes)]
        self.network = {node.conn: deque() for node in self.nodes}
        for i in range(n_clients):
            self.order[f"c{i}"] = []
            self.session[f"c{i}"] = 0
        for byte in initial:  # work from the start, even in runs where swarm testing disables submit
            self.submit(byte % 3, bytes([byte // 3]))

    # -- model ----------------------------------------------------------------------------------------

    def key(self, conn: Conn) -> Hashable:
        """The instance key the Correlator sees for a connection."""
        return conn if self.per_connection else conn[0]

    def live_ids(self) -> list[int]:
        return [rid for rid, ev in self.events.items() if ev.live]

    def model_unowned(self) -> list[int]:
        return [rid for rid, ev in self.events.items() if ev.live and ev.owner is None and not ev.finished]

    def up_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.up]

    def in_progress(self, rid: int, conn: Conn) -> bool:
        """``conn`` is answering ``rid`` right now: its lines for it are (rightly) accepted."""
        ev = self.events.get(rid)
        return ev is not None and ev.live and not ev.finished and ev.owner == self.key(conn)

    def verdict(self, conn: Conn, line: str) -> Drop | None:
        """The model's verdict on a line arriving on ``conn``: the Drop, or None when accepted.

        An accepted LookupFinished is applied here (the event is answered, owned by nobody); the caller
        releases.
        """
        rid = line_id(line)
        rest = line.partition(" ")[2]
        if rid is None:
            verdict = Drop.NO_ID
        elif (ev := self.events.get(rid)) is None or not ev.live:
            verdict = Drop.UNKNOWN_ID
        elif ev.owner != self.key(conn) or ev.finished:
            verdict = Drop.NOT_OWNER
        else:
            if rest == FINISHED or rest.startswith(FINISHED + " "):
                ev.finished = True
                ev.owner = None
            return None
        self.expected_dropped[verdict] += 1
        return verdict

    def release(self, client: str) -> list[Release]:
        """The answered prefix of ``client``'s events, checked against the ground truth."""
        out = []
        order = self.order[client]
        while order and self.events[order[0]].finished:
            ev = self.events[order.pop(0)]
            ev.released += 1
            assert ev.released == 1 and not ev.gone and ev.session == self.session[client]
            out.append(Release(client, ev.rid, ev.expected, FINISHED))
        return out

    def arrive(self, conn: Conn, line: str) -> None:
        """One line arrives (``on_line``)."""
        self.delivered.append((conn, line))
        rid = line_id(line)
        answered = self.events.get(rid) if rid is not None else None
        was_finished = answered is not None and answered.finished
        verdict = self.verdict(conn, line)
        result = on_line(self.c, self.key(conn), line)
        if verdict is not None:
            assert result is verdict, (conn, line, result)
        elif answered is not None and answered.finished and not was_finished:
            assert result == self.release(answered.client), (conn, line)
        else:
            assert result == [], (conn, line, result)

    def arrive_all(self, conn: Conn) -> None:
        """Every line waiting on ``conn`` arrives in one read (``on_lines``)."""
        lines = list(self.network[conn])
        self.network[conn].clear()
        self.delivered.extend((conn, line) for line in lines)
        drops: list[Drop] = []
        finished: list[int] = []
        touched: dict[str, None] = {}
        for line in lines:
            verdict = self.verdict(conn, line)
            if verdict is not None:
                drops.append(verdict)
            elif (ev := self.events[int(line.partition(" ")[0])]).finished and ev.rid not in finished:
                finished.append(ev.rid)
                touched[ev.client] = None
        expected = []
        for client in touched:
            released = self.release(client)
            if released:
                detected = sum(len(r.lines) for r in released)
                answers = [(r.request_id, r.lines, r.finished_line) for r in released]
                expected.append((client, answers, detected, detected == 0))
        got_finished: list[int] = []
        if self.as_bytes and not any("\r" in line or "\n" in line for line in lines):
            # The balancer's read: bytes, checked for the plain-finished shape first (on_reply).
            data = "".join(f"{line}\n" for line in lines).encode("utf-8")
            answered, got_drops = self.c.on_reply(self.key(conn), data, got_finished) if data else ([], [])
        else:
            answered, got_drops = self.c.on_lines(self.key(conn), lines, got_finished)
        assert got_drops == drops
        assert got_finished == finished
        assert [(run.client, run.answers, run.detections, run.plain) for run in answered] == expected

    def write(self, node: Node, rid: int, everything: bool = False) -> None:
        work = node.inflight[rid]
        while work:
            self.network[node.conn].append(work.popleft())
            if not everything:
                break
        if not work:
            del node.inflight[rid]

    def dispatch_to(self, rids: list[int], node: Node, batch: bool) -> None:
        key = self.key(node.conn)
        if batch:
            out: list[str] = []
            assert self.c.dispatch_many(rids, key, out) == [rid for rid in rids if self.c.is_pending(rid)]
        else:
            out = [send(self.c, rid, key) for rid in rids]  # one at a time
        for tagged in out:
            ev = self.events[int(tagged.partition(" ")[0])]
            assert tagged == f"{ev.rid} {ev.text}"
            assert ev.live and not ev.finished
            ev.owner = key
            node.inflight[ev.rid] = deque(node_lines(tagged))

    def recover_node(self, node: Node) -> None:
        if not self.per_connection:
            del self.network[node.conn]  # the balancer aborted it: nothing more arrives on it
        node.epoch += 1
        node.up = True
        self.network[node.conn] = deque()

    def replayable(self) -> list[tuple[Conn, str]]:
        """Arrived lines that may arrive again, and must then be dropped.

        Not the detections of an answer in progress on the same connection: the Correlator cannot tell a
        duplicated detection from a node's next one (TCP does not duplicate; a node repeating itself in
        the middle of an answer is its own business, and only its own client sees it).
        """
        return [
            (conn, line)
            for conn, line in self.delivered
            if conn in self.network and not ((rid := line_id(line)) is not None and self.in_progress(rid, conn))
        ]

    # -- rules ----------------------------------------------------------------------------------------
    # Choices are small integers, or bytes, taken modulo the options: one draw each, so the 200 runs stay
    # fast, and they still shrink toward the first option.

    @rule(client=st.integers(0, 2), events=st.binary(min_size=1, max_size=3))
    def submit(self, client: int, events: bytes) -> None:
        """A client sends one event (``submit``) or a batch (``submit_many``): one byte each, k = byte % 4."""
        ks = [byte % 4 for byte in events]
        name = sorted(self.order)[client % len(self.order)]
        texts = [f"e{self.serial + i}:{k}" for i, k in enumerate(ks)]
        rids = [self.c.submit(name, texts[0])] if len(ks) == 1 else list(self.c.submit_many(name, texts))
        assert rids == list(range(self.last_id + 1, self.last_id + 1 + len(ks)))
        for rid, text, k in zip(rids, texts, ks, strict=True):
            self.events[rid] = Ev(rid, name, self.session[name], text, detections(f"e{self.serial}", k))
            self.order[name].append(rid)
            self.serial += 1
        self.last_id = rids[-1]

    @precondition(lambda self: bool(self.model_unowned()) and bool(self.up_nodes()))
    @rule(
        picks=st.binary(min_size=1, max_size=4), node=st.integers(0, 2), batch=st.booleans(), stale=st.integers(0, 63)
    )
    def dispatch(self, picks: bytes, node: int, batch: bool, stale: int) -> None:
        """Events waiting for an instance (new or handed back) go to an UP node.

        ``dispatch_many`` is also handed an id that is no longer pending (the balancer's backlog may hold
        ids of clients that left), which it must skip.
        """
        unowned = self.c.unowned()
        rids = sorted({unowned[p % len(unowned)] for p in picks})
        if batch and self.events:
            gone = [rid for rid, ev in self.events.items() if not ev.live]
            if gone:
                rids.insert(stale % (len(rids) + 1), gone[stale % len(gone)])
        up = self.up_nodes()
        self.dispatch_to(rids, up[node % len(up)], batch)

    @precondition(lambda self: self.local < 2 and bool(self.model_unowned()))
    @rule(pick=st.integers(0, 63))
    def finish_local(self, pick: int) -> None:
        """The balancer answers an event itself (too large for any node): no detections."""
        unowned = self.c.unowned()
        ev = self.events[unowned[pick % len(unowned)]]
        ev.expected = ()
        ev.finished = True
        assert releases(self.c.finish_local_runs(ev.rid)) == self.release(ev.client)
        self.local += 1

    @precondition(lambda self: any(self.network.values()) or any(n.inflight for n in self.nodes))
    @rule(steps=st.binary(min_size=1, max_size=8))
    def progress(self, steps: bytes) -> None:
        """Nodes write lines and lines arrive, in any interleaving.

        A node writes the next line of any of its events (answers to different events interleave); the
        next line of any connection arrives (one connection's lines arrive in order, as over TCP; lines
        of different connections, dead ones included, arrive in any order and after any delay).
        """
        for step in steps:
            write, pick = step & 1, step >> 1
            writable = [(n, rid) for n in self.nodes for rid in sorted(n.inflight)]
            readable = sorted(conn for conn, queue in self.network.items() if queue)
            if writable and (write or not readable):
                node, rid = writable[pick % len(writable)]
                self.write(node, rid)
            elif readable:
                conn = readable[pick % len(readable)]
                self.arrive(conn, self.network[conn].popleft())

    @precondition(lambda self: any(n.inflight for n in self.nodes))
    @rule(pick=st.integers(0, 63))
    def burst(self, pick: int) -> None:
        """A node writes every remaining line of one of its events at once."""
        writable = [(n, rid) for n in self.nodes for rid in sorted(n.inflight)]
        node, rid = writable[pick % len(writable)]
        self.write(node, rid, everything=True)

    @precondition(lambda self: any(self.network.values()))
    @rule(conn=st.integers(0, 15))
    def flush(self, conn: int) -> None:
        """Every line waiting on one connection arrives in one read."""
        readable = sorted(c for c, queue in self.network.items() if queue)
        self.arrive_all(readable[conn % len(readable)])

    @precondition(lambda self: self.failures < 4 and bool(self.up_nodes()))
    @rule(node=st.integers(0, 2), written=st.integers(0, 4), arrived=st.integers(0, 4))
    def fail(self, node: int, written: int, arrived: int) -> None:
        """A node fails: its unfinished events come back; it forgets its work; its written lines may still arrive.

        Just before, it writes ``written`` more lines and ``arrived`` of its lines arrive, so that it often
        fails in the middle of an answer, with part of it buffered and part of it still in the network.
        """
        up = self.up_nodes()
        failed = up[node % len(up)]
        for _ in range(written):
            if failed.inflight:
                self.write(failed, min(failed.inflight))
        queue = self.network[failed.conn]
        for _ in range(min(arrived, len(queue))):
            self.arrive(failed.conn, queue.popleft())
        key = self.key(failed.conn)
        expected = [rid for rid in self.live_ids() if self.events[rid].owner == key]
        assert all(not self.events[rid].finished for rid in expected)
        assert self.c.instance_lost(key) == expected
        assert self.c.instance_lost(key) == []
        for rid in expected:
            self.events[rid].owner = None
        failed.up = False
        failed.inflight.clear()
        self.failures += 1

    @precondition(lambda self: len(self.up_nodes()) < len(self.nodes))
    @rule(node=st.integers(0, 2))
    def recover(self, node: int) -> None:
        """A failed node comes back on a new connection."""
        down = [n for n in self.nodes if not n.up]
        self.recover_node(down[node % len(down)])

    @rule(kind=st.integers(0, 2), conn=st.integers(0, 15), pick=st.integers(0, 255), rest=st.integers(0, 3))
    def noise(self, kind: int, conn: int, pick: int, rest: int) -> None:
        """A line that must be dropped arrives.

        0: a line that arrived before arrives again (a retrying or misbehaving node);
        1: a connection, live or dead, writes a line for an id it is not answering (forged, another
           instance's, retired, never issued);
        2: a connection writes a line without an id.
        """
        replayable = self.replayable()
        conns = sorted(self.network)
        chosen = conns[conn % len(conns)]
        if kind == 0 and replayable:
            chosen, line = replayable[pick % len(replayable)]
        elif kind < 2:
            ids = range(max(0, self.last_id - len(self.events) - 2), self.last_id + 3)
            candidates = [rid for rid in ids if not self.in_progress(rid, chosen)]
            line = f"{candidates[pick % len(candidates)]} {FORGED_RESTS[rest]}"
        else:
            line = MISBEHAVING_NO_ID[pick % len(MISBEHAVING_NO_ID)]
        dropped = sum(self.expected_dropped.values())
        self.arrive(chosen, line)
        assert sum(self.expected_dropped.values()) == dropped + 1

    @precondition(lambda self: self.disconnects < 3 and any(self.order.values()))
    @rule(client=st.integers(0, 2))
    def disconnect(self, client: int) -> None:
        """A client leaves with events out; the same client key comes back at once as a new session."""
        busy = sorted(c for c, ids in self.order.items() if ids)
        name = busy[client % len(busy)]
        expected = [(rid, self.events[rid].owner) for rid in self.order[name]]
        assert self.c.client_gone(name) == expected
        assert self.c.client_gone(name) == []
        for rid in self.order[name]:
            self.events[rid].gone = True
        self.order[name] = []
        self.session[name] += 1
        self.disconnects += 1

    # -- invariants -----------------------------------------------------------------------------------

    @invariant()
    def bookkeeping_matches_the_model(self) -> None:
        live = self.live_ids()
        assert self.c.pending == len(live)
        assert self.c.unowned() == self.model_unowned()
        for node in self.nodes:
            key = self.key(node.conn)
            assert self.c.owned_by(key) == sum(1 for rid in live if self.events[rid].owner == key)
        for rid in live:
            assert self.c.owner(rid) == self.events[rid].owner
        assert self.c.dropped == self.expected_dropped
        assert all(ev.released <= 1 for ev in self.events.values())
        for client, ids in self.order.items():
            assert ids == sorted(ids)
            assert all(self.events[rid].client == client and self.events[rid].live for rid in ids)

    def teardown(self) -> None:
        """Drive everything to completion, then check that every event was answered exactly once."""
        if sys.exc_info()[0] is not None or not self.nodes:
            return  # a rule already failed: report that, not a consequence of it
        for node in self.nodes:
            if not node.up:
                self.recover_node(node)
        rounds = 0
        while self.c.unowned() or any(self.network.values()) or any(n.inflight for n in self.nodes):
            rounds += 1
            assert rounds < 100
            for i, rid in enumerate(self.c.unowned()):
                self.dispatch_to([rid], self.nodes[i % len(self.nodes)], batch=bool(i % 2))
            for node in self.nodes:
                for rid in sorted(node.inflight):
                    self.write(node, rid, everything=True)
            for conn in sorted(self.network):
                self.arrive_all(conn)
        assert self.c.pending == 0
        for ev in self.events.values():
            assert ev.released == (0 if ev.gone else 1), ev
        for conn, line in self.replayable():  # now every line that ever arrived is stale
            self.arrive(conn, line)
        assert self.c.pending == 0
        assert self.c.dropped == self.expected_dropped


CorrelationMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
test_Correlator_exactly_once_under_any_interleaving = CorrelationMachine.TestCase


def test_Correlator_an_event_taken_for_being_overdue_is_marked_through_redispatch() -> None:
    """The balancer re-sends an event for being overdue once: the mark survives ownership changes, and an
    event re-sent for any other reason (its instance lost) is not marked."""
    c = Correlator()
    slow, lost = c.submit("client", "a"), c.submit("client", "b")
    c.dispatch_many([slow, lost], "i1", [])
    assert not c.was_overdue(slow) and not c.was_overdue(lost)
    c.mark_overdue([slow])
    assert c.instance_lost("i1") == [slow, lost]
    c.dispatch_many([slow, lost], "i2", [])
    assert c.was_overdue(slow) and not c.was_overdue(lost)
    assert not c.was_overdue(12345)  # unknown ids: never marked


def test_Correlator_a_lane_lost_while_its_sibling_lives_hands_back_only_its_own_events() -> None:
    """Lanes (several connections to one node) are owners like instances: ``host:port#k``.  A lost lane hands
    back only its unfinished events; its late lines are refused; the sibling lane's events and answers are
    untouched; the events handed back and answered by the sibling are released once, complete, in order."""
    c = Correlator()
    lane0, lane1 = "127.0.0.1:1#0", "127.0.0.1:1#1"
    ids = [c.submit("siem", f"ev{i}") for i in range(6)]
    c.dispatch_many(ids[0::2], lane0, [])
    c.dispatch_many(ids[1::2], lane1, [])
    assert feed(c, lane1, [f"{ids[1]} hit1", f"{ids[1]} {FINISHED}"]) == []  # answered, waits for ids[0]
    assert on_line(c, lane1, f"{ids[3]} partial") == []  # part of an answer, then the lane dies
    assert on_line(c, lane0, f"{ids[2]} hit2") == []
    assert c.instance_lost(lane1) == [ids[3], ids[5]]
    assert c.owned_by(lane0) == 3 and c.owned_by(lane1) == 0
    assert on_line(c, lane1, f"{ids[3]} {FINISHED}") is Drop.NOT_OWNER  # still in its socket buffer
    c.dispatch_many([ids[3], ids[5]], lane0, [])
    released = feed(c, lane0, [f"{rid} {FINISHED}" for rid in (ids[0], ids[2], ids[3], ids[4])])
    released += feed(c, lane0, [f"{ids[5]} hit5", f"{ids[5]} {FINISHED}"])
    assert [(r.request_id, r.lines) for r in released] == [
        (ids[0], ()),
        (ids[1], ("hit1",)),
        (ids[2], ("hit2",)),
        (ids[3], ()),  # lane 1's partial line is gone with it: lane 0's whole answer only
        (ids[4], ()),
        (ids[5], ("hit5",)),
    ]
    assert c.pending == 0 and c.dropped[Drop.NOT_OWNER] == 1


# -- on_reply: the balancer's read, bytes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param("{a} LookupFinished\n{b} LookupFinished\n", id="plain"),
        pytest.param("{a} LookupFinished\r\n{b} LookupFinished\r\n", id="crlf"),
        pytest.param("{a} category=x\n{a} LookupFinished\n{b} LookupFinished\n", id="detection"),
        pytest.param("\n{a} LookupFinished\n\n{b} LookupFinished\n", id="empty-lines"),
        pytest.param("{a} LookupFinished\n{b} LookupFinished error=x\n", id="error-finished"),
        pytest.param("{a} LookupFinished\n99999 LookupFinished\n{b} LookupFinished\n", id="unknown-id"),
        pytest.param("{a} LookupFinished\nLookupFinished\n{b} LookupFinished\n", id="no-id"),
        pytest.param("{a} LookupFinished\n{a} LookupFinished\n{b} LookupFinished\n", id="twice"),
        pytest.param("0{a} LookupFinished\n{b} LookupFinished\n", id="leading-zero"),
    ],
)
def test_on_reply_gives_what_on_lines_gives_for_the_same_lines(shape: str) -> None:
    results = []
    for via_bytes in (True, False):
        c = Correlator()
        a, b = c.submit("client", "e1"), c.submit("client", "e2")
        c.dispatch_many([a, b], "n1", [])
        text = shape.format(a=a, b=b)
        finished: list[int] = []
        if via_bytes:
            answered, drops = c.on_reply("n1", text.encode(), finished)
        else:
            answered, drops = c.on_lines("n1", text[:-1].replace("\r", "").split("\n"), finished)
        results.append((answered, drops, finished, c.pending, dict(c.dropped)))
    assert results[0] == results[1]


def test_on_reply_plain_read_releases_in_order_and_refuses_foreign_ids() -> None:
    c = Correlator()
    ids = [c.submit("client", f"e{n}") for n in range(5)]
    c.dispatch_many(ids[:3], "n1", [])
    c.dispatch_many(ids[3:], "n2", [])
    finished: list[int] = []
    data = b"".join(b"%d LookupFinished\n" % rid for rid in reversed(ids))
    answered, drops = c.on_reply("n1", data, finished)
    assert finished == list(reversed(ids[:3])) and drops == [Drop.NOT_OWNER, Drop.NOT_OWNER]
    assert [(run.client, [rid for rid, _, _ in run.answers], run.plain) for run in answered] == [
        ("client", ids[:3], True)
    ]
