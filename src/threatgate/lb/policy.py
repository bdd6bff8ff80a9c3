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
import math
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
    capacity (ties broken at random): water-filling.  The level the scores reach is found in closed
    form (at most one round per candidate that runs out of capacity or gets nothing), the whole events
    under it are given at once, and the few left by rounding (fewer than the candidates) go one by one
    to the lowest next score.  So the cost is per candidate, not per event, even when the candidates
    are level and would otherwise take turns event by event.  Returns (candidate, how many) for those
    that get any; the total may be less than ``count`` when capacity runs out.
    """
    usable = [c for c in candidates if c.capacity > 0 and c.weight > 0]
    if not usable or count <= 0:
        return []
    if len(usable) == 1:
        c = usable[0]
        return [(c, min(count, c.capacity))]
    given = [0] * len(usable)
    room = sum(c.capacity for c in usable)
    if count >= room:
        return [(c, c.capacity) for c in usable]
    # The level L at which sum(min(capacity, max(0, L * weight - outstanding))) == count, relaxed to reals.
    # Those taking part are the ones whose first score is under L: a prefix in the order of outstanding /
    # weight, grown until the next one starts above L; within it, the capped ones are set aside and L
    # solved again (capping only raises L, so a capped one stays capped).
    start = sorted(range(len(usable)), key=lambda i: usable[i].outstanding / usable[i].weight)
    k = 1
    while True:
        given = [0] * len(usable)
        active = start[:k]
        left = count
        level = math.inf
        while active:
            level = (left + sum(usable[i].outstanding for i in active)) / sum(usable[i].weight for i in active)
            capped = [i for i in active if level * usable[i].weight - usable[i].outstanding >= usable[i].capacity]
            if not capped:
                break
            for i in capped:
                given[i] = usable[i].capacity
                left -= usable[i].capacity
            active = [i for i in active if i not in capped]
            level = math.inf
        nxt = usable[start[k]] if k < len(start) else None
        if nxt is not None and level * nxt.weight > nxt.outstanding:
            k += 1
            continue
        break
    for i in active:
        c = usable[i]
        given[i] = min(c.capacity, max(0, math.floor(level * c.weight - c.outstanding - 1e-9)))
    left = count - sum(given)
    # What rounding left (fewer than the candidates): one at a time to the lowest next score.
    heap = [
        ((c.outstanding + given[i] + 1) / c.weight, rng.random(), i)
        for i, c in enumerate(usable)
        if given[i] < c.capacity
    ]
    heapq.heapify(heap)
    while left > 0 and heap:
        _, tie, i = heapq.heappop(heap)
        given[i] += 1
        left -= 1
        c = usable[i]
        if given[i] < c.capacity:
            heapq.heappush(heap, ((c.outstanding + given[i] + 1) / c.weight, tie, i))
    return [(usable[i], n) for i, n in enumerate(given) if n]
