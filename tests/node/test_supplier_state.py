"""Tests for SupplierDB.export_state / replace_state and check_state: the supplier part of cluster settings.

A Control exports its suppliers into the settings document; every other node replaces its database
with that state.  The state must travel whole (suppliers, indicators with their context, tags, false
positive marks and times) and an invalid one must change nothing.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from threatgate.cluster.settings import canonical_json
from threatgate.errors import RequestError
from threatgate.node.suppliers import BUILTIN, SupplierDB, check_state, parse_indicators


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SupplierDB]:
    database = SupplierDB(str(tmp_path / "control" / "api.sqlite3"))
    yield database
    database.close()


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
