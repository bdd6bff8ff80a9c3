"""What ``threatgate cluster ...`` does: offline init and join, and calls to the local node's cluster port.

Administration is authenticated by possession of the node's cluster key: the CLI runs on the
node's machine, reads the node's config, and calls the node's cluster port with the node's own
certificate; the agent accepts admin actions only from that certificate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import shutil
from typing import Any

import aiohttp

from threatgate.cluster.agent import validate_document
from threatgate.cluster.settings import parse_document
from threatgate.cluster.state import StateDir
from threatgate.cluster.sync import Identity, Member, Role
from threatgate.cluster.transport import PeerClient
from threatgate.config.node import ClusterSettings, NodeConfig
from threatgate.config.xml import read_xml
from threatgate.errors import ClusterError, SettingsRejected
from threatgate.net.describe import body_text, describe


def _cluster(config: NodeConfig) -> ClusterSettings:
    if config.cluster is None:
        raise ClusterError(f"{config.path} has no <Cluster> element: this node is not configured for a cluster", 400)
    return config.cluster


def _address(settings: ClusterSettings, bound_host: str | None = None) -> str:
    host = bound_host or settings.listen.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"[{host}]:{settings.listen.port}" if ":" in host else f"{host}:{settings.listen.port}"


def init(config: NodeConfig, cluster_id: str | None, advertise: str | None) -> Identity:
    """Make this node the Control of a new cluster (offline; the node then starts as Control)."""
    settings = _cluster(config)
    state = StateDir(settings.state_dir, settings.keep_revisions)
    if state.exists():
        raise ClusterError(f"{state.identity_path} exists: this node already belongs to a cluster", 409)
    pair = state.ensure_pair(settings.listen.host)
    address = advertise or _address(settings)
    me = Member(pair.fingerprint_sha256, address, state.cert_pem())
    identity = Identity(
        cluster_id=cluster_id or f"tg-{secrets.token_hex(6)}",
        node_id=me.node_id,
        address=address,
        role=Role.CONTROL,
        epoch=1,
        control_id=me.node_id,
        members={me.node_id: me},
    )
    state.save_identity(identity)
    return identity


def _discard(path: str, fresh: bool) -> None:
    """A join refused by (or before reaching) the Control leaves nothing behind, not even the key pair."""
    if fresh:
        shutil.rmtree(path, ignore_errors=True)


async def join(config: NodeConfig, control: str, token: str, fingerprint: str, advertise: str | None) -> Identity:
    """Join the cluster whose Control is at ``control`` (its certificate must have ``fingerprint``)."""
    settings = _cluster(config)
    state = StateDir(settings.state_dir, settings.keep_revisions)
    if state.exists():
        raise ClusterError(f"{state.identity_path} exists: this node already belongs to a cluster", 409)
    try:
        pin = aiohttp.Fingerprint(bytes.fromhex(fingerprint.replace(":", "").strip()))
    except ValueError as exc:
        raise ClusterError(f"--fingerprint must be the Control's SHA-256 fingerprint (AB:CD:...): {exc}", 400) from None
    fresh = not os.path.lexists(state.path)  # noqa: ASYNC240 - the CLI's own loop; ensure_pair blocks too
    pair = state.ensure_pair(settings.listen.host)
    address = advertise or _address(settings)
    body = {"token": token, "address": address, "cert_pem": state.cert_pem()}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), trust_env=False) as session:
            async with session.post(f"https://{control}/cluster/v1/join", json=body, ssl=pin) as resp:
                status, answer = resp.status, await resp.json(content_type=None)
    except aiohttp.ServerFingerprintMismatch as exc:
        _discard(state.path, fresh)
        raise ClusterError(
            f"{control} presented a certificate with fingerprint {exc.got.hex(':').upper()}, not the one given: "
            "refusing to join (check the address, or ask the Control's administrator for its fingerprint)",
            403,
        ) from None
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:  # kept: it may have been recorded
        why = "its answer is not JSON" if isinstance(exc, ValueError) else describe(exc)
        raise ClusterError(f"cannot reach the Control at {control}: {why}", 503) from None
    if status != 200 or not isinstance(answer, dict):
        detail = body_text(answer)
        _discard(state.path, fresh)
        raise ClusterError(f"the Control refused the join ({status}): {detail}", status if status >= 400 else 502)
    raw = answer["identity"]
    identity = Identity.from_json(raw)
    if identity.node_id != pair.fingerprint_sha256:
        raise ClusterError("the Control recorded another certificate for this node; try again", 502)
    if answer.get("settings") is not None:
        doc = parse_document(answer["settings"])
        try:
            validate_document(read_xml(config.path), doc)
        except SettingsRejected as exc:
            raise ClusterError(f"the cluster's settings do not fit this node: {exc}", 422) from None
        state.save_settings(doc)
    identity.role = Role.SECONDARY
    state.save_identity(identity)
    return identity


class LocalNode:
    """The running node on this machine, reached on its cluster port with its own certificate."""

    def __init__(self, config: NodeConfig) -> None:
        settings = _cluster(config)
        self.state = StateDir(settings.state_dir, settings.keep_revisions)
        self.state.load_identity()  # "not a member yet (cluster init or join)" before any connection attempt
        self.address = _address(settings)
        self.pem = self.state.cert_pem()
        self.timeout = max(settings.request_timeout, 30.0)

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        client = PeerClient(self.state.cert_path, self.state.key_path, self.timeout)
        try:
            status, answer = await client.call(self.address, self.pem, method, path, body)
        except ClusterError as exc:
            raise ClusterError(f"the node's cluster port does not answer ({exc}); is the node running?", 503) from None
        finally:
            await client.aclose()
        if status >= 400:
            raise ClusterError(body_text(answer) if answer is not None else f"HTTP {status}", status)
        return answer

    def run(self, method: str, path: str, body: Any = None) -> Any:
        return asyncio.run(self.call(method, path, body))


def _when(at: float | None) -> str:
    if not at:
        return "-"
    return dt.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def _mark(mark: dict[str, Any] | None) -> str:
    return f"r{mark['revision']} {_when(mark.get('at'))}" if mark else "-"


def status_table(table: dict[str, Any]) -> str:
    """The node table ``threatgate cluster status`` prints (KWTS's columns plus revisions and digest)."""
    me = table["self"]
    rows = [me] + sorted(table["members"], key=lambda r: r["address"])
    digests = {(r.get("applied") or {}).get("sha256") for r in rows if r.get("reachable") and r.get("applied")}
    head = ("", "ADDRESS", "ROLE", "EPOCH", "CONTROL", "SYNCHRONIZED", "APPLIED", "DIGEST", "STATE")
    lines = [head]
    for row in rows:
        applied = row.get("applied") or {}
        digest = applied.get("sha256") or ""
        if row is me:
            state = f"control link: {me.get('control_state')}"
        elif row.get("reachable"):
            state = f"reachable ({row.get('seen_ago')}s ago)"
        else:
            state = "UNREACHABLE" + (f": {row['link_error'][:60]}" if row.get("link_error") else "")
        flags = "*" if row is me else ""
        if len(digests) > 1 and digest:
            flags += "!"
        if row.get("emergency"):
            flags += "E"
        lines.append(
            (
                flags,
                row.get("address", "?"),
                row.get("role") or "?",
                str(row.get("epoch", "?")),
                row.get("control_address") or "-",
                _mark(row.get("received")),
                _mark(row.get("applied")),
                digest[:12] or "-",
                state,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    notes = ["* this node;  ! applied digest differs from another node;  E emergency mode"]
    if me.get("emergency"):
        notes.append(f"EMERGENCY MODE: {me['emergency']} (matching continues; settings are frozen)")
    if me.get("error"):
        notes.append(f"last error: {me['error']}")
    return "\n".join(out + [""] + notes)
