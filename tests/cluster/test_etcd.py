"""The etcd client and the leader election against a real 3-member etcd cluster (tests/etcd_cluster.py).

Most tests share one module-scoped cluster and keep to their own key prefix; tests that kill members start
their own cluster.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from pathlib import Path

import aiohttp
import pytest

from tests.etcd_cluster import EtcdCluster
from tests.helpers import free_ports
from threatgate.cluster.etcd import Compare, Election, EtcdClient, KeyValue, Op, WatchEvent
from threatgate.errors import EtcdError

TTL = 2
"""Election/lease TTL in seconds: etcd's minimum with the cluster's 500 ms election timeout is 1 s."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as running:
        yield running


@pytest.fixture
def ns() -> str:
    """A key prefix of this test's own, so that tests sharing the cluster never see each other's keys."""
    return f"/test/{uuid.uuid4().hex}/"


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., EtcdClient]]:
    """EtcdClient factory; every client is closed at the end of the test (one client = one process)."""
    clients: list[EtcdClient] = []

    def make(endpoints: list[str], timeout: float = 2.0) -> EtcdClient:
        clients.append(EtcdClient(endpoints, timeout=timeout))
        return clients[-1]

    yield make
    for c in clients:
        await c.aclose()


@pytest.fixture
def client(cluster: EtcdCluster, make_client: Callable[..., EtcdClient]) -> EtcdClient:
    return make_client(cluster.endpoints)


async def within(seconds: float, awaitable: Awaitable[object], what: str) -> None:
    try:
        async with asyncio.timeout(seconds):
            await awaitable
    except TimeoutError:
        raise AssertionError(f"{what}: not within {seconds} s") from None


async def wait_for_delete(client: EtcdClient, key: str, start_revision: int) -> WatchEvent:
    async with aclosing(client.watch(key, start_revision=start_revision)) as events:
        async for event in events:
            if event.type == "DELETE":
                return event
    raise AssertionError("watch ended")


class Collector:
    """Consumes a watch on a task; tests wait for a number of events with a deadline."""

    def __init__(self, client: EtcdClient, key: str, *, prefix: bool, start_revision: int) -> None:
        self.events: list[WatchEvent] = []
        self._changed = asyncio.Condition()
        self.task = asyncio.create_task(self._run(client, key, prefix, start_revision))

    async def _run(self, client: EtcdClient, key: str, prefix: bool, start_revision: int) -> None:
        async with aclosing(client.watch(key, prefix=prefix, start_revision=start_revision)) as events:
            async for event in events:
                async with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()

    async def wait_count(self, count: int, seconds: float = 10.0) -> list[WatchEvent]:
        async def enough() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.events) >= count or self.task.done())

        await within(seconds, enough(), f"{count} watch events (saw {len(self.events)})")
        if self.task.done() and len(self.events) < count:
            self.task.result()  # raises what ended the watch
            raise AssertionError(f"watch ended after {len(self.events)} of {count} events")
        return self.events

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


# -- KV ---------------------------------------------------------------------------------------------------------


async def test_put_get_prefix_round_trip(client: EtcdClient, ns: str) -> None:
    binary = bytes(range(256))
    unicode_key, unicode_value = f"{ns}schlüssel/ключ/鍵", "wert ✓ значение 値".encode()
    rev_bin = await client.put(f"{ns}bin", binary)
    rev_uni = await client.put(unicode_key, unicode_value)
    rev_empty = await client.put(f"{ns}empty", b"")
    await client.put(ns.rstrip("/") + "-sibling", b"outside the prefix")
    assert rev_bin < rev_uni < rev_empty

    got = await client.get(f"{ns}bin")
    assert got == KeyValue(f"{ns}bin", binary, rev_bin, rev_bin, 1, 0)
    uni = await client.get(unicode_key)
    assert uni is not None and (uni.key, uni.value, uni.mod_revision) == (unicode_key, unicode_value, rev_uni)
    empty = await client.get(f"{ns}empty")
    assert empty is not None and empty.value == b"" and empty.version == 1
    assert await client.get(f"{ns}missing") is None

    revision, kvs = await client.get_prefix(ns)
    assert revision >= rev_empty
    assert [kv.key for kv in kvs] == [f"{ns}bin", f"{ns}empty", unicode_key]  # sorted by key bytes
    assert [kv.value for kv in kvs] == [binary, b"", unicode_value]

    rev_again = await client.put(f"{ns}bin", b"v2")
    again = await client.get(f"{ns}bin")
    assert again == KeyValue(f"{ns}bin", b"v2", rev_bin, rev_again, 2, 0)
    assert await client.delete(f"{ns}bin") == 1
    assert await client.get(f"{ns}bin") is None
    assert await client.delete(f"{ns}bin") == 0


async def test_put_if_compare_and_swap(client: EtcdClient, ns: str) -> None:
    key = f"{ns}cas"
    first = await client.put(key, b"1")
    second = await client.put(key, b"2")

    ok, revision = await client.put_if(key, b"stale", mod_revision=first)
    assert (ok, revision) == (False, second)
    assert (await client.get(key)) == KeyValue(key, b"2", first, second, 2, 0)

    ok, revision = await client.put_if(key, b"3", mod_revision=second)
    assert ok and revision > second
    current = await client.get(key)
    assert current is not None and (current.value, current.mod_revision) == (b"3", revision)

    assert await client.put_if(key, b"x", mod_revision=0) == (False, revision)  # 0: must not exist
    ok, created = await client.put_if(f"{ns}new", b"n", mod_revision=0)
    assert ok and (await client.get(f"{ns}new")) == KeyValue(f"{ns}new", b"n", created, created, 1, 0)

    # two writers racing from the same revision: exactly one wins
    results = await asyncio.gather(*(client.put_if(key, bytes([i]), mod_revision=revision) for i in range(5)))
    assert sorted(ok for ok, _ in results) == [False] * 4 + [True]


async def test_txn_helpers(client: EtcdClient, ns: str) -> None:
    await client.put(f"{ns}a", b"1")
    await client.put(f"{ns}b", b"2")
    result = await client.txn(
        [Compare.value_is(f"{ns}a", b"1"), Compare(f"{ns}b", "VERSION", 0, "GREATER")],
        [Op.get(ns, prefix=True), Op.delete(f"{ns}a"), Op.put(f"{ns}c", b"3")],
        [Op.get(f"{ns}a")],
    )
    assert result.succeeded
    assert [[kv.key for kv in r] for r in result.ranges] == [[f"{ns}a", f"{ns}b"]]
    assert [kv.key for kv in (await client.get_prefix(ns))[1]] == [f"{ns}b", f"{ns}c"]

    failed = await client.txn([Compare.value_is(f"{ns}c", b"nope")], [Op.delete(f"{ns}c")], [Op.get(f"{ns}c")])
    assert not failed.succeeded and [kv.value for kv in failed.ranges[0]] == [b"3"]


async def test_lease_expiry_deletes_the_key(client: EtcdClient, ns: str) -> None:
    lease = await client.lease_grant(1)
    assert lease > 0
    revision = await client.put(f"{ns}leased", b"v", lease=lease)
    kv = await client.get(f"{ns}leased")
    assert kv is not None and kv.lease == lease
    assert await client.lease_keepalive(lease) >= 1

    event = await asyncio.wait_for(wait_for_delete(client, f"{ns}leased", revision + 1), 5)
    assert event.kv.key == f"{ns}leased"
    assert await client.get(f"{ns}leased") is None
    assert await client.lease_keepalive(lease) == 0  # 0: the lease is gone
    await client.lease_revoke(lease)  # revoking a gone lease is not an error

    other = await client.lease_grant(30)
    await client.put(f"{ns}revoked", b"v", lease=other)
    await client.lease_revoke(other)
    assert await client.get(f"{ns}revoked") is None


async def test_status_names_the_leader(cluster: EtcdCluster, client: EtcdClient) -> None:
    statuses = [await client.status(endpoint) for endpoint in cluster.endpoints]
    assert len({s["member_id"] for s in statuses}) == 3
    assert len({s["leader"] for s in statuses}) == 1
    leader = statuses[0]["leader"]
    assert [s["member_id"] for s in statuses].index(leader) == cluster.leader_index()
    assert all(s["raft_term"] >= 1 and s["version"].startswith("3.") for s in statuses)


# -- watch ------------------------------------------------------------------------------------------------------


async def test_watch_sees_put_and_delete_in_order(client: EtcdClient, ns: str) -> None:
    start = await client.put(f"{ns}before", b"not watched")
    collector = Collector(client, ns, prefix=True, start_revision=start + 1)
    try:
        r1 = await client.put(f"{ns}a", b"1")
        r2 = await client.put(f"{ns}b", b"2")
        r3 = await client.put(f"{ns}a", b"1b")
        assert await client.delete(f"{ns}a") == 1
        await client.put(ns.rstrip("/") + "-sibling", b"outside the prefix")
        r5 = await client.put(f"{ns}b", b"")
        events = await collector.wait_count(5)
    finally:
        await collector.stop()
    got = [(e.type, e.kv.key, e.kv.value, e.kv.mod_revision) for e in events]
    assert got == [
        ("PUT", f"{ns}a", b"1", r1),
        ("PUT", f"{ns}b", b"2", r2),
        ("PUT", f"{ns}a", b"1b", r3),
        ("DELETE", f"{ns}a", b"", r3 + 1),
        ("PUT", f"{ns}b", b"", r5),
    ]
    assert events[2].kv.create_revision == r1 and events[2].kv.version == 2


async def test_watch_from_compacted_revision_raises(cluster: EtcdCluster, client: EtcdClient, ns: str) -> None:
    first = await client.put(f"{ns}k", b"1")
    second = await client.put(f"{ns}k", b"2")
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{cluster.endpoints[0]}/v3/kv/compaction", data=json.dumps({"revision": str(second), "physical": True})
        ) as response,
    ):
        assert response.status == 200, await response.text()

    async def consume() -> None:
        async with aclosing(client.watch(f"{ns}k", start_revision=first)) as events:
            async for _ in events:
                raise AssertionError("an event from a compacted revision")

    with pytest.raises(EtcdError, match=rf"revision {first} was compacted"):
        await asyncio.wait_for(consume(), 5)


async def test_watch_resumes_on_another_member_without_loss_or_repetition(
    tmp_path: Path, make_client: Callable[..., EtcdClient], ns: str
) -> None:
    with EtcdCluster(tmp_path) as cluster:
        leader = cluster.wait_for_leader()
        victim = next(i for i in range(3) if i != leader)  # a follower: writes through the leader never stall
        order = [victim] + [i for i in range(3) if i != victim]
        watcher = make_client([cluster.endpoints[i] for i in order])
        writer = make_client([cluster.endpoints[leader]])
        written: list[tuple[int, bytes]] = []

        async def write(count: int) -> None:
            for _ in range(count):
                value = str(len(written)).encode()
                written.append((await writer.put(f"{ns}k{len(written) % 3}", value), value))

        start = await writer.put(f"{ns}start", b"")
        collector = Collector(watcher, ns, prefix=True, start_revision=start + 1)
        try:
            await write(20)
            await collector.wait_count(20)
            assert watcher.current_endpoint == cluster.endpoints[victim]

            writing = asyncio.create_task(write(150))
            await collector.wait_count(40)
            cluster.kill(victim)
            written_at_kill = len(written)
            await writing
            await write(20)  # after the kill
            assert written_at_kill < len(written) - 20, "the kill did not happen while writing"
            events = await collector.wait_count(len(written))
        finally:
            await collector.stop()
        assert [(e.type, e.kv.mod_revision, e.kv.value) for e in events] == [("PUT", r, v) for r, v in written]
        assert watcher.current_endpoint != cluster.endpoints[victim]


# -- fail-over --------------------------------------------------------------------------------------------------


async def test_client_fails_over_when_the_leader_dies(tmp_path: Path, make_client: Callable[..., EtcdClient]) -> None:
    with EtcdCluster(tmp_path) as cluster:
        leader = cluster.wait_for_leader()
        survivors = [i for i in range(3) if i != leader]
        client = make_client([cluster.endpoints[i] for i in [leader, *survivors]], timeout=1.0)
        for i in range(5):
            await client.put(f"before/{i}", str(i).encode())
        assert client.current_endpoint == cluster.endpoints[leader]

        cluster.kill(leader)
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        deadline = killed_at + 15
        failures: list[EtcdError] = []
        while True:  # an in-flight proposal hangs until the client timeout while the followers elect
            try:
                await client.put("after/0", b"0")
                break
            except EtcdError as exc:
                failures.append(exc)
                assert loop.time() < deadline, f"no write succeeded within 15 s of the leader's death: {failures}"
                await asyncio.sleep(0.05)  # back-off between attempts, not synchronisation
        for i in range(1, 20):
            await client.put(f"after/{i}", str(i).encode())  # no error any more
        assert client.current_endpoint != cluster.endpoints[leader]
        assert [kv.value for kv in (await client.get_prefix("before/"))[1]] == [str(i).encode() for i in range(5)]
        assert len((await client.get_prefix("after/"))[1]) == 20

        for i in survivors:
            cluster.kill(i)
        with pytest.raises(EtcdError) as caught:
            await client.get("before/0")
        for endpoint in cluster.endpoints:
            assert endpoint in str(caught.value)


async def test_all_endpoints_down_raises_naming_every_endpoint(make_client: Callable[..., EtcdClient]) -> None:
    """One endpoint refuses connections, one accepts and never answers: both are named with their reason."""
    silent: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)
        await reader.read()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    try:
        refused = f"http://127.0.0.1:{free_ports(1)[0]}"
        blackhole = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = make_client([refused, blackhole], timeout=0.5)
        with pytest.raises(EtcdError) as caught:
            await client.put("k", b"v")
        message = str(caught.value)
        assert refused in message and blackhole in message and "timed out" in message, message
        assert caught.value.status == 503
        with pytest.raises(EtcdError, match="every endpoint"):
            await client.lease_grant(5)
    finally:
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_silent_member_is_skipped_after_the_timeout(
    cluster: EtcdCluster, make_client: Callable[..., EtcdClient], ns: str
) -> None:
    silent: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)
        await reader.read()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    try:
        blackhole = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = make_client([blackhole, *cluster.endpoints], timeout=0.5)
        revision = await asyncio.wait_for(client.put(f"{ns}k", b"v"), 3)
        assert client.current_endpoint == cluster.endpoints[0]
        got = await asyncio.wait_for(client.get(f"{ns}k"), 0.4)  # sticks to the member that answered
        assert got is not None and got.mod_revision == revision
    finally:
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()


# -- hostile input ----------------------------------------------------------------------------------------------


async def test_nul_bytes_and_a_1_mib_value_round_trip(client: EtcdClient, ns: str) -> None:
    key = f"{ns}nul\0in\0key\0ü"
    value = bytes(range(256)) * 4096  # 1 MiB, every byte value, NULs included
    assert len(value) == 1 << 20
    collector = Collector(client, ns, prefix=True, start_revision=(await client.get_prefix(ns))[0] + 1)
    try:
        revision = await client.put(key, value)
        got = await client.get(key)
        assert got is not None and got.key == key and got.value == value and got.mod_revision == revision
        assert [(kv.key, kv.value) for kv in (await client.get_prefix(ns))[1]] == [(key, value)]
        assert await client.get(f"{ns}nul") is None  # the NUL does not truncate the key
        events = await collector.wait_count(1)
        assert (events[0].kv.key, events[0].kv.value) == (key, value)  # a >1 MiB line in the watch stream
    finally:
        await collector.stop()
    with pytest.raises(EtcdError, match="larger than max"):  # etcd's request limit: refused, not retried
        await client.put(f"{ns}huge", b"x" * (3 << 20))


# -- election ---------------------------------------------------------------------------------------------------


async def test_election_one_wins_the_other_waits_until_resign(
    cluster: EtcdCluster, make_client: Callable[..., EtcdClient], ns: str
) -> None:
    key = f"{ns}control"
    # recheck=60: only the watch can wake the waiting candidate within the deadline below
    first = Election(make_client(cluster.endpoints), key, b"node-1", ttl=TTL, recheck=60)
    second = Election(make_client(cluster.endpoints), key, b"node-2", ttl=TTL, recheck=60)
    epoch1 = await asyncio.wait_for(first.campaign(), 5)
    assert first.epoch == epoch1 and not first.lost.is_set()
    waiting = asyncio.create_task(second.campaign())
    try:
        done, _ = await asyncio.wait({waiting}, timeout=0.5)  # bounded check that it does wait
        assert not done
        holder = await second.leader()
        assert holder is not None and (holder.value, holder.lease, holder.create_revision) == (
            b"node-1",
            first.lease,
            epoch1,
        )

        await first.resign()
        epoch2 = await asyncio.wait_for(waiting, 2)
        assert epoch2 > epoch1
        assert first.lost.is_set() and first.epoch is None
        holder = await first.leader()
        assert holder is not None and (holder.value, holder.lease) == (b"node-2", second.lease)
        assert await second.campaign() == epoch2  # already leader: same epoch
    finally:
        waiting.cancel()
        await second.resign()
    assert await first.leader() is None  # resign deletes the key at once


async def test_election_takeover_when_the_leader_dies(
    cluster: EtcdCluster, make_client: Callable[..., EtcdClient], ns: str
) -> None:
    key = f"{ns}control"
    doomed_client = make_client(cluster.endpoints)
    doomed = Election(doomed_client, key, b"node-1", ttl=TTL)
    heir = Election(make_client(cluster.endpoints), key, b"node-2", ttl=TTL, recheck=60)
    epoch1 = await asyncio.wait_for(doomed.campaign(), 5)
    waiting = asyncio.create_task(heir.campaign())
    try:
        done, _ = await asyncio.wait({waiting}, timeout=0.3)
        assert not done
        loop = asyncio.get_running_loop()
        died_at = loop.time()
        await doomed_client.aclose()  # the leader "dies": no more keep-alives, nothing revoked

        epoch2 = await asyncio.wait_for(waiting, TTL + 3)
        took = loop.time() - died_at
        assert epoch2 > epoch1
        assert took > TTL / 3, f"taken over after {took:.2f} s: the old lease was not in force"
        # the dead leader's own view: etcd unreachable for longer than the TTL, so it stepped down
        await within(1, doomed.lost.wait(), "the dead leader noticing it lost")
        assert doomed.epoch is None
        holder = await heir.leader()
        assert holder is not None and (holder.value, holder.create_revision) == (b"node-2", epoch2)
    finally:
        waiting.cancel()
        await heir.resign()


async def test_election_keeps_its_lease_alive(
    cluster: EtcdCluster, client: EtcdClient, make_client: Callable[..., EtcdClient], ns: str
) -> None:
    key = f"{ns}control"
    ttl = 1
    leader = Election(make_client(cluster.endpoints), key, b"node-1", ttl=ttl)
    epoch = await asyncio.wait_for(leader.campaign(), 5)
    # 2.5 TTLs without the key being deleted: the keep-alive task renews the lease
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(wait_for_delete(client, key, epoch + 1), 2.5 * ttl)
    assert not leader.lost.is_set() and leader.epoch == epoch
    holder = await client.get(key)
    assert holder is not None and (holder.create_revision, holder.lease) == (epoch, leader.lease)
    await leader.resign()


async def test_election_steps_down_at_the_next_keepalive_when_its_lease_is_gone(
    cluster: EtcdCluster, client: EtcdClient, make_client: Callable[..., EtcdClient], ns: str
) -> None:
    key = f"{ns}control"
    ttl = 3
    leader = Election(make_client(cluster.endpoints), key, b"node-1", ttl=ttl)
    epoch = await asyncio.wait_for(leader.campaign(), 5)
    await client.lease_revoke(leader.lease)  # e.g. an operator, or etcd after a long partition
    # the keep-alive answer "lease gone" comes after ttl/3 s; without it, stepping down would take the full ttl
    await within(ttl / 3 + 0.8, leader.lost.wait(), "the leader noticing its lease is gone")
    assert leader.epoch is None
    heir = Election(client, key, b"node-2", ttl=ttl)
    assert await asyncio.wait_for(heir.campaign(), 2) > epoch
    await heir.resign()
    await leader.resign()
