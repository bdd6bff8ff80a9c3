"""config/users.py: the file side of ``users add|remove`` (the text edits are covered by tests/test_cli.py).

The edit goes through fs.write_atomic: checked in the temporary file, renamed only when right, and a
failure leaves the old file and no temporary file behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from threatgate.cli import main
from threatgate.config import users
from threatgate.errors import ConfigError, FileWriteError

CONFIG = """\
<Configuration>
  <!-- keep me -->
  <HTTPServer>
    <Users>
      <User name="analyst" password_hash="old"/>
    </Users>
  </HTTPServer>
</Configuration>
"""


def config(tmp_path: Path) -> Path:
    path = tmp_path / "node.conf"
    path.write_text(CONFIG)
    return path


def fail_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)


def test_store_user_edits_the_text_in_place(tmp_path: Path) -> None:
    path = config(tmp_path)
    assert users.store_user(str(path), "bob", "h", "cmd") is False
    assert users.store_user(str(path), "bob", "h2", "cmd") is True
    text = path.read_text()
    assert "<!-- keep me -->" in text
    assert '<User name="bob" password_hash="h2"/>' in text
    assert os.listdir(tmp_path) == ["node.conf"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config(tmp_path)
    fail_fsync(monkeypatch)
    with pytest.raises(FileWriteError) as info:
        users.store_user(str(path), "bob", "h", "cmd")
    assert info.value.path == str(path.resolve())
    assert info.value.reason == "No space left on device"
    assert path.read_text() == CONFIG
    assert os.listdir(tmp_path) == ["node.conf"]


def test_the_cli_says_it_cannot_write_the_file_and_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = config(tmp_path)
    fail_fsync(monkeypatch)
    result = CliRunner().invoke(main, ["users", "remove", "--config", str(path), "analyst"], catch_exceptions=False)
    assert result.exit_code == 1
    assert result.stderr == f"threatgate: cannot write {path}: No space left on device\n"
    assert path.read_text() == CONFIG


def test_a_file_changed_during_the_edit_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = config(tmp_path)
    edit = users.upsert_user

    def edit_and_meddle(text: str, name: str, element: str, holder: str = "HTTPServer") -> tuple[str, bool]:
        path.write_text(CONFIG + "<!-- someone else -->\n")
        return edit(text, name, element, holder)

    monkeypatch.setattr(users, "upsert_user", edit_and_meddle)
    with pytest.raises(ConfigError, match="the file changed while it was being edited"):
        users.store_user(str(path), "bob", "h", "cmd")
    assert path.read_text().endswith("<!-- someone else -->\n")
    assert os.listdir(tmp_path) == ["node.conf"]
