"""Tests for threatgate.net.body.read_body: size and time bounds, the fast path, 100 Continue, counters."""

from __future__ import annotations

import asyncio
import json
from unittest import mock

import pytest
from aiohttp import StreamReader, web
from aiohttp.test_utils import make_mocked_request

from threatgate.net.body import read_body


def _request(headers: dict[str, str], payload: StreamReader, writer: mock.Mock | None = None) -> web.BaseRequest:
    return make_mocked_request("POST", "/api/1.1/lookup", headers=headers, payload=payload, writer=writer)


def _stream() -> StreamReader:
    return StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())


def _status(answer: bytes | web.Response) -> tuple[int, str, bool]:
    assert isinstance(answer, web.Response) and isinstance(answer.body, bytes)
    [error] = json.loads(answer.body)
    return answer.status, error["status"], answer.keep_alive is False


async def test_a_body_that_came_with_the_headers_is_returned_whole() -> None:
    stream = _stream()
    stream.feed_data(b'{"a": 1}')
    stream.feed_eof()
    counted: list[str] = []
    body = await read_body(_request({"Content-Length": "8"}, stream), limit=100, within=1.0, count=counted.append)
    assert (body, counted) == (b'{"a": 1}', [])


async def test_a_declared_length_over_the_limit_is_413_before_reading() -> None:
    counted: list[str] = []
    request = _request({"Content-Length": "101"}, _stream())
    answer = await read_body(request, limit=100, within=1.0, count=counted.append)
    assert _status(answer) == (413, "request body of 101 bytes is over the 100 byte limit", True)
    assert counted == ["body_too_large"]


async def test_a_chunked_body_is_counted_against_the_limit_as_it_arrives() -> None:
    stream = _stream()
    stream.feed_data(b"x" * 60)
    stream.feed_data(b"y" * 60)
    stream.feed_eof()
    counted: list[str] = []
    answer = await read_body(_request({}, stream), limit=100, within=1.0, count=counted.append)
    assert _status(answer) == (413, "request body is over the 100 byte limit", True)
    assert counted == ["body_too_large"]


async def test_a_body_arriving_later_is_joined() -> None:
    stream = _stream()
    loop = asyncio.get_running_loop()
    loop.call_soon(stream.feed_data, b"ab")
    loop.call_soon(stream.feed_data, b"cd")
    loop.call_soon(stream.feed_eof)
    body = await read_body(_request({"Content-Length": "4"}, stream), limit=100, within=1.0, count=pytest.fail)
    assert body == b"abcd"


@pytest.mark.parametrize(
    ("late", "message"),
    [(None, "request body not received within 0 s"), ("request body not received in time", None)],
)
async def test_a_body_not_complete_in_time_is_408(late: str | None, message: str | None) -> None:
    stream = _stream()
    stream.feed_data(b"[")
    counted: list[str] = []
    answer = await read_body(
        _request({"Content-Length": "10"}, stream), limit=100, within=0.05, count=counted.append, late=late
    )
    assert _status(answer) == (408, late or message, True)
    assert counted == ["body_timeout"]


async def test_a_client_gone_mid_body_is_400_and_counted() -> None:
    stream = _stream()
    stream.feed_data(b"[")
    asyncio.get_running_loop().call_soon(stream.set_exception, ConnectionResetError())
    counted: list[str] = []
    answer = await read_body(_request({"Content-Length": "10"}, stream), limit=100, within=1.0, count=counted.append)
    assert _status(answer) == (400, "connection lost while the request body was being read", True)
    assert counted == ["body_incomplete"]


@pytest.mark.parametrize("expect_continue", [True, False])
async def test_100_continue_is_sent_only_when_asked_and_expected(expect_continue: bool) -> None:
    stream = _stream()
    asyncio.get_running_loop().call_soon(stream.feed_data, b"{}")
    asyncio.get_running_loop().call_soon(stream.feed_eof)
    writer = mock.Mock()
    writer.write = mock.AsyncMock()
    headers = {"Content-Length": "2", "Expect": "100-continue"}
    body = await read_body(
        _request(headers, stream, writer), limit=100, within=1.0, count=pytest.fail, expect_continue=expect_continue
    )
    assert body == b"{}"
    sent = [call.args[0] for call in writer.write.await_args_list]
    assert sent == ([b"HTTP/1.1 100 Continue\r\n\r\n"] if expect_continue else [])
