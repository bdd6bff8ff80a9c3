"""Tests for threatgate.node.suppliers: validation, the SQLite store of API suppliers, their snapshots, and
their part of the cluster settings (export_state, replace_state, check_state)."""

from __future__ import annotations

import copy
import json
import os
import re
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from threatgate.cluster.settings import canonical_json
from threatgate.config.node import NodeConfig, load_node_config
from threatgate.node import normalize
from threatgate.node.feeds import FeedSnapshot, Indicator, Kind, classify, load_feed
from threatgate.node.matcher import Matcher
from threatgate.node.store import Candidate, IndicatorStore
from threatgate.node.suppliers import (
    BUILTIN,
    MAX_NAME,
    SUPPLIER_SLOT_BASE,
    IndicatorPush,
    RequestError,
    Supplier,
    SupplierDB,
    check_name,
    check_state,
    parse_deletions,
    parse_indicators,
    supplier_fields,
    supplier_settings,
    supplier_snapshots,
    tag_fields,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "api.sqlite3"


@pytest.fixture
def db(db_path: Path) -> Iterator[SupplierDB]:
    database = SupplierDB(str(db_path))
    yield database
    database.close()


def push(
    indicator: str, *, context: dict[str, Any] | None = None, tags: list[str] | None = None, fp: bool = False
) -> Any:
    item: dict[str, Any] = {"indicator": indicator}
    if context is not None:
        item["context"] = context
    if tags is not None:
        item["tags"] = tags
    if fp:
        item["false_positive"] = True
    return item


def pushes(*items: Any, allow_fp: bool = True) -> list[IndicatorPush]:
    valid, rejected = parse_indicators(list(items), allow_fp=allow_fp)
    assert rejected == []
    return valid


def rows(db: SupplierDB, name: str) -> list[tuple[str, dict[str, Any], list[str], int]]:
    out = []
    for raw, context, tags, fp in db.indicator_rows(db.supplier(name).id):
        out.append((raw, json.loads(context), json.loads(tags), fp))
    return out


def status_of(excinfo: pytest.ExceptionInfo[RequestError]) -> int:
    return excinfo.value.status


# -- the database: suppliers --------------------------------------------------------------------------


def test_builtin_suppliers_exist(db: SupplierDB) -> None:
    suppliers = db.suppliers()
    assert [s.name for s in suppliers] == list(BUILTIN) == ["FalsePositive", "InternalTI"]
    for s in suppliers:
        assert s.details() == {"name": s.name, "status": "enabled", "confidence": 100, "retention": 0, "vendor": ""}
        assert s.summary() == {"name": s.name, "status": "enabled"}
        assert db.indicator_count(s.id) == 0


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_suppliers_cannot_be_deleted_or_renamed(db: SupplierDB, name: str) -> None:
    with pytest.raises(RequestError, match="cannot be deleted") as info:
        db.delete_supplier(name)
    assert status_of(info) == 403
    with pytest.raises(RequestError, match="cannot be renamed") as info:
        db.update_supplier(name, {"name": "Other"})
    assert status_of(info) == 403
    assert [s.name for s in db.suppliers()] == list(BUILTIN)
    # their other attributes can change, and "renaming" to the same name is no rename
    updated = db.update_supplier(name, {"name": name, "confidence": 50, "status": "disabled"})
    assert (updated.name, updated.confidence, updated.status) == (name, 50, "disabled")


def test_add_update_delete_supplier(db: SupplierDB) -> None:
    added = db.add_supplier({"name": "Acme", "confidence": 70, "vendor": "Acme Corp"})
    assert added.details() == {
        "name": "Acme",
        "status": "enabled",
        "confidence": 70,
        "retention": 0,
        "vendor": "Acme Corp",
    }
    assert db.supplier("Acme") == added
    assert [s.name for s in db.suppliers()] == ["FalsePositive", "InternalTI", "Acme"]

    with pytest.raises(RequestError, match="already exists") as info:
        db.add_supplier({"name": "Acme"})
    assert status_of(info) == 409

    updated = db.update_supplier("Acme", {"status": "disabled", "retention": 60})
    assert (updated.status, updated.retention, updated.confidence, updated.vendor) == ("disabled", 60, 70, "Acme Corp")
    assert db.update_supplier("Acme", {}) == updated  # nothing to change is fine

    db.put_indicators("Acme", pushes(push("evil.example")))
    renamed = db.update_supplier("Acme", {"name": "Acme2"})
    assert renamed.id == added.id and renamed.name == "Acme2"
    assert rows(db, "Acme2") == [("evil.example", {}, [], 0)]  # indicators follow the rename
    with pytest.raises(RequestError) as info:
        db.supplier("Acme")
    assert status_of(info) == 404

    db.add_supplier({"name": "Other"})
    with pytest.raises(RequestError, match="already exists") as info:
        db.update_supplier("Acme2", {"name": "Other"})
    assert status_of(info) == 409

    deleted = db.delete_supplier("Acme2")
    assert deleted.name == "Acme2"
    assert db.indicator_count(added.id) == 0  # its indicators went with it
    assert [s.name for s in db.suppliers()] == ["FalsePositive", "InternalTI", "Other"]


@pytest.mark.parametrize(
    "call",
    [
        lambda db: db.supplier("nope"),
        lambda db: db.update_supplier("nope", {"confidence": 1}),
        lambda db: db.delete_supplier("nope"),
        lambda db: db.put_indicators("nope", pushes(push("evil.example"))),
        lambda db: db.delete_indicators("nope", [classify("evil.example", "indicator")]),
    ],
    ids=["get", "update", "delete", "put_indicators", "delete_indicators"],
)
def test_unknown_supplier_is_404(db: SupplierDB, call: Any) -> None:
    with pytest.raises(RequestError, match="'nope' does not exist") as info:
        call(db)
    assert status_of(info) == 404
    assert [s.name for s in db.suppliers()] == list(BUILTIN)


# -- the database: indicators -------------------------------------------------------------------------


def test_put_indicators_stores_context_tags_and_marks(db: SupplierDB) -> None:
    db.add_supplier({"name": "S"})
    db.add_tag({"name": "apt1"})
    supplier, stored, rejected = db.put_indicators(
        "S",
        pushes(
            push("http://evil.example/a", context={"threat": "Phishing"}, tags=["apt1"]),
            push("198.51.100.1", fp=True),
        ),
    )
    assert (supplier.name, stored, rejected) == ("S", 2, [])
    assert rows(db, "S") == [
        ("http://evil.example/a", {"threat": "Phishing"}, ["apt1"], 0),
        ("198.51.100.1", {}, [], 1),
    ]
    assert db.indicator_count(supplier.id) == 2


def test_put_indicators_rejects_unknown_tags_with_their_body_index(db: SupplierDB) -> None:
    db.add_supplier({"name": "S"})
    db.add_tag({"name": "known"})
    valid, rejected = parse_indicators(
        [
            "not an object",
            push("a.example", tags=["known"]),
            push("b.example", tags=["known", "missing", "gone"]),
        ],
        allow_fp=False,
    )
    assert [r.index for r in rejected] == [0]
    _, stored, more = db.put_indicators("S", valid)
    assert stored == 1
    assert [r.as_json() for r in more] == [
        {"index": 2, "indicator": "b.example", "error": "unknown tag(s): missing, gone"}
    ]
    assert [r[0] for r in rows(db, "S")] == ["a.example"]


def test_put_indicators_only_unknown_tags_stores_nothing(db: SupplierDB) -> None:
    db.add_supplier({"name": "S"})
    _, stored, rejected = db.put_indicators("S", pushes(push("a.example", tags=["missing"])))
    assert stored == 0 and len(rejected) == 1
    assert rows(db, "S") == []


def test_put_indicators_replaces_the_same_normalised_indicator(db: SupplierDB) -> None:
    db.add_supplier({"name": "S"})
    db.put_indicators("S", pushes(push("HTTP://Evil.Example:80/a", context={"v": "1"})))
    db.put_indicators("S", pushes(push("http://evil.example/a", context={"v": "2"})))
    assert rows(db, "S") == [("http://evil.example/a", {"v": "2"}, [], 0)]  # one row, the last push wins
    # twice in one request: still one row
    _, stored, _ = db.put_indicators("S", pushes(push("x.example", context={"n": "1"}), push("X.EXAMPLE.")))
    assert stored == 2
    assert db.indicator_count(db.supplier("S").id) == 2
    assert rows(db, "S")[-1][:2] == ("X.EXAMPLE.", {})
    # the same value in another supplier is another row
    db.add_supplier({"name": "T"})
    db.put_indicators("T", pushes(push("x.example")))
    assert db.indicator_count(db.supplier("T").id) == 1
    assert db.indicator_count(db.supplier("S").id) == 2


def test_put_indicators_is_one_transaction(db: SupplierDB) -> None:
    """A failure half-way (here: a value SQLite cannot encode, smuggled past validation) stores nothing."""
    db.add_supplier({"name": "S"})
    good = pushes(push("a.example"))[0]
    broken = IndicatorPush(Indicator(Kind.DOMAIN, "b.example", "b\ud800.example"), {}, (), False)
    with pytest.raises(UnicodeEncodeError):
        db.put_indicators("S", [good, broken])
    assert rows(db, "S") == []
    db.put_indicators("S", [good])  # the connection is usable afterwards (no transaction left open)
    assert [r[0] for r in rows(db, "S")] == ["a.example"]


def test_delete_indicators_counts_what_it_deleted(db: SupplierDB) -> None:
    db.add_supplier({"name": "S"})
    db.add_supplier({"name": "T"})
    db.put_indicators("S", pushes(push("a.example"), push("http://b.example/x"), push("10.0.0.0/8")))
    db.put_indicators("T", pushes(push("a.example")))
    deletions = parse_deletions(
        [{"indicator": "A.EXAMPLE"}, {"indicator": "http://B.example:80/x"}, {"indicator": "never.example"}]
    )
    supplier, deleted = db.delete_indicators("S", deletions)
    assert (supplier.name, deleted) == ("S", 2)
    assert [r[0] for r in rows(db, "S")] == ["10.0.0.0/8"]
    assert [r[0] for r in rows(db, "T")] == ["a.example"]  # another supplier's copy stays
    assert db.delete_indicators("S", deletions) == (supplier, 0)


def test_expire_deletes_indicators_older_than_the_retention(db: SupplierDB) -> None:
    db.add_supplier({"name": "Short", "retention": 1})
    db.add_supplier({"name": "Forever"})
    db.put_indicators("Short", pushes(push("a.example")))
    db.put_indicators("Forever", pushes(push("a.example")))
    now = time.time()
    assert db.expire(now) == []
    assert db.expire(now + 30) == []
    assert db.expire(now + 61) == ["Short"]
    assert rows(db, "Short") == []
    assert [r[0] for r in rows(db, "Forever")] == ["a.example"]
    assert db.expire(now + 10**9) == []  # nothing left to expire; retention 0 keeps forever


def test_expire_keeps_refreshed_indicators(db: SupplierDB) -> None:
    db.add_supplier({"name": "S", "retention": 10})
    db.put_indicators("S", pushes(push("old.example")))
    pushed = time.time()
    db.put_indicators("S", pushes(push("new.example")))
    # simulate age: the first one was pushed 20 minutes ago
    with sqlite3.connect(db.path) as conn:
        conn.execute("UPDATE indicators SET updated=? WHERE raw='old.example'", (pushed - 1200,))
    conn.close()
    assert db.expire() == ["S"]
    assert [r[0] for r in rows(db, "S")] == ["new.example"]


# -- the database: tags -------------------------------------------------------------------------------


def test_tags_crud(db: SupplierDB) -> None:
    assert db.tags() == []
    assert db.add_tag({"name": "zeta"}) == {"name": "zeta", "description": "", "weight": 0}
    assert db.add_tag({"name": "alpha", "description": "APT", "weight": 80}) == {
        "name": "alpha",
        "description": "APT",
        "weight": 80,
    }
    assert [t["name"] for t in db.tags()] == ["alpha", "zeta"]
    assert db.tag("alpha")["weight"] == 80
    with pytest.raises(RequestError, match="already exists") as info:
        db.add_tag({"name": "alpha"})
    assert status_of(info) == 409
    with pytest.raises(RequestError, match="does not exist") as info:
        db.tag("nope")
    assert status_of(info) == 404

    tag, created = db.put_tag("beta", {"weight": 5})
    assert created and tag == {"name": "beta", "description": "", "weight": 5}
    tag, created = db.put_tag("beta", {"description": "updated"})
    assert not created and tag == {"name": "beta", "description": "updated", "weight": 5}
    tag, created = db.put_tag("beta", {"name": "beta"})
    assert not created and tag["description"] == "updated"
    with pytest.raises(RequestError, match="cannot be renamed") as info:
        db.put_tag("beta", {"name": "gamma"})
    assert status_of(info) == 400
    assert [t["name"] for t in db.tags()] == ["alpha", "beta", "zeta"]

    with pytest.raises(RequestError, match="does not exist") as info:
        db.delete_tag("nope")
    assert status_of(info) == 404


def test_delete_tag_removes_it_from_every_indicator(db: SupplierDB) -> None:
    for name in ("apt", "apt2", "a_t", "crime"):
        db.add_tag({"name": name})
    db.add_supplier({"name": "S"})
    db.add_supplier({"name": "T"})
    db.add_supplier({"name": "U"})
    db.put_indicators(
        "S",
        pushes(
            push("a.example", tags=["apt", "crime"]),
            push("b.example", tags=["apt2"]),
            push("c.example", tags=["apt"]),
        ),
    )
    db.put_indicators("T", pushes(push("a.example", tags=["crime", "apt"])))
    db.put_indicators("U", pushes(push("a.example", tags=["crime"])))
    assert db.delete_tag("apt") == ["S", "T"]
    assert [(r[0], r[2]) for r in rows(db, "S")] == [
        ("a.example", ["crime"]),
        ("b.example", ["apt2"]),  # a longer name containing it is untouched
        ("c.example", []),
    ]
    assert [r[2] for r in rows(db, "T")] == [["crime"]]
    assert [r[2] for r in rows(db, "U")] == [["crime"]]
    assert [t["name"] for t in db.tags()] == ["a_t", "apt2", "crime"]
    # a LIKE wildcard in the name matches only itself
    assert db.delete_tag("a_t") in ([], ["S"])
    assert [(r[0], r[2]) for r in rows(db, "S")][:2] == [("a.example", ["crime"]), ("b.example", ["apt2"])]
    # the deleted tag can no longer be used
    _, stored, rejected = db.put_indicators("S", pushes(push("d.example", tags=["apt"])))
    assert stored == 0 and rejected[0].error == "unknown tag(s): apt"


# -- the database file --------------------------------------------------------------------------------


def test_everything_persists_across_reopen(db_path: Path) -> None:
    first = SupplierDB(str(db_path))
    first.add_supplier({"name": "S", "confidence": 40, "vendor": "v"})
    first.add_tag({"name": "t", "description": "d", "weight": 3})
    first.put_indicators("S", pushes(push("a.example", context={"k": "v"}, tags=["t"]), push("1.2.3.4", fp=True)))
    first.update_supplier("InternalTI", {"confidence": 90})
    before = (first.suppliers(), first.tags(), rows(first, "S"))
    first.close()

    second = SupplierDB(str(db_path))
    try:
        assert (second.suppliers(), second.tags(), rows(second, "S")) == before
        assert [s.name for s in second.suppliers()].count("FalsePositive") == 1  # builtins not added twice
        assert second.supplier("InternalTI").confidence == 90
    finally:
        second.close()


def test_database_file_is_private(db_path: Path) -> None:
    database = SupplierDB(str(db_path))
    try:
        database.add_supplier({"name": "S"})  # some writes, so the WAL and shared-memory files exist
        assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(db_path.parent).st_mode) == 0o700
        for extra in ("-wal", "-shm"):
            side = Path(str(db_path) + extra)
            if side.exists():
                assert stat.S_IMODE(side.stat().st_mode) & 0o077 == 0, side
    finally:
        database.close()


def test_database_uses_wal_and_full_sync(db: SupplierDB, db_path: Path) -> None:
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert db._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    SupplierDB(str(db_path)).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE meta SET value='99' WHERE key='schema'")
    conn.close()
    with pytest.raises(sqlite3.DatabaseError, match="schema 99 is newer"):
        SupplierDB(str(db_path))


# -- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "My Supplier", "x" * MAX_NAME, "émoji😀", "a.b-c_d", "...", ".a", "a\\b"])
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "must be 1-128 characters"),
        ("x" * (MAX_NAME + 1), "must be 1-128 characters"),
        (5, "must be 1-128 characters"),
        (None, "must be 1-128 characters"),
        (".", "must not"),
        ("..", "must not"),
        ("a/b", "must not"),
        ("/", "must not"),
        ("a\nb", "must not"),
        ("a\x00", "must not"),
        ("a\x7f", "must not"),
        ("a\x85", "must not"),
        ("evil\n", "must not"),  # "$" in a pattern alone would let a final newline through
        ("\nevil", "must not"),
    ],
)
def test_check_name_refuses(name: Any, problem: str) -> None:
    with pytest.raises(RequestError, match=problem) as info:
        check_name(name)
    assert status_of(info) == 400
    with pytest.raises(RequestError, match="^tag name"):
        check_name(name, "tag")


def test_supplier_fields() -> None:
    full = {"name": "S", "status": "disabled", "confidence": 0, "retention": 10 * 365 * 24 * 60, "vendor": "v" * 256}
    assert supplier_fields(full, partial=False) == full
    assert supplier_fields([full], partial=False) == full  # the documented array of one object
    assert supplier_fields({"name": "S"}, partial=False) == {"name": "S"}
    assert supplier_fields({}, partial=True) == {}
    assert supplier_fields([{"confidence": 100}], partial=True) == {"confidence": 100}
    assert supplier_fields({"status": "enabled"}, partial=True) == {"status": "enabled"}


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (None, "expected a JSON object"),
        ("S", "expected a JSON object"),
        (5, "expected a JSON object"),
        ([], "expected a JSON object"),
        ([{"name": "a"}, {"name": "b"}], "expected a JSON object"),
        ([[{"name": "a"}]], "expected a JSON object"),
        ({"name": "S", "colour": "red"}, "unknown supplier attribute"),
        ({"name": "S", "id": 1, "created": 0}, r"unknown supplier attribute\(s\): created, id"),
        ({}, "missing supplier name"),
        ({"confidence": 5}, "missing supplier name"),
        ({"name": ""}, "must be 1-128 characters"),
        ({"name": 5}, "must be 1-128 characters"),
        ({"name": "a/b"}, "must not"),
        ({"name": "S", "status": "on"}, "status must be enabled or disabled"),
        ({"name": "S", "status": True}, "status must be enabled or disabled"),
        ({"name": "S", "confidence": 101}, "confidence must be an integer 0-100"),
        ({"name": "S", "confidence": -1}, "confidence must be an integer 0-100"),
        ({"name": "S", "confidence": "50"}, "confidence must be an integer 0-100"),
        ({"name": "S", "confidence": 50.0}, "confidence must be an integer 0-100"),
        ({"name": "S", "confidence": True}, "confidence must be an integer 0-100"),
        ({"name": "S", "confidence": None}, "confidence must be an integer 0-100"),
        ({"name": "S", "retention": -1}, r"retention \(minutes\) must be an integer"),
        ({"name": "S", "retention": 10 * 365 * 24 * 60 + 1}, r"retention \(minutes\) must be an integer"),
        ({"name": "S", "retention": 10**30}, r"retention \(minutes\) must be an integer"),
        ({"name": "S", "vendor": 5}, "vendor must be a string"),
        ({"name": "S", "vendor": None}, "vendor must be a string"),
        ({"name": "S", "vendor": "v" * 257}, "vendor is longer than 256 characters"),
        ({"name": "S", "vendor": "bad \ud800"}, "vendor is not valid Unicode"),
    ],
)
def test_supplier_fields_refuses(body: Any, problem: str) -> None:
    with pytest.raises(RequestError, match=problem) as info:
        supplier_fields(body, partial=False)
    assert status_of(info) == 400


def test_supplier_fields_partial_still_validates() -> None:
    with pytest.raises(RequestError, match="confidence"):
        supplier_fields({"confidence": 1000}, partial=True)
    with pytest.raises(RequestError, match="must not"):
        supplier_fields({"name": ".."}, partial=True)


def test_tag_fields() -> None:
    assert tag_fields({"name": "t", "description": "d" * 1024, "weight": 100}, partial=False) == {
        "name": "t",
        "description": "d" * 1024,
        "weight": 100,
    }
    assert tag_fields([{"name": "t"}], partial=False) == {"name": "t"}
    assert tag_fields({"weight": 0}, partial=True) == {"weight": 0}
    assert tag_fields({}, partial=True) == {}


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (None, "expected a JSON object"),
        ([], "expected a JSON object"),
        ([{"name": "a"}, {"name": "b"}], "expected a JSON object"),
        ("t", "expected a JSON object"),
        ({"name": "t", "colour": 1}, r"unknown tag attribute\(s\): colour"),
        ({}, "missing tag name"),
        ({"weight": 1}, "missing tag name"),
        ({"name": ""}, "tag name must be 1-128"),
        ({"name": "a/b"}, "tag name 'a/b' must not"),
        ({"name": "t", "description": 1}, "description must be a string"),
        ({"name": "t", "description": "d" * 1025}, "description is longer than 1024"),
        ({"name": "t", "description": "\udfff"}, "description is not valid Unicode"),
        ({"name": "t", "weight": 101}, "weight must be an integer 0-100"),
        ({"name": "t", "weight": -1}, "weight must be an integer 0-100"),
        ({"name": "t", "weight": "1"}, "weight must be an integer 0-100"),
        ({"name": "t", "weight": False}, "weight must be an integer 0-100"),
    ],
)
def test_tag_fields_refuses(body: Any, problem: str) -> None:
    with pytest.raises(RequestError, match=problem) as info:
        tag_fields(body, partial=False)
    assert status_of(info) == 400


def test_parse_indicators_accepts_and_normalises() -> None:
    valid, rejected = parse_indicators(
        [
            {"indicator": "http://evil.example/a"},
            {"indicator": "evil.example"},
            {"indicator": "*.evil.example"},
            {"indicator": "198.51.100.1"},
            {"indicator": "10.0.0.0/8"},
            {"indicator": "44D88612FEA8A8F36DE82E1278ABB02F"},
            {"indicator": "*.cdn.example/payload/*"},
            {
                "indicator": "x.example",
                "context": {"s": "v", "n": 5, "f": 1.5, "t": True, "no": False},
                "tags": ["b", "a", "b"],
                "false_positive": False,
            },
            {"indicator": "y.example", "false_positive": True},
        ],
        allow_fp=True,
    )
    assert rejected == []
    assert [(Kind.NAMES[p.indicator.kind], p.indicator.value) for p in valid] == [
        ("url", "evil.example/a"),
        ("domain", "evil.example"),
        ("domain_suffix", "evil.example"),
        ("ip", "198.51.100.1"),
        ("cidr", "4/8/10"),
        ("hash", "44d88612fea8a8f36de82e1278abb02f"),
        ("mask", "*.cdn.example/payload/*"),
        ("domain", "x.example"),
        ("domain", "y.example"),
    ]
    assert [p.index for p in valid] == list(range(9))
    assert valid[7].context == {"s": "v", "n": "5", "f": "1.5", "t": "true", "no": "false"}
    assert valid[7].tags == ("b", "a")  # duplicates dropped, order kept
    assert [p.false_positive for p in valid] == [False] * 8 + [True]


@pytest.mark.parametrize("body", [None, {}, {"indicator": "evil.example"}, "evil.example", [], 5])
def test_parse_indicators_refuses_a_body_that_is_not_a_non_empty_array(body: Any) -> None:
    with pytest.raises(RequestError, match="non-empty JSON array") as info:
        parse_indicators(body, allow_fp=True)
    assert status_of(info) == 400


@pytest.mark.parametrize(
    ("item", "shown", "problem"),
    [
        ("evil.example", "", "expected an object"),
        (["evil.example"], "", "expected an object"),
        (None, "", "expected an object"),
        ({"indicator": "a.example", "extra": 1}, "a.example", r"unknown field\(s\): extra"),
        ({}, "", "indicator must be a non-empty string"),
        ({"indicator": ""}, "", "indicator must be a non-empty string"),
        ({"indicator": "   "}, "   ", "indicator must be a non-empty string"),
        ({"indicator": 5}, "5", "indicator must be a non-empty string"),
        ({"indicator": None}, "None", "indicator must be a non-empty string"),
        ({"indicator": "a" * 8193}, "a" * 200, "indicator is longer than 8192 characters"),
        ({"indicator": "http://a.example/\ud800"}, "http://a.example/\ud800", "indicator is not valid Unicode"),
        ({"indicator": "not an indicator"}, "not an indicator", "not a valid URL, domain, IP address, CIDR or hash"),
        ({"indicator": "10.0.0.0/33"}, "10.0.0.0/33", "not a valid URL"),
        ({"indicator": "a.example", "context": []}, "a.example", "context must be an object"),
        ({"indicator": "a.example", "context": "x"}, "a.example", "context must be an object"),
        (
            {"indicator": "a.example", "context": {f"k{i}": "v" for i in range(65)}},
            "a.example",
            "context must be an object of at most 64 fields",
        ),
        ({"indicator": "a.example", "context": {"indicator": "x"}}, "a.example", "'indicator' is reserved"),
        ({"indicator": "a.example", "context": {"tags": "x"}}, "a.example", "'tags' is reserved"),
        ({"indicator": "a.example", "context": {"supplier": "x"}}, "a.example", "'supplier' is reserved"),
        ({"indicator": "a.example", "context": {"": "x"}}, "a.example", "'' is reserved or invalid"),
        ({"indicator": "a.example", "context": {"k" * 129: "x"}}, "a.example", "is reserved or invalid"),
        ({"indicator": "a.example", "context": {"\udc00": "x"}}, "a.example", "context field name is not valid"),
        ({"indicator": "a.example", "context": {"k": None}}, "a.example", "context field 'k' must be a string"),
        ({"indicator": "a.example", "context": {"k": [1]}}, "a.example", "context field 'k' must be a string"),
        ({"indicator": "a.example", "context": {"k": {"a": 1}}}, "a.example", "context field 'k' must be a string"),
        ({"indicator": "a.example", "context": {"k": "v" * 4097}}, "a.example", "context field 'k' is longer"),
        ({"indicator": "a.example", "context": {"k": "\ud800"}}, "a.example", "context field 'k' is not valid"),
        ({"indicator": "a.example", "tags": "t"}, "a.example", "tags must be an array"),
        ({"indicator": "a.example", "tags": [1]}, "a.example", "tags must be an array"),
        ({"indicator": "a.example", "tags": [f"t{i}" for i in range(65)]}, "a.example", "tags must be an array"),
        ({"indicator": "a.example", "false_positive": "true"}, "a.example", "false_positive must be true or false"),
        ({"indicator": "a.example", "false_positive": 1}, "a.example", "false_positive must be true or false"),
        ({"indicator": "a.example", "false_positive": True}, "a.example", "needs API version 1.2"),
    ],
)
def test_parse_indicators_rejects_items_one_by_one(item: Any, shown: str, problem: str) -> None:
    valid, rejected = parse_indicators([{"indicator": "ok.example"}, item], allow_fp=False)
    assert [p.indicator.raw for p in valid] == ["ok.example"]
    assert len(rejected) == 1
    assert rejected[0].index == 1
    assert rejected[0].indicator == shown
    assert re.search(problem, rejected[0].error), rejected[0]
    assert rejected[0].as_json() == {"index": 1, "indicator": shown, "error": rejected[0].error}


def test_parse_indicators_all_rejected() -> None:
    valid, rejected = parse_indicators([{"indicator": 1}, {"indicator": "nope nope"}], allow_fp=True)
    assert valid == []
    assert [r.index for r in rejected] == [0, 1]


def test_parse_deletions() -> None:
    out = parse_deletions([{"indicator": "HTTP://Evil.example/a"}, {"indicator": "10.0.0.1"}])
    assert [(Kind.NAMES[i.kind], i.value) for i in out] == [("url", "evil.example/a"), ("ip", "10.0.0.1")]
    # a string that is no indicator cannot be stored, so it is simply not found (deleting is idempotent)
    assert parse_deletions([{"indicator": "nope nope"}, {"indicator": ""}, {"indicator": "a" * 9000}]) == []


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (None, "non-empty JSON array"),
        ([], "non-empty JSON array"),
        ({"indicator": "a.example"}, "non-empty JSON array"),
        ([{"indicator": "a.example"}, "b.example"], 'item 1: expected {"indicator": "<string>"}'),
        ([{"indicator": "a.example", "context": {}}], 'item 0: expected {"indicator": "<string>"}'),
        ([{"indicator": "a.example"}, {"indicator": 5}], 'item 1: expected {"indicator": "<string>"}'),
        ([{}], 'item 0: expected {"indicator": "<string>"}'),
        ([{"indicator": None}], 'item 0: expected {"indicator": "<string>"}'),
    ],
)
def test_parse_deletions_refuses(body: Any, problem: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_deletions(body)
    assert problem in str(info.value)
    assert status_of(info) == 400


# -- snapshots: what the matcher sees ---------------------------------------------------------------


def candidates(store: IndicatorStore, kind: str, value: str) -> list[Candidate]:
    out: list[Candidate] = []
    if kind == "url":
        normalised = normalize.normalize_url(value)
        assert normalised is not None
        store.lookup_url(normalised, out)
    elif kind == "domain":
        store.lookup_domain(value, out)
    elif kind == "ip":
        normalised = normalize.normalize_ip(value)
        assert normalised is not None
        store.lookup_ip(normalised, out)
    else:
        store.lookup_hash(value, out)
    return out


def test_supplier_settings() -> None:
    plain = Supplier(7, "Acme", "enabled", 60, 0, "")
    s = supplier_settings(plain)
    assert (s.name, s.category, s.confidence, s.supplier, s.path) == ("Acme", "Acme", 60, "feed", "supplier:Acme")
    marked = supplier_settings(plain, false_positive=True)
    assert (marked.supplier, marked.path) == ("FalsePositive", "supplier:Acme:false_positive")
    assert supplier_settings(Supplier(1, "FalsePositive", "enabled", 100, 0, "")).supplier == "FalsePositive"
    assert supplier_settings(Supplier(2, "InternalTI", "enabled", 100, 0, "")).supplier == "InternalTI"


def stored(snap: FeedSnapshot) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """(raw indicator, context) of each record of an API supplier's snapshot."""
    records = [snap.record(i) for i in range(len(snap))]
    return [(r.raw, r.context) for r in records if r is not None]


def test_supplier_snapshots_are_found_by_an_indicator_store(db: SupplierDB) -> None:
    db.add_supplier({"name": "Acme", "confidence": 60})
    db.add_tag({"name": "apt"})
    db.add_tag({"name": "crime"})
    db.put_indicators(
        "Acme",
        pushes(
            push("http://evil.example/dl", context={"threat": "Dropper", "n": 3}, tags=["apt", "crime"]),
            push("bad.example"),
            push("*.sub.example"),
            push("198.51.100.1"),
            push("10.20.0.0/16"),
            push("44D88612FEA8A8F36DE82E1278ABB02F"),
            push("*.cdn.example/payload/*"),
            push("good.example", fp=True),
        ),
    )
    supplier = db.supplier("Acme")
    snaps = supplier_snapshots(supplier, db.indicator_rows(supplier.id))
    assert [s.settings.supplier for s in snaps] == ["feed", "FalsePositive"]
    main, marked = snaps
    assert stored(main)[:2] == [
        ("http://evil.example/dl", (("threat", "Dropper"), ("n", "3"), ("tags", "apt,crime"), ("supplier", "Acme"))),
        ("bad.example", (("supplier", "Acme"),)),
    ]
    assert stored(marked) == [("good.example", (("supplier", "Acme"),))]

    slot = SUPPLIER_SLOT_BASE + supplier.id * 2
    store = IndicatorStore({slot + i: snap for i, snap in enumerate(snaps)})
    for kind, probe, record_no in [
        ("url", "HTTP://EVIL.example:80/dl", 0),
        ("domain", "bad.example", 1),
        ("domain", "deep.sub.example", 2),
        ("ip", "198.51.100.1", 3),
        ("ip", "10.20.30.40", 4),
        ("hash", "44d88612fea8a8f36de82e1278abb02f", 5),
        ("url", "http://x.cdn.example/payload/a.js", 6),
    ]:
        found = candidates(store, kind, probe)
        assert [(c.slot, c.record_no) for c in found] == [(slot, record_no)], (kind, probe)
    assert [(c.slot, c.record_no) for c in candidates(store, "domain", "good.example")] == [(slot + 1, 0)]
    assert candidates(store, "domain", "other.example") == []
    assert candidates(store, "ip", "10.21.0.1") == []


def test_supplier_snapshots_without_marks_and_with_stale_rows() -> None:
    supplier = Supplier(3, "S", "enabled", 100, 0, "")
    snaps = supplier_snapshots(supplier, [("a.example", "{}", "[]", 0), ("not an indicator!", "{}", "[]", 0)])
    assert len(snaps) == 1  # no false-positive marks: no second snapshot
    assert stored(snaps[0]) == [("a.example", (("supplier", "S"),))]
    assert snaps[0].report.malformed == 1  # a row older rules accepted is skipped, never a crash
    assert len(supplier_snapshots(supplier, [])) == 1


@pytest.fixture(scope="module")
def example_config() -> NodeConfig:
    return load_node_config(str(EXAMPLES / "node.conf"))


def test_supplier_snapshots_detect_and_suppress_through_the_matcher(db: SupplierDB, example_config: NodeConfig) -> None:
    """A supplier's indicator detects with the supplier as category; its false-positive mark suppresses a feed."""
    feeds = IndicatorStore({slot: load_feed(f) for slot, f in enumerate(example_config.feeds.feeds) if f.enabled})
    matcher = Matcher(example_config, feeds)
    hits, suppressed = matcher.lookup_object("http://mixed.example/Login")
    assert [h.snapshot.settings.category for h in hits] == ["Malicious_URL"] and suppressed == 0

    db.add_supplier({"name": "Acme", "confidence": 60})
    db.put_indicators(
        "Acme",
        pushes(push("http://pushed.example/x", context={"threat": "T"}), push("http://mixed.example/Login", fp=True)),
    )
    supplier_store = IndicatorStore(
        {
            SUPPLIER_SLOT_BASE + s.id * 2 + i: snap
            for s in db.suppliers()
            for i, snap in enumerate(supplier_snapshots(s, db.indicator_rows(s.id)))
        }
    )
    matcher.use_suppliers(supplier_store)
    hits, _ = matcher.lookup_object("http://pushed.example/x")
    assert [(h.snapshot.settings.category, h.snapshot.settings.confidence, h.context) for h in hits] == [
        ("Acme", 60, (("threat", "T"), ("supplier", "Acme")))
    ]
    hits, suppressed = matcher.lookup_object("http://mixed.example/Login")
    assert hits == [] and suppressed == 1


# -- the supplier part of cluster settings: export_state, replace_state, check_state ---------------------
#
# A Control exports its suppliers into the settings document; every other node replaces its database
# with that state.  The state must travel whole (suppliers, indicators with their context, tags, false
# positive marks and times) and an invalid one must change nothing.


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[SupplierDB]:
    database = SupplierDB(str(tmp_path / "secondary" / "api.sqlite3"))
    yield database
    database.close()


def put(db: SupplierDB, name: str, *items: dict[str, Any]) -> None:
    pushes, rejected = parse_indicators(list(items), allow_fp=True)
    assert rejected == []
    _, stored, refused = db.put_indicators(name, pushes)
    assert refused == [] and stored == len(items)


def populate(db: SupplierDB) -> None:
    db.add_tag({"name": "apt", "description": "Advanced persistent threat", "weight": 80})
    db.add_tag({"name": "ünïcødé ☃", "description": "", "weight": 0})
    db.add_supplier({"name": "Vendor X", "status": "disabled", "confidence": 70, "retention": 60, "vendor": "ACME ☃"})
    db.add_supplier({"name": "Empty"})
    put(
        db,
        "Vendor X",
        {"indicator": "http://evil.example/path?q=1", "context": {"actor": "Fancy ☃", "n": "3"}, "tags": ["apt"]},
        {"indicator": "198.51.100.7", "tags": ["ünïcødé ☃", "apt"]},
        {"indicator": "d41d8cd98f00b204e9800998ecf8427e"},
        {"indicator": "good.example", "false_positive": True, "context": {"why": "ours"}},
    )
    put(db, "FalsePositive", {"indicator": "10.0.0.0/8"})
    put(db, "InternalTI", {"indicator": "intranet-c2.example", "context": {"case": "IR-42"}})


def supplier(state: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in state["suppliers"] if s["name"] == name)


def test_export_shape(db: SupplierDB) -> None:
    populate(db)
    state = db.export_state()
    assert [s["name"] for s in state["suppliers"]] == sorted(["Empty", "FalsePositive", "InternalTI", "Vendor X"])
    assert state["tags"] == [
        {"name": "apt", "description": "Advanced persistent threat", "weight": 80},
        {"name": "ünïcødé ☃", "description": "", "weight": 0},
    ]
    vendor = supplier(state, "Vendor X")
    assert {k: v for k, v in vendor.items() if k != "indicators"} == {
        "name": "Vendor X",
        "status": "disabled",
        "confidence": 70,
        "retention": 60,
        "vendor": "ACME ☃",
    }
    by_raw = {i["indicator"]: i for i in vendor["indicators"]}
    assert set(by_raw) == {
        "http://evil.example/path?q=1",
        "198.51.100.7",
        "d41d8cd98f00b204e9800998ecf8427e",
        "good.example",
    }
    assert all(isinstance(i["updated"], int) and not isinstance(i["updated"], bool) for i in by_raw.values())
    assert by_raw["http://evil.example/path?q=1"]["context"] == {"actor": "Fancy ☃", "n": "3"}
    assert by_raw["198.51.100.7"]["tags"] == ["ünïcødé ☃", "apt"]
    assert set(by_raw["d41d8cd98f00b204e9800998ecf8427e"]) == {"indicator", "updated"}  # no empty extras
    assert by_raw["good.example"]["false_positive"] is True
    assert "false_positive" not in by_raw["198.51.100.7"]
    assert supplier(state, "Empty")["indicators"] == []
    check_state(state)


def test_round_trip_into_a_fresh_database(db: SupplierDB, fresh: SupplierDB) -> None:
    populate(db)
    state = db.export_state()
    over_the_wire = json.loads(canonical_json(state))
    fresh.replace_state(over_the_wire)
    assert fresh.export_state() == state
    assert canonical_json(fresh.export_state()) == canonical_json(state)
    # the database really holds it, not just the export: the REST views agree
    assert fresh.supplier("Vendor X").details() == db.supplier("Vendor X").details()
    assert fresh.tags() == db.tags()
    assert fresh.indicator_count(fresh.supplier("Vendor X").id) == 4


def test_replace_state_removes_what_the_state_does_not_hold(db: SupplierDB, fresh: SupplierDB) -> None:
    populate(fresh)
    fresh.add_supplier({"name": "Local only"})
    state = db.export_state()  # only the built-ins, no tags
    fresh.replace_state(state)
    assert fresh.export_state() == state
    assert sorted(s.name for s in fresh.suppliers()) == sorted(BUILTIN)
    assert fresh.tags() == []
    with pytest.raises(RequestError) as excinfo:
        fresh.supplier("Local only")
    assert excinfo.value.status == 404


def test_replace_state_keeps_indicator_times(fresh: SupplierDB) -> None:
    state = {
        "suppliers": [
            {"name": "FalsePositive", "indicators": []},
            {"name": "InternalTI", "indicators": [{"indicator": "a.example", "updated": 1_600_000_000}]},
        ],
        "tags": [],
    }
    fresh.replace_state(state)
    (item,) = supplier(fresh.export_state(), "InternalTI")["indicators"]
    assert item == {"indicator": "a.example", "updated": 1_600_000_000}
    # times travel: retention counts from when the Control got the indicator, not from replay
    fresh.update_supplier("InternalTI", {"retention": 1})
    assert fresh.expire(now=1_600_000_000 + 61) == ["InternalTI"]


def test_replace_is_idempotent(db: SupplierDB) -> None:
    populate(db)
    state = db.export_state()
    db.replace_state(state)
    db.replace_state(copy.deepcopy(state))
    assert db.export_state() == state


def without_builtin(name: str) -> Callable[[dict[str, Any]], None]:
    def edit(state: dict[str, Any]) -> None:
        state["suppliers"] = [s for s in state["suppliers"] if s["name"] != name]

    return edit


def set_updated(value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(state: dict[str, Any]) -> None:
        supplier(state, "Vendor X")["indicators"][0]["updated"] = value

    return edit


def drop_updated(state: dict[str, Any]) -> None:
    del supplier(state, "Vendor X")["indicators"][0]["updated"]


def unknown_tag(state: dict[str, Any]) -> None:
    supplier(state, "Vendor X")["indicators"][0]["tags"] = ["apt", "nope"]


def tag_removed(state: dict[str, Any]) -> None:
    state["tags"] = [t for t in state["tags"] if t["name"] != "apt"]


def duplicate_supplier(state: dict[str, Any]) -> None:
    state["suppliers"].append(copy.deepcopy(supplier(state, "Empty")))


def duplicate_tag(state: dict[str, Any]) -> None:
    state["tags"].append(dict(state["tags"][0]))


def bad_indicator(state: dict[str, Any]) -> None:
    supplier(state, "Vendor X")["indicators"][1]["indicator"] = "not an indicator at all"


def unknown_indicator_field(state: dict[str, Any]) -> None:
    supplier(state, "Vendor X")["indicators"][0]["score"] = 5


def bad_supplier_field(state: dict[str, Any]) -> None:
    supplier(state, "Vendor X")["confidence"] = 101


def unknown_supplier_field(state: dict[str, Any]) -> None:
    supplier(state, "Vendor X")["owner"] = "me"


def bad_supplier_name(state: dict[str, Any]) -> None:
    supplier(state, "Empty")["name"] = "a/b"


def indicators_not_array(state: dict[str, Any]) -> None:
    supplier(state, "Empty")["indicators"] = {}


def bad_tag_weight(state: dict[str, Any]) -> None:
    state["tags"][0]["weight"] = 101


def extra_key(state: dict[str, Any]) -> None:
    state["version"] = 2


def suppliers_not_array(state: dict[str, Any]) -> None:
    state["suppliers"] = {}


def supplier_not_object(state: dict[str, Any]) -> None:
    state["suppliers"].append("Vendor Y")


def lone_surrogate_context(state: dict[str, Any]) -> None:
    supplier(state, "Vendor X")["indicators"][0]["context"] = {"k": "\ud800"}


INVALID = [
    pytest.param(unknown_tag, "supplier 'Vendor X': unknown tag(s) nope", id="unknown-tag"),
    pytest.param(tag_removed, "supplier 'Vendor X': unknown tag(s) apt", id="tag-not-in-state"),
    pytest.param(without_builtin("InternalTI"), "built-in supplier(s) InternalTI must be present", id="no-internalti"),
    pytest.param(
        without_builtin("FalsePositive"), "built-in supplier(s) FalsePositive must be present", id="no-falsepositive"
    ),
    pytest.param(duplicate_supplier, "supplier 'Empty' is listed twice", id="duplicate-supplier"),
    pytest.param(duplicate_tag, "a tag is listed twice", id="duplicate-tag"),
    pytest.param(
        bad_indicator, "supplier 'Vendor X' indicator 1 ('not an indicator at all'): not a valid", id="bad-indicator"
    ),
    pytest.param(unknown_indicator_field, "unknown field(s): score", id="unknown-indicator-field"),
    pytest.param(lone_surrogate_context, "lone surrogate", id="lone-surrogate"),
    pytest.param(set_updated("1600000000"), "each indicator needs an integer updated time", id="updated-str"),
    pytest.param(set_updated(1.5), "each indicator needs an integer updated time", id="updated-float"),
    pytest.param(set_updated(None), "each indicator needs an integer updated time", id="updated-null"),
    pytest.param(set_updated(True), "each indicator needs an integer updated time", id="updated-bool"),
    pytest.param(set_updated(-1), "each indicator needs an integer updated time", id="updated-negative"),
    pytest.param(set_updated(10**400), "each indicator needs an integer updated time", id="updated-huge"),
    pytest.param(drop_updated, "each indicator needs an integer updated time", id="updated-missing"),
    pytest.param(bad_supplier_field, "confidence must be an integer 0-100", id="supplier-confidence"),
    pytest.param(unknown_supplier_field, "unknown supplier attribute(s): owner", id="supplier-unknown-attr"),
    pytest.param(bad_supplier_name, "must not be . or .. nor contain '/'", id="supplier-name"),
    pytest.param(indicators_not_array, "supplier 'Empty' indicators must be an array", id="indicators-not-array"),
    pytest.param(bad_tag_weight, "weight must be an integer 0-100", id="tag-weight"),
    pytest.param(extra_key, "supplier state must be an object with suppliers and tags", id="extra-key"),
    pytest.param(suppliers_not_array, "suppliers must be an array", id="suppliers-not-array"),
    pytest.param(supplier_not_object, "each supplier must be an object", id="supplier-not-object"),
]


@pytest.mark.parametrize(("edit", "problem"), INVALID)
def test_invalid_state_changes_nothing(
    db: SupplierDB, fresh: SupplierDB, edit: Callable[[dict[str, Any]], None], problem: str
) -> None:
    populate(db)
    state = db.export_state()
    edit(state)
    populate(fresh)
    fresh.add_supplier({"name": "Local only"})
    before = fresh.export_state()
    with pytest.raises(RequestError) as excinfo:
        fresh.replace_state(state)
    assert problem in str(excinfo.value)
    assert excinfo.value.status == 400
    assert fresh.export_state() == before
    with pytest.raises(RequestError, match="^" + re.escape(str(excinfo.value)) + "$"):
        check_state(state)


@pytest.mark.parametrize("state", [None, [], "x", {"suppliers": []}, {"tags": []}])
def test_state_that_is_not_an_object_with_both_keys(fresh: SupplierDB, state: Any) -> None:
    before = fresh.export_state()
    with pytest.raises(RequestError, match="supplier state must be an object with suppliers and tags"):
        fresh.replace_state(state)
    assert fresh.export_state() == before


def test_check_state_returns_what_replace_state_writes(db: SupplierDB) -> None:
    populate(db)
    suppliers, tags = check_state(db.export_state())
    assert [t["name"] for t in tags] == ["apt", "ünïcødé ☃"]
    by_name = {fields["name"]: (pushes, updated) for fields, pushes, updated in suppliers}
    pushes, updated = by_name["Vendor X"]
    assert len(pushes) == len(updated) == 4
    assert sum(p.false_positive for p in pushes) == 1
