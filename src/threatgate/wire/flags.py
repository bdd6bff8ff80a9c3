"""Session flags: the ``X-KF-*`` tokens a client sends as the first bytes of a connection.

Rules:
1. Flags are a prefix of the byte stream with no newline after them (Kaspersky's own Splunk lookup
   script sends ``X-KF-SendFinishedEventX-KF-ReplyBack`` and then the first event right away), so they
   are recognised token by token, never as a line.
2. While the buffered bytes are a proper prefix of a possible token the answer is NEED_DATA; at EOF,
   or as soon as the bytes cannot be a token, whatever was recognised so far is the answer.
3. ``PING`` is a token only right after ``X-KF-ReplyBack`` (``X-KF-ReplyBackPING``).
Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

REPLY_BACK: Final = b"X-KF-ReplyBack"
SEND_FINISHED: Final = b"X-KF-SendFinishedEvent"
SAVE_STATISTIC: Final = b"X-KF-SaveStatistic"
PING: Final = b"PING"
PONG: Final = b"PONG"

_TOKENS: Final = (REPLY_BACK, SEND_FINISHED, SAVE_STATISTIC)


class NeedData:
    """Sentinel type: more bytes are needed before an answer is possible."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class SessionFlags:
    """What a client asked for at the start of its connection."""

    reply_back: bool = False
    send_finished: bool = False
    save_statistic: bool = False
    ping: bool = False

    def to_bytes(self) -> bytes:
        """The canonical first bytes for these flags (what the balancer sends to a node)."""
        out = b""
        if self.send_finished:
            out += SEND_FINISHED
        if self.reply_back or self.ping:
            out += REPLY_BACK
        if self.ping:
            return out + PING
        if self.save_statistic:
            out += SAVE_STATISTIC
        return out


NO_FLAGS: Final = SessionFlags()


def parse_flags(data: bytes, eof: bool = False) -> tuple[SessionFlags, int] | NeedData:
    """Recognise the session flags at the start of ``data``.

    Args:
        data: every byte received on the connection so far.
        eof: True when the peer will send nothing more.

    Returns:
        ``(flags, consumed)`` where ``consumed`` is how many bytes the flags took (0 without flags), or
        NEED_DATA when the bytes so far are a proper prefix of a flag token and more may come.
    """
    pos = 0
    reply_back = send_finished = save_statistic = ping = False
    while True:
        rest = data[pos:]
        for token in _TOKENS:
            if rest.startswith(token):
                pos += len(token)
                if token is REPLY_BACK:
                    reply_back = True
                    if data.startswith(PING, pos):
                        pos += len(PING)
                        ping = True
                    elif not eof and PING.startswith(data[pos:]) and len(data) - pos < len(PING):
                        return NEED_DATA
                elif token is SEND_FINISHED:
                    send_finished = True
                else:
                    save_statistic = True
                break
        else:
            if not eof and rest and any(token.startswith(rest) for token in _TOKENS):
                return NEED_DATA
            if not eof and not rest:
                return NEED_DATA  # another token (or the first event) may follow
            return SessionFlags(reply_back, send_finished, save_statistic, ping), pos
        if ping:
            return SessionFlags(reply_back, send_finished, save_statistic, ping), pos
