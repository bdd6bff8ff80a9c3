"""Event framing: bytes from a TCP stream in, events (``str``) out.

Rules (the CyberTrace input protocol, docs/protocol.md):
1. UTF-8 text; LF ends an event; CR is ignored anywhere.
2. An optional EventDelimiter regex marks where a new event *starts*: a LF is inserted before every
   match, so a line can hold several events.
3. Empty events are skipped silently (a trailing newline after the flags is common).
4. Bad input never raises and never loses the rest of the stream:
   - invalid UTF-8 is replaced by U+FFFD and the event is still matched (counted in ``invalid_utf8``);
   - NUL bytes are replaced by U+FFFD so no downstream C parser is truncated by them (``nul``);
   - a line longer than ``max_event_size`` bytes is not matched; it comes out as an :class:`Oversized`
     marker (so a SendFinishedEvent peer still gets its one finished line) and the framer discards
     bytes up to the next LF without buffering them (``oversized``).
5. At EOF the bytes after the last LF form a final event (a client may half-close without a newline).

Theory of operation: ``receive_data`` only appends; ``next_events`` cuts the buffer at its *last* LF
and decodes/splits everything before it in one go, which keeps the per-event Python work to a
minimum.  The h11-style ``next_event`` is provided for callers that want one at a time.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from threatgate.wire.flags import NEED_DATA, NeedData


@dataclass(frozen=True, slots=True)
class Oversized:
    """A line that exceeded the size limit: its first bytes (for context rules) and its real size.

    ``size`` is a lower bound when the line was still being discarded at the time it was reported.
    """

    prefix: str
    size: int


FramedEvent = str | Oversized

_PREFIX_BYTES: Final = 4096
"""How much of an oversized line is kept, so context rules such as REQ can still find the request id."""


@dataclass(slots=True)
class FramingStats:
    """Counters of bad input seen by one framer (the service adds them to its metrics)."""

    events: int = 0
    invalid_utf8: int = 0
    nul: int = 0
    oversized: int = 0
    unterminated: int = 0


class LineFramer:
    """Splits a byte stream into events.

    Args:
        max_event_size: longest accepted line in bytes (CR excluded), default 1 MiB.
        delimiter: the EventDelimiter regex, or None.
    """

    def __init__(self, max_event_size: int = 1024 * 1024, delimiter: re.Pattern[str] | None = None) -> None:
        self.max_event_size = max_event_size
        self.delimiter = delimiter
        self.stats = FramingStats()
        self._buffer = bytearray()
        self._discarding = False  # inside an oversized line, dropping bytes until the next LF
        self._discarded = 0
        self._eof = False
        self._ready: list[FramedEvent] = []

    def __repr__(self) -> str:
        return f"<LineFramer buffered={len(self._buffer)} ready={len(self._ready)} eof={self._eof}>"

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet part of a complete event."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; ``b""`` means EOF.  Mutates the buffer only."""
        if not data:
            self._eof = True
            return
        if self._discarding:
            cut = data.find(b"\n")
            if cut < 0:
                self._discarded += len(data)
                return
            self._discarded += cut
            self._discarding = False
            data = data[cut + 1 :]
        self._buffer += data
        buf = self._buffer
        if (
            len(buf) > self.max_event_size + 64
            and buf.rfind(b"\n") < 0
            and len(buf) - buf.count(b"\r") > self.max_event_size
        ):
            # A partial line already over the limit: remember its head, stop buffering the rest.
            self._start_discard()

    def _start_discard(self) -> None:
        head = bytes(self._buffer[: _PREFIX_BYTES * 2]).replace(b"\r", b"")[:_PREFIX_BYTES]
        self._discarded = len(self._buffer.replace(b"\r", b""))
        self._buffer.clear()
        self._discarding = True
        self.stats.oversized += 1
        self._ready.append(Oversized(self._decode_line(head), self._discarded))

    def next_events(self) -> list[FramedEvent]:
        """Every complete event received so far, in stream order.  Empties the internal queue."""
        out = self._ready
        self._ready = []
        self._complete_events(out)
        if self._eof and self._buffer:
            self._complete_events(out)  # the unterminated last event
        buf = self._buffer
        if len(buf) > self.max_event_size and len(buf) - buf.count(b"\r") > self.max_event_size:
            self._start_discard()  # the partial line after the last LF is already too long
            out.extend(self._ready)
            self._ready = []
        return out

    def _complete_events(self, out: list[FramedEvent]) -> None:
        buf = self._buffer
        cut = buf.rfind(b"\n")
        if cut < 0:
            if not (self._eof and buf):
                return
            chunk = bytes(buf)
            buf.clear()
            self.stats.unterminated += 1
        else:
            chunk = bytes(buf[:cut])
            del buf[: cut + 1]
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r", b"")
        lines = chunk.split(b"\n")
        limit = self.max_event_size
        if len(chunk) > limit and any(len(line) > limit for line in lines):
            for line in lines:
                if len(line) > limit:
                    self.stats.oversized += 1
                    out.append(Oversized(self._decode_line(line[:_PREFIX_BYTES]), len(line)))
                else:
                    events = self._split(self._clean_nul(self._decode_line(line)))
                    self.stats.events += len(events)
                    out.extend(events)
            return
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            text = "\n".join(self._decode_line(line) for line in lines)
        events = self._split(self._clean_nul(text))
        self.stats.events += len(events)
        out.extend(events)
        return

    def next_event(self) -> FramedEvent | NeedData:
        """One event, or NEED_DATA (h11-style single-step API over :meth:`next_events`)."""
        if not self._ready:
            self._ready = self.next_events()
        if self._ready:
            return self._ready.pop(0)
        return NEED_DATA

    def _decode_line(self, line: bytes) -> str:
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            self.stats.invalid_utf8 += 1
            return line.decode("utf-8", "replace")

    def _clean_nul(self, text: str) -> str:
        if "\0" not in text:
            return text
        self.stats.nul += sum(1 for line in text.split("\n") if "\0" in line)
        return text.replace("\0", "\ufffd")

    def _split(self, text: str) -> list[FramedEvent]:
        if self.delimiter is not None:
            text = self.delimiter.sub(_newline_before, text)
        return [event for event in text.split("\n") if event]


def _newline_before(match: re.Match[str]) -> str:
    return "\n" + match.group(0)
