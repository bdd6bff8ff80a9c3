"""Suppliers, their indicators and tags, as pushed through the REST API, persisted in SQLite.

Rules:
1. SQLite is the source of truth.  Every request that changes something is one transaction
   (WAL journal, ``synchronous=FULL``): it is either entirely on disk or not at all, so a failed or
   interrupted request stores nothing and a crash never leaves half a push behind.
2. Matching never reads SQLite.  After a committed change the changed supplier's indicators are
   turned into an in-memory snapshot (:class:`~threatgate.node.feeds.MemorySnapshot`, the same
   snapshot writer as feed files) and the node swaps its supplier
   store (see :class:`~threatgate.node.matcher.Matcher`), so a push detects in event matching as
   soon as the request has been answered.
3. Validation happens before the transaction starts (:func:`parse_indicators`), so a transaction
   never has to be abandoned half-way because of bad input.
4. ``FalsePositive`` and ``InternalTI`` always exist and cannot be deleted or renamed: they have the
   meaning the feed suppliers of the same names have (suppress / always detect).

All methods are blocking; the service calls them through ``asyncio.to_thread``.  One connection is
shared under a lock (SQLite serialises writers anyway).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from threatgate.config.node import FeedSettings
from threatgate.errors import RequestError
from threatgate.node.feeds import FeedSnapshot, Indicator, MemorySnapshot, classify

BUILTIN = ("FalsePositive", "InternalTI")
SUPPLIER_SLOT_BASE = 1 << 20
"""Store slots of API suppliers start here; feed slots are small integers, so they never collide."""
MAX_NAME = 128
NAME_PATTERN = "^[^/\\x00-\\x1f\\x7f-\\x9f]{1,128}$"
"""Supplier and tag names (also in the OpenAPI document): no ``/``, no control characters, not . or ..
(unpaired surrogates never get here: the API refuses bodies holding them);
no look-ahead, which schema-driven test generators do not support."""
NAME_RE = re.compile(NAME_PATTERN)
MAX_CONTEXT_FIELDS = 64
MAX_TEXT = 4096
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS suppliers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL DEFAULT 'enabled',
    confidence INTEGER NOT NULL DEFAULT 100,
    retention INTEGER NOT NULL DEFAULT 0,
    vendor TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS indicators (
    supplier_id INTEGER NOT NULL REFERENCES suppliers(id) ON DELETE CASCADE,
    kind INTEGER NOT NULL,
    value TEXT NOT NULL,
    raw TEXT NOT NULL,
    context TEXT NOT NULL DEFAULT '{}',
    tags TEXT NOT NULL DEFAULT '[]',
    false_positive INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    PRIMARY KEY (supplier_id, kind, value)
);
CREATE TABLE IF NOT EXISTS tags (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL DEFAULT '',
    weight INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Supplier:
    id: int
    name: str
    status: str
    confidence: int
    retention: int
    vendor: str

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status}

    def details(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "confidence": self.confidence,
            "retention": self.retention,
            "vendor": self.vendor,
        }


@dataclass(frozen=True, slots=True)
class IndicatorPush:
    """One validated indicator of a PUT request."""

    indicator: Indicator
    context: dict[str, str]
    tags: tuple[str, ...]
    false_positive: bool
    index: int = 0  # position in the request body, for the rejected list


@dataclass(frozen=True, slots=True)
class Rejected:
    index: int
    indicator: str
    error: str

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "indicator": self.indicator, "error": self.error}


def check_name(name: str, what: str = "supplier") -> str:
    """A supplier or tag name: 1-128 printable characters, no ``/``, not ``.`` or ``..``."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise RequestError(f"{what} name must be 1-{MAX_NAME} characters")
    if name in (".", "..") or not NAME_RE.fullmatch(name):  # fullmatch: "$" alone allows a final "\n"
        raise RequestError(f"{what} name {name[:80]!r} must not be . or .. nor contain '/' or control characters")
    return name


def _unicode(value: str, what: str) -> str:
    """``value`` unless it holds a lone surrogate (JSON ``"\\ud800"``), which SQLite cannot store."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{what} is not valid Unicode (lone surrogate)") from None
    return value


def _text(value: Any, what: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{what} must be a string")
    if len(value) > limit:
        raise RequestError(f"{what} is longer than {limit} characters")
    return _unicode(value, what)


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(f"{what} must be an integer {lo}-{hi}")
    return value


def supplier_fields(body: Any, *, partial: bool) -> dict[str, Any]:
    """Validated supplier attributes from a POST (``partial=False``) or PUT body."""
    if isinstance(body, list) and len(body) == 1:
        body = body[0]  # the documented bodies are arrays of one object
    if not isinstance(body, dict):
        raise RequestError("expected a JSON object with the supplier's attributes")
    unknown = set(body) - {"name", "status", "confidence", "retention", "vendor"}
    if unknown:
        raise RequestError(f"unknown supplier attribute(s): {', '.join(sorted(map(str, unknown)))}")
    out: dict[str, Any] = {}
    if "name" in body:
        out["name"] = check_name(body["name"])
    elif not partial:
        raise RequestError("missing supplier name")
    if "status" in body:
        if body["status"] not in ("enabled", "disabled"):
            raise RequestError("status must be enabled or disabled")
        out["status"] = body["status"]
    if "confidence" in body:
        out["confidence"] = _int(body["confidence"], "confidence", 0, 100)
    if "retention" in body:
        out["retention"] = _int(body["retention"], "retention (minutes)", 0, 10 * 365 * 24 * 60)
    if "vendor" in body:
        out["vendor"] = _text(body["vendor"], "vendor", 256)
    return out


def tag_fields(body: Any, *, partial: bool) -> dict[str, Any]:
    """Validated tag attributes: name, description, weight (0-100)."""
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, dict):
        raise RequestError("expected a JSON object with the tag's attributes")
    unknown = set(body) - {"name", "description", "weight"}
    if unknown:
        raise RequestError(f"unknown tag attribute(s): {', '.join(sorted(map(str, unknown)))}")
    out: dict[str, Any] = {}
    if "name" in body:
        out["name"] = check_name(body["name"], "tag")
    elif not partial:
        raise RequestError("missing tag name")
    if "description" in body:
        out["description"] = _text(body["description"], "description", 1024)
    if "weight" in body:
        out["weight"] = _int(body["weight"], "weight", 0, 100)
    return out


def _indicator(raw: Any) -> Indicator:
    if not isinstance(raw, str) or not raw.strip():
        raise RequestError("indicator must be a non-empty string")
    if len(raw) > 8192:
        raise RequestError("indicator is longer than 8192 characters")
    _unicode(raw, "indicator")
    found = classify(raw, "indicator")
    if found is None:
        raise RequestError("not a valid URL, domain, IP address, CIDR or hash")
    return found


def parse_indicators(body: Any, *, allow_fp: bool) -> tuple[list[IndicatorPush], list[Rejected]]:
    """Validate a PUT indicators body: ``[{"indicator", "context"?, "tags"?, "false_positive"?}]``.

    Items that are wrong are rejected one by one (202 partial success); a body that is not an
    array of objects at all raises :class:`RequestError` (400, nothing stored).
    """
    if not isinstance(body, list) or not body:
        raise RequestError('expected a non-empty JSON array of {"indicator": ...} objects')
    pushes: list[IndicatorPush] = []
    rejected: list[Rejected] = []
    for i, item in enumerate(body):
        shown = str(item.get("indicator", ""))[:200] if isinstance(item, dict) else ""
        try:
            if not isinstance(item, dict):
                raise RequestError("expected an object")
            unknown = set(item) - {"indicator", "context", "tags", "false_positive"}
            if unknown:
                raise RequestError(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
            indicator = _indicator(item.get("indicator"))
            context = item.get("context", {})
            if not isinstance(context, dict) or len(context) > MAX_CONTEXT_FIELDS:
                raise RequestError(f"context must be an object of at most {MAX_CONTEXT_FIELDS} fields")
            ctx: dict[str, str] = {}
            for k, v in context.items():
                if k in ("indicator", "tags", "supplier") or not k or len(k) > 128:
                    raise RequestError(f"context field name {k[:80]!r} is reserved or invalid")
                _unicode(k, "context field name")
                if isinstance(v, bool):
                    v = "true" if v else "false"
                elif isinstance(v, int | float):
                    v = str(v)
                ctx[k] = _text(v, f"context field {k[:80]!r}")
            tags = item.get("tags", [])
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags) or len(tags) > 64:
                raise RequestError("tags must be an array of at most 64 tag names")
            fp = item.get("false_positive", False)
            if not isinstance(fp, bool):
                raise RequestError("false_positive must be true or false")
            if fp and not allow_fp:
                raise RequestError("false_positive marking needs API version 1.2")
            pushes.append(IndicatorPush(indicator, ctx, tuple(dict.fromkeys(tags)), fp, i))
        except RequestError as exc:
            rejected.append(Rejected(i, shown, str(exc)))
    return pushes, rejected


def parse_deletions(body: Any) -> list[Indicator]:
    """A DELETE indicators body: ``[{"indicator": "<string>"}]``, else 400.

    A string that is not a valid indicator cannot be stored, so it is simply not found (not an
    error): deleting is idempotent and the answer counts what was really deleted.
    """
    if not isinstance(body, list) or not body:
        raise RequestError('expected a non-empty JSON array of {"indicator": ...} objects')
    out: list[Indicator] = []
    for i, item in enumerate(body):
        if not isinstance(item, dict) or set(item) != {"indicator"} or not isinstance(item["indicator"], str):
            raise RequestError(f'item {i}: expected {{"indicator": "<string>"}}')
        found = classify(item["indicator"], "indicator") if len(item["indicator"]) <= 8192 else None
        if found is not None:
            out.append(found)
    return out


def check_state(state: Any) -> tuple[list[tuple[dict[str, Any], list[IndicatorPush], list[int]]], list[dict[str, Any]]]:
    """Validate a supplier state (the settings document's ``suppliers`` and ``tags``), all or nothing.

    Each supplier is checked like a REST POST, each indicator like a REST PUT item (plus its
    ``updated`` time), each tag like a tag POST.  Returns ``([(fields, pushes, updated)], tags)``.

    Raises:
        RequestError: naming the first supplier, indicator or tag that is wrong.
    """
    if not isinstance(state, dict) or set(state) != {"suppliers", "tags"}:
        raise RequestError("supplier state must be an object with suppliers and tags")
    tags = [tag_fields(t, partial=False) for t in _array(state["tags"], "tags")]
    tag_names = {t["name"] for t in tags}
    if len(tag_names) != len(tags):
        raise RequestError("a tag is listed twice")
    out: list[tuple[dict[str, Any], list[IndicatorPush], list[int]]] = []
    names: set[str] = set()
    for raw in _array(state["suppliers"], "suppliers"):
        if not isinstance(raw, dict):
            raise RequestError("each supplier must be an object")
        fields = supplier_fields({k: v for k, v in raw.items() if k != "indicators"}, partial=False)
        name = fields["name"]
        if name in names:
            raise RequestError(f"supplier {name[:80]!r} is listed twice")
        names.add(name)
        items = _array(raw.get("indicators", []), f"supplier {name[:80]!r} indicators")
        updated: list[int] = []
        bodies: list[Any] = []
        for item in items:
            stamp = item.get("updated") if isinstance(item, dict) else None
            if not isinstance(stamp, int) or isinstance(stamp, bool) or not 0 <= stamp < 2**53:
                raise RequestError(f"supplier {name[:80]!r}: each indicator needs an integer updated time")
            updated.append(item["updated"])
            bodies.append({k: v for k, v in item.items() if k != "updated"})
        pushes, rejected = parse_indicators(bodies, allow_fp=True) if bodies else ([], [])
        if rejected:
            first = rejected[0]
            raise RequestError(f"supplier {name[:80]!r} indicator {first.index} ({first.indicator!r}): {first.error}")
        for push in pushes:
            missing = [t for t in push.tags if t not in tag_names]
            if missing:
                raise RequestError(f"supplier {name[:80]!r}: unknown tag(s) {', '.join(missing)}")
        out.append((fields, pushes, updated))
    missing_builtin = [b for b in BUILTIN if b not in names]
    if missing_builtin:
        raise RequestError(f"the built-in supplier(s) {', '.join(missing_builtin)} must be present")
    return out, tags


def _array(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise RequestError(f"{what} must be an array")
    return value


class SupplierDB:
    """The SQLite file behind API suppliers.  Every public method is one transaction."""

    def __init__(self, path: str) -> None:
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        fresh = not os.path.exists(path)
        if fresh:  # create it private: indicators pushed by a SOAR tool are not for every local user
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        conn = self._conn
        try:
            self._prepare()
        except BaseException:
            conn.close()
            raise

    def _prepare(self) -> None:
        conn = self._conn
        path = self.path
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(_SCHEMA)
        with self._transaction() as cur:
            row = cur.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                cur.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"{path}: schema {row[0]} is newer than this threatgate ({SCHEMA_VERSION})")
            now = time.time()
            for name in BUILTIN:
                cur.execute(
                    "INSERT OR IGNORE INTO suppliers (name, created, updated) VALUES (?, ?, ?)", (name, now, now)
                )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")

    # -- suppliers ----------------------------------------------------------------------------

    @staticmethod
    def _supplier(row: tuple[Any, ...]) -> Supplier:
        return Supplier(int(row[0]), row[1], row[2], int(row[3]), int(row[4]), row[5])

    def suppliers(self) -> list[Supplier]:
        with self._transaction() as cur:
            rows = cur.execute(
                "SELECT id, name, status, confidence, retention, vendor FROM suppliers ORDER BY id"
            ).fetchall()
        return [self._supplier(r) for r in rows]

    def supplier(self, name: str) -> Supplier:
        with self._transaction() as cur:
            return self._get(cur, name)

    def _get(self, cur: sqlite3.Cursor, name: str) -> Supplier:
        row = cur.execute(
            "SELECT id, name, status, confidence, retention, vendor FROM suppliers WHERE name=?", (name,)
        ).fetchone()
        if row is None:
            raise RequestError(f"supplier {name[:80]!r} does not exist", 404)
        return self._supplier(row)

    def indicator_count(self, supplier_id: int) -> int:
        with self._transaction() as cur:
            return int(cur.execute("SELECT count(*) FROM indicators WHERE supplier_id=?", (supplier_id,)).fetchone()[0])

    def add_supplier(self, fields: dict[str, Any]) -> Supplier:
        now = time.time()
        with self._transaction() as cur:
            if cur.execute("SELECT 1 FROM suppliers WHERE name=?", (fields["name"],)).fetchone():
                raise RequestError(f"supplier {fields['name'][:80]!r} already exists", 409)
            cols = ["name", "status", "confidence", "retention", "vendor"]
            values = [fields.get(c) for c in cols]
            present = [(c, v) for c, v in zip(cols, values, strict=True) if v is not None]
            cur.execute(
                f"INSERT INTO suppliers ({', '.join(c for c, _ in present)}, created, updated) "
                f"VALUES ({', '.join('?' for _ in present)}, ?, ?)",
                [v for _, v in present] + [now, now],
            )
            return self._get(cur, fields["name"])

    def update_supplier(self, name: str, fields: dict[str, Any]) -> Supplier:
        with self._transaction() as cur:
            current = self._get(cur, name)
            new_name = fields.get("name", name)
            if new_name != name:
                if name in BUILTIN:
                    raise RequestError(f"the built-in supplier {name} cannot be renamed", 403)
                if cur.execute("SELECT 1 FROM suppliers WHERE name=?", (new_name,)).fetchone():
                    raise RequestError(f"supplier {new_name[:80]!r} already exists", 409)
            sets = {k: v for k, v in fields.items() if k in ("name", "status", "confidence", "retention", "vendor")}
            if sets:
                cur.execute(
                    f"UPDATE suppliers SET {', '.join(f'{k}=?' for k in sets)}, updated=? WHERE id=?",
                    [*sets.values(), time.time(), current.id],
                )
            return self._get(cur, new_name)

    def delete_supplier(self, name: str) -> Supplier:
        with self._transaction() as cur:
            current = self._get(cur, name)
            if name in BUILTIN:
                raise RequestError(f"the built-in supplier {name} cannot be deleted", 403)
            cur.execute("DELETE FROM indicators WHERE supplier_id=?", (current.id,))
            cur.execute("DELETE FROM suppliers WHERE id=?", (current.id,))
            return current

    # -- indicators ---------------------------------------------------------------------------

    def put_indicators(self, name: str, pushes: list[IndicatorPush]) -> tuple[Supplier, int, list[Rejected]]:
        """Add or replace indicators; those naming an unknown tag are rejected.

        Returns (supplier, how many were stored, the rejected ones).
        """
        now = time.time()
        rejected: list[Rejected] = []
        with self._transaction() as cur:
            supplier = self._get(cur, name)
            known_tags = {r[0] for r in cur.execute("SELECT name FROM tags")}
            rows = []
            for push in pushes:
                missing = [t for t in push.tags if t not in known_tags]
                if missing:
                    rejected.append(
                        Rejected(push.index, push.indicator.raw[:200], f"unknown tag(s): {', '.join(missing)}")
                    )
                    continue
                ind = push.indicator
                rows.append(
                    (
                        supplier.id,
                        ind.kind,
                        ind.value,
                        ind.raw,
                        json.dumps(push.context),
                        json.dumps(list(push.tags)),
                        int(push.false_positive),
                        now,
                    )
                )
            cur.executemany("INSERT OR REPLACE INTO indicators VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return supplier, len(rows), rejected

    def delete_indicators(self, name: str, indicators: list[Indicator]) -> tuple[Supplier, int]:
        with self._transaction() as cur:
            supplier = self._get(cur, name)
            before = self._conn.total_changes
            cur.executemany(
                "DELETE FROM indicators WHERE supplier_id=? AND kind=? AND value=?",
                [(supplier.id, i.kind, i.value) for i in indicators],
            )
            return supplier, self._conn.total_changes - before

    def expire(self, now: float | None = None) -> list[str]:
        """Delete indicators older than their supplier's retention; the names of suppliers that changed."""
        now = time.time() if now is None else now
        changed: list[str] = []
        with self._transaction() as cur:
            for sid, name, retention in cur.execute(
                "SELECT id, name, retention FROM suppliers WHERE retention > 0"
            ).fetchall():
                cur.execute("DELETE FROM indicators WHERE supplier_id=? AND updated < ?", (sid, now - retention * 60))
                if cur.rowcount:
                    changed.append(name)
        return changed

    def indicator_rows(self, supplier_id: int) -> list[tuple[str, str, str, int]]:
        """(raw, context JSON, tags JSON, false_positive) of one supplier, in insertion order."""
        with self._transaction() as cur:
            return cur.execute(
                "SELECT raw, context, tags, false_positive FROM indicators WHERE supplier_id=? ORDER BY rowid",
                (supplier_id,),
            ).fetchall()

    # -- the whole state, for cluster settings -----------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """Every supplier with its indicators, and every tag, in a canonical order (see check_state)."""
        with self._transaction() as cur:
            suppliers = []
            for sid, name, status, confidence, retention, vendor in cur.execute(
                "SELECT id, name, status, confidence, retention, vendor FROM suppliers ORDER BY name"
            ).fetchall():
                indicators = []
                for raw, context, tags, fp, updated in cur.execute(
                    "SELECT raw, context, tags, false_positive, updated FROM indicators WHERE supplier_id=? "
                    "ORDER BY kind, value",
                    (sid,),
                ):
                    item: dict[str, Any] = {"indicator": raw, "updated": int(updated)}
                    ctx = json.loads(context)
                    if ctx:
                        item["context"] = ctx
                    tag_list = json.loads(tags)
                    if tag_list:
                        item["tags"] = tag_list
                    if fp:
                        item["false_positive"] = True
                    indicators.append(item)
                suppliers.append(
                    {
                        "name": name,
                        "status": status,
                        "confidence": confidence,
                        "retention": retention,
                        "vendor": vendor,
                        "indicators": indicators,
                    }
                )
            tags_out = [
                {"name": n, "description": d, "weight": w}
                for n, d, w in cur.execute("SELECT name, description, weight FROM tags ORDER BY name")
            ]
        return {"suppliers": suppliers, "tags": tags_out}

    def replace_state(self, state: Any) -> None:
        """Make the database hold exactly ``state`` (validated first), in one transaction.

        Raises:
            RequestError: the state is invalid; nothing was changed.
        """
        suppliers, tags = check_state(state)
        now = time.time()
        with self._transaction() as cur:
            cur.execute("DELETE FROM indicators")
            cur.execute("DELETE FROM suppliers")
            cur.execute("DELETE FROM tags")
            cur.executemany(
                "INSERT INTO tags VALUES (?, ?, ?, ?)",
                [(t["name"], t.get("description", ""), t.get("weight", 0), now) for t in tags],
            )
            for fields, pushes, updated in suppliers:
                cur.execute(
                    "INSERT INTO suppliers (name, status, confidence, retention, vendor, created, updated) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        fields["name"],
                        fields.get("status", "enabled"),
                        fields.get("confidence", 100),
                        fields.get("retention", 0),
                        fields.get("vendor", ""),
                        now,
                        now,
                    ),
                )
                sid = cur.execute("SELECT id FROM suppliers WHERE name=?", (fields["name"],)).fetchone()[0]
                cur.executemany(
                    "INSERT OR REPLACE INTO indicators VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            sid,
                            p.indicator.kind,
                            p.indicator.value,
                            p.indicator.raw,
                            json.dumps(p.context),
                            json.dumps(list(p.tags)),
                            int(p.false_positive),
                            float(t),
                        )
                        for p, t in zip(pushes, updated, strict=True)
                    ],
                )

    # -- tags ---------------------------------------------------------------------------------

    def tags(self) -> list[dict[str, Any]]:
        with self._transaction() as cur:
            rows = cur.execute("SELECT name, description, weight FROM tags ORDER BY name").fetchall()
        return [{"name": n, "description": d, "weight": w} for n, d, w in rows]

    def tag(self, name: str) -> dict[str, Any]:
        with self._transaction() as cur:
            return self._tag(cur, name)

    @staticmethod
    def _tag(cur: sqlite3.Cursor, name: str) -> dict[str, Any]:
        row = cur.execute("SELECT name, description, weight FROM tags WHERE name=?", (name,)).fetchone()
        if row is None:
            raise RequestError(f"tag {name[:80]!r} does not exist", 404)
        return {"name": row[0], "description": row[1], "weight": row[2]}

    def add_tag(self, fields: dict[str, Any]) -> dict[str, Any]:
        with self._transaction() as cur:
            if cur.execute("SELECT 1 FROM tags WHERE name=?", (fields["name"],)).fetchone():
                raise RequestError(f"tag {fields['name'][:80]!r} already exists", 409)
            cur.execute(
                "INSERT INTO tags VALUES (?, ?, ?, ?)",
                (fields["name"], fields.get("description", ""), fields.get("weight", 0), time.time()),
            )
            return self._tag(cur, fields["name"])

    def put_tag(self, name: str, fields: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create or update tag ``name`` (renaming is not supported); returns (tag, created)."""
        if fields.get("name", name) != name:
            raise RequestError("a tag cannot be renamed; create the new one and delete the old")
        with self._transaction() as cur:
            exists = cur.execute("SELECT 1 FROM tags WHERE name=?", (name,)).fetchone() is not None
            if not exists:
                cur.execute(
                    "INSERT INTO tags VALUES (?, ?, ?, ?)",
                    (name, fields.get("description", ""), fields.get("weight", 0), time.time()),
                )
            else:
                sets = {k: v for k, v in fields.items() if k in ("description", "weight")}
                if sets:
                    cur.execute(
                        f"UPDATE tags SET {', '.join(f'{k}=?' for k in sets)} WHERE name=?", [*sets.values(), name]
                    )
            return self._tag(cur, name), not exists

    def delete_tag(self, name: str) -> list[str]:
        """Delete a tag and remove it from every indicator; the suppliers whose indicators changed."""
        with self._transaction() as cur:
            self._tag(cur, name)
            cur.execute("DELETE FROM tags WHERE name=?", (name,))
            changed: set[str] = set()
            rows = cur.execute(
                "SELECT i.rowid, i.tags, s.name FROM indicators i JOIN suppliers s ON s.id = i.supplier_id "
                "WHERE instr(i.tags, ?) > 0",
                (json.dumps(name),),
            ).fetchall()
            for rowid, tags_json, supplier in rows:
                tags = [t for t in json.loads(tags_json) if t != name]
                cur.execute("UPDATE indicators SET tags=? WHERE rowid=?", (json.dumps(tags), rowid))
                changed.add(supplier)
            return sorted(changed)


def supplier_settings(supplier: Supplier, false_positive: bool = False) -> FeedSettings:
    """The feed settings an API supplier's snapshot detects with (category = supplier name)."""
    kind = "FalsePositive" if false_positive or supplier.name == "FalsePositive" else None
    kind = kind or ("InternalTI" if supplier.name == "InternalTI" else "feed")
    return FeedSettings(
        path=f"supplier:{supplier.name}" + (":false_positive" if false_positive else ""),
        name=supplier.name,
        category=supplier.name,
        confidence=supplier.confidence,
        format="json",
        supplier=kind,  # type: ignore[arg-type]
    )


def supplier_snapshots(
    supplier: Supplier, rows: Iterable[tuple[str, str, str, int]], shared: bool = False
) -> list[FeedSnapshot]:
    """One snapshot of the supplier's indicators, plus one of those it marked false positive (if any).

    ``shared``: each over a sealed memfd that worker processes map (``MemorySnapshot.finish``).
    """
    main = MemorySnapshot(supplier_settings(supplier))
    marked = MemorySnapshot(supplier_settings(supplier, false_positive=True))
    for raw, context_json, tags_json, fp in rows:
        indicator = classify(raw, "indicator")
        if indicator is None:  # stored by an older version with other rules: skip, never crash
            main.report.bad(raw[:80], "no longer a valid indicator")
            continue
        record: dict[str, Any] = {"indicator": raw, **json.loads(context_json)}
        tags = json.loads(tags_json)
        if tags:
            record["tags"] = ",".join(tags)
        record["supplier"] = supplier.name
        (marked if fp else main).add_record(record, indicator)
    return [s.finish(shared) for s in (main, marked) if len(s) or s is main]
