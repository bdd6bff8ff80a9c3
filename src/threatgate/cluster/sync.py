"""What one node of a cluster decides: roles, epochs, emergency mode, which settings to take (sans-IO).

The model is KWTS's Control/Secondary cluster (docs/cluster.md) made safe with the conventions of
etcd, Pacemaker and Kubernetes:

- Every node heartbeats its :meth:`ClusterCore.status` to every member and gets the member's in
  return; :meth:`ClusterCore.observe` digests what it hears.  So every node knows every peer's role,
  epoch and revisions, and the node table is the same wherever ``cluster status`` is asked.
- The Control epoch is a fencing token.  Promotion bumps it; a node never takes settings from an
  epoch older than the highest it has seen, and a Control that hears of a higher epoch steps down
  before it pushes anything (:attr:`Decision.step_down`).
- Emergency mode is *detected*, never guessed around: no reachable Control, or two Controls at the
  same epoch.  Matching goes on with the last applied settings; settings writes are refused until
  an administrator promotes or demotes (:meth:`ClusterCore.check_write`).

Nothing here does I/O or reads a clock; ``now`` is monotonic seconds, ``wall`` is epoch seconds.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from threatgate.cluster.settings import SettingsDocument
from threatgate.errors import ClusterError, SettingsRejected, StaleRevision


def _num(value: Any) -> int:
    """An integer field of a peer's status; junk counts as 0 (a member's bug must not stop heartbeats)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class Role(enum.Enum):
    CONTROL = "control"
    SECONDARY = "secondary"


@dataclass(frozen=True, slots=True)
class Member:
    """A node of the cluster as the Control records it: id (certificate fingerprint), address, certificate."""

    node_id: str
    address: str
    cert_pem: str

    def as_json(self) -> dict[str, str]:
        return {"node_id": self.node_id, "address": self.address, "cert_pem": self.cert_pem}


@dataclass(slots=True)
class Identity:
    """What a node persists about its place in the cluster (``node.json`` in the state directory)."""

    cluster_id: str
    node_id: str
    address: str
    role: Role
    epoch: int
    control_id: str | None
    members: dict[str, Member]
    members_version: int = 1

    def as_json(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "node_id": self.node_id,
            "address": self.address,
            "role": self.role.value,
            "epoch": self.epoch,
            "control_id": self.control_id,
            "members_version": self.members_version,
            "members": [m.as_json() for m in sorted(self.members.values(), key=lambda m: m.node_id)],
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Identity:
        members = {m["node_id"]: Member(m["node_id"], m["address"], m["cert_pem"]) for m in raw["members"]}
        return cls(
            cluster_id=str(raw["cluster_id"]),
            node_id=str(raw["node_id"]),
            address=str(raw["address"]),
            role=Role(raw["role"]),
            epoch=int(raw["epoch"]),
            control_id=raw.get("control_id"),
            members=members,
            members_version=int(raw.get("members_version", 1)),
        )


@dataclass(slots=True)
class Mark:
    """A revision and when it happened (wall time), for "synchronized" and "applied"."""

    revision: int
    at: float
    sha256: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "at": self.at, "sha256": self.sha256}


@dataclass(slots=True)
class PeerView:
    """What this node last heard from one peer, and how talking to it went."""

    node_id: str
    address: str
    status: dict[str, Any] | None = None
    last_ok: float | None = None  # monotonic
    failures: int = 0
    last_error: str | None = None

    def reachable(self, now: float, window: float) -> bool:
        return self.last_ok is not None and now - self.last_ok <= window


@dataclass(slots=True)
class Decision:
    """What the I/O layer must do after :meth:`ClusterCore.observe` or :meth:`ClusterCore.offer`."""

    step_down: bool = False  # we were Control and a higher epoch exists: persist, never push again
    persist: bool = False  # identity changed (epoch, Control, members)
    pull_from: str | None = None  # a peer holds newer settings than we applied: fetch from it
    push_to: str | None = None  # (Control) the peer applied less than we did: push to it
    new_members: list[Member] = field(default_factory=list)


class ClusterCore:
    """The decisions of one node.  The agent (``cluster/agent.py``) feeds it and carries them out."""

    def __init__(
        self, identity: Identity, applied: SettingsDocument | None, *, heartbeat: float, fall: int, now: float
    ) -> None:
        self.identity = identity
        self.applied = applied
        self.received: Mark | None = None
        self.applied_mark: Mark | None = None
        if applied is not None:
            self.received = Mark(applied.revision, applied.updated_at, applied.sha256)
            self.applied_mark = Mark(applied.revision, applied.updated_at, applied.sha256)
        self.last_error: str | None = None
        self.refused_revision = 0  # the last revision received but refused: not pulled again
        self.refused_sha256 = ""  # ... that very document: another one of that number is still taken
        self.window = heartbeat * fall
        self.started = now
        self.api_address: str | None = None  # host:port of this node's REST API, sent in every heartbeat
        self.peers: dict[str, PeerView] = {}
        self._sync_members()

    # -- membership ----------------------------------------------------------------------------

    def _sync_members(self) -> None:
        me = self.identity.node_id
        for node_id, member in self.identity.members.items():
            if node_id != me:
                view = self.peers.setdefault(node_id, PeerView(node_id, member.address))
                view.address = member.address
        for node_id in list(self.peers):
            if node_id not in self.identity.members:
                del self.peers[node_id]

    def add_member(self, member: Member) -> None:
        """(Control) a node joined: it is a member from now on; the version tells secondaries."""
        self._require_control("add a member")
        self.identity.members[member.node_id] = member
        self.identity.members_version += 1
        self._sync_members()

    def remove_member(self, node_id: str) -> Member:
        """(Control) forget a node; a Control node (this one) cannot be removed before it is demoted."""
        self._require_control("remove a member")
        if node_id == self.identity.node_id:
            raise ClusterError(
                "this node is the Control node: demote it (threatgate cluster demote) before removing it"
            )
        member = self.identity.members.get(node_id)
        if member is None:
            raise ClusterError(f"no member {node_id[:23]}…", 404)
        view = self.peers.get(node_id)
        if view is not None and view.status is not None and view.status.get("role") == Role.CONTROL.value:
            raise ClusterError(f"{member.address} reports the Control role: demote it before removing it")
        del self.identity.members[node_id]
        self.identity.members_version += 1
        self._sync_members()
        return member

    # -- status ---------------------------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self.identity.role

    @property
    def control_address(self) -> str | None:
        cid = self.identity.control_id
        if cid is None:
            return None
        member = self.identity.members.get(cid)
        return member.address if member is not None else None

    @property
    def control_api(self) -> str | None:
        """The REST API address (host:port) the Control reported in its heartbeats, None before it has."""
        cid = self.identity.control_id
        if cid == self.identity.node_id:
            return self.api_address if self.identity.role is Role.CONTROL else None
        view = self.peers.get(cid) if cid is not None else None
        api = (view.status or {}).get("api_address") if view is not None else None
        return api if isinstance(api, str) and api else None

    def status(self, now: float) -> dict[str, Any]:
        """This node's own row, as sent in every heartbeat."""
        ident = self.identity
        out: dict[str, Any] = {
            "cluster_id": ident.cluster_id,
            "node_id": ident.node_id,
            "address": ident.address,
            "role": ident.role.value,
            "epoch": ident.epoch,
            "control_id": ident.control_id,
            "control_address": self.control_address,
            "api_address": self.api_address,
            "received": self.received.as_json() if self.received else None,
            "applied": self.applied_mark.as_json() if self.applied_mark else None,
            "error": self.last_error,
            "emergency": self.emergency(now),
            "members_version": ident.members_version,
        }
        if ident.role is Role.CONTROL:
            out["members"] = [m.as_json() for m in ident.members.values()]
        return out

    def controls(self, now: float) -> list[tuple[int, str]]:
        """(epoch, node id) of every node that currently claims Control, this one included."""
        found: list[tuple[int, str]] = []
        if self.identity.role is Role.CONTROL:
            found.append((self.identity.epoch, self.identity.node_id))
        for view in self.peers.values():
            st = view.status
            if st is not None and view.reachable(now, self.window) and st.get("role") == Role.CONTROL.value:
                found.append((_num(st.get("epoch")), view.node_id))
        return found

    def emergency(self, now: float) -> str | None:
        """Why this node is in emergency mode, or None.  Matching goes on either way."""
        controls = self.controls(now)
        top = max((e for e, _ in controls), default=0)
        leaders = sorted(n for e, n in controls if e == top)
        if len(leaders) >= 2:
            names = ", ".join(self._address(n) for n in leaders)
            return f"two Control nodes at epoch {top}: {names}; demote one (threatgate cluster demote)"
        if self.identity.role is Role.CONTROL:
            return None
        if not leaders:
            cid = self.identity.control_id
            if cid is None:
                return "no Control node known; promote one (threatgate cluster promote)"
            view = self.peers.get(cid)
            if view is None or not view.reachable(now, self.window):
                if now - self.started <= self.window and (view is None or view.failures == 0):
                    return None  # just started: give the Control one window to answer
                return (
                    f"Control node {self._address(cid)} unreachable; promote a secondary (threatgate cluster promote)"
                )
            # it answers but no longer claims the role (demoted): there is no Control at all
            return (
                f"Control node {self._address(cid)} is no longer the Control; promote one (threatgate cluster promote)"
            )
        return None

    def _address(self, node_id: str) -> str:
        member = self.identity.members.get(node_id)
        return member.address if member is not None else node_id[:23]

    # -- hearing from peers ----------------------------------------------------------------------

    def observe(self, peer_id: str, status: dict[str, Any], now: float) -> Decision:
        """A peer's status arrived (heartbeat request or reply)."""
        decision = Decision()
        view = self.peers.get(peer_id)
        if view is None:
            return decision  # not a member (the transport refuses those); nothing to learn
        view.status = status
        view.last_ok = now
        view.failures = 0
        view.last_error = None
        ident = self.identity
        epoch = _num(status.get("epoch"))
        role = status.get("role")
        peer_control = peer_id if role == Role.CONTROL.value else status.get("control_id")
        if epoch > ident.epoch:
            if ident.role is Role.CONTROL:
                ident.role = Role.SECONDARY
                decision.step_down = True
            ident.epoch = epoch
            ident.control_id = peer_control if isinstance(peer_control, str) else None
            decision.persist = True
        elif epoch == ident.epoch and role == Role.CONTROL.value and ident.role is Role.SECONDARY:
            if ident.control_id != peer_id and self._follows_nobody(now):
                ident.control_id = peer_id
                decision.persist = True
        if role == Role.CONTROL.value and epoch == ident.epoch and peer_id == ident.control_id:
            members = status.get("members")
            version = _num(status.get("members_version"))
            if isinstance(members, list) and version > ident.members_version:
                self._adopt_members(members, version, decision)
        applied = status.get("applied") or {}
        received = status.get("received") or {}
        peer_rev = _num(applied.get("revision")) if isinstance(applied, dict) else 0
        peer_received = _num(received.get("revision")) if isinstance(received, dict) else 0
        peer_sha = applied.get("sha256") if isinstance(applied, dict) else None
        received_sha = received.get("sha256") if isinstance(received, dict) else None
        mine = self.applied.revision if self.applied is not None else 0
        mine_sha = self.applied.sha256 if self.applied is not None else None
        following = ident.role is Role.SECONDARY and peer_id == ident.control_id and epoch == ident.epoch
        refused = (self.refused_revision, self.refused_sha256)
        if following and peer_rev > mine and (peer_rev, peer_sha) != refused:
            decision.pull_from = peer_id  # a document we refused is not fetched again until a newer one exists
        if ident.role is Role.CONTROL and epoch <= ident.epoch and role != Role.CONTROL.value:
            if peer_rev < mine and (peer_received, received_sha) != (mine, mine_sha):
                decision.push_to = peer_id  # never re-push the very document the peer received and refused
        return decision

    def _follows_nobody(self, now: float) -> bool:
        cid = self.identity.control_id
        view = self.peers.get(cid) if cid is not None else None
        return view is None or not view.reachable(now, self.window) or (view.status or {}).get("role") != "control"

    def _adopt_members(self, members: list[Any], version: int, decision: Decision) -> None:
        new: dict[str, Member] = {}
        for raw in members:
            if not isinstance(raw, dict):
                return
            try:
                member = Member(str(raw["node_id"]), str(raw["address"]), str(raw["cert_pem"]))
            except KeyError:
                return
            new[member.node_id] = member
        if self.identity.node_id not in new:
            self.last_error = "the Control node no longer lists this node as a member (removed from the cluster)"
            return
        decision.new_members = [m for k, m in new.items() if k not in self.identity.members]
        self.identity.members = new
        self.identity.members_version = version
        self._sync_members()
        decision.persist = True

    def failed(self, peer_id: str, error: str) -> None:
        view = self.peers.get(peer_id)
        if view is not None:
            view.failures += 1
            view.last_error = error

    # -- settings -------------------------------------------------------------------------------

    def offer(self, doc: SettingsDocument, sender_id: str | None, sender_role: str | None) -> bool:
        """May ``doc`` (from ``sender_id``) be applied?  True: go on; False: we already hold it or newer.

        Raises:
            SettingsRejected: wrong cluster, or an epoch older than one we have seen (409).
        """
        ident = self.identity
        if doc.cluster_id != ident.cluster_id:
            raise SettingsRejected(
                doc.revision, f"cluster {doc.cluster_id!r} is not this node's {ident.cluster_id!r}", 409
            )
        if doc.epoch < ident.epoch:
            raise SettingsRejected(
                doc.revision, f"epoch {doc.epoch} is older than {ident.epoch}: the sender is no longer the Control", 409
            )
        if self.applied is not None and doc.version <= self.applied.version:
            return False
        if ident.role is Role.CONTROL and doc.epoch == ident.epoch and sender_id != ident.node_id:
            raise SettingsRejected(doc.revision, f"this node is the Control of epoch {ident.epoch}", 409)
        return True

    def took(self, doc: SettingsDocument, sender_id: str | None, sender_role: str | None, wall: float) -> Decision:
        """``doc`` passed :meth:`offer` and its digest: record it as received (before validation)."""
        decision = Decision()
        ident = self.identity
        self.received = Mark(doc.revision, wall, doc.sha256)
        if doc.epoch > ident.epoch:
            if ident.role is Role.CONTROL:
                ident.role = Role.SECONDARY
                decision.step_down = True
            ident.epoch = doc.epoch
            decision.persist = True
        if sender_role == Role.CONTROL.value and sender_id is not None and ident.role is Role.SECONDARY:
            if ident.control_id != sender_id:
                ident.control_id = sender_id
                decision.persist = True
        return decision

    def applied_ok(self, doc: SettingsDocument, wall: float) -> None:
        self.applied = doc
        self.applied_mark = Mark(doc.revision, wall, doc.sha256)
        self.last_error = None

    def apply_failed(self, doc: SettingsDocument, error: str) -> None:
        self.last_error = f"revision {doc.revision} not applied: {error}"
        self.refused_revision = doc.revision
        self.refused_sha256 = doc.sha256

    # -- writes and role changes ---------------------------------------------------------------------

    def _require_control(self, what: str) -> None:
        if self.identity.role is not Role.CONTROL:
            where, api = self.control_address, self.control_api
            if api:
                hint = f": send it to the Control node's REST API at https://{api} (cluster port {where})"
            elif where:
                hint = f" (the Control node's cluster port is {where}; its REST API address is not known yet)"
            else:
                hint = ""
            raise ClusterError(f"cannot {what}: this node is a Secondary; settings change only on the Control{hint}")

    def check_write(self, base: int | None, now: float) -> SettingsDocument:
        """May settings change now, starting from ``base`` (None: from whatever is current)?

        Returns the current document the change starts from.

        Raises:
            ClusterError: not the Control, or emergency mode (409).
            StaleRevision: ``base`` is not the current revision (409).
        """
        self._require_control("change settings")
        reason = self.emergency(now)
        if reason is not None:
            raise ClusterError(f"emergency mode, settings are frozen: {reason}")
        current = self.applied
        if current is None:
            raise ClusterError("this Control node holds no settings yet", 503)
        if base is not None and base != current.revision:
            raise StaleRevision(base, current.revision)
        return current

    def newest_of(self, candidates: Iterable[SettingsDocument | None]) -> SettingsDocument | None:
        """What a new Control publishes from: the newest (by version) of what this node applied and
        ``candidates`` (the members' documents on a promotion, etcd's on an election); None when none."""
        base = self.applied
        for doc in candidates:
            if doc is not None and (base is None or doc.version > base.version):
                base = doc
        return base

    def next_document(self, base: SettingsDocument, epoch: int, wall: float) -> SettingsDocument:
        """``base``'s payload as the next revision (above any this node applied), at ``epoch``."""
        revision = max(base.revision, self.applied.revision if self.applied else 0)
        return SettingsDocument.create(base.cluster_id, revision + 1, epoch, wall, base.payload)

    def etcd_control(self, node_id: str | None, epoch: int) -> Decision:
        """etcd says who holds the Control key: follow a newer epoch (stepping down if it was us);
        ignore nobody (an election under way), ourselves and older or equal epochs."""
        ident = self.identity
        if node_id is None or node_id == ident.node_id or epoch <= ident.epoch:
            return Decision()
        step_down = ident.role is Role.CONTROL
        if step_down:
            self.demote()
        ident.epoch, ident.control_id = epoch, node_id
        return Decision(step_down=step_down, persist=True)

    def check_elected(self, epoch: int) -> None:
        """Won the etcd election at ``epoch``: refuse an epoch this node has already seen from another.

        Raises:
            ClusterError: ``epoch`` is not newer than the one this node follows.
        """
        ident = self.identity
        if epoch <= ident.epoch and ident.control_id != ident.node_id:
            raise ClusterError(f"elected at epoch {epoch}, but epoch {ident.epoch} was already seen")

    def elected(self, epoch: int) -> None:
        """The election's settings are published at ``epoch``: only now is this node the Control."""
        ident = self.identity
        ident.role, ident.epoch, ident.control_id = Role.CONTROL, epoch, ident.node_id

    def promote(self, newest: SettingsDocument | None) -> int:
        """Become the Control: the new epoch is one above every epoch this node has heard of."""
        if self.identity.role is Role.CONTROL:
            raise ClusterError("this node is already the Control node")
        seen = [self.identity.epoch] + [_num((v.status or {}).get("epoch")) for v in self.peers.values()]
        if newest is not None:
            seen.append(newest.epoch)
        self.identity.epoch = max(seen) + 1
        self.identity.role = Role.CONTROL
        self.identity.control_id = self.identity.node_id
        return self.identity.epoch

    def demote(self) -> None:
        if self.identity.role is not Role.CONTROL:
            raise ClusterError("this node is not the Control node")
        self.identity.role = Role.SECONDARY
        self.identity.control_id = None
