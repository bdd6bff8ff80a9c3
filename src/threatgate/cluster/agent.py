"""The cluster agent inside a node: cluster port, heartbeats, push and pull, role changes, joins.

The decisions are :class:`~threatgate.cluster.sync.ClusterCore`'s; this module carries them out
with sockets, files and the node.  One agent per node, on its own mutually authenticated port
(``<Cluster><ConnectionString>``), never on the event or API ports, so the balancer and API clients
never see the control plane.

Routes are data (cluster/routes.py ``ROUTES``: method, path, who may call, what body); JSON bodies,
and every answer carries this node's status so the caller learns from it.  A join request is the one
route a non-member may call; the admin routes only this node's own certificate (the local CLI).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from aiohttp import web
from aiohttp.web_request import BaseRequest
from cryptography import x509

from threatgate import runtime
from threatgate.cluster.routes import route_for
from threatgate.cluster.settings import (
    SettingsDocument,
    import_settings,
    make_payload,
    merge_settings,
    parse_document,
    put_user,
    remove_user,
    removed_lines,
    set_value,
    settings_diff,
    user_names,
)
from threatgate.cluster.state import StateDir
from threatgate.cluster.sync import ClusterCore, Decision, Identity, Member, Role
from threatgate.cluster.tokens import JoinTokens
from threatgate.cluster.transport import PeerClient, cluster_server_context, request_fingerprint
from threatgate.config.common import Address, parse_address
from threatgate.config.node import ClusterSettings, NodeConfig, node_config_from_xml
from threatgate.config.security import Network
from threatgate.config.xml import Node, read_xml
from threatgate.errors import ClusterError, ConfigError, RequestError, SettingsRejected
from threatgate.log import RateLimitedLog
from threatgate.net.describe import body_text
from threatgate.net.gate import Gate, Gates
from threatgate.net.http import HTTPServer
from threatgate.net.sources import SourceList
from threatgate.net.tls import fingerprint_sha256
from threatgate.node.suppliers import SupplierDB, check_state
from threatgate.stats import Gauges, NodeStats

if TYPE_CHECKING:
    from threatgate.cluster.etcd_backend import EtcdBackend

log = logging.getLogger("threatgate.cluster")

ALERT_EMERGENCY = "KL_ALERT_ClusterEmergencyState"
ALERT_INCONSISTENT = "KL_ALERT_ClusterConsistencyError"
ALERT_SYNC = "KL_ALERT_SettingsSynchronizationError"


def settings_label(config_path: str, revision: int) -> str:
    """What errors in a settings document are attributed to (relative paths resolve beside the config)."""
    return f"{config_path}#settings-r{revision}"


def validate_document(local: Node, doc: SettingsDocument) -> NodeConfig:
    """The node config ``doc`` makes of the local tree, or SettingsRejected saying what is wrong."""
    try:
        config = node_config_from_xml(merge_settings(local, doc.config_xml, settings_label(local.path, doc.revision)))
    except ConfigError as exc:
        raise SettingsRejected(doc.revision, f"invalid settings: {exc}") from None
    try:
        check_state({"suppliers": doc.payload["suppliers"], "tags": doc.payload["tags"]})
    except RequestError as exc:
        raise SettingsRejected(doc.revision, f"invalid suppliers: {exc}") from None
    return config


def prepare(config: NodeConfig) -> tuple[NodeConfig, StateDir, Identity, SettingsDocument | None]:
    """Load this node's cluster state and the config its applied settings make (before the node starts).

    Raises:
        ClusterError: not a member yet, or the state is damaged.
    """
    settings = config.cluster
    assert settings is not None
    state = StateDir(settings.state_dir, settings.keep_revisions)
    identity = state.load_identity()
    doc = state.load_settings()
    if doc is None:
        return config, state, identity, None
    try:
        merged = validate_document(read_xml(config.path), doc)
    except SettingsRejected as exc:
        raise ClusterError(f"{state.settings_path}: the applied settings no longer fit this node: {exc}", 500) from None
    return merged, state, identity, doc


def _json(status: int, body: Any) -> web.Response:
    return web.json_response(body, status=status)


T = TypeVar("T")


class AlertRaiser(Protocol):
    """The node's service alerts (``KL_ALERT_Cluster*``)."""

    def raise_alert(self, name: str, **context: object) -> None: ...


def _sources(networks: tuple[Network, ...] | None) -> SourceList | None:
    return SourceList(networks) if networks is not None else None


class ClusterNode(Protocol):
    """What :class:`ClusterAgent` reads and calls of its node (``NodeService`` is one).

    Read through at every use: applying settings replaces the node's config.
    """

    @property
    def config(self) -> NodeConfig: ...
    @property
    def stats(self) -> NodeStats: ...
    @property
    def http(self) -> HTTPServer | None: ...
    @property
    def alerts(self) -> AlertRaiser: ...
    @property
    def gates(self) -> Gates: ...
    async def db_call(self, fn: Callable[[SupplierDB], T]) -> T: ...
    async def apply_cluster_settings(self, new: NodeConfig, state: dict[str, Any] | None) -> None: ...


class ClusterAgent:
    """The control plane of one node."""

    def __init__(
        self,
        node: ClusterNode,
        settings: ClusterSettings,
        state: StateDir,
        identity: Identity,
        doc: SettingsDocument | None,
    ) -> None:
        self.node = node
        self.settings = settings
        self.state = state
        self.core = ClusterCore(identity, doc, heartbeat=settings.heartbeat, fall=settings.fall, now=time.monotonic())
        self.peers = PeerClient(state.cert_path, state.key_path, settings.request_timeout)
        self.local = read_xml(node.config.path)
        self.server: HTTPServer | None = None
        self._ssl = cluster_server_context(state.cert_path, state.key_path, self._member_pems())
        self._trusted = set(identity.members)
        self._apply_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._tokens = JoinTokens()  # one-time join tokens (cluster/tokens.py), on the monotonic clock
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._emergency: str | None = None
        self._inconsistent = False
        self._pulling = False
        self.warn = RateLimitedLog(log)
        self.bound_port = 0
        self.backend: EtcdBackend | None = None

    @property
    def identity(self) -> Identity:
        return self.core.identity

    def _member_pems(self) -> list[str]:
        return [m.cert_pem for m in self.core.identity.members.values()]

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Make the supplier database hold the applied settings, open the cluster port, start heartbeats."""
        doc = self.core.applied
        if doc is None and self.identity.role is Role.CONTROL:
            doc = await self._first_revision()
        if doc is not None:
            state = {"suppliers": doc.payload["suppliers"], "tags": doc.payload["tags"]}
            if await self.node.db_call(lambda db: db.export_state()) != state:
                await self.node.db_call(lambda db: db.replace_state(state))
                log.info("supplier database restored from settings %s", doc.short())
        self.server = HTTPServer(
            self.handle,
            address=self.settings.listen,
            # Handshakes refused here are routine while membership changes (a member not yet trusted by
            # every other one retries); the cluster reports unreachable peers itself: counted, logged at dbg.
            gate=self.node.gates.add(
                Gate(
                    "cluster",
                    stats=self.node.stats,
                    log=log,
                    sources=_sources(self.node.config.allowed_sources.networks("cluster")),
                    tls=self._ssl,
                    handshake_timeout=10.0,
                    failure_level=logging.DEBUG,
                )
            ),
            header_timeout=10.0,
            idle_timeout=75.0,
            count=lambda reason: self.node.stats.bump(self.node.stats.bad_input, "cluster_" + reason),
        )
        await self.server.start()
        self.bound_port = self.server.bound_port
        self.core.api_address = self._api_address()
        ident = self.identity
        log.info(
            "cluster %s: node %s is %s at epoch %d on %s:%d, settings %s",
            ident.cluster_id,
            ident.node_id[:23],
            ident.role.value,
            ident.epoch,
            self.settings.listen.host,
            self.bound_port,
            doc.short() if doc else "none yet",
        )
        if self.settings.etcd is not None:
            from threatgate.cluster.etcd_backend import EtcdBackend

            self.backend = EtcdBackend(self, self.settings.etcd, self.settings.request_timeout)
            await self.backend.start()
            log.info("cluster settings and Control election in etcd at %s", ", ".join(self.settings.etcd.endpoints))
        self._task = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    def _api_address(self) -> str | None:
        """host:port of this node's REST API as other hosts reach it: its listen host, or, when that is a
        wildcard, the host of its cluster address (a Secondary's 409 names it)."""
        http, server = self.node.config.http, self.node.http
        if http is None or server is None:
            return None
        host = http.listen.host
        if host in ("0.0.0.0", "::", ""):
            advertised = self.identity.address
            host = advertised[1:].partition("]")[0] if advertised.startswith("[") else advertised.rpartition(":")[0]
        return str(Address(host, server.bound_port))

    async def _first_revision(self) -> SettingsDocument:
        """A new cluster's revision 1: the Control's own shared settings and suppliers."""
        from threatgate.cluster.settings import extract_settings

        state = await self.node.db_call(lambda db: db.export_state())
        doc = SettingsDocument.create(
            self.identity.cluster_id,
            1,
            self.identity.epoch,
            time.time(),
            make_payload(extract_settings(self.local), state),
        )
        await asyncio.to_thread(self.state.save_settings, doc)
        self.core.applied_ok(doc, time.time())
        self.core.received = self.core.applied_mark
        return doc

    async def close(self) -> None:
        self._stop.set()
        if self.backend is not None:
            await self.backend.close()
        if self._task is not None:
            self._task.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self.server is not None:
            await self.server.close(0.5)
        await self.peers.aclose()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def reload_local(self) -> NodeConfig | None:
        """SIGHUP: re-read the local config and merge the applied settings into it (None: not clustered yet)."""
        local = read_xml(self.node.config.path)
        doc = self.core.applied
        config = validate_document(local, doc) if doc is not None else None
        self.local = local  # only a file that fits the applied settings replaces the one in use
        return config

    # -- heartbeats ---------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self.heartbeat_round()
            except Exception:  # the control plane must never take matching down
                log.exception("cluster heartbeat round failed; retrying")
            await runtime.pause(self._stop, self.settings.heartbeat)

    async def heartbeat_round(self) -> None:
        members = [m for m in self.identity.members.values() if m.node_id != self.identity.node_id]
        results = await asyncio.gather(*(self._heartbeat(m) for m in members), return_exceptions=True)
        for member, result in zip(members, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, ClusterError):
                log.error("heartbeat to %s failed unexpectedly: %r", member.address, result)
        self._check_alerts()

    async def _heartbeat(self, member: Member) -> None:
        try:
            status, body = await self.peers.call(
                member.address, member.cert_pem, "POST", "/cluster/v1/heartbeat", self.core.status(time.monotonic())
            )
        except ClusterError as exc:
            self.core.failed(member.node_id, str(exc))
            log.debug("heartbeat to %s: %s", member.address, exc)
            return
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("status"), dict):
            self.core.failed(member.node_id, f"heartbeat answered {status}")
            self.warn("heartbeat to %s answered %d: %s", member.address, status, body_text(body))
            return
        await self._observed(member.node_id, body["status"])

    async def _observed(self, peer_id: str, status: dict[str, Any]) -> None:
        decision = self.core.observe(peer_id, status, time.monotonic())
        await self._carry_out(decision)

    async def _carry_out(self, decision: Decision) -> None:
        if decision.step_down:
            log.warning(
                "a higher Control epoch (%d) exists: this node steps down to Secondary and will not push settings",
                self.identity.epoch,
            )
        if decision.new_members:
            for member in decision.new_members:
                self._trust(member)
        if decision.persist or decision.step_down:
            await asyncio.to_thread(self.state.save_identity, self.identity)
        if decision.pull_from is not None and not self._pulling:
            self._pulling = True  # one pull at a time: the next heartbeat asks again if still behind
            self._spawn(self._pull(decision.pull_from))
        if decision.push_to is not None and self.core.applied is not None:
            target = self.identity.members.get(decision.push_to)
            if target is not None:
                self._spawn(self._push_one(target, self.core.applied))

    def _trust(self, member: Member) -> None:
        if member.node_id not in self._trusted:
            self._ssl.load_verify_locations(cadata=member.cert_pem)
            self._trusted.add(member.node_id)

    def _check_alerts(self) -> None:
        now = time.monotonic()
        reason = self.core.emergency(now)
        if reason != self._emergency:
            if reason is not None:
                log.error(
                    "cluster emergency mode: %s; matching continues with settings %s", reason, self.applied_short()
                )
                self.node.alerts.raise_alert(ALERT_EMERGENCY, reason=reason)
            else:
                log.warning("cluster emergency mode over: Control is %s", self.core.control_address or "this node")
            self._emergency = reason
        controls = len({n for _, n in self.core.controls(now)})
        inconsistent = controls != 1 and not (reason is None and controls == 0)
        if inconsistent and not self._inconsistent:
            self.node.alerts.raise_alert(ALERT_INCONSISTENT, controls=controls)
        self._inconsistent = inconsistent

    def applied_short(self) -> str:
        return self.core.applied.short() if self.core.applied else "none"

    # -- settings in ----------------------------------------------------------------------------

    async def _pull(self, peer_id: str) -> None:
        try:
            await self._pull_from(peer_id)
        finally:
            self._pulling = False

    async def _pull_from(self, peer_id: str) -> None:
        member = self.identity.members.get(peer_id)
        if member is None:
            return
        since = self.core.applied.revision if self.core.applied else 0
        try:
            status, body = await self.peers.call(
                member.address, member.cert_pem, "GET", f"/cluster/v1/settings?since={since}"
            )
            if status == 204:
                return
            if status != 200 or not isinstance(body, dict):
                raise ClusterError(f"{member.address}: pull answered {status}", 502)
            await self.receive(parse_document(body["settings"]), peer_id, body["status"].get("role"))
        except (ClusterError, KeyError, TypeError, AttributeError) as exc:
            self._sync_error(f"pull from {member.address} failed: {exc}")

    def _sync_error(self, message: str) -> None:
        self.core.last_error = message
        log.error("settings synchronization: %s", message)
        self.node.alerts.raise_alert(ALERT_SYNC, error=message)

    async def receive(self, doc: SettingsDocument, sender_id: str | None, sender_role: str | None) -> bool:
        """Take ``doc``: offer, record as received, validate, write durably, apply.  False: already held.

        Raises:
            SettingsRejected: stale epoch, other cluster, or invalid content (nothing applied).
        """
        async with self._apply_lock:
            if not self.core.offer(doc, sender_id, sender_role):
                return False
            await self._carry_out(self.core.took(doc, sender_id, sender_role, time.time()))
            try:
                await self._apply(doc)
            except SettingsRejected as exc:
                self.core.apply_failed(doc, exc.detail)
                self._sync_error(str(exc))
                raise
            return True

    async def _apply(self, doc: SettingsDocument, suppliers_done: bool = False) -> None:
        config = validate_document(self.local, doc)
        await asyncio.to_thread(self.state.save_settings, doc)
        await self.node.apply_cluster_settings(
            config, None if suppliers_done else {"suppliers": doc.payload["suppliers"], "tags": doc.payload["tags"]}
        )
        self.core.applied_ok(doc, time.time())
        log.info("settings %s applied", doc.short())

    # -- settings out (Control) -----------------------------------------------------------------

    async def commit(
        self,
        base: int | None,
        change: Callable[[SettingsDocument], Awaitable[dict[str, Any]]],
        *,
        suppliers_done: bool = False,
    ) -> SettingsDocument:
        """Make a new revision on the Control: ``change`` gets the current document, returns the new payload.

        Serialised; refused on a Secondary, in emergency mode, or when ``base`` is stale (409).  An
        unchanged payload makes no revision.  ``suppliers_done``: ``change`` already wrote the
        supplier database (a REST write), so only the rest is applied.
        """
        async with self._write_lock:
            current = self.core.check_write(base, time.monotonic())
            payload = await change(current)
            doc = current.successor(self.identity.epoch, time.time(), payload)
            if doc.sha256 == current.sha256:
                return current
            validate_document(self.local, doc)  # before etcd sees it: an invalid document is never published
            # publish under the apply lock: our own etcd watch sees the write at once and must find it applied
            async with self._apply_lock:
                if self.backend is not None:
                    await self.backend.publish(doc, current)
                self.core.took(doc, self.identity.node_id, Role.CONTROL.value, time.time())
                await self._apply(doc, suppliers_done=suppliers_done)
            self._spawn(self.push_all(doc))
            return doc

    async def preview(
        self, base: int | None, change: Callable[[SettingsDocument], Awaitable[dict[str, Any]]]
    ) -> SettingsDocument:
        """What :meth:`commit` would check, without committing: the current document the change starts from.

        Refused like a commit (Secondary, emergency mode, stale ``base``, invalid result), so a dry
        run says everything the real change would say.
        """
        async with self._write_lock:
            current = self.core.check_write(base, time.monotonic())
            doc = current.successor(self.identity.epoch, time.time(), await change(current))
            if doc.sha256 != current.sha256:
                validate_document(self.local, doc)
            return current

    async def commit_suppliers(
        self,
        base: int | None,
        write: Callable[[], Awaitable[Any]],
        unchanged: Callable[[Any], bool] | None = None,
    ) -> tuple[Any, SettingsDocument]:
        """A REST write on the Control: run it (it changes the database), then publish the result.

        ``unchanged(result)`` true means the write changed nothing: the database is not read back.
        """
        result: list[Any] = []

        async def change(current: SettingsDocument) -> dict[str, Any]:
            result.append(await write())
            if unchanged is not None and unchanged(result[0]):
                return current.payload
            state = await self.node.db_call(lambda db: db.export_state())
            return make_payload(current.config_xml, state)

        doc = await self.commit(base, change, suppliers_done=True)
        return result[0], doc

    async def push_all(self, doc: SettingsDocument) -> None:
        members = [m for m in self.identity.members.values() if m.node_id != self.identity.node_id]
        await asyncio.gather(*(self._push_one(m, doc) for m in members), return_exceptions=True)

    async def _push_one(self, member: Member, doc: SettingsDocument) -> None:
        if self.identity.role is not Role.CONTROL or doc.epoch != self.identity.epoch:
            return  # stepped down meanwhile: never push what a stale Control holds
        try:
            status, body = await self.peers.call(
                member.address, member.cert_pem, "POST", "/cluster/v1/settings", raw=doc.to_bytes()
            )
        except ClusterError as exc:
            self.core.failed(member.node_id, str(exc))
            log.warning("push of %s to %s failed: %s (it will pull)", doc.short(), member.address, exc)
            return
        if isinstance(body, dict) and isinstance(body.get("status"), dict):
            await self._observed(member.node_id, body["status"])
        if status >= 300:
            detail = body.get("error") if isinstance(body, dict) else body
            self._sync_error(f"{member.address} refused {doc.short()}: {status} {str(detail)[:300]}")

    # -- role changes -------------------------------------------------------------------------------

    async def promote(self) -> SettingsDocument:
        """Become the Control: adopt the newest settings any reachable member holds, bump the epoch, push."""
        if self.backend is not None and self.backend.election is not None:
            raise ClusterError(
                "this cluster elects its Control through etcd: demote the current Control (it resigns) instead"
            )
        async with self._write_lock:
            if self.identity.role is Role.CONTROL:
                raise ClusterError("this node is already the Control node")
            newest = await self._newest_from_members()
            async with self._apply_lock:
                base = self.core.newest_of([newest])
                if base is None:
                    raise ClusterError("this node never received settings; promote a node that has", 409)
                epoch = self.core.promote(base)
                doc = self.core.next_document(base, epoch, time.time())
                await asyncio.to_thread(self.state.save_identity, self.identity)
                self.core.took(doc, self.identity.node_id, Role.CONTROL.value, time.time())
                await self._apply(doc)
            log.warning("this node is now the Control node (epoch %d), settings %s", epoch, doc.short())
            self.node.alerts.raise_alert("KL_ALERT_ClusterControlChanged", epoch=epoch, control=self.identity.address)
            self._spawn(self.push_all(doc))
            self._check_alerts()
            return doc

    async def _newest_from_members(self) -> SettingsDocument | None:
        newest: SettingsDocument | None = None
        for member in self.identity.members.values():
            if member.node_id == self.identity.node_id:
                continue
            try:
                status, body = await self.peers.call(
                    member.address, member.cert_pem, "GET", "/cluster/v1/settings?since=0"
                )
                if status == 200 and isinstance(body, dict):
                    doc = parse_document(body["settings"])
                    if doc.cluster_id == self.identity.cluster_id and (newest is None or doc.version > newest.version):
                        newest = doc
            except (ClusterError, SettingsRejected, KeyError, TypeError) as exc:
                log.info("promotion: no settings from %s (%s)", member.address, exc)
        return newest

    async def demote(self) -> None:
        if self.backend is not None and self.backend.election is not None:
            if self.identity.role is not Role.CONTROL:
                raise ClusterError("this node is not the Control node")
            await self.backend.resign()  # the election loop then calls lose_control()
            return
        async with self._write_lock:
            self.core.demote()
            await asyncio.to_thread(self.state.save_identity, self.identity)
            log.warning("this node is no longer the Control node; settings are frozen until one is promoted")
            self._check_alerts()

    # -- etcd election -------------------------------------------------------------------------------

    async def etcd_control(self, node_id: str | None, epoch: int) -> None:
        """etcd says who holds the Control key (None: nobody, an election is under way)."""
        decision = self.core.etcd_control(node_id, epoch)
        if decision.step_down:
            assert node_id is not None
            log.warning("etcd elected %s as Control (epoch %d): this node steps down", self._name(node_id), epoch)
        if decision.persist:
            await asyncio.to_thread(self.state.save_identity, self.identity)

    def _name(self, node_id: str) -> str:
        member = self.identity.members.get(node_id)
        return member.address if member is not None else node_id[:23]

    async def become_control(self, epoch: int) -> None:
        """This node won the etcd election at ``epoch``: republish the newest settings under it."""
        assert self.backend is not None
        async with self._write_lock:
            self.core.check_elected(epoch)
            stored = await self.backend.newest()
            async with self._apply_lock:
                base = self.core.newest_of([stored])
                if base is None:
                    raise ClusterError("no settings to publish: neither this node nor etcd holds any")
                doc = self.core.next_document(base, epoch, time.time())
                await self.backend.publish(doc, stored)
                # only now: a failed publish (etcd down, fenced) must not leave this node claiming the role
                self.core.elected(epoch)
                await asyncio.to_thread(self.state.save_identity, self.identity)
                self.core.took(doc, self.identity.node_id, Role.CONTROL.value, time.time())
                await self._apply(doc)
        log.warning("elected Control through etcd (epoch %d), settings %s", epoch, doc.short())
        self.node.alerts.raise_alert("KL_ALERT_ClusterControlChanged", epoch=epoch, control=self.identity.address)
        self._spawn(self.push_all(doc))

    async def lose_control(self) -> None:
        """The etcd lease is gone (or resigned): stop acting as Control before anyone else can start."""
        if self.identity.role is Role.CONTROL:
            async with self._write_lock:
                self.core.demote()
                await asyncio.to_thread(self.state.save_identity, self.identity)
            log.warning("lost the Control role in etcd; this node is a Secondary now")
        self._check_alerts()

    # -- joins --------------------------------------------------------------------------------------

    def issue_token(self, ttl: float) -> str:
        if self.identity.role is not Role.CONTROL:
            raise ClusterError("only the Control node issues join tokens")
        token = secrets.token_urlsafe(32)
        try:
            self._tokens.issue(token, time.monotonic(), ttl)
        except ValueError as exc:
            raise ClusterError(str(exc), 400) from None
        return token

    def _redeem(self, token: Any) -> bool:
        return self._tokens.redeem(token, time.monotonic())

    async def _join(self, body: Any) -> web.Response:
        if self.identity.role is not Role.CONTROL:
            return _json(409, {"error": "this node is not the Control node; join through the Control"})
        if not isinstance(body, dict) or not self._redeem(body.get("token")):
            self.node.stats.bump(self.node.stats.bad_input, "cluster_join_refused")
            self.warn("cluster join refused: unknown, used or expired token")
            return _json(403, {"error": "join token unknown, already used or expired"})
        pem, address = body.get("cert_pem"), body.get("address")
        try:
            if not isinstance(pem, str) or len(pem) > 16384 or not isinstance(address, str):
                raise ValueError("expected cert_pem and address strings")
            x509.load_pem_x509_certificate(pem.encode())
            parse_address(Node("address", {}, 0, "join request"), address)
            node_id = fingerprint_sha256(pem.encode())
        except (ValueError, ConfigError) as exc:
            return _json(400, {"error": f"bad join request: {exc}"})
        if node_id == self.identity.node_id:
            return _json(409, {"error": "that is the Control's own certificate; a joining node needs its own"})
        member = Member(node_id, address, pem)
        async with self._write_lock:
            self.core.add_member(member)
            self._trust(member)
            await asyncio.to_thread(self.state.save_identity, self.identity)
        log.warning("node %s joined the cluster as %s", address, node_id[:23])
        doc = self.core.applied
        return _json(
            200,
            {
                "identity": {**self.identity.as_json(), "node_id": node_id, "address": address, "role": "secondary"},
                "settings": doc.as_json() if doc else None,
            },
        )

    async def remove(self, who: str) -> Member:
        async with self._write_lock:
            node_id = next((m.node_id for m in self.identity.members.values() if who in (m.node_id, m.address)), who)
            member = self.core.remove_member(node_id)
            await asyncio.to_thread(self.state.save_identity, self.identity)
        log.warning("node %s (%s) removed from the cluster", member.address, member.node_id[:23])
        return member

    # -- the cluster port -----------------------------------------------------------------------

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        try:
            return await self._handle(request)
        except ClusterError as exc:
            return _json(exc.status, {"error": str(exc), "status": self.core.status(time.monotonic())})
        except Exception:
            log.exception("cluster request %s %s failed", request.method, request.path[:200])
            return _json(500, {"error": "internal error; see the node's log"})

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        path, method = request.path, request.method
        found = route_for(method, path)
        route, params = found if found is not None else (None, {})
        peer = request_fingerprint(request)
        if (route is None or route.who != "anyone") and (peer is None or peer not in self.identity.members):
            self.node.stats.bump(self.node.stats.bad_input, "cluster_not_member")
            self.warn("cluster request %s from %s refused: not a member", path[:100], request.remote)
            return _json(403, {"error": "not a member of this cluster"})
        if route is None:
            return _json(404, {"error": f"no route {method} {path[:100]}"})
        if route.who == "self" and peer != self.identity.node_id:
            return _json(403, {"error": "administration only from this node's own certificate (local CLI)"})
        raw = b""
        if route.body != "none":
            # members may send whole settings documents; strangers only a join request
            raw = await request.content.read(route.limit + 1)
            if len(raw) > route.limit:
                self.node.stats.bump(self.node.stats.bad_input, "cluster_body_too_large")
                return _json(413, {"error": f"body larger than {route.limit} bytes"})
        body: Any = None
        if route.body == "json":
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                self.node.stats.bump(self.node.stats.bad_input, "cluster_bad_json")
                return _json(400, {"error": "body is not JSON"})
        handler: Callable[[BaseRequest, Any, dict[str, str]], Awaitable[web.StreamResponse]]
        handler = getattr(self, "_route_" + route.name)
        return await handler(request, raw if route.body == "raw" else body, params)

    async def _route_join(self, request: BaseRequest, body: Any, params: dict[str, str]) -> web.StreamResponse:
        return await self._join(body)

    async def _route_heartbeat(self, request: BaseRequest, body: Any, params: dict[str, str]) -> web.StreamResponse:
        if not isinstance(body, dict):
            return _json(400, {"error": "expected a status object"})
        peer = request_fingerprint(request)
        assert peer is not None  # a member: checked before the route runs
        await self._observed(peer, body)
        return _json(200, {"status": self.core.status(time.monotonic())})

    async def _route_pushed(self, request: BaseRequest, raw: Any, params: dict[str, str]) -> web.StreamResponse:
        return await self._pushed(request, raw)

    async def _route_settings(self, request: BaseRequest, body: Any, params: dict[str, str]) -> web.StreamResponse:
        raw_since = request.query.get("since", "0") or "0"
        if not raw_since.isdigit() or len(raw_since) > 18:
            return _json(400, {"error": "since must be a revision number"})
        since = int(raw_since)
        doc = self.core.applied
        if doc is None or doc.revision <= since:
            return web.Response(status=204)
        return _json(200, {"settings": doc.as_json(), "status": self.core.status(time.monotonic())})

    async def _route_status(self, request: BaseRequest, body: Any, params: dict[str, str]) -> web.StreamResponse:
        return _json(200, self.table(time.monotonic()))

    async def _route_history(self, request: BaseRequest, body: Any, params: dict[str, str]) -> web.StreamResponse:
        return _json(200, await asyncio.to_thread(self._history))

    async def _route_admin(self, request: BaseRequest, body: Any, params: dict[str, str]) -> web.StreamResponse:
        return await self._admin(params["action"], body if isinstance(body, dict) else {})

    async def _pushed(self, request: BaseRequest, raw: bytes) -> web.Response:
        peer = request_fingerprint(request)
        if peer is None or peer not in self.identity.members:
            return _json(403, {"error": "not a member of this cluster"})
        now = time.monotonic()
        try:
            doc = parse_document(raw)
            view = self.core.peers.get(peer)
            role = (view.status or {}).get("role") if view is not None else None
            # only a Control pushes: the one we follow, one that says so, or one whose higher epoch proves
            # a promotion we have not heard of yet
            if not (peer == self.identity.control_id or role == Role.CONTROL.value or doc.epoch > self.identity.epoch):
                raise SettingsRejected(doc.revision, "only the Control node pushes settings", 403)
            took = await self.receive(doc, peer, Role.CONTROL.value)
        except SettingsRejected as exc:
            self.node.stats.bump(self.node.stats.bad_input, "cluster_settings_refused")
            return _json(exc.status, {"error": str(exc), "status": self.core.status(now)})
        return _json(200, {"applied": took, "status": self.core.status(now)})

    async def _admin(self, action: str, body: dict[str, Any]) -> web.Response:
        now = time.monotonic()
        base = body.get("base")
        if base is not None and (not isinstance(base, int) or isinstance(base, bool)):
            return _json(400, {"error": "base must be a revision number"})
        if action in ("set", "import", "rollback", "users"):
            facts: dict[str, Any] = {}  # what the change found (the import's diff, whether a user existed)
            change = self._change(action, body, facts)
            if action == "import" and body.get("dry_run") is True:
                current = await self.preview(base, change)
                return _json(200, {"settings": _summary(current), **facts})
            doc = await self.commit(base, change)
            return _json(200, {"settings": _summary(doc), **facts})
        if action == "promote":
            return _json(200, {"settings": _summary(await self.promote())})
        if action == "demote":
            await self.demote()
            return _json(200, {"status": self.core.status(now)})
        if action == "token":
            ttl = body.get("ttl", 600)
            if not isinstance(ttl, int | float):
                return _json(400, {"error": "ttl must be seconds"})
            return _json(
                200,
                {
                    "token": self.issue_token(float(ttl)),
                    "fingerprint": self.identity.node_id,
                    "control": self.identity.address,
                    "ttl": ttl,
                },
            )
        if action == "remove":
            member = await self.remove(str(body.get("node", "")))
            return _json(200, {"removed": member.address, "node_id": member.node_id})
        return _json(404, {"error": f"unknown action {action[:40]!r}"})

    def _change(
        self, action: str, body: dict[str, Any], facts: dict[str, Any]
    ) -> Callable[[SettingsDocument], Awaitable[dict[str, Any]]]:
        async def change(current: SettingsDocument) -> dict[str, Any]:
            try:
                if action == "set":
                    xml = set_value(current.config_xml, str(body.get("path", "")), str(body.get("value", "")))
                    return {**current.payload, "config": xml}
                if action == "import":
                    return {**current.payload, "config": _imported(current, body, facts)}
                if action == "users":
                    return {**current.payload, "config": _users_edit(current, body, facts)}
                revision = body.get("revision")
                if not isinstance(revision, int):
                    raise ClusterError("rollback needs a revision number", 400)
                old = await asyncio.to_thread(self.state.load_revision, revision)
                return old.payload
            except ConfigError as exc:
                raise ClusterError(f"settings not changed: {exc}", 422) from None

        return change

    def _history(self) -> list[dict[str, Any]]:
        out = []
        for rev in self.state.revisions():
            try:
                out.append(_summary(self.state.load_revision(rev)))
            except ClusterError as exc:
                out.append({"revision": rev, "error": str(exc)})
        return out

    def table(self, now: float) -> dict[str, Any]:
        """This node's view of the cluster: its own row and one per member."""
        rows = []
        for view in self.core.peers.values():
            st = dict(view.status or {})
            st.pop("members", None)
            rows.append(
                {
                    **st,
                    "node_id": view.node_id,
                    "address": view.address,
                    "reachable": view.reachable(now, self.core.window),
                    "seen_ago": None if view.last_ok is None else round(now - view.last_ok, 1),
                    "link_error": view.last_error,
                }
            )
        me = self.core.status(now)
        me.pop("members", None)
        cid = self.identity.control_id
        control_view = self.core.peers.get(cid) if cid else None
        if self.identity.role is Role.CONTROL:
            control_state = "this node"
        elif control_view is None:
            control_state = "no Control"
        else:
            control_state = "connected" if control_view.reachable(now, self.core.window) else "unreachable"
        return {"self": {**me, "reachable": True, "control_state": control_state}, "members": rows}

    def gauges(self) -> Gauges:
        """Cluster gauges for the node's /metrics (docs/operations.md)."""
        core = self.core

        def rev(mark: Any) -> float:
            return float(mark.revision) if mark is not None else 0.0

        return {
            "threatgate_cluster_is_control": ("1 on the Control node", lambda: float(core.role is Role.CONTROL)),
            "threatgate_cluster_epoch": ("Highest Control epoch seen", lambda: float(core.identity.epoch)),
            "threatgate_cluster_received_revision": ("Settings revision received", lambda: rev(core.received)),
            "threatgate_cluster_applied_revision": ("Settings revision applied", lambda: rev(core.applied_mark)),
            "threatgate_cluster_emergency": (
                "1 in emergency mode (no Control or two)",
                lambda: float(core.emergency(time.monotonic()) is not None),
            ),
            "threatgate_cluster_members_reachable": (
                "Other members that answered heartbeats recently",
                lambda: float(sum(v.reachable(time.monotonic(), core.window) for v in core.peers.values())),
            ),
        }

    def may_write(self) -> bool:
        """Would a settings write be accepted now (Control, not in emergency mode)?"""
        try:
            self.core.check_write(None, time.monotonic())
        except ClusterError:
            return False
        return True

    def readiness(self) -> dict[str, Any]:
        doc = self.core.applied
        return {
            "role": self.identity.role.value,
            "cluster_id": self.identity.cluster_id,
            "node_id": self.identity.node_id,
            "epoch": self.identity.epoch,
            "revision": doc.revision if doc else None,
            "sha256": doc.sha256 if doc else None,
            "emergency": self.core.emergency(time.monotonic()),
        }


def _imported(current: SettingsDocument, body: dict[str, Any], facts: dict[str, Any]) -> str:
    """The ``<Settings>`` text an import makes (:func:`import_settings`); its diff goes into ``facts``.

    An import that would replace or remove any line of the current settings needs ``"replace": true``
    (``--yes``): those lines may be changes made since with ``settings set`` or ``cluster users``.
    """
    config, source = body.get("config"), str(body.get("source") or "the imported file")[:200]
    if not isinstance(config, str):
        raise ClusterError("import needs the <Settings> text", 400)
    new = import_settings(current.config_xml, config, source)
    diff = settings_diff(current.config_xml, new, f"settings revision {current.revision}", source)
    facts["diff"] = diff
    lost = removed_lines(diff)
    if lost and body.get("replace") is not True and body.get("dry_run") is not True:
        raise ClusterError(
            f"settings not changed: importing {source} would replace or remove {lost} line(s) of settings "
            f"revision {current.revision}; confirm with --yes",
            409,
        )
    return new


def _users_edit(current: SettingsDocument, body: dict[str, Any], facts: dict[str, Any]) -> str:
    """The ``<Settings>`` text with one API user added, re-hashed (``add``) or removed (``remove``)."""
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise ClusterError("a users change needs the user name", 400)
    if body.get("op") == "add":
        password_hash = body.get("password_hash")
        if not isinstance(password_hash, str):
            raise ClusterError("adding a user needs its password_hash", 400)
        new, facts["existed"] = put_user(current.config_xml, name, password_hash)
        return new
    if body.get("op") == "remove":
        if name not in user_names(current.config_xml):
            raise ClusterError(f"no API user {name!r} in the cluster settings (revision {current.revision})", 404)
        facts["existed"] = True
        return remove_user(current.config_xml, name)
    raise ClusterError("a users change is op add or remove", 400)


def _summary(doc: SettingsDocument) -> dict[str, Any]:
    return {"revision": doc.revision, "epoch": doc.epoch, "sha256": doc.sha256, "updated_at": doc.updated_at}
