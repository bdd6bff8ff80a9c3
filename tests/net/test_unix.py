"""Tests for threatgate.net.unix: owner-only UNIX sockets at any path length, stale files, peers.

Real sockets and a real second user: a subprocess that switches to ``nobody`` before it connects.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from threatgate.net import unix

NOBODY = 65534


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's own are 0700: they would hide the socket's mode)."""
    path = Path(tempfile.mkdtemp(prefix="tg-unix-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def connect_as(uid: int, path: Path) -> str:
    """Connect to ``path`` from a process running as ``uid`` (a forked child: no interpreter to exec as
    that user); ``ok <answer>`` or the errno name."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                try:
                    sock.connect(str(path))
                    sock.sendall(b'{"command": "list"}\n')
                    result = "ok " + sock.recv(4096).decode().strip()
                except OSError as exc:
                    result = errno.errorcode.get(exc.errno or 0, str(exc))
            os.write(write_end, result.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read().decode()
    os.waitpid(pid, 0)
    return out.strip()


def test_a_socket_is_owner_only_before_it_listens(open_dir: Path) -> None:
    path = open_dir / "admin.sock"
    sock = unix.listen_owner_only(str(path))
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        if os.geteuid() != 0:
            pytest.skip("needs root to run a process as another user")
        assert connect_as(NOBODY, path) == "EACCES"
    finally:
        sock.close()


def test_a_long_path_is_reached_through_its_directory(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "kl_balancer.sock"
    assert len(str(path)) > unix.SUN_PATH_MAX
    server = unix.listen_owner_only(str(path))
    try:
        assert path.is_socket()
        with socket.socket(socket.AF_UNIX) as client, unix.short_name(str(path)) as name:
            client.connect(name)
            conn, _ = server.accept()
            with conn:
                assert unix.peer_uid(conn) == os.geteuid() and unix.peer_allowed(unix.peer_uid(conn))
    finally:
        server.close()


def test_a_stale_socket_is_replaced_a_live_one_or_a_file_is_not(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    first = unix.listen_owner_only(str(path))
    with pytest.raises(unix.SocketInUse, match="another process listens on"):
        unix.listen_owner_only(str(path))
    first.close()  # killed without removing its file: the file stays, nobody answers
    assert path.is_socket()
    second = unix.listen_owner_only(str(path))
    second.close()
    unix.remove(str(path))
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(FileExistsError, match="is not a socket"):
        unix.listen_owner_only(str(path))
    unix.remove(str(path))  # only sockets are removed
    assert path.read_text() == "not a socket"


def test_only_the_owner_and_root_are_allowed() -> None:
    assert unix.peer_allowed(os.geteuid()) and unix.peer_allowed(0)
    assert not unix.peer_allowed(NOBODY) or os.geteuid() == NOBODY
