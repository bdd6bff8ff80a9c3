"""The lifecycle of a node's worker processes: spawn, ready, exit, restart with backoff (sans-IO).

Invariants:
- The master never serves events itself: a worker that exits is restarted, after a delay that
  doubles with each exit in a row (``base``, 2x ... capped at ``cap``), so a crash loop costs at
  most one start per ``cap`` seconds.  A worker READY for ``reset_after`` seconds before it exits
  starts over at ``base``.
- A worker that sends nothing for ``hung_after`` seconds (it reports every second), or is not READY
  ``start_timeout`` seconds after it was started, is hung: the master kills it, and its exit is
  handled like any other.
- While draining nothing is started again.
- Nothing here reads a clock or starts a process; callers pass ``now`` and act on what is returned.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    STOPPED = "stopped"


@dataclass(slots=True)
class WorkerSlot:
    index: int
    state: WorkerState = WorkerState.STARTING
    pid: int = 0
    started: float = 0.0
    ready_since: float = 0.0
    heard: float = 0.0
    exits_in_a_row: int = 0
    due: float = 0.0  # BACKOFF: when to start it again
    restarts: int = 0


@dataclass(frozen=True, slots=True)
class Exit:
    """What the master logs about a worker's exit."""

    worker: int
    pid: int
    was_ready: bool
    restart_in: float | None  # None: not restarted (draining)


class Supervisor:
    def __init__(
        self,
        count: int,
        *,
        base: float = 0.5,
        cap: float = 30.0,
        reset_after: float = 60.0,
        hung_after: float = 10.0,
        start_timeout: float = 60.0,
    ) -> None:
        self.workers = [WorkerSlot(i) for i in range(count)]
        self.base, self.cap, self.reset_after, self.hung_after = base, cap, reset_after, hung_after
        self.start_timeout = start_timeout
        self.draining = False

    def start(self) -> list[int]:
        """Every worker, to spawn now."""
        return [w.index for w in self.workers]

    def spawned(self, worker: int, pid: int, now: float) -> None:
        slot = self.workers[worker]
        slot.state, slot.pid, slot.heard, slot.started = WorkerState.STARTING, pid, now, now

    def heard(self, worker: int, now: float) -> None:
        self.workers[worker].heard = now

    def ready(self, worker: int, now: float) -> None:
        slot = self.workers[worker]
        slot.state, slot.ready_since, slot.heard = WorkerState.READY, now, now

    def exited(self, worker: int, now: float) -> Exit:
        slot = self.workers[worker]
        was_ready = slot.state is WorkerState.READY
        if was_ready and now - slot.ready_since >= self.reset_after:
            slot.exits_in_a_row = 0
        slot.exits_in_a_row += 1
        pid, slot.pid = slot.pid, 0
        if self.draining:
            slot.state = WorkerState.STOPPED
            return Exit(worker, pid, was_ready, None)
        delay = min(self.cap, self.base * 2 ** (slot.exits_in_a_row - 1))
        slot.state, slot.due = WorkerState.BACKOFF, now + delay
        slot.restarts += 1
        return Exit(worker, pid, was_ready, delay)

    def due(self, now: float) -> list[int]:
        """Workers whose backoff has passed: to spawn now."""
        if self.draining:
            return []
        return [w.index for w in self.workers if w.state is WorkerState.BACKOFF and w.due <= now]

    def hung(self, now: float) -> list[int]:
        """Running workers silent for ``hung_after`` s, or STARTING for ``start_timeout`` s: to kill."""
        return [
            w.index
            for w in self.workers
            if w.state in (WorkerState.STARTING, WorkerState.READY)
            and w.pid
            and (
                now - w.heard >= self.hung_after
                or (w.state is WorkerState.STARTING and now - w.started >= self.start_timeout)
            )
        ]

    def drain(self) -> None:
        self.draining = True

    def counts(self) -> dict[str, int]:
        """Workers per state (``threatgate_workers{state}``)."""
        out = {state.value: 0 for state in WorkerState}
        for w in self.workers:
            out[w.state.value] += 1
        return out
