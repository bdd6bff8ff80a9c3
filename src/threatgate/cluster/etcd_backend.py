"""The optional etcd backend: settings stored in etcd, changes watched, the Control elected by lease.

Keys, under ``<prefix>/<cluster id>/``::

    settings            the current settings document (JSON)
    revisions/<n>       the last KeepRevisions documents (rollback and promotion read them)
    control             the elected Control's node id, held under its lease; the key's
                        create_revision is the Control epoch (a fencing token etcd makes for us)

What etcd adds to the embedded mode:

- a settings write is a transaction that succeeds only while the writer still holds the ``control``
  key with the epoch it was elected at and the settings key is unchanged since it read it, so a
  deposed Control or a concurrent editor can never overwrite newer settings;
- every node watches the settings key from the revision it has seen, and the watch resumes after
  an etcd member dies, so no change is missed (the embedded pull loop still runs as a safety net);
- no administrator is needed for failover: when the Control dies its lease expires, etcd deletes
  the key, and a waiting node wins, bumps the epoch and republishes the settings under it.

Membership, heartbeats, the node table and the mutually authenticated pushes stay as in embedded
mode: etcd replaces the source of truth and the election, not the node-to-node channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Protocol

from threatgate import runtime
from threatgate.cluster.etcd import Compare, Election, EtcdClient, Op
from threatgate.cluster.settings import SettingsDocument, parse_document
from threatgate.cluster.sync import Identity
from threatgate.config.node import ClusterSettings, EtcdSettings
from threatgate.errors import ClusterError, EtcdError, SettingsRejected, StaleRevision

log = logging.getLogger("threatgate.cluster")


def _ssl_context(settings: EtcdSettings) -> ssl.SSLContext | None:
    if not any(e.startswith("https://") for e in settings.endpoints):
        return None
    ctx = ssl.create_default_context(cafile=settings.ca_path)
    if settings.cert_path and settings.key_path:
        ctx.load_cert_chain(settings.cert_path, settings.key_path)
    return ctx


class EtcdAgent(Protocol):
    """What :class:`EtcdBackend` reads and tells the node's cluster agent (``ClusterAgent`` is one)."""

    @property
    def identity(self) -> Identity: ...
    @property
    def settings(self) -> ClusterSettings: ...
    def applied_short(self) -> str: ...
    async def receive(self, doc: SettingsDocument, sender_id: str | None, sender_role: str | None) -> bool: ...
    async def etcd_control(self, node_id: str | None, epoch: int) -> None: ...
    async def become_control(self, epoch: int) -> None: ...
    async def lose_control(self) -> None: ...


class EtcdBackend:
    """Keeps one node's cluster agent in step with etcd."""

    def __init__(self, agent: EtcdAgent, settings: EtcdSettings, timeout: float) -> None:
        self.agent = agent
        self.settings = settings
        cluster = agent.identity.cluster_id
        self.base = f"{settings.prefix}/{cluster}"
        self.settings_key = f"{self.base}/settings"
        self.control_key = f"{self.base}/control"
        self.client = EtcdClient(settings.endpoints, timeout=timeout, ssl_context=_ssl_context(settings))
        self.election: Election | None = None
        if settings.election:
            node_id = agent.identity.node_id.encode()
            self.election = Election(self.client, self.control_key, node_id, settings.lease_ttl)
        self.settings_mod_revision = 0  # of the settings key as last read or written by us
        self.seen_revision = 0  # etcd revision the watch has delivered up to
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self.connected = False
        self._resigned = False

    async def start(self) -> None:
        for endpoint in self.settings.endpoints:
            host = endpoint.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
            if endpoint.startswith("http://") and host not in ("127.0.0.1", "::1", "localhost"):
                log.warning(
                    "etcd endpoint %s is plain HTTP: settings (API user password hashes, indicators) cross the "
                    "network unencrypted and unauthenticated; use https:// with ca, cert and key",
                    endpoint,
                )
        await self._sync()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch_loop()))
        if self.election is not None:
            self._tasks.append(loop.create_task(self._election_loop()))

    async def close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.election is not None and self.election.epoch is not None:
            with contextlib.suppress(EtcdError):
                await asyncio.wait_for(self.election.resign(), 2.0)  # hand over at once on a clean stop
        await self.client.aclose()

    # -- reading ------------------------------------------------------------------------------------

    async def _sync(self) -> None:
        """Read the settings key and the Control; take what is newer than what we hold."""
        try:
            kv = await self.client.get(self.settings_key)
            leader = await self.client.get(self.control_key)
        except EtcdError as exc:
            self.connected = False
            log.warning("etcd unreachable (%s); matching continues with settings %s", exc, self.agent.applied_short())
            return
        self.connected = True
        if leader is not None:
            await self.agent.etcd_control(leader.value.decode(errors="replace"), leader.create_revision)
        if kv is None:
            return
        self.settings_mod_revision = kv.mod_revision
        self.seen_revision = max(self.seen_revision, kv.mod_revision)
        await self._take(kv.value)

    async def _take(self, value: bytes) -> None:
        try:
            doc = parse_document(value)
            await self.agent.receive(doc, None, "control")
        except SettingsRejected as exc:
            log.error("settings in etcd (%s) refused: %s", self.settings_key, exc)

    async def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                async for event in self.client.watch(
                    self.base + "/", prefix=True, start_revision=self.seen_revision + 1
                ):
                    self.connected = True
                    self.seen_revision = event.kv.mod_revision
                    if event.kv.key == self.settings_key and event.type == "PUT":
                        self.settings_mod_revision = event.kv.mod_revision
                        await self._take(event.kv.value)
                    elif event.kv.key == self.control_key:
                        if event.type == "PUT":
                            await self.agent.etcd_control(
                                event.kv.value.decode(errors="replace"), event.kv.create_revision
                            )
                        else:
                            await self.agent.etcd_control(None, 0)
            except EtcdError as exc:
                self.connected = False
                log.warning("etcd watch interrupted (%s); re-reading and watching again", exc)
                await runtime.pause(self._stop, 1.0)
                await self._sync()

    # -- election -----------------------------------------------------------------------------------

    async def _election_loop(self) -> None:
        election = self.election
        assert election is not None
        while not self._stop.is_set():
            try:
                epoch = await election.campaign()
            except EtcdError as exc:
                log.warning("etcd election: %s; retrying", exc)
                await runtime.pause(self._stop, 1.0)
                continue
            try:
                await self.agent.become_control(epoch)
            except (ClusterError, SettingsRejected) as exc:
                log.error("won the etcd election (epoch %d) but could not take over: %s; resigning", epoch, exc)
                with contextlib.suppress(EtcdError):
                    await election.resign()
                continue
            await election.lost.wait()
            await self.agent.lose_control()
            if self._resigned:  # stepped aside on purpose: let another node win before standing again
                self._resigned = False
                await runtime.pause(self._stop, 2.0 * self.settings.lease_ttl)

    async def resign(self) -> None:
        """Give up the Control role: revoke the lease so another node wins at once."""
        if self.election is not None:
            self._resigned = True
            await self.election.resign()

    # -- writing ------------------------------------------------------------------------------------

    async def publish(self, doc: SettingsDocument, base: SettingsDocument | None) -> None:
        """Store ``doc`` as the current settings, only if we still lead with ``doc.epoch`` and nobody wrote meanwhile.

        Raises:
            StaleRevision: the settings key changed since we read it.
            ClusterError: this node no longer holds the Control key at this epoch (503 if etcd is down).
        """
        compares = [Compare.mod_revision(self.settings_key, self.settings_mod_revision)]
        if self.election is not None:
            compares += [
                Compare.value_is(self.control_key, self.agent.identity.node_id.encode()),
                Compare.create_revision(self.control_key, doc.epoch),
            ]
        data = doc.to_bytes()
        success = [Op.put(self.settings_key, data), Op.put(f"{self.base}/revisions/{doc.revision:010d}", data)]
        old = doc.revision - self.agent.settings.keep_revisions
        if old > 0:
            success.append(Op.delete(f"{self.base}/revisions/{old:010d}"))
        result = await self.client.txn(compares, success, [Op.get(self.settings_key), Op.get(self.control_key)])
        if result.succeeded:
            self.settings_mod_revision = result.revision
            return
        current, leader = (result.ranges + ((), ()))[:2]
        if self.election is not None and (
            not leader  # our lease expired or was revoked: etcd deleted the key
            or leader[0].value != self.agent.identity.node_id.encode()
            or leader[0].create_revision != doc.epoch
        ):
            raise ClusterError("this node no longer holds the Control role in etcd (a newer Control was elected)")
        if current:
            self.settings_mod_revision = current[0].mod_revision
            with contextlib.suppress(SettingsRejected):
                newer = parse_document(current[0].value)
                raise StaleRevision(base.revision if base else 0, newer.revision)
        raise StaleRevision(base.revision if base else 0, -1)

    async def newest(self) -> SettingsDocument | None:
        kv = await self.client.get(self.settings_key)
        if kv is None:
            return None
        self.settings_mod_revision = kv.mod_revision
        return parse_document(kv.value)
