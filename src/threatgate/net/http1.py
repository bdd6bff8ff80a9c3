"""HTTP/1.1 for the balancer's upstream client, sans-IO: a request as one buffer, an answer parsed from bytes.

Why not aiohttp's ``ClientSession`` toward the nodes: per request it builds a ``ClientRequest``, a
``ClientResponse``, a ``StreamReader``, a payload object, a timeout handle and a new response parser;
that machinery was about 60 % of the gateway's CPU per single-object lookup (docs/performance.md,
"Issue 15: the REST gateway").  The gateway needs much less: one request written as one buffer, one
answer read whole.  The parsing itself is llhttp (through ``httptools``, the parser uvloop's authors
keep), not a hand-written one: chunked bodies, lengths and keep-alive rules are its business.

No I/O here: :class:`ResponseReader` takes bytes (:meth:`ResponseReader.feed`) and the end of the
stream (:meth:`ResponseReader.eof`), and returns the :class:`Response` once it is complete.
"""

from __future__ import annotations

from dataclasses import dataclass

import httptools

from threatgate.errors import MalformedAnswer

NO_BODY_STATUSES = frozenset({204, 304})
"""Answers that never carry a body whatever their headers say (RFC 9110 §6.4.1); 1xx are skipped."""


@dataclass(frozen=True, slots=True)
class Response:
    """One upstream answer: status, headers in the order sent (names as spelt), the whole body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    keep_alive: bool
    """The connection may carry another request (HTTP/1.1 without ``Connection: close``, body delimited)."""


def encode_request(method: str, target: str, host: str, headers: dict[str, str], body: bytes) -> bytes:
    """The request head and body as one buffer (one TLS record for a small request, one write).

    ``Content-Length`` is always sent when there is a body, and for every method but GET and HEAD
    (as aiohttp did): a node must never wait for a body that is not coming.
    """
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers.items():
        lines.append(f"{name}: {value}\r\n")
    if body or method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    head = "".join(lines).encode("utf-8", "surrogateescape")
    return head + body if body else head


class ResponseReader:
    """Parses one answer at a time from the bytes of a connection; :meth:`expect` before each request.

    llhttp does not know the request method: after a HEAD (or for 204/304) the body is skipped here,
    and the connection is not reused after a HEAD (llhttp would read the next answer as the body).
    """

    __slots__ = (
        "_parser",
        "_head",
        "_status",
        "_headers",
        "_name",
        "_chunks",
        "_size",
        "_limit",
        "_done",
        "_delimited",
        "_headers_done",
        "_skip_body",
        "_keep_alive",
    )

    def __init__(self, limit: int) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._limit = limit
        self._head = False
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self._delimited = False  # Content-Length or chunked: the end is known without a close
        self._headers_done = False
        self._skip_body = False
        self._keep_alive = False

    def expect(self, *, head: bool) -> None:
        """Get ready for the answer to the request about to be sent (``head``: it was a HEAD)."""
        self._head = head
        self._reset()

    # -- the parser's callbacks (httptools calls these) ------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue, 103): the real one follows
            self._headers = []
            return
        self._status = status
        self._headers_done = True
        self._keep_alive = self._parser.should_keep_alive()  # HTTP/1.1 and no Connection: close (read now:
        # llhttp forgets it at the end of the message)
        for name, value in self._headers:
            low = name.lower()
            if low == "content-length" or (low == "transfer-encoding" and "chunked" in value.lower()):
                self._delimited = True
        if self._head or status in NO_BODY_STATUSES:
            self._skip_body = True
            raise _Complete  # stops llhttp before it reads a body that is not there

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._limit:
            raise MalformedAnswer(f"the answer body is over the {self._limit} byte limit")
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if self._status:  # not the end of an interim answer
            self._done = True

    # -- what the connection calls --------------------------------------------------------------------

    def feed(self, data: bytes) -> Response | None:
        """The answer, once ``data`` completed it; None while more bytes are needed.

        Raises:
            MalformedAnswer: not HTTP, a bad length or chunk, over the limit, or bytes after the answer.
        """
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Complete):
                return self._finish(keep_alive=False)  # HEAD, 204, 304: parser state spent, connection too
            if isinstance(cause, MalformedAnswer):
                raise cause from None
            raise MalformedAnswer(f"malformed answer: {_reason(exc)}") from None
        except httptools.HttpParserError as exc:
            raise MalformedAnswer(f"malformed answer: {_reason(exc)}") from None
        if not self._done:
            return None
        return self._finish(keep_alive=self._delimited and self._keep_alive)

    @property
    def started(self) -> bool:
        """The answer's headers are in (a close now cuts its body short)."""
        return self._headers_done

    def eof(self) -> Response | None:
        """The stream ended: the answer if its end was the close (no length, not chunked), else None."""
        if self._headers_done and not self._done and not self._delimited and not self._skip_body:
            return self._finish(keep_alive=False)
        return None

    def _finish(self, *, keep_alive: bool) -> Response:
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return Response(self._status, self._headers, body, keep_alive)


class _Complete(Exception):
    """Raised inside a parser callback to stop at the end of a bodiless answer's headers."""


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "malformed HTTP answer"


__all__ = ["Response", "ResponseReader", "encode_request"]
