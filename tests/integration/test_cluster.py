"""The embedded Control/Secondary cluster: real ``threatgate node`` processes, real sockets, real mTLS.

Administration goes through ``python -m threatgate cluster ...`` child processes, as an operator would
run it; the cluster port is also attacked directly (forged documents, foreign and missing certificates).
Most tests share one three-node cluster and leave it healthy (each starts from whatever revision is
current); the test that kills the Control builds its own.  Waiting is always on an event: a log line,
or a status polled with a deadline.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_nodes import (
    CLUSTER_ID,
    FEED_URL,
    FLAGS,
    SYNC_TIMEOUT,
    ClusterNode,
    cli_all,
    cluster_call,
    committed,
    event_format,
    feed_detection,
    histories,
    parse_token,
    same_applied_revision,
    settled,
    statuses,
    three_node_cluster,
    wait_applied,
)
from tests.helpers import HTTPReply, basic_auth, read_lines, wait_until
from threatgate.cluster.settings import SettingsDocument, extract_settings
from threatgate.config.xml import read_xml
from threatgate.net.tls import ensure_server_pair
from threatgate.node.auth import hash_password

USER, PASSWORD = "analyst", "cluster test password"
INDICATORS = "/api/1.1/suppliers/InternalTI/indicators"


def applied_lines(log: str) -> list[tuple[int, int]]:
    """(epoch, revision) of every "settings ... applied" line of a node log, in order."""
    return [
        (int(e), int(r)) for r, e in re.findall(r"settings revision (\d+) \(epoch (\d+), sha256 \w+\) applied", log)
    ]


def put_indicators(node: ClusterNode, indicators: list[str], if_match: str | None = None) -> HTTPReply:
    headers = {"Authorization": basic_auth(USER, PASSWORD)}
    if if_match is not None:
        headers["If-Match"] = if_match
    body = [{"indicator": i, "context": {"note": "cluster test"}} for i in indicators]
    return node.api().request("PUT", INDICATORS, body, headers=headers)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ClusterNode]]:
    """n1 (Control), n2, n3: the API user is configured on n1 only and reaches the others as settings.

    n2 runs two worker processes: every settings revision, REST write and user change must reach both
    (its detections are asked on a new connection each time, which the master gives to either worker).
    """
    user = f'<User name="{USER}" password_hash="{hash_password(PASSWORD)}"/>'
    with three_node_cluster(tmp_path_factory.mktemp("cluster"), users=user, workers=(1, 2, 1)) as nodes:
        yield nodes


# -- propagation ------------------------------------------------------------------------------------------


def test_a_change_on_the_control_is_applied_on_every_secondary_within_two_seconds(cluster: list[ClusterNode]) -> None:
    n1, n2, n3 = cluster
    revision, _ = settled(cluster)
    marker = f"MARK{secrets.token_hex(4)}"
    assert not any(marker in d for d in n2.detections())
    # An event connection opened before the change stays open through it (settings apply in place).
    held = socket.create_connection(("127.0.0.1", n2.port), timeout=10)
    held.sendall(FLAGS + f"5 url={FEED_URL}\n".encode())
    before = read_lines(held, 2)
    assert before[-1] == "5 LookupFinished" and marker not in before[0], before

    out = n1.cli_ok("settings", "set", "--base", str(revision), "OutputSettings/EventFormat", event_format(marker))
    returned = time.monotonic()
    new, epoch, digest = committed(out)
    assert (new, epoch) == (revision + 1, 1)
    # /readyz is each node's own applied revision and digest, cheap enough to poll every 20 ms.
    wait_until(
        lambda: all(n.readyz()["revision"] == new for n in (n2, n3)), f"revision {new} on n2 and n3", SYNC_TIMEOUT
    )
    elapsed = time.monotonic() - returned
    assert elapsed < 2.0, f"the secondaries applied revision {new} {elapsed:.2f} s after the command returned"

    for node, table in zip(cluster, statuses(cluster), strict=True):
        me = table["self"]
        assert me["applied"]["revision"] == new and me["applied"]["sha256"] == digest, (node, me)
        assert me["received"]["revision"] == new and me["error"] is None, (node, me)
        assert node.readyz()["sha256"] == digest
    # The Control learns from the heartbeats that both secondaries hold the same digest.
    wait_until(
        lambda: all((m["applied"]["revision"], m["applied"]["sha256"]) == (new, digest) for m in n1.table()["members"]),
        "the Control's table showing both secondaries at the new revision",
        SYNC_TIMEOUT,
    )
    for node in (n2, n3):
        node.assert_matches(marker)
    with held:
        held.sendall(f"6 url={FEED_URL}\n".encode())
        after = read_lines(held, 2)
    assert after == [f"6 {feed_detection(marker)}", "6 LookupFinished"], after


def test_a_rest_write_on_the_control_reaches_the_secondaries_and_secondaries_refuse_writes(
    cluster: list[ClusterNode],
) -> None:
    n1, n2, n3 = cluster
    revision, _ = settled(cluster)
    indicator = f"http://internal-{secrets.token_hex(4)}.example/c2"
    assert not any(indicator in d for d in n2.detections(f"url={indicator}"))

    reply = put_indicators(n1, [indicator], if_match=f'"{revision}"')
    assert reply.status == 200, reply
    assert reply.headers["etag"] == f'"{revision + 1}"'
    wait_applied(cluster, revision + 1)
    for node in (n2, n2, n3):  # n2 twice: two connections in a row go to its two workers
        found = node.detections(f"url={indicator}")
        assert any(f"category=InternalTI matchedIndicator={indicator}" in d for d in found), (node, found)

    # A write based on an older revision is refused and stores nothing.
    stale = f"http://stale-{secrets.token_hex(4)}.example/"
    reply = put_indicators(n1, [stale], if_match=f'"{revision}"')
    assert reply.status == 409, reply
    assert "settings changed meanwhile" in reply.body.decode()
    # A Secondary refuses writes (its API user came from n1's settings: n2 and n3 configure none).
    for node in (n2, n3):
        reply = put_indicators(node, [stale])
        assert reply.status == 409, (node, reply)
        [error] = reply.json()
        assert "Secondary" in error["status"] and n1.address in error["status"], error
        # where to send it instead: the Control's REST API (its cluster port speaks another protocol)
        assert f"send it to the Control node's REST API at https://127.0.0.1:{n1.api_port} " in error["status"], error
    assert same_applied_revision(cluster, revision + 1)
    assert not any(stale in d for node in cluster for d in node.detections(f"url={stale}"))


def test_concurrent_edits_from_the_same_base_one_wins_the_other_gets_409(cluster: list[ClusterNode]) -> None:
    n1, n2, n3 = cluster
    revision, _ = settled(cluster)
    token = secrets.token_hex(4)
    values = [f"%Date% alert=%Alert% race={token}-{i}%RecordContext%" for i in (0, 1)]
    procs = [n1.cli_popen("settings", "set", "--base", str(revision), "OutputSettings/AlertFormat", v) for v in values]
    results = [p.communicate_result() for p in procs]

    won = [i for i, r in enumerate(results) if r.returncode == 0]
    lost = [i for i, r in enumerate(results) if r.returncode != 0]
    assert len(won) == 1 and len(lost) == 1, results
    assert committed(results[won[0]].stdout)[0] == revision + 1
    loser = results[lost[0]]
    assert loser.returncode == 2, loser
    assert f"settings changed meanwhile: the write is based on revision {revision}, current is {revision + 1}" in (
        loser.stderr
    )
    wait_applied(cluster, revision + 1)
    assert n1.history()[-1][0] == revision + 1
    for node, result in zip((n2, n3), cli_all([n2, n3], "settings", "get", "--xml"), strict=True):
        assert result.returncode == 0, result
        assert f"race={token}-{won[0]}" in result.stdout and f"race={token}-{lost[0]}" not in result.stdout, node


# -- what is refused --------------------------------------------------------------------------------------


def test_invalid_settings_are_refused_on_the_control_and_nothing_is_applied(
    cluster: list[ClusterNode], tmp_path: Path
) -> None:
    n1, n2, n3 = cluster
    revision, digest = settled(cluster)
    before = {node.name: node.table()["self"] for node in cluster}

    bad = tmp_path / "bad-settings.xml"
    bad.write_text("<Settings><Cluster/></Settings>\n")
    regex = n1.cli_popen("settings", "set", "RegExps/Source[@id=default]/RE_URL", "url=(")
    result = n1.cli("settings", "import", str(bad))
    assert result.returncode == 2, result
    assert "not a shared setting" in result.stderr, result.stderr
    result = regex.communicate_result()
    assert result.returncode == 2, result
    assert "RE_URL" in result.stderr and "does not compile" in result.stderr, result.stderr

    me = n1.status()["self"]  # the Control decided synchronously: neither received nor applied anything
    assert (me["received"], me["applied"]) == (before["n1"]["received"], before["n1"]["applied"])
    assert n1.readyz()["revision"] == revision
    assert f"category=Malicious_URL matchedIndicator={FEED_URL}" in " ".join(n1.detections())
    # A valid change after the refusals is revision + 1 everywhere: no refused revision was ever sent.
    n1.cli_ok("settings", "set", "OutputSettings/AlertFormat", f"%Date% alert=%Alert% after={secrets.token_hex(4)}")
    wait_applied(cluster, revision + 1)
    for node, kept in zip(cluster, histories(cluster), strict=True):
        assert [r for r, _, _ in kept if r >= revision] == [revision, revision + 1], (node, kept)
        assert (revision, 1, digest) in kept
        assert r"url=(\S+)" in node.own_call("GET", "/cluster/v1/settings?since=0")["settings"]["payload"]["config"]


def test_forged_documents_pushed_to_a_secondary_are_refused(cluster: list[ClusterNode]) -> None:
    """Even with the Control's own certificate: wrong digest, garbage, another cluster, invalid content."""
    n1, n2, _ = cluster
    revision, digest = settled(cluster)
    doc = json.loads(n1.cli_ok("settings", "get"))
    assert (doc["revision"], doc["sha256"]) == (revision, digest)
    payload = doc["payload"]
    changed = {**payload, "config": payload["config"] + "<!-- forged -->\n"}
    invalid = {**payload, "config": payload["config"].replace(r"url=(\S+)", "url=(", 1)}
    assert invalid != payload

    def forged(raw: dict[str, Any]) -> bytes:
        return json.dumps(raw).encode()

    cases: list[tuple[bytes, int, str]] = [
        (forged({**doc, "revision": revision + 1, "payload": changed}), 422, "digest mismatch"),
        (b"{this is not json", 422, "not JSON"),
        (forged(doc)[:-20], 422, "not JSON"),
        (forged({**doc, "revision": revision + 1, "extra": 1}), 422, "fields must be exactly"),
        (
            forged(SettingsDocument.create("another-cluster", revision + 1, 1, time.time(), changed).as_json()),
            409,
            "is not this node's",
        ),
        (
            forged(SettingsDocument.create(CLUSTER_ID, revision + 1, 1, time.time(), invalid).as_json()),
            422,
            "does not compile",
        ),
    ]
    for body, status, message in cases:
        got, answer = cluster_call(n2, "POST", "/cluster/v1/settings", body, cert=n1.identity_files)
        assert (got, message in str(answer.get("error"))) == (status, True), (body[:80], got, answer)
        ready = n2.readyz()
        assert (ready["revision"], ready["sha256"]) == (revision, digest)
        assert n2.table()["self"]["applied"]["sha256"] == digest
    # A well-formed document from a Secondary is refused: only the Control pushes settings.
    n3 = cluster[2]
    from_secondary = SettingsDocument.create(CLUSTER_ID, revision + 1, doc["epoch"], time.time(), changed)
    got, answer = cluster_call(n2, "POST", "/cluster/v1/settings", from_secondary.to_bytes(), cert=n3.identity_files)
    assert (got, "only the Control" in str(answer.get("error"))) == (403, True), answer
    assert (n2.readyz()["revision"], n2.readyz()["sha256"]) == (revision, digest)
    # The content check raised the alert, and matching still uses the old rule.
    n2.process.wait_for_log(r"alert KL_ALERT_SettingsSynchronizationError error=settings revision \d+ refused")
    assert f"category=Malicious_URL matchedIndicator={FEED_URL}" in " ".join(n2.detections())
    # The Control's next genuine revision is still taken, and clears the error.
    new, _, digest = committed(
        n1.cli_ok("settings", "set", "OutputSettings/AlertFormat", f"%Date% alert=%Alert% {secrets.token_hex(4)}")
    )
    assert new == revision + 1
    wait_applied(cluster, new)
    me = n2.status()["self"]
    assert (me["received"]["revision"], me["received"]["sha256"], me["error"]) == (new, digest, None), me


ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/cluster/v1/heartbeat", {"role": "control", "epoch": 99}),
    ("POST", "/cluster/v1/settings", {}),
    ("GET", "/cluster/v1/settings?since=0", None),
    ("GET", "/cluster/v1/status", None),
    ("GET", "/cluster/v1/history", None),
    ("POST", "/cluster/v1/admin/set", {"path": "OutputSettings/EventFormat", "value": "%REQ% pwned"}),
    ("POST", "/cluster/v1/admin/token", {"ttl": 600}),
    ("POST", "/cluster/v1/admin/promote", {}),
    ("POST", "/cluster/v1/admin/demote", {}),
]


def test_clients_without_a_member_certificate_are_refused(cluster: list[ClusterNode], tmp_path: Path) -> None:
    n1, n2, _ = cluster
    revision, digest = settled(cluster)
    foreign = (tmp_path / "intruder.pem", tmp_path / "intruder.key")
    ensure_server_pair(str(foreign[0]), str(foreign[1]), common_name="intruder", hosts=["127.0.0.1"], client_auth=True)
    outcomes: list[tuple[str, bool, str, int | str]] = []
    for node in (n1, n2):
        for cert in (None, foreign):
            for method, path, body in ROUTES:
                raw = None if body is None else json.dumps(body).encode()
                try:
                    status, answer = cluster_call(node, method, path, raw, cert=cert)
                except OSError as exc:  # the TLS layer refused the certificate
                    outcomes.append((node.name, cert is not None, path, type(exc).__name__))
                    continue
                assert status == 403, (node, cert, method, path, status, answer)
                assert answer == {"error": "not a member of this cluster"}, answer
                outcomes.append((node.name, cert is not None, path, status))
    # Without a certificate the handshake works and the request is refused; a foreign one may not get that far.
    assert all(o[3] == 403 for o in outcomes if not o[1]), outcomes
    # join needs no certificate, but a token.
    body = {"token": "guessed", "address": "127.0.0.1:1", "cert_pem": foreign[0].read_text()}
    status, answer = cluster_call(n1, "POST", "/cluster/v1/join", json.dumps(body).encode(), cert=None)
    assert status == 403 and "token unknown" in answer["error"], answer
    assert settled(cluster) == (revision, digest)
    assert n1.readyz()["role"] == "control" and n2.readyz()["role"] == "secondary"
    assert len(n1.table()["members"]) == 2


def test_admin_routes_accept_only_the_nodes_own_certificate(cluster: list[ClusterNode]) -> None:
    n1, n2, n3 = cluster
    revision, digest = settled(cluster)
    for target, caller in ((n1, n2), (n2, n1), (n2, n3)):
        for _, path, body in (r for r in ROUTES if "/admin/" in r[1]):
            status, answer = cluster_call(target, "POST", path, json.dumps(body).encode(), cert=caller.identity_files)
            assert status == 403, (target, caller, path, status, answer)
            assert "only from this node's own certificate" in answer["error"], answer
        # The same member certificate may read the table: it is a member.
        status, table = cluster_call(target, "GET", "/cluster/v1/status", cert=caller.identity_files)
        assert status == 200 and table["self"]["address"] == target.address
    assert settled(cluster) == (revision, digest)
    assert [n.readyz()["role"] for n in cluster] == ["control", "secondary", "secondary"]
    assert {n.readyz()["epoch"] for n in cluster} == {1}


# -- membership -------------------------------------------------------------------------------------------


def test_join_tokens_work_once_expire_and_are_never_sent_to_a_wrong_fingerprint(
    cluster: list[ClusterNode], tmp_path: Path
) -> None:
    n1, n2, n3 = cluster
    revision, digest = settled(cluster)
    n4, n5, n6 = (ClusterNode(tmp_path, name) for name in ("n4", "n5", "n6"))
    # Two tokens: one for ten minutes, one for a second (it expires while the first is being used).
    long_lived, short_lived = n1.cli_popen("token"), n1.cli_popen("token", "--ttl", "1")
    result = long_lived.communicate_result()
    assert result.returncode == 0, result
    token, control, fingerprint = parse_token(result.stdout)
    assert (control, fingerprint) == (n1.address, n1.node_id)
    result = short_lived.communicate_result()
    issued = time.monotonic()  # the Control issued it before the command returned
    assert result.returncode == 0, result
    short, _, _ = parse_token(result.stdout)

    def join(node: ClusterNode, token: str, fingerprint: str = fingerprint) -> Any:
        return node.cli("join", "--control", control, "--token", token, "--fingerprint", fingerprint)

    # A wrong fingerprint: refused before the token is sent, naming what was presented; nothing written.
    result = join(n5, token, n2.node_id)
    assert result.returncode == 2, result
    assert f"presented a certificate with fingerprint {n1.node_id}, not the one given" in result.stderr
    assert not n5.state_dir.exists(), sorted(p.name for p in n5.state_dir.iterdir())
    # So the token still works ...
    result = join(n4, token)
    assert result.returncode == 0, result.stderr
    assert f"joined cluster {CLUSTER_ID} as a Secondary" in result.stdout
    kept = json.loads((n4.state_dir / "settings.json").read_text())
    assert (kept["revision"], kept["sha256"]) == (revision, digest)
    wait_until(
        lambda: n4.address in {m["address"] for m in n2.table()["members"]},
        "n2 learning of the new member",
        SYNC_TIMEOUT,
    )
    # ... once; and an expired token does not.
    wait_until(lambda: time.monotonic() - issued > 1.2, "the short token's second to pass", 5)
    used = n5.cli_popen("join", "--control", control, "--token", token, "--fingerprint", fingerprint)
    expired = n6.cli_popen("join", "--control", control, "--token", short, "--fingerprint", fingerprint)
    for node, result in ((n5, used.communicate_result()), (n6, expired.communicate_result())):
        assert result.returncode == 2 and "token unknown, already used or expired" in result.stderr, result
        assert not node.state_dir.exists()

    # The Control cannot remove itself (by address or by id); a member can be removed.
    for result in [p.communicate_result() for p in (n1.cli_popen("remove", w) for w in (n1.address, n1.node_id))]:
        assert result.returncode == 2, result
        assert "this node is the Control node: demote it" in result.stderr and "before removing it" in result.stderr
    assert f"removed {n4.address} ({n4.node_id})" in n1.cli_ok("remove", n4.address)

    def forgotten() -> bool:
        return all(n4.address not in {m["address"] for m in node.table()["members"]} for node in cluster)

    wait_until(forgotten, "every node forgetting the removed member", SYNC_TIMEOUT)
    assert settled(cluster) == (revision, digest)
    assert n1.readyz()["role"] == "control"


def test_status_table_lists_every_node(cluster: list[ClusterNode]) -> None:
    n1, n2, n3 = cluster
    revision, digest = settled(cluster)
    lines = n2.cli_ok("status").splitlines()
    assert lines[0].split() == [
        "ADDRESS", "ROLE", "EPOCH", "CONTROL", "SYNCHRONIZED", "APPLIED", "DIGEST", "STATE"
    ]  # fmt: skip
    for node, role, flag in ((n1, "control", ""), (n2, "secondary", r"\*"), (n3, "secondary", "")):
        row = rf"^{flag}\s+{re.escape(node.address)}\s+{role}\s+1\s+{re.escape(n1.address)}\s+"
        row += rf"r{revision} \S+ \S+\s+r{revision} \S+ \S+\s+{digest[:12]}\s+(?P<state>.+)$"
        m = re.search(row, "\n".join(lines[1:4]), re.M)
        assert m, (node, row, lines)
        assert (m["state"] == "control link: connected") if node is n2 else m["state"].startswith("reachable (")
    assert "EMERGENCY" not in "\n".join(lines)


# -- API users and settings import -------------------------------------------------------------------------


def threatgate(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``python -m threatgate ARGS`` with ``stdin`` (a password), as an operator runs it."""
    argv = [sys.executable, "-m", "threatgate", *args]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)


def api_status(node: ClusterNode, user: str, password: str) -> int:
    return node.api().request("GET", "/api/1.1/suppliers", headers={"Authorization": basic_auth(user, password)}).status


def test_api_users_are_managed_on_the_control_and_work_on_every_node(cluster: list[ClusterNode]) -> None:
    n1, n2, n3 = cluster
    revision, _ = settled(cluster)
    user, password = f"u{secrets.token_hex(3)}", "cluster user password"

    # A Secondary refuses and names the Control; nothing changes anywhere.
    result = threatgate("cluster", "users", "add", "--config", str(n2.config), "--password-stdin", user, stdin=password)
    assert result.returncode == 2, result
    assert "this node is a Secondary" in result.stderr and n1.address in result.stderr, result.stderr
    # The node's own file is not where a member's users live: refused, file untouched.
    before = n2.config.read_bytes()
    result = threatgate("users", "add", "--config", str(n2.config), "--password-stdin", user, stdin=password)
    assert result.returncode == 2, result
    assert f"use: threatgate cluster users add --config {n2.config} {user}" in result.stderr, result.stderr
    assert n2.config.read_bytes() == before
    assert same_applied_revision(cluster, revision)

    result = threatgate("cluster", "users", "add", "--config", str(n1.config), "--password-stdin", user, stdin=password)
    assert result.returncode == 0, result
    assert result.stdout.startswith(f"user {user} added to the cluster settings: revision {revision + 1} (epoch ")
    wait_applied(cluster, revision + 1)
    for node in cluster:
        assert api_status(node, user, password) == 200, node
    listed = threatgate("cluster", "users", "list", "--config", str(n3.config))
    assert listed.returncode == 0 and set(listed.stdout.split()) == {USER, user}, listed

    result = threatgate("cluster", "users", "remove", "--config", str(n1.config), user)
    assert result.returncode == 0, result
    wait_applied(cluster, revision + 2)
    for node in cluster:
        assert api_status(node, user, password) == 401, node
        assert api_status(node, USER, PASSWORD) == 200, node
    result = threatgate("cluster", "users", "remove", "--config", str(n1.config), user)
    assert result.returncode == 2 and f"no API user '{user}'" in result.stderr, result


def test_settings_import_shows_a_diff_and_replaces_other_changes_only_with_yes(
    cluster: list[ClusterNode], tmp_path: Path
) -> None:
    n1, n2, n3 = cluster
    alert = f"%Date% alert=%Alert% since={secrets.token_hex(4)}"
    changed, _, _ = committed(n1.cli_ok("settings", "set", "OutputSettings/AlertFormat", alert))
    wait_applied(cluster, changed)

    # n1.conf's AlertFormat is not the one just set: importing it would revert that change.
    result = n1.cli("settings", "import", str(n1.config))
    assert result.returncode == 1, result
    assert result.stdout.startswith(f"--- settings revision {changed}\n+++ {n1.config}\n"), result.stdout
    assert f"-    <AlertFormat>{alert}</AlertFormat>" in result.stdout.splitlines(), result.stdout
    assert f"settings not changed: importing {n1.config} would replace or remove" in result.stderr
    assert "--yes" in result.stderr
    assert n1.history()[-1][0] == changed and same_applied_revision(cluster, changed)
    # The node itself refuses such an import without "replace" (what --yes sends), whoever calls it.
    text = extract_settings(read_xml(str(n1.config)), complete=False)
    body = json.dumps({"config": text, "source": "n1.conf"}).encode()
    status, answer = cluster_call(n1, "POST", "/cluster/v1/admin/import", body, cert=n1.identity_files)
    assert status == 409 and "would replace or remove" in answer["error"], (status, answer)
    result = n2.cli("settings", "import", "--yes", str(n1.config))
    assert result.returncode == 2 and "this node is a Secondary" in result.stderr, result

    # A file that only adds (a user here) is applied as it is; what it does not hold stays.
    current = n1.cli_ok("settings", "get", "--xml")
    users = re.search(r"<Users>.*?</Users>", current, re.S)
    assert users, current
    importer = f'<User name="importer" password_hash="{hash_password("import test")}"/>'
    only_users = tmp_path / "users.xml"
    only_users.write_text(f"<Settings>\n  {users.group().replace('</Users>', importer + '</Users>')}\n</Settings>\n")
    result = n1.cli("settings", "import", str(only_users))
    assert result.returncode == 0, result
    assert '+    <User name="importer" password_hash="scrypt$' in result.stdout
    assert committed(result.stdout.splitlines(keepends=True)[-1])[0] == changed + 1
    wait_applied(cluster, changed + 1)
    assert alert in n3.cli_ok("settings", "get", "--xml")

    result = n1.cli("settings", "import", "--yes", str(n1.config))
    assert result.returncode == 0, result
    assert '-    <User name="importer"' in result.stdout and f"-    <AlertFormat>{alert}" in result.stdout
    wait_applied(cluster, changed + 2)
    xml = n2.cli_ok("settings", "get", "--xml")
    assert alert not in xml and "importer" not in xml
    result = n1.cli("settings", "import", str(n1.config))
    assert result.returncode == 0 and result.stdout.startswith("nothing to change"), result
    assert n1.history()[-1][0] == changed + 2


# -- losing the Control -----------------------------------------------------------------------------------


def test_control_loss_emergency_promotion_and_the_old_control_steps_down(tmp_path: Path) -> None:
    with three_node_cluster(tmp_path) as nodes:
        n1, n2, n3 = nodes
        before, _, _ = committed(n1.cli_ok("settings", "set", "OutputSettings/EventFormat", event_format("BEFORE")))
        wait_applied(nodes, before)

        n1.kill()
        wait_until(
            lambda: all(n.readyz()["emergency"] is not None for n in (n2, n3)),
            "n2 and n3 in emergency mode",
            SYNC_TIMEOUT,
        )
        refused = n2.cli_popen("settings", "set", "OutputSettings/EventFormat", event_format("REFUSED"))
        for node, table in zip((n2, n3), statuses([n2, n3]), strict=True):
            node.process.wait_for_log(
                rf"alert KL_ALERT_ClusterEmergencyState reason=Control node {re.escape(n1.address)} unreachable"
            )
            me = table["self"]
            assert n1.address in me["emergency"] and "unreachable" in me["emergency"], me
            # Why, in words: no aiohttp class name, no <ssl.SSLContext object at 0x...>.
            [row] = [m for m in table["members"] if m["address"] == n1.address]
            assert not row["reachable"] and row["link_error"] == f"{n1.address}: cannot connect: Connection refused"
            # Matching goes on with the last applied settings; settings are frozen.
            node.assert_matches("BEFORE")
        shown = n2.cli("status").stdout
        assert f"UNREACHABLE: {n1.address}: cannot connect: Connection refused" in shown, shown
        result = refused.communicate_result()
        assert result.returncode == 2 and "cannot change settings" in result.stderr, result

        out = n2.cli_ok("promote")
        assert f"epoch 2, settings revision {before + 1}" in out
        promoted = before + 1
        wait_applied([n2, n3], promoted)
        n3.process.wait_for_log(rf"cluster emergency mode over: Control is {re.escape(n2.address)}")
        for role, table in zip(("control", "secondary"), statuses([n2, n3]), strict=True):
            me = table["self"]
            assert (me["role"], me["epoch"], me["control_address"], me["emergency"]) == (role, 2, n2.address, None)

        # Fencing: a document of the old epoch is refused, even when the old Control's certificate sends it.
        doc = json.loads(n3.cli_ok("settings", "get"))
        stale = SettingsDocument.create(CLUSTER_ID, promoted + 50, 1, time.time(), doc["payload"]).as_json()
        status, answer = cluster_call(
            n3, "POST", "/cluster/v1/settings", json.dumps(stale).encode(), cert=n1.identity_files
        )
        assert status == 409 and "epoch 1 is older than 2" in answer["error"], answer
        assert n3.readyz()["revision"] == promoted

        # The new Control's changes reach the remaining secondary.
        after, epoch, digest = committed(
            n2.cli_ok("settings", "set", "OutputSettings/EventFormat", event_format("AFTER"))
        )
        assert (after, epoch) == (promoted + 1, 2)
        wait_applied([n2, n3], after)
        n3.assert_matches("AFTER")

        # The old Control comes back: it steps down, follows n2 and takes its settings.
        n1.start(wait=False)
        n1.process.wait_for_log(r"a higher Control epoch \(2\) exists: this node steps down to Secondary")
        n1.wait_started()
        wait_applied(nodes, after)
        me = n1.status()["self"]
        assert (me["role"], me["epoch"], me["control_address"], me["emergency"]) == ("secondary", 2, n2.address, None)
        assert me["applied"]["sha256"] == digest
        n1.assert_matches("AFTER")
        wait_until(
            lambda: all(n.readyz()["emergency"] is None for n in nodes), "no node in emergency mode", SYNC_TIMEOUT
        )

        # No node ever went back to an epoch-1 revision after the promotion.
        for node, kept in zip(nodes, histories(nodes), strict=True):
            history = [(epoch, rev) for rev, epoch, _ in kept]
            assert history == sorted(history) and len({r for _, r in history}) == len(history), (node, history)
            assert all(epoch == 2 for epoch, rev in history if rev >= promoted), (node, history)
            applied = applied_lines(node.log())
            assert applied == sorted(set(applied)), (node, applied)
        assert all(epoch == 2 for epoch, _ in applied_lines(n1.log())), n1.log()  # since its restart
        n3_applied = applied_lines(n3.log())
        assert (2, promoted) in n3_applied and (2, after) in n3_applied
        assert all(epoch == 2 for epoch, _ in n3_applied[n3_applied.index((2, promoted)) :]), n3_applied
        assert "settings synchronization" not in n1.log()  # it never pushed its epoch-1 settings to be refused


def test_the_cluster_port_refuses_a_source_outside_its_allow_list(tmp_path: Path) -> None:
    """<AllowedSources ports="cluster">: a peer outside is reset before its TLS handshake, its own members in."""
    node = ClusterNode(tmp_path, "solo")
    text = node.config.read_text()
    only = '<AllowedSources ports="cluster"><Source>127.0.0.2</Source></AllowedSources>'
    node.config.write_text(text.replace("</Configuration>", only + "</Configuration>"))
    node.cli_ok("init", "--cluster-id", "allow-list")
    node.start()
    try:
        with socket.create_connection(("127.0.0.1", node.cluster_port), timeout=10) as s:
            with pytest.raises(ConnectionResetError):
                s.recv(10)  # reset before a byte of TLS
        node.process.wait_for_log(r"refused a connection from 127\.0\.0\.1 to the cluster port", after=0)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with (
            socket.create_connection(
                ("127.0.0.1", node.cluster_port), timeout=10, source_address=("127.0.0.2", 0)
            ) as raw,
            context.wrap_socket(raw) as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")  # let in: the handshake is done
    finally:
        node.stop()
