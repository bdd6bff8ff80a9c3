"""A node's worker process: serves the event connections its master passes it (``<Workers>`` >= 2).

Started by the master as ``python -m threatgate.node.worker FD INDEX LOG_LEVEL`` (node/pool.py),
with FD its end of the control channel (node/ipc.py).  It matches events exactly as a
single-process node does (node/eventpath.py: same connection class, same matcher, same output), on
the indicators the master loaded: every snapshot arrives as an open descriptor and is mapped, so
all workers share one copy of the indicators in the page cache.

What it receives, in order: ``hello`` (config, engine), ``store`` and ``suppliers`` (snapshot
descriptors), ``go`` (answered with ``ready``), then at any time ``conn`` (an accepted connection),
``slot`` and ``evict`` (ScannersCount is node-wide: the master holds the count), ``config``,
``store``, ``suppliers`` (each answered with ``applied``), ``stats?`` and ``drain``.  What it sends:
``ready``, ``applied``, ``slot?``, ``evicted``, ``closed`` (every connection it was given, when it
closes), ``stats`` (every second: its counters, which the master sums, and a heartbeat) and
``dropped`` (detection lines the output gave up on; the master raises the alert, node-wide).

It never parses a feed, opens the REST API or talks to the cluster, and does not import aiohttp
or pyarrow: a second worker costs an interpreter and buffers, not another copy of the indicators.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from threatgate import heap, runtime
from threatgate.config.node import NodeConfig
from threatgate.log import RateLimitedLog, setup_logging
from threatgate.net.describe import describe
from threatgate.net.drain import POLL_INTERVAL, remaining
from threatgate.net.events import ConnState, EventListener, EventProtocol
from threatgate.net.gate import Gate, gate_for
from threatgate.net.sender import Dropped, LineSender
from threatgate.node.engine import make_matcher
from threatgate.node.eventpath import (
    FLUSH_FLOOR,
    EventConnection,
    ReadFailures,
    SyslogClock,
    account,
    detection_sender,
    listener_limits,
    next_output,
)
from threatgate.node.feeds import FeedSnapshot
from threatgate.node.ipc import Channel, Message
from threatgate.node.matcher import Matcher, MatchStats
from threatgate.node.store import IndicatorStore
from threatgate.stats import NodeStats
from threatgate.wire.framing import Framer

log = logging.getLogger("threatgate.node")

HEAP_TOP_PAD = 8 * 1024 * 1024
"""Bytes glibc keeps above the worker's heap: the buffers of a batch are reused, not faulted in again
(threatgate/heap.py)."""

SHED_WITHIN = 10.0
"""Seconds a connection the master asked to shed may take to be owed nothing; then it is kept."""

MUST_APPLY = frozenset({"hello", "config", "store", "suppliers"})
"""Messages a worker cannot serve without: failing one, it exits (status 3) and is replaced."""

HEARTBEAT = 1.0
"""Seconds between two ``stats`` messages (the master takes a worker silent for 10 s as hung)."""


class WorkerListener(EventListener):
    """The worker's event port state: scanner slots are granted by the master, node-wide."""

    def __init__(self, worker: Worker, *args: Any) -> None:
        super().__init__(*args)
        self.worker = worker

    def admit(self, conn: EventProtocol) -> bool | None:
        assert isinstance(conn, WorkerConnection)
        self.worker.send("slot?", conn.conn_id)
        return None


class WorkerConnection(EventConnection):
    def __init__(self, node: Worker, conn_id: int) -> None:
        super().__init__(node)
        self.conn_id = conn_id
        self.worker = node
        self.shedding = False  # the master asked to close it once it is owed nothing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.worker.conns[self.conn_id] = self

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.detached:  # else the master's verdict still finds it: matched, then closed
            self.on_detached_closed()

    def on_detached_closed(self) -> None:
        if self.worker.conns.pop(self.conn_id, None) is not None:
            self.worker.send("closed", self.conn_id)


class Worker:
    """The worker's event path (an EventSink) and what it does with the master's messages."""

    config: NodeConfig
    engine: str
    matcher: Matcher
    listener: EventListener
    output: LineSender

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self._sock = sock
        self.channel: Channel | None = None
        self.stats = NodeStats()
        self._plain = Gate("events", stats=self.stats, log=log)
        self._tls: Gate | None = None
        self.conns: dict[int, WorkerConnection] = {}
        self._clock = SyslogClock()
        self.warn_input = RateLimitedLog(log)
        self.read_failures = ReadFailures(self.stats, log)
        self._snapshots: dict[int, FeedSnapshot] = {}
        self._parts: dict[str, tuple[int, dict[int, FeedSnapshot]]] = {}  # kind -> (generation, mapped so far)
        self._exit = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False
        self.failed = False  # something every worker must hold could not be applied: exit 3

    # -- EventSink -------------------------------------------------------------------------------

    def date(self) -> str:
        return self._clock.date()

    def account(self, m: MatchStats, framer: Framer, finished: bool) -> None:
        account(self.stats, m, framer, finished, self.warn_input)

    # -- control channel -------------------------------------------------------------------------

    def send(self, kind: str, payload: Any = None) -> None:
        if self.channel is not None:
            self.channel.send(kind, payload)

    async def run(self) -> None:
        self.channel = Channel(self._sock, self._on_message, self._on_eof, log)
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat())
        try:
            await self._exit.wait()
        finally:
            heartbeat.cancel()
            await self._close()

    def _on_eof(self) -> None:
        if not self._exit.is_set():
            log.info("the node's master process is gone; this worker exits")
        self._exit.set()

    def _on_message(self, message: Message) -> None:
        handler = getattr(self, "_on_" + message.kind.replace("?", "_query"), None)
        if handler is None:
            for fd in message.fds:
                os.close(fd)
            log.error("unknown control message %r from the master (a defect)", message.kind)
            return
        try:
            handler(message)
        except Exception as exc:
            if message.kind not in MUST_APPLY:
                raise  # the loop's handler logs it; this worker goes on
            # A worker that could not take what every worker must hold would answer differently from the
            # others (or not at all): it stops, and the master starts a new one that maps the current state.
            log.error(
                "cannot apply the master's %s: %s; this worker exits (the master starts another)",
                message.kind,
                describe(exc),
            )
            self.failed = True
            self._exit.set()

    def _on_hello(self, message: Message) -> None:
        config, engine = message.payload
        self.config = config
        self.engine = engine
        self.matcher = make_matcher(config, IndicatorStore(), engine)
        self.listener = WorkerListener(self, self.stats, listener_limits(config), log)
        self.output = detection_sender(config, self._dropped)
        self.output.start()
        self.listener.start_sweeps()
        self._started = True

    def _on_go(self, message: Message) -> None:
        self.send("ready", os.getpid())

    def _on_config(self, message: Message) -> None:
        generation, config = message.payload
        self.config = config
        self.listener.limits = listener_limits(config)
        matcher = make_matcher(config, self.matcher.store, self.engine)
        matcher.use_suppliers(self.matcher.suppliers)
        self.matcher = matcher
        self.output, old = next_output(self.output, config, self._dropped)
        if old is not None:
            self.output.start()
            self._spawn(old.aclose(successor=self.output))
        self.send("applied", ("config", generation))

    def _mapped(self, kind: str, message: Message) -> dict[int, FeedSnapshot] | None:
        """The snapshots of a store message, mapped; None until the last part of a store in several parts."""
        generation, refs, last = message.payload
        fds = list(message.fds)
        parts: dict[int, FeedSnapshot]
        started, parts = self._parts.get(kind, (generation, {}))
        if started != generation:  # a store in parts is never interleaved with another: a defect, but safe
            parts = {}
        self._parts[kind] = (generation, parts)
        try:
            while refs:
                slot, ref = refs.pop(0)
                parts[slot] = ref.open(fds.pop(0))  # takes the descriptor; checks header, layout and digests
        finally:
            for fd in fds:
                os.close(fd)
        if not last:
            return None
        del self._parts[kind]
        return parts

    def _on_store(self, message: Message) -> None:
        snaps = self._mapped("store", message)
        if snaps is not None:
            self._snapshots = snaps
            self.matcher.use_store(IndicatorStore(snaps))
            self.send("applied", ("store", message.payload[0]))

    def _on_suppliers(self, message: Message) -> None:
        snaps = self._mapped("suppliers", message)
        if snaps is not None:
            self.matcher.use_suppliers(IndicatorStore(snaps))
            self.send("applied", ("suppliers", message.payload[0]))

    def _on_conn(self, message: Message) -> None:
        conn_id, tls = message.payload
        try:
            (fd,) = message.fds
            sock = socket.socket(fileno=fd)
        except (ValueError, OSError) as exc:  # not one socket: a defect; the master must not count it
            for extra in message.fds:
                with contextlib.suppress(OSError):
                    os.close(extra)
            log.error("connection %d handed over without its socket (%s)", conn_id, exc)
            self.send("closed", conn_id)
            return
        gate = self._tls_gate() if tls else self._plain

        async def serve() -> None:
            # Gone before we took it over, a failed TLS handshake (logged and counted by the gate): the
            # master gets its slot back.
            if not await gate.serve(sock, lambda: WorkerConnection(self, conn_id)):
                self.send("closed", conn_id)

        self._spawn(serve())

    def _tls_gate(self) -> Gate:
        """The TLS port's gate (the handshake runs here, in the worker); made at the first TLS connection."""
        if self._tls is None:
            tls = self.config.input.tls
            assert tls is not None, "the master passes TLS connections only when <TLS> is set"
            self._tls = gate_for(
                "events",
                stats=self.stats,
                log=log,
                handshake_timeout=self.config.service.handshake_timeout,
                sources=None,  # the master checked the source before passing the connection
                tls=tls,
            )
        return self._tls

    def _on_slot(self, message: Message) -> None:
        conn_id, ok = message.payload
        conn = self.conns.get(conn_id)
        if conn is None:
            if ok:
                self.send("closed", conn_id)  # gone meanwhile: give the slot back
            return
        conn.admitted(ok)

    def _on_evict(self, message: Message) -> None:
        """The master picked our connection as the idlest: close it if it still is idle."""
        conn_id, floor = message.payload
        conn = self.conns.get(conn_id)
        now = asyncio.get_running_loop().time()
        ok = conn is not None and conn in self.listener.active and conn.is_idle(now, floor)
        if ok:
            assert conn is not None
            self.stats.bump(self.stats.connections, "evicted_idle")
            self.listener.active.discard(conn)
            conn.close_idle()
        self.send("evicted", (conn_id, ok, conn.peer if conn is not None else ""))

    def _on_shed(self, message: Message) -> None:
        """The master spreads connections: close our newest one whose client re-sends what was not answered
        (``X-KF-ReplyBack`` and ``X-KF-SendFinishedEvent``, the CyberTrace HA recipe a balancer's lanes use),
        once it is owed nothing.  A client without them could not tell which events were answered: never
        one of those.  Answers the peer, or None when there is none to shed."""
        conns = [
            c
            for c in self.conns.values()
            if c in self.listener.active and c.flags.reply_back and c.flags.send_finished and not c.shedding
        ]
        if not conns:
            self.send("shed", None)
            return
        conn = max(conns, key=lambda c: c.conn_id)
        conn.shedding = True
        self.send("shed", conn.peer)
        self._spawn(self._shed(conn))

    async def _shed(self, conn: WorkerConnection) -> None:
        conn.pause("shed")  # read nothing more: what was read is answered, what was not is sent again by the client
        loop = asyncio.get_running_loop()
        until = loop.time() + SHED_WITHIN
        while True:  # polled like a drain: "acknowledged by the client" has no event (net/events.py drain)
            if conn.state is not ConnState.ACTIVE:
                return
            if not conn.owed().owing():
                break
            if loop.time() >= until:
                conn.shedding = False
                conn.resume("shed")  # still owed something: keep it rather than lose an answer
                return
            await asyncio.sleep(POLL_INTERVAL)
        log.info("closed the event connection from %s to spread connections over workers", conn.peer)
        conn.close_owed_nothing()

    def _on_stats_query(self, message: Message) -> None:
        self._send_stats()

    def _on_drain(self, message: Message) -> None:
        self._spawn(self._drain(float(message.payload)))

    async def _drain(self, seconds: float) -> None:
        """SIGTERM, through the master: answer what was read, flush the output, report, exit."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        result = await self.listener.drain(seconds)
        await self.output.aclose(max(remaining(deadline, loop.time()), FLUSH_FLOOR))
        self._send_stats()
        self.send("drained", result)
        self._exit.set()

    # -- what the master sums ----------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            if self._started:
                self.read_failures.check([*self._snapshots.values()])
                self._send_stats()

    def _send_stats(self) -> None:
        if not self._started:
            self.send("stats", None)
            return
        loop_now = asyncio.get_running_loop().time()
        wall = time.time()
        idle = [
            (c.conn_id, wall - (loop_now - c.last_active))
            for c in self.listener.active
            if isinstance(c, WorkerConnection) and c.is_idle(loop_now, 0.0)
        ]
        queued = (self.output.queued_bytes, self.output.queued_lines)
        self.send("stats", (self.stats, len(self.listener.active), idle, queued))

    def _dropped(self, dropped: Dropped) -> None:
        self.stats.drop_lines(dropped.destination, dropped.reason, dropped.lines)
        self.send("dropped", (str(dropped.address), dropped.reason, dropped.lines))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self) -> None:
        if self._started:
            self.listener.close_all()
            with contextlib.suppress(Exception):
                await self.output.aclose()
        if self.channel is not None:
            self.channel.close(flush_within=1.0)  # the last report (stats, drained) reaches the master


async def _serve(fd: int, index: int) -> int:
    worker = Worker(index, socket.socket(fileno=fd))
    await worker.run()
    return 3 if worker.failed else 0


def main(argv: list[str]) -> int:
    fd, index, level = int(argv[1]), int(argv[2]), argv[3]
    # The master decides when workers stop: a SIGTERM or Ctrl-C sent to the whole process group
    # (systemd's KillMode=control-group, a terminal) must not cut connections the master is draining.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    setup_logging(level, worker=index)
    heap.keep_top_pad(HEAP_TOP_PAD)
    status = [0]

    async def serve() -> None:
        status[0] = await _serve(fd, index)

    runtime.run(serve())
    return status[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
