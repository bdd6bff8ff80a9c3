"""The event path of a node: one connection's batches through the matcher to replies or the output.

What a node process and a worker process share (node/worker.py serves connections the node's
master passed it): the connection class, the per-batch accounting and the ``%Date%`` clock.  They
depend on :class:`EventSink`, a narrow view of the process that serves events, never on the
service class itself, so a worker does not import the REST API, the cluster package or aiohttp.

Invariants:
- A batch is matched synchronously in ``data_received``: events read are answered before the next
  read, in order (ReplyBack on the connection, else the detection output).
- A batch the output cannot take is held and the connection stops reading until the output
  drains: back-pressure, never a dropped detection.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Protocol

from threatgate.config.node import NodeConfig
from threatgate.log import RateLimitedLog
from threatgate.net.events import EventListener, EventProtocol, ListenerLimits
from threatgate.net.sender import Dropped, LineSender
from threatgate.node.feeds import FeedSnapshot
from threatgate.node.matcher import Matcher, MatchStats
from threatgate.stats import NodeStats
from threatgate.wire.framing import FramedEvent, Framer

FLUSH_FLOOR = 0.5
"""Seconds each sender may still flush at shutdown when the drain used all of DrainTimeout (a client
that never read): KL_ALERT_ServiceStopped and queued detections to a live destination still leave."""

BAD_INPUT_REASONS = ("invalid_utf8", "nul", "oversized", "unterminated")
"""The framer's counters of bad input, moved into ``threatgate_bad_input_total`` after each batch."""


def syslog_date(now: float | None = None) -> str:
    """``%Date%``: the documented ``Mon DD HH:MM:SS`` form, local time."""
    return time.strftime("%b %d %H:%M:%S", time.localtime(now))


class SyslogClock:
    """``%Date%`` rendered once per second, not once per batch."""

    def __init__(self) -> None:
        self._cache = (0, "")

    def date(self) -> str:
        now = int(time.time())
        if self._cache[0] != now:
            self._cache = (now, syslog_date(now))
        return self._cache[1]


def listener_limits(config: NodeConfig) -> ListenerLimits:
    return ListenerLimits(
        handshake_timeout=config.service.handshake_timeout,
        scanners_count=config.service.scanners_count,
        max_event_size=config.input.max_event_size,
        delimiter=config.input.event_delimiter,
        idle_timeout=config.service.idle_timeout,
    )


def detection_sender(config: NodeConfig, on_drop: Callable[[Dropped], None]) -> LineSender:
    """The sender of detection lines to ``<OutputSettings><ConnectionString>``."""
    out = config.output
    return LineSender(
        out.destination,
        name="detections",
        retries=out.retries_count,
        retry_timeout=out.retries_timeout,
        on_drop=on_drop,
    )


def next_output(
    current: LineSender, config: NodeConfig, on_drop: Callable[[Dropped], None]
) -> tuple[LineSender, LineSender | None]:
    """After a reload: the sender to use, and the old one to close (None when the destination is the same).

    The same destination keeps its sender (and its queue and connection); a new one gets a new sender,
    and the old one flushes and hands over what it could not send (``aclose(successor=...)``).
    """
    out = config.output
    if out.destination == current.address:
        current.retries, current.retry_timeout = out.retries_count, out.retries_timeout
        return current, None
    return detection_sender(config, on_drop), current


class ReadFailures:
    """Records of a loaded version whose snapshot bytes did not decode (damaged after the start-up check):
    their detections were lost.  Counted per feed and logged at ERROR, at most once per 10 s."""

    def __init__(self, stats: NodeStats, log: logging.Logger) -> None:
        self._stats = stats
        self._seen: weakref.WeakKeyDictionary[FeedSnapshot, int] = weakref.WeakKeyDictionary()
        self._warn = RateLimitedLog(log, logging.ERROR)

    def check(self, snapshots: Iterable[FeedSnapshot]) -> None:
        counted = self._stats.feed_read_failures
        for snap in snapshots:
            total = snap.read_failures
            before = self._seen.get(snap, 0)
            if total > before:
                self._seen[snap] = total
                counted[snap.name] = counted.get(snap.name, 0) + total - before
                self._warn(
                    "feed %s: %d record(s) could not be read from the loaded version's snapshot %s; "
                    "their detections were lost (threatgate_feed_read_failures_total); check that disk",
                    snap.name,
                    total - before,
                    snap.path or "(in memory)",
                )


class EventSink(Protocol):
    """What an event connection needs of the process serving it (a node, or one of its workers)."""

    config: NodeConfig
    matcher: Matcher
    stats: NodeStats
    listener: EventListener
    output: LineSender

    def date(self) -> str: ...

    def account(self, m: MatchStats, framer: Framer, finished: bool) -> None: ...


def account(stats: NodeStats, m: MatchStats, framer: Framer, finished: bool, warn: RateLimitedLog) -> None:
    """Fold one batch's counters into the process's (cheap: a handful of additions per batch)."""
    s = stats
    s.events += m.events
    s.detections += m.detections
    s.suppressed += m.suppressed
    s.ignored += m.ignored
    if finished:
        s.finished_lines += m.events
    paths = s.engine_events
    if m.decided:
        paths["compiled"] = paths.get("compiled", 0) + m.decided
    if m.confirmed:
        paths["confirmed"] = paths.get("confirmed", 0) + m.confirmed
    rest = m.events - m.decided - m.confirmed
    if rest:
        paths["reference"] = paths.get("reference", 0) + rest
    if m.detections:  # per batch: the statistics of issue 16 cost nothing on a batch without detections
        for cat, n in m.per_category.items():
            s.per_category[cat] = s.per_category.get(cat, 0) + n
        for source, n in m.per_source.items():
            s.per_source[source] = s.per_source.get(source, 0) + n
        s.top_indicators.update(m.per_indicator)
    f = framer.stats
    for reason in BAD_INPUT_REASONS:
        n = getattr(f, reason)
        if n:
            s.bump(s.bad_input, reason, n)
            setattr(f, reason, 0)
            warn(
                'bad input on the event port: %s (%d event(s)); see threatgate_bad_input_total{reason="%s"}',
                reason,
                n,
                reason,
            )


class EventConnection(EventProtocol):
    """One client connection on a node's event port: matches each batch as it arrives."""

    def __init__(self, node: EventSink) -> None:
        super().__init__(node.listener)
        self.node = node

    def process(self, events: list[FramedEvent]) -> None:
        node = self.node
        flags = self.flags
        finished = flags.send_finished or node.config.output.finished_enabled
        mstats = MatchStats()
        lines = node.matcher.match(events, date=node.date(), peer_ip=self.peer, finished=finished, stats=mstats)
        node.account(mstats, self.framer, finished)
        if not lines:
            return
        payload = "".join(lines).encode("utf-8", "replace")
        if flags.reply_back:
            if self.transport is not None:
                self.transport.write(payload)
            else:  # the sender left before its slot came (a TLS session closed at once): nobody to answer
                node.stats.drop_lines("reply", "client_gone", len(lines))
            return
        if not node.output.send(payload):
            # The destination is not keeping up: hold this batch and stop reading until it drains.
            node.stats.bump(node.stats.bad_input, "output_backpressure")
            self.pause("output")

            def retry() -> None:
                sender = node.output  # a reload may have replaced the sender meanwhile
                if not sender.send(payload):
                    sender.when_drained(retry)
                    return
                self.resume("output")

            node.output.when_drained(retry)
