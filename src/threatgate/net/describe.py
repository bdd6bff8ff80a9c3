"""Failures and answers in the words an operator reads: never a Python class, object or container repr.

Why: ``str()`` of a foreign exception often shows Python internals.  aiohttp's connection error reads
``Cannot connect to host 127.0.0.1:8443 ssl:<ssl.SSLContext object at 0x7f...> [Connect call failed
('127.0.0.1', 8443)]``; asyncio's refused connection carries a tuple; ssl's errors end in ``(_ssl.c:1006)``;
a JSON error body printed as is reads ``[{'status': ...}]``.  Every message that reaches a log line, a
CLI's output or an HTTP answer goes through here instead.

Rules:
1. Say what happened, with the system's own words for it: ``cannot connect: Connection refused``,
   ``timed out``, ``TLS: certificate verify failed: self-signed certificate``.
2. A threatgate error (:class:`~threatgate.errors.ThreatgateError`) is already written for operators: as is.
3. Anything unknown: its message, first line, bounded; an exception without one is "failed", never its class.
4. A message that names the file itself takes only the system's words: :func:`threatgate.fs.os_reason`.
Pure: no I/O.
"""

from __future__ import annotations

import errno as errnos
import json
import os
import re
import socket
import ssl
import sys
from typing import Any

from threatgate.errors import ThreatgateError

MAX_TEXT = 300
"""Characters of a message kept (a peer's text is not ours to print at any length)."""

_ERRNO = re.compile(r"\[Errno (-?\d+)\]")
_BIND = re.compile(r"bind on address \('([^']*)', (\d+)")
_SSL_NOISE = re.compile(r"^\[[A-Z0-9_]+: [A-Z0-9_]+\]\s*|\s*\(_ssl\.c:\d+\)$")


def describe(exc: BaseException) -> str:
    """What ``exc`` means for whoever reads it (rules 1-3)."""
    if isinstance(exc, ThreatgateError):
        return _bounded(str(exc))
    aiohttp = sys.modules.get("aiohttp")  # an aiohttp error exists only where aiohttp was imported
    if aiohttp is not None:
        return _aiohttp_text(aiohttp, exc) or _plain(exc)
    return _plain(exc)


def _aiohttp_text(aiohttp: Any, exc: BaseException) -> str | None:
    """aiohttp's client errors in words; None for another exception.

    aiohttp is not imported here: a node's worker process serves events without it (node/worker.py).
    """
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return f"TLS: the certificate presented has SHA-256 {_colon(exc.got)}, not the pinned {_colon(exc.expected)}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "TLS: " + _ssl_text(exc.certificate_error)
    if isinstance(exc, aiohttp.ClientConnectorError):  # DNS and TLS handshake failures too
        inner = describe(exc.os_error)
        return inner if isinstance(exc.os_error, ssl.SSLError) else "cannot connect: " + inner
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the connection was closed before the whole answer arrived"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer was cut short"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} {exc.message}".rstrip()
    if isinstance(exc, aiohttp.InvalidURL):
        return f"invalid URL {str(exc.url)[:200]}"
    return None


def _plain(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):  # asyncio's and aiohttp's timeouts included
        return "timed out"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 (byte {exc.start})"
    if isinstance(exc, ssl.SSLError):
        return "TLS: " + _ssl_text(exc)
    if isinstance(exc, OSError):
        return _os_text(exc)
    return _bounded(str(exc)) or "failed"


def _os_text(exc: OSError) -> str:
    """The system's words for the error (``Connection refused``), not asyncio's text around it."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})" if exc.strerror else "cannot resolve the host name"
    if exc.errno is not None and exc.errno > 0 and exc.errno in errnos.errorcode:
        text = os.strerror(exc.errno)
        bind = _BIND.search(exc.strerror or "")  # asyncio: "error while attempting to bind on address ('h', p): ..."
        if bind:
            host, port = bind.groups()
            return f"cannot listen on {f'[{host}]' if ':' in host else host}:{port}: {text}"
        where = exc.filename
        return f"{where}: {text}" if isinstance(where, str) else text
    # asyncio's "Multiple exceptions: [Errno 111] Connect call failed (...), [Errno 99] ..." (every address failed)
    found = dict.fromkeys(os.strerror(int(n)) for n in _ERRNO.findall(str(exc)) if int(n) > 0)
    if found:
        return "; ".join(found)
    return _bounded(exc.strerror or str(exc)) or "connection failed"


def _ssl_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        text = _SSL_NOISE.sub("", exc.strerror or str(exc)).strip()
        if text:
            return _bounded(text)
        if exc.reason:
            return str(exc.reason).lower().replace("_", " ")
        return "handshake failed"
    return describe(exc)


def body_text(data: Any) -> str:
    """A JSON answer as words: the ``status`` (or ``error``) messages of threatgate's error bodies
    (``[{"status": "..."}]``, ``{"error": "..."}``), else compact JSON, never a Python repr."""
    if isinstance(data, bytes):
        try:
            data = json.loads(data)
        except ValueError:
            return printable(data, MAX_TEXT)
    if isinstance(data, str):
        return _bounded(data)
    items = data if isinstance(data, list) else [data]
    messages = [m for m in map(_message, items) if m is not None]
    if messages and len(messages) == len(items):
        return _bounded("; ".join(messages))
    return _bounded(json.dumps(data, ensure_ascii=False, separators=(", ", ": "), default=str))


def _message(item: Any) -> str | None:
    """The text of one error object: its ``error`` or ``status`` string (a cluster answer's ``status`` is a dict)."""
    if isinstance(item, dict):
        for key in ("error", "status"):
            if isinstance(item.get(key), str):
                return str(item[key])
    return None


def printable(data: bytes, limit: int) -> str:
    """Up to ``limit`` bytes a peer sent, quoted, control characters escaped (``"HTTP/1.1 400 ..."``)."""
    return json.dumps(data[:limit].decode("utf-8", "replace"), ensure_ascii=False)


def _bounded(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= MAX_TEXT else first[: MAX_TEXT - 1] + "…"


def _colon(digest: bytes) -> str:
    return ":".join(f"{b:02X}" for b in digest)
