"""The cluster state directory: identity, certificate, the applied settings and their history.

Layout (directory 0700, every file written temp + fsync + rename, 0600 unless public)::

    node.json            role, cluster id, node id, highest epoch seen, Control, members
    cluster.pem/.key     this node's cluster identity (self-signed, serverAuth + clientAuth);
                         the node id is its SHA-256 fingerprint
    settings.json        the applied settings document (what the node matches with)
    revisions/<n>.json   the last KeepRevisions documents, for rollback and promotion

Why files and not SQLite: each is written whole and atomically, an operator can read them with
``jq``, and a torn write can only ever leave the previous complete file.
"""

from __future__ import annotations

import json
import os
import re

from threatgate.cluster.settings import SettingsDocument, parse_document
from threatgate.cluster.sync import Identity
from threatgate.errors import ClusterError, FileWriteError, SettingsRejected
from threatgate.fs import os_reason, write_atomic
from threatgate.net.tls import PairInfo, ensure_server_pair

_REVISION_FILE = re.compile(r"(\d{10})\.json\Z")


class StateDir:
    """One node's cluster state directory."""

    def __init__(self, path: str, keep: int = 20) -> None:
        self.path = path
        self.keep = keep
        self.identity_path = os.path.join(path, "node.json")
        self.cert_path = os.path.join(path, "cluster.pem")
        self.key_path = os.path.join(path, "cluster.key")
        self.settings_path = os.path.join(path, "settings.json")
        self.revisions_path = os.path.join(path, "revisions")

    def exists(self) -> bool:
        return os.path.exists(self.identity_path)

    def ensure_pair(self, host: str) -> PairInfo:
        """This node's cluster certificate, created on first use (the node id is its fingerprint)."""
        hosts = sorted({host, "127.0.0.1", "localhost"} - {"0.0.0.0", "::"})
        return ensure_server_pair(
            self.cert_path, self.key_path, common_name=f"threatgate cluster node {host}", hosts=hosts, client_auth=True
        )

    def cert_pem(self) -> str:
        with open(self.cert_path, encoding="ascii") as fh:
            return fh.read()

    def _write(self, path: str, data: bytes) -> None:
        try:
            write_atomic(path, data, 0o600)
        except FileWriteError as exc:  # write_atomic's error names the file and the reason
            raise ClusterError(f"cluster state: {exc}", 500) from None

    # -- identity -----------------------------------------------------------------------------------

    def load_identity(self) -> Identity:
        """Raises: ClusterError naming the file when it is missing or damaged."""
        try:
            with open(self.identity_path, encoding="utf-8") as fh:
                return Identity.from_json(json.load(fh))
        except FileNotFoundError:
            raise ClusterError(
                f"{self.identity_path} missing: this node is not a cluster member yet "
                "(threatgate cluster init, or threatgate cluster join)",
                500,
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ClusterError(f"{self.identity_path}: unreadable cluster identity: {exc}", 500) from None

    def save_identity(self, identity: Identity) -> None:
        self._write(self.identity_path, json.dumps(identity.as_json(), indent=1).encode() + b"\n")

    # -- settings -----------------------------------------------------------------------------------

    def load_settings(self) -> SettingsDocument | None:
        """The applied document, or None before the first one.

        Raises:
            ClusterError: the file exists but is damaged (the node must not guess its settings).
        """
        try:
            with open(self.settings_path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ClusterError(f"{self.settings_path}: {os_reason(exc)}", 500) from None
        try:
            return parse_document(data)
        except SettingsRejected as exc:
            raise ClusterError(f"{self.settings_path}: damaged settings document: {exc.detail}", 500) from None

    def save_settings(self, doc: SettingsDocument) -> None:
        """Record ``doc`` as applied: history first, then the live file, then prune the history."""
        data = doc.to_bytes()  # write_atomic creates missing directories 0700 (os.makedirs would not)
        self._write(os.path.join(self.revisions_path, f"{doc.revision:010d}.json"), data)
        self._write(self.settings_path, data)
        for old in self.revisions()[: -self.keep]:
            try:
                os.unlink(os.path.join(self.revisions_path, f"{old:010d}.json"))
            except OSError:
                pass

    def revisions(self) -> list[int]:
        """The revisions kept, oldest first."""
        try:
            names = os.listdir(self.revisions_path)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(_REVISION_FILE.match, names) if m)

    def load_revision(self, revision: int) -> SettingsDocument:
        path = os.path.join(self.revisions_path, f"{revision:010d}.json")
        try:
            with open(path, "rb") as fh:
                return parse_document(fh.read())
        except FileNotFoundError:
            kept = self.revisions()
            span = f"{kept[0]}-{kept[-1]}" if kept else "none"
            raise ClusterError(f"revision {revision} is not kept here (kept: {span})", 404) from None
        except SettingsRejected as exc:
            raise ClusterError(f"{path}: damaged: {exc.detail}", 500) from None
