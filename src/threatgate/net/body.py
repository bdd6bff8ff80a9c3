"""A request body read at the HTTP edge, bounded in size and in time (node API and balancer gateway alike).

Why one reader: both servers promise the same answers for the same faults, and a limit checked in
one place cannot drift from the other.  The reader answers, in order:

1. a declared ``Content-Length`` over ``limit``: 413 before a byte of the body is read;
2. a body that arrived with the headers (the usual case): taken as is, no timer, no copy loop;
3. otherwise the body is read in chunks for at most ``within`` seconds: over ``limit`` once counted
   (chunked bodies declare nothing): 413; not complete in time: 408; the client went away: 400.

Every refusal is counted (``body_too_large``, ``body_timeout``, ``body_incomplete``) and closes the
connection: the rest of an unread body must not be parsed as the next request.  With
``expect_continue`` a client waiting for ``100 Continue`` gets it once the reading starts (the
gateway buffers the body itself; a node behind it never sends one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from aiohttp import web
from aiohttp.web_request import BaseRequest

from threatgate.net.http import json_error

CHUNK = 1 << 20


async def read_body(
    request: BaseRequest,
    *,
    limit: int,
    within: float,
    count: Callable[[str], None],
    late: str | None = None,
    expect_continue: bool = False,
) -> bytes | web.Response:
    """The whole body of ``request``, or the error answer to send (already set to close the connection).

    ``late`` is the 408 message (default: "request body not received within <within> s").
    """
    length = request.content_length
    if length is not None and length > limit:
        count("body_too_large")
        return _closing(json_error(413, f"request body of {length} bytes is over the {limit} byte limit"))
    content = request.content
    if length is not None and content.is_eof():
        return content.read_nowait()  # the whole body came with the headers
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(within):
            if expect_continue and _expects_continue(request):
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.writer.output_size = 0  # the interim answer is not the response: aiohttp must still send one
            async for chunk in content.iter_chunked(CHUNK):
                size += len(chunk)
                if size > limit:
                    count("body_too_large")
                    return _closing(json_error(413, f"request body is over the {limit} byte limit"))
                chunks.append(chunk)
    except TimeoutError:
        count("body_timeout")
        return _closing(json_error(408, late or f"request body not received within {within:.0f} s"))
    except ConnectionError:
        # The client went away mid-body: nothing is stored and nobody reads the answer; no 500.
        count("body_incomplete")
        return _closing(json_error(400, "connection lost while the request body was being read"))
    return b"".join(chunks)


def _expects_continue(request: BaseRequest) -> bool:
    return request.version == aiohttp.HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue"


def _closing(response: web.Response) -> web.Response:
    response.force_close()
    return response
