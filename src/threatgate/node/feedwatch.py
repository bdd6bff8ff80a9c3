"""Feed file watching: from successive file identities, decide when a feed must be loaded again.

The node polls the identity of every enabled feed file (``(inode, size, mtime_ns)``, see
:func:`threatgate.node.feeds.feed_identity`) about once a second and asks :meth:`FeedWatch.observe`
which feeds are due; it then reloads those through the usual path (atomic store swap, alerts).

Rules:
1. A feed is due when its file's identity differs from the identity of the version the node last
   *tried* (loaded, or failed to load).  So a change is picked up whatever the reload schedule
   (``update_frequency="0"`` included), and a file that failed to load is not tried again -- nor its
   failure logged and alerted again -- until it changes once more.
2. A change is acted on only once it is stable: the same new identity seen at a later poll at
   least ``settle`` seconds after it was first seen.  A ``cp`` or ``curl -o`` still writing keeps
   changing size and mtime, so a half-written file is not loaded mid-write.  (A writer that stalls
   for longer than a poll can still be caught half-way: that load fails or is partial, and the
   complete file is loaded at its next change.  Writing a temporary file and renaming it over the
   feed is the atomic way.)
3. A file that disappears is a change like any other (identity :data:`MISSING`): its load fails,
   the previous version is kept, and that is reported once.
4. Feeds that are no longer watched are forgotten.

Pure: no I/O, no clock; the caller passes identities and ``now`` (seconds, monotonic).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Generic, TypeVar

Identity = tuple[int, int, int]
"""(inode, size, mtime_ns) of a feed file."""

MISSING: Identity = (-1, -1, -1)
"""The identity of a file that does not exist (what ``feed_identity`` answers then)."""

K = TypeVar("K", bound=Hashable)


class FeedWatch(Generic[K]):
    """Debounced change detection over feed identities, keyed by whatever names a feed (its slot).

    Args:
        settle: how long a new identity must stay the same before its feed is due (seconds).
    """

    def __init__(self, settle: float = 0.5) -> None:
        self.settle = settle
        self._pending: dict[K, tuple[Identity, float]] = {}  # feed -> (new identity, when first seen)

    def __repr__(self) -> str:
        return f"<FeedWatch pending={len(self._pending)} settle={self.settle}>"

    def observe(self, now: float, current: Mapping[K, Identity], tried: Mapping[K, Identity]) -> list[K]:
        """The feeds due for a reload, given each watched feed's ``current`` file identity and the
        identity of the version last ``tried`` (absent: never tried).

        A feed returned here is due once: if the caller does not record a new ``tried`` identity for
        it, it becomes due again after another ``settle``.
        """
        due: list[K] = []
        for key, identity in current.items():
            if identity == tried.get(key):
                self._pending.pop(key, None)
                continue
            seen = self._pending.get(key)
            if seen is None or seen[0] != identity:
                self._pending[key] = (identity, now)  # new, or still changing: wait until it settles
            elif now - seen[1] >= self.settle:
                del self._pending[key]
                due.append(key)
        for key in [k for k in self._pending if k not in current]:
            del self._pending[key]
        return due

    @property
    def pending(self) -> int:
        """Feeds whose file changed but is not stable yet."""
        return len(self._pending)
