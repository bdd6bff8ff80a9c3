"""Tests for threatgate.cluster.state: the files a cluster node keeps, their modes, history and damage."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from threatgate.cluster.settings import SettingsDocument, make_payload
from threatgate.cluster.state import StateDir
from threatgate.cluster.sync import Identity, Member, Role
from threatgate.errors import ClusterError
from threatgate.net.tls import fingerprint_sha256

EMPTY: dict[str, list[object]] = {"suppliers": [], "tags": []}


def doc(revision: int, epoch: int = 1) -> SettingsDocument:
    config = f"<Settings><Feeds update_frequency='{revision}'/></Settings>\n"
    return SettingsDocument.create("tg-test", revision, epoch, 1000.0 + revision, make_payload(config, EMPTY))


def identity() -> Identity:
    a = Member("AA:01", "a.example:7443", "-----PEM a-----")
    b = Member("BB:02", "[::1]:7443", "-----PEM b ☃-----")
    return Identity(
        cluster_id="tg-test",
        node_id=b.node_id,
        address=b.address,
        role=Role.SECONDARY,
        epoch=4,
        control_id=a.node_id,
        members={a.node_id: a, b.node_id: b},
        members_version=7,
    )


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    return StateDir(str(tmp_path / "var" / "cluster"), keep=3)


def test_identity_round_trip(state: StateDir) -> None:
    assert not state.exists()
    ident = identity()
    state.save_identity(ident)
    assert state.exists()
    assert state.load_identity() == ident
    ident.role = Role.CONTROL
    ident.control_id = ident.node_id
    ident.epoch = 5
    state.save_identity(ident)
    loaded = state.load_identity()
    assert (loaded.role, loaded.control_id, loaded.epoch) == (Role.CONTROL, "BB:02", 5)


def test_missing_identity_says_not_a_member(state: StateDir) -> None:
    with pytest.raises(ClusterError) as excinfo:
        state.load_identity()
    assert excinfo.value.status == 500
    assert str(excinfo.value).startswith(f"{state.identity_path} missing: this node is not a cluster member yet")


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"cluster_id": "x"}', b'{"role": "boss"}'])
def test_damaged_identity_names_the_file(state: StateDir, content: bytes) -> None:
    state.save_identity(identity())
    Path(state.identity_path).write_bytes(content)
    with pytest.raises(ClusterError) as excinfo:
        state.load_identity()
    assert excinfo.value.status == 500
    assert str(excinfo.value).startswith(f"{state.identity_path}: unreadable cluster identity: ")


def test_settings_round_trip(state: StateDir) -> None:
    assert state.load_settings() is None
    assert state.revisions() == []
    state.save_settings(doc(1))
    assert state.load_settings() == doc(1)
    state.save_settings(doc(2, epoch=2))
    assert state.load_settings() == doc(2, epoch=2)
    assert state.revisions() == [1, 2]
    assert state.load_revision(1) == doc(1)
    assert Path(state.settings_path).read_bytes() == doc(2, epoch=2).to_bytes()


@pytest.mark.parametrize("first", ["identity", "settings", "pair"])
def test_files_are_private(state: StateDir, first: str) -> None:
    """Whatever is written first creates the directory 0700; every state file is 0600."""
    steps = {
        "identity": lambda: state.save_identity(identity()),
        "settings": lambda: state.save_settings(doc(1)),
        "pair": lambda: state.ensure_pair("node1.example"),
    }
    steps[first]()
    for name, step in steps.items():
        if name != first:
            step()
    state.save_settings(doc(2))
    assert mode(state.path) == 0o700
    assert mode(os.path.dirname(state.path)) == 0o700
    assert mode(state.revisions_path) == 0o700
    for path in (state.identity_path, state.settings_path, state.key_path):
        assert mode(path) == 0o600, path
    for name in os.listdir(state.revisions_path):
        assert mode(os.path.join(state.revisions_path, name)) == 0o600, name
    leftovers = [n for d in (state.path, state.revisions_path) for n in os.listdir(d) if n.endswith(".tmp")]
    assert leftovers == []


def test_revisions_are_pruned_to_keep(state: StateDir) -> None:
    for revision in range(1, 7):
        state.save_settings(doc(revision))
    assert state.revisions() == [4, 5, 6]
    assert sorted(os.listdir(state.revisions_path)) == ["0000000004.json", "0000000005.json", "0000000006.json"]
    assert state.load_revision(5) == doc(5)
    assert state.load_settings() == doc(6)


def test_revisions_ignore_foreign_files(state: StateDir) -> None:
    state.save_settings(doc(1))
    for name in ("notes.txt", "12.json", ".0000000009.json.abc.tmp"):
        Path(state.revisions_path, name).write_text("x")
    assert state.revisions() == [1]


@pytest.mark.parametrize(("saved", "span"), [(range(1, 7), "4-6"), (range(10, 11), "10-10")])
def test_pruned_revision_is_404_naming_what_is_kept(state: StateDir, saved: range, span: str) -> None:
    for revision in saved:
        state.save_settings(doc(revision))
    with pytest.raises(ClusterError) as excinfo:
        state.load_revision(2)
    assert excinfo.value.status == 404
    assert str(excinfo.value) == f"revision 2 is not kept here (kept: {span})"


def test_no_revisions_kept(state: StateDir) -> None:
    with pytest.raises(ClusterError) as excinfo:
        state.load_revision(1)
    assert excinfo.value.status == 404
    assert str(excinfo.value) == "revision 1 is not kept here (kept: none)"


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda data: data[: len(data) // 2], "not JSON"),  # a torn write
        (lambda data: b"", "not JSON"),
        (lambda data: data.replace(b"update_frequency='1'", b"update_frequency='9'"), "digest mismatch"),
        (lambda data: b"[]", "expected a JSON object"),
    ],
)
def test_damaged_settings_names_the_file(state: StateDir, edit: Callable[[bytes], bytes], problem: str) -> None:
    state.save_settings(doc(1))
    data = Path(state.settings_path).read_bytes()
    Path(state.settings_path).write_bytes(edit(data))
    with pytest.raises(ClusterError) as excinfo:
        state.load_settings()
    assert excinfo.value.status == 500
    assert str(excinfo.value).startswith(f"{state.settings_path}: damaged settings document: ")
    assert problem in str(excinfo.value)


def test_damaged_revision_names_the_file(state: StateDir) -> None:
    state.save_settings(doc(1))
    path = os.path.join(state.revisions_path, "0000000001.json")
    Path(path).write_bytes(b"{}")
    with pytest.raises(ClusterError) as excinfo:
        state.load_revision(1)
    assert excinfo.value.status == 500
    assert str(excinfo.value).startswith(f"{path}: damaged: ")


def test_unwritable_state_is_a_cluster_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    state = StateDir(str(blocker / "cluster"))
    with pytest.raises(ClusterError) as excinfo:
        state.save_identity(identity())
    assert excinfo.value.status == 500
    assert str(excinfo.value).startswith(f"cluster state: cannot write {state.identity_path}")


def test_pair_serves_and_authenticates_with_a_stable_fingerprint(state: StateDir) -> None:
    first = state.ensure_pair("node1.example")
    assert first.created
    assert mode(state.key_path) == 0o600
    cert = x509.load_pem_x509_certificate(state.cert_pem().encode())
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usages
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"node1.example", "localhost"}
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    again = state.ensure_pair("other-host.example")
    assert not again.created
    assert again.fingerprint_sha256 == first.fingerprint_sha256
    assert fingerprint_sha256(state.cert_pem().encode()) == first.fingerprint_sha256
    assert StateDir(state.path).ensure_pair("node1.example").fingerprint_sha256 == first.fingerprint_sha256


def test_pair_for_a_wildcard_listen_address(state: StateDir) -> None:
    state.ensure_pair("0.0.0.0")
    cert = x509.load_pem_x509_certificate(state.cert_pem().encode())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
