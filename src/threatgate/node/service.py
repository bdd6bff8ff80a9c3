"""The node process: event listener, feed lifecycle, detection output, alerts and metrics.

Lifecycle (uvicorn's chain): ``run`` -> ``startup`` (load feeds, then listen: a node that answers
PING has tried its feeds) -> ``main_loop`` (periodic reloads, and a watch of the feed files that
reloads a changed file within seconds) -> ``shutdown`` (stop accepting, drain the event connections
and flush the senders within DrainTimeout, then stop the rest).  SIGHUP reloads the configuration and
feeds; SIGTERM/SIGINT stop (a second one forces the exit: runtime.py).

Readiness (``/readyz``): ready once start-up is done *and* every enabled feed has a loaded version.
A feed that failed to load with no previous version to keep makes the node not ready (it still
answers PING and matches events with the feeds it has: partial matching beats none when it is the
only node; a balancer keeps events away from it while a ready node exists).  A feed whose new
version failed but whose previous one is kept does not: the node detects what it did before, and
the failure is logged, counted and alerted.

Connections go through three states: HANDSHAKE (collecting session flags, no scanner held),
ACTIVE (holds one of ScannersCount scanners) and CLOSED.  A PING connection is answered in
HANDSHAKE and never needs a scanner, so health checks work even when every scanner is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from threatgate import runtime
from threatgate.config.common import Address
from threatgate.config.node import FeedSettings, NodeConfig, load_node_config, read_users, resolve_workers
from threatgate.config.reload import NODE_FIELDS, RestartTracker
from threatgate.config.security import TLSListener
from threatgate.errors import ConfigError, FeedError, FileWriteError, SettingsRejected
from threatgate.fs import os_reason
from threatgate.log import RateLimitedLog
from threatgate.metrics import MetricsServer, StatsCollector, start_metrics_server
from threatgate.net.describe import describe
from threatgate.net.drain import remaining
from threatgate.net.events import EventListener, log_drained
from threatgate.net.gate import Gate, Gates, Listening, start_servers
from threatgate.net.http import HTTPServer
from threatgate.net.sender import ALERT_QUEUE, Dropped, DropTally, LineSender, queue_gauges
from threatgate.net.tls import ensure_server_pair, server_context
from threatgate.node import snapshots
from threatgate.node.api import NodeAPI
from threatgate.node.auth import NodeUsers
from threatgate.node.engine import engine_choice, make_matcher
from threatgate.node.eventpath import (
    FLUSH_FLOOR,
    EventConnection,
    ReadFailures,
    SyslogClock,
    account,
    detection_sender,
    listener_limits,
    next_output,
    syslog_date,
)
from threatgate.node.exports import Exports
from threatgate.node.feeds import FeedSnapshot, feed_identity
from threatgate.node.feedwatch import FeedWatch, Identity
from threatgate.node.matcher import MatchStats
from threatgate.node.pool import WorkerPool
from threatgate.node.render import FieldFormat, Template
from threatgate.node.snapshots import Refused, SnapshotDir, build_in_worker, build_snapshot, source_digest, source_size
from threatgate.node.store import IndicatorStore
from threatgate.node.suppliers import SUPPLIER_SLOT_BASE, Supplier, SupplierDB, supplier_snapshots
from threatgate.stats import Gauges, NodeStats, detection_statistics
from threatgate.wire.alerts import alert_level
from threatgate.wire.framing import Framer

log = logging.getLogger("threatgate.node")
T = TypeVar("T")

_SKIPPED = {"stix": "STIX pattern(s) or comparison(s)", "misp": "MISP attribute(s)"}
"""What a feed's skipped entries are, for the INFO line of a load (the build worker does not log)."""

WATCH_INTERVAL = 1.0
"""Seconds between two looks at the feed files' identities (a change applies within about 2 polls)."""


@dataclass(frozen=True, slots=True)
class FeedState:
    """What the node knows of one enabled feed's last load attempt."""

    settings: FeedSettings
    tried: Identity  # the file's identity at the last attempt (the watcher compares against it)
    error: str | None  # why the last attempt failed; None when it loaded
    loaded_at: float  # wall-clock time of the last successful load, 0 if never


class Alerts:
    """Service alerts (KL_ALERT_*): rendered with AlertFormat, sent to AlertConnectionString if enabled."""

    def __init__(self, config: NodeConfig, stats: NodeStats) -> None:
        out = config.output
        self._stats = stats
        self._template = Template(out.alert_format) if out.alert_format else None
        self.sender: LineSender | None = None
        if out.alert_destination is not None and self._template is not None:
            self.sender = LineSender(
                out.alert_destination,
                name="alerts",
                retries=None,  # an alert must survive the balancer's restart: queue (1 MiB) and retry
                retry_timeout=min(out.retries_timeout, 5.0),
                max_queue_bytes=ALERT_QUEUE[0],
                max_queue_lines=ALERT_QUEUE[1],
                on_drop=lambda d: stats.drop_lines(d.destination, d.reason, d.lines),  # no alert about alerts
            )
        self._fields = FieldFormat(out.record_field_format)

    def raise_alert(self, name: str, **context: object) -> None:
        self._stats.bump(self._stats.alerts, name)
        detail = " ".join(f"{k}={v}" for k, v in context.items())
        log.log(alert_level(name), "alert %s %s", name, detail)
        if self.sender is None or self._template is None:
            return
        fields = {
            "Date": syslog_date(),
            "Alert": name,
            "RecordContext": self._fields.join(((k, str(v)) for k, v in context.items()), " "),
        }
        self.sender.send_or_drop((self._template.render(fields) + "\n").encode())


class SettingsRevision(Protocol):
    """A cluster settings revision, as the node logs it."""

    @property
    def revision(self) -> int: ...
    def short(self) -> str: ...


class ControlPlane(Protocol):
    """The node's cluster agent as the node uses it (``ClusterAgent`` is one; ``node/app.py`` wires it)."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def may_write(self) -> bool: ...
    def readiness(self) -> dict[str, Any]: ...
    def reload_local(self) -> NodeConfig | None: ...
    def gauges(self) -> Gauges: ...
    async def commit_suppliers(
        self,
        base: int | None,
        write: Callable[[], Awaitable[Any]],
        unchanged: Callable[[Any], bool] | None = None,
    ) -> tuple[Any, SettingsRevision]: ...


class NodeService:
    """Owns the listener, the matcher and its store, the senders and the reload schedule."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.stats = NodeStats()
        self.started_at = time.time()  # ``since`` of /statz: a balancer tells a restart by it
        self.alerts = Alerts(config, self.stats)
        self.engine = engine_choice()
        self.matcher = make_matcher(config, IndicatorStore(), self.engine)
        self.drop_tally = DropTally()
        self._drop_timer: asyncio.TimerHandle | None = None
        self.output = detection_sender(config, self._output_dropped)
        self.restart = RestartTracker(config, NODE_FIELDS)
        self.listener = EventListener(self.stats, listener_limits(config), log)
        self.warn_input = RateLimitedLog(log)
        self.read_failures = ReadFailures(self.stats, log)
        self._snapshot_dir: SnapshotDir | None = None
        self._build_slots = asyncio.Semaphore(max(1, os.cpu_count() or 1))  # one feed build per core at most
        self._snapshots: dict[int, FeedSnapshot] = {}
        self._feed_states: dict[int, FeedState] = {}
        self._unready_feeds: tuple[str, ...] = ()  # as last logged (a change of it is logged once)
        self._servers: list[Listening] = []  # the event port, and its TLS twin during a migration
        self.gates = Gates(self.stats, log)  # every port's door: a reload gives them their new <AllowedSources>
        self._metrics: MetricsServer | None = None
        self._reload_lock = asyncio.Lock()
        self._should_exit = asyncio.Event()
        self._clock = SyslogClock()
        self.bound_port = 0
        self.listening = runtime.Listening()  # what startup() bound, by name (reported with READY=1)
        self.ready = False  # start-up done, every feed tried: the API answers 425 before (see readiness())
        self.draining = False  # SIGTERM: no longer accepting; /readyz answers 503 "draining"
        self._started = False
        self.store_version = 0  # bumped at every store swap (export caches key on it)
        # A cluster member's users are cluster settings: only a standalone node follows its file's <Users>.
        self.auth = NodeUsers(
            _users(config),
            path=None if config.cluster else config.path,
            read=read_users,
            count=lambda reason: self.stats.bump(self.stats.bad_input, reason),
        )
        self.db: SupplierDB | None = None
        self.exports = Exports(self)
        self.api = NodeAPI(self)
        self.http: HTTPServer | None = None
        self._suppliers_lock = asyncio.Lock()
        self._supplier_snapshots: dict[int, tuple[Supplier, list[FeedSnapshot]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.cluster: ControlPlane | None = None  # set by node/app.py when <Cluster> is configured
        self.workers = resolve_workers(config.scan.workers, len(os.sched_getaffinity(0)))
        self.pool: WorkerPool | None = None  # <Workers> >= 2: the processes that serve events

    def __repr__(self) -> str:
        return (
            f"<NodeService {self.config.input.listen} active={len(self.listener.active)} store={self.matcher.store!r}>"
        )

    def date(self) -> str:
        return self._clock.date()

    def account(self, m: MatchStats, framer: Framer, finished: bool) -> None:
        account(self.stats, m, framer, finished, self.warn_input)

    # -- detection output ---------------------------------------------------------------------

    def _output_dropped(self, dropped: Dropped) -> None:
        """Count detection lines the sender gave up on; KL_ALERT_DetectionsDropped at most once a minute."""
        self.stats.drop_lines(dropped.destination, dropped.reason, dropped.lines)
        self._tally_drop(str(dropped.address), dropped.reason, dropped.lines)

    def _tally_drop(self, address: str, reason: str, lines: int) -> None:
        """KL_ALERT_DetectionsDropped at most once a minute per destination and reason (node-wide)."""
        now = time.monotonic()
        lines = self.drop_tally.add(address, reason, lines, now)
        if lines:
            self._alert_dropped(address, reason, lines)
        self._schedule_drop_alerts(now)

    def _alert_dropped(self, address: str, reason: str, lines: int) -> None:
        self.alerts.raise_alert("KL_ALERT_DetectionsDropped", destination=address, lines=lines, reason=reason)

    def _schedule_drop_alerts(self, now: float) -> None:
        """Alert about held drops once their minute has passed, even if nothing more is dropped."""
        due = self.drop_tally.next_due()
        if due is None or self._drop_timer is not None:
            return

        def fire() -> None:
            self._drop_timer = None
            later = time.monotonic()
            for address, reason, lines in self.drop_tally.due(later):
                self._alert_dropped(address, reason, lines)
            self._schedule_drop_alerts(later)

        self._drop_timer = asyncio.get_running_loop().call_later(max(0.0, due - now), fire)

    # -- feeds --------------------------------------------------------------------------------

    async def reload_feeds(self, reason: str, only: Collection[int] | None = None) -> None:
        """Load changed feeds (mapped from their snapshot, or built in a worker process) and swap in a new store.

        ``only`` limits the look to those feed slots (the watcher's due feeds); None looks at every
        enabled feed.  A feed that fails to load keeps its previous version and raises
        KL_ALERT_FailedToUpdateFeed; one with no version at all makes the node not ready.
        """
        async with self._reload_lock:
            started = time.monotonic()
            changed: dict[int, FeedSnapshot] = {}
            stale: set[int] = set()  # slots whose snapshot belongs to a feed no longer at that place
            pending: list[tuple[int, FeedSettings, FeedSnapshot | None, bool, float]] = []
            updated: list[tuple[str, int]] = []  # KL_ALERT_UpdatedFeed once the new versions detect
            feeds = self.config.feeds.feeds  # one list for the whole reload, whatever a SIGHUP does meanwhile
            # Versions follow their feed file, not its place in the list: a feed moved by an edit keeps its
            # version, and a feed put at another feed's place never inherits that feed's version.
            by_path = {snap.settings.path: snap for snap in self._snapshots.values()}
            states_by_path = {st.settings.path: st for st in self._feed_states.values()}
            for slot, settings in enumerate(feeds):
                if not settings.enabled or (only is not None and slot not in only):
                    continue
                old = self._snapshots.get(slot)
                moved = False
                if old is None or old.settings.path != settings.path:
                    if old is not None:
                        stale.add(slot)
                    old = by_path.get(settings.path)
                    moved = old is not None
                state = self._feed_states.get(slot)
                if state is None or state.settings.path != settings.path:
                    state = states_by_path.get(settings.path)
                loaded_at = state.loaded_at if state is not None else 0.0
                if old is not None and old.settings == settings and old.identity == feed_identity(settings):
                    if state is None or state.error is not None or state.settings != settings or moved:
                        self._feed_states[slot] = FeedState(settings, old.identity, None, loaded_at or time.time())
                    if moved:
                        changed[slot] = old
                    continue
                pending.append((slot, settings, old, moved, loaded_at))
            # Every changed feed at once: a build runs in a worker process, several on several cores.
            # The directory is prepared once, before any worker writes in it (prepare removes leftovers).
            unusable = await self._prepare_snapshot_dir() if pending else None
            results = await asyncio.gather(*(self._load_version(p[1], unusable) for p in pending))
            for (slot, settings, old, moved, loaded_at), (tried, result) in zip(pending, results, strict=True):
                if isinstance(result, FeedError):
                    self._feed_states[slot] = FeedState(settings, tried, str(result), loaded_at)
                    self.stats.bump(self.stats.feed_failures, settings.name)
                    log.error("feed %s not loaded (%s); %s", settings.name, result, _kept(old))
                    self.alerts.raise_alert("KL_ALERT_FailedToUpdateFeed", feed=settings.name, error=str(result))
                    if moved and old is not None:
                        changed[slot] = old  # its previous version, at its new place
                    continue
                snap = result
                self._feed_states[slot] = FeedState(settings, tried, None, time.time())
                changed[slot] = snap
                rep = snap.report
                self.stats.feed_malformed[settings.name] = rep.malformed
                self.stats.feed_skipped[settings.name] = rep.skipped
                rep.log_skipped(log, settings.name, _SKIPPED.get(settings.format, "record(s)"))  # built or mapped
                if rep.malformed:
                    log.warning(
                        "feed %s: %d malformed record(s) skipped, e.g. %s",
                        settings.name,
                        rep.malformed,
                        "; ".join(rep.examples),
                    )
                    self.alerts.raise_alert(
                        "KL_ALERT_FeedLoadedPartially", feed=settings.name, records=rep.records, malformed=rep.malformed
                    )
                updated.append((settings.name, rep.records))
            self.stats.reloads += 1
            wanted = {slot for slot, f in enumerate(feeds) if f.enabled}
            self._feed_states = {slot: st for slot, st in self._feed_states.items() if slot in wanted}
            self._forget_feed_series({f.name for f in feeds if f.enabled})
            gone = (set(self._snapshots) - wanted) | (stale - set(changed))
            if not changed and not gone and self._snapshots:
                log.debug("feeds.reload.complete reason=%s: nothing changed", reason)
                self._feeds_settled()
                return
            snapshots = {slot: snap for slot, snap in self._snapshots.items() if slot in wanted and slot not in stale}
            snapshots.update(changed)
            store = await asyncio.to_thread(IndicatorStore, snapshots)
            self._snapshots = snapshots
            self.matcher.use_store(store)
            if self.pool is not None:
                await self.pool.publish_store("store", snapshots)
            self.store_version += 1
            for name, records in updated:
                self.alerts.raise_alert("KL_ALERT_UpdatedFeed", feed=name, records=records)
            loaded = {snap.name: snap.report.records for snap in snapshots.values()}
            enabled = (f.name for f in self.config.feeds.feeds if f.enabled)
            self.stats.feed_records = {name: loaded.get(name, 0) for name in enabled}  # 0: no version loaded
            log.info(
                "feeds loaded (%s): %d indicator(s) from %d feed(s) in %.2f s",
                reason,
                len(store),
                len(snapshots),
                time.monotonic() - started,
            )
            self._feeds_settled()
            # Once this frame (which still holds the replaced versions) is gone, under the reload lock, so
            # a file a concurrent reload has just built and not yet mapped is never taken for unused.
            self._spawn(self._remove_unused_snapshots())

    def _forget_feed_series(self, enabled: set[str]) -> None:
        """Per-feed gauges only for enabled feeds: a feed disabled or removed at SIGHUP leaves no stale series."""
        s = self.stats
        s.feed_records = {k: v for k, v in s.feed_records.items() if k in enabled}
        s.feed_malformed = {k: v for k, v in s.feed_malformed.items() if k in enabled}
        s.feed_skipped = {k: v for k, v in s.feed_skipped.items() if k in enabled}
        s.snapshot_loads = {k: v for k, v in s.snapshot_loads.items() if k[0] in enabled}
        s.snapshot_rebuilds = {k: v for k, v in s.snapshot_rebuilds.items() if k[0] in enabled}

    def snapshot_dir(self) -> SnapshotDir:
        """The directory of feed snapshots (``<Feeds snapshot_dir>``; a temporary one for a config built in code)."""
        if self._snapshot_dir is None:
            path = self.config.feeds.snapshot_dir or tempfile.mkdtemp(prefix="threatgate-snapshots-")
            self._snapshot_dir = SnapshotDir(path)
        return self._snapshot_dir

    async def _prepare_snapshot_dir(self) -> FeedError | None:
        """Create the snapshot directory (0700) and clear what a crash left; why it is unusable, or None."""
        directory = self.snapshot_dir()
        try:
            await asyncio.to_thread(directory.prepare)
        except OSError as exc:
            return FeedError(f"snapshot directory {directory.path}: {os_reason(exc)}")
        return None

    async def _load_version(
        self, settings: FeedSettings, unusable: FeedError | None = None
    ) -> tuple[Identity, FeedSnapshot | FeedError]:
        """One load attempt: the identity of the version and it, or why it failed.

        Unchanged bytes and settings map their existing snapshot (no parse); otherwise a worker process
        builds one.
        """
        tried = feed_identity(settings)  # before reading: a change during the load is seen as a change
        if unusable is not None:
            return tried, unusable
        try:
            identity, found = await self._map_unchanged(settings)
            if found is not None:
                return identity, found
            snap = await self._build(settings)
        except FeedError as exc:
            return tried, exc
        except Exception as exc:  # a defect or MemoryError: this feed fails, never the whole reload
            log.exception("feed %s: unexpected failure while loading it", settings.name)
            return tried, FeedError(f"{settings.path}: unexpected failure while loading it: {describe(exc)}")
        return snap.identity, snap

    async def _map_unchanged(self, settings: FeedSettings) -> tuple[Identity, FeedSnapshot | None]:
        """The trusted snapshot of the feed's current bytes, mapped; None when there is none.  One that is
        not to be trusted is logged at WARNING with the reason, counted and removed (then rebuilt).

        Raises:
            FeedError: the feed cannot be read.
        """
        directory = self.snapshot_dir()
        identity, digest = await asyncio.to_thread(source_digest, settings)
        found = await asyncio.to_thread(directory.map_existing, settings, identity, digest)
        if isinstance(found, Refused):
            self.stats.bump(self.stats.snapshot_rebuilds, (settings.name, found.reason))
            log.warning(
                "feed %s: snapshot %s not trusted (%s: %s); removed, rebuilding it from the feed",
                settings.name,
                found.path,
                found.reason,
                found.detail,
            )
            return identity, None
        if found is not None:
            self.stats.bump(self.stats.snapshot_loads, (settings.name, "mapped"))
            log.info(
                "feed %s: unchanged, snapshot %s mapped (%d records, not parsed)",
                settings.name,
                os.path.basename(found.path or ""),
                len(found),
            )
        return identity, found

    async def _build(self, settings: FeedSettings) -> FeedSnapshot:
        """Build the feed's snapshot and map it: in a worker process (at most one per core at once), or for
        a small feed (``snapshots.IN_PROCESS_BELOW``) in a thread.

        Raises:
            FeedError: the feed is not a feed, or its snapshot cannot be written or read back.
        """
        directory = self.snapshot_dir()
        started = time.monotonic()
        size = await asyncio.to_thread(source_size, settings)
        async with self._build_slots:
            if 0 <= size < snapshots.IN_PROCESS_BELOW:
                where = "in this process"
                built = await asyncio.to_thread(_build_here, directory.path, settings)
            else:
                where = "in a worker process"
                built = await build_in_worker(directory.path, settings)
        snap = await asyncio.to_thread(directory.map_built, settings, built)
        self.stats.bump(self.stats.snapshot_loads, (settings.name, "built"))
        log.info(
            "feed %s: snapshot %s built %s in %.2f s (%d records)",
            settings.name,
            os.path.basename(built.path),
            where,
            time.monotonic() - started,
            len(snap),
        )
        return snap

    async def _remove_unused_snapshots(self) -> None:
        """Remove snapshot files no feed version in memory uses (the live store's, and any an in-flight
        batch or export still holds)."""
        if self._snapshot_dir is None:
            return
        async with self._reload_lock:
            gc.collect()  # versions swapped out just now are usually garbage already
            in_use = [s.path for s in FeedSnapshot.live() if s.path]
            removed = await asyncio.to_thread(self._snapshot_dir.remove_unused, in_use)
        if removed:
            log.info("removed %d snapshot file(s) no loaded feed version uses: %s", len(removed), ", ".join(removed))

    def feed_status(self) -> dict[str, tuple[bool, str]]:
        """Per enabled feed (by name): whether a version of it is in the store, and its state in words."""
        out: dict[str, tuple[bool, str]] = {}
        for slot, settings in enumerate(self.config.feeds.feeds):
            if not settings.enabled:
                continue
            snap = self._snapshots.get(slot)
            has = snap is not None and snap.settings.path == settings.path
            state = self._feed_states.get(slot)
            if state is None:
                status = "loaded" if has else "loading"
            elif state.error is None:
                status = "loaded"
            else:
                status = f"{'previous version kept' if has else 'not loaded'}: {state.error}"
            name = settings.name if settings.name not in out else settings.path
            out[name] = (has, status)
        return out

    def _feeds_settled(self) -> None:
        """After a reload: refresh the per-feed load-time gauge; log once when feeds make the node (not) ready."""
        self.stats.feed_loaded_at = {
            st.settings.name: int(st.loaded_at) for st in self._feed_states.values() if st.settings.enabled
        }
        missing = tuple(name for name, (has, _) in self.feed_status().items() if not has)
        if missing == self._unready_feeds:
            return
        if missing:
            log.warning(
                "node not ready (/readyz answers 503): no loaded version of feed(s) %s; "
                "events are still matched against the other feeds",
                ", ".join(missing),
            )
        else:
            log.info("node ready: every enabled feed is loaded")
        self._unready_feeds = missing

    async def _watch_feeds(self) -> None:
        """Reload a feed whose file changed within seconds, whatever update_frequency says (node/feedwatch.py)."""
        watch: FeedWatch[int] = FeedWatch(settle=WATCH_INTERVAL / 2)
        async for _ in runtime.ticks(self._should_exit, WATCH_INTERVAL):
            try:
                await self._watch_once(watch)
            except Exception:  # a watch bug must never take the node down
                log.exception("feed file watch failed; trying again in %.0f s", WATCH_INTERVAL)
            self._account_read_failures()

    def _account_read_failures(self) -> None:
        self.read_failures.check(self._snapshots.values())

    async def _watch_users(self) -> None:
        """<Users> edited in the file apply without a reload (node/auth.py NodeUsers); a loop of its own,
        so a long feed reload never delays a removed user's refusal."""
        async for _ in runtime.ticks(self._should_exit, WATCH_INTERVAL):
            await self.auth.check()

    async def _watch_once(self, watch: FeedWatch[int]) -> None:
        feeds = {slot: f for slot, f in enumerate(self.config.feeds.feeds) if f.enabled}
        current = await asyncio.to_thread(_identities, feeds)
        tried = {slot: st.tried for slot, st in self._feed_states.items() if feeds.get(slot) == st.settings}
        due = watch.observe(time.monotonic(), current, tried)
        if due:
            names = ", ".join(feeds[slot].name for slot in due)
            await self._reload_logged(f"file changed: {names}", only=due)

    # -- REST API suppliers ---------------------------------------------------------------------

    async def db_call(self, fn: Callable[[SupplierDB], T]) -> T:
        """Run one SupplierDB transaction in a worker thread (SQLite must not block matching)."""
        db = self.db
        assert db is not None, "the API runs only with a database"
        return await asyncio.to_thread(fn, db)

    async def apply_suppliers(self, changed: Collection[str] | None) -> None:
        """Rebuild the supplier store from the database and swap it into the matcher.

        Only the suppliers named in ``changed`` (None = all) are read back from SQLite, and any whose
        attributes differ from the cached ones; the others keep their snapshots, so a push to one
        supplier does not re-read every other supplier's indicators.  Callers name every supplier a
        request touched (a deleted and re-created name reuses nothing).  Serialised: the rebuild that starts last reads
        every commit before it, so the store never goes back to an older state.  Returns once the
        change detects in event matching.
        """
        db = self.db
        if db is None:
            return
        async with self._suppliers_lock:
            cache = self._supplier_snapshots
            shared = self.workers > 1  # over sealed memfds: the workers map the same pages

            def build() -> tuple[IndicatorStore, dict[int, tuple[Supplier, list[FeedSnapshot]]]]:
                kept: dict[int, tuple[Supplier, list[FeedSnapshot]]] = {}
                snapshots: dict[int, FeedSnapshot] = {}
                for supplier in db.suppliers():
                    if supplier.status != "enabled":
                        continue
                    old = cache.get(supplier.id)
                    if old is None or old[0] != supplier or changed is None or supplier.name in changed:
                        old = (supplier, supplier_snapshots(supplier, db.indicator_rows(supplier.id), shared))
                    kept[supplier.id] = old
                    for i, snap in enumerate(old[1]):
                        snapshots[SUPPLIER_SLOT_BASE + supplier.id * 2 + i] = snap
                return IndicatorStore(snapshots), kept

            store, self._supplier_snapshots = await asyncio.to_thread(build)
            self.matcher.use_suppliers(store)
            if self.pool is not None:
                await self.pool.publish_store("suppliers", store.snapshots)
            self.store_version += 1
            log.debug("supplier store swapped: %r", store)

    async def _expire_loop(self) -> None:
        """Delete API indicators past their supplier's retention, once a minute."""
        async for _ in runtime.ticks(self._should_exit, 60):
            if self.db is None:
                return
            try:
                await self._expire()
            except Exception:
                log.exception("retention sweep failed; will retry")

    async def _expire(self) -> None:
        """One retention sweep.  In a cluster only the Control sweeps, and publishes the result as settings."""

        async def sweep() -> list[str]:
            changed = await self.db_call(lambda db: db.expire())
            if changed:
                await self.apply_suppliers(changed)
            return changed

        cluster = self.cluster
        if cluster is None:
            changed, where = await sweep(), ""
        elif cluster.may_write():
            changed, doc = await cluster.commit_suppliers(None, sweep, unchanged=lambda names: not names)
            where = f" (settings {doc.short()})"
        else:
            return  # a Secondary gets the Control's sweep as settings
        if changed:
            log.info("retention expired indicators of %s%s", ", ".join(changed), where)

    def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` answers (docs/api.md).

        Ready once start-up is done and every enabled feed has a loaded version; ``feeds`` gives each
        enabled feed's state, ``reason`` why the node is not ready, ``max_event_size`` the longest
        event accepted (a balancer learns the limit from it).  Role and digest in a cluster.
        """
        feeds = self.feed_status()
        missing = [name for name, (has, _) in feeds.items() if not has]
        pool = self.pool
        starting = self.workers > 1 and (pool is None or not pool.accepting)
        running = 1 if pool is None else pool.ready_workers()
        ready = self.ready and not starting and not missing and running > 0 and not self.draining
        out: dict[str, Any] = {
            "ready": ready,
            "role": "standalone",
            "max_event_size": self.config.input.max_event_size,
            # Constant while workers restart: a balancer keeps its lanes, and the master spreads them again.
            "event_connections": min(self.workers, self.config.service.scanners_count),
            "workers": {"configured": self.workers, "ready": 0 if starting else running},
            "feeds": {name: status for name, (_, status) in feeds.items()},
        }
        if self.draining:
            out["reason"] = "draining"
        elif not self.ready:
            out["reason"] = "starting: feeds are still loading"
        elif starting:
            out["reason"] = "starting: worker processes are starting"
        elif missing:
            out["reason"] = f"no loaded version of feed(s) {', '.join(missing)}"
        elif not running:
            out["reason"] = "no worker running (restarting)"
        if self.cluster is not None:
            out.update(self.cluster.readiness())
        return out

    async def statistics(self) -> dict[str, Any]:
        """What ``/statz`` answers: the node's detection counters, its workers' fresh reports included."""
        pool = self.pool
        if pool is None:
            return detection_statistics(self.stats, self.started_at)
        await pool.refresh()
        return detection_statistics(pool.total(self.stats), self.started_at)

    def _gate(self, port: str, tls: TLSListener | ssl.SSLContext | None = None) -> Gate:
        """The door of one of the node's ports: its ``<AllowedSources>``, and TLS when given (net/gate.py);
        kept in :attr:`gates`, so a reload gives it a new list."""
        config = self.config
        return self.gates.open(port, config.allowed_sources, self._handshake_timeout(config, port), tls)

    @staticmethod
    def _handshake_timeout(config: NodeConfig, port: str) -> float:
        """The TLS handshake deadline of a port: the API's request-header timeout, else HandshakeTimeout."""
        if port == "api" and config.http is not None:
            return config.http.header_timeout
        return config.service.handshake_timeout

    async def _ensure_event_pair(self) -> None:
        """An event TLS pair of its own (not the HTTPS one, made by _start_http) is created like it when missing."""
        tls, http = self.config.input.tls, self.config.http
        if tls is None or (http is not None and (tls.cert_path, tls.key_path) == (http.cert_path, http.key_path)):
            return
        host = (tls.listen or self.config.input.listen).host
        await asyncio.to_thread(
            ensure_server_pair,
            tls.cert_path,
            tls.key_path,
            common_name=f"threatgate node {host}",
            hosts=sorted({host, "127.0.0.1", "localhost"} - {"0.0.0.0", "::"}),
        )

    async def _start_http(self) -> None:
        settings = self.config.http
        if settings is None:
            return
        host = settings.listen.host
        pair = await asyncio.to_thread(
            ensure_server_pair,
            settings.cert_path,
            settings.key_path,
            common_name=f"threatgate node {host}",
            hosts=sorted({host, "127.0.0.1", "localhost"} - {"0.0.0.0", "::"}),
        )
        del pair  # ensure_server_pair logged the certificate and its SHA-256 fingerprint
        if not settings.users:
            how = "threatgate cluster users add, on the Control" if self.config.cluster else "threatgate users add"
            log.warning("<HTTPServer> has no <Users>: every API request will get 401 (add one: %s)", how)
        self.db = await asyncio.to_thread(SupplierDB, settings.database)
        self.http = HTTPServer(
            self.api.handle,
            address=settings.listen,
            gate=self._gate("api", server_context(settings.cert_path, settings.key_path)),
            header_timeout=settings.header_timeout,
            idle_timeout=settings.idle_timeout,
            count=self.api.count,
        )
        await self.http.start()
        self.listening.add("api", self.http.sockname)
        log.info("REST API listening on https://%s:%d/api/1.1/", host, self.http.bound_port)

    # -- configuration ------------------------------------------------------------------------

    async def reload_config(self, reason: str = "SIGHUP") -> None:
        """SIGHUP: re-read the config file; apply rules, formats, feeds, users, exports in place.

        On a cluster node the shared elements come from the applied cluster settings, not from the
        file (docs/cluster.md).  An invalid file is refused and the running configuration kept.
        """
        try:
            if self.cluster is not None:
                new = await asyncio.to_thread(self.cluster.reload_local) or self.config
            else:
                new = await asyncio.to_thread(load_node_config, self.config.path)
        except (ConfigError, SettingsRejected) as exc:
            log.error("configuration not reloaded, keeping the running one: %s", exc)
            self.alerts.raise_alert("KL_ALERT_FailedToUpdateConfiguration", error=str(exc))
            return
        await self.apply_config(new, reason)

    async def apply_cluster_settings(self, new: NodeConfig, state: dict[str, Any] | None) -> None:
        """Apply settings received from the cluster: the supplier database (``state``), then the config.

        Event connections stay open throughout; the matcher is swapped under them.
        """
        if state is not None:
            await self.db_call(lambda db: db.replace_state(state))
        if new != self.config:
            await self.apply_config(new, "cluster settings")
        if state is not None:
            await self.apply_suppliers(None)

    async def apply_config(self, new: NodeConfig, reason: str) -> None:
        """Swap in a validated config in place.

        Event connections stay open (they pick up the new matcher with their next batch).  What
        needs a restart (config/reload.py: listen addresses, TLS files, the database path...) is
        reported, not applied, and kept so in ``threatgate_config_restart_required``.
        """
        old = self.config
        self.restart.reloaded(new, log)
        self.config = new
        self._apply_output(new)
        self.listener.limits = listener_limits(new)
        matcher = make_matcher(new, self.matcher.store, self.engine)
        matcher.use_suppliers(self.matcher.suppliers)
        self.matcher = matcher
        if self.pool is not None:
            self.pool.publish_config(new)
        if _alert_settings(old) != _alert_settings(new):  # else keep the connection and its queue
            old_alerts = self.alerts
            self.alerts = Alerts(new, self.stats)
            if self.alerts.sender is not None:
                self.alerts.sender.start()
            if old_alerts.sender is not None:
                self._spawn(old_alerts.sender.aclose(successor=self.alerts.sender))
        self.auth.replace(_users(new), None if new.cluster else new.path)
        if self.http is not None and new.http is not None:
            self.http.header_timeout = new.http.header_timeout
        for change in self.gates.apply(new.allowed_sources, lambda port: self._handshake_timeout(new, port)):
            log.info("allowed sources now: %s", change)
        self.exports = Exports(self)
        self.store_version += 1
        log.info("configuration reloaded from %s", new.path)
        self.alerts.raise_alert("KL_ALERT_ConfigurationUpdated")
        await self.reload_feeds(reason)

    def _apply_output(self, new: NodeConfig) -> None:
        """A new destination gets a new sender; the old one flushes for 2 s and hands over the rest."""
        self.output, old = next_output(self.output, new, self._output_dropped)
        if old is not None:
            self.output.start()
            log.info("detections now go to %s (were %s)", new.output.destination, old.address)
            self._spawn(old.aclose(successor=self.output))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle ----------------------------------------------------------------------------

    async def startup(self) -> None:
        await self._start_http()  # first, so API clients get 425 rather than a refused connection
        if self.cluster is not None:
            await self.cluster.start()
        await self.reload_feeds("startup")
        await self.apply_suppliers(None)
        self.ready = True
        listen = self.config.input.listen
        await self._ensure_event_pair()
        if self.workers > 1:
            await self._start_pool()
        else:
            servers = await start_servers(
                "events",
                lambda: EventConnection(self),
                listen.host,
                listen.port,
                self.config.input.tls,
                lambda tls: self._gate("events", tls),
            )
            self._servers = [server for _, server in servers]
            for name, server in servers:
                self.listening.add(name, server.sockets[0].getsockname())
            self.bound_port = servers[0][1].sockets[0].getsockname()[1]
            self.listener.start_sweeps()
            self.output.start()
        if self.alerts.sender is not None:
            self.alerts.sender.start()
        if self.config.service.metrics is not None:
            await self._start_metrics()
        log.info(
            "node listening for events on %s:%d (ScannersCount %d, %s matching engine, %s)",
            listen.host,
            self.bound_port,
            self.config.service.scanners_count,
            self.engine,
            f"{self.workers} worker processes" if self.pool is not None else "one process",
        )
        self.alerts.raise_alert("KL_ALERT_ServiceStarted")
        self._started = True

    async def _start_pool(self) -> None:
        """``<Workers>`` >= 2: the master listens and hands connections to worker processes (node/pool.py)."""
        listen, tls = self.config.input.listen, self.config.input.tls
        sock = socket.create_server((listen.host, listen.port), backlog=1024, reuse_port=False)
        self.bound_port = self.listening.add("events", sock.getsockname())[1]
        listening = [(sock, tls is not None and tls.listen is None)]
        if tls is not None and tls.listen is not None:
            twin = socket.create_server((tls.listen.host, tls.listen.port), backlog=1024, reuse_port=False)
            self.listening.add("events_tls", twin.getsockname())
            listening.append((twin, True))
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        pool = WorkerPool(
            self.workers,
            self.config,
            self.engine,
            level,
            on_dropped=self._tally_drop,
            on_restart=lambda worker, status: self.alerts.raise_alert(
                "KL_ALERT_WorkerRestarted", worker=worker, status=status
            ),
            stats=self.stats,
        )
        self.pool = pool
        await pool.publish_store("store", self._snapshots)
        suppliers = self.matcher.suppliers
        await pool.publish_store("suppliers", suppliers.snapshots if suppliers is not None else {})
        if tls is not None:
            self._gate("events", tls)  # the workers run the handshakes: fail the start here if the files are bad
        await pool.start(listening, self._gate("events"))

    async def _start_metrics(self) -> None:
        address = self.config.service.metrics
        assert address is not None
        pool = self.pool
        gauges: Gauges = {
            "threatgate_active_connections": (
                "Event connections holding a scanner",
                lambda: pool.active_connections() if pool is not None else len(self.listener.active),
            ),
            "threatgate_indicators": ("Indicators in the live store", lambda: len(self.matcher.store)),
            "threatgate_config_restart_required": (
                "1 while the configuration file differs from the running one in something that needs a restart",
                self.restart.gauge,
            ),
            "threatgate_ready": ("1 when /readyz answers ready, else 0", lambda: float(self.readiness()["ready"])),
        }
        if self.cluster is not None:
            gauges.update(self.cluster.gauges())
        senders = queue_gauges(lambda: (self.output, self.alerts.sender))
        if pool is None:
            collector = StatsCollector(self.stats, gauges, senders)
            self._metrics = await start_metrics_server(address, collector, gate=self._gate("metrics"))
        else:
            queued = pool.queued
            senders["threatgate_output_queue_lines"] = (
                senders["threatgate_output_queue_lines"][0],
                "destination",
                lambda: {"detections": float(queued()[1]), **_alert_queue(self.alerts.sender, "lines")},
            )
            senders["threatgate_output_queue_bytes"] = (
                senders["threatgate_output_queue_bytes"][0],
                "destination",
                lambda: {"detections": float(queued()[0]), **_alert_queue(self.alerts.sender, "bytes")},
            )
            collector = StatsCollector(lambda: pool.total(self.stats), gauges, senders)
            self._metrics = await start_metrics_server(
                address, collector, pool.collector(), before=pool.refresh, gate=self._gate("metrics")
            )
        _, port = self.listening.add("metrics", self._metrics.address)
        log.info("metrics on http://%s/metrics", Address(address.host, port))

    async def main_loop(self) -> None:
        if self.db is not None:
            self._spawn(self._expire_loop())
        self._spawn(self._watch_feeds())
        self._spawn(self._watch_users())
        loop = asyncio.get_running_loop()
        armed, due = 0, 0.0  # the UpdateFrequency the schedule runs on, and when its next reload is
        async for _ in runtime.ticks(self._should_exit, 1.0):
            minutes = self.config.feeds.update_frequency  # a SIGHUP may change it, from or to 0
            if not minutes:
                armed = 0
                continue
            now = loop.time()
            if minutes != armed:
                armed, due = minutes, now + minutes * 60
            elif now >= due:
                due = now + minutes * 60
                await self._reload_logged("schedule")

    async def _reload_logged(self, reason: str, only: Collection[int] | None = None) -> None:
        try:
            await self.reload_feeds(reason, only)
        except Exception:  # a reload bug must never take the node down
            log.exception("feed reload (%s) failed; the previous store stays in use", reason)

    def request_reload(self) -> None:
        self._spawn(self._reload_config_logged())

    async def _reload_config_logged(self) -> None:
        try:
            await self.reload_config()
        except Exception:  # a reload bug must never take the node down
            log.exception("configuration reload failed; the previous configuration stays in use")

    def request_exit(self) -> None:
        self._should_exit.set()

    async def shutdown(self) -> None:
        """Stop accepting, drain the event connections, flush the senders (all within DrainTimeout), stop the rest.

        From the first step ``/readyz`` answers 503 "draining" (the REST API stops last), so a
        balancer polling readiness sends nothing more here (docs/operations.md, "Stopping").
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = self.config.service.drain_timeout
        deadline = started + timeout
        self.draining = True
        if self.pool is not None:  # the workers drain their connections; the master waits for them
            log.info(
                "node draining: %d event connection(s) in %d worker(s), up to %g s",
                self.pool.active_connections(),
                self.pool.ready_workers(),
                timeout,
            )
            drained = await self.pool.drain(timeout)
            await self.pool.close()
        else:
            for server in self._servers:
                server.close()  # first: new connections are refused from here
            if self._servers:
                log.info("node draining: %d event connection(s), up to %g s", len(self.listener.active), timeout)
            drained = await self.listener.drain(timeout)
        if self._started:
            self.alerts.raise_alert("KL_ALERT_ServiceStopped")
        await self.output.aclose(max(remaining(deadline, loop.time()), FLUSH_FLOOR))
        if self._drop_timer is not None:
            self._drop_timer.cancel()
        if self.alerts.sender is not None:
            await self.alerts.sender.aclose(max(remaining(deadline, loop.time()), FLUSH_FLOOR))
        if self._servers or self.pool is not None:
            log_drained(log, "node", drained, loop.time() - started, timeout)
        if self.cluster is not None:
            await self.cluster.close()
        if self._metrics is not None:
            await self._metrics.close()
        if self.http is not None:
            await self.http.close()
        for task in list(self._tasks):
            task.cancel()
        if self.db is not None:
            self.db.close()
        for server in self._servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)


def _users(config: NodeConfig) -> dict[str, str]:
    return dict(config.http.users) if config.http else {}


def _alert_queue(sender: LineSender | None, what: str) -> dict[str, float]:
    if sender is None:
        return {}
    return {sender.name: float(sender.queued_lines if what == "lines" else sender.queued_bytes)}


def _alert_settings(config: NodeConfig) -> tuple[object, ...]:
    out = config.output
    return (out.alert_format, out.alert_destination, out.retries_count, out.retries_timeout, out.record_field_format)


def _build_here(directory: str, settings: FeedSettings) -> snapshots.Built:
    """A small feed's snapshot, built in this process (blocking); a write error becomes a failed load."""
    try:
        return build_snapshot(directory, settings)
    except (FileWriteError, OSError) as exc:
        raise snapshots.write_failure(settings, directory, exc) from None


def _identities(feeds: dict[int, FeedSettings]) -> dict[int, Identity]:
    return {slot: feed_identity(settings) for slot, settings in feeds.items()}


def _kept(old: FeedSnapshot | None) -> str:
    return f"keeping the previous version ({old.report.records} records)" if old else "no previous version to keep"
