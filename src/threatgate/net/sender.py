"""A resilient line sender: detections and service alerts to a TCP destination.

Rules:
1. ``send`` never blocks and never raises: whole-line chunks go into a :class:`LineQueue` bounded in
   bytes AND in lines.  When the queue is full the chunk is refused (``send`` returns False) and the
   caller decides: back-pressure (a node's detections: it stops reading that client until the queue
   drains) or a counted drop (``send_or_drop``: alerts, the balancer's output).  Policy: the oldest
   lines are kept and the newest refused; nothing already queued is ever evicted to make room.
2. Delivery follows CyberTrace's EventSendingRetriesCount / EventSendingRetriesTimeout: a failed
   write or connect is retried ``retries`` times, ``retry_timeout`` seconds apart; after that the
   batch at the head of the queue (everything queued when its first attempt started) is dropped
   with reason ``retries_exhausted``, and sending goes on with what came in meanwhile.
   ``retries=None`` (service alerts) retries until the destination is back: the bounded queue
   holds what happened during the outage, and only what overflows it is lost (``queue_full``).
3. ``aclose`` flushes for up to ``flush_timeout`` seconds; what is still queued then is handed to a
   ``successor`` sender (a reload that changed the destination) or dropped with reason ``shutdown``.
   A sender waiting to retry tries once more at once, and gives up if that fails: a destination
   that is down ends the flush at once instead of holding the shutdown for the whole timeout.
   A batch that was being written at that moment may have partly reached the old destination too.
4. Nothing is lost silently: every drop is reported once to ``on_drop`` (a :class:`Dropped`, in
   lines and bytes, for the owner's counters and alerts) and logged at ERROR with the line count and
   the destination (rate-limited: at most one line per 10 s per sender, with a count of the rest).
5. One persistent connection; anything the destination sends back is read and discarded.
6. A :class:`~threatgate.config.destinations.Destination` (``tls="true"``) is reached over TLS 1.2+,
   verified before any byte is sent: its certificate's SHA-256 against the pinned ``fingerprint=``,
   or its chain and host name against ``ca=``.  A mismatch is a failed connect (logged at ERROR
   with both fingerprints, retried as any other): never an unverified byte.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from threatgate.config.common import Address
from threatgate.config.destinations import Destination
from threatgate.log import RateLimitedLog
from threatgate.net.describe import describe
from threatgate.stats import LabelledGauges

log = logging.getLogger("threatgate.net")

RETRIES_EXHAUSTED = "retries_exhausted"
"""The destination stayed unreachable (or kept failing writes) through every retry."""
QUEUE_FULL = "queue_full"
"""The queue was at its bound and the caller could not wait (alerts, the balancer's output)."""
SHUTDOWN = "shutdown"
"""The sender was closed (the process stops) and could not flush its queue in time."""

DETECTION_QUEUE = (16 * 1024 * 1024, 100_000)
"""Bound of a detection queue: 16 MiB or 100,000 lines, whichever comes first (docs/operations.md)."""
ALERT_QUEUE = (1024 * 1024, 10_000)
"""Bound of a service-alert queue: 1 MiB or 10,000 lines."""

WRITE_TIMEOUT = 30.0
"""Seconds a batch may take to leave (the destination reading nothing, a dropped NAT flow): then the
attempt failed, is retried, and after the retries its lines are dropped and counted, instead of every
client with detections waiting for the kernel's TCP retransmission limit (about 15 minutes)."""


@dataclass(frozen=True, slots=True)
class Dropped:
    """Lines a sender gave up on, reported to its owner (who counts them and may raise an alert)."""

    destination: str  # the sender's name: "detections", "alerts", "alert-forward"
    address: Address
    lines: int
    bytes: int
    reason: str  # RETRIES_EXHAUSTED, QUEUE_FULL or SHUTDOWN
    error: str = ""  # the last connect or write error, when there was one


class LineQueue:
    """The sender's queue of whole-line chunks, bounded in bytes and in lines.  Sans-IO.

    Invariants: ``bytes``/``lines`` are the sums over the queued chunks (lines = LF count, counted
    once per chunk when it is offered); a batch is the queue's first ``n`` chunks at the time it was
    taken, and ``settle`` removes exactly those; chunks offered meanwhile wait behind it.
    """

    def __init__(self, max_bytes: int, max_lines: int) -> None:
        self.max_bytes = max_bytes
        self.max_lines = max_lines
        self.bytes = 0
        self.lines = 0
        self._chunks: collections.deque[tuple[bytes, int]] = collections.deque()
        self._batch = 0  # chunks in the batch being delivered

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def full(self) -> bool:
        return self.bytes >= self.max_bytes or self.lines >= self.max_lines

    def offer(self, chunk: bytes) -> bool:
        """Queue ``chunk`` unless the queue is full (then nothing is queued: the newest is refused)."""
        if self.full:
            return False
        self.force(chunk)
        return True

    def force(self, chunk: bytes) -> None:
        """Queue ``chunk`` past the bound: for lines handed over by a closing sender (bounded there)."""
        lines = chunk.count(b"\n")
        self._chunks.append((chunk, lines))
        self.bytes += len(chunk)
        self.lines += lines

    def take_batch(self) -> bytes:
        """Everything queued now, as one write; settle it with :meth:`settle` before the next batch."""
        self._batch = len(self._chunks)
        return b"".join(chunk for chunk, _ in self._chunks)

    def settle(self) -> tuple[int, int]:
        """Remove the batch (delivered or dropped); its (lines, bytes)."""
        lines = size = 0
        for _ in range(self._batch):
            chunk, n = self._chunks.popleft()
            lines += n
            size += len(chunk)
        self._batch = 0
        self.lines -= lines
        self.bytes -= size
        return lines, size

    def clear(self) -> list[bytes]:
        """Empty the queue (batch included); the chunks, oldest first."""
        chunks = [chunk for chunk, _ in self._chunks]
        self._chunks.clear()
        self._batch = self.bytes = self.lines = 0
        return chunks


class LineSender:
    """Sends byte chunks of complete lines to ``address`` with bounded queueing and retries."""

    def __init__(
        self,
        address: Address,
        *,
        name: str,
        retries: int | None = 3,
        retry_timeout: float = 10.0,
        max_queue_bytes: int = DETECTION_QUEUE[0],
        max_queue_lines: int = DETECTION_QUEUE[1],
        connect_timeout: float = 5.0,
        on_drop: Callable[[Dropped], None] | None = None,
    ) -> None:
        self.address = address
        self.name = name
        self.retries = retries
        self.retry_timeout = retry_timeout
        self.connect_timeout = connect_timeout
        self.on_drop = on_drop
        self.sent_bytes = 0
        self.dropped_lines = 0
        self.failures = 0
        self.queue = LineQueue(max_queue_bytes, max_queue_lines)
        self._wakeup = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._drain_waiters: list[Callable[[], None]] = []
        self._closing = False
        self._closed = asyncio.Event()  # set by aclose: cuts a retry wait short
        self._log_drop = RateLimitedLog(log, logging.ERROR)

    def __repr__(self) -> str:
        state = "connected" if self._writer is not None else "disconnected"
        q = self.queue
        return f"<LineSender {self.name} -> {self.address} {state} queued={q.lines}L/{q.bytes}B>"

    @property
    def is_full(self) -> bool:
        return self.queue.full

    @property
    def queued_bytes(self) -> int:
        return self.queue.bytes

    @property
    def queued_lines(self) -> int:
        return self.queue.lines

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"sender-{self.name}")

    def send(self, chunk: bytes) -> bool:
        """Queue ``chunk`` (whole lines).  False when the queue was already full (chunk not queued)."""
        if not chunk:
            return True
        if not self.queue.offer(chunk):
            return False
        self._wakeup.set()
        return True

    def send_or_drop(self, chunk: bytes) -> bool:
        """Queue ``chunk``, or drop it (reported, reason ``queue_full``) when the queue is full."""
        if self.send(chunk):
            return True
        self._dropped(chunk.count(b"\n"), len(chunk), QUEUE_FULL)
        return False

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the queue is below its bound again (for resuming paused readers)."""
        self._drain_waiters.append(callback)

    async def aclose(self, flush_timeout: float = 2.0, *, successor: LineSender | None = None) -> None:
        """Try to flush for up to ``flush_timeout`` seconds, then stop.

        What is still queued goes to ``successor`` (queued past its bound, in order) or is dropped
        (reason ``shutdown``).  Readers waiting for this queue to drain are released (they go on with
        the successor, or stop mattering at shutdown).
        """
        self._closing = True
        self._closed.set()
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), flush_timeout)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._disconnect()
        lines, size = self.queue.lines, self.queue.bytes
        chunks = self.queue.clear()
        if successor is not None:
            for chunk in chunks:
                successor.queue.force(chunk)
            if chunks:
                successor._wakeup.set()
                log.info(
                    "%s: %d line(s) not delivered to %s handed over to %s",
                    self.name,
                    lines,
                    self.address,
                    successor.address,
                )
        elif chunks:
            self._dropped(lines, size, SHUTDOWN)
        self._release_waiters()

    def _dropped(self, lines: int, size: int, reason: str, error: str = "") -> None:
        self.dropped_lines += lines
        self._log_drop(
            "%s: %d line(s) (%d bytes) dropped for %s: %s%s",
            self.name,
            lines,
            size,
            self.address,
            reason,
            f" ({error})" if error else "",
        )
        if self.on_drop is not None:
            self.on_drop(Dropped(self.name, self.address, lines, size, reason, error))

    def _release_waiters(self) -> None:
        if self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for callback in waiters:
                callback()

    async def _connect(self) -> asyncio.StreamWriter:
        if self._writer is None:
            reader, writer = await asyncio.wait_for(self._open(), self.connect_timeout)
            self._writer = writer
            self._reader_task = asyncio.get_running_loop().create_task(self._discard(reader, writer))
            log.info("%s: connected to %s", self.name, self.address)
        elif self._writer.transport.is_closing():
            await self._disconnect()  # the destination closed it: a batch written there would be lost
            return await self._connect()
        return self._writer

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A plain connection, or a TLS one verified before it is returned (nothing written on it yet)."""
        address = self.address
        if not isinstance(address, Destination):
            return await asyncio.open_connection(address.host, address.port)
        tls = address.tls
        ctx = ssl.create_default_context(cafile=tls.ca_file) if tls.ca_file else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        if not tls.ca_file:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # the pinned SHA-256 is compared below, before any byte is sent
        reader, writer = await asyncio.open_connection(
            address.host, address.port, ssl=ctx, server_hostname=address.host if tls.ca_file else None
        )
        if tls.sha256:
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            got = hashlib.sha256(der).digest() if der else b""
            if got != tls.sha256:
                writer.transport.abort()
                why = f"certificate mismatch: pinned {_colon(tls.sha256)}, presented {_colon(got)}"
                log.error("%s: %s %s; nothing sent", self.name, address, why)
                raise ConnectionRefusedError(why)
        return reader, writer

    async def _discard(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read and drop what the destination sends; when it closes the connection, forget the writer so
        the next batch goes over a new connection instead of into a socket nobody reads."""
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass
        if self._writer is writer:
            log.info("%s: %s closed the connection; reconnecting for the next batch", self.name, self.address)
            self._writer = None
            writer.close()

    async def _disconnect(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _run(self) -> None:
        while True:
            if not len(self.queue):
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not await self._deliver(self.queue.take_batch()):
                return  # closing: aclose hands over or drops what is still queued
            if not self.is_full:
                self._release_waiters()

    async def _deliver(self, batch: bytes) -> bool:
        """Write ``batch`` with retries, then settle it (sent or dropped).  False: closing, batch kept."""
        attempts = 0
        while True:
            try:
                writer = await self._connect()
                writer.write(batch)
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
            except (TimeoutError, OSError) as exc:
                self.failures += 1
                await self._disconnect()
                if self._closing:
                    return False
                error = describe(exc)
                if self.retries is not None and attempts >= self.retries:
                    lines, size = self.queue.settle()
                    self._dropped(lines, size, RETRIES_EXHAUSTED, f"{attempts + 1} attempt(s), last: {error}")
                    return True
                attempts += 1
                await self._wait_retry(attempts, error)
                continue
            self.queue.settle()
            self.sent_bytes += len(batch)
            return True

    async def _wait_retry(self, attempts: int, error: str) -> None:
        if self.retries is None:
            # Keep the queue and retry until the destination is back; say so once per outage.
            delay = max(1.0, self.retry_timeout)
            (log.warning if attempts == 1 else log.debug)(
                "%s: cannot send to %s (%s); %d line(s) queued, retrying every %.0f s",
                self.name,
                self.address,
                error,
                self.queue.lines,
                delay,
            )
        else:
            delay = self.retry_timeout
            log.warning(
                "%s: cannot send to %s (%s); retry %d/%d in %.0f s",
                self.name,
                self.address,
                error,
                attempts,
                self.retries,
                delay,
            )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._closed.wait(), delay)  # closing: one last attempt at once


def _colon(digest: bytes) -> str:
    return ":".join(f"{b:02X}" for b in digest) if digest else "none"


def queue_gauges(senders: Callable[[], Iterable[LineSender | None]]) -> LabelledGauges:
    """``threatgate_output_queue_lines`` and ``_bytes`` per destination, for the senders live at scrape time."""
    return {
        "threatgate_output_queue_lines": (
            "Output lines waiting to be sent, by destination",
            "destination",
            lambda: {s.name: float(s.queued_lines) for s in senders() if s is not None},
        ),
        "threatgate_output_queue_bytes": (
            "Output bytes waiting to be sent, by destination",
            "destination",
            lambda: {s.name: float(s.queued_bytes) for s in senders() if s is not None},
        ),
    }


class DropTally:
    """Turns drops into at most one alert per (destination, reason) per ``interval`` seconds.  Sans-IO.

    The first drop of a key is released at once; later ones within the interval are summed and
    released by :meth:`due` once the interval has passed, so an outage yields one alert per
    interval carrying every line, never one alert per batch and never a drop without an alert.
    """

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}

    def add(self, destination: str, reason: str, lines: int, now: float) -> int:
        """Record a drop; the lines to alert about now (0: held for :meth:`due`)."""
        key = (destination, reason)
        last = self._last.get(key)
        if last is None or now - last >= self.interval:
            self._last[key] = now
            return lines + self._held.pop(key, 0)
        self._held[key] = self._held.get(key, 0) + lines
        return 0

    def due(self, now: float) -> list[tuple[str, str, int]]:
        """Held sums whose interval has passed: (destination, reason, lines) to alert about now."""
        out = []
        for key, lines in list(self._held.items()):
            if now - self._last[key] >= self.interval:
                del self._held[key]
                self._last[key] = now
                out.append((*key, lines))
        return out

    def next_due(self) -> float | None:
        """When :meth:`due` has something next (None: nothing held)."""
        return min((self._last[key] + self.interval for key in self._held), default=None)
