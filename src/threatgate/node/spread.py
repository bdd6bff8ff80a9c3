"""Which worker serves a new connection, and node-wide ScannersCount (sans-IO).

A node with several worker processes accepts every event connection in its master and passes it to
one worker, which serves it for its whole life (docs/architecture.md, "Workers").

Invariants:
- :meth:`Spread.assign` picks a READY worker with the fewest connections (every connection it was
  given and has not reported closed, PING ones included: they close within milliseconds); ties go
  to the worker assigned least recently, so connections arriving together land on different workers.
- A worker that is gone holds nothing: :meth:`Spread.worker_gone` and :meth:`ScannerSlots.worker_gone`
  forget its connections (the kernel closed them with it).
- :class:`ScannerSlots` holds at most ``scanners`` ACTIVE connections node-wide, exactly as one
  process's listener does.  When every slot is taken, :meth:`ScannerSlots.eviction_candidate`
  names the connection idle the longest (from what the workers last reported), and the worker that
  holds it re-checks before closing it: the report may be a second old.
- After a worker restart, :func:`shed_from` names a worker holding two connections more than another:
  it closes one once that connection is owed nothing (no answer lost), and the client reconnects to
  the emptier worker.
- Nothing here reads a clock or touches a socket; callers pass ``now``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping


class Spread:
    """Least connections over the READY workers."""

    def __init__(self, workers: int) -> None:
        self._conns: list[set[int]] = [set() for _ in range(workers)]
        self._last: list[float] = [float("-inf")] * workers
        self._ready: set[int] = set()

    def set_ready(self, worker: int, ready: bool) -> None:
        if ready:
            self._ready.add(worker)
        else:
            self._ready.discard(worker)

    @property
    def ready(self) -> frozenset[int]:
        return frozenset(self._ready)

    def assign(self, now: float) -> int | None:
        """The worker for a new connection, or None when no worker is READY."""
        if not self._ready:
            return None
        worker = min(self._ready, key=lambda w: (len(self._conns[w]), self._last[w], w))
        self._last[worker] = now
        return worker

    def opened(self, worker: int, conn: int) -> None:
        self._conns[worker].add(conn)

    def closed(self, worker: int, conn: int) -> None:
        self._conns[worker].discard(conn)

    def worker_gone(self, worker: int) -> list[int]:
        """Its connections (closed by the kernel with it); it is no longer READY."""
        self._ready.discard(worker)
        gone = sorted(self._conns[worker])
        self._conns[worker].clear()
        return gone

    def connections(self, worker: int) -> int:
        return len(self._conns[worker])


def shed_from(active: Mapping[int, int]) -> int | None:
    """The READY worker that should close one long-lived connection so its client reconnects elsewhere.

    ``active``: ACTIVE connections per READY worker.  After a worker restarts, the connections that
    reconnected while it was starting all landed on the others (a balancer's lanes, most often): the
    fullest sheds one when it holds at least two more than the emptiest, until they are even.
    """
    if len(active) < 2:
        return None
    fullest = max(active, key=lambda w: (active[w], -w))
    return fullest if active[fullest] - min(active.values()) >= 2 else None


class ScannerSlots:
    """ScannersCount across the workers of one node: which connections hold a scanner."""

    def __init__(self, scanners: int) -> None:
        self.scanners = scanners
        self._active: dict[tuple[int, int], None] = {}

    def __len__(self) -> int:
        return len(self._active)

    def request(self, worker: int, conn: int) -> bool:
        """Grant a slot when one is free (a connection asking twice keeps the one it has)."""
        key = (worker, conn)
        if key in self._active:
            return True
        if len(self._active) >= self.scanners:
            return False
        self._active[key] = None
        return True

    def release(self, worker: int, conn: int) -> None:
        self._active.pop((worker, conn), None)

    def worker_gone(self, worker: int) -> None:
        for key in [k for k in self._active if k[0] == worker]:
            del self._active[key]

    def eviction_candidate(
        self,
        idle: Mapping[int, Iterable[tuple[int, float]]],
        now: float,
        floor: float,
        exclude: Collection[tuple[int, int]] = (),
    ) -> tuple[int, int] | None:
        """The ACTIVE connection idle the longest, idle for at least ``floor`` s, or None.

        ``idle`` is, per worker, ``(conn, last_active)`` of its connections that owe nothing and are
        not held back (what each worker last reported), ``last_active`` on the clock of ``now``;
        ``exclude``: connections already asked to go for another newcomer.
        """
        best: tuple[float, int, int] | None = None
        for worker, conns in idle.items():
            for conn, last_active in conns:
                if (worker, conn) not in self._active or (worker, conn) in exclude or now - last_active < floor:
                    continue
                if best is None or last_active < best[0]:
                    best = (last_active, worker, conn)
        return None if best is None else (best[1], best[2])
