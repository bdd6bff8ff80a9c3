"""Local UNIX sockets for operators: owner-only, stale files replaced, any path length.

A UNIX socket's address holds at most 107 bytes of path; a configuration directory (or a test's
temporary one) may be deeper.  :func:`short_name` reaches the same file through ``/proc/self/fd/N/``
of an ``O_PATH`` descriptor of its directory, which Linux resolves like the real path, so bind and
connect work for any path.

:func:`listen_owner_only` binds, sets mode 0600 *before* listening (a connect in between is refused,
never accepted with the umask's mode), and refuses to take over a socket another process still
serves.  :func:`peer_allowed` is the second lock: the peer's user (``SO_PEERCRED``) must be this
process's or root's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
from collections.abc import Iterator

SUN_PATH_MAX = 107
"""Bytes of path a sockaddr_un holds (108 with the NUL)."""


class SocketInUse(OSError):
    """Another process answers on the socket path: it is not ours to replace."""


@contextlib.contextmanager
def short_name(path: str) -> Iterator[str]:
    """A name of ``path`` short enough for a UNIX socket address (the path itself when it fits)."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield path
        return
    directory, name = os.path.split(os.path.abspath(path))
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def listen_owner_only(path: str, backlog: int = 16) -> socket.socket:
    """A listening UNIX socket at ``path``, mode 0600 (a stale socket file there is replaced).

    Raises:
        SocketInUse: a process accepts connections on ``path``.
        FileExistsError: ``path`` exists and is not a socket (never deleted).
        OSError: the directory is missing or not writable.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        if _answers(path):
            raise SocketInUse(f"another process listens on {path}")
        os.unlink(path)  # stale: left by a process that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with short_name(path) as name:
            sock.bind(name)
        os.chmod(path, 0o600)  # before listen(): until then a connect is refused
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            with short_name(path) as name:
                probe.connect(name)
        except OSError:
            return False
    return True


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a connected UNIX socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def peer_allowed(uid: int) -> bool:
    """Only the balancer's own user and root may command it."""
    return uid in (os.geteuid(), 0)


def remove(path: str) -> None:
    """Remove the socket file at shutdown (if it is still a socket)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
