"""Tests for threatgate.node.feeds: JSON and CSV feed files into FeedSnapshot (classification: test_records.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from threatgate.config.node import FeedSettings
from threatgate.errors import FeedError
from threatgate.node.feeds import (
    MAX_BAD_EXAMPLES,
    FeedSnapshot,
    Kind,
    indicator_field,
    key_of,
    load_feed,
    record_context,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def settings_for(path: Path, fmt: str, **kwargs: Any) -> FeedSettings:
    return FeedSettings(path=str(path), name=path.name, category="Test", format=fmt, **kwargs)  # type: ignore[arg-type]


def load_text(tmp_path: Path, name: str, text: str, **kwargs: Any) -> FeedSnapshot:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    fmt = "csv" if name.endswith(".csv") else "json"
    return load_feed(settings_for(path, fmt, **kwargs))


Loaded = tuple[str, dict[str, str]]


def loaded(*feed: dict[str, Any]) -> list[Loaded]:
    """What a snapshot keeps of feed records: the indicator as written, and the context as text."""
    out = []
    for record in feed:
        field = indicator_field(record)
        assert field is not None
        out.append((record[field], dict(record_context(record))))
    return out


def read(snap: FeedSnapshot, record_no: int) -> Loaded | None:
    record = snap.record(record_no)
    return None if record is None else (record.raw, dict(record.context))


def records(snap: FeedSnapshot) -> list[Loaded | None]:
    return [read(snap, i) for i in range(len(snap))]


def keys(snap: FeedSnapshot) -> list[int]:
    """The snapshot's keys in record order."""
    index = snap.index
    by_row = dict(zip(index.refs, index.keys, strict=True))
    return [by_row[row] for row in sorted(by_row)]


# -- JSON -----------------------------------------------------------------------------------------


def test_FeedSnapshot_json_loads_records_and_reads_them_back(tmp_path: Path) -> None:
    feed = [
        {"url": "http://evil.example/a", "threat": "Phishing"},
        {"ip": "192.0.2.1", "threat": "Botnet", "score": 7},
        {"md5": "44D88612FEA8A8F36DE82E1278ABB02F", "detection": "EICAR"},
    ]
    snap = load_text(tmp_path, "f.json", json.dumps(feed, indent=2))
    assert snap.report.records == 3
    assert snap.report.malformed == 0
    assert snap.report.per_kind == {"url": 1, "ip": 1, "hash": 1}
    assert records(snap) == loaded(*feed)
    assert records(snap)[1] == ("192.0.2.1", {"threat": "Botnet", "score": "7"})
    assert [snap.index.kind(i) for i in range(3)] == [Kind.URL, Kind.IP, Kind.HASH]
    assert keys(snap) == [
        key_of(Kind.URL, "evil.example/a"),
        key_of(Kind.IP, "192.0.2.1"),
        key_of(Kind.HASH, "44d88612fea8a8f36de82e1278abb02f"),
    ]
    assert snap.name == "f.json"
    assert "records=3" in repr(snap)


def test_FeedSnapshot_json_non_scalar_fields_are_not_context(tmp_path: Path) -> None:
    text = '  [ {"ip": "10.0.0.1"} ,\n\n{"ip": "10.0.0.2", "x": [1, 2], "y": {"a": 1}, "ok": true}  ]  \n'
    snap = load_text(tmp_path, "f.json", text)
    assert records(snap) == [("10.0.0.1", {}), ("10.0.0.2", {"ok": "true"})]


def test_FeedSnapshot_json_empty_array(tmp_path: Path) -> None:
    snap = load_text(tmp_path, "f.json", "[]")
    assert snap.report.records == 0
    assert len(snap) == 0


def test_FeedSnapshot_json_malformed_records_counted_with_examples(tmp_path: Path) -> None:
    text = (
        '[{"url": "http://ok.example/a"}, 5, "str", {"threat": "no indicator"}, {"ip": "999.1.1.1"},\n'
        "{broken json},\n"
        '{"md5": "44d88612fea8a8f36de82e1278abb02f"}]'
    )
    snap = load_text(tmp_path, "f.json", text)
    assert snap.report.records == 2
    assert snap.report.malformed == 5
    examples = snap.report.examples
    assert len(examples) == 5
    assert examples[0] == "record 2: expected an object, got int"
    assert examples[1] == "record 3: expected an object, got str"
    assert examples[2].startswith("record 4: no indicator field")
    assert examples[3] == "record 5: ip='999.1.1.1' is not a valid indicator"
    assert examples[4].startswith("record 6 (line 2): invalid JSON")
    # The record after the broken one is still loaded, and reads back correctly.
    assert records(snap)[-1] == ("44d88612fea8a8f36de82e1278abb02f", {})


def test_FeedSnapshot_json_examples_capped_but_all_counted(tmp_path: Path) -> None:
    feed = [{"threat": f"bad {i}"} for i in range(MAX_BAD_EXAMPLES + 7)]
    snap = load_text(tmp_path, "f.json", json.dumps(feed))
    assert snap.report.malformed == MAX_BAD_EXAMPLES + 7
    assert len(snap.report.examples) == MAX_BAD_EXAMPLES


def test_FeedSnapshot_json_indicator_value_not_a_string_is_malformed(tmp_path: Path) -> None:
    snap = load_text(tmp_path, "f.json", '[{"ip": 3232235521}, {"ip": "10.0.0.1"}]')
    assert snap.report.records == 1
    assert snap.report.malformed == 1


def test_FeedSnapshot_json_truncated_without_bracket_is_feed_error(tmp_path: Path) -> None:
    with pytest.raises(FeedError, match="truncated"):
        load_text(tmp_path, "f.json", '[{"url": "http://a.example/x"},\n{"url": "http://b.exa')


def test_FeedSnapshot_json_truncated_after_record_with_nested_array_is_feed_error(tmp_path: Path) -> None:
    # A "]" inside an earlier record is not the closing bracket of the feed.
    text = '[{"url": "http://a.example/x", "tags": ["t1", "t2"]},\n{"url": "http://b.exa'
    with pytest.raises(FeedError, match="truncated"):
        load_text(tmp_path, "f.json", text)


def test_FeedSnapshot_json_truncated_after_bracket_in_string_is_feed_error(tmp_path: Path) -> None:
    text = '[{"url": "http://a.example/x", "note": "see [1]"},\n{"url": "http://b.example/'
    with pytest.raises(FeedError, match="truncated"):
        load_text(tmp_path, "f.json", text)


@pytest.mark.parametrize(
    "text",
    ['{"url": "http://a.example/x"}', '"just a string"', "42", "null", "", "   \n", "url,threat\n"],
)
def test_FeedSnapshot_json_not_an_array_is_feed_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(FeedError, match="must be an array"):
        load_text(tmp_path, "f.json", text)


def test_FeedSnapshot_json_not_utf8_is_feed_error(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_bytes(b'[{"url": "http://a.example/\xff"}]')
    with pytest.raises(FeedError, match="not UTF-8"):
        load_feed(settings_for(path, "json"))


def test_FeedSnapshot_missing_file_is_feed_error(tmp_path: Path) -> None:
    with pytest.raises(FeedError, match="cannot open"):
        load_feed(settings_for(tmp_path / "nope.json", "json"))


def test_FeedSnapshot_json_non_ascii_records(tmp_path: Path) -> None:
    feed = [
        {"url": "http://a.example/x", "note": "пример"},
        {"domain": "пример.example", "note": "ещё пример ✓"},
        {"url": "http://b.example/y", "note": "ok"},
    ]
    snap = load_text(tmp_path, "f.json", json.dumps(feed, ensure_ascii=False, indent=1))
    assert snap.report.records == 3
    assert records(snap) == loaded(*feed)
    assert read(snap, 2) == ("http://b.example/y", {"note": "ok"})


def test_FeedSnapshot_record_out_of_range_is_none(tmp_path: Path) -> None:
    snap = load_text(tmp_path, "f.json", '[{"ip": "10.0.0.1"}]')
    assert snap.record(5) is None
    assert snap.record(-1) is None


# -- a loaded version is the node's own (rule 3) ---------------------------------------------------

REWRITE_CASES = {
    "json": (
        '[{"url": "http://a.example/x", "threat": "A"},\n {"domain": "b.example", "threat": "B"}]',
        '[{"domain": "b.example", "threat": "B"},\n {"url": "http://c.example/x", "threat": "C"}]',
    ),
    "csv": ("indicator,threat\nhttp://a.example/x,A\nb.example,B\n", "indicator,threat\nb.example,B\nnew.example,N\n"),
}


@pytest.mark.parametrize("fmt", sorted(REWRITE_CASES))
def test_FeedSnapshot_answers_the_same_records_after_its_file_is_rewritten_in_place(tmp_path: Path, fmt: str) -> None:
    before, after = REWRITE_CASES[fmt]
    snap = load_text(tmp_path, f"f.{fmt}", before)
    before_rewrite = records(snap)
    assert [r and r[1]["threat"] for r in before_rewrite] == ["A", "B"]
    path = tmp_path / f"f.{fmt}"
    inode = path.stat().st_ino
    with open(path, "r+b") as fh:  # what cp, curl -o and > do: same inode, new bytes
        fh.write(after.encode())
        fh.truncate()
    assert path.stat().st_ino == inode
    assert records(snap) == before_rewrite
    path.write_bytes(b"")  # truncated
    assert records(snap) == before_rewrite
    path.unlink()  # deleted
    assert records(snap) == before_rewrite


def test_FeedSnapshot_a_fifo_is_feed_error_not_a_hang(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    os.mkfifo(path)
    with pytest.raises(FeedError, match="not a regular file"):
        load_feed(settings_for(path, "json"))


# -- CSV ------------------------------------------------------------------------------------------


def test_FeedSnapshot_csv_example_feed() -> None:
    snap = load_feed(settings_for(EXAMPLES / "feeds" / "ip_reputation.csv", "csv"))
    assert snap.header == ["ip", "threat", "geo"]
    assert snap.report.records == 3
    assert snap.report.per_kind == {"ip": 2, "cidr": 1}
    assert snap.index.has_cidr4 and not snap.index.has_cidr6
    assert records(snap) == loaded(
        {"ip": "192.0.2.0", "threat": "Botnet", "geo": "nl"},
        {"ip": "203.0.113.0/24", "threat": "Scanner", "geo": "us"},
        {"ip": "198.51.100.77", "threat": "TOR exit", "geo": "de"},
    )


def test_FeedSnapshot_csv_quoted_delimiter_newline_and_quotes(tmp_path: Path) -> None:
    text = 'ip,comment,geo\n1.2.3.4,"hello, world\nsecond line",nl\n"5.6.7.8","say ""hi""",de\n9.9.9.9,plain,fr\n'
    snap = load_text(tmp_path, "f.csv", text)
    assert snap.report.records == 3
    assert snap.report.malformed == 0
    assert records(snap) == loaded(
        {"ip": "1.2.3.4", "comment": "hello, world\nsecond line", "geo": "nl"},
        {"ip": "5.6.7.8", "comment": 'say "hi"', "geo": "de"},
        {"ip": "9.9.9.9", "comment": "plain", "geo": "fr"},
    )
    assert records(snap)[0] == ("1.2.3.4", {"comment": "hello, world second line", "geo": "nl"})


def test_FeedSnapshot_csv_malformed_rows_counted_with_line_numbers(tmp_path: Path) -> None:
    text = "ip,threat\n1.2.3.4,a\n'quoted',b\n\n5.6.7.8\n# comment line\n9.9.9.9,c,extra\n300.1.1.1,d\n8.8.8.8,e\n"
    snap = load_text(tmp_path, "f.csv", text)
    assert snap.report.records == 2
    assert snap.report.malformed == 4
    assert snap.report.examples == [
        "line 3: ip=\"'quoted'\" is not a valid indicator",
        "line 5: 1 fields, header has 2",
        "line 7: 3 fields, header has 2",
        "line 8: ip='300.1.1.1' is not a valid indicator",
    ]
    assert [r[0] for r in records(snap) if r] == ["1.2.3.4", "8.8.8.8"]


def test_FeedSnapshot_csv_missing_indicator_column_is_feed_error(tmp_path: Path) -> None:
    with pytest.raises(FeedError, match="no indicator column"):
        load_text(tmp_path, "f.csv", "address,threat\n1.2.3.4,x\n")


def test_FeedSnapshot_csv_empty_is_feed_error(tmp_path: Path) -> None:
    with pytest.raises(FeedError, match="no header"):
        load_text(tmp_path, "f.csv", "\n\n  \n")


def test_FeedSnapshot_csv_header_case_hash_and_custom_delimiter(tmp_path: Path) -> None:
    text = "#Domain;Family;Subdomains\r\nevil.example;Bot;no\r\ncnc.example;Bot;true\r\n"
    snap = load_text(tmp_path, "f.csv", text, delimiter=";")
    assert snap.header == ["domain", "Family", "subdomains"]
    assert [snap.index.kind(i) for i in range(2)] == [Kind.DOMAIN, Kind.DOMAIN_SUFFIX]
    assert records(snap) == loaded(
        {"domain": "evil.example", "Family": "Bot", "subdomains": "no"},
        {"domain": "cnc.example", "Family": "Bot", "subdomains": "true"},
    )


def test_FeedSnapshot_csv_tab_delimiter(tmp_path: Path) -> None:
    snap = load_text(tmp_path, "f.csv", "md5\tname\n44d88612fea8a8f36de82e1278abb02f\tEICAR, test\n", delimiter="\t")
    assert records(snap) == [("44d88612fea8a8f36de82e1278abb02f", {"name": "EICAR, test"})]


def test_FeedSnapshot_csv_non_ascii_records(tmp_path: Path) -> None:
    text = 'domain,note\nпример.example,"пример, с ""кавычками"""\nnext.example,после\nlast.example,ok\n'
    snap = load_text(tmp_path, "f.csv", text)
    assert snap.report.records == 3
    assert read(snap, 1) == ("next.example", {"note": "после"})
    assert read(snap, 2) == ("last.example", {"note": "ok"})
    assert read(snap, 0) == ("пример.example", {"note": 'пример, с "кавычками"'})


def test_FeedSnapshot_csv_generic_indicator_column_classified_by_shape(tmp_path: Path) -> None:
    text = (
        "indicator,note\n"
        "44d88612fea8a8f36de82e1278abb02f,h\n"
        "10.0.0.0/8,c\n"
        "10.1.2.3,i\n"
        "evil.example,d\n"
        "*.cnc.example,s\n"
        "evil.example/path,u\n"
        "evil.example/*/x.php,m\n"
    )
    snap = load_text(tmp_path, "f.csv", text)
    assert snap.report.malformed == 0
    assert snap.report.per_kind == {
        "hash": 1,
        "cidr": 1,
        "ip": 1,
        "domain": 1,
        "domain_suffix": 1,
        "url": 1,
        "mask": 1,
    }
    assert snap.index.kind(6) == Kind.MASK
    assert snap.index.mask(6).parts == ("/", "/x.php")
