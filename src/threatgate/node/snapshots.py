"""The node's snapshot directory: one snapshot file per loaded feed version, mapped instead of parsed.

Invariants:
1. A file's name comes from the sha256 of the feed bytes and the digest of the settings that shape its
   content (:func:`settings_digest`), so an unchanged feed finds its snapshot by name at start-up and
   maps it without parsing; any other bytes or settings give another name.
2. A snapshot is trusted only after :func:`~threatgate.node.snapfile.read_checked`: a truncated,
   corrupt or foreign file (another byte order, format version, machine layout) is refused with the
   reason, logged at WARNING, counted (``threatgate_snapshot_rebuilds_total{feed,reason}``), removed and
   rebuilt.
3. A new snapshot is built in a separate process (``python -m threatgate.node.snapshots``): the parse
   allocates several times the feed's size in Python objects, and a process that exits returns all of
   it to the OS; several feeds build on several cores.  The worker writes the file atomically
   (snapfile.write_atomic) and answers one JSON line; the node maps what it wrote.  A feed smaller than
   :data:`IN_PROCESS_BELOW` is built in a thread of the node instead (the node decides; see service.py).
4. Files no loaded version uses are removed (:meth:`SnapshotDir.remove_unused`), never one that the
   live store maps.  The directory is 0700 and every file 0600.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from threatgate import __version__
from threatgate.config.node import FeedSettings
from threatgate.errors import FeedError, FileWriteError, SnapshotInvalid
from threatgate.fs import os_reason
from threatgate.node import snapfile
from threatgate.node.feeds import FeedSnapshot, feed_identity

log = logging.getLogger("threatgate.node")

SUFFIX = ".tgsnap"
_READ_CHUNK = 1 << 22

IN_PROCESS_BELOW = int(os.environ.get("THREATGATE_SNAPSHOT_IN_PROCESS_BELOW", 4 << 20))
"""Feeds smaller than this many bytes are parsed in a thread of the node instead of a worker process:
their parse allocates a few tens of MB at most, and starting a worker (a Python interpreter and its
imports, ~0.3 s) would cost more than the parse itself.  The environment variable exists for tests."""


def settings_digest(settings: FeedSettings) -> bytes:
    """The digest of everything besides the feed bytes that shapes a snapshot's content.

    The threatgate version is part of it: another version may normalise or classify differently, so
    its snapshots are rebuilt rather than trusted.
    """
    shape = [
        __version__,
        snapfile.FORMAT_VERSION,
        settings.format,
        settings.delimiter,
        settings.indicator_column,
        settings.context_columns,
    ]
    return hashlib.sha256(json.dumps(shape).encode()).digest()


def snapshot_name(feed_digest: bytes, settings: bytes) -> str:
    return f"{feed_digest.hex()[:40]}-{settings.hex()[:16]}{SUFFIX}"


def source_digest(settings: FeedSettings) -> tuple[tuple[int, int, int], bytes]:
    """(identity, sha256) of the feed's bytes as a build would read them (blocking; streams, holds no copy).

    For a MISP feed: the manifest and the event files it names, as :func:`~threatgate.node.misp.load_misp`
    digests them.

    Raises:
        FeedError: the feed cannot be read.
    """
    identity = feed_identity(settings)
    if settings.format == "misp":
        from threatgate.node.misp import misp_digest

        return identity, misp_digest(settings)
    path = settings.path
    try:  # as feeds._read_feed_file opens it: O_NONBLOCK, so a FIFO put in place of the file never hangs
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise FeedError(f"{path}: cannot open: {os_reason(exc)}") from None
    digest = hashlib.sha256()
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FeedError(f"{path}: not a regular file")
        while chunk := os.read(fd, _READ_CHUNK):
            digest.update(chunk)
    except OSError as exc:
        raise FeedError(f"{path}: cannot read: {os_reason(exc)}") from None
    finally:
        os.close(fd)
    return identity, digest.digest()


def source_size(settings: FeedSettings) -> int:
    """The bytes a build of the feed parses (a MISP feed: every JSON file of its directory); -1 unknown."""
    try:
        if settings.format != "misp":
            return os.stat(settings.path).st_size
        with os.scandir(settings.path) as entries:
            return sum(e.stat().st_size for e in entries if e.name.endswith(".json") and e.is_file())
    except OSError:
        return -1


@dataclass(frozen=True, slots=True)
class Refused:
    """An existing snapshot file that was not trusted, and why."""

    path: str
    reason: str
    detail: str


_TAKEN: dict[str, int] = {}
"""Snapshot directories this process holds (real path -> the descriptor of its locked ``.lock``)."""


def _take(path: str) -> None:
    """Hold ``path`` for this process until it exits (a reload or a second SnapshotDir takes it again freely)."""
    real = os.path.realpath(path)
    if real in _TAKEN:
        return
    fd = os.open(os.path.join(real, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(
            errno.EBUSY, "in use by another threatgate process: give each node its own <Feeds snapshot_dir>"
        ) from None
    _TAKEN[real] = fd


class SnapshotDir:
    """The directory of snapshot files of one node (blocking methods: call them from a worker thread)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def prepare(self) -> None:
        """Create the directory 0700 (tightening an existing one), take it for this process (an exclusive
        lock held for the process's life: two node processes sharing a directory would remove each other's
        files and builds in progress), and remove temporary files a crash left.

        Raises:
            OSError: the directory cannot be made or used, or another process holds it.
        """
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        os.chmod(self.path, 0o700)
        _take(self.path)
        for name in os.listdir(self.path):
            if name.startswith(".") and name.endswith(".tmp"):  # fs.write_atomic's (and older .snap-*.tmp)
                _unlink(os.path.join(self.path, name))

    def file_for(self, feed_digest: bytes, settings: FeedSettings) -> str:
        return os.path.join(self.path, snapshot_name(feed_digest, settings_digest(settings)))

    def map_existing(
        self, settings: FeedSettings, identity: tuple[int, int, int], feed_digest: bytes
    ) -> FeedSnapshot | Refused | None:
        """The snapshot of these feed bytes if a trusted file exists; Refused (and removed) if one is not
        to be trusted; None if there is none."""
        path = self.file_for(feed_digest, settings)
        try:
            index = snapfile.read_checked(path, feed_digest, settings_digest(settings))
        except FileNotFoundError:
            return None
        except SnapshotInvalid as exc:
            _unlink(path)
            return Refused(path, exc.reason, str(exc))
        except OSError as exc:
            _unlink(path)
            return Refused(path, "unreadable", os_reason(exc))
        snapshot = FeedSnapshot(settings, index, path)
        snapshot.identity = identity
        return snapshot

    def map_built(self, settings: FeedSettings, built: Built) -> FeedSnapshot:
        """Map the snapshot a worker just wrote (checked like any other).

        Raises:
            FeedError: the file is not there or not to be trusted (a disk problem): keep the previous version.
        """
        try:
            index = snapfile.read_checked(built.path, built.feed_digest, settings_digest(settings))
        except (OSError, SnapshotInvalid) as exc:
            raise FeedError(f"{settings.path}: the snapshot just built cannot be read back: {exc}") from None
        snapshot = FeedSnapshot(settings, index, built.path)
        snapshot.identity = built.identity
        return snapshot

    def load(self, settings: FeedSettings) -> FeedSnapshot:
        """The mapped snapshot of the feed: the existing one if trusted, else built in this process
        (blocking; for tools and benchmarks: the node builds in a worker process instead).

        Raises:
            FeedError: the feed cannot be read or is not a feed, or its snapshot cannot be written.
        """
        self.prepare()
        identity, digest = source_digest(settings)
        found = self.map_existing(settings, identity, digest)
        if isinstance(found, FeedSnapshot):
            return found
        try:
            built = build_snapshot(self.path, settings)
        except (FileWriteError, OSError) as exc:
            raise write_failure(settings, self.path, exc) from None
        return self.map_built(settings, built)

    def remove_unused(self, in_use: Iterable[str]) -> list[str]:
        """Remove the snapshot files not in ``in_use`` (paths); returns the names removed."""
        keep = {os.path.basename(p) for p in in_use}
        removed = []
        try:
            names = os.listdir(self.path)
        except OSError:
            return []
        for name in names:
            if name.endswith(SUFFIX) and name not in keep:
                if _unlink(os.path.join(self.path, name)):
                    removed.append(name)
        return removed


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, os_reason(exc))
        return False
    return True


# -- the build worker -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Built:
    """What a build worker wrote: the snapshot file, the identity and digest of the bytes it parsed."""

    path: str
    identity: tuple[int, int, int]
    feed_digest: bytes


def build_snapshot(directory: str, settings: FeedSettings) -> Built:
    """Parse the feed and write its snapshot into ``directory`` (blocking; what the worker process runs).

    Raises:
        FeedError: the feed is not a feed at all.
        FileWriteError: the snapshot cannot be written (OSError: the feed cannot be read).
    """
    from threatgate.node.feeds import parse_source

    parsed, identity, digest = parse_source(settings)
    try:
        chunks = snapfile.build(parsed, digest, settings_digest(settings))
    except FeedError as exc:
        raise FeedError(f"{settings.path}: {exc}") from None
    del parsed
    path = os.path.join(directory, snapshot_name(digest, settings_digest(settings)))
    snapfile.write_atomic(path, chunks)
    return Built(path, identity, digest)


def write_failure(settings: FeedSettings, directory: str, exc: FileWriteError | OSError) -> FeedError:
    """The failed load of a snapshot that cannot be written, in the same words wherever it was built."""
    why = exc.reason if isinstance(exc, FileWriteError) else os_reason(exc)
    return FeedError(f"{settings.path}: cannot write its snapshot in {directory}: {why}")


BUILD_TIMEOUT_FLOOR = 120.0
"""Seconds a build worker is always given; a feed gets one more second per 10 MB of it (a 10M-indicator
feed set of 747 MB builds in about 10 s per feed here), so only a worker that hangs is cut short."""


def build_timeout(settings: FeedSettings) -> float:
    """How long the build worker of ``settings``'s feed may take before it is killed."""
    return BUILD_TIMEOUT_FLOOR + max(source_size(settings), 0) / 10e6


async def build_in_worker(directory: str, settings: FeedSettings) -> Built:
    """Build the snapshot of ``settings``'s feed in a separate Python process.

    Raises:
        FeedError: the feed is not a feed (the worker's message), the worker failed (its last words), or it
            did not finish within :func:`build_timeout` (killed: a hung worker never holds up reloads).
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "threatgate.node.snapshots",
            directory,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:  # no memory or processes left to start it
        raise FeedError(f"{settings.path}: cannot start the snapshot build worker: {os_reason(exc)}") from None
    timeout = build_timeout(settings)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(settings.model_dump_json().encode())
    except (asyncio.CancelledError, TimeoutError) as exc:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if isinstance(exc, TimeoutError):
            raise FeedError(
                f"{settings.path}: the snapshot build worker did not finish within {timeout:.1f} s and was killed"
            ) from None
        raise
    answer = _answer(out)
    if proc.returncode == 0 and answer is not None and "path" in answer:
        return Built(answer["path"], tuple(answer["identity"]), bytes.fromhex(answer["digest"]))  # type: ignore[arg-type]
    if answer is not None and "error" in answer:
        raise FeedError(str(answer["error"]))
    last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    raise FeedError(f"{settings.path}: the snapshot build worker failed: {last[0][:300]}")


def _answer(out: bytes) -> dict[str, object] | None:
    lines = out.strip().splitlines()
    if not lines:
        return None
    try:
        answer = json.loads(lines[-1])
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _worker_main(argv: list[str]) -> int:
    """``python -m threatgate.node.snapshots DIR``: settings (JSON) on stdin, one JSON answer on stdout."""
    directory = argv[0]
    settings = FeedSettings.model_validate_json(sys.stdin.buffer.read())
    try:
        built = build_snapshot(directory, settings)
    except FeedError as exc:
        print(json.dumps({"error": str(exc)}))
        return 0
    except (FileWriteError, OSError) as exc:
        print(json.dumps({"error": str(write_failure(settings, directory, exc))}))
        return 0
    print(json.dumps({"path": built.path, "identity": list(built.identity), "digest": built.feed_digest.hex()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
