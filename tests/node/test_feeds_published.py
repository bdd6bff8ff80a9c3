"""CSV feeds as the world publishes them: comment banners, a commented header, quoted values, and the
``indicator_column`` / ``context_columns`` Feed attributes (issue 12, item 9)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.abusech import (
    FEODO,
    FEODO_COMMENTED_HEADER,
    FEODO_HEADER,
    FEODO_HEADER_LINE,
    URLHAUS,
    URLHAUS_HEADER,
    URLHAUS_HEADER_LINE,
)
from threatgate.config.node import FeedSettings
from threatgate.errors import FeedError
from threatgate.node.feeds import FeedSnapshot, Kind, key_of, load_feed
from threatgate.node.snapfile import Record


def load_csv(tmp_path: Path, text: str, newline: str = "\n", **kwargs: Any) -> FeedSnapshot:
    path = tmp_path / "feed.csv"
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))
    settings = FeedSettings(path=str(path), name=path.name, category="Test", format="csv", **kwargs)
    return load_feed(settings)


def records(snap: FeedSnapshot) -> list[dict[str, str]]:
    """Each record as its CSV row was: the indicator column under its header name, then the context."""
    out = []
    for i in range(len(snap)):
        record = snap.record(i)
        assert record is not None
        out.append({snap.header[snap.header.index(_field(snap))]: record.raw, **dict(record.context)})
    return out


def _field(snap: FeedSnapshot) -> str:
    return next(h for h in snap.header if h in ("indicator", "url", "domain", "ip", "md5", "sha1", "sha256"))


def record(snap: FeedSnapshot, record_no: int) -> Record:
    found = snap.record(record_no)
    assert found is not None
    return found


def keys(snap: FeedSnapshot) -> list[int]:
    """The snapshot's keys in record order."""
    index = snap.index
    by_row = dict(zip(index.refs, index.keys, strict=True))
    return [by_row[row] for row in sorted(by_row)]


# -- URLhaus: the header is the last line of the comment banner ------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_FeedSnapshot_csv_urlhaus_as_published(tmp_path: Path, newline: str) -> None:
    snap = load_csv(tmp_path, URLHAUS, newline)
    assert snap.report.malformed == 0, snap.report.examples
    assert snap.report.records == 5
    assert snap.header == URLHAUS_HEADER
    # A URL with nothing after its host is the host: it detects like a domain record.
    assert snap.report.per_kind == {"url": 4, "domain": 1}
    assert keys(snap) == [
        key_of(Kind.URL, "198.51.100.23/bin.sh"),
        key_of(Kind.URL, "reoen.webgondozas.example/a44f43f1-dc49-4a45-b725-33106ce13f94?ublib=7"),
        key_of(Kind.DOMAIN, "pagos-banc0.example"),
        key_of(Kind.URL, "files.example-host.test/dl/invoice"),
        key_of(Kind.URL, '203.0.113.80/x.php?a=1,2&b="q"'),
    ]
    first, _, third, _, fifth = records(snap)
    assert first == {
        "id": "3853890",
        "dateadded": "2026-05-27 11:52:06",
        "url": "http://198.51.100.23:57501/bin.sh",
        "url_status": "online",
        "last_online": "2026-05-27 11:52:06",
        "threat": "malware_download",
        "tags": "32-bit,elf,mips,Mozi",
        "urlhaus_link": "https://urlhaus.abuse.ch/url/3853890/",
        "reporter": "geenensp",
    }
    assert third is not None and third["reporter"] == "Jürgen_Müller"
    assert fifth is not None and fifth["url"] == 'http://203.0.113.80/x.php?a=1,2&b="q"'
    assert fifth["tags"] == "php,webshell"


def test_FeedSnapshot_csv_urlhaus_record_context_without_the_indicator(tmp_path: Path) -> None:
    snap = load_csv(tmp_path, URLHAUS)
    first = record(snap, 0)
    assert (first.kind, first.value) == (Kind.URL, "198.51.100.23/bin.sh")
    assert [name for name, _ in first.context] == [h for h in URLHAUS_HEADER if h != "url"]


def test_FeedSnapshot_csv_urlhaus_context_columns_keep_only_those(tmp_path: Path) -> None:
    snap = load_csv(tmp_path, URLHAUS, context_columns=("Threat", "tags", "urlhaus_link"))
    assert record(snap, 0).context == (
        ("threat", "malware_download"),
        ("tags", "32-bit,elf,mips,Mozi"),
        ("urlhaus_link", "https://urlhaus.abuse.ch/url/3853890/"),
    )


def test_FeedSnapshot_csv_context_columns_empty_keeps_no_context(tmp_path: Path) -> None:
    snap = load_csv(tmp_path, URLHAUS, context_columns=())
    assert record(snap, 0).context == ()


# -- Feodo Tracker: the indicator is in dst_ip ---------------------------------------------------


@pytest.mark.parametrize("text", [FEODO, FEODO_COMMENTED_HEADER], ids=["as-published", "commented-header"])
def test_FeedSnapshot_csv_feodo_with_indicator_column(tmp_path: Path, text: str) -> None:
    snap = load_csv(tmp_path, text, indicator_column="dst_ip")
    assert snap.report.malformed == 0, snap.report.examples
    assert snap.report.per_kind == {"ip": 3}
    assert keys(snap) == [key_of(Kind.IP, ip) for ip in ("192.0.2.146", "203.0.113.211", "198.51.100.63")]
    # dst_ip is not a field name threatgate knows, so it is read back as "indicator" (classified by shape).
    assert snap.header == ["first_seen_utc", "indicator", *FEODO_HEADER[2:]]
    second = record(snap, 1)
    assert (second.kind, second.raw) == (Kind.IP, "203.0.113.211")
    assert second.context == (
        ("first_seen_utc", "2025-12-30 13:56:31"),
        ("dst_port", "443"),
        ("c2_status", "online"),
        ("last_online", "2026-05-27"),
        ("malware", "QakBot"),
    )


def test_FeedSnapshot_csv_feodo_context_columns(tmp_path: Path) -> None:
    snap = load_csv(tmp_path, FEODO, indicator_column="DST_IP", context_columns=("malware", "dst_port"))
    assert record(snap, 0).context == (("dst_port", "8080"), ("malware", "Emotet"))


def test_FeedSnapshot_csv_feodo_without_indicator_column_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FeedError) as info:
        load_csv(tmp_path, FEODO)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'feed.csv'}: CSV header ")
    assert f"(line {FEODO_HEADER_LINE}) has no indicator column" in message
    assert "'dst_ip'" in message and "one of indicator, mask, url" in message


# -- bad attribute values: clear errors at load, file named ------------------------------------------


def test_FeedSnapshot_csv_indicator_column_not_in_header(tmp_path: Path) -> None:
    with pytest.raises(FeedError) as info:
        load_csv(tmp_path, FEODO, indicator_column="dst_ipv4")
    assert str(info.value) == (
        f"{tmp_path / 'feed.csv'}: CSV header {FEODO_HEADER!r} (line {FEODO_HEADER_LINE}) has no indicator column: "
        "neither it nor a comment line before it has the column 'dst_ipv4' (indicator_column) "
        "(did you mean 'dst_ip'?)"
    )


def test_FeedSnapshot_csv_indicator_column_not_in_commented_header(tmp_path: Path) -> None:
    with pytest.raises(FeedError) as info:
        load_csv(tmp_path, URLHAUS, indicator_column="urll")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'feed.csv'}: CSV header ['3853890', ")
    assert f"(line {URLHAUS_HEADER_LINE + 1}) has no indicator column" in message
    assert message.endswith("has the column 'urll' (indicator_column) (did you mean 'url'?)")


def test_FeedSnapshot_csv_context_column_not_in_header(tmp_path: Path) -> None:
    with pytest.raises(FeedError) as info:
        load_csv(tmp_path, URLHAUS, context_columns=("threat", "tag"))
    assert str(info.value) == (
        f"{tmp_path / 'feed.csv'}: context_columns: 'tag' is not a column of the CSV header (did you mean 'tags'?); "
        f"the columns are {', '.join(URLHAUS_HEADER)}"
    )


def test_FeedSnapshot_csv_context_column_is_the_indicator(tmp_path: Path) -> None:
    with pytest.raises(FeedError, match="context_columns: 'URL' is the indicator column, never record context"):
        load_csv(tmp_path, URLHAUS, context_columns=("threat", "URL"))


def test_FeedSnapshot_csv_only_comment_lines(tmp_path: Path) -> None:
    with pytest.raises(FeedError, match="only comment lines, none of them a CSV header: an indicator column"):
        load_csv(tmp_path, "# abuse.ch\n# nothing here\n")


# -- header rules ---------------------------------------------------------------------------------


def test_FeedSnapshot_csv_commented_header_and_no_record_is_an_empty_feed(tmp_path: Path) -> None:
    snap = load_csv(tmp_path, URLHAUS.split('"3853890"')[0])
    assert snap.report.records == 0
    assert snap.header == URLHAUS_HEADER


def test_FeedSnapshot_csv_uncommented_header_wins_over_a_commented_one(tmp_path: Path) -> None:
    snap = load_csv(tmp_path, "# ip,old\nip,threat\n192.0.2.1,x\n")
    assert snap.header == ["ip", "threat"]
    assert records(snap) == [{"ip": "192.0.2.1", "threat": "x"}]


def test_FeedSnapshot_csv_last_commented_header_is_taken(tmp_path: Path) -> None:
    snap = load_csv(tmp_path, "# url,a\n# generated by x\n# url,threat\nhttp://a.example/x,T\n")
    assert records(snap) == [{"url": "http://a.example/x", "threat": "T"}]


def test_FeedSnapshot_csv_comment_with_an_odd_quote_does_not_swallow_records(tmp_path: Path) -> None:
    snap = load_csv(tmp_path, 'ip,threat\n# the "quote\n192.0.2.1,x\n192.0.2.2,y\n')
    assert [r["ip"] for r in records(snap)] == ["192.0.2.1", "192.0.2.2"]


def test_FeedSnapshot_csv_indicator_column_spelled_like_a_later_field(tmp_path: Path) -> None:
    # indicator_of takes the first of INDICATOR_FIELDS present: "url" would win over "domain", so the
    # chosen column is read back as "indicator" and the url column stays context.
    snap = load_csv(tmp_path, "domain,url,note\nevil.example,http://evil.example/a,n\n", indicator_column="domain")
    assert snap.header == ["indicator", "url", "note"]
    first = record(snap, 0)
    assert (first.kind, first.value) == (Kind.DOMAIN, "evil.example")
    assert first.context == (("url", "http://evil.example/a"), ("note", "n"))


def test_FeedSnapshot_csv_second_indicator_column_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FeedError, match=r"the indicator is column 2 \('dst_ip'\), but column 1 is also named 'ind"):
        load_csv(tmp_path, "indicator,dst_ip\nx,192.0.2.1\n", indicator_column="dst_ip")


def test_FeedSnapshot_csv_duplicate_indicator_column_reads_back_the_first(tmp_path: Path) -> None:
    snap = load_csv(tmp_path, "ip,note,ip\n192.0.2.1,n,192.0.2.9\n")
    first = record(snap, 0)
    assert first.value == "192.0.2.1"
    assert first.context == (("note", "n"), ("ip", "192.0.2.9"))
