"""Choosing an instance for each event: weighted least outstanding events, placed a batch at a time.

Why per event and not per connection: one SIEM connection carries most of the traffic, so
connection-level balancing (what an L4 proxy does) puts it all on one node.  Why least outstanding:
a node that is slower (busy, bigger rules, colder caches) accumulates unanswered events and gets
fewer new ones, which round robin ignores.  Why a batch at a time (:func:`allocate`): the events of
one read are spread in one pass whose cost is per instance, not per event, and give the same
placement as choosing the least loaded instance for each event in turn.

Weight: the score is ``(outstanding + 1) / weight``, so a weight-2 instance carries about twice
the events of a weight-1 instance at the same load.  Pure: the caller passes a ``random.Random``.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class Candidate:
    """What the policy needs to know about one instance."""

    key: Hashable
    weight: float  # an instance's weight; divided among its lanes when it has several
    outstanding: int
    capacity: int  # how many more events it may take now (in-flight limit minus outstanding)


def allocate(candidates: Sequence[Candidate], count: int, rng: random.Random) -> list[tuple[Candidate, int]]:
    """Spread ``count`` events over ``candidates`` as least-outstanding placement would one by one, in one pass.

    Each event goes to the instance with the lowest ``(outstanding + 1) / weight`` that still has
    capacity (water-filling; ties broken at random), which is what per-event least-outstanding
    placement converges to.  Used for a batch of events read at once, so the cost is per instance,
    not per event.  Returns (candidate, how many) for those that get any; the total may be less than
    ``count`` when capacity runs out.
    """
    usable = [c for c in candidates if c.capacity > 0 and c.weight > 0]
    if not usable or count <= 0:
        return []
    if len(usable) == 1:
        c = usable[0]
        return [(c, min(count, c.capacity))]
    heap = [((c.outstanding + 1) / c.weight, rng.random(), i) for i, c in enumerate(usable)]
    heapq.heapify(heap)
    given = [0] * len(usable)
    left = count
    while left and heap:
        _, tie, i = heapq.heappop(heap)
        c = usable[i]
        # Give this instance events until it passes the next-lowest score (or runs out of capacity).
        if heap:
            next_score = heap[0][0]
            room = int(next_score * c.weight) - c.outstanding - given[i]
            take = max(1, min(left, c.capacity - given[i], room))
        else:
            take = min(left, c.capacity - given[i])
        given[i] += take
        left -= take
        if given[i] < c.capacity:
            heapq.heappush(heap, ((c.outstanding + given[i] + 1) / c.weight, tie, i))
    return [(usable[i], n) for i, n in enumerate(given) if n]
