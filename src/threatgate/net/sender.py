"""A resilient line sender: detections and service alerts to a TCP destination.

Rules:
1. ``send`` never blocks and never raises: lines go into a bounded queue.  When the queue is full the
   caller is told (``send`` returns False) and should apply back-pressure (detections) or count a
   drop (alerts), never wait.
2. Delivery follows CyberTrace's EventSendingRetriesCount / EventSendingRetriesTimeout: a failed
   write or connect is retried ``retries`` times, ``retry_timeout`` seconds apart; after that the
   batch at the head of the queue is dropped, counted and logged at ERROR, and sending goes on.
   ``retries=None`` (service alerts) retries until the destination is back: the bounded queue
   holds what happened during the outage, and only what overflows it is lost (and counted).
3. One persistent connection; anything the destination sends back is read and discarded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable

from threatgate.config.common import Address

log = logging.getLogger("threatgate.net")


class LineSender:
    """Sends byte chunks of complete lines to ``address`` with bounded queueing and retries."""

    def __init__(
        self,
        address: Address,
        *,
        name: str,
        retries: int | None = 3,
        retry_timeout: float = 10.0,
        max_queue_bytes: int = 16 * 1024 * 1024,
        connect_timeout: float = 5.0,
    ) -> None:
        self.address = address
        self.name = name
        self.retries = retries
        self.retry_timeout = retry_timeout
        self.max_queue_bytes = max_queue_bytes
        self.connect_timeout = connect_timeout
        self.sent_bytes = 0
        self.dropped_chunks = 0
        self.failures = 0
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._drain_waiters: list[Callable[[], None]] = []
        self._closing = False

    def __repr__(self) -> str:
        state = "connected" if self._writer is not None else "disconnected"
        return f"<LineSender {self.name} -> {self.address} {state} queued={self._queued}B>"

    @property
    def is_full(self) -> bool:
        return self._queued >= self.max_queue_bytes

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"sender-{self.name}")

    def send(self, chunk: bytes) -> bool:
        """Queue ``chunk`` (whole lines).  False when the queue was already full (chunk not queued)."""
        if not chunk:
            return True
        if self.is_full:
            return False
        self._queue.append(chunk)
        self._queued += len(chunk)
        self._wakeup.set()
        return True

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the queue is below its bound again (for resuming paused readers)."""
        self._drain_waiters.append(callback)

    async def aclose(self, flush_timeout: float = 2.0) -> None:
        """Try to flush for up to ``flush_timeout`` seconds, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), flush_timeout)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._disconnect()

    async def _connect(self) -> asyncio.StreamWriter:
        if self._writer is None:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.address.host, self.address.port), self.connect_timeout
            )
            asyncio.get_running_loop().create_task(self._discard(reader))
            self._writer = writer
            log.info("%s: connected to %s", self.name, self.address)
        return self._writer

    @staticmethod
    async def _discard(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass

    async def _disconnect(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            chunk = b"".join(self._queue)
            attempts = 0
            delivered = False
            while True:
                try:
                    writer = await self._connect()
                    writer.write(chunk)
                    await writer.drain()
                    delivered = True
                    break
                except (TimeoutError, OSError) as exc:
                    self.failures += 1
                    await self._disconnect()
                    if self._closing or (self.retries is not None and attempts >= self.retries):
                        log.error(
                            "%s: dropped %d bytes for %s after %d attempt(s): %s",
                            self.name,
                            len(chunk),
                            self.address,
                            attempts + 1,
                            exc,
                        )
                        self.dropped_chunks += 1
                        break
                    attempts += 1
                    if self.retries is None:
                        # Keep the queue and retry until the destination is back; say so once per outage.
                        (log.warning if attempts == 1 else log.debug)(
                            "%s: cannot send to %s (%s); %d bytes queued, retrying every %.0f s",
                            self.name,
                            self.address,
                            exc,
                            self._queued,
                            max(1.0, self.retry_timeout),
                        )
                        await asyncio.sleep(max(1.0, self.retry_timeout))
                        continue
                    log.warning(
                        "%s: cannot send to %s (%s); retry %d/%d in %.0f s",
                        self.name,
                        self.address,
                        exc,
                        attempts,
                        self.retries,
                        self.retry_timeout,
                    )
                    await asyncio.sleep(self.retry_timeout)
            # Everything joined into ``chunk`` is done (sent or dropped); new chunks may have arrived.
            sent = len(chunk)
            while sent and self._queue:
                head = self._queue.popleft()
                sent -= len(head)
                self._queued -= len(head)
            if delivered:
                self.sent_bytes += len(chunk)
            if not self.is_full and self._drain_waiters:
                waiters, self._drain_waiters = self._drain_waiters, []
                for callback in waiters:
                    callback()
