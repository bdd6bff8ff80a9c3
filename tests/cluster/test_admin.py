"""cluster/admin.py: ``threatgate cluster init|join|status`` and calls to the local node, without a cluster.

``init`` is offline; ``join`` is exercised against a stand-in Control on 127.0.0.1 port 0 (TLS with a
certificate the joiner pins by fingerprint).  What must hold: a node that already belongs to a cluster
refuses both; a join refused by, or never reaching, the Control leaves nothing behind when it made the
state directory (and keeps the key pair when the Control may have recorded it); a joined node is a
Secondary with the Control's identity; the status table flags this node, a differing digest and
emergency mode.  A real cluster: tests/integration/test_cluster.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from threatgate.cluster import admin
from threatgate.cluster.state import StateDir
from threatgate.cluster.sync import Identity, Member, Role
from threatgate.config.common import Address
from threatgate.config.node import ClusterSettings, NodeConfig, load_node_config
from threatgate.errors import ClusterError
from threatgate.net.tls import ensure_server_pair, fingerprint_sha256, server_context

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def example() -> NodeConfig:
    return load_node_config(str(EXAMPLES / "node.conf"))


def with_cluster(config: NodeConfig, state_dir: Path, host: str = "0.0.0.0") -> NodeConfig:
    return config.model_copy(
        update={"cluster": ClusterSettings(listen=Address(host, 9443), state_dir=str(state_dir)), "path": config.path}
    )


def refused(status: int) -> Any:
    return pytest.raises(ClusterError, check=lambda exc: exc.status == status)


@pytest.mark.parametrize(
    ("host", "bound", "address"),
    [("0.0.0.0", None, "127.0.0.1:9443"), ("::", None, "127.0.0.1:9443"), ("10.0.0.5", None, "10.0.0.5:9443")],
)
def test_the_local_address_of_a_wildcard_listen_is_loopback(host: str, bound: str | None, address: str) -> None:
    settings = ClusterSettings(listen=Address(host, 9443), state_dir="/x")
    assert admin._address(settings, bound) == address
    assert admin._address(settings, "::1") == "[::1]:9443"


def test_init_makes_this_node_the_control_of_a_new_cluster_once(example: NodeConfig, tmp_path: Path) -> None:
    config = with_cluster(example, tmp_path / "state")
    identity = admin.init(config, None, None)
    assert identity.cluster_id.startswith("tg-") and len(identity.cluster_id) == 15
    assert (identity.role, identity.epoch, identity.control_id) == (Role.CONTROL, 1, identity.node_id)
    assert identity.address == "127.0.0.1:9443" and list(identity.members) == [identity.node_id]
    state = StateDir(str(tmp_path / "state"), 20)
    assert identity.node_id == fingerprint_sha256(state.cert_pem().encode())
    assert state.load_identity() == identity
    with refused(409):
        admin.init(config, "again", None)
    named = admin.init(with_cluster(example, tmp_path / "other"), "tg-prod", "tg1.example:9443")
    assert (named.cluster_id, named.address) == ("tg-prod", "tg1.example:9443")


def test_a_node_without_a_cluster_element_is_told_so(example: NodeConfig) -> None:
    with pytest.raises(ClusterError, match="has no <Cluster> element") as caught:
        admin.init(example, None, None)
    assert caught.value.status == 400


class Control:
    """A stand-in Control's join endpoint: ``answer`` builds the reply from the joiner's request body."""

    def __init__(self, answer: Callable[[dict[str, Any]], web.Response]) -> None:
        self.answer = answer
        self.fingerprint = ""
        self.address = ""
        self.asked = 0

    async def join(self, request: web.Request) -> web.Response:
        self.asked += 1
        return self.answer(await request.json())


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[[Control], Any]]:
    pair = ensure_server_pair(
        str(tmp_path / "control.pem"), str(tmp_path / "control.key"), common_name="control", hosts=["127.0.0.1"]
    )
    runners: list[web.AppRunner] = []

    async def start(control: Control) -> Control:
        app = web.Application()
        app.router.add_post("/cluster/v1/join", control.join)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(pair.cert_path, pair.key_path)).start()
        host, port = runner.addresses[0][:2]
        control.address, control.fingerprint = f"{host}:{port}", pair.fingerprint_sha256
        return control

    yield start
    for runner in runners:
        await runner.cleanup()


def welcomed(body: dict[str, Any]) -> web.Response:
    """What a Control answers a good join: the cluster's identity, with the joiner as a member."""
    joiner = Member(fingerprint_sha256(body["cert_pem"].encode()), body["address"], body["cert_pem"])
    identity = Identity("tg-test", joiner.node_id, joiner.address, Role.CONTROL, 3, "C" * 8, {joiner.node_id: joiner})
    return web.json_response({"identity": identity.as_json(), "settings": None})


async def test_a_join_makes_a_secondary_with_the_controls_identity(
    example: NodeConfig, tmp_path: Path, serve: Any
) -> None:
    control = await serve(Control(welcomed))
    config = with_cluster(example, tmp_path / "state")
    identity = await admin.join(config, control.address, "token", control.fingerprint, "me.example:9443")
    assert (identity.cluster_id, identity.role, identity.epoch, identity.address) == (
        "tg-test",
        Role.SECONDARY,
        3,
        "me.example:9443",
    )
    assert StateDir(str(tmp_path / "state"), 20).load_identity() == identity
    with refused(409):  # already a member: nothing is asked
        await admin.join(config, control.address, "token", control.fingerprint, None)
    assert control.asked == 1


async def test_a_join_refused_by_the_control_leaves_nothing_behind(
    example: NodeConfig, tmp_path: Path, serve: Any
) -> None:
    control = await serve(Control(lambda body: web.json_response({"error": "token expired"}, status=403)))
    with pytest.raises(ClusterError, match=r"the Control refused the join \(403\): token expired") as caught:
        await admin.join(with_cluster(example, tmp_path / "state"), control.address, "t", control.fingerprint, None)
    assert caught.value.status == 403
    assert not (tmp_path / "state").exists()
    (tmp_path / "made").mkdir()  # a directory the operator made is kept, pair and all
    with refused(403):
        await admin.join(with_cluster(example, tmp_path / "made"), control.address, "t", control.fingerprint, None)
    assert has_pair(tmp_path / "made")


async def test_a_control_with_another_certificate_is_refused_and_nothing_is_sent(
    example: NodeConfig, tmp_path: Path, serve: Any
) -> None:
    control = await serve(Control(welcomed))
    other = "AA:" * 31 + "AA"
    with pytest.raises(ClusterError, match="not the one given: refusing to join") as caught:
        await admin.join(with_cluster(example, tmp_path / "state"), control.address, "t", other, None)
    assert caught.value.status == 403 and control.asked == 0
    assert not (tmp_path / "state").exists()


async def test_a_control_that_cannot_be_reached_keeps_the_pair_it_may_have_recorded(
    example: NodeConfig, tmp_path: Path
) -> None:
    (tmp_path / "state").mkdir()
    config = with_cluster(example, tmp_path / "state")
    with pytest.raises(ClusterError, match="cannot reach the Control at 127.0.0.1:1: ") as caught:
        await admin.join(config, "127.0.0.1:1", "t", "AA:" * 31 + "AA", None)
    assert caught.value.status == 503
    assert has_pair(tmp_path / "state")
    assert not StateDir(str(tmp_path / "state"), 20).exists()


async def test_a_fingerprint_that_is_not_hex_is_refused_before_anything_is_made(
    example: NodeConfig, tmp_path: Path
) -> None:
    with refused(400):
        await admin.join(with_cluster(example, tmp_path / "state"), "127.0.0.1:1", "t", "not-hex", None)
    assert not (tmp_path / "state").exists()


def has_pair(state_dir: Path) -> bool:
    return Path(StateDir(str(state_dir), 20).cert_path).is_file()


def test_the_local_node_needs_an_identity_and_says_when_it_does_not_answer(example: NodeConfig, tmp_path: Path) -> None:
    config = with_cluster(example, tmp_path / "state", host="127.0.0.1")
    with pytest.raises(ClusterError, match="not a cluster member yet"):
        admin.LocalNode(config)
    admin.init(config, None, None)
    local = admin.LocalNode(config)
    assert local.address == "127.0.0.1:9443" and local.timeout == 30.0
    local.address = "127.0.0.1:1"
    with pytest.raises(ClusterError, match="the node's cluster port does not answer .*; is the node running") as caught:
        local.run("GET", "/cluster/v1/status")
    assert caught.value.status == 503


def row(address: str, **fields: Any) -> dict[str, Any]:
    return {"address": address, "role": "secondary", "epoch": 2, "reachable": True, "seen_ago": 1, **fields}


def test_the_status_table_flags_this_node_a_differing_digest_and_emergency_mode() -> None:
    applied = {"revision": 4, "at": None, "sha256": "a" * 64}
    table = {
        "self": row("10.0.0.1:9443", role="control", control_state="ok", applied=applied, emergency="etcd lost"),
        "members": [
            row("10.0.0.3:9443", reachable=False, link_error="connection refused"),
            row("10.0.0.2:9443", applied={**applied, "sha256": "b" * 64}, received={"revision": 5}),
        ],
    }
    lines = admin.status_table(table).splitlines()
    assert lines[0].split() == ["ADDRESS", "ROLE", "EPOCH", "CONTROL", "SYNCHRONIZED", "APPLIED", "DIGEST", "STATE"]
    assert lines[1].split()[:3] == ["*!E", "10.0.0.1:9443", "control"] and lines[1].endswith("control link: ok")
    assert lines[2].split()[:2] == ["!", "10.0.0.2:9443"] and "r5 -" in lines[2] and "bbbbbbbbbbbb" in lines[2]
    assert lines[3].split()[0] == "10.0.0.3:9443" and lines[3].endswith("UNREACHABLE: connection refused")
    agreeing = {"self": row("n1", control_state="ok", applied=applied), "members": [row("n2", applied=applied)]}
    assert [line.split()[0] for line in admin.status_table(agreeing).splitlines()[1:3]] == ["*", "n2"]
    assert lines[-2:] == [
        "* this node;  ! applied digest differs from another node;  E emergency mode",
        "EMERGENCY MODE: etcd lost (matching continues; settings are frozen)",
    ]
