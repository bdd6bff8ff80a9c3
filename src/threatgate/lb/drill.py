"""The failover drill's decisions, sans-IO: canaries, the exactly-once check, the plan, the table.

``threatgate drill`` (the edge: :mod:`threatgate.balancer.drill`) automates the seed's manual check
("take one server down and check it still works") under live traffic.  Everything it decides is here,
on plain inputs and a ``now`` it is given:

* :func:`parse_canaries`: the ``--canary`` file (JSON lines), or :func:`from_config` (``<Drill>``);
* :class:`ReplyChecker`: the canary stream's answers, event by event: each event answered exactly
  once, in order, with the expected detections, and the longest stall between answers;
* :func:`refusal`: whether an instance may be taken out now (never the last UP one);
* :class:`StepResult`, :func:`render` and :func:`as_json`: the table.

Answers through the balancer carry no request id: the n-th ``LookupFinished`` closes the n-th event
sent.  A lost or repeated answer therefore shows as an event answered with another canary's detections
(so a canary set should mix events that detect and events that do not), as an answer with no event
left to close (a duplicate) or as an event never answered (a loss).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from threatgate.config.balancer import MAX_CANARIES, MAX_CANARY_EVENT, CanarySettings
from threatgate.errors import DrillError
from threatgate.lb.correlation import FINISHED


@dataclass(frozen=True, slots=True)
class Canary:
    """A test event and the detections its answer must carry (each a text one detection line contains)."""

    event: str
    expect: tuple[str, ...]
    origin: str  # where it was written: "file:line"


def parse_canaries(text: str, name: str) -> list[Canary]:
    """A ``--canary`` file: one JSON object per line, ``{"event": "...", "expect": ["Category", ...]}``.

    Blank lines and lines starting with ``#`` are skipped.  ``expect`` is a list of texts, one per
    detection line the answer must have (usually the category); ``[]``: no detection.

    Raises:
        DrillError: with ``name:line``: not JSON, a missing or wrong field, no canary at all.
    """
    out: list[Canary] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{name}:{number}"
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise DrillError(f"{where}: not a JSON object: {exc}") from None
        if not isinstance(item, dict) or set(item) != {"event", "expect"}:
            raise DrillError(f'{where}: expected {{"event": "...", "expect": ["...", ...]}}')
        event, expect = item["event"], item["expect"]
        if not isinstance(event, str) or not event or "\n" in event or "\r" in event:
            raise DrillError(f"{where}: event must be one line of text, not empty")
        if len(event.encode()) > MAX_CANARY_EVENT:
            raise DrillError(f"{where}: event longer than {MAX_CANARY_EVENT} bytes")
        if not isinstance(expect, list) or not all(isinstance(e, str) and e for e in expect):
            raise DrillError(f"{where}: expect must be a list of non-empty texts ([] for no detection)")
        out.append(Canary(event, tuple(expect), where))
        if len(out) > MAX_CANARIES:
            raise DrillError(f"{where}: more than {MAX_CANARIES} canaries")
    if not out:
        raise DrillError(f"{name}: no canary in the file")
    return out


def from_config(path: str, canaries: Iterable[CanarySettings]) -> list[Canary]:
    """The ``<Drill><Canary>`` elements of a balancer config."""
    return [Canary(c.event, c.expect, f"{path}:{c.line}") for c in canaries]


def mismatch(expect: Sequence[str], detections: Sequence[str]) -> str | None:
    """Why ``detections`` (an answer's lines) are not what ``expect`` asks for; None when they are.

    One detection line per expected text, each containing it (longest texts placed first, so a text
    that is part of another cannot take its line).
    """
    if len(detections) != len(expect):
        return None if not expect and not detections else _wanted(expect, detections)
    left = list(detections)
    for text in sorted(expect, key=len, reverse=True):
        found = next((i for i, d in enumerate(left) if text in d), None)
        if found is None:
            return _wanted(expect, detections)
        del left[found]
    return None


def _wanted(expect: Sequence[str], detections: Sequence[str]) -> str:
    want = ", ".join(expect) if expect else "no detection"
    got = "; ".join(d[:120] for d in detections[:3]) + (" ..." if len(detections) > 3 else "")
    return f"expected {want}, got {len(detections)} detection(s){': ' + got if detections else ''}"


@dataclass(slots=True)
class _Sent:
    seq: int
    canary: Canary
    at: float


class ReplyChecker:
    """The canary connection's answers, checked as they come: exactly once, in order, as expected.

    Feed it every event sent (:meth:`sent`) and every reply line (:meth:`line`), each with ``now``.
    :attr:`problems` lists what went wrong; :meth:`step` starts a new window for the per-step
    figures (the longest stall, the problems seen since).
    """

    MAX_PROBLEMS = 100
    """Problems kept (a broken stream would otherwise make one per event); the rest are counted."""

    def __init__(self) -> None:
        self._pending: collections.deque[_Sent] = collections.deque()
        self._detections: list[str] = []
        self.sent_count = 0
        self.answered = 0
        self.failed = 0  # answered, but not as expected (or with an error finished line)
        self.extra = 0  # answers with no event left to close: duplicates
        self.problems: list[str] = []
        self.dropped_problems = 0
        self._last_answer: float | None = None
        self._window_start = 0.0
        self._window_problems = 0
        self.longest_stall = 0.0

    @property
    def unanswered(self) -> int:
        return len(self._pending)

    def sent(self, canary: Canary, now: float) -> int:
        """Record an event just written to the balancer; its sequence number (1, 2, ...)."""
        self.sent_count += 1
        self._pending.append(_Sent(self.sent_count, canary, now))
        return self.sent_count

    def line(self, text: str, now: float) -> None:
        """One reply line (without its newline): a detection, or the ``LookupFinished`` closing an event."""
        if text == FINISHED or text.startswith(FINISHED + " "):
            self._finished(text[len(FINISHED) :].strip(), now)
        elif text:
            self._detections.append(text)

    def _finished(self, error: str, now: float) -> None:
        detections, self._detections = self._detections, []
        if not self._pending:
            self.extra += 1
            self._problem(f"an answer after event #{self.sent_count} with no event left to close (a duplicate)")
            return
        sent = self._pending.popleft()
        self.answered += 1
        since = max(sent.at, self._window_start, self._last_answer if self._last_answer is not None else sent.at)
        self.longest_stall = max(self.longest_stall, now - since)
        self._last_answer = now
        if error:
            self.failed += 1
            self._problem(f"event #{sent.seq} ({sent.canary.origin}) answered with an error: {error}")
            return
        wrong = mismatch(sent.canary.expect, detections)
        if wrong is not None:
            self.failed += 1
            self._problem(f"event #{sent.seq} ({sent.canary.origin}): {wrong}")

    def _problem(self, text: str) -> None:
        if len(self.problems) < self.MAX_PROBLEMS:
            self.problems.append(text)
        else:
            self.dropped_problems += 1

    def stall_now(self, now: float) -> float:
        """The longest stall including the current one (events outstanding, no answer yet)."""
        if not self._pending:
            return self.longest_stall
        oldest = self._pending[0].at
        since = max(oldest, self._window_start, self._last_answer if self._last_answer is not None else oldest)
        return max(self.longest_stall, now - since)

    def step(self, now: float) -> None:
        """Start a new window: :attr:`longest_stall` and :meth:`window_problems` count from ``now``."""
        self._window_start = now
        self.longest_stall = 0.0
        self._window_problems = len(self.problems) + self.dropped_problems

    def window_problems(self) -> list[str]:
        """The problems seen since :meth:`step` (those kept)."""
        return self.problems[self._window_problems :]

    def unanswered_text(self, now: float) -> str | None:
        """What is still unanswered, in an operator's words; None when nothing is."""
        if not self._pending:
            return None
        first = self._pending[0]
        return (
            f"{len(self._pending)} canary event(s) unanswered (the oldest, #{first.seq} "
            f"({first.canary.origin}), sent {now - first.at:.1f} s ago)"
        )


# -- the plan ---------------------------------------------------------------------------------------------------


def row_of(rows: Sequence[Mapping[str, Any]], key: str) -> Mapping[str, Any] | None:
    """The admin socket's ``list`` row of instance ``key``."""
    return next((r for r in rows if r.get("instance") == key), None)


def state_text(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "unknown to the balancer"
    why = row.get("why") or ""
    return f"{row.get('state')}" + (f" ({why})" if why else "")


def refusal(rows: Sequence[Mapping[str, Any]], key: str) -> str | None:
    """Why ``key`` may not be taken out now (the admin socket's ``list`` rows); None when it may.

    Never the last UP instance: the drill proves failover, it must not make an outage.  An instance
    that is not UP before its step cannot be drilled either (there is nothing to fail over from).
    """
    row = row_of(rows, key)
    if row is None:
        known = ", ".join(str(r.get("instance")) for r in rows) or "none"
        return f"the balancer has no instance {key} (instances: {known})"
    if row.get("state") != "UP":
        return f"{key} is {state_text(row)} before its step: it must be UP to be drilled"
    if not any(r.get("state") == "UP" for r in rows if r.get("instance") != key):
        return f"refusing to take out {key}: it is the last UP instance (taking it out would stop the service)"
    return None


def plan(enabled: Sequence[str]) -> list[str]:
    """The instances to drill, in config order.

    Raises:
        ValueError: fewer than two enabled instances: nothing could take over.
    """
    if len(enabled) < 2:
        raise ValueError(f"a failover drill needs at least two enabled instances; the configuration has {len(enabled)}")
    return list(enabled)


# -- results -----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class StepResult:
    """One instance's step: what the table shows."""

    instance: str
    detect: float | None = None  # seconds from taking it out to the balancer showing it out
    resent: int = 0  # redispatched events during the step (every instance's counter, summed)
    stall: float = 0.0  # longest gap between canary answers while events were outstanding
    rest_ok: int = 0
    rest_failed: int = 0
    events: int = 0  # canary events sent during the step
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


COLUMNS = ("INSTANCE", "DETECT", "RESENT", "STALL", "EVENTS", "REST OK/FAILED", "RESULT")


def render(results: Sequence[StepResult]) -> str:
    """The table, then one ``FAIL <instance>: <what>`` line per problem."""
    table = [COLUMNS]
    for r in results:
        table.append(
            (
                r.instance,
                "-" if r.detect is None else f"{r.detect:.2f}s",
                str(r.resent),
                f"{r.stall:.2f}s",
                str(r.events),
                f"{r.rest_ok}/{r.rest_failed}",
                "PASS" if r.ok else "FAIL",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.extend(f"FAIL {r.instance}: {problem}" for r in results for problem in r.problems)
    return "\n".join(lines)


def as_json(results: Sequence[StepResult], problems: Sequence[str] = ()) -> dict[str, Any]:
    """The ``--json`` document: every step, the drill-wide problems, and the verdict."""
    return {
        "ok": all(r.ok for r in results) and not problems,
        "problems": list(problems),
        "instances": [
            {
                "instance": r.instance,
                "ok": r.ok,
                "detect_seconds": None if r.detect is None else round(r.detect, 3),
                "resent": r.resent,
                "longest_stall_seconds": round(r.stall, 3),
                "events": r.events,
                "rest_ok": r.rest_ok,
                "rest_failed": r.rest_failed,
                "problems": list(r.problems),
            }
            for r in results
        ],
    }
