"""MISP feed directories as feeds: ``manifest.json`` plus one ``<uuid>.json`` file per event.

Rules:
1. The manifest names the events (its keys); the event files are read from the same directory.  A
   key that is not a plain UUID-like name (letters, digits, ``-``, ``_``) is never used as a path,
   so a hostile manifest cannot make the loader read ``../anything``; it is counted malformed.
2. Only attributes with ``to_ids`` true are loaded: that is MISP's own flag for "use for detection"
   (the rest is context such as a sample's file name or a related but benign address).  Attributes
   with ``to_ids`` false, deleted ones and types we cannot look up are *skipped* (``LoadReport.skip``);
   values their type rejects and unreadable event files are *malformed* (``LoadReport.bad``), and the
   other events still load.
3. Attributes inside MISP objects (``Object[].Attribute[]``) are loaded like event attributes, with
   the object's name as extra context.
4. Each indicator becomes one record: the indicator under the field name
   :func:`~threatgate.node.feeds.classify` expects, then ``event_uuid``, ``event_info``, ``category``,
   ``type``, ``object``, ``filename``, ``comment``, ``tags``, ``threat_level_id``, ``org`` (those
   that are present).
5. No manifest, a manifest that is not a JSON object, or any file larger than
   :data:`MAX_EVENT_FILE_SIZE` raises :class:`FeedError`: the caller keeps the previous version.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Any

from threatgate.config.node import FeedSettings
from threatgate.errors import FeedError
from threatgate.fs import os_reason
from threatgate.node.feedsnapshot import MemorySnapshot
from threatgate.node.records import classify, context_text, feed_identity, parse_document, read_document

log = logging.getLogger("threatgate.node")

MAX_EVENT_FILE_SIZE = 256 * 1024 * 1024
"""Largest manifest or event file: each is parsed into Python objects several times its size."""

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")

_SIMPLE = {
    "url": "url",
    "domain": "domain",
    "hostname": "domain",
    "ip-src": "ip",
    "ip-dst": "ip",
    "md5": "md5",
    "sha1": "sha1",
    "sha256": "sha256",
}
_HASH_LENGTH = {"md5": 32, "sha1": 40, "sha256": 64}
SUPPORTED_TYPES = frozenset(
    [*_SIMPLE, "ip-src|port", "ip-dst|port", "domain|ip", "filename|md5", "filename|sha1", "filename|sha256"]
)
"""MISP attribute types that are loaded; any other type is skipped."""

_TRUE = frozenset({"1", "true", "yes"})


def _split(atype: str, value: str) -> tuple[list[tuple[str, str]], str] | str:
    """The (record field, raw value) pairs an attribute yields and its file name, or why it cannot."""
    field = _SIMPLE.get(atype)
    if field is not None:
        return [(field, value)], ""
    if atype in ("ip-src|port", "ip-dst|port"):
        address, bar, _port = value.rpartition("|")
        return ([("ip", address)], "") if bar else "expected <address>|<port>"
    if atype == "domain|ip":
        domain, bar, address = value.partition("|")
        return ([("domain", domain), ("ip", address)], "") if bar else "expected <domain>|<address>"
    filename, bar, digest = value.rpartition("|")
    if not bar:
        return "expected <filename>|<hash>"
    return [(atype.partition("|")[2], digest)], filename


def _flag(value: object) -> bool:
    """MISP writes flags (``to_ids``, ``deleted``) as booleans; older exports use "1"/"0" or 1/0."""
    if isinstance(value, bool):
        return value
    return isinstance(value, int | str) and str(value).strip().lower() in _TRUE


def _text(value: object) -> str | None:
    text = context_text(value)
    return text if text else None


def _event_context(uuid: str, event: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fields that go before the attribute's own, fields that go after them) of an event."""
    before: dict[str, Any] = {"event_uuid": _text(event.get("uuid")) or uuid}
    info = _text(event.get("info"))
    if info:
        before["event_info"] = info
    after: dict[str, Any] = {}
    tags = event.get("Tag")
    if isinstance(tags, list):
        names = [n for n in (_text(t.get("name")) for t in tags if isinstance(t, dict)) if n]
        if names:
            after["tags"] = ",".join(names)
    level = _text(event.get("threat_level_id"))
    if level:
        after["threat_level_id"] = level
    org = event.get("Orgc")
    org_name = _text(org.get("name")) if isinstance(org, dict) else None
    if org_name:
        after["org"] = org_name
    return before, after


class _EventLoader:
    """Loads the attributes of one event into the snapshot."""

    def __init__(self, snapshot: MemorySnapshot, uuid: str, event: dict[str, Any]) -> None:
        self.snapshot = snapshot
        self.report = snapshot.report
        self.uuid = uuid
        self.before, self.after = _event_context(uuid, event)

    def attributes(self, attributes: object, where: str, object_name: str | None) -> None:
        if attributes is None:
            return
        if not isinstance(attributes, list):
            self.report.bad(where, "Attribute is not a list")
            return
        for n, attribute in enumerate(attributes):
            self.attribute(attribute, f"{where} attribute {n}", object_name)

    def attribute(self, attribute: object, where: str, object_name: str | None) -> None:
        report = self.report
        if not isinstance(attribute, dict):
            report.bad(where, f"expected an object, got {type(attribute).__name__}")
            return
        if _flag(attribute.get("deleted")):
            report.skip(where, "deleted")
            return
        atype = attribute.get("type")
        value = attribute.get("value")
        if not isinstance(atype, str) or not isinstance(value, str):
            report.bad(where, "type and value must be strings")
            return
        if not _flag(attribute.get("to_ids")):
            report.skip(where, f"{atype[:40]}: to_ids is false")
            return
        if atype not in SUPPORTED_TYPES:
            report.skip(where, f"attribute type {atype[:40]!r} is not looked up")
            return
        split = _split(atype, value)
        if isinstance(split, str):
            report.bad(where, f"{atype} {value[:80]!r}: {split}")
            return
        pairs, filename = split
        context: dict[str, Any] = dict(self.before)
        for key, name in (("category", "category"), ("type", "type")):
            text = _text(attribute.get(key))
            if text:
                context[name] = text
        if object_name:
            context["object"] = object_name
        filename_text = _text(filename)
        if filename_text:
            context["filename"] = filename_text
        comment = _text(attribute.get("comment"))
        if comment:
            context["comment"] = comment
        context.update(self.after)
        for field, raw in pairs:
            expected = _HASH_LENGTH.get(field)
            indicator = None if expected and len(raw.strip()) != expected else classify(raw, field)
            if indicator is None:
                report.bad(where, f"{atype} {raw[:80]!r} is not a valid {field}")
                continue
            record: dict[str, Any] = {field: raw}
            record.update(context)
            self.snapshot.add_record(record, indicator)

    def objects(self, objects: object, where: str) -> None:
        if objects is None:
            return
        if not isinstance(objects, list):
            self.report.bad(where, "Object is not a list")
            return
        for n, obj in enumerate(objects):
            here = f"{where} object {n}"
            if not isinstance(obj, dict):
                self.report.bad(here, f"expected an object, got {type(obj).__name__}")
                continue
            self.attributes(obj.get("Attribute"), here, _text(obj.get("name")) or "object")


def _load_event(snapshot: MemorySnapshot, directory: str, uuid: str, digest: Any) -> None:
    report = snapshot.report
    where = f"event {uuid}"
    path = os.path.join(directory, uuid + ".json")
    try:
        data, _st = read_document(path, MAX_EVENT_FILE_SIZE)
    except OSError as exc:
        report.bad(where, f"cannot read {uuid}.json: {os_reason(exc)}")
        return
    digest.update(f"\0{uuid}\0{len(data)}\0".encode())
    digest.update(data)
    try:
        doc = parse_document(uuid + ".json", data)
    except FeedError as exc:
        report.bad(where, str(exc))
        return
    del data
    event = doc.get("Event") if isinstance(doc, dict) else None
    if not isinstance(event, dict):
        report.bad(where, 'expected {"Event": {...}}')
        return
    loader = _EventLoader(snapshot, uuid, event)
    loader.attributes(event.get("Attribute"), where, None)
    loader.objects(event.get("Object"), where)


def load_misp(settings: FeedSettings) -> MemorySnapshot:
    """Load every event the MISP feed directory ``settings.path`` lists in its manifest.

    Raises:
        FeedError: no readable manifest, a manifest that is not a JSON object, or a file over
            :data:`MAX_EVENT_FILE_SIZE` (keep the previous version).
    """
    snapshot = MemorySnapshot(settings)
    # Taken before reading: if the feed changes during the load, the next reload sees a new identity.
    snapshot.identity = feed_identity(settings)
    manifest_path = os.path.join(settings.path, "manifest.json")
    try:
        data, _st = read_document(manifest_path, MAX_EVENT_FILE_SIZE)
    except OSError as exc:
        raise FeedError(f"{manifest_path}: cannot read: {os_reason(exc)}") from None
    digest = hashlib.sha256(data)  # of every file read, so an unchanged feed maps its snapshot
    manifest = parse_document(manifest_path, data)
    del data
    if not isinstance(manifest, dict):
        raise FeedError(f"{manifest_path}: a MISP manifest must be a JSON object keyed by event UUID")
    report = snapshot.report
    for key in manifest:
        if not _SAFE_NAME.match(key):
            report.bad(f"manifest key {key[:80]!r}", "not a UUID-like event name; no file is read for it")
            continue
        _load_event(snapshot, settings.path, key, digest)
    snapshot.digest = digest.digest()
    report.log_skipped(log, settings.name, "MISP attribute(s)")
    return snapshot


def misp_digest(settings: FeedSettings) -> bytes:
    """The sha256 :func:`load_misp` computes over the files it reads (manifest, then each event file it
    names), without parsing the events: how the node finds the snapshot of an unchanged MISP feed.

    Raises:
        FeedError: the manifest cannot be read or is not a JSON object, or a file is over the limit.
    """
    manifest_path = os.path.join(settings.path, "manifest.json")
    try:
        data, _st = read_document(manifest_path, MAX_EVENT_FILE_SIZE)
    except OSError as exc:
        raise FeedError(f"{manifest_path}: cannot read: {os_reason(exc)}") from None
    digest = hashlib.sha256(data)
    manifest = parse_document(manifest_path, data)
    if not isinstance(manifest, dict):
        raise FeedError(f"{manifest_path}: a MISP manifest must be a JSON object keyed by event UUID")
    for uuid in manifest:
        if not _SAFE_NAME.match(uuid):
            continue
        try:
            event, _st = read_document(os.path.join(settings.path, uuid + ".json"), MAX_EVENT_FILE_SIZE)
        except OSError:
            continue
        digest.update(f"\0{uuid}\0{len(event)}\0".encode())
        digest.update(event)
    return digest.digest()
