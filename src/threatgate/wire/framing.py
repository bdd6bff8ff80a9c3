"""Event framing: bytes from a TCP stream in, events (``str``) out.

Two framings reach an event port (docs/protocol.md, "Framing"):

* **LF** (the CyberTrace input protocol, :class:`LineFramer`): LF ends an event.
* **RFC 6587 octet counting** (:class:`OctetFramer`): ``MSG-LEN SP MSG`` frames, where MSG-LEN is
  ``[1-9][0-9]*`` and MSG exactly that many bytes: what rsyslog sends with
  ``TCP_Framing="octet-counted"`` and syslog-ng's ``syslog()`` driver by default.  One frame is one
  message, whatever bytes it holds.

Rules common to both:
1. UTF-8 text; CR is ignored anywhere.
2. An optional EventDelimiter regex marks where a new event *starts*: a LF is inserted before every
   match, so a line (or a message) can hold several events.
3. Empty events are skipped silently (a trailing newline after the flags is common).
4. Bad input never raises and never loses the rest of the stream:
   - invalid UTF-8 is replaced by U+FFFD and the event is still matched (counted in ``invalid_utf8``);
   - NUL bytes are replaced by U+FFFD so no downstream C parser is truncated by them (``nul``);
   - an event longer than ``max_event_size`` bytes is not matched; it comes out as an
     :class:`Oversized` marker (so a SendFinishedEvent peer still gets its one finished line) and its
     remaining bytes are discarded without buffering them (``oversized``).
5. At EOF the bytes after the last complete event form a final event (a client may half-close
   without a newline; ``unterminated``).

Octet counting only:
6. A LF inside a message does not end it: the message stays one event (one syslog message, one
   event, one finished line), trailing LFs are dropped and inner LFs become spaces, so a multi-line
   message (a stack trace) keeps its context (e.g. a request id on its first line) for every
   indicator in it, and the balancer can forward it on its LF link to the nodes.
7. MSG-LEN counts every byte of the message (CR and a trailing LF included); over ``max_event_size``
   the frame becomes an :class:`Oversized` marker carrying the first 4 KiB and the declared size,
   and the rest of the frame is skipped as it arrives.
8. A malformed MSG-LEN where a frame should start (not a digit, a leading zero, more than 9 digits,
   or no SP after the digits) is counted in ``bad_frame`` and that frame is read up to the next LF
   as in LF framing (what rsyslog's imtcp does), so a sender that mixes framings or a stream that
   lost sync recovers at the next LF instead of being read as one endless event.  CR and LF
   between frames are skipped silently.

Detection (:func:`detect_framing`, :class:`AutoFramer`) happens once per connection, on its first
bytes after the session flags, and only on connections that sent **no** flags: syslog senders
cannot send a connection preamble, while a client that sent X-KF flags speaks the CyberTrace
protocol, and the balancer's own link to its nodes sends flags followed by ``<id> event`` lines that
look exactly like an octet-counting header.  rsyslog decides on the first byte alone (a digit means
octet counting); that would misread this project's own example events (``1 CEF:...``), so a
connection is octet-counted only when its first bytes parse as a header AND three whole frames follow
one another, each ending right where a further header starts (:data:`PROOF_FRAMES`), or the stream
ends, or the sender pauses, exactly at the end of a frame.  Waiting for that proof
buffers at most one message; a sender that pauses after its first message is decided by the caller
calling :meth:`AutoFramer.sender_paused` (the event port does so after :data:`FRAMING_WAIT`).

Design: the framings are two classes and detection a thin wrapper, rather than a mode inside
LineFramer, so the LF hot path (every flagged connection: lookup scripts, the balancer's node links)
runs exactly the code it ran before, with no per-event or per-batch test of a mode.

Theory of operation: ``receive_data`` only appends (and skips bytes already known to be discarded);
``next_events`` cuts every complete event out of the buffer in one go and decodes them together,
which keeps the per-event Python work to a minimum (every caller takes them a batch at a time).
Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, Protocol


@dataclass(frozen=True, slots=True)
class Oversized:
    """An event that exceeded the size limit: its first bytes (for context rules) and its real size.

    ``size`` is a lower bound when a LF-framed line was still being discarded at the time it was
    reported; for an octet-counted frame it is the declared MSG-LEN.
    """

    prefix: str
    size: int


FramedEvent = str | Oversized

_PREFIX_BYTES: Final = 4096
"""How much of an oversized event is kept, so context rules such as REQ can still find the request id."""

Framing = Literal["lf", "octet_counted"]
LF: Final = "lf"
OCTET_COUNTED: Final = "octet_counted"
PROOF_FRAMES: Final = 3
"""Whole frames that must follow one another, each ending exactly where a further header starts, before
a stream that keeps sending is taken as octet-counted.  One was not enough: in LF lines such as
``91 CEF:...src=10.1.2.3 dst=...`` a ``<digits><SP>`` lies 91 bytes in by chance in about one
connection in a hundred (this project's example events numbered from 1 to 1999); with two in a row,
one in 20,000; with three, none in 20,000.  A real octet-counted sender is decided after three
messages, or at its first pause (:data:`FRAMING_WAIT`) right after a whole frame."""

FRAMING_WAIT: Final = 0.2
"""Seconds without new bytes after which a connection still being detected is decided on what it sent."""

MAX_LEN_DIGITS: Final = 9
"""Longest MSG-LEN accepted (rsyslog stops counting at 200,000,000); more digits is a malformed frame."""

_HEADER: Final = re.compile(rb"([1-9][0-9]{0,8}) ")
_DIGITS: Final = re.compile(rb"[1-9][0-9]{0,8}")


@dataclass(slots=True)
class FramingStats:
    """Counters of bad input seen by one framer (the service adds them to its metrics)."""

    events: int = 0
    invalid_utf8: int = 0
    nul: int = 0
    oversized: int = 0
    unterminated: int = 0
    bad_frame: int = 0  # octet counting: a frame whose MSG-LEN was malformed (read up to LF instead)


class Framer(Protocol):
    """What the event port needs from a framer (every class here provides it)."""

    stats: FramingStats

    @property
    def buffered(self) -> int: ...

    def receive_data(self, data: bytes) -> None: ...

    def next_events(self) -> list[FramedEvent]: ...


class _TextRules:
    """Rules 1-4 on complete events, shared by both framings: decoding, NUL, EventDelimiter."""

    def __init__(self, max_event_size: int, delimiter: re.Pattern[str] | None) -> None:
        self.max_event_size = max_event_size
        self.delimiter = delimiter
        self.stats = FramingStats()
        self._ready: list[FramedEvent] = []

    def next_events(self) -> list[FramedEvent]:
        raise NotImplementedError

    def _decode_line(self, line: bytes | bytearray) -> str:
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


class LineFramer(_TextRules):
    """Splits a LF-framed byte stream into events.

    Args:
        max_event_size: longest accepted line in bytes (CR excluded), default 1 MiB.
        delimiter: the EventDelimiter regex, or None.
    """

    def __init__(self, max_event_size: int = 1024 * 1024, delimiter: re.Pattern[str] | None = None) -> None:
        super().__init__(max_event_size, delimiter)
        self._buffer = bytearray()
        self._discarding = False  # inside an oversized line, dropping bytes until the next LF
        self._discarded = 0
        self._eof = False

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


class OctetFramer(_TextRules):
    """Splits an RFC 6587 octet-counted byte stream (``MSG-LEN SP MSG`` frames) into events.

    Args:
        max_event_size: longest accepted MSG-LEN in bytes, default 1 MiB.
        delimiter: the EventDelimiter regex, or None.
    """

    def __init__(self, max_event_size: int = 1024 * 1024, delimiter: re.Pattern[str] | None = None) -> None:
        super().__init__(max_event_size, delimiter)
        self._buffer = bytearray()
        self._skip = 0  # bytes of an oversized frame still to drop as they arrive
        self._lf_frame = False  # the current frame had a malformed MSG-LEN: it ends at the next LF
        self._discarding = False  # ... and is over the limit: dropping bytes up to that LF
        self._eof = False

    def __repr__(self) -> str:
        return (
            f"<OctetFramer buffered={len(self._buffer)} ready={len(self._ready)} skip={self._skip} "
            f"lf_frame={self._lf_frame} eof={self._eof}>"
        )

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet part of a complete event."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; ``b""`` means EOF.  Bytes of a frame being discarded are not kept."""
        if not data:
            self._eof = True
            return
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip :]
            self._skip = 0
        if self._discarding:
            cut = data.find(b"\n")
            if cut < 0:
                return
            self._discarding = self._lf_frame = False
            data = data[cut + 1 :]
        self._buffer += data

    def next_events(self) -> list[FramedEvent]:
        """Every complete event received so far, in stream order.  Empties the internal queue."""
        out = self._ready
        self._ready = []
        buf = self._buffer
        messages: list[bytes | bytearray] = []  # complete messages not yet decoded (decoded together, in order)
        pos = 0
        while pos < len(buf):
            if self._lf_frame:
                pos = self._lf_frame_end(pos, messages, out)
                if self._lf_frame:
                    break  # waiting for its LF (or discarding up to it)
                continue
            pos = self._plain_frames(pos, messages)
            if pos >= len(buf):
                break
            if buf[pos] in b"\r\n":
                pos += 1  # between frames: tolerated silently
                continue
            header = _HEADER.match(buf, pos)
            if header is None:
                if _could_be_header(buf, pos):
                    if not self._eof:
                        break  # MSG-LEN still arriving
                    messages.append(bytes(buf[pos:]))  # the stream ended inside a MSG-LEN
                    self.stats.unterminated += 1
                    pos = len(buf)
                    break
                self.stats.bad_frame += 1
                self._lf_frame = True
                continue
            size = int(header.group(1))
            start = header.end()
            have = len(buf) - start
            if size > self.max_event_size:
                if have < min(size, _PREFIX_BYTES) and not self._eof:
                    break  # wait for the prefix the context rules need
                take = min(size, have)
                self._emit(messages, out)
                self.stats.oversized += 1
                head = bytes(buf[start : start + min(take, _PREFIX_BYTES)]).replace(b"\r", b"")
                out.append(Oversized(self._decode_line(head), size))
                self._skip = size - take
                pos = start + take
                continue
            if have < size:
                if self._eof:
                    messages.append(bytes(buf[start:]))
                    self.stats.unterminated += 1
                    pos = len(buf)
                break
            messages.append(bytes(buf[start : start + size]))
            pos = start + size
        del buf[:pos]
        self._emit(messages, out)
        return out

    def _plain_frames(self, pos: int, messages: list[bytes | bytearray]) -> int:
        """The hot loop: complete, well-formed frames within the limit from ``pos``; where it stopped."""
        buf = self._buffer
        match = _HEADER.match
        append = messages.append
        limit = self.max_event_size
        end = len(buf)
        while (header := match(buf, pos)) is not None:
            start = header.end()
            size = int(header.group(1))
            if size > limit or start + size > end:
                break
            pos = start + size
            append(buf[start:pos])
        return pos

    def _lf_frame_end(self, pos: int, messages: list[bytes | bytearray], out: list[FramedEvent]) -> int:
        """A frame read as in LF framing (after a malformed MSG-LEN): where it ends, or where waiting starts."""
        buf = self._buffer
        limit = self.max_event_size
        cut = buf.find(b"\n", pos)
        if cut < 0:
            if self._eof:
                messages.append(bytes(buf[pos:]))
                self.stats.unterminated += 1
                self._lf_frame = False
                return len(buf)
            size = len(buf) - pos - buf.count(b"\r", pos)
            if size <= limit:
                return pos  # wait for the LF
            self._emit(messages, out)
            self._oversized_line(bytes(buf[pos:]), size, out)
            self._discarding = True
            return len(buf)
        line = bytes(buf[pos:cut])
        self._lf_frame = False
        if len(line) > limit and len(line) - line.count(b"\r") > limit:
            self._emit(messages, out)
            self._oversized_line(line, len(line) - line.count(b"\r"), out)
        else:
            messages.append(line)
        return cut + 1

    def _oversized_line(self, line: bytes, size: int, out: list[FramedEvent]) -> None:
        self.stats.oversized += 1
        head = line[: _PREFIX_BYTES * 2].replace(b"\r", b"")[:_PREFIX_BYTES]
        out.append(Oversized(self._decode_line(head), size))

    def _emit(self, messages: list[bytes | bytearray], out: list[FramedEvent]) -> None:
        """Decode complete messages (rules 1-4 and 6) into ``out``; empties ``messages``."""
        if not messages:
            return
        chunk = b"\n".join(messages)
        if b"\r" in chunk or chunk.count(b"\n") >= len(messages):  # some message holds CR or LF
            for i, message in enumerate(messages):
                if b"\r" in message:
                    message = message.replace(b"\r", b"")
                if b"\n" in message:
                    message = message.rstrip(b"\n").replace(b"\n", b" ")
                messages[i] = message
            chunk = b"\n".join(messages)
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            text = "\n".join(self._decode_line(message) for message in messages)
        messages.clear()
        events = self._split(self._clean_nul(text))
        self.stats.events += len(events)
        out.extend(events)


def _could_be_header(buf: bytes | bytearray, pos: int) -> bool:
    """``buf[pos:]`` is empty or a proper prefix of a MSG-LEN header (digits, no SP yet)."""
    if pos >= len(buf):
        return True
    digits = _DIGITS.match(buf, pos)
    return digits is not None and digits.end() == len(buf) and len(buf) - pos <= MAX_LEN_DIGITS


def detect_framing(
    data: bytes | bytearray, max_event_size: int, *, eof: bool = False, paused: bool = False
) -> Framing | None:
    """The framing of a connection that sent no session flags, from its first bytes (rule: module docstring).

    Args:
        data: every byte received after the (absent) flags.
        max_event_size: a first MSG-LEN above it is not trusted (it cannot be proven without buffering
            more than one event): such a stream is read as LF.
        eof: the peer will send nothing more.
        paused: nothing arrived for a while; decide on a complete first frame without the next header.

    Returns:
        ``"octet_counted"``, ``"lf"``, or None while the bytes so far cannot tell.
    """
    pos = 0
    frames = 0  # complete frames, each right after the previous one
    while True:
        header = _HEADER.match(data, pos)
        if header is None:
            if pos < len(data) and not _could_be_header(data, pos):
                return LF  # something else where a header must be
            if not (eof or paused):
                return None  # nothing yet, or a header still arriving
            return OCTET_COUNTED if frames else LF  # the stream ended (or paused) right after whole frames
        if frames >= PROOF_FRAMES:
            return OCTET_COUNTED
        size = int(header.group(1))
        if size > max_event_size:
            return LF
        end = header.end() + size
        if len(data) < end:
            if eof or (paused and b"\n" in data):
                return LF  # LF lines are waiting (a frame that long would still be arriving)
            return None  # no framing could emit an event yet: nothing is lost by waiting
        frames += 1
        pos = end


class AutoFramer:
    """Detects the framing of one connection (:func:`detect_framing`), then frames with it.

    Bytes are held until the first bytes prove a framing; they then go to a :class:`LineFramer` or an
    :class:`OctetFramer` that shares this object's ``stats``.

    Args:
        max_event_size: longest accepted event in bytes, default 1 MiB.
        delimiter: the EventDelimiter regex, or None.
    """

    def __init__(self, max_event_size: int = 1024 * 1024, delimiter: re.Pattern[str] | None = None) -> None:
        self.max_event_size = max_event_size
        self.delimiter = delimiter
        self.stats = FramingStats()
        self.framing: Framing | None = None  # None while detecting
        self._inner: LineFramer | OctetFramer | None = None
        self._pending = bytearray()
        self._eof = False

    def __repr__(self) -> str:
        return f"<AutoFramer framing={self.framing} inner={self._inner!r} pending={len(self._pending)}>"

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet part of a complete event."""
        return self._inner.buffered if self._inner is not None else len(self._pending)

    @property
    def deciding(self) -> bool:
        """Bytes are held because the framing is not known yet (the caller may call :meth:`sender_paused`)."""
        return self._inner is None and bool(self._pending)

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; ``b""`` means EOF."""
        if self._inner is not None:
            self._inner.receive_data(data)
            return
        if data:
            self._pending += data
        else:
            self._eof = True
        self._decide(paused=False)

    def sender_paused(self) -> None:
        """Nothing arrived for :data:`FRAMING_WAIT`: decide if a complete first frame is all there is."""
        if self._inner is None:
            self._decide(paused=True)

    def next_events(self) -> list[FramedEvent]:
        """Every complete event received so far, in stream order (none while detecting)."""
        if self._inner is None:
            return []
        return self._inner.next_events()

    def _decide(self, paused: bool) -> None:
        framing = detect_framing(self._pending, self.max_event_size, eof=self._eof, paused=paused)
        if framing is None:
            return
        inner: LineFramer | OctetFramer
        if framing == OCTET_COUNTED:
            inner = OctetFramer(self.max_event_size, self.delimiter)
        else:
            inner = LineFramer(self.max_event_size, self.delimiter)
        inner.stats = self.stats
        self._inner = inner
        self.framing = framing
        if self._pending:
            inner.receive_data(bytes(self._pending))
            self._pending = bytearray()
        if self._eof:
            inner.receive_data(b"")


def _newline_before(match: re.Match[str]) -> str:
    return "\n" + match.group(0)
