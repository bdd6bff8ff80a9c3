"""Draining an event port at shutdown: what each connection is still owed, and when to stop waiting.

At SIGTERM a node (a worker process, or the balancer) stops reading its event connections, waits
until what it owes for the events it has already read has left, and closes them.  This module
decides; :meth:`threatgate.net.events.EventListener.drain` measures the connections, acts on the
decisions and waits between two looks.  Pure: no I/O, no clock (the caller passes ``now``).

What a connection is owed (:class:`Owed`), for events it has already read:

* reply bytes still in its transport's write buffer (``buffered``), or in the kernel's send queue
  and not yet acknowledged by the client (``unacked``): a reply counts as delivered once the
  client's TCP stack has it, so closing the socket afterwards cannot lose it;
* a batch of detections held back while the output queue was full (``held``): the node matched
  those events but could not queue their lines yet;
* events read and not answered yet (``outstanding``): the balancer answers once a node replies; a
  node answers synchronously while reading, so its connections always have 0 here.

Bytes a client sent that were never read are not owed anything: they go unanswered, as when a
connection drops (a balancer re-sends its unanswered events elsewhere, exactly once).

Invariants:
1. A connection is closed as soon as it owes nothing (gracefully: FIN after the last reply), not
   when the last one is done, so a client learns early that it must reconnect elsewhere.
2. No connection is waited for past the deadline: at ``now >= deadline`` every connection still
   owed something is cut, and what it was owed is added to the result.
3. Every connection is reported exactly once: ``clean + cut + gone == connections``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

K = TypeVar("K", bound=Hashable)

POLL_INTERVAL = 0.01
"""Seconds between two looks at the connections still owed something (see EventListener.drain)."""


class Owed(NamedTuple):
    """What one connection is still owed for the events it has read."""

    buffered: int = 0  # reply bytes in the transport's write buffer
    unacked: int = 0  # reply bytes in the kernel's send queue, not yet acknowledged by the client
    held: bool = False  # a batch of detections waits for room in the output queue
    outstanding: int = 0  # events read and not yet answered (the balancer's)

    def owing(self) -> bool:
        """True while anything is owed (a connection owing nothing may be closed)."""
        return bool(self.buffered or self.unacked or self.held or self.outstanding)


def remaining(deadline: float, now: float) -> float:
    """Seconds left until ``deadline`` (never negative)."""
    return max(0.0, deadline - now)


class Step(NamedTuple, Generic[K]):
    """What to do after one look at the connections."""

    close: list[K]  # they owe nothing: close them gracefully now
    cut: list[K]  # the deadline passed while they were still owed something: close them now
    done: bool  # every connection is decided: the drain is over


@dataclass(frozen=True, slots=True)
class DrainResult:
    """What a drain did, for the log line and the caller (a worker reports it to its master)."""

    connections: int  # ACTIVE connections when the drain began
    clean: int  # closed by the drain once everything owed had left
    cut: int  # still owed something at the deadline: closed anyway, what they were owed is lost
    gone: int  # closed during the drain by their client (or after the client's half-close)
    handshaking: int = 0  # connections still sending their flags, closed at once (owed nothing)
    cut_bytes: int = 0  # reply bytes the cut connections had not delivered
    cut_held: int = 0  # cut connections that held a batch of detections back
    cut_events: int = 0  # events the cut connections had read and not answered (the balancer's)
    elapsed: float = 0.0  # seconds the drain took

    def summary(self) -> str:
        """One line for operators: ``2 connection(s) closed cleanly, 1 cut at the deadline (...)``."""
        parts = [f"{self.clean} connection(s) closed cleanly"]
        if self.cut:
            lost = [f"{self.cut_bytes} reply byte(s) undelivered"]
            if self.cut_held:
                lost.append(f"{self.cut_held} with detections not queued")
            if self.cut_events:
                lost.append(f"{self.cut_events} event(s) unanswered")
            parts.append(f"{self.cut} cut at the deadline ({', '.join(lost)})")
        if self.gone:
            parts.append(f"{self.gone} closed by their client")
        if self.handshaking:
            parts.append(f"{self.handshaking} in handshake closed")
        return ", ".join(parts)


class Drain(Generic[K]):
    """The decisions of one drain: feed it what each connection owes at each look (:meth:`step`).

    ``deadline`` and ``now`` are on the caller's clock (the event loop's).
    """

    def __init__(self, connections: Iterable[K], *, now: float, deadline: float, handshaking: int = 0) -> None:
        self.deadline = deadline
        self.started = now
        self.handshaking = handshaking
        self._waiting = set(connections)
        self._connections = len(self._waiting)
        self._clean = self._cut = self._gone = 0
        self._cut_bytes = self._cut_held = self._cut_events = 0

    @property
    def waiting(self) -> frozenset[K]:
        """The connections not decided yet."""
        return frozenset(self._waiting)

    def step(self, now: float, owed: Mapping[K, Owed], gone: Iterable[K] = ()) -> Step[K]:
        """One look: ``owed`` of the connections still open, ``gone`` those closed meanwhile (not by us).

        Connections already decided, or not part of this drain, are ignored.  At the deadline every
        connection still waiting is cut (one missing from ``owed`` as owing nothing known).
        """
        for conn in gone:
            if conn in self._waiting:
                self._waiting.discard(conn)
                self._gone += 1
        close = [c for c, o in owed.items() if c in self._waiting and not o.owing()]
        self._waiting.difference_update(close)
        self._clean += len(close)
        cut: list[K] = []
        if now >= self.deadline:
            cut = list(self._waiting)
            self._waiting.clear()
            self._cut += len(cut)
            for conn in cut:
                o = owed.get(conn, Owed())
                self._cut_bytes += o.buffered + o.unacked
                self._cut_held += o.held
                self._cut_events += o.outstanding
        return Step(close, cut, not self._waiting)

    def result(self, now: float) -> DrainResult:
        """What the drain did so far (call it once :meth:`step` said ``done``)."""
        return DrainResult(
            connections=self._connections,
            clean=self._clean,
            cut=self._cut,
            gone=self._gone,
            handshaking=self.handshaking,
            cut_bytes=self._cut_bytes,
            cut_held=self._cut_held,
            cut_events=self._cut_events,
            elapsed=now - self.started,
        )
