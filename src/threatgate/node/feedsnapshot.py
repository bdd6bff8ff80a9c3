"""One loaded feed version (:class:`FeedSnapshot`), what a worker needs to map it again
(:class:`SnapshotRef`), and the builder of a snapshot from records held as dicts (:class:`MemorySnapshot`).

Above the record helpers and the snapshot format (imported where used, so that a process that only
names these types does not load the format), below the readers that build snapshots.
"""

from __future__ import annotations

import threading
import weakref
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from threatgate.config.node import FeedSettings
from threatgate.node.records import Indicator, LoadReport, ParsedFeed, add_row, record_context

if TYPE_CHECKING:
    from threatgate.node.snapfile import FeedIndex, Record


_LIVE: weakref.WeakSet[FeedSnapshot] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()  # snapshots are made in worker threads (suppliers) and listed on the event loop


class FeedSnapshot:
    """One loaded version of one feed: its settings, file identity and the index over its snapshot.

    The records live in the snapshot (``index``): a detection reads its record from there, never from
    the feed file, which may have changed since (rule 3).  ``path`` is the snapshot file when the
    version is mapped from the node's snapshot directory, None for one built in memory.
    """

    def __init__(
        self,
        settings: FeedSettings,
        index: FeedIndex,
        path: str | None = None,
        identity: tuple[int, int, int] = (0, 0, 0),
    ) -> None:
        self.settings = settings
        self.index = index
        self.path = path
        self.report: LoadReport = index.report  # from the snapshot's metadata: the same in every process
        self.header: list[str] = index.header  # CSV: column names, the indicator column under its canonical name
        self.read_failures = 0  # records that could not be decoded at detection time (damaged snapshot bytes)
        self.identity = identity  # (inode, size, mtime_ns) of the feed file this version was read from
        with _LIVE_LOCK:
            _LIVE.add(self)

    def ref(self) -> SnapshotRef:
        """What a worker process needs, besides the descriptor (``self.index.fd``), to rebuild this snapshot."""
        index = self.index
        return SnapshotRef(self.settings, self.identity, index.feed_digest, index.settings_digest, self.path)

    @staticmethod
    def live() -> list[FeedSnapshot]:
        """Every snapshot still in memory (the node keeps their files; see snapshots.remove_unused)."""
        with _LIVE_LOCK:
            return list(_LIVE)

    def __repr__(self) -> str:
        return f"<FeedSnapshot {self.settings.name} records={len(self.index)} malformed={self.report.malformed}>"

    def __len__(self) -> int:
        return len(self.index)

    @property
    def name(self) -> str:
        return self.settings.name

    def record(self, record_no: int) -> Record | None:
        """Record ``record_no`` as stored, or None (out of range, or bytes that cannot be read or do not
        decode: counted in ``read_failures``, and the node says so: node/service.py)."""
        if not 0 <= record_no < len(self.index):
            return None
        try:
            return self.index.record(record_no)
        except (OSError, ValueError, UnicodeDecodeError, IndexError):  # OSError: the disk under the snapshot
            self.read_failures += 1
            return None

    def indicator(self, record_no: int) -> Indicator | None:
        """The indicator of record ``record_no`` (None as for :meth:`record`)."""
        record = self.record(record_no)
        return record.indicator() if record is not None else None


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """A :class:`FeedSnapshot` as the master sends it to a worker, beside its descriptor (SCM_RIGHTS).

    Small and picklable: the settings, the identity of the feed file, the digests the snapshot's header
    must carry (so a descriptor sent for the wrong slot is refused, not served) and the snapshot file's
    path, which the worker only shows in log lines (it never removes files; the master does).  The load
    report and the CSV header are in the snapshot itself.
    """

    settings: FeedSettings
    identity: tuple[int, int, int]
    feed_digest: bytes
    settings_digest: bytes
    path: str | None = None

    def open(self, fd: int) -> FeedSnapshot:
        """The snapshot over ``fd`` (taken: see :func:`~threatgate.node.snapfile.map_fd`), as the master has it.

        Raises:
            SnapshotInvalid: the descriptor is not the snapshot this ref describes, or not a snapshot at all.
        """
        from threatgate.node.snapfile import map_fd

        index = map_fd(fd, self.feed_digest, self.settings_digest)
        return FeedSnapshot(self.settings, index, self.path, self.identity)


class MemorySnapshot:
    """Builds a snapshot from records held as dicts: STIX bundles, MISP feeds, indicators pushed through
    the REST API (one file holds many indicators inside nested objects, or there is no file at all).

    ``add_record`` keeps what a detection needs of the record (indicator, context); :meth:`finish`
    writes the columns through the same snapshot writer as JSON and CSV feeds.
    """

    def __init__(self, settings: FeedSettings) -> None:
        self.settings = settings
        self.parsed = ParsedFeed()
        self.report = self.parsed.report
        self.identity: tuple[int, int, int] = (0, 0, 0)
        self.digest = bytes(32)  # sha256 of the bytes parsed (STIX: the bundle; MISP: manifest and events)
        self.records: list[dict[str, Any]] = []  # the records added, until the builder is dropped (for inspection)

    def __len__(self) -> int:
        return len(self.parsed.values)

    @property
    def kinds(self) -> array[int]:
        """The kind of each record added."""
        return self.parsed.kinds

    def add_record(self, record: dict[str, Any], indicator: Indicator) -> None:
        """Index ``record`` under ``indicator`` (normally ``indicator_of(record)``)."""
        self.records.append(record)
        add_row(self.parsed, indicator, tuple(record_context(record)))

    def finish(self, shared: bool = False) -> FeedSnapshot:
        """The snapshot of the records added: an in-memory index, or with ``shared`` one over a sealed
        memfd that worker processes map (one copy for the master and every worker; ``index.fd``).

        Raises:
            OSError: ``shared`` and no memory for the memfd.
        """
        from threatgate.node.snapfile import in_memfd, in_memory

        index = in_memfd(self.parsed, f"tg-{self.settings.name}") if shared else in_memory(self.parsed)
        return FeedSnapshot(self.settings, index, identity=self.identity)
