"""Three real ``threatgate node`` processes whose cluster lives in a real 3-member etcd (docs/cluster.md, "etcd").

One etcd cluster and one node set serve the whole module (about 20 s in all); the tests run in file order
and each finds the current Control by asking the nodes, so a test that moved the Control (demote) leaves a
usable cluster behind.  The destructive tests come last: the etcd leader killed (etcd keeps quorum with two
members), then the Control node SIGKILLed and restarted.  Every node and etcd process is stopped in the
fixture's teardown, also when a test fails.  The nodes list the etcd leader as their first endpoint, so
killing it exercises their client fail-over and the watch resuming on another member.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, aclosing
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import pytest

from tests.cluster_nodes import (
    CLUSTER_ID,
    FEED_URL,
    ClusterNode,
    committed,
    event_format,
    three_node_cluster,
    wait_applied,
)
from tests.etcd_cluster import EtcdCluster
from tests.helpers import wait_until
from threatgate.cluster.etcd import EtcdClient, KeyValue
from threatgate.cluster.etcd_backend import EtcdBackend
from threatgate.cluster.settings import SettingsDocument
from threatgate.config.node import EtcdSettings
from threatgate.errors import ClusterError, StaleRevision

if TYPE_CHECKING:
    from threatgate.cluster.agent import ClusterAgent

PREFIX = "/tg"
SETTINGS_KEY = f"{PREFIX}/{CLUSTER_ID}/settings"
CONTROL_KEY = f"{PREFIX}/{CLUSTER_ID}/control"
LEASE_TTL = 2
SYNC_TIMEOUT = 10.0
"""A committed revision reaches every node by push and by the etcd watch: well within this."""
ELECTION_TIMEOUT = LEASE_TTL + 8.0
"""A SIGKILLed Control's lease expires after LEASE_TTL; a waiting node then wins and republishes."""
EVENT = f"url={FEED_URL}/ src=10.1.2.3"
"""An event that hits the example URL feed; its detections are marked ``etcdmark=<tag>`` by the tests."""
MATCH_TIMEOUT = 10.0
"""Bound on one event exchange: matching never waits for etcd."""
ELECTED = r"elected Control through etcd \(epoch \d+\)"


# -- etcd, read the way an operator's etcdctl would ------------------------------------------------------


async def _get(endpoints: list[str], key: str) -> KeyValue | None:
    client = EtcdClient(endpoints, timeout=2.0)
    try:
        return await client.get(key)
    finally:
        await client.aclose()


def etcd_get(endpoints: list[str], key: str) -> KeyValue | None:
    return asyncio.run(_get(endpoints, key))


def etcd_settings(endpoints: list[str]) -> tuple[dict[str, Any], int]:
    """The settings document stored in etcd and the key's mod_revision."""
    kv = etcd_get(endpoints, SETTINGS_KEY)
    assert kv is not None, f"no {SETTINGS_KEY} in etcd"
    doc = json.loads(kv.value)
    assert isinstance(doc, dict)
    return doc, kv.mod_revision


async def _settings_puts(endpoints: list[str], start: int, end: int) -> list[dict[str, Any]]:
    client = EtcdClient(endpoints, timeout=2.0)
    docs: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(15):
            async with aclosing(client.watch(SETTINGS_KEY, start_revision=start)) as events:
                async for event in events:
                    if event.type == "PUT":
                        docs.append(json.loads(event.kv.value))
                    if event.kv.mod_revision >= end:
                        break
    finally:
        await client.aclose()
    return docs


def etcd_settings_history(endpoints: list[str], start: int, end: int) -> list[dict[str, Any]]:
    """Every document written to the settings key at etcd revisions ``start``..``end`` (a watch replays them)."""
    return asyncio.run(_settings_puts(endpoints, start, end))


# -- the nodes ----------------------------------------------------------------------------------------------


def assert_no_settings_errors(nodes: list[ClusterNode]) -> None:
    """No node refused a settings document or failed to synchronise (the Control's own etcd echo included)."""
    for node in nodes:
        words = ("refused", "settings synchronization", "KL_ALERT_SettingsSynchronizationError")
        bad = [line for line in node.process.log().splitlines() if any(word in line for word in words)]
        assert not bad, f"{node.name}: {bad}"


@dataclass
class Env:
    etcd: EtcdCluster
    nodes: list[ClusterNode]

    def running(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.running()]

    def controls(self, nodes: list[ClusterNode] | None = None) -> list[tuple[ClusterNode, dict[str, Any]]]:
        found = []
        for node in nodes if nodes is not None else self.running():
            body = node.readyz()
            if body["role"] == "control":
                found.append((node, body))
        return found

    def control(self) -> ClusterNode:
        """The one node that reports role control (waits for it: an election may be under way)."""
        found: list[ClusterNode] = []

        def one() -> bool:
            found[:] = [n for n, _ in self.controls()]
            return len(found) == 1

        wait_until(one, "exactly one Control node", ELECTION_TIMEOUT)
        return found[0]

    def synced(self, revision: int, sha256: str, nodes: list[ClusterNode] | None = None) -> None:
        wait_applied(nodes if nodes is not None else self.running(), revision, sha256, SYNC_TIMEOUT)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """etcd (3 members) and n1 (``cluster init``), n2 and n3 (joined with tokens), all running and in sync."""
    root = tmp_path_factory.mktemp("etcd-cluster")
    with ExitStack() as stack:
        etcd = stack.enter_context(EtcdCluster(root, size=3))
        # the etcd leader first: the nodes talk to it until it dies, so its death exercises their fail-over
        leader = etcd.wait_for_leader()
        endpoints = [etcd.endpoints[leader]] + [e for i, e in enumerate(etcd.endpoints) if i != leader]
        element = f'<Etcd endpoints="{",".join(endpoints)}" prefix="{PREFIX}" lease_ttl="{LEASE_TTL}"/>'
        # left before etcd is killed: the nodes resign their lease cleanly
        nodes = stack.enter_context(three_node_cluster(root, cluster_extra=element, elected=ELECTED))
        env = Env(etcd, nodes)
        doc, _ = etcd_settings(etcd.endpoints)
        env.synced(doc["revision"], doc["sha256"])
        yield env


# -- the tests (in this order: the last two kill things) ----------------------------------------------------


def test_settings_set_is_an_etcd_write_that_every_node_applies(env: Env) -> None:
    control = env.control()
    assert control is env.nodes[0]
    before, _ = etcd_settings(env.etcd.endpoints)
    leader = etcd_get(env.etcd.endpoints, CONTROL_KEY)
    assert leader is not None and leader.value.decode() == control.node_id
    assert before["epoch"] == leader.create_revision == control.readyz()["epoch"]

    revision, epoch, sha256 = committed(
        control.cli_ok("settings", "set", "OutputSettings/EventFormat", event_format("etcdmark=one"))
    )
    assert (revision, epoch) == (before["revision"] + 1, before["epoch"])
    doc, _ = etcd_settings(env.etcd.endpoints)
    assert (doc["revision"], doc["epoch"], doc["sha256"]) == (revision, epoch, sha256)
    assert "etcdmark=one" in doc["payload"]["config"]
    kept = etcd_get(env.etcd.endpoints, f"{PREFIX}/{CLUSTER_ID}/revisions/{revision:010d}")
    assert kept is not None and json.loads(kept.value)["sha256"] == sha256

    env.synced(revision, sha256)
    for node in env.nodes:
        node.assert_matches("etcdmark=one", EVENT)
    table = env.nodes[2].status()  # what an operator sees on a Secondary
    assert table["self"]["role"] == "secondary" and table["self"]["control_address"] == control.address
    assert table["self"]["applied"]["sha256"] == sha256 and table["self"]["epoch"] == epoch
    # The members' digests reach this table by heartbeat (every 0.5 s): wait for the next exchange.
    wait_until(
        lambda: sorted(m["applied"]["sha256"] for m in env.nodes[2].status()["members"]) == [sha256, sha256],
        "the Secondary's table showing both other nodes at the new digest",
        SYNC_TIMEOUT,
    )
    assert_no_settings_errors(env.nodes)


def test_two_concurrent_writes_on_the_same_base_one_wins(env: Env) -> None:
    control = env.control()
    base, _ = control.applied()
    assert base is not None
    procs = {
        tag: control.cli_popen(
            "settings", "set", "--base", str(base), "OutputSettings/EventFormat", event_format(f"etcdmark={tag}")
        )
        for tag in ("left", "right")
    }
    results = {tag: proc.communicate_result() for tag, proc in procs.items()}
    winners = [tag for tag, result in results.items() if result.returncode == 0]
    assert len(winners) == 1, results
    (winner,) = winners
    (loser,) = set(results) - {winner}
    code, err = results[loser].returncode, results[loser].stderr
    assert code == 2 and "settings changed meanwhile" in err and f"based on revision {base}," in err, err
    revision, _, sha256 = committed(results[winner].stdout)
    assert revision == base + 1
    doc, _ = etcd_settings(env.etcd.endpoints)
    assert (doc["revision"], doc["sha256"]) == (revision, sha256)
    assert f"etcdmark={winner}" in doc["payload"]["config"]
    env.synced(revision, sha256)
    for node in env.nodes:
        node.assert_matches(f"etcdmark={winner}", EVENT)
    assert_no_settings_errors(env.nodes)


def test_promote_is_refused_and_demote_hands_over_at_once(env: Env) -> None:
    """In etcd mode the Control is elected: ``promote`` is refused; ``demote`` resigns the lease, so another
    node wins without waiting for the lease to expire, and the demoted node follows it."""
    control = env.control()
    others = [n for n in env.nodes if n is not control]
    epoch = control.readyz()["epoch"]
    refused = others[0].cli("promote")
    assert refused.returncode == 2 and "elects its Control through etcd" in refused.stderr, refused.stderr

    control.cli_ok("demote")
    demoted = time.monotonic()
    found: list[tuple[ClusterNode, dict[str, Any]]] = []

    def handed_over() -> bool:
        found[:] = env.controls()
        return len(found) == 1 and found[0][0] is not control and found[0][1]["epoch"] > epoch

    wait_until(handed_over, "another node elected after the demote", ELECTION_TIMEOUT)
    took = time.monotonic() - demoted
    assert took < LEASE_TTL, f"{took:.2f} s: as slow as a lease expiry, so the lease was not resigned"
    (new, state), *_ = found
    wait_until(
        lambda: all(n.status()["self"]["control_address"] == new.address for n in env.nodes),
        f"every node following {new.name}",
        SYNC_TIMEOUT,
    )
    assert control.readyz()["role"] == "secondary" and control.readyz()["epoch"] == state["epoch"]
    doc, _ = etcd_settings(env.etcd.endpoints)
    assert doc["epoch"] == state["epoch"]
    env.synced(doc["revision"], doc["sha256"])
    revision, _, sha256 = committed(
        new.cli_ok("settings", "set", "OutputSettings/EventFormat", event_format("etcdmark=handover"))
    )
    env.synced(revision, sha256)
    control.assert_matches("etcdmark=handover", EVENT)
    assert_no_settings_errors(env.nodes)


class _StubAgent:
    """What EtcdBackend.publish reads of its agent: the node's identity and KeepRevisions."""

    def __init__(self, node_id: str) -> None:
        self.identity = SimpleNamespace(cluster_id="fence", node_id=node_id)
        self.settings = SimpleNamespace(keep_revisions=20)


async def test_a_deposed_control_cannot_publish_and_is_told_why(env: Env) -> None:
    """The fencing compare of EtcdBackend.publish, in process on its own prefix of the module's etcd.

    A Control whose lease is gone (expired, revoked) but which has not noticed yet, and one that was
    replaced by a newer Control, must both be refused as no longer the Control (not as a stale base).
    """
    settings = EtcdSettings(endpoints=tuple(env.etcd.endpoints), prefix="/tgfence", lease_ttl=LEASE_TTL)
    first = EtcdBackend(cast("ClusterAgent", _StubAgent("first")), settings, 2.0)
    second = EtcdBackend(cast("ClusterAgent", _StubAgent("second")), settings, 2.0)
    try:
        assert first.election is not None and second.election is not None
        async with asyncio.timeout(10):
            epoch = await first.election.campaign()
        payload = {"format": 1, "config": "<Settings/>", "suppliers": [], "tags": []}
        doc = SettingsDocument.create("fence", 1, epoch, time.time(), payload)
        await first.publish(doc, None)
        await first.client.lease_revoke(first.election.lease)  # the lease dies before its keep-alive notices
        with pytest.raises(ClusterError, match="no longer holds the Control role") as refused:
            await first.publish(doc.successor(epoch, time.time()), doc)
        assert not isinstance(refused.value, StaleRevision)
        async with asyncio.timeout(10):
            newer = await second.election.campaign()
        assert newer > epoch
        with pytest.raises(ClusterError, match="no longer holds the Control role"):
            await first.publish(doc.successor(epoch, time.time()), doc)
        stored = await second.newest()
        assert stored is not None and stored.version == doc.version
    finally:
        await first.close()
        await second.close()


def test_etcd_leader_killed_matching_goes_on_and_writes_resume(env: Env) -> None:
    expected = env.nodes[0].detections(EVENT, timeout=MATCH_TIMEOUT)
    assert len(expected) == 1 and "etcdmark=" in expected[0], expected
    leader = env.etcd.leader_index()
    assert leader is not None
    env.etcd.kill(leader)
    killed = time.monotonic()
    for node in env.nodes:  # matching never waits for etcd
        assert node.detections(EVENT, timeout=MATCH_TIMEOUT) == expected

    deadline = time.monotonic() + 30.0
    failures: list[str] = []
    while True:  # client fail-over: etcd needs a moment to elect a new leader
        result = env.control().cli("settings", "set", "OutputSettings/EventFormat", event_format("etcdmark=failover"))
        if result.returncode == 0:
            break
        failures.append(result.stderr.strip())
        assert time.monotonic() < deadline, f"no settings write within 30 s of the etcd leader's death: {failures}"
        time.sleep(0.2)  # back-off between attempts, not synchronisation
    revision, epoch, sha256 = committed(result.stdout)
    assert time.monotonic() - killed < 30.0
    alive = tuple(i for i in range(env.etcd.size) if i != leader)
    assert env.etcd.wait_for_leader(among=alive) != leader
    doc, _ = etcd_settings(env.etcd.endpoints)
    assert (doc["revision"], doc["epoch"], doc["sha256"]) == (revision, epoch, sha256)
    env.synced(revision, sha256)
    for node in env.nodes:
        node.assert_matches("etcdmark=failover", EVENT)
    assert_no_settings_errors(env.nodes)


def test_control_killed_another_node_is_elected_and_the_old_one_follows(env: Env) -> None:
    old = env.control()
    others = [n for n in env.nodes if n is not old]
    before, start = etcd_settings(env.etcd.endpoints)
    old_epoch = old.readyz()["epoch"]
    assert before["epoch"] == old_epoch
    logged = {n.name: len(n.process.log()) for n in others}

    old.kill()
    found: list[tuple[ClusterNode, dict[str, Any]]] = []

    def elected() -> bool:
        found[:] = env.controls(others)
        return len(found) == 1 and found[0][1]["epoch"] > old_epoch

    wait_until(elected, "a new Control with a higher epoch", ELECTION_TIMEOUT)
    (new, state), *_ = found
    new_epoch = state["epoch"]
    (survivor,) = [n for n in others if n is not new]
    new.process.wait_for_log(rf"elected Control through etcd \(epoch {new_epoch}\)", after=logged[new.name])
    leader = etcd_get(env.etcd.endpoints, CONTROL_KEY)
    assert leader is not None and (leader.value.decode(), leader.create_revision) == (new.node_id, new_epoch)

    def follows() -> bool:
        me = survivor.status()["self"]
        return (
            me["role"] == "secondary"
            and me["epoch"] == new_epoch
            and me["control_address"] == new.address
            and me["emergency"] is None
        )

    wait_until(follows, f"{survivor.name} following {new.name}", SYNC_TIMEOUT)
    assert [n for n, _ in env.controls(others)] == [new]
    republished, _ = etcd_settings(env.etcd.endpoints)
    assert republished["epoch"] == new_epoch and republished["revision"] > before["revision"]
    assert republished["sha256"] == before["sha256"]  # the same settings, under the new epoch
    env.synced(republished["revision"], republished["sha256"], others)

    revision, epoch, sha256 = committed(
        new.cli_ok("settings", "set", "OutputSettings/EventFormat", event_format("etcdmark=newcontrol"))
    )
    assert epoch == new_epoch
    env.synced(revision, sha256, others)
    survivor.assert_matches("etcdmark=newcontrol", EVENT)

    old.start()
    old.process.wait_for_log(r"this node steps down", after=0)
    env.synced(revision, sha256)
    wait_until(
        lambda: old.readyz()["role"] == "secondary" and old.readyz()["epoch"] == new_epoch,
        "the old Control following the new epoch",
        SYNC_TIMEOUT,
    )
    me = old.status()["self"]
    assert (me["role"], me["epoch"], me["control_address"]) == ("secondary", new_epoch, new.address)
    assert me["applied"]["revision"] == revision and me["applied"]["sha256"] == sha256
    old.assert_matches("etcdmark=newcontrol", EVENT)
    assert "elected Control through etcd" not in old.process.log()
    assert [n for n, _ in env.controls()] == [new]

    final, end = etcd_settings(env.etcd.endpoints)
    assert (final["revision"], final["epoch"], final["sha256"]) == (revision, new_epoch, sha256)
    history = etcd_settings_history(env.etcd.endpoints, start, end)
    versions = [(d["epoch"], d["revision"]) for d in history]
    assert versions[0] == (before["epoch"], before["revision"]) and versions[-1] == (new_epoch, revision)
    assert versions == sorted(versions), f"the settings key went back: {versions}"
    assert {e for e, _ in versions} == {old_epoch, new_epoch}, versions
