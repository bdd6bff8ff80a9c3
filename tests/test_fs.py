"""threatgate.fs: the one atomic write (mode, replace, failure leaves the old file, errors name the path)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from threatgate.errors import ConfigError, FileWriteError
from threatgate.fs import locked_directory, os_reason, write_atomic


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writes_with_the_mode_given_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_atomic(str(tmp_path / "cert.pem"), b"public", 0o644)
    finally:
        os.umask(old)
    write_atomic(str(tmp_path / "key.pem"), b"secret")
    assert (tmp_path / "cert.pem").read_bytes() == b"public"
    assert mode_of(tmp_path / "cert.pem") == 0o644
    assert mode_of(tmp_path / "key.pem") == 0o600  # the default: private


def test_replaces_an_existing_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    write_atomic(str(target), [b"n", memoryview(b"ew")], 0o600)
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["state.json"]


def test_writes_views_of_arrays_byte_for_byte(tmp_path: Path) -> None:
    import array

    numbers = array.array("I", [1, 2, 3])
    write_atomic(str(tmp_path / "n"), [memoryview(numbers)], durable=False)
    assert (tmp_path / "n").read_bytes() == numbers.tobytes()


def test_creates_missing_directories_0700(tmp_path: Path) -> None:
    write_atomic(str(tmp_path / "a" / "b" / "f"), b"x")
    assert mode_of(tmp_path / "a") == 0o700
    assert mode_of(tmp_path / "a" / "b") == 0o700


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_failure_leaves_the_old_file_and_names_the_path(tmp_path: Path) -> None:
    target = tmp_path / "pins" / "node.pem"
    target.parent.mkdir()
    target.write_bytes(b"old")
    target.parent.chmod(0o500)
    try:
        with pytest.raises(FileWriteError) as info:
            write_atomic(str(target), b"new")
    finally:
        target.parent.chmod(0o700)
    assert info.value.path == str(target)
    assert info.value.reason == "Permission denied"
    assert str(info.value) == f"cannot write {target}: Permission denied"
    assert target.read_bytes() == b"old"
    assert os.listdir(target.parent) == ["node.pem"]


def test_a_directory_in_the_way_is_a_file_write_error(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    with pytest.raises(FileWriteError, match="Is a directory"):
        write_atomic(str(tmp_path / "f"), b"x")
    assert os.listdir(tmp_path) == ["f"]


def test_before_replace_sees_the_whole_new_file_and_can_abort(tmp_path: Path) -> None:
    target = tmp_path / "node.conf"
    target.write_bytes(b"old")
    seen: list[bytes] = []

    def refuse(tmp: str) -> None:
        seen.append(Path(tmp).read_bytes())
        assert mode_of(Path(tmp)) == 0o640
        raise ConfigError(str(target), 0, "", "the edit would break it")

    with pytest.raises(ConfigError, match="the edit would break it"):
        write_atomic(str(target), b"new", 0o640, before_replace=refuse)
    assert seen == [b"new"]
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["node.conf"]


def test_owner_is_best_effort(tmp_path: Path) -> None:
    write_atomic(str(tmp_path / "f"), b"x", owner=(0, 0))  # not root: kept ours, no error
    assert os.stat(tmp_path / "f").st_uid == os.geteuid() or os.geteuid() == 0


def test_os_reason_gives_the_systems_words_without_the_file_name() -> None:
    try:
        open("/nonexistent/threatgate-test")
    except OSError as exc:
        assert os_reason(exc) == "No such file or directory"
    assert os_reason(OSError("descriptor 7 is not a socket")) == "descriptor 7 is not a socket"
    assert os_reason(OSError()) == "failed"
    assert len(os_reason(OSError("x" * 1000))) == 300


def test_a_failed_fsync_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "identity.json"
    target.write_bytes(b"old")

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(FileWriteError) as info:
        write_atomic(str(target), b"new")
    assert str(info.value) == f"cannot write {target}: Input/output error"
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["identity.json"]


def test_locked_directory_is_created_0700_and_held_exclusively(tmp_path: Path) -> None:
    import fcntl

    where = tmp_path / "a" / "certs"
    with locked_directory(str(where)):
        assert stat.S_IMODE(where.stat().st_mode) == 0o700
        other = os.open(where, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by the block above
        finally:
            os.close(other)
    other = os.open(where, os.O_RDONLY)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the block
    finally:
        os.close(other)
