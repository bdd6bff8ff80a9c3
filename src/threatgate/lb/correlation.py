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
from collections.abc import Callable, Hashable, Iterable
from itertools import repeat, starmap, takewhile
from typing import NamedTuple

FINISHED = "LookupFinished"
FINISHED_SPACE = FINISHED + " "
_FINISHED_TAIL = b" " + FINISHED.encode() + b"\n"
_PLAIN_READ = re.compile(rb"(?:[0-9]{1,19} " + FINISHED.encode() + rb"\n)+")
"""A read of nothing but ``<id> LookupFinished`` lines: what a node answers for events without detections."""


def finished_ids_reference(data: bytes) -> list[int] | None:
    """The request ids of a read made only of ``<id> LookupFinished`` lines, in order; None for any other read.

    The definition of the compiled scanner (``lb/_scan.c``, used when built): tests/lb/test_scan.py runs both
    over the same inputs.
    """
    if _PLAIN_READ.fullmatch(data):
        return list(map(int, data.split(_FINISHED_TAIL)[:-1]))
    return None


def tag_lines_reference(request_ids: list[int], events: dict[int, str]) -> bytes:
    """``<id> <event>`` LF for each id, as UTF-8 (what cannot be encoded replaced): the definition of the compiled
    ``tag_lines``, which answers None instead of replacing (then this one is used)."""
    return "".join([f"{rid} {events[rid]}\n" for rid in request_ids]).encode("utf-8", "replace")


try:
    from threatgate.lb._scan import finished_ids, tag_lines
except ImportError:  # pragma: no cover - not built (an sdist without a compiler): the references, same results
    finished_ids = finished_ids_reference
    tag_lines = tag_lines_reference

consume: Callable[[Iterable[object]], None] = deque[object](maxlen=0).extend
"""Run an iterator to its end in C (``consume(map(d.__delitem__, keys))``): a batch of dict updates without
Python code per item."""


class Drop(enum.Enum):
    """Why a node's line was not delivered."""

    NO_ID = "no_id"  # the line does not start with "<digits> "
    UNKNOWN_ID = "unknown_id"  # never issued, already retired, or its client is gone
    NOT_OWNER = "not_owner"  # the id belongs to another instance (or to nobody right now)


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
    """Request ids and the state of every event between submission and release.

    The state is kept column by column, one dict per field keyed by request id (the event's client,
    its text, its owner, its buffered detection lines, its finished line), not as one object per
    event: the balancer's hot path then works a read at a time with dict and list methods that loop in
    C (``dict.fromkeys``/``update`` to hand a batch to an owner, ``map`` over a read's ids to check and
    clear their owners, ``takewhile`` to find the released prefix), instead of Python code per event.
    Sparse columns (lines, finished, overdue) hold only the events that have one.
    """

    def __init__(self, first_id: int = 1) -> None:
        self._next_id = first_id
        self._client: dict[int, Hashable] = {}  # every pending id, in submission order -> its client
        self._event: dict[int, str] = {}  # pending id -> the event text (to send, and to send again)
        self._owner: dict[int, Hashable] = {}  # id -> the instance answering it now (unfinished, dispatched)
        self._lines: dict[int, list[str]] = {}  # id -> detection lines of its current owner so far
        self._finished: dict[int, str] = {}  # id -> its finished line, answered and waiting for an earlier one
        self._overdue: set[int] = set()  # taken from an instance that was too slow to answer it (re-sent once)
        self._order: dict[Hashable, deque[int]] = {}  # client -> its ids in submission order
        self.dropped: dict[Drop, int] = dict.fromkeys(Drop, 0)

    def __repr__(self) -> str:
        return f"<Correlator pending={len(self._client)} owned={len(self._owner)} clients={len(self._order)}>"

    @property
    def pending(self) -> int:
        """Events submitted and not yet released (or abandoned)."""
        return len(self._client)

    @property
    def next_id(self) -> int:
        """The request id the next submitted event gets (ids only grow: a lower one is older)."""
        return self._next_id

    def compact(self) -> None:
        """Rebuild the tables at their current size.

        A dict never shrinks when keys are deleted: after a burst of 100,000 pending events its table
        keeps the burst's size; rebuilding gives that memory back.  Same content, same order.
        """
        self._client = dict(self._client)
        self._event = dict(self._event)
        self._owner = dict(self._owner)
        self._lines = dict(self._lines)
        self._finished = dict(self._finished)
        self._overdue = set(self._overdue)
        self._order = {client: deque(ids) for client, ids in self._order.items()}

    def owned_by(self, instance: Hashable) -> int:
        return list(self._owner.values()).count(instance)

    # -- client side ---------------------------------------------------------------------------

    def submit(self, client: Hashable, event: str) -> int:
        """Register an event of ``client``; returns its new request id (not yet dispatched)."""
        request_id = self._next_id
        self._next_id += 1
        self._client[request_id] = client
        self._event[request_id] = event
        self._order.setdefault(client, deque()).append(request_id)
        return request_id

    def submit_many(self, client: Hashable, events: list[str]) -> range:
        """:meth:`submit` for a batch: the new ids are consecutive, returned as a range."""
        first = self._next_id
        self._next_id = first + len(events)
        ids = range(first, self._next_id)
        self._client.update(dict.fromkeys(ids, client))
        self._event.update(zip(ids, events, strict=True))
        order = self._order.get(client)
        if order is None:
            order = self._order[client] = deque()
        order.extend(ids)
        return ids

    def client_gone(self, client: Hashable) -> list[tuple[int, Hashable | None]]:
        """Forget every event of ``client``; returns (id, owner) of those still out at a node."""
        ids = self._order.pop(client, deque())
        out = []
        owner = self._owner
        for request_id in ids:
            if request_id not in self._client:
                continue
            del self._client[request_id]
            del self._event[request_id]
            self._lines.pop(request_id, None)
            self._finished.pop(request_id, None)
            self._overdue.discard(request_id)
            out.append((request_id, owner.pop(request_id, None)))
        return out

    # -- instance side -------------------------------------------------------------------------

    def dispatch_many(self, request_ids: list[int], instance: Hashable, out: list[str]) -> list[int]:
        """Record that ``instance`` now owns these ids (it is about to receive them); appends each
        tagged line (``<id> <event>``, no line terminator) to ``out``.

        The new owner answers the whole event, so lines buffered from a previous owner are discarded.
        Ids that are no longer pending (their client left) or already answered (finished, waiting for
        an earlier event of their client) are skipped.  Returns the ids dispatched.
        """
        request_ids = self._take(request_ids, instance)
        event = self._event
        out.extend([f"{rid} {event[rid]}" for rid in request_ids])
        return request_ids

    def dispatch_encoded(self, request_ids: list[int], instance: Hashable) -> tuple[list[int], bytes]:
        """:meth:`dispatch_many` for the wire: the ids dispatched, and their tagged lines as one UTF-8 buffer
        (each line ending with LF; what cannot be encoded is replaced, as a node would read it)."""
        request_ids = self._take(request_ids, instance)
        if not request_ids:
            return request_ids, b""
        data = tag_lines(request_ids, self._event)
        return request_ids, data if data is not None else tag_lines_reference(request_ids, self._event)

    def _take(self, request_ids: list[int], instance: Hashable) -> list[int]:
        """The ids of ``request_ids`` that may be dispatched, now owned by ``instance``."""
        event = self._event
        finished = self._finished
        if not all(map(event.__contains__, request_ids)) or (finished and not finished.keys().isdisjoint(request_ids)):
            request_ids = [rid for rid in request_ids if rid in event and rid not in finished]
        self._owner.update(dict.fromkeys(request_ids, instance))
        lines = self._lines
        if lines:
            for rid in lines.keys() & request_ids:
                del lines[rid]
        return request_ids

    def mark_overdue(self, request_ids: list[int]) -> None:
        """These events were taken from an instance for being overdue (see :meth:`was_overdue`)."""
        self._overdue.update(rid for rid in request_ids if rid in self._client)

    def was_overdue(self, request_id: int) -> bool:
        """Whether ``request_id`` was already taken from an instance for being overdue: a second time
        would rather mean the event itself is slow everywhere."""
        return request_id in self._overdue

    def is_pending(self, request_id: int) -> bool:
        return request_id in self._client

    def owner(self, request_id: int) -> Hashable | None:
        """The instance answering ``request_id`` now (None once finished, handed back or released)."""
        return self._owner.get(request_id)

    def on_reply(self, instance: Hashable, data: bytes, finished: list[int]) -> tuple[list[Answered], list[Drop]]:
        """Reply bytes from ``instance``: whole lines, each ending with LF (``\\r`` before it is ignored).

        The common read, nothing but ``<id> LookupFinished`` lines of events this instance owns, is
        checked and applied with regex, bytes, dict and list methods (C) instead of line by line;
        anything else goes through :meth:`on_lines`.  Same result either way.
        """
        ids = finished_ids(data)
        if ids is not None:
            owner = self._owner
            if list(map(owner.get, ids)).count(instance) == len(ids) and len(set(ids)) == len(ids):
                consume(map(owner.__delitem__, ids))
                self._finished.update(dict.fromkeys(ids, FINISHED))
                finished += ids
                # With one client (one SIEM connection: the common case) it is the one touched.
                order = self._order
                touched = dict.fromkeys(order) if len(order) == 1 else dict.fromkeys(map(self._client.__getitem__, ids))
                return self._release(touched), []
        return self.on_lines(instance, data[:-1].decode("utf-8", "replace").replace("\r", "").split("\n"), finished)

    def on_lines(self, instance: Hashable, lines: list[str], finished: list[int]) -> tuple[list[Answered], list[Drop]]:
        """Reply lines from ``instance`` (no line terminators), one call per read.

        Empty lines are skipped.  Appends to ``finished`` the ids whose LookupFinished from ``instance``
        was accepted (the caller's count of what the instance still owes).  Returns the releases and
        the drops.
        """
        owner = self._owner
        client_of = self._client
        buffered = self._lines
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
            if request_id not in client_of:
                drops.append(self._drop(Drop.UNKNOWN_ID))
                continue
            if owner.get(request_id) != instance:
                drops.append(self._drop(Drop.NOT_OWNER))
                continue
            rest = line[space + 1 :]
            if rest == FINISHED or rest.startswith(FINISHED_SPACE):
                self._finished[request_id] = rest
                del owner[request_id]
                finished.append(request_id)
                touched[client_of[request_id]] = None
            elif (found := buffered.get(request_id)) is None:
                buffered[request_id] = [rest]
            else:
                found.append(rest)
        return self._release(touched), drops

    def instance_lost(self, instance: Hashable) -> list[int]:
        """``instance`` failed: its unfinished events, in submission order, to dispatch again.

        Their buffered lines are discarded (the next owner answers the whole event again).
        """
        owner = self._owner
        lost = sorted(rid for rid, o in owner.items() if o == instance)
        for request_id in lost:
            del owner[request_id]
            self._lines.pop(request_id, None)
        return lost

    def unowned(self) -> list[int]:
        """Events submitted but owned by nobody (not dispatched, or handed back), oldest first."""
        return [rid for rid in self._client if rid not in self._owner and rid not in self._finished]

    def finish_local_runs(self, request_id: int, finished_line: str = FINISHED) -> list[Answered]:
        """Complete an event without a node (e.g. too large to forward): no detections, in order."""
        client = self._client[request_id]
        self._owner.pop(request_id, None)
        self._lines.pop(request_id, None)
        self._finished[request_id] = finished_line
        return self._release({client: None})

    # -- internals -----------------------------------------------------------------------------

    def _drop(self, why: Drop) -> Drop:
        self.dropped[why] += 1
        return why

    def _release(self, clients: dict[Hashable, None]) -> list[Answered]:
        answered = []
        for client in clients:
            run = self._release_run(client)
            if run is not None:
                answered.append(run)
        return answered

    def _release_run(self, client: Hashable) -> Answered | None:
        """Release the answered prefix of ``client``'s events, as one run."""
        order = self._order.get(client)
        if not order:
            return None
        finished = self._finished
        count = len(list(takewhile(finished.__contains__, order)))
        if not count:
            return None
        ids = list(starmap(order.popleft, repeat((), count)))
        finished_lines = list(map(finished.pop, ids))
        consume(map(self._client.__delitem__, ids))
        consume(map(self._event.__delitem__, ids))
        overdue = self._overdue
        if overdue:
            overdue.difference_update(ids)
        buffered = self._lines
        if finished_lines.count(FINISHED) == count and (not buffered or buffered.keys().isdisjoint(ids)):
            return Answered(client, list(zip(ids, repeat(()), finished_lines)), 0, True)  # noqa: B905 - repeat
        answers: list[tuple[int, tuple[str, ...], str]] = []
        detections = 0
        for request_id, finished_line in zip(ids, finished_lines, strict=True):
            lines = buffered.pop(request_id, None)
            if lines:
                detections += len(lines)
                answers.append((request_id, tuple(lines), finished_line))
            else:
                answers.append((request_id, (), finished_line))
        return Answered(client, answers, detections, False)
