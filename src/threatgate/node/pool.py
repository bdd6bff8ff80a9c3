"""The master's side of a node with worker processes (``<Workers>`` >= 2): accept, hand over, supervise.

The master never matches events.  It accepts every event connection and passes its descriptor to
the READY worker with the fewest connections (node/spread.py), which serves it for its whole life:
one connection, one worker, so ReplyBack, SendFinishedEvent and per-event order are those of one
process.  A balancer opens one connection per worker (``/readyz`` ``event_connections``).

Everything the node loads is loaded once, here, and *published* to the workers over their control
channels (node/ipc.py): the configuration, the feed snapshots (their open descriptors: every worker
maps the same files, one copy in the page cache) and the API supplier snapshots (sealed memfds).
Publishing a store waits until every READY worker has applied it (bounded), so a REST push detects
on every worker when its request is answered.

Workers are restarted with a bounded backoff when they exit (node/supervisor.py); their
connections close with them, and a balancer re-sends what they had not answered.  Counters are the
sum over the master, every worker's last report and the last report of every worker that exited.

asyncio edge only: the decisions are in spread.py and supervisor.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import socket
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from threatgate.config.node import NodeConfig
from threatgate.fs import os_reason
from threatgate.log import RateLimitedLog
from threatgate.net.drain import DrainResult
from threatgate.net.gate import Gate, reset
from threatgate.node.feeds import FeedSnapshot, SnapshotRef
from threatgate.node.ipc import MAX_FDS, Channel, Message, channel_pair
from threatgate.node.procmem import memory
from threatgate.node.snapfile import to_memfd
from threatgate.node.spread import ScannerSlots, Spread, shed_from
from threatgate.node.supervisor import Supervisor
from threatgate.stats import NodeStats, sum_stats

log = logging.getLogger("threatgate.node")

EXIT_GRACE = 2.0
"""Seconds a worker that closed its control channel has to exit before it is killed."""
START_TIMEOUT = 60.0
"""Seconds a worker may take from its start to READY (mapping snapshots of many millions of indicators)."""
APPLY_TIMEOUT = 1.0
"""Seconds a published store may take to be applied by every READY worker before the master goes on (logged)."""
SHED_EVERY = 3.0
"""Seconds between two requests to shed a connection (the workers' reports catch up meanwhile)."""
STATS_TIMEOUT = 0.2
"""Seconds a scrape waits for fresh counters from the workers (else their last report, at most 1 s old)."""


@dataclass(eq=False)
class Incarnation:
    """One run of one worker process."""

    worker: int
    process: asyncio.subprocess.Process
    channel: Channel
    started: float
    ready: bool = False
    stats: NodeStats = field(default_factory=NodeStats)
    active: int = 0
    idle: list[tuple[int, float]] = field(default_factory=list)
    queued: tuple[int, int] = (0, 0)
    applied: dict[str, int] = field(default_factory=dict)
    gone: bool = False
    fresh: asyncio.Event = field(default_factory=asyncio.Event)  # set by each stats report
    drained: DrainResult | None = None


class WorkerPool:
    """The worker processes of one node and the connections handed to them."""

    def __init__(
        self,
        count: int,
        config: NodeConfig,
        engine: str,
        log_level: str,
        on_dropped: Callable[[str, str, int], None],
        on_restart: Callable[[int, int | None], None],
        stats: NodeStats,
    ) -> None:
        self.count = count
        self.config = config
        self.engine = engine
        self.log_level = log_level
        self._on_dropped = on_dropped
        self._on_restart = on_restart
        self.supervisor = Supervisor(count)
        self.spread = Spread(count)
        self.slots = ScannerSlots(config.service.scanners_count)
        self.current: list[Incarnation | None] = [None] * count
        self.retired = NodeStats()  # the last report of every worker that exited: counters never go back
        self.restarts = [0] * count
        self._conn_ids = itertools.count(1)
        self._generation = itertools.count(1)
        self._published: dict[str, tuple[int, Any, list[int]]] = {}
        self._memfds: weakref.WeakKeyDictionary[FeedSnapshot, int] = weakref.WeakKeyDictionary()
        self._evictions: dict[tuple[int, int], tuple[int, int]] = {}  # victim -> the connection waiting for it
        self._changed = asyncio.Event()  # set whenever a worker became READY, applied a store or exited
        self._listening: list[tuple[socket.socket, bool]] = []  # (socket, speaks TLS): the event port and its twin
        self._door: Gate | None = None  # the events port's allow-list, checked here before a connection is passed
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervising: asyncio.Task[None] | None = None
        self.warn_refused = RateLimitedLog(log)
        self.warn_evict = RateLimitedLog(log)
        self.stats = stats  # the master's: connections it closed because no worker could take them
        self._last_shed = 0.0
        self._nothing_to_shed: dict[int, int] | None = None  # the counts when the fullest had nothing to shed

    # -- start and supervise ---------------------------------------------------------------------

    async def start(
        self, listening: list[tuple[socket.socket, bool]], door: Gate, ready_within: float = START_TIMEOUT
    ) -> None:
        """Start every worker, then accept on ``listening`` once they are all READY, or once one is and
        another has failed to start (it is restarted meanwhile), or after ``ready_within`` at most.

        ``listening`` are the event port and, during a TLS migration, its TLS twin, each with whether it
        speaks TLS (the worker runs the handshake: net/gate.py).  ``door`` refuses a source outside the
        port's ``<AllowedSources>`` here, before the connection is passed or a byte read."""
        loop = asyncio.get_running_loop()
        self._supervising = loop.create_task(self._supervise())
        for worker in self.supervisor.start():
            await self._spawn(worker)

        def settled() -> bool:
            ready = self.ready_workers()
            return ready == self.count or (ready > 0 and any(self.restarts))

        await self._wait_until(settled, ready_within)
        if not self.ready_workers():
            log.error("no worker became ready within %.0f s; listening anyway (connections wait for one)", ready_within)
        for sock, _ in listening:
            sock.setblocking(False)
        self._listening = listening
        self._door = door
        self._watch_listening(True)

    def _watch_listening(self, on: bool) -> None:
        loop = asyncio.get_running_loop()
        for sock, tls in self._listening:
            if on:
                loop.add_reader(sock.fileno(), self._accept, sock, tls)
            else:
                loop.remove_reader(sock.fileno())

    async def _spawn(self, worker: int) -> None:
        try:
            ours, theirs = channel_pair()
        except OSError as exc:
            log.error("worker %d could not be started: %s", worker, os_reason(exc))
            self.supervisor.spawned(worker, 0, time.monotonic())
            self._exited(worker, None)
            return
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "threatgate.node.worker",
                str(theirs.fileno()),
                str(worker),
                self.log_level,
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            log.error("worker %d could not be started: %s", worker, os_reason(exc))
            self.supervisor.spawned(worker, 0, time.monotonic())
            self._exited(worker, None)
            return
        finally:
            theirs.close()
        now = time.monotonic()
        holder: list[Incarnation] = []
        channel = Channel(ours, lambda m: self._on_message(holder[0], m), lambda: self._on_eof(holder[0]), log)
        inc = Incarnation(worker, process, channel, now)
        holder.append(inc)
        self.current[worker] = inc
        self.supervisor.spawned(worker, process.pid, now)
        log.info("worker %d started (pid %d)", worker, process.pid)
        channel.send("hello", (self.config, self.engine))
        for kind in ("store", "suppliers"):
            if kind in self._published:
                self._send_store(inc, kind)
        channel.send("go")
        self._spawn_task(self._wait_exit(inc))

    async def _wait_exit(self, inc: Incarnation) -> None:
        status = await inc.process.wait()
        self._gone(inc, status)

    def _on_eof(self, inc: Incarnation) -> None:
        """The worker's end closed: it is exiting (or gone); its exit status follows.  It gets no new
        connection from now on (a health check handed to a dead worker would find the node down)."""
        self.spread.set_ready(inc.worker, False)
        if not inc.gone and not self.supervisor.draining:
            # A worker without its channel cannot be told anything: it exits by itself, or is ended.
            asyncio.get_running_loop().call_later(EXIT_GRACE, self._end, inc)

    def _end(self, inc: Incarnation) -> None:
        if not inc.gone and inc.process.returncode is None:
            log.error(
                "worker %d (pid %d) closed its control channel and did not exit; killing it",
                inc.worker,
                inc.process.pid,
            )
            with contextlib.suppress(ProcessLookupError):
                inc.process.kill()

    def _gone(self, inc: Incarnation, status: int | None) -> None:
        if inc.gone:
            return
        inc.gone = True
        inc.channel.close()
        self._notify()  # a publish or the start-up waiting for this worker goes on without it
        self.retired = sum_stats(NodeStats(), [self.retired, inc.stats])
        worker = inc.worker
        if self.current[worker] is inc:
            self.current[worker] = None
            self._exited(worker, status)

    def _exited(self, worker: int, status: int | None) -> None:
        lost = self.spread.worker_gone(worker)
        self.slots.worker_gone(worker)
        for victim, waiting in list(self._evictions.items()):
            if waiting[0] == worker:  # the newcomer's worker is gone: no slot for it
                del self._evictions[victim]
            elif victim[0] == worker:  # the victim went with its worker: that freed its slot
                del self._evictions[victim]
                self._answer_slot(waiting, self.slots.request(*waiting))
        outcome = self.supervisor.exited(worker, time.monotonic())
        if outcome.restart_in is None:
            log.info("worker %d (pid %d) exited with status %s", worker, outcome.pid, status)
            return
        self.restarts[worker] += 1
        log.error(
            "worker %d (pid %d) exited with status %s; its %d connection(s) closed; restarting it in %.1f s",
            worker,
            outcome.pid,
            _status(status),
            len(lost),
            outcome.restart_in,
        )
        self._on_restart(worker, status)

    async def _supervise(self) -> None:
        """Restart workers whose backoff has passed; kill hung ones; even out connections after a restart."""
        while True:
            await asyncio.sleep(0.1)
            try:
                await self._supervise_once(time.monotonic())
            except Exception:  # a defect here must not end supervision: logged, tried again
                log.exception("worker supervision failed; trying again")

    async def _supervise_once(self, now: float) -> None:
        self._balance(now)
        for worker in self.supervisor.due(now):
            await self._spawn(worker)
        for worker in self.supervisor.hung(now):
            inc = self.current[worker]
            if inc is None or inc.process.returncode is not None:
                continue
            if inc.ready:
                why = f"sent nothing for {self.supervisor.hung_after:.0f} s"
            else:
                why = f"did not become ready within {self.supervisor.start_timeout:.0f} s"
            log.error("worker %d (pid %d) %s; killing it", worker, inc.process.pid, why)
            inc.process.kill()
            self.supervisor.heard(worker, now)  # once: its exit follows

    def _balance(self, now: float) -> None:
        """Ask the fullest worker to shed a connection when another holds two fewer (node/spread.py
        ``shed_from``): after a restart, the connections that reconnected meanwhile sit on the others.

        A worker sheds only a connection whose client re-sends what was not answered (the CyberTrace HA
        flags, as a balancer's lanes use); when it has none it says so, and it is not asked again until
        the counts change.
        """
        if self.supervisor.draining or now - self._last_shed < SHED_EVERY:
            return
        active = {i.worker: i.active for i in self._running() if i.ready}
        worker = shed_from(active)
        inc = self.current[worker] if worker is not None else None
        if inc is None or active == self._nothing_to_shed:
            return
        self._last_shed = now
        self._nothing_to_shed = None
        log.debug(
            "worker %d holds %d event connection(s), another %d: asking it to shed one",
            inc.worker,
            inc.active,
            min(active.values()),
        )
        inc.channel.send("shed")

    def _shed_answer(self, inc: Incarnation, peer: str | None) -> None:
        if peer is None:
            self._nothing_to_shed = active = {i.worker: i.active for i in self._running() if i.ready}
            log.info(
                "worker %d holds %d event connection(s), another %d: none can move (their clients did not ask "
                "for X-KF-ReplyBack and X-KF-SendFinishedEvent, so they could not send unanswered events again)",
                inc.worker,
                active.get(inc.worker, 0),
                min(active.values(), default=0),
            )
            return
        inc.active -= 1  # until its next report
        log.info(
            "worker %d closes the event connection from %s once it is owed nothing, to spread connections: "
            "its client sends what was not answered again and reconnects to a worker with fewer",
            inc.worker,
            peer,
        )

    # -- connections -------------------------------------------------------------------------------

    def _accept(self, listening: socket.socket, tls: bool) -> None:
        for _ in range(64):
            try:
                conn, addr = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the connection waits in the backlog
                self.warn_refused("cannot accept an event connection: %s; trying again in 1 s", os_reason(exc))
                self._watch_listening(False)  # the socket stays readable: without a pause this would spin
                asyncio.get_running_loop().call_later(1.0, self._watch_listening, True)
                return
            door = self._door
            if door is not None and not door.admits(str(addr[0])):
                door.refuse_source(str(addr[0]))
                reset(conn)
                continue
            with conn:
                self._hand_over(conn, tls)

    def _hand_over(self, conn: socket.socket, tls: bool) -> None:
        """Pass the connection to the READY worker with the fewest; one that just died is skipped."""
        for _ in range(self.count):
            worker = self.spread.assign(time.monotonic())
            inc = self.current[worker] if worker is not None else None
            if inc is None:
                break
            conn_id = next(self._conn_ids)
            if inc.channel.send("conn", (conn_id, tls), [conn.fileno()]):
                self.spread.opened(inc.worker, conn_id)
                return
            if inc.channel.peer_gone:
                self.spread.set_ready(inc.worker, False)  # its exit is handled when the master sees it
        self.stats.bump(self.stats.connections, "no_worker")
        self.warn_refused(
            "no worker can take an event connection (workers restarting): closed; "
            'see threatgate_connections_total{outcome="no_worker"}'
        )

    # -- messages ------------------------------------------------------------------------------------

    def _on_message(self, inc: Incarnation, message: Message) -> None:
        for fd in message.fds:  # a worker sends no descriptors
            os.close(fd)
        if inc.gone:
            return
        self.supervisor.heard(inc.worker, time.monotonic())
        kind, payload = message.kind, message.payload
        if kind == "stats":
            if payload is not None:
                inc.stats, inc.active, inc.idle, inc.queued = payload
            inc.fresh.set()
        elif kind == "slot?":
            self._slot_asked(inc, payload)
        elif kind == "closed":
            self.spread.closed(inc.worker, payload)
            self.slots.release(inc.worker, payload)
        elif kind == "evicted":
            self._evicted(inc, *payload)
        elif kind == "applied":
            what, generation = payload
            inc.applied[what] = generation
            self._notify()
        elif kind == "ready":
            inc.ready = True
            self.supervisor.ready(inc.worker, time.monotonic())
            self.spread.set_ready(inc.worker, True)
            log.info("worker %d ready (pid %d)", inc.worker, inc.process.pid)
            self._notify()
        elif kind == "dropped":
            self._on_dropped(*payload)
        elif kind == "shed":
            self._shed_answer(inc, payload)
        elif kind == "drained":
            inc.drained = payload
        else:
            log.error("worker %d sent an unknown control message %r (a defect)", inc.worker, kind)

    def _notify(self) -> None:
        self._changed.set()

    async def _wait_until(self, done: Callable[[], bool], seconds: float) -> bool:
        """Until ``done()`` holds (re-checked at each change), at most ``seconds``; whether it holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not done():
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return done()
        return True

    def _slot_asked(self, inc: Incarnation, conn_id: int) -> None:
        """ScannersCount, node-wide: grant, or evict the idlest connection of any worker, or refuse."""
        if self.slots.request(inc.worker, conn_id):
            inc.channel.send("slot", (conn_id, True))
            return
        idle = {i.worker: i.idle for i in self.current if i is not None}
        floor = self.config.service.handshake_timeout
        victim = self.slots.eviction_candidate(idle, time.time(), floor, exclude=self._evictions)
        holder = self.current[victim[0]] if victim is not None else None
        if victim is None or holder is None:
            inc.channel.send("slot", (conn_id, False))
            return
        self._evictions[victim] = (inc.worker, conn_id)
        holder.channel.send("evict", (victim[1], floor))

    def _evicted(self, holder: Incarnation, conn_id: int, ok: bool, peer: str) -> None:
        waiting = self._evictions.pop((holder.worker, conn_id), None)
        if ok:
            self.slots.release(holder.worker, conn_id)
            for i in holder.idle[:]:
                if i[0] == conn_id:
                    holder.idle.remove(i)
        if waiting is None:
            return
        waiter = self.current[waiting[0]]
        granted = ok and waiter is not None and not waiter.gone and self.slots.request(*waiting)
        if granted:
            self.warn_evict(
                "all %d scanners busy; closed the connection idle the longest (%s) for a new one",
                self.slots.scanners,
                peer,
            )
        self._answer_slot(waiting, granted)

    def _answer_slot(self, waiting: tuple[int, int], ok: bool) -> None:
        inc = self.current[waiting[0]]
        if inc is not None:
            inc.channel.send("slot", (waiting[1], ok))

    # -- publishing -------------------------------------------------------------------------------

    def publish_config(self, config: NodeConfig) -> None:
        """A new configuration (SIGHUP, cluster settings): every worker rebuilds its matcher with it."""
        self.config = config
        self.slots.scanners = config.service.scanners_count
        generation = next(self._generation)
        for inc in self._running():
            inc.channel.send("config", (generation, config))

    async def publish_store(self, kind: str, snapshots: dict[int, FeedSnapshot]) -> None:
        """Send a new store (``kind`` "store": feeds; "suppliers": API suppliers) and wait, at most
        APPLY_TIMEOUT, until every READY worker has applied it."""
        refs: list[tuple[int, SnapshotRef]] = []
        fds: list[int] = []
        for slot, snap in sorted(snapshots.items()):
            refs.append((slot, snap.ref()))
            fds.append(self._descriptor(snap))
        generation = next(self._generation)
        self._published[kind] = (generation, refs, fds)
        for inc in self._running():
            self._send_store(inc, kind)
        await self._wait_applied(kind, generation)

    def _descriptor(self, snap: FeedSnapshot) -> int:
        """The open descriptor of a snapshot's bytes: its file, or (built in memory) a sealed memfd made once."""
        fd = snap.index.fd
        if fd is not None:
            return fd
        memfd = self._memfds.get(snap)
        if memfd is None:  # a supplier snapshot built without ``shared``: copied into a memfd once
            memfd = to_memfd([snap.index.buffer], f"tg-{snap.name}")
            self._memfds[snap] = memfd
            weakref.finalize(snap, os.close, memfd)
        return memfd

    def _send_store(self, inc: Incarnation, kind: str) -> None:
        generation, refs, fds = self._published[kind]
        if not refs:
            inc.channel.send(kind, (generation, [], True))
        step = MAX_FDS - 1  # one left for the memfd of a large payload
        for start in range(0, len(refs), step):
            last = start + step >= len(refs)
            inc.channel.send(kind, (generation, refs[start : start + step], last), fds[start : start + step])

    async def _wait_applied(self, kind: str, generation: int) -> None:
        def done() -> bool:
            return all(i.applied.get(kind, 0) >= generation for i in self._running() if i.ready)

        if not await self._wait_until(done, APPLY_TIMEOUT):
            lagging = [i.worker for i in self._running() if i.ready and i.applied.get(kind, 0) < generation]
            log.warning(
                "worker(s) %s have not applied the new %s within %.0f s; they will shortly",
                ", ".join(map(str, lagging)),
                "feed store" if kind == "store" else "supplier store",
                APPLY_TIMEOUT,
            )

    # -- what the node reports ----------------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Start-up is over: the master accepts event connections (until SIGTERM)."""
        return bool(self._listening)

    def _running(self) -> list[Incarnation]:
        return [i for i in self.current if i is not None and not i.gone]

    def ready_workers(self) -> int:
        return sum(1 for i in self._running() if i.ready)

    def active_connections(self) -> int:
        return sum(i.active for i in self._running())

    def queued(self) -> tuple[int, int]:
        running = self._running()
        return sum(i.queued[0] for i in running), sum(i.queued[1] for i in running)

    def total(self, master: NodeStats) -> NodeStats:
        """The node's counters: the master's, plus every worker's last report, plus those that exited."""
        return sum_stats(master, [self.retired, *(i.stats for i in self._running())])

    async def refresh(self) -> None:
        """Ask every READY worker for fresh counters; wait at most STATS_TIMEOUT."""
        running = [i for i in self._running() if i.ready]
        for inc in running:
            inc.fresh.clear()
            inc.channel.send("stats?")
        if running:
            waits = [asyncio.ensure_future(i.fresh.wait()) for i in running]
            _, pending = await asyncio.wait(waits, timeout=STATS_TIMEOUT)
            for task in pending:  # a worker that did not answer in time: its last report counts
                task.cancel()

    def collector(self) -> PoolCollector:
        return PoolCollector(self)

    # -- stop -------------------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        for sock, _ in self._listening:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        self._listening = []

    async def drain(self, seconds: float) -> DrainResult:
        """SIGTERM: no new connections, every worker drains its own (bounded), then exits; stragglers are
        killed.  What the workers' drains did, summed (a worker killed counts its connections as cut)."""
        self.supervisor.drain()
        self.stop_accepting()
        running = self._running()
        for inc in running:
            inc.channel.send("drain", seconds)
        waits = [asyncio.ensure_future(i.process.wait()) for i in running]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=seconds + 2.0)
            for inc in running:
                if inc.process.returncode is None:
                    log.warning("worker %d (pid %d) did not drain in time; killing it", inc.worker, inc.process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        inc.process.kill()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        return _sum_drains(i.drained or DrainResult(i.active, 0, i.active, 0) for i in running)

    async def close(self) -> None:
        self.supervisor.drain()
        self.stop_accepting()
        if self._supervising is not None:
            self._supervising.cancel()
        for inc in self._running():
            with contextlib.suppress(ProcessLookupError):
                inc.process.send_signal(signal.SIGKILL)
        for task in list(self._tasks):
            task.cancel()

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class PoolCollector(Collector):
    """``threatgate_workers``, per-worker restarts, events, connections and memory."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        pool = self._pool
        states = GaugeMetricFamily("threatgate_workers", "Worker processes, by state", labels=["state"])
        for state, n in pool.supervisor.counts().items():
            states.add_metric([state], n)
        yield states
        restarts = CounterMetricFamily(
            "threatgate_worker_restarts", "Worker processes restarted after they exited", labels=["worker"]
        )
        events = CounterMetricFamily("threatgate_worker_events", "Events matched, by worker", labels=["worker"])
        active = GaugeMetricFamily(
            "threatgate_worker_active_connections", "Event connections holding a scanner, by worker", labels=["worker"]
        )
        mem = GaugeMetricFamily(
            "threatgate_worker_memory_bytes",
            "Worker memory: rss (shared snapshot pages included), pss (shared pages split), uss (its own)",
            labels=["worker", "kind"],
        )
        for worker in range(pool.count):
            label = str(worker)
            restarts.add_metric([label], pool.restarts[worker])
            inc = pool.current[worker]
            if inc is None or inc.gone:
                continue
            events.add_metric([label], inc.stats.events)
            active.add_metric([label], inc.active)
            used = memory(inc.process.pid)
            if used is not None:
                for kind, value in (("rss", used.rss), ("pss", used.pss), ("uss", used.uss)):
                    mem.add_metric([label, kind], value)
        yield from (restarts, events, active, mem)


def _sum_drains(results: Iterable[DrainResult]) -> DrainResult:
    total = DrainResult(0, 0, 0, 0)
    for r in results:
        total = dataclasses.replace(
            total, **{f.name: getattr(total, f.name) + getattr(r, f.name) for f in dataclasses.fields(DrainResult)}
        )
    return total


def _status(status: int | None) -> str:
    if status is None:
        return "unknown"
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"{-status} ({signal.Signals(-status).name})"
    return str(status)
