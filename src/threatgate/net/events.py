"""The event port, shared by nodes and the balancer: session flags, scanner slots, framing, pausing.

Both speak the CyberTrace TCP input protocol toward their clients, so the edge is written once.
Connections go through three states: HANDSHAKE (collecting session flags, no scanner held),
ACTIVE (holds one of ``scanners_count`` slots) and CLOSED.  A PING connection is answered in
HANDSHAKE and never needs a slot, so health checks work even when every slot is busy.

Slots are not held forever by clients that send nothing: an ACTIVE connection that has sent nothing
for ``idle_timeout`` seconds and waits for no answer is closed, and when every slot is taken a
newcomer evicts the connection idle the longest, provided it has been idle for ``handshake_timeout``
and waits for nothing (a real client that paused loses no answer and may reconnect; one that holds a
slot with flags and no event cannot lock a legitimate SIEM out).  Subclasses
implement :meth:`EventProtocol.process` (what to do with framed events) and may hook
:meth:`EventProtocol.on_closed`.

A connection that sent X-KF flags is LF-framed (the CyberTrace protocol).  One that sent none may be a
syslog sender using RFC 6587 octet counting: its framing is detected from its first bytes
(wire/framing.py AutoFramer); if the sender pauses before that is decided, the framer is told so
after FRAMING_WAIT.  Frames with a malformed length are counted and logged here (``bad_frame``), so
nodes and the balancer report them alike.

At shutdown :meth:`EventListener.drain` stops reading every connection and closes each once the
replies it is owed have left (net/drain.py decides; this module measures and acts).
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import logging
import re
import ssl
import struct
import termios
from dataclasses import dataclass
from typing import cast

from threatgate.log import RateLimitedLog
from threatgate.net.drain import POLL_INTERVAL, Drain, DrainResult, Owed, remaining
from threatgate.stats import BoundaryStats
from threatgate.wire.flags import PONG, NeedData, SessionFlags, parse_flags
from threatgate.wire.framing import FRAMING_WAIT, OCTET_COUNTED, AutoFramer, FramedEvent, Framer, LineFramer

MAX_PENDING_HANDSHAKES = 256
"""Connections still sending their flags; more are closed at once (a connection flood stays cheap)."""
MAX_HANDSHAKE_BYTES = 4096
TLS_RECORD = b"\x16\x03"
"""How a TLS ClientHello begins (a handshake record, version 3.x): never the start of a text event."""
HIGH_WATER = 4 * 1024 * 1024
"""Reply bytes buffered for a client that does not read before we stop reading its events."""
YIELD_AFTER = 64 * 1024
"""A read this large means more is waiting: let the loop run other work before reading again."""
DRAINING = "drain"
"""Pause reason of every connection once a drain began: nothing new is read, whatever resumes later."""
HOLDING = "output"
"""Pause reason of a connection holding a batch back until the output queue has room (node/service.py):
its events are matched but their detections not queued yet, so a drain waits for it."""
_TIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None)  # Linux SIOCOUTQ: a socket's unacknowledged bytes


class ConnState(enum.Enum):
    HANDSHAKE = "HANDSHAKE"
    ACTIVE = "ACTIVE"
    CLOSED = "CLOSED"


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    handshake_timeout: float
    scanners_count: int
    max_event_size: int
    delimiter: re.Pattern[str] | None
    idle_timeout: float = 0.0  # 0: never


class EventListener:
    """State shared by the connections of one event port."""

    def __init__(self, stats: BoundaryStats, limits: ListenerLimits, log: logging.Logger) -> None:
        self.stats = stats
        self.limits = limits
        self.log = log
        self.handshaking: dict[EventProtocol, None] = {}  # insertion-ordered: oldest first
        self.active: set[EventProtocol] = set()
        self.warn_flood = RateLimitedLog(log)
        self.warn_scanners = RateLimitedLog(log)
        self.warn_frames = RateLimitedLog(log)
        self.warn_evict = RateLimitedLog(log)
        self.warn_tls = RateLimitedLog(log)
        self.note_idle = RateLimitedLog(log, logging.INFO, 60.0)
        self._sweeper: asyncio.TimerHandle | None = None
        self.draining = False  # a drain began: new connections are closed at once

    def start_sweeps(self, interval: float = 1.0) -> None:
        """Close idle connections every ``interval`` seconds until :meth:`close_all`."""
        loop = asyncio.get_running_loop()

        def tick() -> None:
            self.sweep(loop.time())
            self._sweeper = loop.call_later(interval, tick)

        self._sweeper = loop.call_later(interval, tick)

    def sweep(self, now: float) -> int:
        """Close every ACTIVE connection idle for longer than ``idle_timeout``; returns how many."""
        timeout = self.limits.idle_timeout
        if not timeout:
            return 0
        idle = [c for c in self.active if c.is_idle(now, timeout)]
        for conn in idle:
            self.stats.bump(self.stats.connections, "idle_timeout")
            conn.close_idle()
        if idle:
            self.note_idle(
                "closed %d event connection(s) that sent nothing for %.0f s (IdleTimeout), e.g. from %s",
                len(idle),
                timeout,
                idle[0].peer,
            )
        return len(idle)

    def evict_idle(self, now: float) -> EventProtocol | None:
        """All slots taken: close the connection idle the longest (past the handshake timeout, owed nothing).

        Returns the evicted connection, or None when every slot is in real use.
        """
        floor = self.limits.handshake_timeout
        candidates = [c for c in self.active if c.is_idle(now, floor)]
        if not candidates:
            return None
        victim = min(candidates, key=lambda c: c.last_active)
        self.stats.bump(self.stats.connections, "evicted_idle")
        self.active.discard(victim)
        victim.close_idle()
        return victim

    def admit(self, conn: EventProtocol) -> bool | None:
        """Whether a connection whose flags are in may hold a scanner: ScannersCount, evicting an idle one.

        True or False decides now; None means the verdict comes later through ``conn.admitted(ok)``
        (a node's worker process asks its master, which counts scanners node-wide).
        """
        limits = self.limits
        if len(self.active) >= limits.scanners_count and (
            (evicted := self.evict_idle(asyncio.get_running_loop().time())) is not None
        ):
            self.warn_evict(
                "all %d scanners busy; closed the connection idle the longest (%s) for %s",
                limits.scanners_count,
                evicted.peer,
                conn.peer,
            )
        return len(self.active) < limits.scanners_count

    def close_all(self) -> None:
        """Close every connection now, whatever it is owed (see :meth:`drain` for a graceful stop)."""
        self._stop_sweeps()
        for conn in [*self.active, *self.handshaking]:
            if conn.transport is not None:
                conn.transport.close()

    def _stop_sweeps(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def drain(self, seconds: float) -> DrainResult:
        """Stop reading, let every connection's replies leave, close it; all within ``seconds``.

        A caller with more to do within the same budget (flushing its senders next) takes
        ``loop.time()`` before the call and flushes with what is left (``net.drain.remaining``);
        the result's ``elapsed`` says how long the drain took.  Close the listening socket first:
        a connection that still arrives is closed at once.

        * Connections still sending their flags are closed at once: nothing is owed to them.
        * Every ACTIVE connection stops being read (pause reason :data:`DRAINING`: nothing new is
          read, whatever back-pressure resumes later).  Events already read are answered: a node
          answers synchronously while reading; the balancer's answers keep arriving from its nodes.
        * A connection is closed gracefully (FIN after its last reply) as soon as it owes nothing:
          its replies are acknowledged by the client's TCP stack, it holds no batch back for the
          output queue, it waits for no answer (net/drain.py, ``Owed``).  Bytes the client sent
          that were not read go unanswered; the kernel then resets rather than FINs (Linux does
          so for a socket closed with unread input), after the client has every reply.
        * At the deadline the connections still owed something are cut (``transport.abort()``:
          the replies still in the transport's buffer are dropped) and counted in the result.

        Idle sweeps stop.  Nothing is logged: the caller reports the result in its own words.
        Cancelled (a second SIGTERM), it leaves the connections paused as they are: the process
        is exiting.

        Between two looks the drain sleeps :data:`POLL_INTERVAL` (10 ms) rather than waiting for an
        event: "acknowledged by the client" has no event (the kernel's send queue, SIOCOUTQ, must
        be read), while the asyncio events that exist (``resume_writing``, ``connection_lost``) tell
        only part of it.  A look reads a few numbers per connection still owed; a drain where
        nothing is owed returns at once, without sleeping.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        self.draining = True
        self._stop_sweeps()
        handshaking = list(self.handshaking)
        self.handshaking.clear()
        for conn in handshaking:
            conn.close_owed_nothing()
        conns = list(self.active)
        for conn in conns:
            conn.pause(DRAINING)
        plan = Drain(conns, now=loop.time(), deadline=deadline, handshaking=len(handshaking))
        while True:
            now = loop.time()
            waiting = plan.waiting
            gone = [c for c in waiting if c.state is ConnState.CLOSED]
            step = plan.step(now, {c: c.owed() for c in waiting if c.state is not ConnState.CLOSED}, gone)
            for conn in step.close:
                conn.close_owed_nothing()
            for conn in step.cut:
                conn.cut()
            if step.done:
                return plan.result(loop.time())
            await asyncio.sleep(min(POLL_INTERVAL, remaining(deadline, now)))


class EventProtocol(asyncio.Protocol):
    """One client connection on an event port."""

    def __init__(self, listener: EventListener) -> None:
        self.listener = listener
        self.state = ConnState.HANDSHAKE
        self.flags = SessionFlags()
        self.peer = ""
        self._handshake = bytearray()
        limits = listener.limits
        self.framer: Framer = LineFramer(limits.max_event_size, limits.delimiter)
        self._detecting: AutoFramer | None = None  # a connection without flags: framing detected, then watched
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._framing_timer: asyncio.TimerHandle | None = None
        self._octet_counted = False
        self._paused_by: set[str] = set()
        self.eof = False
        self.last_active = 0.0  # loop time of the last bytes received
        self._admitting: int | None = None  # flags parsed, scanner verdict awaited: the bytes they took
        self.detached = False  # lost while its verdict was awaited: matched when it comes, replies dropped

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.peer} {self.state.value} {self.flags}>"

    # -- what subclasses implement -------------------------------------------------------------

    def process(self, events: list[FramedEvent]) -> None:
        """Handle a batch of framed events (called with at least one)."""
        raise NotImplementedError

    def on_closed(self) -> None:
        """The connection is gone (after it was ACTIVE)."""

    def on_active(self) -> None:
        """The handshake is done and the connection holds a slot (before its first events)."""

    def on_detached_closed(self) -> None:
        """A connection lost while its slot was asked for is done: its events were matched, or it was refused."""

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        listener = self.listener
        if listener.draining:  # accepted just before the listening socket closed
            self.state = ConnState.CLOSED
            transport.close()
            return
        if len(listener.handshaking) >= MAX_PENDING_HANDSHAKES:
            # Evict the oldest silent connection, not the newcomer: a flood of idle sockets must not
            # lock out a real client, which sends its flags at once and leaves this set quickly.
            oldest = next(iter(listener.handshaking))
            listener.handshaking.pop(oldest)
            listener.stats.bump(listener.stats.connections, "evicted_handshake")
            listener.warn_flood(
                "more than %d connections in handshake; closing the oldest (%s)", MAX_PENDING_HANDSHAKES, oldest.peer
            )
            oldest.abort()
        listener.handshaking[self] = None
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self._timer = loop.call_later(listener.limits.handshake_timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        self.last_active = asyncio.get_running_loop().time()
        if self.state is ConnState.ACTIVE:
            self.framer.receive_data(data)
            self._process()
            if len(data) >= YIELD_AFTER:
                self._yield_reading()
        elif self.state is ConnState.HANDSHAKE:
            self._handshake += data
            if self._admitting is None:
                self._try_handshake(eof=False)

    def eof_received(self) -> bool:
        self.eof = True
        if self.state is ConnState.HANDSHAKE and self._admitting is None:
            self._try_handshake(eof=True)
        if self._admitting is not None:
            return True  # the scanner verdict answers what was sent, then closes (admitted())
        if self.state is ConnState.ACTIVE:
            self.framer.receive_data(b"")
            self._process()
        return self.keep_open_after_eof()

    def keep_open_after_eof(self) -> bool:
        """False: close our side once the replies are written (the node answers synchronously)."""
        return False

    def unanswered(self) -> int:
        """Events received and not yet answered: 0 where answers are written as events are read (a node);
        the balancer answers later."""
        return 0

    def is_idle(self, now: float, seconds: float) -> bool:
        """Sent nothing for ``seconds``, waits for no answer, and is not just held back by us.

        A connection we stopped reading (its replies unread, a full backlog or output queue) may be
        sending all along: it is not idle, and closing it would lose what it sent.  One already closing
        is not counted again.
        """
        transport = self.transport
        return (
            self.unanswered() == 0
            and not self._paused_by
            and now - self.last_active >= seconds
            and transport is not None
            and not transport.is_closing()
            and not transport.get_write_buffer_size()
        )

    def owed(self) -> Owed:
        """What this connection is still owed for the events it has read (what a drain waits for)."""
        transport = self.transport
        if transport is None:
            return Owed()
        return Owed(
            buffered=transport.get_write_buffer_size(),
            unacked=unacked_bytes(transport),
            held=HOLDING in self._paused_by,
            outstanding=self.unanswered(),
        )

    def close_owed_nothing(self) -> None:
        """Close gracefully (FIN once the write buffer is empty): a drain found nothing owed to it."""
        if self.state is ConnState.HANDSHAKE:
            self.state = ConnState.CLOSED  # not ACTIVE: connection_lost has no slot to free
            if self._timer is not None:
                self._timer.cancel()
        if self.transport is not None:
            self.transport.close()

    def cut(self) -> None:
        """Close at once, dropping unsent replies (a drain's deadline passed); connection_lost follows."""
        if self.transport is not None:
            self.transport.abort()

    def close_idle(self) -> None:
        """Close a connection that sends nothing (idle timeout or eviction): nothing is owed to it."""
        self.listener.log.debug("%s: event connection idle; closing", self.peer)
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.state = ConnState.CLOSED
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        listener = self.listener
        listener.handshaking.pop(self, None)
        if isinstance(exc, ssl.SSLError):  # inside TLS: a renegotiation refused, a corrupt or forged record
            from threatgate.net.tlsport import classify_handshake_error  # only now: a worker stays lean

            reason, text = classify_handshake_error(exc, established=True)
            listener.stats.bump(listener.stats.bad_input, reason)
            listener.warn_tls(
                'TLS connection from %s broken: %s (threatgate_bad_input_total{reason="%s"})', self.peer, text, reason
            )
        if self._admitting is not None and self.state is ConnState.HANDSHAKE:
            # Gone while its scanner slot is being asked for (a node's worker asks its master).  Over TLS a
            # sender cannot half-close (close_notify ends the session both ways), so a shipper that sends and
            # closes at once ends here: what it sent is still matched when the verdict comes (admitted()).
            self.transport = None
            self.detached = True
            self.eof = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        if self.state is ConnState.ACTIVE:
            listener.active.discard(self)
            if self.framer.buffered:
                listener.stats.bump(listener.stats.bad_input, "disconnected_mid_event")
                listener.log.debug(
                    "%s disconnected with %d bytes of an unfinished event", self.peer, self.framer.buffered
                )
            listener.log.debug("event connection from %s closed (%s)", self.peer, exc or "EOF")
            self.state = ConnState.CLOSED
            self.on_closed()
        self.state = ConnState.CLOSED
        if self._timer is not None:
            self._timer.cancel()
        if self._framing_timer is not None:
            self._framing_timer.cancel()

    def pause_writing(self) -> None:
        self.pause("writing")

    def resume_writing(self) -> None:
        self.resume("writing")

    def _yield_reading(self) -> None:
        """Stop reading until the loop has run once: one busy stream cannot starve the others.

        uvloop (libuv) reads a readable socket up to 32 times per loop iteration, and every read is
        matched at once: a stream that keeps the socket full held the loop for seconds, so PING
        health checks and other clients waited that long (and healthy nodes were marked DOWN).
        """
        if "yield" not in self._paused_by and self.transport is not None and not self.transport.is_closing():
            self.pause("yield")
            asyncio.get_running_loop().call_soon(self.resume, "yield")

    # -- handshake ----------------------------------------------------------------------------

    def _handshake_expired(self) -> None:
        if self.state is ConnState.HANDSHAKE and self.transport is not None:
            listener = self.listener
            listener.stats.bump(listener.stats.bad_input, "handshake_timeout")
            if self._handshake:
                self._try_handshake(eof=True)  # bytes that could still be flags: decide now
            else:
                listener.log.debug("%s sent nothing for %.0f s; closing", self.peer, listener.limits.handshake_timeout)
                self.transport.close()

    def _try_handshake(self, eof: bool) -> None:
        assert self.transport is not None
        if self._handshake.startswith(TLS_RECORD):
            self._refuse_tls()
            return
        if len(self._handshake) > MAX_HANDSHAKE_BYTES:
            eof = True  # cannot be flags any more; decide with what we have
        result = parse_flags(bytes(self._handshake), eof=eof)
        if isinstance(result, NeedData):
            return
        flags, consumed = result
        listener = self.listener
        listener.handshaking.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flags = flags
        if flags.ping:
            listener.stats.bump(listener.stats.connections, "ping")
            self.transport.write(PONG)
            self.transport.close()
            self.state = ConnState.CLOSED
            return
        verdict = listener.admit(self)
        if verdict is None:  # asked elsewhere (a node's worker asks its master): admitted() follows
            self._admitting = consumed
            self.pause("slot")
            return
        self.admitted(verdict, consumed)

    def _refuse_tls(self) -> None:
        """A TLS ClientHello on a plain port: the sender was set up for TLS, this port was not (or the other way
        round on the sender's side).  Nothing it sends can be read, so say so in words and close."""
        listener = self.listener
        listener.handshaking.pop(self, None)
        listener.stats.bump(listener.stats.bad_input, "tls_on_plain_port")
        listener.warn_tls(
            "a TLS handshake from %s on a plain event port: closed; the sender uses TLS, so enable TLS on this "
            "port (<TLS>/<MatchingTLS>) or set the sender to plain TCP "
            '(threatgate_bad_input_total{reason="tls_on_plain_port"})',
            self.peer,
        )
        self.abort()

    def admitted(self, ok: bool, consumed: int | None = None) -> None:
        """The scanner verdict for a connection whose flags are in: take the slot, or be refused."""
        deferred = consumed is None
        if consumed is None:
            consumed, self._admitting = self._admitting, None
            self.resume("slot")
            if consumed is None or self.state is not ConnState.HANDSHAKE:
                return
            if self.transport is None and not self.detached:
                return  # closed meanwhile (its slot, if granted, is released by on_closed's caller)
        listener = self.listener
        if not ok or listener.draining:
            if not ok:
                listener.stats.bump(listener.stats.connections, "rejected_scanners")
                listener.warn_scanners(
                    "all %d scanners busy; refusing event connection from %s",
                    listener.limits.scanners_count,
                    self.peer,
                )
            # else: the verdict came after the drain began: nothing was read, close
            if self.transport is not None:
                self.transport.close()
            self.state = ConnState.CLOSED
            if self.detached:
                self.on_detached_closed()
            return
        flags = self.flags
        listener.active.add(self)
        listener.stats.bump(listener.stats.connections, "accepted")
        self.state = ConnState.ACTIVE
        listener.log.debug("event connection from %s flags=%s", self.peer, flags)
        if not consumed:
            # No flags: maybe a syslog sender with RFC 6587 octet counting (never a CyberTrace client's LF link).
            limits = listener.limits
            self.framer = self._detecting = AutoFramer(limits.max_event_size, limits.delimiter)
        self.on_active()
        rest = bytes(self._handshake[consumed:])
        self._handshake = bytearray()
        if rest:
            self.framer.receive_data(rest)
        if self.eof:
            self.framer.receive_data(b"")
        self._process()
        if self.detached:  # its events are matched; the connection itself is long gone
            listener.active.discard(self)
            self.state = ConnState.CLOSED
            self.on_closed()
            self.on_detached_closed()
            return
        if deferred and self.eof and not self.keep_open_after_eof() and self.transport is not None:
            self.transport.close()

    # -- events -------------------------------------------------------------------------------

    def _process(self) -> None:
        events = self.framer.next_events()
        if self._detecting is not None:
            self._watch_framing(self._detecting)
        if events:
            self.process(events)

    def _watch_framing(self, framer: AutoFramer, data_arrived: bool = True) -> None:
        """Report the detected framing once, (re)arm the pause timer while detecting, count bad frames."""
        listener = self.listener
        if framer.framing is None:
            if data_arrived and framer.deciding and self.state is ConnState.ACTIVE:
                # "The sender paused" means nothing arrived for FRAMING_WAIT: restart the wait on new bytes.
                if self._framing_timer is not None:
                    self._framing_timer.cancel()
                self._framing_timer = asyncio.get_running_loop().call_later(FRAMING_WAIT, self._sender_paused)
            return
        if self._framing_timer is not None:
            self._framing_timer.cancel()
            self._framing_timer = None
        if framer.framing != OCTET_COUNTED:
            self._detecting = None  # LF: nothing more to watch
            return
        if not self._octet_counted:
            self._octet_counted = True
            listener.stats.bump(listener.stats.connections, "octet_counted")
            listener.log.debug("event connection from %s uses RFC 6587 octet-counted framing", self.peer)
        stats = framer.stats
        if stats.bad_frame:
            n, stats.bad_frame = stats.bad_frame, 0
            listener.stats.bump(listener.stats.bad_input, "bad_frame", n)
            listener.warn_frames(
                "bad input on the event port from %s: %d octet-counted frame(s) with a malformed length "
                "(RFC 6587 MSG-LEN), each read up to its next LF instead; "
                'see threatgate_bad_input_total{reason="bad_frame"}',
                self.peer,
                n,
            )

    def _sender_paused(self) -> None:
        """FRAMING_WAIT passed with the framing undecided: decide on what was sent, if it can tell."""
        self._framing_timer = None
        framer = self._detecting
        if self.state is ConnState.ACTIVE and framer is not None:
            framer.sender_paused()
            events = framer.next_events()
            self._watch_framing(framer, data_arrived=False)  # still undecided: wait for more bytes
            if events:
                self.process(events)

    def pause(self, reason: str) -> None:
        if not self._paused_by and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused_by.add(reason)

    def resume(self, reason: str) -> None:
        self._paused_by.discard(reason)
        if not self._paused_by and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


def log_drained(log: logging.Logger, who: str, result: DrainResult, elapsed: float, timeout: float) -> None:
    """A drain's last line: INFO when every connection got what it was owed, WARNING when some were cut.

    ``who`` drained (``node``, ``balancer``); ``elapsed``: seconds since the drain began, the senders' flush
    included.
    """
    if result.cut:
        log.warning("%s drained in %.1f s: %s (DrainTimeout %g s)", who, elapsed, result.summary(), timeout)
    else:
        log.info("%s drained in %.1f s: %s", who, elapsed, result.summary())


def unacked_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes in the kernel's send queue of the transport's socket that the peer has not acknowledged.

    Linux ``SIOCOUTQ`` (sent and unacknowledged, plus not sent yet).  0 when it cannot be read
    (another platform, a transport without a socket, a socket already closed): a drain then waits
    for the transport's own write buffer only.
    """
    sock = transport.get_extra_info("socket")
    if sock is None or _TIOCOUTQ is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return max(0, int(struct.unpack("i", raw)[0]))
