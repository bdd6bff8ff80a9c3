"""node/feedsnapshot.py: one loaded feed version, the ref a worker rebuilds it from, and the dict-record builder.

What must hold: a record is read from the snapshot (never the feed file), an unreadable one is None and
counted (the node reports it), a record number out of range is None; the ref carries what a worker needs
and refuses a descriptor of another snapshot; the builder keeps each record's indicator and context and
finishes into an in-memory or a shared (memfd) snapshot; live snapshots are listed until dropped.
(Whole stores through a worker channel: tests/node/test_shared_snapshots.py.)
"""

from __future__ import annotations

import gc
import os
import pickle
from typing import Any

import pytest

from threatgate.config.node import FeedSettings
from threatgate.errors import SnapshotInvalid
from threatgate.node.feedsnapshot import FeedSnapshot, MemorySnapshot, SnapshotRef
from threatgate.node.records import Kind, classify

SETTINGS = FeedSettings(path="/feeds/pushed", name="pushed", category="Pushed", format="stix")


def built(shared: bool = False) -> FeedSnapshot:
    builder = MemorySnapshot(SETTINGS)
    for record in ({"url": "http://evil.example/a", "threat": "c2"}, {"domain": "bad.example", "tags": ["x"]}):
        field = "url" if "url" in record else "domain"
        indicator = classify(record[field], field)
        assert indicator is not None
        builder.add_record(record, indicator)
    builder.identity = (1, 2, 3)
    assert len(builder) == 2 and list(builder.kinds) == [Kind.URL, Kind.DOMAIN]
    assert builder.records[1]["tags"] == ["x"]  # kept for inspection until the builder goes
    return builder.finish(shared=shared)


def test_MemorySnapshot_finishes_into_a_snapshot_of_its_records() -> None:
    snap = built()
    assert len(snap) == 2 and snap.name == "pushed" and snap.identity == (1, 2, 3) and snap.path is None
    first = snap.record(0)
    assert first is not None and first.raw == "http://evil.example/a" and dict(first.context) == {"threat": "c2"}
    assert snap.record(1) is not None and dict(snap.record(1).context) == {}  # type: ignore[union-attr]  # lists are not context
    indicator = snap.indicator(1)
    assert indicator is not None and (indicator.kind, indicator.value) == (Kind.DOMAIN, "bad.example")
    assert snap.report.records == 2 and snap.report.per_kind == {"url": 1, "domain": 1}
    assert repr(snap) == "<FeedSnapshot pushed records=2 malformed=0>"
    assert snap.index.fd is None


@pytest.mark.parametrize("row", [-1, 2, 10**9])
def test_a_record_number_out_of_range_is_none_and_not_a_failure(row: int) -> None:
    snap = built()
    assert snap.record(row) is None and snap.indicator(row) is None
    assert snap.read_failures == 0


class Unreadable:
    """An index whose records cannot be read back (the disk under a mapped snapshot failed)."""

    def __init__(self, index: Any, error: Exception) -> None:
        self._index, self._error = index, error
        self.report, self.header = index.report, index.header

    def __len__(self) -> int:
        return len(self._index)

    def record(self, row: int) -> Any:
        raise self._error


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x")])
def test_a_record_that_cannot_be_read_back_is_none_and_counted(error: Exception) -> None:
    snap = FeedSnapshot(SETTINGS, Unreadable(built().index, error))  # type: ignore[arg-type]
    assert snap.record(0) is None and snap.indicator(1) is None
    assert snap.read_failures == 2


def test_a_shared_snapshot_is_rebuilt_by_a_worker_from_its_ref_and_descriptor() -> None:
    snap = built(shared=True)
    assert snap.index.fd is not None
    ref = pickle.loads(pickle.dumps(snap.ref()))  # as the master sends it
    assert ref == SnapshotRef(SETTINGS, (1, 2, 3), snap.index.feed_digest, snap.index.settings_digest, None)
    again = ref.open(os.dup(snap.index.fd))
    assert (again.settings, again.identity, len(again)) == (snap.settings, snap.identity, 2)
    assert again.record(0).raw == "http://evil.example/a"  # type: ignore[union-attr]


def test_a_ref_refuses_a_descriptor_of_another_snapshot() -> None:
    snap = built(shared=True)
    other = SnapshotRef(SETTINGS, (1, 2, 3), b"\x01" * 32, snap.index.settings_digest)
    with pytest.raises(SnapshotInvalid) as refused:
        other.open(os.dup(snap.index.fd))  # type: ignore[arg-type]
    assert refused.value.reason == "digest"


def test_live_lists_the_snapshots_still_in_memory() -> None:
    snap = built()
    assert snap in FeedSnapshot.live()
    ident = id(snap)
    del snap
    gc.collect()
    assert ident not in {id(s) for s in FeedSnapshot.live()}
