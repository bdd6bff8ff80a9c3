"""Tests for threatgate.cluster.sync: what one node decides, driven with explicit clocks.

Scenarios build small clusters of :class:`ClusterCore` objects and carry heartbeats between them by
hand (``exchange``), so every step is deterministic: no sockets, no sleeps.  The state machine at the
end drives promotions, demotions, heartbeats and settings offers in any order and checks the fencing
rule: a node never takes settings from an epoch older than the highest it has seen.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from threatgate.cluster.settings import SettingsDocument, make_payload
from threatgate.cluster.sync import ClusterCore, Decision, Identity, Member, Role
from threatgate.errors import ClusterError, SettingsRejected, StaleRevision

CLUSTER = "tg-test"
HEARTBEAT = 1.0
FALL = 3
WINDOW = HEARTBEAT * FALL


def member(name: str) -> Member:
    return Member(f"ID-{name}", f"{name}.example:7443", f"-----PEM {name}-----")


def doc(revision: int, epoch: int, cluster: str = CLUSTER, config: str = "<Settings/>\n") -> SettingsDocument:
    return SettingsDocument.create(
        cluster, revision, epoch, 1000.0 + revision, make_payload(config, {"suppliers": [], "tags": []})
    )


def core(
    name: str,
    names: str,
    *,
    role: Role = Role.SECONDARY,
    epoch: int = 1,
    control: str | None = "a",
    applied: SettingsDocument | None = None,
    now: float = 0.0,
) -> ClusterCore:
    """Node ``name`` of a cluster whose members are the letters of ``names``."""
    members = {member(n).node_id: member(n) for n in names}
    identity = Identity(
        cluster_id=CLUSTER,
        node_id=member(name).node_id,
        address=member(name).address,
        role=role,
        epoch=epoch,
        control_id=member(control).node_id if control is not None else None,
        members=members,
    )
    return ClusterCore(identity, applied, heartbeat=HEARTBEAT, fall=FALL, now=now)


def cluster(names: str, control: str = "a", applied: SettingsDocument | None = None) -> dict[str, ClusterCore]:
    """A healthy cluster: ``control`` is the Control at epoch 1, the others follow it."""
    return {
        n: core(n, names, role=Role.CONTROL if n == control else Role.SECONDARY, control=control, applied=applied)
        for n in names
    }


def exchange(nodes: dict[str, ClusterCore], a: str, b: str, now: float) -> tuple[Decision, Decision]:
    """One heartbeat between a and b: each observes the other's status (a's request, b's reply)."""
    da = nodes[b].observe(member(a).node_id, nodes[a].status(now), now)
    db = nodes[a].observe(member(b).node_id, nodes[b].status(now), now)
    return db, da


def mesh(nodes: dict[str, ClusterCore], now: float, names: str | None = None) -> None:
    """Every pair of ``names`` (default: all) exchanges heartbeats, twice so that news travels two hops."""
    names = names or "".join(nodes)
    for _ in range(2):
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                exchange(nodes, a, b, now)


def nid(name: str) -> str:
    return member(name).node_id


def addr(name: str) -> str:
    return member(name).address


# -- emergency mode: no Control ------------------------------------------------------------------------


def test_fresh_secondary_gives_the_control_one_window() -> None:
    b = core("b", "ab", now=100.0)
    assert b.emergency(100.0) is None
    assert b.emergency(100.0 + WINDOW) is None
    reason = b.emergency(100.0 + WINDOW + 0.01)
    assert reason is not None
    assert reason.startswith(f"Control node {addr('a')} unreachable")
    assert "promote" in reason
    assert b.status(100.0 + WINDOW + 0.01)["emergency"] == reason
    assert b.status(100.0)["emergency"] is None


def test_control_that_answered_then_falls_silent() -> None:
    nodes = cluster("ab")
    b = nodes["b"]
    exchange(nodes, "a", "b", 10.0)
    assert b.emergency(10.0 + WINDOW) is None
    b.failed(nid("a"), "connection refused")
    assert b.emergency(10.0 + WINDOW) is None  # one failure inside the window is tolerated
    reason = b.emergency(10.0 + WINDOW + 0.5)
    assert reason is not None and addr("a") in reason and "unreachable" in reason
    assert b.peers[nid("a")].failures == 1 and b.peers[nid("a")].last_error == "connection refused"
    exchange(nodes, "a", "b", 20.0)
    assert b.emergency(20.0) is None
    assert b.peers[nid("a")].failures == 0 and b.peers[nid("a")].last_error is None


def test_control_is_never_in_emergency_for_lack_of_a_control() -> None:
    a = core("a", "abc", role=Role.CONTROL)
    assert a.emergency(1000.0) is None


def test_no_control_known() -> None:
    b = core("b", "ab", control=None)
    reason = b.emergency(0.0)
    assert reason == "no Control node known; promote one (threatgate cluster promote)"


def test_control_that_answers_but_was_demoted_is_no_control() -> None:
    nodes = cluster("abc")
    mesh(nodes, 1.0)
    assert all(n.emergency(1.0) is None for n in nodes.values())
    nodes["a"].demote()
    mesh(nodes, 2.0)
    for name in "abc":
        reason = nodes[name].emergency(2.0)
        assert reason is not None, name
        assert "promote" in reason
    assert addr("a") in (nodes["b"].emergency(2.0) or "")
    assert nodes["a"].emergency(2.0) == "no Control node known; promote one (threatgate cluster promote)"


# -- emergency mode: two Controls ------------------------------------------------------------------------


def split_brain() -> dict[str, ClusterCore]:
    """a was Control at epoch 1 and vanished; b and c were both promoted before hearing of each other."""
    nodes = cluster("abcd", applied=doc(1, 1))
    mesh(nodes, 1.0)
    later = 1.0 + WINDOW + 1.0
    assert nodes["b"].emergency(later) is not None  # a silent for a window: emergency
    assert nodes["b"].promote(nodes["b"].applied) == 2
    assert nodes["c"].promote(nodes["c"].applied) == 2
    return nodes


def test_two_controls_at_one_epoch_put_every_node_in_emergency() -> None:
    nodes = split_brain()
    mesh(nodes, 10.0)
    for name, node in nodes.items():
        reason = node.emergency(10.0)
        assert reason is not None, name
        assert reason.startswith("two Control nodes at epoch 2: ")
        assert addr("b") in reason and addr("c") in reason, reason
        assert "demote one" in reason
    assert nodes["a"].role is Role.SECONDARY and nodes["a"].identity.epoch == 2


@pytest.mark.parametrize("name", ["b", "c"])
def test_both_controls_refuse_writes_in_emergency(name: str) -> None:
    nodes = split_brain()
    mesh(nodes, 10.0)
    with pytest.raises(ClusterError) as excinfo:
        nodes[name].check_write(None, 10.0)
    assert not isinstance(excinfo.value, StaleRevision)
    assert str(excinfo.value).startswith("emergency mode, settings are frozen: two Control nodes at epoch 2")
    assert excinfo.value.status == 409


def test_demoting_one_of_two_controls_ends_the_emergency() -> None:
    nodes = split_brain()
    mesh(nodes, 10.0)
    nodes["c"].demote()
    mesh(nodes, 11.0)
    for name, node in nodes.items():
        assert node.emergency(11.0) is None, name
        assert node.identity.control_id == nid("b"), name
        assert node.control_address == addr("b")
    assert nodes["b"].check_write(None, 11.0) == nodes["b"].applied


# -- fencing ---------------------------------------------------------------------------------------------


def test_control_hearing_a_higher_epoch_steps_down() -> None:
    a = core("a", "abc", role=Role.CONTROL, applied=doc(4, 1))
    assert a.check_write(4, 0.0).revision == 4
    b = core("b", "abc", role=Role.CONTROL, epoch=2, control="b", applied=doc(5, 2))
    b.api_address = "b.example:8443"  # its REST API, told in every heartbeat
    decision = a.observe(nid("b"), b.status(1.0), 1.0)
    assert decision.step_down and decision.persist
    assert decision.push_to is None
    assert a.role is Role.SECONDARY
    assert a.identity.epoch == 2 and a.identity.control_id == nid("b")
    assert decision.pull_from == nid("b")  # b applied revision 5, a only 4
    with pytest.raises(ClusterError) as excinfo:
        a.check_write(4, 1.0)
    assert "this node is a Secondary" in str(excinfo.value)
    assert str(excinfo.value).endswith(
        f"send it to the Control node's REST API at https://b.example:8443 (cluster port {addr('b')})"
    )


def test_stepped_down_control_no_longer_pushes() -> None:
    a = core("a", "abc", role=Role.CONTROL, applied=doc(4, 1))
    c = core("c", "abc", applied=doc(2, 1))
    assert a.observe(nid("c"), c.status(0.0), 0.0).push_to == nid("c")
    b = core("b", "abc", role=Role.CONTROL, epoch=2, control="b", applied=doc(5, 2))
    a.observe(nid("b"), b.status(1.0), 1.0)
    assert a.observe(nid("c"), c.status(1.0), 1.0).push_to is None


def test_higher_epoch_heard_from_a_secondary_also_fences() -> None:
    a = core("a", "abc", role=Role.CONTROL)
    c = core("c", "abc", epoch=3, control="b")
    decision = a.observe(nid("c"), c.status(0.0), 0.0)
    assert decision.step_down and decision.persist
    assert (a.role, a.identity.epoch, a.identity.control_id) == (Role.SECONDARY, 3, nid("b"))


def test_control_taking_a_newer_epoch_document_steps_down() -> None:
    a = core("a", "ab", role=Role.CONTROL, applied=doc(4, 1))
    newer = doc(1, 2)
    assert a.offer(newer, nid("b"), "control") is True
    decision = a.took(newer, nid("b"), "control", 50.0)
    assert decision.step_down and decision.persist
    assert (a.role, a.identity.epoch, a.identity.control_id) == (Role.SECONDARY, 2, nid("b"))
    assert a.received is not None and (a.received.revision, a.received.at) == (1, 50.0)


def test_same_epoch_is_not_a_step_down() -> None:
    a = core("a", "ab", role=Role.CONTROL)
    b = core("b", "ab")
    decision = a.observe(nid("b"), b.status(0.0), 0.0)
    assert not decision.step_down and not decision.persist
    assert a.role is Role.CONTROL


def test_observing_a_stranger_changes_nothing() -> None:
    b = core("b", "ab")
    stranger = {"role": "control", "epoch": 99, "applied": {"revision": 50}}
    assert b.observe("ID-zz", stranger, 0.0) == Decision()
    assert b.identity.epoch == 1 and b.identity.control_id == nid("a")


# -- offers ----------------------------------------------------------------------------------------------


def secondary_at_epoch_3() -> ClusterCore:
    return core("b", "abc", epoch=3, applied=doc(5, 3))


def test_offer_refuses_an_older_epoch() -> None:
    b = secondary_at_epoch_3()
    with pytest.raises(SettingsRejected) as excinfo:
        b.offer(doc(9, 2), nid("a"), "control")
    assert excinfo.value.status == 409
    assert excinfo.value.revision == 9
    assert "epoch 2 is older than 3" in excinfo.value.detail


def test_offer_refuses_another_cluster() -> None:
    b = secondary_at_epoch_3()
    with pytest.raises(SettingsRejected) as excinfo:
        b.offer(doc(9, 3, cluster="tg-other"), nid("a"), "control")
    assert excinfo.value.status == 409
    assert "'tg-other'" in excinfo.value.detail and f"{CLUSTER!r}" in excinfo.value.detail


@pytest.mark.parametrize(("revision", "epoch"), [(5, 3), (4, 3), (1, 3)])
def test_offer_of_what_we_hold_or_older_is_false(revision: int, epoch: int) -> None:
    assert secondary_at_epoch_3().offer(doc(revision, epoch), nid("a"), "control") is False


@pytest.mark.parametrize(("revision", "epoch"), [(6, 3), (1, 4), (100, 4)])
def test_offer_of_a_newer_version_is_true(revision: int, epoch: int) -> None:
    assert secondary_at_epoch_3().offer(doc(revision, epoch), nid("a"), "control") is True


def test_offer_without_applied_settings() -> None:
    b = core("b", "ab", epoch=2)
    assert b.offer(doc(1, 2), nid("a"), "control") is True
    with pytest.raises(SettingsRejected):
        b.offer(doc(1, 1), nid("a"), "control")


def test_control_refuses_another_nodes_document_of_its_own_epoch() -> None:
    a = core("a", "ab", role=Role.CONTROL, epoch=3, applied=doc(5, 3))
    with pytest.raises(SettingsRejected) as excinfo:
        a.offer(doc(6, 3), nid("b"), "control")
    assert excinfo.value.status == 409
    assert "this node is the Control of epoch 3" in excinfo.value.detail
    assert a.offer(doc(6, 3), nid("a"), "control") is True


def test_took_then_applied_ok_records_the_marks() -> None:
    b = core("b", "ab", applied=doc(1, 1))
    new = doc(2, 1)
    assert b.offer(new, nid("a"), "control")
    b.took(new, nid("a"), "control", 70.0)
    b.apply_failed(new, "feed file x does not exist")
    assert b.status(0.0)["error"] == "revision 2 not applied: feed file x does not exist"
    assert b.status(0.0)["received"] == {"revision": 2, "at": 70.0, "sha256": new.sha256}
    assert b.status(0.0)["applied"]["revision"] == 1
    b.applied_ok(new, 71.0)
    st_ = b.status(0.0)
    assert st_["applied"] == {"revision": 2, "at": 71.0, "sha256": new.sha256}
    assert st_["error"] is None
    assert b.offer(new, nid("a"), "control") is False


def test_took_from_a_control_adopts_it() -> None:
    b = core("b", "abc", control=None)
    decision = b.took(doc(1, 1), nid("c"), "control", 1.0)
    assert decision.persist and b.identity.control_id == nid("c")


# -- pull and push -----------------------------------------------------------------------------------------


def test_secondary_pulls_when_the_control_applied_more() -> None:
    nodes = cluster("ab", applied=doc(2, 1))
    a, b = nodes["a"], nodes["b"]
    assert exchange(nodes, "a", "b", 0.0)[1].pull_from is None
    a.applied_ok(doc(3, 1), 1.0)
    da, db = exchange(nodes, "a", "b", 1.0)
    assert db.pull_from == nid("a")
    assert da.push_to == nid("b")
    assert da.pull_from is None and db.push_to is None
    b.applied_ok(doc(3, 1), 2.0)
    da, db = exchange(nodes, "a", "b", 2.0)
    assert db.pull_from is None and da.push_to is None


def test_secondary_pulls_only_from_its_control() -> None:
    nodes = cluster("abc", applied=doc(2, 1))
    nodes["c"].applied_ok(doc(3, 1), 0.0)  # a secondary ahead (say it was pushed first)
    _, db = exchange(nodes, "c", "b", 0.0)
    assert db.pull_from is None


def test_secondary_pulls_from_a_control_of_a_higher_epoch() -> None:
    b = core("b", "abc", applied=doc(5, 1))
    c = core("c", "abc", role=Role.CONTROL, epoch=2, control="c", applied=doc(6, 2))
    decision = b.observe(nid("c"), c.status(0.0), 0.0)
    assert decision.persist and decision.pull_from == nid("c")
    assert (b.identity.epoch, b.identity.control_id) == (2, nid("c"))


def test_control_pushes_to_a_secondary_with_nothing() -> None:
    a = core("a", "ab", role=Role.CONTROL, applied=doc(1, 1))
    b = core("b", "ab")
    assert a.observe(nid("b"), b.status(0.0), 0.0).push_to == nid("b")


def test_control_does_not_push_to_a_peer_ahead_or_to_a_control() -> None:
    a = core("a", "abc", role=Role.CONTROL, applied=doc(3, 1))
    ahead = core("b", "abc", applied=doc(4, 1))
    assert a.observe(nid("b"), ahead.status(0.0), 0.0).push_to is None
    other = core("c", "abc", role=Role.CONTROL, control="c", applied=doc(1, 1))
    assert a.observe(nid("c"), other.status(0.0), 0.0).push_to is None


def test_a_refused_revision_is_neither_pulled_nor_pushed_again() -> None:
    """A Secondary that refused r3 (invalid for it) must not loop: no re-pull, no re-push, until r4."""
    nodes = cluster("ab", applied=doc(2, 1))
    a, b = nodes["a"], nodes["b"]
    a.applied_ok(doc(3, 1), 1.0)
    b.took(doc(3, 1), nid("a"), "control", 1.0)
    b.apply_failed(doc(3, 1), "feed file missing")
    da, db = exchange(nodes, "a", "b", 2.0)
    assert db.pull_from is None and da.push_to is None
    assert b.status(2.0)["error"] == "revision 3 not applied: feed file missing"
    a.applied_ok(doc(4, 1), 3.0)
    da, db = exchange(nodes, "a", "b", 3.0)
    assert db.pull_from == nid("a") and da.push_to == nid("b")


def test_a_different_document_of_a_refused_revision_number_is_still_taken() -> None:
    """Refusing a forged r3 must not block the Control's genuine r3 (remembered by digest, not number)."""
    nodes = cluster("ab", applied=doc(2, 1))
    a, b = nodes["a"], nodes["b"]
    forged = doc(3, 1, config="<Settings><Feeds/></Settings>\n")
    b.took(forged, nid("a"), "control", 1.0)
    b.apply_failed(forged, "invalid")
    a.applied_ok(doc(3, 1), 1.0)
    da, db = exchange(nodes, "a", "b", 2.0)
    assert db.pull_from == nid("a") and da.push_to == nid("b")


# -- membership ----------------------------------------------------------------------------------------------


def test_secondary_adopts_the_controls_member_list() -> None:
    nodes = cluster("ab")
    a, b = nodes["a"], nodes["b"]
    a.add_member(member("c"))
    assert a.identity.members_version == 2
    assert nid("c") in a.peers
    status = a.status(0.0)
    assert {m["node_id"] for m in status["members"]} == {nid("a"), nid("b"), nid("c")}
    decision = b.observe(nid("a"), status, 0.0)
    assert decision.persist
    assert decision.new_members == [member("c")]
    assert set(b.identity.members) == {nid("a"), nid("b"), nid("c")}
    assert b.identity.members_version == 2
    assert set(b.peers) == {nid("a"), nid("c")}
    assert b.observe(nid("a"), a.status(1.0), 1.0).new_members == []  # same version: nothing new


def test_members_are_adopted_only_from_the_followed_control() -> None:
    a = core("a", "abc", role=Role.CONTROL)
    b = core("b", "abc")
    b.observe(nid("a"), a.status(0.0), 0.0)
    rogue = core("c", "abc", role=Role.CONTROL, control="c")
    rogue.add_member(member("d"))
    decision = b.observe(nid("c"), rogue.status(0.0), 0.0)
    assert decision.new_members == [] and not decision.persist
    assert nid("d") not in b.identity.members
    assert b.identity.control_id == nid("a")  # a answers as Control: b keeps following it
    assert (b.emergency(0.0) or "").startswith("two Control nodes at epoch 1")


def test_secondary_whose_control_is_silent_follows_a_control_of_its_epoch() -> None:
    b = core("b", "abc")
    c = core("c", "abc", role=Role.CONTROL, control="c")
    c.add_member(member("d"))
    decision = b.observe(nid("c"), c.status(0.0), 0.0)  # a never answered
    assert decision.persist
    assert b.identity.control_id == nid("c")
    assert decision.new_members == [member("d")]
    assert b.emergency(0.0) is None


def test_secondary_status_carries_no_member_list() -> None:
    assert "members" not in core("b", "ab").status(0.0)


def test_removed_from_the_cluster() -> None:
    nodes = cluster("abc")
    a, b = nodes["a"], nodes["b"]
    a.remove_member(nid("b"))
    decision = b.observe(nid("a"), a.status(0.0), 0.0)
    assert not decision.persist and decision.new_members == []
    assert b.last_error is not None and "removed from the cluster" in b.last_error
    assert b.status(0.0)["error"] == b.last_error
    assert set(b.identity.members) == {nid("a"), nid("b"), nid("c")}
    assert b.identity.members_version == 1


def test_secondary_cannot_change_members() -> None:
    b = core("b", "abc")
    with pytest.raises(ClusterError) as excinfo:
        b.add_member(member("d"))
    assert str(excinfo.value) == (
        "cannot add a member: this node is a Secondary; settings change only on the Control "
        f"(the Control node's cluster port is {addr('a')}; its REST API address is not known yet)"
    )
    with pytest.raises(ClusterError, match="cannot remove a member: this node is a Secondary"):
        b.remove_member(nid("c"))
    assert set(b.identity.members) == {nid("a"), nid("b"), nid("c")}


def test_a_secondary_refusing_a_write_names_the_controls_rest_api() -> None:
    """The 409 a Secondary answers a REST write says where to send it: the Control's API address, which
    the Control reports in its heartbeats (not only its cluster port, which speaks another protocol)."""
    nodes = cluster("ab")
    nodes["a"].api_address = "10.0.0.1:8443"
    nodes["b"].api_address = "10.0.0.2:8443"
    assert nodes["b"].control_api is None  # nothing heard yet
    mesh(nodes, 1.0)
    assert nodes["b"].control_api == "10.0.0.1:8443" and nodes["a"].control_api == "10.0.0.1:8443"
    with pytest.raises(ClusterError) as excinfo:
        nodes["b"].check_write(None, 1.0)
    assert excinfo.value.status == 409
    assert str(excinfo.value) == (
        "cannot change settings: this node is a Secondary; settings change only on the Control: send it to the "
        f"Control node's REST API at https://10.0.0.1:8443 (cluster port {addr('a')})"
    )


def test_control_cannot_remove_itself() -> None:
    a = core("a", "ab", role=Role.CONTROL)
    with pytest.raises(ClusterError, match="this node is the Control node: demote it"):
        a.remove_member(nid("a"))
    assert nid("a") in a.identity.members


def test_remove_unknown_member_is_404() -> None:
    a = core("a", "ab", role=Role.CONTROL)
    with pytest.raises(ClusterError) as excinfo:
        a.remove_member("ID-nobody")
    assert excinfo.value.status == 404
    assert a.identity.members_version == 1


def test_a_member_claiming_control_cannot_be_removed() -> None:
    a = core("a", "abc", role=Role.CONTROL)
    c = core("c", "abc", role=Role.CONTROL, control="c")
    a.observe(nid("c"), c.status(0.0), 0.0)
    with pytest.raises(ClusterError) as excinfo:
        a.remove_member(nid("c"))
    assert str(excinfo.value) == f"{addr('c')} reports the Control role: demote it before removing it"
    assert nid("c") in a.identity.members
    c.demote()
    a.observe(nid("c"), c.status(1.0), 1.0)
    assert a.remove_member(nid("c")) == member("c")
    assert nid("c") not in a.identity.members and nid("c") not in a.peers
    assert a.identity.members_version == 2


def test_add_member_replaces_an_address() -> None:
    a = core("a", "ab", role=Role.CONTROL)
    moved = Member(nid("b"), "b.elsewhere:7443", "-----PEM b2-----")
    a.add_member(moved)
    assert a.identity.members[nid("b")] == moved
    assert a.peers[nid("b")].address == "b.elsewhere:7443"


# -- writes, promotion, demotion ----------------------------------------------------------------------------------


def test_check_write_rules() -> None:
    a = core("a", "ab", role=Role.CONTROL)
    with pytest.raises(ClusterError) as excinfo:
        a.check_write(None, 0.0)
    assert excinfo.value.status == 503 and "holds no settings" in str(excinfo.value)
    a.applied_ok(doc(4, 1), 0.0)
    assert a.check_write(None, 0.0).revision == 4
    assert a.check_write(4, 0.0).revision == 4
    with pytest.raises(StaleRevision) as stale:
        a.check_write(3, 0.0)
    assert (stale.value.base, stale.value.current, stale.value.status) == (3, 4, 409)
    assert "based on revision 3, current is 4" in str(stale.value)


def test_promote_goes_above_every_epoch_heard_of() -> None:
    b = core("b", "abcd", epoch=2)
    c = core("c", "abcd", role=Role.CONTROL, epoch=4, control="c")
    b.observe(nid("c"), c.status(0.0), 0.0)
    c.demote()
    b.observe(nid("c"), c.status(1.0), 1.0)
    assert b.promote(None) == 5
    assert (b.role, b.identity.control_id, b.identity.epoch) == (Role.CONTROL, nid("b"), 5)
    assert b.emergency(1.0) is None


def test_promote_goes_above_the_newest_document() -> None:
    b = core("b", "ab", epoch=2)
    assert b.promote(doc(9, 7)) == 8


def test_promote_twice_is_refused() -> None:
    b = core("b", "ab")
    b.promote(None)
    with pytest.raises(ClusterError, match="already the Control node"):
        b.promote(None)
    assert b.identity.epoch == 2


def test_demote() -> None:
    a = core("a", "ab", role=Role.CONTROL, epoch=3, applied=doc(2, 3))
    a.demote()
    assert (a.role, a.identity.control_id, a.identity.epoch) == (Role.SECONDARY, None, 3)
    with pytest.raises(ClusterError, match="is a Secondary"):
        a.check_write(None, 0.0)
    with pytest.raises(ClusterError, match="not the Control node"):
        a.demote()
    assert a.offer(doc(3, 3), nid("b"), "control") is True  # a Secondary takes its epoch's settings again


# -- fencing under any interleaving ------------------------------------------------------------------------------

NAMES = "abc"


class FencingMachine(RuleBasedStateMachine):
    """Three nodes; promotions, demotions, heartbeats, failures, time and offers in any order.

    ``seen[n]`` is the highest epoch node n has been told of: its own promotions, the statuses it
    observed, the documents it took.  The fencing rule: an offer below it is refused (409), and no
    offer below it ever returns True.
    """

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, ClusterCore] = {}
        self.seen: dict[str, int] = {}
        self.last_applied: dict[str, tuple[int, int]] = {}
        self.now = 0.0

    @initialize()
    def start(self) -> None:
        self.nodes = cluster(NAMES, applied=doc(1, 1))
        self.seen = dict.fromkeys(NAMES, 1)

    @rule(n=st.sampled_from(NAMES))
    def promote(self, n: str) -> None:
        node = self.nodes[n]
        if node.role is Role.CONTROL:
            with pytest.raises(ClusterError):
                node.promote(None)
            return
        epoch = node.promote(node.applied)
        assert epoch > self.seen[n]
        self.seen[n] = epoch

    @rule(n=st.sampled_from(NAMES))
    def demote(self, n: str) -> None:
        node = self.nodes[n]
        if node.role is Role.CONTROL:
            node.demote()
        else:
            with pytest.raises(ClusterError):
                node.demote()

    @rule(a=st.sampled_from(NAMES), b=st.sampled_from(NAMES))
    def heartbeat(self, a: str, b: str) -> None:
        if a == b:
            return
        status = self.nodes[b].status(self.now)
        was_control = self.nodes[a].role is Role.CONTROL
        decision = self.nodes[a].observe(nid(b), status, self.now)
        if status["epoch"] > self.seen[a]:
            assert decision.persist
            assert decision.step_down == was_control
        else:
            assert not decision.step_down
        self.seen[a] = max(self.seen[a], status["epoch"])
        if self.nodes[a].role is Role.CONTROL:
            assert decision.pull_from is None

    @rule(a=st.sampled_from(NAMES), b=st.sampled_from(NAMES))
    def failure(self, a: str, b: str) -> None:
        self.nodes[a].failed(nid(b), "timed out")

    @rule(dt=st.floats(0.0, 2 * WINDOW))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(
        n=st.sampled_from(NAMES),
        sender=st.sampled_from(NAMES),
        epoch=st.integers(1, 8),
        revision=st.integers(1, 8),
        sender_role=st.sampled_from(["control", "secondary"]),
    )
    def offer(self, n: str, sender: str, epoch: int, revision: int, sender_role: str) -> None:
        node = self.nodes[n]
        document = doc(revision, epoch)
        try:
            accepted = node.offer(document, nid(sender), sender_role)
        except SettingsRejected as exc:
            assert exc.status == 409
            own_epoch = node.role is Role.CONTROL and epoch == node.identity.epoch and sender != n
            assert epoch < self.seen[n] or own_epoch, (epoch, self.seen[n])
            return
        assert epoch >= self.seen[n], "took settings from an epoch older than one it has seen"
        if not accepted:
            assert node.applied is not None and document.version <= node.applied.version
            return
        was_control = node.role is Role.CONTROL
        decision = node.took(document, nid(sender), sender_role, self.now)
        assert decision.step_down == (was_control and epoch > self.seen[n])
        self.seen[n] = max(self.seen[n], epoch)
        node.applied_ok(document, self.now)

    @invariant()
    def epoch_is_the_highest_seen(self) -> None:
        for n, node in self.nodes.items():
            assert node.identity.epoch == self.seen[n], n

    @invariant()
    def applied_never_goes_back(self) -> None:
        for n, node in self.nodes.items():
            assert node.applied is not None
            assert node.applied.epoch <= node.identity.epoch
            assert node.applied.version >= self.last_applied.get(n, (0, 0)), n
            self.last_applied[n] = node.applied.version

    @invariant()
    def controls_know_their_epoch(self) -> None:
        for n, node in self.nodes.items():
            if node.role is Role.CONTROL:
                assert node.identity.control_id == nid(n)
                reason = node.emergency(self.now)
                assert reason is None or reason.startswith("two Control nodes at epoch "), reason


FencingMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
test_fencing_under_any_interleaving = FencingMachine.TestCase


# -- a new Control: promotion and etcd election decisions ------------------------------------------------------


def test_a_new_control_publishes_the_newest_settings_as_the_next_revision() -> None:
    node = core("b", "abc", applied=doc(5, 1))
    assert node.newest_of([None]) == doc(5, 1)
    assert node.newest_of([doc(4, 1), None]) == doc(5, 1)  # older than what it applied
    newer = doc(7, 1)
    assert node.newest_of([newer]) == newer
    published = node.next_document(newer, epoch=2, wall=2000.0)
    assert (published.revision, published.epoch, published.payload) == (8, 2, newer.payload)
    # Never below a revision this node applied, even when publishing an older document's content.
    assert node.next_document(doc(3, 1), epoch=2, wall=2000.0).revision == 6
    assert core("b", "abc").newest_of([None]) is None


def test_etcd_naming_another_control_at_a_newer_epoch_is_followed_and_fences_us() -> None:
    ctl = core("a", "abc", role=Role.CONTROL, epoch=3)
    assert ctl.etcd_control(None, 9) == Decision()  # an election under way: nothing yet
    assert ctl.etcd_control(member("a").node_id, 9) == Decision()  # ourselves
    assert ctl.etcd_control(member("b").node_id, 3) == Decision()  # not newer
    assert ctl.identity.role is Role.CONTROL
    decision = ctl.etcd_control(member("b").node_id, 4)
    assert decision == Decision(step_down=True, persist=True)
    assert (ctl.identity.role, ctl.identity.epoch, ctl.identity.control_id) == (Role.SECONDARY, 4, member("b").node_id)
    follower = core("c", "abc", epoch=3)
    assert follower.etcd_control(member("b").node_id, 4) == Decision(persist=True)


def test_an_election_at_an_epoch_already_seen_is_refused_and_the_role_waits_for_the_publish() -> None:
    node = core("b", "abc", epoch=5)
    with pytest.raises(ClusterError, match="elected at epoch 5, but epoch 5 was already seen"):
        node.check_elected(5)
    node.check_elected(6)
    assert node.identity.role is Role.SECONDARY  # not before the settings are published
    node.elected(6)
    assert (node.identity.role, node.identity.epoch, node.identity.control_id) == (Role.CONTROL, 6, member("b").node_id)
