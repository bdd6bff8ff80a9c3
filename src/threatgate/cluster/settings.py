"""The settings document: everything every node of a cluster must hold identically (sans-IO).

A document is ``{cluster_id, revision, epoch, updated_at, sha256, payload}``.  The payload holds
the *shared* part of a node's configuration and its API suppliers:

- ``config``: a ``<Settings>`` XML text with the shared elements of kl_feed_service.conf —
  ``<RegExps>`` (rules), the format elements of ``<OutputSettings>``, ``<Feeds>``, ``<IoCExports>``
  and ``<Users>`` (API users, password hashes only).  XML, so operators edit what they already know
  and the node validates it with the very code that reads its config file;
- ``suppliers`` and ``tags``: the API suppliers (FalsePositive and InternalTI included) with their
  indicators, in the REST API's own JSON shape (see :func:`threatgate.node.suppliers.export_state`).

Rules:
1. ``sha256`` is the SHA-256 of the canonical JSON of the payload (sorted keys, no whitespace,
   UTF-8).  It identifies the *content*: two nodes with the same digest match identically, whatever
   revision numbers brought them there.  Revision and epoch are carried beside it and protected by
   the mutually authenticated channel.
2. Local elements (listen addresses, certificate paths, database, ScannersCount, metrics, cluster
   settings) never travel: :func:`merge_settings` overlays the shared elements on each node's own
   tree, so relative feed paths resolve against each node's own config directory.
3. Nothing here does I/O or reads the clock; callers pass ``now``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from threatgate.config.xml import Node, parse_xml
from threatgate.errors import SettingsRejected

FORMAT_VERSION = 1
MAX_DOCUMENT_BYTES = 256 * 1024 * 1024
"""A settings document larger than this is refused (suppliers with millions of indicators belong in feeds)."""

OUTPUT_FORMATS = (
    "EventFormat",
    "RecordFieldContextFormat",
    "ActionableFieldContextFormat",
    "FinishedEventFormat",
    "AlertFormat",
)
"""The ``<OutputSettings>`` children that are settings; the connection strings stay local."""

SHARED_ELEMENTS = ("RegExps", "OutputSettings", "Feeds", "IoCExports", "Users")
"""The children of ``<Settings>``, in the order they are written."""

_DIGEST = re.compile(r"[0-9a-f]{64}\Z")
_CLUSTER_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")


def canonical_json(value: Any) -> bytes:
    """The one byte form a JSON value digests to: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def payload_digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(payload)).hexdigest()


@dataclass(frozen=True, slots=True)
class SettingsDocument:
    """One revision of the cluster's settings."""

    cluster_id: str
    revision: int
    epoch: int
    updated_at: float
    payload: dict[str, Any]
    sha256: str

    @classmethod
    def create(
        cls, cluster_id: str, revision: int, epoch: int, updated_at: float, payload: dict[str, Any]
    ) -> SettingsDocument:
        return cls(cluster_id, revision, epoch, round(updated_at, 3), payload, payload_digest(payload))

    @property
    def version(self) -> tuple[int, int]:
        """What orders documents: a higher Control epoch wins, then the higher revision (fencing)."""
        return (self.epoch, self.revision)

    def successor(self, epoch: int, updated_at: float, payload: dict[str, Any] | None = None) -> SettingsDocument:
        """The next revision: same cluster, ``payload`` (default: unchanged) stamped with ``epoch``."""
        return SettingsDocument.create(
            self.cluster_id, self.revision + 1, epoch, updated_at, self.payload if payload is None else payload
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "revision": self.revision,
            "epoch": self.epoch,
            "updated_at": self.updated_at,
            "sha256": self.sha256,
            "payload": self.payload,
        }

    def to_bytes(self) -> bytes:
        return canonical_json(self.as_json())

    def short(self) -> str:
        return f"revision {self.revision} (epoch {self.epoch}, sha256 {self.sha256[:12]})"

    @property
    def config_xml(self) -> str:
        return str(self.payload["config"])


def parse_document(data: bytes | str | dict[str, Any]) -> SettingsDocument:
    """Check a received document's shape and digest (not yet its content: see :func:`merge_settings`).

    Raises:
        SettingsRejected: what is wrong, with the revision when it could be read (else -1).
    """
    if isinstance(data, bytes | str):
        if len(data) > MAX_DOCUMENT_BYTES:
            raise SettingsRejected(-1, f"document is {len(data)} bytes, more than {MAX_DOCUMENT_BYTES}", 413)
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SettingsRejected(-1, f"not JSON: {exc}") from None
    else:
        raw = data
    if not isinstance(raw, dict):
        raise SettingsRejected(-1, "expected a JSON object")
    revision = raw.get("revision")
    rev = revision if isinstance(revision, int) and not isinstance(revision, bool) else -1
    expected = {"cluster_id", "revision", "epoch", "updated_at", "sha256", "payload"}
    if set(raw) != expected:
        raise SettingsRejected(rev, f"fields must be exactly {', '.join(sorted(expected))}")
    if rev < 1:
        raise SettingsRejected(rev, "revision must be a positive integer")
    epoch = raw["epoch"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise SettingsRejected(rev, "epoch must be a positive integer")
    cluster_id = raw["cluster_id"]
    if not isinstance(cluster_id, str) or not _CLUSTER_ID.match(cluster_id):
        raise SettingsRejected(rev, "cluster_id must be 1-64 of A-Z a-z 0-9 _ . -")
    updated_at = raw["updated_at"]
    # NaN/Infinity would pass here and break to_bytes(); a huge int would make float() overflow.
    if not isinstance(updated_at, int | float) or isinstance(updated_at, bool) or not -1e15 < updated_at < 1e15:
        raise SettingsRejected(rev, "updated_at must be a finite number")
    digest = raw["sha256"]
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise SettingsRejected(rev, "sha256 must be 64 lowercase hex digits")
    payload = raw["payload"]
    if not isinstance(payload, dict):
        raise SettingsRejected(rev, "payload must be an object")
    try:
        actual = payload_digest(payload)
    except (ValueError, UnicodeEncodeError) as exc:
        raise SettingsRejected(rev, f"payload cannot be digested: {exc}") from None
    if actual != digest:
        raise SettingsRejected(rev, f"digest mismatch: document says {digest[:16]}…, payload is {actual[:16]}…")
    _check_payload(rev, payload)
    return SettingsDocument(cluster_id, rev, epoch, float(updated_at), payload, digest)


def _check_payload(rev: int, payload: dict[str, Any]) -> None:
    if payload.get("format") != FORMAT_VERSION:
        raise SettingsRejected(rev, f"payload format must be {FORMAT_VERSION}")
    if set(payload) != {"format", "config", "suppliers", "tags"}:
        raise SettingsRejected(rev, "payload fields must be exactly config, format, suppliers, tags")
    if not isinstance(payload["config"], str):
        raise SettingsRejected(rev, "payload config must be the <Settings> XML text")
    if not isinstance(payload["suppliers"], list) or not isinstance(payload["tags"], list):
        raise SettingsRejected(rev, "payload suppliers and tags must be arrays")


def make_payload(config_xml: str, state: dict[str, Any]) -> dict[str, Any]:
    """A payload from a ``<Settings>`` text and a supplier state (``{"suppliers": [...], "tags": [...]}``)."""
    return {"format": FORMAT_VERSION, "config": config_xml, "suppliers": state["suppliers"], "tags": state["tags"]}


# -- XML: extract, merge, edit ---------------------------------------------------------------------


def to_xml(node: Node, indent: str = "") -> str:
    """Serialise a :class:`Node` tree back to XML (attributes in their original order)."""
    attrs = "".join(f" {k}={quoteattr(v)}" for k, v in node.attrs.items())
    if not node.children:
        if not node.text:
            return f"{indent}<{node.tag}{attrs}/>"
        # "\r" as a reference: a literal one would come back as "\n" (XML end-of-line normalisation).
        return f"{indent}<{node.tag}{attrs}>{escape(node.text, {chr(13): '&#13;'})}</{node.tag}>"
    inner = "\n".join(to_xml(child, indent + "  ") for child in node.children)
    return f"{indent}<{node.tag}{attrs}>\n{inner}\n{indent}</{node.tag}>"


def extract_settings(root: Node, *, complete: bool = True) -> str:
    """The ``<Settings>`` XML text holding the shared elements of a node config tree.

    ``complete``: a config without ``<Users>`` gives an empty ``<Users/>`` (a cluster's first
    revision: no users means none).  False leaves it out, so that :func:`import_settings` keeps the
    cluster's users when the imported file has none.
    """
    if root.tag != "Configuration":
        raise root.error("root element must be <Configuration> to import settings from a node config")
    settings = Node("Settings", {}, 0, root.path)
    inputs = root.find("InputSettings")
    regexps = inputs.find("RegExps") if inputs is not None else None
    if regexps is not None:
        settings.children.append(regexps)
    output = root.find("OutputSettings")
    if output is not None:
        formats = [c for c in output.children if c.tag in OUTPUT_FORMATS]
        settings.children.append(Node("OutputSettings", {}, output.line, root.path, children=formats))
    for tag in ("Feeds", "IoCExports"):
        child = root.find(tag)
        if child is not None:
            settings.children.append(child)
    http = root.find("HTTPServer")
    users = http.find("Users") if http is not None else None
    if users is not None or complete:
        settings.children.append(users if users is not None else Node("Users", {}, 0, root.path))
    return to_xml(settings) + "\n"


def parse_settings_xml(text: str, where: str) -> Node:
    """Parse a ``<Settings>`` text; ``where`` becomes every element's path (errors say ``where:line``)."""
    root = parse_xml(text.encode(), where)
    if root.tag != "Settings":
        raise root.error("root element must be <Settings>")
    seen: set[str] = set()
    for child in root.children:
        if child.tag not in SHARED_ELEMENTS:
            raise child.error(f"not a shared setting; expected one of {', '.join(SHARED_ELEMENTS)}")
        if child.tag in seen:
            raise child.error(f"<{child.tag}> may appear only once")
        seen.add(child.tag)
    output = root.find("OutputSettings")
    for child in output.children if output is not None else ():
        if child.tag not in OUTPUT_FORMATS:
            raise child.error(f"only the formats are shared in <OutputSettings>: {', '.join(OUTPUT_FORMATS)}")
    return root


def merge_settings(local: Node, settings_xml: str, label: str) -> Node:
    """The local config tree with the shared elements replaced by those of ``settings_xml``.

    ``label`` names the settings in errors (``node.conf#settings-r12``): it sits in the local file's
    directory so relative feed paths keep resolving against each node's own config directory.

    Raises:
        ConfigError: the settings XML is malformed or not a ``<Settings>`` document.
    """
    shared = parse_settings_xml(settings_xml, label)
    merged = copy.deepcopy(local)
    by_tag = {child.tag: child for child in shared.children}

    def replace(parent: Node, tag: str, new: Node | None) -> None:
        kept = [c for c in parent.children if c.tag != tag]
        parent.children[:] = kept + ([new] if new is not None else [])

    inputs = merged.find("InputSettings")
    if inputs is not None and "RegExps" in by_tag:
        replace(inputs, "RegExps", by_tag["RegExps"])
    output = merged.find("OutputSettings")
    if output is not None and "OutputSettings" in by_tag:
        output.children[:] = [c for c in output.children if c.tag not in OUTPUT_FORMATS]
        output.children.extend(by_tag["OutputSettings"].children)
    for tag in ("Feeds", "IoCExports"):
        replace(merged, tag, by_tag.get(tag))
    http = merged.find("HTTPServer")
    if http is not None:
        replace(http, "Users", by_tag.get("Users"))
    return merged


_PART = re.compile(r"(?:[^/\[]+|\[[^\]]*\]?)+")
_SEGMENT = re.compile(r"(?P<tag>[A-Za-z_][\w.-]*)(?:\[@(?P<attr>[\w.-]+)=(?P<q>['\"]?)(?P<value>[^\]]*?)(?P=q)\])?\Z")


_CREATED_BY_PATH = {("Settings", "Users", None), ("Users", "User", "name")}
"""(parent, element, predicate attribute) that :func:`set_value` creates when missing, wherever it sits in the path."""


def set_value(settings_xml: str, path: str, value: str) -> str:
    """Set one element's text or attribute in a ``<Settings>`` text; the new text.

    ``path`` is relative to ``<Settings>``: ``OutputSettings/EventFormat``,
    ``Feeds/@update_frequency``, ``Feeds/Feed[@filename=feeds/x.json]/@enabled``.  A missing last
    element without a predicate is created, and so is an API user named by
    ``Users/User[@name=NAME]`` (with ``<Users>`` if needed); anything else missing is an error, so a
    mistyped feed file name is refused rather than added as a new feed.

    Raises:
        ConfigError: the path does not parse or does not lead anywhere.
    """
    root = parse_settings_xml(settings_xml, "settings")
    parts = _PART.findall(path)  # not str.split("/"): a predicate value may hold "/" (feeds/x.json)
    attr: str | None = None
    if parts and parts[-1].startswith("@"):
        attr = parts.pop()[1:]
        if not re.fullmatch(r"[A-Za-z_][\w.-]*", attr):
            raise root.error(f"bad attribute name {attr!r} in path {path!r}")
    if not parts:
        raise root.error(f"path {path!r} names no element under <Settings>")
    node = root
    for i, part in enumerate(parts):
        m = _SEGMENT.match(part)
        if m is None:
            raise root.error(f"bad path segment {part!r}: expected Tag or Tag[@attr=value]")
        tag, key, want = m.group("tag"), m.group("attr"), m.group("value")
        found = [c for c in node.children if c.tag == tag and (key is None or c.attrs.get(key) == want)]
        if len(found) > 1:
            raise node.error(f"path segment {part!r} matches {len(found)} elements; add [@attr=value]")
        if not found:
            if (node.tag, tag, key) not in _CREATED_BY_PATH and (key is not None or i != len(parts) - 1):
                raise node.error(f"no element matches {part!r}")
            found = [Node(tag, {} if key is None else {key: want}, 0, node.path)]
            node.children.append(found[0])
        node = found[0]
    if attr is not None:
        node.attrs[attr] = value
    else:
        if node.children:
            raise node.error("has child elements; set an attribute or a child instead")
        node.text = value
    return to_xml(root) + "\n"


# -- API users -----------------------------------------------------------------------------------------


def user_names(settings_xml: str) -> list[str]:
    """The API user names in a ``<Settings>`` text, in document order."""
    users = parse_settings_xml(settings_xml, "settings").find("Users")
    return [u.attrs.get("name", "") for u in users.findall("User")] if users is not None else []


def put_user(settings_xml: str, name: str, password_hash: str) -> tuple[str, bool]:
    """The ``<Settings>`` text with user ``name`` added or its hash replaced; True if it existed.

    The same edit as ``set_value(…, "Users/User[@name=NAME]/@password_hash", hash)``; the merged
    config's validation then checks the name and the hash like a node config's.
    """
    existed = name in user_names(settings_xml)
    return set_value(settings_xml, f"Users/User[@name={name}]/@password_hash", password_hash), existed


def remove_user(settings_xml: str, name: str) -> str:
    """The ``<Settings>`` text without user ``name``.

    Raises:
        ConfigError: there is no such user (removing nothing is a mistake worth saying).
    """
    root = parse_settings_xml(settings_xml, "settings")
    users = root.find("Users")
    found = [u for u in users.findall("User") if u.attrs.get("name") == name] if users is not None else []
    if users is None or not found:
        raise root.error(f"no API user {name!r} in the cluster settings")
    users.children[:] = [u for u in users.children if u not in found]
    return to_xml(root) + "\n"


# -- import ----------------------------------------------------------------------------------------------


def import_settings(current_xml: str, incoming_xml: str, where: str) -> str:
    """The settings after an import: each shared element ``incoming_xml`` holds replaces the current one
    whole, and every element it does not hold stays as it is.

    ``where`` names the imported file in errors.  So a ``<Settings>`` file holding only ``<Feeds>``
    changes the feeds alone, and a node config without ``<Users>`` keeps the cluster's users.

    Raises:
        ConfigError: ``incoming_xml`` is not a ``<Settings>`` document.
    """
    current = parse_settings_xml(current_xml, "settings")
    incoming = parse_settings_xml(incoming_xml, where)
    by_tag = {c.tag: c for c in current.children} | {c.tag: c for c in incoming.children}
    merged = Node("Settings", {}, 0, where, children=[by_tag[tag] for tag in SHARED_ELEMENTS if tag in by_tag])
    return to_xml(merged) + "\n"


def _canonical(node: Node, indent: str = "") -> list[str]:
    """Lines of ``node`` for a diff: attributes sorted, whitespace-only text left out.

    Neither changes what a node does with the settings, so neither should show as a change.
    """
    attrs = "".join(f" {k}={quoteattr(v)}" for k, v in sorted(node.attrs.items()))
    if node.children:
        inner = [line for child in node.children for line in _canonical(child, indent + "  ")]
        return [f"{indent}<{node.tag}{attrs}>", *inner, f"{indent}</{node.tag}>"]
    if node.text.strip():
        return [f"{indent}<{node.tag}{attrs}>{escape(node.text, {chr(13): '&#13;'})}</{node.tag}>"]
    return [f"{indent}<{node.tag}{attrs}/>"]


def settings_diff(old_xml: str, new_xml: str, old_label: str, new_label: str) -> list[str]:
    """A unified diff (lines without endings) from one ``<Settings>`` text to another; empty when they
    hold the same settings.  Lines starting with ``-`` are what the change replaces or removes."""
    old = "\n".join(_canonical(parse_settings_xml(old_xml, old_label))).splitlines()
    new = "\n".join(_canonical(parse_settings_xml(new_xml, new_label))).splitlines()
    return list(difflib.unified_diff(old, new, old_label, new_label, lineterm=""))


def removed_lines(diff: list[str]) -> int:
    """How many lines of the old settings a :func:`settings_diff` replaces or removes."""
    return sum(1 for line in diff[2:] if line.startswith("-"))  # [2:]: past the ---/+++ header
