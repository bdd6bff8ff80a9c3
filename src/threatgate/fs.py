"""Atomic file writes: a reader sees the old file or the whole new one, never a mix or a torn file.

Every file threatgate writes for itself goes through :func:`write_atomic`: TLS keys and certificates
(net/tls.py), the balancer's pins (balancer/pins.py), the cluster state (cluster/state.py), feed
snapshots (node/snapfile.py) and the node config that ``threatgate users add|remove`` edits
(config/users.py).  One implementation, so that each gets the same guarantees:

1. The data goes to a temporary file beside the target (same filesystem, so the rename is atomic),
   named ``.<name>.<random>.tmp`` and created ``O_EXCL``: two writers never share one.
2. Its mode is set on the open descriptor before the first byte (``fchmod``, whatever the umask), so a
   private key is 0600 from its first byte; the owner too when asked (a root-run edit of a service's file).
3. ``durable``: the file is fsynced before the rename and the directory after it, so a power loss
   leaves the old file or the new one.  Snapshots skip both: a torn one fails its checksum and is rebuilt.
4. Any failure removes the temporary file and leaves the old file as it was; an OS error becomes
   :class:`~threatgate.errors.FileWriteError`, naming the file and the system's words.
5. Missing parent directories are created 0700 (``os.makedirs`` would apply the mode to the leaf only).

:func:`os_reason` is the one place a failed file or system call is put into words for a message that
names the file itself; network errors go through :func:`threatgate.net.describe.describe`.  This
module imports nothing of threatgate but errors.py: config, net and node all use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Callable, Iterable, Iterator

from threatgate.errors import FileWriteError

MAX_REASON = 300
"""Characters of the system's words kept (as net/describe.py bounds every message)."""

Buffer = bytes | memoryview
"""A piece of the file: bytes, or a view of an array (written without a copy)."""


def write_atomic(
    path: str,
    data: Buffer | Iterable[Buffer],
    mode: int = 0o600,
    *,
    durable: bool = True,
    owner: tuple[int, int] | None = None,
    before_replace: Callable[[str], None] | None = None,
) -> None:
    """Replace ``path`` with ``data`` (one buffer or several, written in order) atomically.

    Args:
        mode: the new file's permission bits, exactly (0600 for keys and private state).
        durable: fsync the file and its directory (rule 3).
        owner: ``(uid, gid)`` to give the new file; best effort (only root may give a file away).
        before_replace: called with the temporary file's path once it holds every byte, before the
            rename; whatever it raises aborts the write and propagates as is (a check of the new
            content, or of the old file not having changed meanwhile).

    Raises:
        FileWriteError: the file cannot be written (the old one is intact).
    """
    chunks = [data] if isinstance(data, bytes | memoryview) else list(data)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        _make_dirs(directory)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise FileWriteError(path, os_reason(exc)) from None
    try:
        try:
            _fill(fd, chunks, mode, owner, durable)
        finally:
            os.close(fd)
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        _unlink_quietly(tmp)
        if isinstance(exc, OSError):
            raise FileWriteError(path, os_reason(exc)) from None
        raise
    if durable:
        _fsync_dir(directory)


@contextlib.contextmanager
def locked_directory(directory: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` (created 0700 if missing) for the ``with`` block.

    For a check-then-create across processes (two nodes starting together on one config directory must
    not each write half of a generated pair): no lock file is left behind, the kernel drops the lock
    with the process.

    Raises:
        OSError: the directory cannot be created or opened.
    """
    _make_dirs(directory)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def os_reason(exc: OSError) -> str:
    """The system's words for a failed file or system call (``No such file or directory``), without the
    file name the caller's message already holds: ``f"cannot read {path}: {os_reason(exc)}"``.

    An OSError raised by hand without them: its message, first line, bounded; else ``failed``.
    """
    text = (exc.strerror or str(exc)).strip()
    first = text.splitlines()[0] if text else "failed"
    return first if len(first) <= MAX_REASON else first[: MAX_REASON - 1] + "…"


def _fill(fd: int, chunks: list[Buffer], mode: int, owner: tuple[int, int] | None, durable: bool) -> None:
    os.fchmod(fd, mode)  # exact mode whatever the umask, before the first byte
    if owner is not None:
        try:
            os.fchown(fd, *owner)
        except OSError:
            pass  # not root: the file stays ours
    for chunk in chunks:
        view = memoryview(chunk).cast("B")  # slices count bytes, whatever the array's item size
        while view:
            view = view[os.write(fd, view) :]
    if durable:
        os.fsync(fd)


def _make_dirs(directory: str) -> None:
    """Create ``directory`` and any missing parents 0700."""
    if os.path.isdir(directory):
        return
    _make_dirs(os.path.dirname(directory))
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        if not os.path.isdir(directory):
            raise


def _fsync_dir(directory: str) -> None:
    """Make the rename durable; best effort (some filesystems refuse to fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
