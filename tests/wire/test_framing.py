"""Tests for threatgate.wire.framing: bytes in, events out."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threatgate.wire.framing import AutoFramer, FramedEvent, LineFramer, OctetFramer, Oversized, detect_framing

SEMICOLON = re.compile(";")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def feed_all(framer: LineFramer, chunks: list[bytes]) -> list[FramedEvent]:
    """Feed ``chunks`` the way the service does (drain after every receive), then EOF and drain."""
    out: list[FramedEvent] = []
    for chunk in chunks:
        if chunk:
            framer.receive_data(chunk)
            out.extend(framer.next_events())
    framer.receive_data(b"")
    out.extend(framer.next_events())
    return out


def frame(data: bytes, **kwargs: object) -> tuple[list[FramedEvent], LineFramer]:
    framer = LineFramer(**kwargs)  # type: ignore[arg-type]
    return feed_all(framer, [data]), framer


# -- line endings ---------------------------------------------------------------------------------


def test_LineFramer_splits_on_lf() -> None:
    events, framer = frame(b"one\ntwo\nthree\n")
    assert events == ["one", "two", "three"]
    assert framer.stats.events == 3
    assert framer.stats.unterminated == 0


def test_LineFramer_ignores_cr_in_crlf() -> None:
    events, _ = frame(b"one\r\ntwo\r\n")
    assert events == ["one", "two"]


def test_LineFramer_ignores_cr_anywhere() -> None:
    events, _ = frame(b"o\rne\r\r\ntw\ro\n")
    assert events == ["one", "two"]


def test_LineFramer_lone_cr_does_not_end_an_event() -> None:
    events, _ = frame(b"one\rtwo\n")
    assert events == ["onetwo"]


def test_LineFramer_skips_empty_lines() -> None:
    events, framer = frame(b"\n\none\n\n\r\n\ntwo\n\n")
    assert events == ["one", "two"]
    assert framer.stats.events == 2


def test_LineFramer_only_newlines_yields_nothing() -> None:
    events, framer = frame(b"\n\r\n\n")
    assert events == []
    assert framer.buffered == 0


def test_LineFramer_keeps_whitespace_inside_events() -> None:
    events, _ = frame(b"  a b \t\n")
    assert events == ["  a b \t"]


# -- EventDelimiter -------------------------------------------------------------------------------


def test_LineFramer_event_delimiter_splits_one_line_into_events() -> None:
    # Like the docs: EventDelimiter ";" marks where a new event starts (the match stays in it).
    events, _ = frame(b"a=1;b=2;c=3\n", delimiter=SEMICOLON)
    assert events == ["a=1", ";b=2", ";c=3"]


def test_LineFramer_event_delimiter_and_lf_both_split() -> None:
    events, framer = frame(b"a;b\nc\n;d\n", delimiter=SEMICOLON)
    assert events == ["a", ";b", "c", ";d"]
    assert framer.stats.events == 4


def test_LineFramer_event_delimiter_regex_marks_event_start() -> None:
    delimiter = re.compile(r"<\d+>")
    events, _ = frame(b"<13>first event<14>second event\n", delimiter=delimiter)
    assert events == ["<13>first event", "<14>second event"]


def test_LineFramer_without_delimiter_semicolon_is_literal() -> None:
    events, _ = frame(b"a;b\n")
    assert events == ["a;b"]


# -- bad input ------------------------------------------------------------------------------------


def test_LineFramer_invalid_utf8_is_replaced_and_counted() -> None:
    events, framer = frame(b"good\nbad\xff\xfeone\nalso good\n")
    assert events == ["good", "bad\ufffd\ufffdone", "also good"]
    assert framer.stats.invalid_utf8 == 1
    assert framer.stats.events == 3


def test_LineFramer_invalid_utf8_counted_per_line() -> None:
    events, framer = frame(b"\xff\n\xc3\nok \xc3\xa9\n")
    assert events == ["\ufffd", "\ufffd", "ok \u00e9"]
    assert framer.stats.invalid_utf8 == 2


def test_LineFramer_valid_multibyte_utf8_is_kept() -> None:
    events, framer = frame("пример événement\n".encode())
    assert events == ["пример événement"]
    assert framer.stats.invalid_utf8 == 0


def test_LineFramer_nul_is_replaced_and_counted() -> None:
    events, framer = frame(b"a\x00b\x00c\nclean\nx\x00\n")
    assert events == ["a\ufffdb\ufffdc", "clean", "x\ufffd"]
    assert framer.stats.nul == 2  # lines holding NUL
    assert all("\x00" not in e for e in events if isinstance(e, str))


def test_LineFramer_nul_and_invalid_utf8_on_one_line() -> None:
    events, framer = frame(b"a\x00\xffb\n")
    assert events == ["a\ufffd\ufffdb"]
    assert framer.stats.nul == 1
    assert framer.stats.invalid_utf8 == 1


def test_LineFramer_nul_replaced_when_chunk_also_holds_oversized_line() -> None:
    # Rule 4: NUL is always replaced, whatever else is in the same receive chunk.
    framer = LineFramer(max_event_size=64)
    framer.receive_data(b"a\x00b\n" + b"x" * 100 + b"\nc\n")
    events = framer.next_events()
    assert len(events) == 3
    assert isinstance(events[1], Oversized)
    assert events[0] == "a\ufffdb"
    assert events[2] == "c"
    assert framer.stats.nul == 1


def test_LineFramer_stats_events_counts_lines_next_to_oversized_line() -> None:
    framer = LineFramer(max_event_size=64)
    framer.receive_data(b"first\n" + b"x" * 100 + b"\nsecond\n")
    events = framer.next_events()
    assert events[0] == "first" and events[2] == "second"
    assert framer.stats.oversized == 1
    assert framer.stats.events == 2


# -- oversized lines ------------------------------------------------------------------------------


def test_LineFramer_oversized_complete_line_becomes_marker_and_stream_continues() -> None:
    line = b"42 " + b"x" * 200
    events, framer = frame(b"before\n" + line + b"\nafter\n", max_event_size=64)
    assert events[0] == "before"
    assert isinstance(events[1], Oversized)
    assert events[1].prefix == line.decode()  # shorter than the 4096-byte prefix limit: kept whole
    assert events[1].size == len(line)
    assert events[2:] == ["after"]
    assert framer.stats.oversized == 1


def test_LineFramer_line_of_exactly_max_event_size_is_accepted() -> None:
    line = b"y" * 64
    events, framer = frame(line + b"\n" + b"z" * 65 + b"\n", max_event_size=64)
    assert events[0] == line.decode()
    assert isinstance(events[1], Oversized)
    assert framer.stats.oversized == 1


def test_LineFramer_max_event_size_excludes_cr_when_crlf_arrives_whole() -> None:
    line = b"y" * 64
    events, _ = frame(line + b"\r\n", max_event_size=64)
    assert events == [line.decode()]


def test_LineFramer_max_event_size_excludes_cr_when_lf_arrives_in_next_chunk() -> None:
    # "longest accepted line in bytes (CR excluded)": the CR must not push a partial line over the limit.
    line = b"y" * 64
    framer = LineFramer(max_event_size=64)
    events = feed_all(framer, [line + b"\r", b"\n", b"next\n"])
    assert events == [line.decode(), "next"]


def test_LineFramer_oversized_prefix_of_long_line_is_4096_bytes() -> None:
    line = b"7 " + b"a" * 10_000
    events, _ = frame(line + b"\nok\n", max_event_size=1024)
    marker = events[0]
    assert isinstance(marker, Oversized)
    assert marker.prefix == line[:4096].decode()
    assert marker.prefix.startswith("7 ")
    assert marker.size == len(line)
    assert events[1:] == ["ok"]


def test_LineFramer_oversized_partial_line_is_reported_before_its_newline() -> None:
    framer = LineFramer(max_event_size=1024)
    framer.receive_data(b"99 " + b"a" * 2000)
    events = framer.next_events()
    assert len(events) == 1
    marker = events[0]
    assert isinstance(marker, Oversized)
    assert marker.prefix.startswith("99 aaa")
    assert marker.size > 1024  # a lower bound: the line was still arriving
    assert framer.buffered == 0
    # The rest of the oversized line is discarded; the next line is a normal event.
    framer.receive_data(b"b" * 5000 + b"\nnext event\n")
    assert framer.next_events() == ["next event"]
    assert framer.stats.oversized == 1


def test_LineFramer_oversized_partial_prefix_has_no_cr() -> None:
    # CR is ignored anywhere, including in the prefix kept from an oversized line.
    framer = LineFramer(max_event_size=64)
    framer.receive_data(b"12\r 3\r" + b"a" * 200)
    [marker] = framer.next_events()
    assert isinstance(marker, Oversized)
    assert "\r" not in marker.prefix
    assert marker.prefix.startswith("12 3aaa")


def test_LineFramer_oversized_partial_line_detected_by_receive_data_alone() -> None:
    # Without any next_events() call, a partial line past the limit is not buffered.
    framer = LineFramer(max_event_size=1024)
    for _ in range(100):
        framer.receive_data(b"c" * 1000)
        assert framer.buffered <= 1024 + 64 + 1000
    events = framer.next_events()
    assert len(events) == 1 and isinstance(events[0], Oversized)
    assert framer.stats.oversized == 1


def test_LineFramer_memory_bounded_while_feeding_10_mib_without_newline() -> None:
    limit = 64 * 1024
    framer = LineFramer(max_event_size=limit)
    chunk = b"x" * 65536
    markers = []
    peak = 0
    for _ in range(160):  # 10 MiB
        framer.receive_data(chunk)
        peak = max(peak, framer.buffered)
        markers.extend(framer.next_events())
        peak = max(peak, framer.buffered)
    assert peak <= limit + 64 + len(chunk)
    assert framer.buffered == 0
    assert len(markers) == 1 and isinstance(markers[0], Oversized)
    assert len(markers[0].prefix) == 4096
    framer.receive_data(b"tail of the monster\n1 real event\n")
    assert framer.next_events() == ["1 real event"]
    assert framer.stats.oversized == 1


def test_LineFramer_oversized_unterminated_final_event_at_eof() -> None:
    events, _ = frame(b"ok\n" + b"q" * 100, max_event_size=64)
    assert events[0] == "ok"
    assert isinstance(events[1], Oversized)
    assert len(events) == 2


def test_LineFramer_oversized_prefix_invalid_utf8_is_replaced() -> None:
    events, framer = frame(b"\xff" + b"a" * 100 + b"\n", max_event_size=64)
    marker = events[0]
    assert isinstance(marker, Oversized)
    assert marker.prefix.startswith("\ufffd")
    assert framer.stats.invalid_utf8 == 1


# -- EOF ------------------------------------------------------------------------------------------


def test_LineFramer_unterminated_final_event_at_eof() -> None:
    framer = LineFramer()
    framer.receive_data(b"last event")
    assert framer.next_events() == []
    assert framer.buffered == len(b"last event")
    framer.receive_data(b"")
    assert framer.next_events() == ["last event"]
    assert framer.stats.unterminated == 1
    assert framer.buffered == 0


def test_LineFramer_eof_without_trailing_bytes_is_not_unterminated() -> None:
    events, framer = frame(b"a\n")
    assert events == ["a"]
    assert framer.stats.unterminated == 0


def test_LineFramer_eof_after_complete_lines_returns_every_event_in_one_call() -> None:
    # After EOF, "every complete event received so far" includes the unterminated final one.
    framer = LineFramer()
    framer.receive_data(b"a\nb\nc")
    framer.receive_data(b"")
    assert framer.next_events() == ["a", "b", "c"]
    assert framer.buffered == 0


def test_LineFramer_unterminated_final_event_split_by_delimiter() -> None:
    events, _ = frame(b"x;y", delimiter=SEMICOLON)
    assert events == ["x", ";y"]


# -- next_events: what is complete so far -----------------------------------------------------------


def test_LineFramer_next_events_is_empty_until_a_line_completes() -> None:
    framer = LineFramer()
    assert framer.next_events() == []
    framer.receive_data(b"partial")
    assert framer.next_events() == []


def test_LineFramer_next_events_in_order_across_reads() -> None:
    framer = LineFramer()
    framer.receive_data(b"one\ntwo\nthr")
    assert framer.next_events() == ["one", "two"]
    assert framer.next_events() == []
    framer.receive_data(b"ee\n")
    assert framer.next_events() == ["three"]
    assert framer.next_events() == []


def test_LineFramer_next_events_drains_final_event_after_eof() -> None:
    framer = LineFramer()
    framer.receive_data(b"a\nb")
    framer.receive_data(b"")
    assert framer.next_events() == ["a", "b"]
    assert framer.next_events() == []


def test_LineFramer_next_events_yields_oversized_marker() -> None:
    framer = LineFramer(max_event_size=64)
    framer.receive_data(b"z" * 300)
    [marker] = framer.next_events()
    assert isinstance(marker, Oversized)
    assert framer.next_events() == []


def test_LineFramer_next_events_empties_the_queue() -> None:
    framer = LineFramer()
    framer.receive_data(b"a\n")
    assert framer.next_events() == ["a"]
    assert framer.next_events() == []


def test_LineFramer_buffered_counts_partial_line_only() -> None:
    framer = LineFramer()
    framer.receive_data(b"done\npart")
    framer.next_events()
    assert framer.buffered == 4


def test_LineFramer_repr_mentions_buffered() -> None:
    framer = LineFramer()
    framer.receive_data(b"abc")
    assert "buffered=3" in repr(framer)


# -- chunking invariance --------------------------------------------------------------------------


def _summary(framer: LineFramer) -> tuple[int, int, int, int, int]:
    s = framer.stats
    return (s.events, s.invalid_utf8, s.nul, s.oversized, s.unterminated)


def test_LineFramer_byte_at_a_time_equals_one_shot() -> None:
    data = (EXAMPLES / "events.txt").read_bytes()
    data = data.replace(b"\n", b"\r\n") + b"tail \xff\x00 event"
    whole = LineFramer()
    one_shot = feed_all(whole, [data])
    single = LineFramer()
    bytewise = feed_all(single, [data[i : i + 1] for i in range(len(data))])
    assert bytewise == one_shot
    assert len(one_shot) == 8
    assert one_shot[-1] == "tail \ufffd\ufffd event"
    assert _summary(single) == _summary(whole)


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    out, prev = [], 0
    for point in [*points, len(data)]:
        out.append(data[prev:point])
        prev = point
    return out


_BYTES = st.lists(
    st.sampled_from([b"a", b"b", b" ", b"\n", b"\n", b"\r", b"\x00", b";", b"\xff", b"\xc3", b"\xa9", "п".encode()]),
    max_size=200,
).map(b"".join)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(
    st.one_of(_BYTES, st.binary(max_size=200)),
    st.lists(st.integers(min_value=0, max_value=200), max_size=30),
    st.sampled_from([None, SEMICOLON]),
)
def test_LineFramer_any_chunking_equals_one_shot_property(
    data: bytes, cuts: list[int], delimiter: re.Pattern[str] | None
) -> None:
    whole = LineFramer(delimiter=delimiter)
    expected = feed_all(whole, [data])
    pieces = LineFramer(delimiter=delimiter)
    assert feed_all(pieces, _chunked(data, cuts)) == expected
    assert _summary(pieces) == _summary(whole)


_LONG_LINES = st.lists(
    st.sampled_from([b"a", b"b", b";", b"\n", b"\n", b"a" * 20, b"7 ", b"\xc3\xa9"]),
    max_size=120,
).map(b"".join)


def _shape(events: list[FramedEvent]) -> list[str | None]:
    # Oversized markers compare by position only: their prefix/size may legitimately depend on timing.
    return [e if isinstance(e, str) else None for e in events]


@settings(derandomize=True, max_examples=300, deadline=None)
@given(_LONG_LINES, st.lists(st.integers(min_value=0, max_value=2400), max_size=30))
def test_LineFramer_any_chunking_same_events_with_oversized_lines_property(data: bytes, cuts: list[int]) -> None:
    # No CR or NUL here: their interaction with the size limit has dedicated tests above.
    expected = feed_all(LineFramer(max_event_size=64), [data])
    got = feed_all(LineFramer(max_event_size=64), _chunked(data, cuts))
    assert _shape(got) == _shape(expected)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_LineFramer_fixed_size_chunks_equal_one_shot(size: int) -> None:
    data = b"1 a\r\n2 b;c\n\n3 \xffd\n4 e\x00\n5 unterminated"
    expected = feed_all(LineFramer(delimiter=SEMICOLON), [data])
    got = feed_all(LineFramer(delimiter=SEMICOLON), [data[i : i + size] for i in range(0, len(data), size)])
    assert got == expected == ["1 a", "2 b", ";c", "3 \ufffdd", "4 e\ufffd", "5 unterminated"]


# -- RFC 6587 octet counting ------------------------------------------------------------------------


def octet(*messages: bytes) -> bytes:
    """An octet-counted stream: ``MSG-LEN SP MSG`` for each message."""
    return b"".join(b"%d %s" % (len(m), m) for m in messages)


def oframe(data: bytes, **kwargs: object) -> tuple[list[FramedEvent], OctetFramer]:
    framer = OctetFramer(**kwargs)  # type: ignore[arg-type]
    return feed_all(framer, [data]), framer  # type: ignore[arg-type]


def test_OctetFramer_one_frame_is_one_event() -> None:
    events, framer = oframe(octet(b"<13>one url=http://a.example/", b"two", b"x"))
    assert events == ["<13>one url=http://a.example/", "two", "x"]
    assert framer.stats.events == 3
    assert framer.stats.bad_frame == framer.stats.unterminated == 0


def test_OctetFramer_message_with_lf_stays_one_event() -> None:
    # Rule 6: a multi-line message keeps its context; inner LFs become spaces, trailing ones go.
    events, framer = oframe(octet(b"req=7 trace\nat url=http://evil.example/\n\n", b"next"))
    assert events == ["req=7 trace at url=http://evil.example/", "next"]
    assert framer.stats.events == 2


def test_OctetFramer_cr_is_ignored_and_counted_in_msg_len() -> None:
    events, _ = oframe(b"8 a\r\nb\rcd\r" + octet(b"z"))
    assert events == ["a bcd", "z"]


def test_OctetFramer_event_delimiter_applies_inside_a_message() -> None:
    events, framer = oframe(octet(b"a=1;b=2", b"c\n;d"), delimiter=SEMICOLON)
    assert events == ["a=1", ";b=2", "c ", ";d"]
    assert framer.stats.events == 4


def test_OctetFramer_empty_messages_are_skipped() -> None:
    events, framer = oframe(octet(b"\n", b"\r\n", b"a"))
    assert events == ["a"]
    assert framer.stats.events == 1


def test_OctetFramer_invalid_utf8_and_nul_counted_per_message() -> None:
    events, framer = oframe(octet(b"ok \xc3\xa9", b"bad\xff", b"n\x00l\nx\x00", b"\xfe"))
    assert events == ["ok \u00e9", "bad\ufffd", "n\ufffdl x\ufffd", "\ufffd"]
    assert framer.stats.invalid_utf8 == 2
    assert framer.stats.nul == 1


def test_OctetFramer_msg_len_of_exactly_max_event_size_is_accepted() -> None:
    events, framer = oframe(octet(b"y" * 64, b"z" * 65, b"after"), max_event_size=64)
    assert events[0] == "y" * 64
    assert events[1] == Oversized("z" * 65, 65)
    assert events[2] == "after"
    assert framer.stats.oversized == 1
    assert framer.stats.events == 2


def test_OctetFramer_oversized_frame_is_skipped_without_buffering() -> None:
    framer = OctetFramer(max_event_size=1024)
    framer.receive_data(b"10000000 " + b"<13>req=42 " + b"a" * 5000)
    [marker] = framer.next_events()
    assert isinstance(marker, Oversized)
    assert marker.size == 10_000_000  # the declared MSG-LEN
    assert marker.prefix == "<13>req=42 " + "a" * (4096 - 11)
    assert framer.buffered == 0
    sent = 11 + 5000
    while sent < 10_000_000:  # the rest of the frame arrives and is dropped as it comes
        chunk = b"b" * min(65536, 10_000_000 - sent)
        framer.receive_data(chunk)
        sent += len(chunk)
        assert framer.next_events() == []
        assert framer.buffered == 0
    framer.receive_data(octet(b"next event"))
    assert framer.next_events() == ["next event"]
    assert framer.stats.oversized == 1 and framer.stats.bad_frame == 0


def test_OctetFramer_oversized_frame_waits_for_its_prefix() -> None:
    # The marker's prefix does not depend on how the frame was cut (REQ context rules read it).
    framer = OctetFramer(max_event_size=64)
    framer.receive_data(b"100 " + b"a" * 10)
    assert framer.next_events() == []
    framer.receive_data(b"b" * 90 + octet(b"c"))
    assert framer.next_events() == [Oversized("a" * 10 + "b" * 90, 100), "c"]


@pytest.mark.parametrize(
    ("stream", "read_as_lf"),
    [
        (b"<13>a traditional line\n", "<13>a traditional line"),
        (b"012 leading zero\n", "012 leading zero"),
        (b"1234567890 ten digits\n", "1234567890 ten digits"),
        (b"12x no space\n", "12x no space"),
        (b" leading space\n", " leading space"),
    ],
)
def test_OctetFramer_malformed_msg_len_reads_that_frame_up_to_lf(stream: bytes, read_as_lf: str) -> None:
    # Rule 8 (rsyslog's fallback): counted, that frame ends at the next LF, octet counting resumes after it.
    events, framer = oframe(octet(b"before") + stream + octet(b"after\nstill after", b"last"))
    assert events == ["before", read_as_lf, "after still after", "last"]
    assert framer.stats.bad_frame == 1
    assert framer.stats.events == 4


def test_OctetFramer_malformed_frame_waits_for_its_lf_across_chunks() -> None:
    framer = OctetFramer()
    events = feed_all(framer, [b"<13>par", b"tial", b" line\n3 abc"])
    assert events == ["<13>partial line", "abc"]
    assert framer.stats.bad_frame == 1  # counted once, however many chunks it took


def test_OctetFramer_malformed_frame_over_the_limit_is_discarded_up_to_lf() -> None:
    framer = OctetFramer(max_event_size=64)
    framer.receive_data(b"<13>" + b"x" * 100)
    [marker] = framer.next_events()
    assert isinstance(marker, Oversized) and marker.prefix.startswith("<13>xxx") and marker.size >= 104
    assert framer.buffered == 0
    framer.receive_data(b"y" * 1000)
    assert framer.next_events() == [] and framer.buffered == 0
    framer.receive_data(b"end of it\n" + octet(b"ok"))
    assert framer.next_events() == ["ok"]
    assert framer.stats.bad_frame == 1 and framer.stats.oversized == 1


def test_OctetFramer_complete_malformed_line_over_the_limit_is_oversized() -> None:
    events, framer = oframe(b"<1>" + b"x" * 100 + b"\n" + octet(b"ok"), max_event_size=64)
    assert events == [Oversized("<1>" + "x" * 100, 103), "ok"]
    assert framer.stats.bad_frame == 1


def test_OctetFramer_cr_and_lf_between_frames_are_tolerated() -> None:
    events, framer = oframe(octet(b"a") + b"\n" + octet(b"b") + b"\r\n\n" + octet(b"c"))
    assert events == ["a", "b", "c"]
    assert framer.stats.bad_frame == 0


def test_OctetFramer_msg_len_split_across_chunks() -> None:
    framer = OctetFramer()
    assert feed_all(framer, [b"1", b"2", b" ", b"hello world!", b"3", b" ab", b"c"]) == ["hello world!", "abc"]
    assert framer.stats.bad_frame == 0


def test_OctetFramer_partial_frame_at_eof_is_an_unterminated_event() -> None:
    events, framer = oframe(octet(b"whole") + b"50 cut short")
    assert events == ["whole", "cut short"]
    assert framer.stats.unterminated == 1


def test_OctetFramer_partial_msg_len_at_eof_is_an_unterminated_event() -> None:
    events, framer = oframe(octet(b"whole") + b"12")
    assert events == ["whole", "12"]
    assert framer.stats.unterminated == 1
    assert framer.stats.bad_frame == 0


def test_OctetFramer_malformed_frame_at_eof_without_lf() -> None:
    events, framer = oframe(octet(b"whole") + b"<13>no lf")
    assert events == ["whole", "<13>no lf"]
    assert framer.stats.bad_frame == 1 and framer.stats.unterminated == 1


def test_OctetFramer_next_events_across_reads() -> None:
    framer = OctetFramer()
    framer.receive_data(octet(b"one", b"two") + b"5 thr")
    assert framer.next_events() == ["one", "two"]
    assert framer.next_events() == []
    framer.receive_data(b"ee")
    assert framer.next_events() == ["three"]
    assert "buffered=0" in repr(framer)


# -- framing detection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "eof", "paused", "expected"),
    [
        (b"", False, False, None),
        (b"", True, False, "lf"),
        (b"1", False, False, None),  # a MSG-LEN may be arriving
        (b"123456789", False, False, None),
        (b"1234567890", False, False, "lf"),  # too many digits for a MSG-LEN
        (b"12", True, False, "lf"),
        (b"<13>syslog line\n", False, False, "lf"),
        (b"url=http://a.example/\n", False, False, "lf"),
        (b"2024-05-01 12:00 event\n", False, False, "lf"),
        (b"0 zero\n", False, False, "lf"),
        (b"5 hello6 world!", False, False, None),  # two frames: more must confirm them
        (b"5 hello6 world!3 abc", False, False, None),
        (b"5 hello6 world!3 abc2 ", False, False, "octet_counted"),  # three frames and a fourth header
        (b"5 hello6 world!x", False, False, "lf"),  # two headers by chance, then no third: an LF line
        (b"5 hello6 world!", False, True, "octet_counted"),
        (b"5 hello", False, False, None),  # one frame: the next header (or a pause) must confirm it
        (b"5 hello", True, False, "octet_counted"),
        (b"5 hello", False, True, "octet_counted"),
        (b"5 hello1", False, False, None),
        (b"5 hello1", False, True, "octet_counted"),
        (b"5 hello\n", False, False, "lf"),  # a LF line "5 hello": the byte after MSG-LEN is no header
        (b"1 CEF:0|Squid|Proxy|3.5|TCP_MISS\n", False, False, "lf"),  # examples/events.txt
        (b"12 short\n", False, False, None),  # shorter than MSG-LEN: nothing could be emitted yet
        (b"12 short\n", False, True, "lf"),  # the sender paused after a full LF line
        (b"12 short", False, True, None),  # ... but not after a partial one
        (b"12 short\n", True, False, "lf"),
        (b"200 " + b"x" * 100, False, False, None),
        (b"2000 x\n", False, False, "lf"),  # over max_event_size (1024 here): cannot be proven
    ],
)
def test_detect_framing(data: bytes, eof: bool, paused: bool, expected: str | None) -> None:
    assert detect_framing(data, 1024, eof=eof, paused=paused) == expected


def test_AutoFramer_reads_an_octet_counted_stream() -> None:
    data = octet(b"<13>a url=http://fakess123.nu", b"<14>b\nc", b"<15>d")
    framer = AutoFramer()
    assert feed_all(framer, [data]) == ["<13>a url=http://fakess123.nu", "<14>b c", "<15>d"]  # type: ignore[arg-type]
    assert framer.framing == "octet_counted"
    assert framer.stats.events == 3


def test_AutoFramer_reads_the_example_events_as_lf() -> None:
    data = (EXAMPLES / "events.txt").read_bytes()
    framer = AutoFramer()
    assert feed_all(framer, [data]) == feed_all(LineFramer(), [data])  # type: ignore[arg-type]
    assert framer.framing == "lf"


def test_AutoFramer_holds_one_frame_until_the_next_header_or_a_pause() -> None:
    framer = AutoFramer()
    framer.receive_data(octet(b"first"))
    assert framer.next_events() == []
    assert framer.deciding and framer.framing is None
    assert framer.next_events() == []
    assert framer.buffered == len(octet(b"first"))
    framer.sender_paused()
    assert framer.framing == "octet_counted" and not framer.deciding
    assert framer.next_events() == ["first"]
    framer.receive_data(octet(b"second"))
    assert framer.next_events() == ["second"]


def test_AutoFramer_pause_does_not_decide_on_a_partial_line() -> None:
    framer = AutoFramer()
    framer.receive_data(b"12 short")
    framer.sender_paused()
    assert framer.deciding
    framer.receive_data(b"\n")
    framer.sender_paused()
    assert framer.framing == "lf"
    assert framer.next_events() == ["12 short"]


def test_AutoFramer_stats_object_is_kept_after_detection() -> None:
    framer = AutoFramer()
    stats = framer.stats
    feed_all(framer, [octet(b"\xff", b"ok", b"x", b"y") + b"<13>bad\n"])  # type: ignore[arg-type]
    assert framer.stats is stats
    assert (stats.events, stats.invalid_utf8, stats.bad_frame) == (5, 1, 1)
    assert "octet_counted" in repr(framer)


def test_AutoFramer_first_msg_len_over_the_limit_is_read_as_lf() -> None:
    framer = AutoFramer(max_event_size=64)
    assert feed_all(framer, [b"1700000000 epoch-stamped url=http://a.example/\n"]) == [  # type: ignore[arg-type]
        "1700000000 epoch-stamped url=http://a.example/"
    ]
    assert framer.framing == "lf"


# -- octet counting: chunking invariance and LF compatibility ---------------------------------------

_MESSAGE = st.lists(
    st.sampled_from([b"a", b"b", b" ", b"\n", b"\r", b"\x00", b";", b"\xff", b"\xc3", b"\xa9", b"7 ", b"<13>"]),
    max_size=40,
).map(b"".join)
_FRAME = st.one_of(
    _MESSAGE.map(lambda m: octet(m)),
    _MESSAGE.filter(lambda m: b"\n" not in m).map(lambda m: b"<1>" + m + b"\n"),  # a malformed frame
    st.sampled_from([b"\n", b"\r\n", b"0 x\n", b"99999 big\n", b"200 " + b"o" * 200]),
)
_OCTET_STREAM = st.lists(_FRAME, max_size=25).map(b"".join)


def _osummary(framer: OctetFramer | AutoFramer) -> tuple[int, ...]:
    s = framer.stats
    return (s.events, s.invalid_utf8, s.nul, s.oversized, s.unterminated, s.bad_frame)


@settings(derandomize=True, max_examples=400, deadline=None)
@given(
    _OCTET_STREAM,
    st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
    st.sampled_from([None, SEMICOLON]),
)
def test_OctetFramer_any_chunking_equals_one_shot_property(
    data: bytes, cuts: list[int], delimiter: re.Pattern[str] | None
) -> None:
    whole = OctetFramer(max_event_size=64, delimiter=delimiter)
    expected = feed_all(whole, [data])  # type: ignore[arg-type]
    pieces = OctetFramer(max_event_size=64, delimiter=delimiter)
    got = feed_all(pieces, _chunked(data, cuts))  # type: ignore[arg-type]
    # An over-long malformed frame's marker, like a LF line's, holds what had arrived when it was cut.
    assert _shape(got) == _shape(expected)
    assert [e for e in got if isinstance(e, Oversized) and e.size == 200] == [
        e for e in expected if isinstance(e, Oversized) and e.size == 200
    ]  # an oversized octet-counted frame's marker does not depend on the chunking
    assert _osummary(pieces) == _osummary(whole)
    assert all("\n" not in e for e in expected if isinstance(e, str))


@settings(derandomize=True, max_examples=300, deadline=None)
@given(
    st.lists(_MESSAGE.filter(lambda m: m.strip(b"\r\n")), min_size=2, max_size=10),
    st.lists(st.integers(min_value=0, max_value=500), max_size=20),
)
def test_AutoFramer_any_chunking_of_an_octet_stream_is_detected_and_equal_property(
    messages: list[bytes], cuts: list[int]
) -> None:
    data = octet(*messages)
    expected = feed_all(OctetFramer(), [data])  # type: ignore[arg-type]
    framer = AutoFramer()
    assert feed_all(framer, _chunked(data, cuts)) == expected  # type: ignore[arg-type]
    assert framer.framing == "octet_counted"


_NUMBERED_LINES = st.lists(
    st.tuples(st.integers(min_value=1, max_value=200), _BYTES.filter(lambda b: b"\n" not in b)), max_size=8
).map(lambda lines: b"".join(b"%d %s\n" % line for line in lines))


@settings(derandomize=True, max_examples=400, deadline=None)
@given(
    st.one_of(_BYTES, st.binary(max_size=200), _NUMBERED_LINES),
    st.lists(st.integers(min_value=0, max_value=200), max_size=30),
)
def test_AutoFramer_lf_streams_unchanged_property(data: bytes, cuts: list[int]) -> None:
    # Whatever the chunking, a stream read as LF gives exactly LineFramer's events and counters; and a
    # stream starting with "<n> " is only read as octet-counted when its first frame is followed by a header.
    framer = AutoFramer()
    got = feed_all(framer, _chunked(data, cuts))  # type: ignore[arg-type]
    if framer.framing == "lf":
        line = LineFramer()
        assert got == feed_all(line, [data])
        assert _osummary(framer)[:5] == _summary(line)
    else:
        assert framer.framing == "octet_counted"
        header = re.match(rb"([1-9][0-9]*) ", data)
        assert header is not None
        end = header.end() + int(header[1])
        assert end == len(data) or re.match(rb"[1-9][0-9]*( |$)", data[end : end + 10])
        assert got == feed_all(OctetFramer(), [data])  # type: ignore[arg-type]


def test_detect_framing_numbered_lf_lines_without_flags_stay_lf() -> None:
    """A lookup script sending ``<n> <event>`` lines without session flags: no start number from 1 to
    3,000 makes the numbered example events look octet-counted (one of 100 did, with one proof frame)."""
    events = [line.split(b" ", 1)[1] for line in (EXAMPLES / "events.txt").read_bytes().splitlines()]
    for start in range(1, 3001):
        data = b"".join(b"%d %s\n" % (start + i, events[(start + i) % len(events)]) for i in range(40))
        assert detect_framing(data, 1 << 20) != "octet_counted", start
        assert detect_framing(data, 1 << 20, paused=True) == "lf", start
