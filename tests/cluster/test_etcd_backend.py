"""cluster/etcd_backend.py: the etcd backend's decisions, over a stand-in etcd client and a stand-in agent.

What must hold: a settings write is one transaction guarded by the settings key's revision and, with the
election, by this node holding the Control key at the document's epoch (and it trims old revisions); a
refused write says why (a newer Control, or newer settings: StaleRevision with their revision); reading
takes the Control and the settings etcd holds, and an unreachable etcd only marks the backend disconnected;
the watch hands settings and Control changes to the agent; the election makes the agent Control for the
epoch it won, steps down when the lease is lost, and resigns when the agent cannot take over.
The client and the election against a real etcd: tests/cluster/test_etcd.py and
tests/integration/test_cluster_etcd.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from threatgate.cluster.etcd import Compare, KeyValue, Op, TxnResult, WatchEvent
from threatgate.cluster.etcd_backend import EtcdBackend
from threatgate.cluster.settings import SettingsDocument
from threatgate.cluster.sync import Identity, Role
from threatgate.config.common import Address
from threatgate.config.node import ClusterSettings, EtcdSettings
from threatgate.errors import ClusterError, EtcdError, StaleRevision

NODE = "AA:BB"
BASE = "/threatgate/tg-test"


def document(revision: int, epoch: int = 3) -> SettingsDocument:
    return SettingsDocument.create(
        "tg-test", revision, epoch, 1.0, {"format": 1, "config": "", "suppliers": [], "tags": []}
    )


def kv(key: str, value: bytes, create: int = 1, mod: int = 1) -> KeyValue:
    return KeyValue(key, value, create, mod, 1, 0)


class Agent:
    """The node's cluster agent as the backend sees it: records what it is told."""

    def __init__(self) -> None:
        self.identity = Identity("tg-test", NODE, "127.0.0.1:9443", Role.SECONDARY, 3, None, {})
        self.settings = ClusterSettings(listen=Address("127.0.0.1", 9443), state_dir="/x", keep_revisions=20)
        self.told: list[tuple[Any, ...]] = []
        self.changed = asyncio.Event()
        self.refuse_control = False

    def tell(self, *what: Any) -> None:
        self.told.append(what)
        self.changed.set()

    async def until_told(self, *expected: tuple[Any, ...]) -> None:
        while self.told != list(expected):
            self.changed.clear()
            await self.changed.wait()

    def applied_short(self) -> str:
        return "revision 4"

    async def receive(self, doc: SettingsDocument, sender_id: str | None, sender_role: str | None) -> bool:
        self.tell("receive", doc.revision, sender_id, sender_role)
        return True

    async def etcd_control(self, node_id: str | None, epoch: int) -> None:
        self.tell("control", node_id, epoch)

    async def become_control(self, epoch: int) -> None:
        self.tell("become", epoch)
        if self.refuse_control:
            raise ClusterError("cannot take over")

    async def lose_control(self) -> None:
        self.tell("lose")


class Client:
    """An etcd client that answers from ``keys`` or raises ``down``, and records transactions."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyValue] = {}
        self.down: EtcdError | None = None
        self.txns: list[tuple[list[Compare], list[Op], list[Op]]] = []
        self.answer = TxnResult(True, 42, ())
        self.events: list[WatchEvent] = []
        self.on_watched: Any = None

    async def get(self, key: str) -> KeyValue | None:
        if self.down is not None:
            raise self.down
        return self.keys.get(key)

    async def txn(self, compares: list[Compare], success: list[Op], failure: list[Op]) -> TxnResult:
        self.txns.append((compares, success, failure))
        return self.answer

    async def watch(self, key: str, *, prefix: bool, start_revision: int) -> AsyncIterator[WatchEvent]:
        for event in self.events:
            yield event
        self.on_watched()

    async def aclose(self) -> None:
        pass


def backend(election: bool = True) -> tuple[EtcdBackend, Agent, Client]:
    agent = Agent()
    made = EtcdBackend(agent, EtcdSettings(endpoints=("http://127.0.0.1:2379",), election=election), timeout=1)
    client = Client()
    made.client = client  # type: ignore[assignment]
    return made, agent, client


async def test_a_write_is_guarded_by_the_settings_revision_and_the_control_key_and_trims_revisions() -> None:
    made, _, client = backend()
    made.settings_mod_revision = 17
    await made.publish(document(25), document(24))
    [(compares, success, failure)] = client.txns
    assert compares == [
        Compare.mod_revision(f"{BASE}/settings", 17),
        Compare.value_is(f"{BASE}/control", NODE.encode()),
        Compare.create_revision(f"{BASE}/control", 3),
    ]
    data = document(25).to_bytes()
    assert success == [
        Op.put(f"{BASE}/settings", data),
        Op.put(f"{BASE}/revisions/0000000025", data),
        Op.delete(f"{BASE}/revisions/0000000005"),  # KeepRevisions 20
    ]
    assert failure == [Op.get(f"{BASE}/settings"), Op.get(f"{BASE}/control")]
    assert made.settings_mod_revision == 42


async def test_without_the_election_only_the_settings_revision_guards_a_write() -> None:
    made, _, client = backend(election=False)
    await made.publish(document(3), None)
    [(compares, success, _)] = client.txns
    assert compares == [Compare.mod_revision(f"{BASE}/settings", 0)] and len(success) == 2  # nothing to trim


@pytest.mark.parametrize(
    "leader", [(), (kv(f"{BASE}/control", b"CC:DD", create=3),), (kv(f"{BASE}/control", NODE.encode(), create=9),)]
)
async def test_a_write_refused_because_another_control_leads_says_so(leader: tuple[KeyValue, ...]) -> None:
    made, _, client = backend()
    client.answer = TxnResult(False, 50, ((), leader))
    with pytest.raises(ClusterError, match="no longer holds the Control role in etcd") as refused:
        await made.publish(document(25), document(24))
    assert not isinstance(refused.value, StaleRevision)


async def test_a_write_refused_because_the_settings_moved_on_is_stale_with_their_revision() -> None:
    made, _, client = backend()
    newer = kv(f"{BASE}/settings", document(26).to_bytes(), mod=48)
    client.answer = TxnResult(False, 50, ((newer,), (kv(f"{BASE}/control", NODE.encode(), create=3),)))
    with pytest.raises(StaleRevision) as stale:
        await made.publish(document(25), document(24))
    assert (stale.value.base, stale.value.current, made.settings_mod_revision) == (24, 26, 48)
    client.answer = TxnResult(False, 51, ((), (kv(f"{BASE}/control", NODE.encode(), create=3),)))
    with pytest.raises(StaleRevision) as gone:
        await made.publish(document(25), None)
    assert (gone.value.base, gone.value.current) == (0, -1)


async def test_reading_takes_the_control_and_the_settings_etcd_holds() -> None:
    made, agent, client = backend()
    client.keys = {
        f"{BASE}/settings": kv(f"{BASE}/settings", document(7).to_bytes(), mod=30),
        f"{BASE}/control": kv(f"{BASE}/control", b"CC:DD", create=12),
    }
    await made._sync()
    assert agent.told == [("control", "CC:DD", 12), ("receive", 7, None, "control")]
    assert (made.connected, made.settings_mod_revision, made.seen_revision) == (True, 30, 30)
    assert await made.newest() == document(7)


async def test_an_unreachable_etcd_leaves_the_settings_as_they_are(caplog: pytest.LogCaptureFixture) -> None:
    made, agent, client = backend()
    made.connected = True
    client.down = EtcdError("every endpoint failed")
    await made._sync()
    assert made.connected is False and agent.told == []
    assert "etcd unreachable (every endpoint failed); matching continues with settings revision 4" in caplog.text


async def test_a_damaged_document_in_etcd_is_logged_not_taken(caplog: pytest.LogCaptureFixture) -> None:
    made, agent, client = backend()
    client.keys = {f"{BASE}/settings": kv(f"{BASE}/settings", b"{not json", mod=3)}
    with caplog.at_level(logging.ERROR, "threatgate.cluster"):
        await made._sync()
    assert agent.told == [] and f"settings in etcd ({BASE}/settings) refused" in caplog.text


async def test_the_watch_hands_settings_and_control_changes_to_the_agent() -> None:
    made, agent, client = backend()
    client.events = [
        WatchEvent("PUT", kv(f"{BASE}/revisions/0000000008", b"x", mod=60)),  # not the current settings
        WatchEvent("PUT", kv(f"{BASE}/settings", document(8).to_bytes(), mod=61)),
        WatchEvent("PUT", kv(f"{BASE}/control", b"CC:DD", create=62, mod=62)),
        WatchEvent("DELETE", kv(f"{BASE}/control", b"", create=0, mod=63)),
    ]
    client.on_watched = made._stop.set
    await asyncio.wait_for(made._watch_loop(), 5)
    assert agent.told == [("receive", 8, None, "control"), ("control", "CC:DD", 62), ("control", None, 0)]
    assert (made.seen_revision, made.settings_mod_revision, made.connected) == (63, 61, True)


class Election:
    """The lease election as the backend drives it: wins at ``epochs`` in turn."""

    def __init__(self, *epochs: int) -> None:
        self.epochs = list(epochs)
        self.epoch: int | None = None
        self.lost = asyncio.Event()
        self.resigned = 0

    async def campaign(self) -> int:
        if not self.epochs:
            await asyncio.Event().wait()  # stands for ever, until the loop is cancelled
        self.epoch = self.epochs.pop(0)
        self.lost.clear()
        return self.epoch

    async def resign(self) -> None:
        self.resigned += 1
        self.lost.set()


async def test_the_election_makes_the_agent_control_and_steps_down_when_the_lease_is_lost() -> None:
    made, agent, _ = backend()
    election = Election(7, 9)
    made.election = election  # type: ignore[assignment]
    task = asyncio.create_task(made._election_loop())
    try:
        await asyncio.wait_for(agent.until_told(("become", 7)), 5)
        election.lost.set()  # the lease expired
        await asyncio.wait_for(agent.until_told(("become", 7), ("lose",), ("become", 9)), 5)
    finally:
        task.cancel()


async def test_a_winner_that_cannot_take_over_resigns() -> None:
    made, agent, _ = backend()
    agent.refuse_control = True
    election = Election(7)
    made.election = election  # type: ignore[assignment]
    task = asyncio.create_task(made._election_loop())
    try:
        await asyncio.wait_for(election.lost.wait(), 5)  # resigning ends the lease at once
        assert agent.told == [("become", 7)] and election.resigned == 1
    finally:
        task.cancel()


async def test_a_plain_http_endpoint_off_this_host_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    agent = Agent()
    endpoints = ("http://10.0.0.9:2379", "http://[::1]:2379", "https://10.0.0.8:2379")
    made = EtcdBackend(agent, EtcdSettings(endpoints=endpoints, election=False), timeout=1)
    client = Client()
    client.down = EtcdError("down")
    made.client = client  # type: ignore[assignment]
    await made.start()
    await made.close()
    warned = [r.getMessage() for r in caplog.records if "plain HTTP" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("etcd endpoint http://10.0.0.9:2379 is plain HTTP")
