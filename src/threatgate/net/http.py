"""An HTTPS server edge on aiohttp's low-level server: JSON errors, slow-client timeouts, limits.

Why the low-level ``aiohttp.web.Server`` and not ``web.Application``: the API routes on its own
normalised paths (:mod:`threatgate.wire.paths`) and answers 404/405 itself, so the router and the
middleware chain would be pure overhead on every lookup.

What this module adds to aiohttp:
1. Errors aiohttp's parser raises before a handler runs (bad request line, too many or too long
   headers, bad chunked encoding) are answered with the API's JSON error body ``[{"status": ...}]``
   instead of aiohttp's text page, counted, and logged without a traceback.
2. A *header timeout*: a request whose headers have started but not finished within
   ``header_timeout`` seconds is dropped (slowloris).  aiohttp's keep-alive timer already closes
   connections that stay idle (``idle_timeout``); the body timeout is applied by the handler
   while it reads the body.
3. Every answer says ``Server: threatgate`` (:data:`threatgate.metrics.SERVER`), never aiohttp's
   ``Python/3.x aiohttp/3.y``: versions are for a scanner to match against known flaws, not for clients.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from threatgate.config.common import Address
from threatgate.log import RateLimitedLog
from threatgate.metrics import SERVER
from threatgate.net.gate import Gate, Listening

log = logging.getLogger("threatgate.http")

MAX_HEADERS = 100
"""Header lines per request; real API clients send fewer than 20 (nginx allows ~100 by buffer size)."""
MAX_LINE = 8190
"""Longest request line or header field in bytes (aiohttp's and Apache's default)."""

Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]
_QUOTED = re.compile(r"\s*:?\s*(?:bytearray\()?b['\"].*$")
"""The tail of a parser message that quotes the offending bytes as a Python literal (``b'...'``)."""


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """The documented error body: ``[{"status": "<message>"}]``."""
    return web.Response(
        status=status,
        body=json.dumps([{"status": message}]).encode(),
        content_type="application/json",
        headers=headers,
    )


def unauthorized() -> web.Response:
    """401 with the Basic challenge: the answer to missing or wrong credentials."""
    return json_error(401, "authentication required", {"WWW-Authenticate": 'Basic realm="threatgate"'})


class _Protocol(RequestHandler):
    """aiohttp's request handler with JSON parse errors and a header timeout."""

    server: HTTPServer

    def __init__(self, server: HTTPServer, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, loop=asyncio.get_running_loop(), **kwargs)
        self.server = server
        self._header_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        # Waiting for a request: the handler waits for one, or none came yet on this connection.  The
        # second case matters: a TLS 1.3 client can send its first bytes with its handshake's last flight,
        # so they arrive before the handler task first runs (and a slowloris would never be timed out).
        requests = self._request_count
        waiting = requests == 0 or (self._waiter is not None and not self._waiter.done())
        super().data_received(data)
        if not waiting or self._request_count != requests:
            self._cancel_header_timer()  # a whole request arrived (or one is being handled)
        elif data and self._header_timer is None:
            self._header_timer = asyncio.get_running_loop().call_later(self.server.header_timeout, self._header_expired)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_expired(self) -> None:
        self._header_timer = None
        if self._waiter is not None and not self._waiter.done() and self.transport is not None:
            self.server.count("header_timeout")
            self.server.warn(
                "request headers not complete within %.0f s; connection closed", self.server.header_timeout
            )
            self.force_close()  # closes the transport (and sets it to None)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 500:
            log.error("internal error handling %s %s", request.method, request.path, exc_info=exc)
            self.server.count("internal_error")
            text = "internal error"
        else:
            reason = _parse_error(exc, message)
            self.server.count("malformed_request")
            self.server.warn("malformed HTTP request from %s: %s", request.remote, reason)
            text = f"malformed HTTP request: {reason}" if reason else "malformed HTTP request"
        response = json_error(status, text, {"Server": SERVER})
        response.force_close()
        return response


class HTTPServer:
    """One HTTPS listener serving ``handler`` behind ``gate`` (its sources and TLS, net/gate.py; the gate's
    handshake timeout should be ``header_timeout``).  ``count(reason)`` feeds the owner's bad-input metric."""

    def __init__(
        self,
        handler: Handler,
        *,
        address: Address,
        gate: Gate,
        header_timeout: float,
        idle_timeout: float,
        count: Callable[[str], None],
    ) -> None:
        self.address = address
        self.header_timeout = header_timeout
        self.count = count
        self.warn = RateLimitedLog(log)
        self.gate = gate
        self._web = web.Server(_named(handler), access_log=None)
        self._kwargs: dict[str, Any] = {
            "keepalive_timeout": idle_timeout,
            "max_headers": MAX_HEADERS,
            "max_line_size": MAX_LINE,
            "max_field_size": MAX_LINE,
            "access_log": None,
            "lingering_time": 2.0,
        }
        self._server: Listening | None = None
        self.bound_port = 0
        self.sockname: Any = None
        """The bound address (``getsockname()`` of the first socket) once started: port 0 is a picked port."""

    def _protocol(self) -> _Protocol:
        return _Protocol(self, self._web, **self._kwargs)

    async def start(self) -> None:
        self._server = await self.gate.start_server(self._protocol, self.address.host, self.address.port)
        self.sockname = self._server.sockets[0].getsockname()
        self.bound_port = self.sockname[1]

    async def close(self, grace: float = 2.0) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._web.shutdown(grace)
        try:
            await asyncio.wait_for(self._server.wait_closed(), grace)
        except TimeoutError:
            pass


def _parse_error(exc: BaseException | None, message: str | None) -> str:
    """aiohttp's parser error in words: its first line, without the bytes it quotes as Python reprs."""
    if isinstance(exc, LineTooLong):
        return f"a request line or header field longer than {MAX_LINE} bytes"
    text = message or (str(exc) if exc else "")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return _QUOTED.sub("", first).rstrip(": ")[:200]


def _named(handler: Handler) -> Handler:
    """``handler`` whose answers carry ``Server: threatgate`` (aiohttp adds its own only when there is none)."""

    async def named(request: BaseRequest) -> web.StreamResponse:
        response = await handler(request)
        response.headers["Server"] = SERVER
        return response

    return named
