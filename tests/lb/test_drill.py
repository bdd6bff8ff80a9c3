"""The failover drill's decisions (lb/drill.py): canaries, the exactly-once check, the plan, the table."""

from __future__ import annotations

import json

import pytest

from threatgate.config.balancer import CanarySettings
from threatgate.errors import DrillError
from threatgate.lb.drill import (
    Canary,
    ReplyChecker,
    StepResult,
    as_json,
    from_config,
    mismatch,
    parse_canaries,
    plan,
    refusal,
    render,
)

HIT = Canary("url=http://fakess123.nu", ("Malicious_URL",), "c:1")
MISS = Canary("url=http://example.org/", (), "c:2")
DETECTION = "category=Malicious_URL matchedIndicator=http://fakess123.nu confidence=100"


# -- canaries ----------------------------------------------------------------------------------------------------


def test_a_canary_file_is_json_lines_with_comments_and_blank_lines() -> None:
    text = (
        "# the drill's canaries\n\n"
        '{"event": "url=http://fakess123.nu", "expect": ["Malicious_URL"]}\n'
        '  {"event": "url=http://example.org/", "expect": []}\n'
    )
    assert parse_canaries(text, "c.jsonl") == [
        Canary("url=http://fakess123.nu", ("Malicious_URL",), "c.jsonl:3"),
        Canary("url=http://example.org/", (), "c.jsonl:4"),
    ]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("not json", "c:1: not a JSON object"),
        ('{"event": "x"}', 'c:1: expected {"event"'),
        ('{"event": "x", "expect": [], "more": 1}', 'c:1: expected {"event"'),
        ('{"event": "", "expect": []}', "event must be one line"),
        ('{"event": "a\\nb", "expect": []}', "event must be one line"),
        ('{"event": "x", "expect": "Malicious_URL"}', "expect must be a list"),
        ('{"event": "x", "expect": [""]}', "expect must be a list"),
        ('{"event": "' + "x" * 70_000 + '", "expect": []}', "longer than"),
    ],
)
def test_a_bad_canary_line_is_refused_with_its_place(line: str, fragment: str) -> None:
    with pytest.raises(DrillError, match=None) as info:
        parse_canaries(line + "\n", "c")
    assert fragment in str(info.value)


def test_a_canary_file_without_canaries_is_refused() -> None:
    with pytest.raises(DrillError, match="c: no canary in the file"):
        parse_canaries("# nothing\n\n", "c")


def test_canaries_from_the_config_say_where_they_were_written() -> None:
    settings = [CanarySettings(event="url=a", expect=("X", "Y"), line=12)]
    assert from_config("kl_balancer.conf", settings) == [Canary("url=a", ("X", "Y"), "kl_balancer.conf:12")]


@pytest.mark.parametrize(
    ("expect", "detections", "ok"),
    [
        ((), (), True),
        (("Malicious_URL",), (DETECTION,), True),
        (("Malicious_URL",), (), False),
        ((), (DETECTION,), False),
        (("Malicious_URL",), (DETECTION, DETECTION), False),
        (("IP_Reputation",), (DETECTION,), False),
        # The longer text is placed first: "URL" alone must not take the Malicious_URL line.
        (("URL", "Malicious_URL"), ("category=URL x", DETECTION), True),
        (("Malicious_URL", "Malicious_URL"), (DETECTION, DETECTION), True),
    ],
)
def test_an_answer_matches_its_expectation_line_by_line(
    expect: tuple[str, ...], detections: tuple[str, ...], ok: bool
) -> None:
    assert (mismatch(expect, detections) is None) == ok


# -- the exactly-once check ----------------------------------------------------------------------------------------


def feed(checker: ReplyChecker, answers: list[list[str]], start: float = 1.0, gap: float = 0.1) -> None:
    """Each answer's detection lines, then its LookupFinished, ``gap`` seconds apart."""
    now = start
    for lines in answers:
        for line in lines:
            checker.line(line, now)
        checker.line("LookupFinished", now)
        now += gap


def send(checker: ReplyChecker, canaries: list[Canary], at: float = 0.0) -> None:
    for canary in canaries:
        checker.sent(canary, at)


def test_every_event_answered_once_as_expected_is_no_problem() -> None:
    checker = ReplyChecker()
    send(checker, [HIT, MISS, HIT])
    feed(checker, [[DETECTION], [], [DETECTION]])
    assert (checker.answered, checker.unanswered, checker.failed, checker.extra) == (3, 0, 0, 0)
    assert checker.problems == [] and checker.unanswered_text(5.0) is None


def test_a_missing_answer_shows_as_the_next_event_answered_wrongly_and_one_unanswered() -> None:
    checker = ReplyChecker()
    send(checker, [HIT, MISS, HIT, MISS])
    feed(checker, [[DETECTION], [DETECTION], []])  # the answer of event 2 (MISS) is lost
    assert checker.failed == 2 and checker.unanswered == 1
    assert checker.problems[0].startswith("event #2 (c:2): expected no detection, got 1 detection(s): category=")
    assert checker.problems[1].startswith("event #3 (c:1): expected Malicious_URL, got 0 detection(s)")
    assert checker.unanswered_text(10.0) == "1 canary event(s) unanswered (the oldest, #4 (c:2), sent 10.0 s ago)"


def test_a_duplicated_answer_shows_as_an_answer_with_no_event_to_close() -> None:
    checker = ReplyChecker()
    send(checker, [HIT, MISS])
    feed(checker, [[DETECTION], [], []])  # the last answer came twice
    assert checker.extra == 1 and checker.unanswered == 0
    assert checker.problems == ["an answer after event #2 with no event left to close (a duplicate)"]


def test_a_duplicate_in_the_middle_shifts_the_answers_and_shows() -> None:
    checker = ReplyChecker()
    send(checker, [HIT, MISS, HIT])
    feed(checker, [[DETECTION], [DETECTION], [], [DETECTION]])  # event 1's answer twice
    assert checker.failed == 2 and checker.extra == 1


def test_an_error_finished_line_is_a_failure() -> None:
    checker = ReplyChecker()
    send(checker, [MISS])
    checker.line("LookupFinished error=no_instance waited=5s", 1.0)
    assert checker.problems == ["event #1 (c:2) answered with an error: error=no_instance waited=5s"]


def test_the_longest_stall_counts_only_while_events_wait() -> None:
    checker = ReplyChecker()
    checker.step(0.0)
    checker.sent(MISS, 0.0)
    checker.line("LookupFinished", 0.1)
    checker.sent(MISS, 5.0)  # nothing outstanding between 0.1 and 5.0: no stall
    checker.line("LookupFinished", 5.2)
    checker.sent(MISS, 5.3)
    checker.sent(MISS, 5.4)
    checker.line("LookupFinished", 6.3)  # one second with events waiting
    checker.line("LookupFinished", 6.4)
    assert checker.longest_stall == pytest.approx(1.0)
    checker.sent(MISS, 7.0)
    assert checker.stall_now(10.0) == pytest.approx(3.0)  # still waiting counts too
    checker.step(10.0)
    assert checker.longest_stall == 0.0 and checker.stall_now(10.5) == pytest.approx(0.5)


def test_window_problems_are_those_since_the_step() -> None:
    checker = ReplyChecker()
    send(checker, [HIT, HIT])
    feed(checker, [[]])
    checker.step(2.0)
    assert checker.window_problems() == []
    feed(checker, [[]], start=3.0)
    assert len(checker.window_problems()) == 1 and len(checker.problems) == 2


def test_problems_are_bounded_and_the_rest_counted() -> None:
    checker = ReplyChecker()
    feed(checker, [[]] * (ReplyChecker.MAX_PROBLEMS + 5))
    assert len(checker.problems) == ReplyChecker.MAX_PROBLEMS and checker.dropped_problems == 5


# -- the plan --------------------------------------------------------------------------------------------------------


def rows(*states: tuple[str, str]) -> list[dict[str, object]]:
    return [
        {"instance": key, "state": state, "why": "" if state == "UP" else "x", "redispatched": 0}
        for key, state in states
    ]


def test_an_instance_may_go_out_while_another_is_up() -> None:
    assert refusal(rows(("a:1", "UP"), ("b:2", "UP")), "a:1") is None
    assert refusal(rows(("a:1", "UP"), ("b:2", "DOWN"), ("c:3", "UP")), "a:1") is None


def test_the_last_up_instance_is_refused() -> None:
    text = refusal(rows(("a:1", "UP"), ("b:2", "DOWN"), ("c:3", "MAINT")), "a:1")
    assert text == "refusing to take out a:1: it is the last UP instance (taking it out would stop the service)"


def test_an_instance_not_up_before_its_step_is_refused() -> None:
    assert (
        refusal(rows(("a:1", "DOWN"), ("b:2", "UP")), "a:1")
        == "a:1 is DOWN (x) before its step: it must be UP to be drilled"
    )
    assert refusal(rows(("a:1", "UP")), "z:9") == "the balancer has no instance z:9 (instances: a:1)"


def test_the_plan_is_the_enabled_instances_and_needs_two() -> None:
    assert plan(["a:1", "b:2"]) == ["a:1", "b:2"]
    with pytest.raises(ValueError, match="at least two enabled instances; the configuration has 1"):
        plan(["a:1"])


# -- the table -------------------------------------------------------------------------------------------------------


def test_the_table_and_its_fail_lines() -> None:
    results = [
        StepResult("127.0.0.1:10001", detect=0.004, resent=3, stall=0.25, rest_ok=3, events=150),
        StepResult("127.0.0.1:10002", problems=["did not come back UP within 60 s (the balancer shows it DOWN)"]),
    ]
    assert render(results).splitlines() == [
        "INSTANCE         DETECT  RESENT  STALL  EVENTS  REST OK/FAILED  RESULT",
        "127.0.0.1:10001  0.00s   3       0.25s  150     3/0             PASS",
        "127.0.0.1:10002  -       0       0.00s  0       0/0             FAIL",
        "FAIL 127.0.0.1:10002: did not come back UP within 60 s (the balancer shows it DOWN)",
    ]
    doc = as_json(results, ["x"])
    assert json.loads(json.dumps(doc)) == doc
    assert doc["ok"] is False and doc["problems"] == ["x"]
    assert doc["instances"][0] == {
        "instance": "127.0.0.1:10001",
        "ok": True,
        "detect_seconds": 0.004,
        "resent": 3,
        "longest_stall_seconds": 0.25,
        "events": 150,
        "rest_ok": 3,
        "rest_failed": 0,
        "problems": [],
    }
    assert as_json(results[:1])["ok"] is True
