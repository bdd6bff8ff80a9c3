"""Tests for threatgate.net.http1: the upstream request as one buffer, answers parsed from any split of bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from threatgate.errors import MalformedAnswer, UpstreamFailed
from threatgate.net.http1 import Response, ResponseReader, encode_request

LENGTH = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Node: a\r\nContent-Length: 5\r\n\r\n[1,2]"
CHUNKED = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-Node: b\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n"


def read(data: bytes | list[bytes], *, head: bool = False, limit: int = 1 << 20) -> Response | None:
    reader = ResponseReader(limit)
    reader.expect(head=head)
    answer = None
    for chunk in [data] if isinstance(data, bytes) else data:
        assert answer is None, "bytes after a complete answer"
        answer = reader.feed(chunk)
    return answer


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


def test_a_content_length_answer() -> None:
    assert read(LENGTH) == Response(
        200, [("Content-Type", "application/json"), ("X-Node", "a"), ("Content-Length", "5")], b"[1,2]", True
    )


def test_a_chunked_answer_is_joined() -> None:
    answer = read(CHUNKED)
    assert answer is not None
    assert (answer.status, answer.body, answer.keep_alive) == (201, b"[1,2]", True)
    assert ("X-Node", "b") in answer.headers


@given(st.sampled_from([LENGTH, CHUNKED]), st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_of_the_bytes_gives_the_same_answer(data: bytes, cuts: list[int]) -> None:
    assert read(split(data, cuts)) == read(data)


def test_none_until_the_answer_is_complete() -> None:
    reader = ResponseReader(1 << 20)
    reader.expect(head=False)
    assert reader.feed(LENGTH[:-1]) is None and reader.started
    answer = reader.feed(LENGTH[-1:])
    assert answer is not None and answer.body == b"[1,2]"


def test_one_reader_reads_answer_after_answer_on_a_kept_connection() -> None:
    reader = ResponseReader(1 << 20)
    for data in (LENGTH, CHUNKED, LENGTH):
        reader.expect(head=False)
        assert not reader.started
        answer = reader.feed(data)
        assert answer is not None and answer.body == b"[1,2]" and answer.keep_alive


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["connection-close", "http-1.0"],
)
def test_a_connection_the_node_will_close_is_not_kept(data: bytes) -> None:
    answer = read(data)
    assert answer is not None and answer.body == b"ok" and not answer.keep_alive


def test_an_answer_delimited_by_the_close_ends_at_eof() -> None:
    reader = ResponseReader(1 << 20)
    reader.expect(head=False)
    assert reader.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of ") is None
    assert reader.feed(b"it") is None
    answer = reader.eof()
    assert answer is not None and answer.body == b"all of it" and not answer.keep_alive


def test_a_close_inside_a_declared_body_is_no_answer() -> None:
    reader = ResponseReader(1 << 20)
    reader.expect(head=False)
    assert reader.feed(LENGTH[:-2]) is None
    assert reader.eof() is None and reader.started  # cut short: the caller says so
    before = ResponseReader(1 << 20)
    before.expect(head=False)
    assert before.feed(b"HTTP/1.1 200") is None
    assert before.eof() is None and not before.started  # closed before the answer


def test_head_and_bodiless_statuses_end_at_the_headers() -> None:
    head = read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", head=True)
    assert head is not None and (head.status, head.body, head.keep_alive) == (200, b"", False)
    for status in (204, 304):
        answer = read(f"HTTP/1.1 {status} X\r\nX-A: 1\r\n\r\n".encode())
        assert answer is not None and (answer.status, answer.body, answer.headers) == (status, b"", [("X-A", "1")])


def test_an_interim_answer_is_skipped() -> None:
    answer = read([b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n", LENGTH])
    assert answer is not None and answer.status == 200 and ("X-Interim", "1") not in answer.headers


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "malformed answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "malformed answer"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n" + b"x" * 20, "over the 10 byte limit"),
    ],
    ids=["not-http", "bad-length", "bad-chunk", "over-the-limit"],
)
def test_a_malformed_answer_is_an_upstream_failure(data: bytes, message: str) -> None:
    with pytest.raises(MalformedAnswer, match=message) as caught:
        read(data, limit=10)
    assert isinstance(caught.value, UpstreamFailed)  # the gateway tries another node


def test_a_request_is_one_buffer_with_a_length_whenever_a_body_may_come() -> None:
    headers = {"Accept": "application/json", "X-Forwarded-For": "127.0.0.1"}
    assert encode_request("GET", "/api/1.1/suppliers?x=1", "127.0.0.1:9443", headers, b"") == (
        b"GET /api/1.1/suppliers?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9443\r\n"
        b"Accept: application/json\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n"
    )
    assert encode_request("POST", "/api/1.1/lookup", "[::1]:9443", {}, b"[]") == (
        b"POST /api/1.1/lookup HTTP/1.1\r\nHost: [::1]:9443\r\nContent-Length: 2\r\n\r\n[]"
    )
    assert encode_request("DELETE", "/api/1.1/suppliers/x", "h:1", {}, b"").endswith(b"Content-Length: 0\r\n\r\n")
