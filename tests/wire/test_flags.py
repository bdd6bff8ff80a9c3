"""Tests for threatgate.wire.flags: the X-KF-* session flags at the start of a connection."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threatgate.wire.flags import (
    NEED_DATA,
    NO_FLAGS,
    PING,
    REPLY_BACK,
    SAVE_STATISTIC,
    SEND_FINISHED,
    NeedData,
    SessionFlags,
    parse_flags,
)

EVENT = b"1 CEF:0|Squid|Proxy|3.5|TCP_MISS|GET|3|src=10.1.2.3 url=http://fakess123.nu/\n"

# Every documented flag prefix and the flags it must produce.
DOCUMENTED = [
    pytest.param(b"X-KF-ReplyBack", SessionFlags(reply_back=True), id="ReplyBack"),
    pytest.param(
        b"X-KF-SendFinishedEventX-KF-ReplyBack",
        SessionFlags(reply_back=True, send_finished=True),
        id="SendFinished+ReplyBack",
    ),
    pytest.param(
        b"X-KF-ReplyBackX-KF-SaveStatistic",
        SessionFlags(reply_back=True, save_statistic=True),
        id="ReplyBack+SaveStatistic",
    ),
    pytest.param(
        b"X-KF-SendFinishedEventX-KF-ReplyBackX-KF-SaveStatistic",
        SessionFlags(reply_back=True, send_finished=True, save_statistic=True),
        id="SendFinished+ReplyBack+SaveStatistic",
    ),
    pytest.param(b"X-KF-ReplyBackPING", SessionFlags(reply_back=True, ping=True), id="ReplyBackPING"),
]


def test_SessionFlags_token_constants_are_the_documented_bytes() -> None:
    assert REPLY_BACK == b"X-KF-ReplyBack"
    assert SEND_FINISHED == b"X-KF-SendFinishedEvent"
    assert SAVE_STATISTIC == b"X-KF-SaveStatistic"
    assert PING == b"PING"


def test_NeedData_sentinel_repr_and_type() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert isinstance(NEED_DATA, NeedData)


@pytest.mark.parametrize(("prefix", "expected"), DOCUMENTED)
def test_SessionFlags_parse_documented_combination_at_eof(prefix: bytes, expected: SessionFlags) -> None:
    assert parse_flags(prefix, eof=True) == (expected, len(prefix))


@pytest.mark.parametrize(("prefix", "expected"), DOCUMENTED)
def test_SessionFlags_parse_documented_combination_followed_by_newline(prefix: bytes, expected: SessionFlags) -> None:
    assert parse_flags(prefix + b"\n" + EVENT) == (expected, len(prefix))


@pytest.mark.parametrize(("prefix", "expected"), [p for p in DOCUMENTED if p.id != "ReplyBackPING"])
def test_SessionFlags_parse_flags_immediately_followed_by_event_without_newline(
    prefix: bytes, expected: SessionFlags
) -> None:
    data = prefix + EVENT
    result = parse_flags(data)
    assert result == (expected, len(prefix))
    assert not isinstance(result, NeedData)
    assert data[result[1] :] == EVENT


def test_SessionFlags_parse_kaspersky_splunk_script_prefix_then_event() -> None:
    # The Kaspersky Splunk lookup script writes the flags and the first event with no separator.
    data = b"X-KF-SendFinishedEventX-KF-ReplyBack" + b"7 url=http://evil.example/\n"
    flags, consumed = parse_flags(data)  # type: ignore[misc]
    assert flags == SessionFlags(reply_back=True, send_finished=True)
    assert data[consumed:] == b"7 url=http://evil.example/\n"


def test_SessionFlags_parse_ping_is_decided_without_eof() -> None:
    assert parse_flags(b"X-KF-ReplyBackPING") == (SessionFlags(reply_back=True, ping=True), 18)


def test_SessionFlags_parse_ping_stops_parsing_at_ping() -> None:
    # Nothing after PING is a flag: the connection is a health check.
    data = b"X-KF-ReplyBackPINGX-KF-SaveStatistic"
    assert parse_flags(data) == (SessionFlags(reply_back=True, ping=True), 18)


def test_SessionFlags_parse_ping_only_after_reply_back() -> None:
    # PING is a token only right after X-KF-ReplyBack.
    assert parse_flags(b"PING", eof=True) == (NO_FLAGS, 0)
    assert parse_flags(b"PING\n") == (NO_FLAGS, 0)
    data = b"X-KF-SendFinishedEventPING\n"
    assert parse_flags(data) == (SessionFlags(send_finished=True), len(SEND_FINISHED))
    data = b"X-KF-ReplyBackX-KF-SaveStatisticPING\n"
    assert parse_flags(data) == (SessionFlags(reply_back=True, save_statistic=True), len(data) - 5)


def test_SessionFlags_parse_event_starting_with_ping_like_text_is_not_ping() -> None:
    data = b"X-KF-ReplyBackPINX 1 event\n"
    assert parse_flags(data) == (SessionFlags(reply_back=True), len(REPLY_BACK))


@pytest.mark.parametrize(("prefix", "expected"), DOCUMENTED)
def test_SessionFlags_parse_growing_prefixes_need_data_until_decidable(prefix: bytes, expected: SessionFlags) -> None:
    """Feed every prefix of flags+event as if it arrived in many small receive chunks.

    Each answer is NEED_DATA or already the final answer; every proper prefix of the flags themselves
    (which could still grow into another token) is NEED_DATA.
    """
    stream = prefix + EVENT
    final = (expected, len(prefix))
    answers = []
    for n in range(len(stream) + 1):
        result = parse_flags(stream[:n])
        answers.append(result)
        assert result is NEED_DATA or result == final, f"prefix {stream[:n]!r} decided {result}, final is {final}"
    for n in range(len(prefix)):
        assert answers[n] is NEED_DATA, f"proper flag prefix {stream[:n]!r} decided {answers[n]}"
    assert answers[-1] == final


def test_SessionFlags_parse_send_finished_alone_in_first_chunk_waits_for_reply_back() -> None:
    # A client that writes the two tokens with two send() calls: the first chunk must not be decided,
    # otherwise X-KF-ReplyBack arrives later and is taken for the first event.
    assert parse_flags(b"X-KF-SendFinishedEvent") is NEED_DATA
    assert parse_flags(b"X-KF-SendFinishedEvent", eof=True) == (SessionFlags(send_finished=True), 22)


def test_SessionFlags_parse_reply_back_alone_waits_for_possible_ping() -> None:
    assert parse_flags(b"X-KF-ReplyBack") is NEED_DATA
    assert parse_flags(b"X-KF-ReplyBackP") is NEED_DATA
    assert parse_flags(b"X-KF-ReplyBackPIN") is NEED_DATA
    assert parse_flags(b"X-KF-ReplyBack", eof=True) == (SessionFlags(reply_back=True), 14)
    assert parse_flags(b"X-KF-ReplyBackPIN", eof=True) == (SessionFlags(reply_back=True), 14)


def test_SessionFlags_parse_no_flags_event_decided_at_first_byte() -> None:
    assert parse_flags(b"1") == (NO_FLAGS, 0)
    assert parse_flags(EVENT) == (NO_FLAGS, 0)


def test_SessionFlags_parse_empty_input_needs_data_until_eof() -> None:
    assert parse_flags(b"") is NEED_DATA
    assert parse_flags(b"", eof=True) == (NO_FLAGS, 0)


@pytest.mark.parametrize(
    "data",
    [
        b"X-KF-Foo\n",
        b"X-KF-replyback\n",  # case matters
        b"x-kf-ReplyBack",
        b"\x00\xff\xfe garbage",
        b" X-KF-ReplyBack",  # leading space: not a flag
        b"XX-KF-ReplyBack",
        b"\nX-KF-ReplyBack",
    ],
)
def test_SessionFlags_parse_garbage_is_no_flags(data: bytes) -> None:
    assert parse_flags(data) == (NO_FLAGS, 0)
    assert parse_flags(data, eof=True) == (NO_FLAGS, 0)


def test_SessionFlags_parse_garbage_after_valid_flag_keeps_the_flag() -> None:
    data = b"X-KF-ReplyBackX-KF-Bogus 1 event\n"
    assert parse_flags(data) == (SessionFlags(reply_back=True), len(REPLY_BACK))


@pytest.mark.parametrize("n", range(1, len(b"X-KF-SendFinishedEvent")))
def test_SessionFlags_parse_partial_token_needs_data_then_eof_decides_no_flags(n: int) -> None:
    partial = SEND_FINISHED[:n]
    assert parse_flags(partial) is NEED_DATA
    assert parse_flags(partial, eof=True) == (NO_FLAGS, 0)


def test_SessionFlags_parse_partial_second_token_at_eof_keeps_first() -> None:
    data = b"X-KF-SendFinishedEventX-KF-Rep"
    assert parse_flags(data) is NEED_DATA
    assert parse_flags(data, eof=True) == (SessionFlags(send_finished=True), len(SEND_FINISHED))


def test_SessionFlags_parse_diverging_prefix_is_decided_without_eof() -> None:
    # "X-KF-R" could be ReplyBack; "X-KF-Rx" cannot be anything.
    assert parse_flags(b"X-KF-R") is NEED_DATA
    assert parse_flags(b"X-KF-Rx") == (NO_FLAGS, 0)


def test_SessionFlags_parse_consumed_never_exceeds_input() -> None:
    for prefix in (b"X-KF-ReplyBack", b"X-KF-SendFinishedEventX-KF-ReplyBackX-KF-SaveStatistic"):
        result = parse_flags(prefix, eof=True)
        assert not isinstance(result, NeedData)
        assert result[1] == len(prefix)


@pytest.mark.parametrize(("prefix", "expected"), DOCUMENTED)
def test_SessionFlags_to_bytes_of_documented_flags_is_canonical(prefix: bytes, expected: SessionFlags) -> None:
    assert expected.to_bytes() == prefix


@pytest.mark.parametrize(("prefix", "expected"), DOCUMENTED)
def test_SessionFlags_to_bytes_round_trips_through_parse(prefix: bytes, expected: SessionFlags) -> None:
    wire = expected.to_bytes()
    assert parse_flags(wire, eof=True) == (expected, len(wire))
    assert parse_flags(wire + EVENT) == (expected, len(wire))


def test_SessionFlags_to_bytes_no_flags_is_empty() -> None:
    assert NO_FLAGS.to_bytes() == b""
    assert parse_flags(NO_FLAGS.to_bytes() + EVENT) == (NO_FLAGS, 0)


def test_SessionFlags_to_bytes_send_finished_alone() -> None:
    flags = SessionFlags(send_finished=True)
    assert flags.to_bytes() == SEND_FINISHED
    assert parse_flags(flags.to_bytes() + EVENT) == (flags, len(SEND_FINISHED))


_VALID_FLAGS = st.builds(
    lambda rb, sf, ss, ping: SessionFlags(
        reply_back=rb or ping, send_finished=sf, save_statistic=ss and not ping, ping=ping
    ),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)


@settings(derandomize=True, max_examples=64)
@given(_VALID_FLAGS)
def test_SessionFlags_to_bytes_round_trip_property(flags: SessionFlags) -> None:
    """Any consistent flags (ping implies reply_back; a ping session carries no statistic) round-trip."""
    wire = flags.to_bytes()
    assert parse_flags(wire + EVENT) == (flags, len(wire))
    assert parse_flags(wire, eof=True) == (flags, len(wire))
