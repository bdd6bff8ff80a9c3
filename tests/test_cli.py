"""Tests for ``threatgate users add`` and ``threatgate users hash`` (text edits of the node config)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from threatgate.cli import main
from threatgate.config.xml import read_xml
from threatgate.node.auth import verify_password

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

HTTP_BLOCK = """\
  <!-- REST API: keep this comment -->
  <HTTPServer>
    <ConnectionString>127.0.0.1:8443</ConnectionString>
    <CertificatePath>certs/node.pem</CertificatePath>
    <PrivateKeyPath>certs/node.key</PrivateKeyPath>
    <!-- <User name="ghost" password_hash="commented out"/> -->
    <Users>
      <User name="analyst" password_hash="{old}"/>
    </Users>
  </HTTPServer>
"""

APPLIED = "a running node uses it at once (it re-reads its users when the file changes, no reload needed)"
OLD_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def _example_without_http() -> str:
    """examples/node.conf with any <HTTPServer> block (and the comment line above it) removed."""
    text = (EXAMPLES / "node.conf").read_text()
    text = re.sub(r"(?:[ \t]*<!--[^\n]*-->\n)?[ \t]*<HTTPServer\b.*?</HTTPServer>\n", "", text, flags=re.S)
    assert "<HTTPServer" not in text
    return text


def _config(tmp_path: Path, block: str | None = HTTP_BLOCK) -> Path:
    text = _example_without_http()
    if block is not None:
        text = text.replace("</Configuration>", block.format(old=OLD_HASH) + "</Configuration>")
    path = tmp_path / "node.conf"
    path.write_text(text)
    return path


def _users(path: Path) -> dict[str, str]:
    root = read_xml(str(path))
    http = root.require("HTTPServer")
    users = http.find("Users")
    assert users is not None
    return {u.attrs["name"]: u.attrs["password_hash"] for u in users.findall("User")}


def _add(path: Path, name: str, password: str = "s3cret pass", *extra: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        main, ["users", "add", "--config", str(path), "--password-stdin", *extra, name], input=password + "\n"
    )
    return result.exit_code, result.stdout, result.stderr


def test_add_new_user(tmp_path: Path) -> None:
    path = _config(tmp_path)
    code, out, err = _add(path, "bob")
    assert code == 0, err
    assert out == f"user bob added to {path}; {APPLIED}\n"
    assert "s3cret" not in out + err and "scrypt$" not in out
    users = _users(path)
    assert users["analyst"] == OLD_HASH
    assert verify_password(users["bob"], "s3cret pass")
    text = path.read_text()
    # Lined up with the existing user, inserted before </Users>.
    assert re.search(
        r'\n      <User name="analyst"[^\n]*/>\n      <User name="bob" password_hash="scrypt\$[^"]+"/>\n    </Users>',
        text,
    )


def test_update_existing_user(tmp_path: Path) -> None:
    path = _config(tmp_path)
    before = path.read_text()
    code, out, _ = _add(path, "analyst", "new password")
    assert code == 0
    assert out == f"user analyst updated in {path}; {APPLIED}\n"
    users = _users(path)
    assert list(users) == ["analyst"]
    assert verify_password(users["analyst"], "new password")
    after = path.read_text()
    assert len(after.splitlines()) == len(before.splitlines())
    assert after.replace(users["analyst"], OLD_HASH) == before


def test_comments_and_layout_preserved(tmp_path: Path) -> None:
    path = _config(tmp_path)
    before = path.read_text()
    assert _add(path, "carol")[0] == 0
    after = path.read_text()
    for comment in re.findall(r"<!--.*?-->", before, flags=re.S):
        assert comment in after
    assert 'password_hash="commented out"' in after  # the commented-out element was not touched
    added = [line for line in after.splitlines() if line not in before.splitlines()]
    assert len(added) == 1 and 'name="carol"' in added[0]


def test_users_element_created_when_missing(tmp_path: Path) -> None:
    block = "  <HTTPServer>\n    <ConnectionString>127.0.0.1:8443</ConnectionString>\n  </HTTPServer>\n"
    path = _config(tmp_path, block)
    assert _add(path, "dave")[0] == 0
    assert "dave" in _users(path)
    assert '    <Users>\n      <User name="dave"' in path.read_text()
    assert "    </Users>\n  </HTTPServer>" in path.read_text()


def test_self_closing_users_element(tmp_path: Path) -> None:
    block = "  <HTTPServer>\n    <Users/>\n  </HTTPServer>\n"
    path = _config(tmp_path, block)
    assert _add(path, "erin")[0] == 0
    assert list(_users(path)) == ["erin"]


def test_missing_http_server_is_exit_2(tmp_path: Path) -> None:
    path = _config(tmp_path, None)
    before = path.read_bytes()
    code, out, err = _add(path, "bob")
    assert code == 2
    assert "<HTTPServer>" in err and "add one" in err
    assert out == ""
    assert path.read_bytes() == before


def test_commented_out_http_server_counts_as_missing(tmp_path: Path) -> None:
    path = _config(tmp_path, "  <!-- <HTTPServer><Users></Users></HTTPServer> -->\n")
    before = path.read_bytes()
    assert _add(path, "bob")[0] == 2
    assert path.read_bytes() == before


def test_file_mode_preserved_and_no_temp_left(tmp_path: Path) -> None:
    path = _config(tmp_path)
    os.chmod(path, 0o640)
    assert _add(path, "bob")[0] == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["node.conf"]


def test_symlink_target_is_edited(tmp_path: Path) -> None:
    real = _config(tmp_path)
    link = tmp_path / "link.conf"
    link.symlink_to(real)
    assert _add(link, "bob")[0] == 0
    assert link.is_symlink()
    assert "bob" in _users(real)


def test_password_stdin_takes_first_line_only(tmp_path: Path) -> None:
    path = _config(tmp_path)
    result = CliRunner().invoke(
        main, ["users", "add", "--config", str(path), "--password-stdin", "bob"], input="first line\r\nsecond\n"
    )
    assert result.exit_code == 0
    stored = _users(path)["bob"]
    assert verify_password(stored, "first line")
    assert not verify_password(stored, "first line\r")


def test_prompt_with_confirmation(tmp_path: Path) -> None:
    path = _config(tmp_path)
    result = CliRunner().invoke(main, ["users", "add", "--config", str(path), "bob"], input="typed pw\ntyped pw\n")
    assert result.exit_code == 0, result.output
    assert verify_password(_users(path)["bob"], "typed pw")
    assert "typed pw" not in result.output


def test_prompt_mismatch_changes_nothing(tmp_path: Path) -> None:
    path = _config(tmp_path)
    before = path.read_bytes()
    result = CliRunner().invoke(main, ["users", "add", "--config", str(path), "bob"], input="one\ntwo\n")
    assert result.exit_code != 0
    assert path.read_bytes() == before


def test_empty_password_refused(tmp_path: Path) -> None:
    path = _config(tmp_path)
    before = path.read_bytes()
    code, _, err = _add(path, "bob", "")
    assert code == 2
    assert "empty password" in err
    assert path.read_bytes() == before


@pytest.mark.parametrize("name", ["", "bad name", "a:b", "x" * 65, "é", "<evil>", 'q"uote'])
def test_bad_user_names_refused(tmp_path: Path, name: str) -> None:
    path = _config(tmp_path)
    before = path.read_bytes()
    code, _, _ = _add(path, name)
    assert code == 2
    assert path.read_bytes() == before


def test_good_unusual_user_name(tmp_path: Path) -> None:
    path = _config(tmp_path)
    assert _add(path, "svc.siem-01@corp_x")[0] == 0
    assert "svc.siem-01@corp_x" in _users(path)


def test_broken_config_is_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "node.conf"
    path.write_text("<Configuration><HTTPServer></Configuration>")
    code, _, err = _add(path, "bob")
    assert code == 2
    assert "not well-formed" in err


def test_missing_config_is_exit_2(tmp_path: Path) -> None:
    code, _, err = _add(tmp_path / "absent.conf", "bob")
    assert code == 2
    assert "cannot read" in err


def test_crlf_line_endings_kept(tmp_path: Path) -> None:
    path = _config(tmp_path)
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert _add(path, "bob")[0] == 0
    data = path.read_bytes()
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert "bob" in _users(path)


def test_result_validates_as_node_config(tmp_path: Path) -> None:
    from threatgate.config.node import node_config_from_xml

    path = _config(tmp_path)
    (tmp_path / "feeds").symlink_to(EXAMPLES / "feeds")
    assert _add(path, "bob")[0] == 0
    node_config_from_xml(read_xml(str(path)))


def test_users_hash() -> None:
    result = CliRunner().invoke(main, ["users", "hash"], input="hunter2\n")
    assert result.exit_code == 0
    stored = result.stdout.strip()
    assert result.stdout.count("\n") == 1
    assert verify_password(stored, "hunter2")
    assert "hunter2" not in result.stdout + result.stderr


def test_users_hash_refuses_empty() -> None:
    result = CliRunner().invoke(main, ["users", "hash"], input="\n")
    assert result.exit_code == 2


# -- a cluster member's file, users remove and list --------------------------------------------------------

CLUSTER_BLOCK = "  <Cluster>\n    <ConnectionString>127.0.0.1:9443</ConnectionString>\n  </Cluster>\n"


def _cli(*args: str, stdin: str = "") -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), input=stdin)
    return result.exit_code, result.stdout, result.stderr


def test_add_on_a_cluster_member_is_refused_and_says_what_to_run(tmp_path: Path) -> None:
    path = _config(tmp_path, HTTP_BLOCK + CLUSTER_BLOCK)
    before = path.read_bytes()
    code, out, err = _add(path, "bob")
    assert code == 2 and out == ""
    assert "this node is a cluster member: its API users come from the cluster settings" in err
    assert err.rstrip().endswith(f"use: threatgate cluster users add --config {path} bob")
    assert path.read_bytes() == before
    # No password is asked for a change that cannot happen.
    code, _, err = _cli("users", "add", "--config", str(path), "bob")
    assert code == 2 and "Password" not in err and path.read_bytes() == before
    code, _, err = _cli("users", "remove", "--config", str(path), "analyst")
    assert code == 2 and f"use: threatgate cluster users remove --config {path} analyst" in err
    assert path.read_bytes() == before
    code, out, err = _cli("users", "list", "--config", str(path))
    assert code == 2 and out == "" and f"use: threatgate cluster users list --config {path}" in err


def test_a_disabled_cluster_element_is_no_cluster(tmp_path: Path) -> None:
    path = _config(tmp_path, HTTP_BLOCK + CLUSTER_BLOCK.replace("<Cluster>", '<Cluster enabled="false">'))
    assert _add(path, "bob")[0] == 0
    assert "bob" in _users(path)


def test_remove_takes_the_whole_line_and_keeps_the_rest(tmp_path: Path) -> None:
    path = _config(tmp_path)
    original = path.read_text()
    assert _add(path, "bob")[0] == 0
    code, out, err = _cli("users", "remove", "--config", str(path), "bob")
    assert code == 0, err
    assert out == f"user bob removed from {path}; a running node refuses it within a second (no reload needed)\n"
    assert path.read_text() == original
    code, out, err = _cli("users", "remove", "--config", str(path), "analyst")
    assert code == 0, err
    assert _users(path) == {} and 'password_hash="commented out"' in path.read_text()


def test_remove_of_an_unknown_user_changes_nothing(tmp_path: Path) -> None:
    path = _config(tmp_path)
    before = path.read_bytes()
    code, _, err = _cli("users", "remove", "--config", str(path), "ghost")  # only in a comment
    assert code == 2 and "no user 'ghost' in <HTTPServer><Users>" in err
    assert path.read_bytes() == before


def test_remove_of_a_user_sharing_a_line(tmp_path: Path) -> None:
    block = HTTP_BLOCK.replace("</Users>", '<User name="bob" password_hash="{old}"/></Users>')
    path = _config(tmp_path, block)
    code, _, err = _cli("users", "remove", "--config", str(path), "bob")
    assert code == 0, err
    assert list(_users(path)) == ["analyst"]
    assert "    </Users>" in path.read_text()


def test_list(tmp_path: Path) -> None:
    path = _config(tmp_path)
    assert _add(path, "bob")[0] == 0
    assert _cli("users", "list", "--config", str(path))[:2] == (0, "analyst\nbob\n")
    (tmp_path / "other").mkdir()
    empty = _config(tmp_path / "other", "  <HTTPServer/>\n")
    code, out, err = _cli("users", "list", "--config", str(empty))
    assert (code, out) == (0, "") and "no user in" in err and "every API request gets 401" in err


# -- a balancer config: <Users> of its console, directly in <Config> ------------------------------------


def _balancer_config(tmp_path: Path, users: str | None = None) -> Path:
    text = (EXAMPLES / "balancer.conf").read_text()
    if users is not None:
        text = text.replace("</Config>", users + "</Config>")
    path = tmp_path / "balancer.conf"
    path.write_text(text)
    return path


def _balancer_users(path: Path) -> dict[str, str]:
    from threatgate.config.balancer import load_balancer_config

    return dict(load_balancer_config(str(path)).users)


def test_add_user_to_a_balancer_config_creates_users_in_config(tmp_path: Path) -> None:
    path = _balancer_config(tmp_path)
    code, out, err = _add(path, "operator", "console pw")
    assert code == 0, err
    assert "after a reload" in out
    users = _balancer_users(path)
    assert list(users) == ["operator"]
    assert verify_password(users["operator"], "console pw")
    assert '  <Users>\n    <User name="operator"' in path.read_text()
    assert "<!-- Extensions (optional; these are the defaults). -->" in path.read_text()  # text edit, not re-serialised


def test_add_update_list_and_remove_on_a_balancer_config(tmp_path: Path) -> None:
    path = _balancer_config(tmp_path, f'  <Users>\n    <User name="analyst" password_hash="{OLD_HASH}"/>\n  </Users>\n')
    assert _add(path, "bob")[0] == 0
    assert _add(path, "analyst", "new pw")[0] == 0
    users = _balancer_users(path)
    assert list(users) == ["analyst", "bob"]
    assert verify_password(users["analyst"], "new pw")
    listed = CliRunner().invoke(main, ["users", "list", "--config", str(path)])
    assert listed.exit_code == 0 and listed.stdout.split() == ["analyst", "bob"]
    removed = CliRunner().invoke(main, ["users", "remove", "--config", str(path), "bob"])
    assert removed.exit_code == 0, removed.stderr
    assert list(_balancer_users(path)) == ["analyst"]
    gone = CliRunner().invoke(main, ["users", "remove", "--config", str(path), "ghost"])
    assert gone.exit_code == 2 and "no user 'ghost' in <Users>" in gone.stderr
