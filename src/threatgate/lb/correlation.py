"""Correlation of events with node replies: request ids, ownership, exactly-once, in-order delivery.

The balancer tags every event it forwards with a numeric request id (``<id> <event>``) and reads
``<id> <detection>`` lines and one ``<id> LookupFinished`` line back (the CyberTrace HA recipe:
the node's EventFormat and FinishedEventFormat start with ``%REQ%``).  This module is the whole
bookkeeping of that exchange; it does no I/O and has no clock.

Invariants:
1. An id is owned by at most one instance at a time.  A line is accepted only from the current
   owner of its id; anything else (an unknown, retired or forged id, another instance's id, a line
   without an id) is dropped and reported, so one node cannot write into another client's stream.
2. An event's detection lines are buffered until its ``LookupFinished``; only then are they
   released.  When an instance is lost, its unfinished events lose their buffered lines and are
   handed back for redispatch, so a partial answer is never shown and a resent event's answer
   is shown once: each event's detections reach its client exactly once.
3. Per client, results are released in the order the events were submitted (the client correlates
   replies by order, exactly as with one node).
4. Memory is bounded by the caller: ``pending`` counts events not yet released.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Hashable
from typing import NamedTuple

FINISHED = "LookupFinished"
FINISHED_SPACE = FINISHED + " "
_FINISHED_TAIL = b" " + FINISHED.encode() + b"\n"
_PLAIN_READ = re.compile(rb"(?:[0-9]{1,19} " + FINISHED.encode() + rb"\n)+")
"""A read of nothing but ``<id> LookupFinished`` lines: what a node answers for events without detections."""


class Drop(enum.Enum):
    """Why a node's line was not delivered."""

    NO_ID = "no_id"  # the line does not start with "<digits> "
    UNKNOWN_ID = "unknown_id"  # never issued, already retired, or its client is gone
    NOT_OWNER = "not_owner"  # the id belongs to another instance (or to nobody right now)


class _Entry:
    """One event between submission and release (a plain slotted class: one is made per event)."""

    __slots__ = ("client", "event", "owner", "lines", "finished_line", "overdue")

    def __init__(self, client: Hashable, event: str) -> None:
        self.client = client
        self.event = event
        self.owner: Hashable | None = None
        self.lines: list[str] | None = None  # detection lines, made only when there are some
        self.finished_line: str | None = None  # set once the owner sent LookupFinished
        self.overdue = False  # taken from an instance that was too slow to answer it (re-sent once for that)


class Answered(NamedTuple):
    """A run of one client's answered events, in order (what :meth:`Correlator.on_lines` returns).

    ``plain``: no detection lines and every finished line is exactly ``LookupFinished`` (the common
    case, which the balancer answers without looking at each event).
    """

    client: Hashable
    answers: list[tuple[int, tuple[str, ...], str]]  # (request id, detection lines, finished line) per event
    detections: int
    plain: bool


def split_id(line: str) -> tuple[int, str] | None:
    """``"<id> rest"`` -> (id, rest); None when the line does not start with digits and a space."""
    space = line.find(" ")
    if space <= 0 or space > 19:
        return None
    head = line[:space]
    if not head.isdigit() or not head.isascii():
        return None
    return int(head), line[space + 1 :]


class Correlator:
    """Request ids and the state of every event between submission and release."""

    def __init__(self, first_id: int = 1) -> None:
        self._next_id = first_id
        self._entries: dict[int, _Entry] = {}
        self._order: dict[Hashable, deque[int]] = {}  # client -> its ids in submission order
        self.dropped: dict[Drop, int] = dict.fromkeys(Drop, 0)

    def __repr__(self) -> str:
        owned = sum(1 for e in self._entries.values() if e.owner is not None)
        return f"<Correlator pending={len(self._entries)} owned={owned} clients={len(self._order)}>"

    @property
    def pending(self) -> int:
        """Events submitted and not yet released (or abandoned)."""
        return len(self._entries)

    @property
    def next_id(self) -> int:
        """The request id the next submitted event gets (ids only grow: a lower one is older)."""
        return self._next_id

    def compact(self) -> None:
        """Rebuild the tables at their current size.

        A dict never shrinks when keys are deleted: after a burst of 100,000 pending events its table
        keeps the burst's size; rebuilding gives that memory back.  Same content, same order.
        """
        self._entries = dict(self._entries)
        self._order = {client: deque(ids) for client, ids in self._order.items()}

    def owned_by(self, instance: Hashable) -> int:
        return sum(1 for e in self._entries.values() if e.owner == instance)

    # -- client side ---------------------------------------------------------------------------

    def submit(self, client: Hashable, event: str) -> int:
        """Register an event of ``client``; returns its new request id (not yet dispatched)."""
        request_id = self._next_id
        self._next_id += 1
        self._entries[request_id] = _Entry(client, event)
        self._order.setdefault(client, deque()).append(request_id)
        return request_id

    def submit_many(self, client: Hashable, events: list[str]) -> range:
        """:meth:`submit` for a batch: the new ids are consecutive, returned as a range."""
        first = self._next_id
        self._next_id = first + len(events)
        ids = range(first, self._next_id)
        self._entries.update(zip(ids, [_Entry(client, e) for e in events], strict=True))
        order = self._order.get(client)
        if order is None:
            order = self._order[client] = deque()
        order.extend(ids)
        return ids

    def client_gone(self, client: Hashable) -> list[tuple[int, Hashable | None]]:
        """Forget every event of ``client``; returns (id, owner) of those still out at a node."""
        ids = self._order.pop(client, deque())
        out = []
        for request_id in ids:
            entry = self._entries.pop(request_id, None)
            if entry is not None:
                out.append((request_id, entry.owner))
        return out

    # -- instance side -------------------------------------------------------------------------

    def dispatch_many(self, request_ids: list[int], instance: Hashable, out: list[str]) -> list[int]:
        """Record that ``instance`` now owns these ids (it is about to receive them); appends each
        tagged line (``<id> <event>``, no line terminator) to ``out``.

        The new owner answers the whole event, so lines buffered from a previous owner are discarded.
        Ids that are no longer pending (their client left) or already answered (finished, waiting for
        an earlier event of their client) are skipped.  Returns the ids dispatched.
        """
        entries = self._entries
        done: list[int] = []
        for request_id in request_ids:
            entry = entries.get(request_id)
            if entry is None or entry.finished_line is not None:
                continue
            entry.owner = instance
            entry.lines = None
            out.append(f"{request_id} {entry.event}")
            done.append(request_id)
        return done

    def mark_overdue(self, request_ids: list[int]) -> None:
        """These events were taken from an instance for being overdue (see :meth:`was_overdue`)."""
        entries = self._entries
        for request_id in request_ids:
            entry = entries.get(request_id)
            if entry is not None:
                entry.overdue = True

    def was_overdue(self, request_id: int) -> bool:
        """Whether ``request_id`` was already taken from an instance for being overdue: a second time
        would rather mean the event itself is slow everywhere."""
        entry = self._entries.get(request_id)
        return entry is not None and entry.overdue

    def is_pending(self, request_id: int) -> bool:
        return request_id in self._entries

    def owner(self, request_id: int) -> Hashable | None:
        """The instance answering ``request_id`` now (None once finished, handed back or released)."""
        entry = self._entries.get(request_id)
        return entry.owner if entry is not None else None

    def on_reply(self, instance: Hashable, data: bytes, finished: list[int]) -> tuple[list[Answered], list[Drop]]:
        """Reply bytes from ``instance``: whole lines, each ending with LF (``\\r`` before it is ignored).

        The common read, nothing but ``<id> LookupFinished`` lines, is checked and split by the regex
        and bytes methods (C) instead of line by line; anything else goes through :meth:`on_lines`.
        Same result either way.
        """
        if _PLAIN_READ.fullmatch(data):
            return self._on_finished(instance, list(map(int, data.split(_FINISHED_TAIL)[:-1])), finished)
        return self.on_lines(instance, data[:-1].decode("utf-8", "replace").replace("\r", "").split("\n"), finished)

    def _on_finished(
        self, instance: Hashable, request_ids: list[int], finished: list[int]
    ) -> tuple[list[Answered], list[Drop]]:
        """:meth:`on_lines` for lines that are all ``<id> LookupFinished``."""
        entries = self._entries
        drops: list[Drop] = []
        touched: dict[Hashable, None] = {}
        for request_id in request_ids:
            entry = entries.get(request_id)
            if entry is None:
                drops.append(self._drop(Drop.UNKNOWN_ID))
            elif entry.owner != instance or entry.finished_line is not None:
                drops.append(self._drop(Drop.NOT_OWNER))
            else:
                entry.finished_line = FINISHED
                entry.owner = None
                finished.append(request_id)
                touched[entry.client] = None
        answered = []
        for client in touched:
            run = self._release_run(client)
            if run is not None:
                answered.append(run)
        return answered, drops

    def on_lines(self, instance: Hashable, lines: list[str], finished: list[int]) -> tuple[list[Answered], list[Drop]]:
        """Reply lines from ``instance`` (no line terminators), the balancer's hot path: one call per read.

        Empty lines are skipped.  Appends to ``finished`` the ids whose LookupFinished from ``instance``
        was accepted (the caller's count of what the instance still owes).  Returns the releases and
        the drops.
        """
        entries = self._entries
        drops: list[Drop] = []
        touched: dict[Hashable, None] = {}
        for line in lines:
            space = line.find(" ")
            head = line[:space] if 0 < space <= 19 else ""
            if not head or not head.isdigit() or not head.isascii():
                if line:
                    drops.append(self._drop(Drop.NO_ID))
                continue
            request_id = int(head)
            entry = entries.get(request_id)
            if entry is None:
                drops.append(self._drop(Drop.UNKNOWN_ID))
                continue
            if entry.owner != instance or entry.finished_line is not None:
                drops.append(self._drop(Drop.NOT_OWNER))
                continue
            rest = line[space + 1 :]
            if rest == FINISHED or rest.startswith(FINISHED_SPACE):
                entry.finished_line = rest
                entry.owner = None
                finished.append(request_id)
                touched[entry.client] = None
            elif entry.lines is None:
                entry.lines = [rest]
            else:
                entry.lines.append(rest)
        answered = []
        for client in touched:
            run = self._release_run(client)
            if run is not None:
                answered.append(run)
        return answered, drops

    def instance_lost(self, instance: Hashable) -> list[int]:
        """``instance`` failed: its unfinished events, in submission order, to dispatch again.

        Their buffered lines are discarded (the next owner answers the whole event again).
        """
        lost = [rid for rid, e in self._entries.items() if e.owner == instance and e.finished_line is None]
        for request_id in lost:
            entry = self._entries[request_id]
            entry.owner = None
            entry.lines = None
        return lost

    def unowned(self) -> list[int]:
        """Events submitted but owned by nobody (not dispatched, or handed back), oldest first."""
        return [rid for rid, e in self._entries.items() if e.owner is None and e.finished_line is None]

    def finish_local_runs(self, request_id: int, finished_line: str = FINISHED) -> list[Answered]:
        """Complete an event without a node (e.g. too large to forward): no detections, in order."""
        entry = self._entries[request_id]
        entry.owner = None
        entry.lines = None
        entry.finished_line = finished_line
        run = self._release_run(entry.client)
        return [run] if run is not None else []

    # -- internals -----------------------------------------------------------------------------

    def _drop(self, why: Drop) -> Drop:
        self.dropped[why] += 1
        return why

    def _release_run(self, client: Hashable) -> Answered | None:
        """Release the answered prefix of ``client``'s events, as one run."""
        order = self._order.get(client)
        entries = self._entries
        answers: list[tuple[int, tuple[str, ...], str]] = []
        detections = 0
        plain = True
        while order:
            head = entries[order[0]]
            finished = head.finished_line
            if finished is None:
                break
            request_id = order.popleft()
            del entries[request_id]
            lines = head.lines
            if lines:
                detections += len(lines)
                plain = False
                answers.append((request_id, tuple(lines), finished))
            else:
                if finished != FINISHED:
                    plain = False
                answers.append((request_id, (), finished))
        if not answers:
            return None
        return Answered(client, answers, detections, plain)
