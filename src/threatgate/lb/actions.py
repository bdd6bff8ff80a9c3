"""What the balancer's dispatcher asks its edge to do (``lb/dispatcher.py`` returns lists of these).

Small immutable records (NamedTuples: cheap to make, one per read and connection on the hot path);
the edge (balancer/service.py ``BalancerService.apply``) carries them out in order.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple


class Send(NamedTuple):
    """Write ``data`` to the lane's event connection."""

    lane: str
    data: bytes


class Deliver(NamedTuple):
    """Write ``data`` (answers) to the client."""

    client: Hashable
    data: bytes


class Output(NamedTuple):
    """Detection lines of a client without X-KF-ReplyBack: to the OutputConnectionString (or counted dropped)."""

    lines: tuple[str, ...]


class Pause(NamedTuple):
    """Stop reading the client, for ``reason`` (the edge reads it again after every reason is resumed)."""

    client: Hashable
    reason: str


class Resume(NamedTuple):
    client: Hashable
    reason: str


class CloseClient(NamedTuple):
    """The client half-closed and every answer is written: close our side."""

    client: Hashable


class Connect(NamedTuple):
    """Open the lane's event connection; the edge answers with ``Dispatcher.lane_connected`` or
    ``Dispatcher.connect_failed``, naming the attempt (a lane dropped meanwhile may have a successor under
    the same key: an old attempt's outcome must not touch it)."""

    lane: str
    host: str
    port: int
    attempt: int  # names this attempt: its outcome counts only for the lane that asked for it


class Disconnect(NamedTuple):
    """Close (abort) the lane's event connection: no late byte of it may count."""

    lane: str


class Retry(NamedTuple):
    """Call :meth:`Dispatcher.retry_lane` for the lane after ``delay`` seconds."""

    lane: str
    delay: float


class Again(NamedTuple):
    """Call :meth:`Dispatcher.dispatch` again once other callbacks ran (the backlog is not empty)."""


class Compacted(NamedTuple):
    """The tables were rebuilt after a burst: the edge collects garbage and gives the heap back."""

    pending: int


class Log(NamedTuple):
    """A log line; with ``limit``, at most one per interval per limit name (the rest counted into the next)."""

    level: int
    message: str
    args: tuple[object, ...] = ()
    limit: str = ""


Action = Send | Deliver | Output | Pause | Resume | CloseClient | Connect | Disconnect | Retry | Again | Compacted | Log

AGAIN = Again()
