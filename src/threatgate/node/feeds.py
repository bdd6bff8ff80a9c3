"""Feed files: parse JSON and CSV feeds into columns of records, the input of a snapshot.

STIX bundles and MISP feed directories are parsed by :mod:`threatgate.node.stix` and
:mod:`threatgate.node.misp` record by record into a :class:`MemorySnapshot` (a builder of the same
columns); :func:`parse_source` dispatches on ``settings.format``.

This module is the top of the feed modules: what a record is lives in :mod:`threatgate.node.records`,
the reference JSON/CSV reader in :mod:`threatgate.node.feedref`, the loaded version in
:mod:`threatgate.node.feedsnapshot`; none of them imports this one, and their public names are
re-exported here for the node's other modules.

Rules:
1. A feed is never held in memory as Python objects once loaded.  Parsing yields columns (kind,
   normalised value, raw indicator text, context pairs per record: :class:`~threatgate.node.records.ParsedFeed`)
   that the snapshot writer (:mod:`threatgate.node.snapfile`) turns into one file the node maps.
2. A malformed record (not an object, no indicator, a value that is not a valid indicator) is
   skipped and counted with its position; it is never fatal.  A file that cannot be a feed at all
   (unreadable, not a JSON array, truncated, no CSV header) raises :class:`FeedError`, so the caller
   keeps the previous version.
3. A loaded version never depends on the feed file staying the same: the file is read once, and every
   record's context is in the snapshot, so a file rewritten in place, truncated, replaced or deleted
   changes nothing for the loaded version; the new content becomes a new version at the next reload
   (the node watches the files: :mod:`threatgate.node.feedwatch`).

Record fields: the indicator is in ``indicator``, or in one of ``mask``/``url``/``domain``/``ip``/
``md5``/``sha1``/``sha256`` (the first of these the record has); every other scalar field is record
context.  A domain record covers sub-domains when written ``*.example.com`` or when a field
``include_subdomains`` (or ``subdomains``) is true.

CSV files are read as the world publishes them (abuse.ch URLhaus, Feodo Tracker): lines starting
with ``#`` are comments, and the header is the first uncommented row that names the indicator
column, or else the last comment line before the first record that does (``# id,dateadded,url,...``).
The Feed attribute ``indicator_column`` names the indicator column (Feodo's ``dst_ip``; it is then
read back as ``indicator``, classified by shape) and ``context_columns`` the columns kept as record
context; a name that is not in the header makes the file refused, never silently ignored.
"""

from __future__ import annotations

import os
import stat

from threatgate.config.node import FeedSettings, NodeConfig
from threatgate.errors import FeedError
from threatgate.fs import os_reason
from threatgate.node.feedref import parse_columns
from threatgate.node.feedsnapshot import FeedSnapshot, MemorySnapshot, SnapshotRef
from threatgate.node.records import (
    INDICATOR_FIELDS,
    MAX_BAD_EXAMPLES,
    MAX_CONTEXT_TEXT,
    Indicator,
    Kind,
    LoadReport,
    Mask,
    ParsedFeed,
    add_row,
    classify,
    context_text,
    feed_identity,
    indicator_field,
    indicator_of,
    key_of,
    mask_from,
    mask_matches,
    parse_document,
    read_document,
    record_context,
    url_host,
)

__all__ = [
    "INDICATOR_FIELDS",
    "MAX_BAD_EXAMPLES",
    "MAX_CONTEXT_TEXT",
    "FeedSnapshot",
    "Indicator",
    "Kind",
    "LoadReport",
    "Mask",
    "MemorySnapshot",
    "ParsedFeed",
    "SnapshotRef",
    "add_row",
    "check_feed_files",
    "classify",
    "context_text",
    "feed_identity",
    "indicator_field",
    "indicator_of",
    "key_of",
    "load_feed",
    "mask_from",
    "mask_matches",
    "parse_columns",
    "parse_document",
    "parse_source",
    "read_document",
    "record_context",
    "url_host",
]


def load_feed(settings: FeedSettings) -> FeedSnapshot:
    """Parse the feed file (or MISP feed directory) named by ``settings`` into an in-memory snapshot.

    The node builds snapshots in a worker process and maps them from its snapshot directory
    (:mod:`threatgate.node.snapshots`); this in-process form serves ``threatgate validate``, tests and
    benchmarks.

    Raises:
        FeedError: the file cannot be read or is not a feed at all (keep the previous version).
    """
    from threatgate.node.snapfile import in_memory

    parsed, identity, _ = parse_source(settings)
    snapshot = FeedSnapshot(settings, in_memory(parsed))
    snapshot.identity = identity
    return snapshot


def parse_source(settings: FeedSettings) -> tuple[ParsedFeed, tuple[int, int, int], bytes]:
    """Read and parse the feed of ``settings``: its columns, the identity read and the sha256 of its bytes.

    Raises:
        FeedError: the feed cannot be read or is not a feed at all.
    """
    import hashlib

    # Imported here, not at the top: a worker process imports this module and never parses a feed
    # (orjson, pyarrow and the STIX/MISP readers stay out of it).
    if settings.format == "stix":
        from threatgate.node.stix import load_stix

        return _parsed(load_stix(settings))
    if settings.format == "misp":
        from threatgate.node.misp import load_misp

        return _parsed(load_misp(settings))
    from threatgate.node.feedparse import parse_feed

    data, st = _read_feed_file(settings.path)
    digest = hashlib.sha256(data).digest()
    return parse_feed(settings, data), (st.st_ino, st.st_size, st.st_mtime_ns), digest


def _parsed(built: MemorySnapshot) -> tuple[ParsedFeed, tuple[int, int, int], bytes]:
    return built.parsed, built.identity, built.digest


def _read_feed_file(path: str) -> tuple[bytes, os.stat_result]:
    """The whole content of the regular file ``path`` and its stat taken *before* reading.

    The stat is the version's identity: if the file changes while it is read, the watcher sees an
    identity other than the loaded one and loads it again.  ``O_NONBLOCK`` keeps a FIFO put in place
    of the file from hanging the loader.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise FeedError(f"{path}: cannot open: {os_reason(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FeedError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(), st
    except OSError as exc:
        raise FeedError(f"{path}: cannot read: {os_reason(exc)}") from None
    finally:
        os.close(fd)


def check_feed_files(config: NodeConfig) -> tuple[list[str], list[str]]:
    """Load every enabled feed of ``config`` as the node would (``threatgate validate``): (errors, warnings).

    An error is a feed that does not load at all (the node would start without it and not be ready);
    a warning, a feed that loads with malformed records skipped.  Each line starts with the config
    file and the ``<Feed>`` element's line.  A missing feed file never gets here: the configuration
    itself is refused for it.
    """
    errors: list[str] = []
    warnings: list[str] = []
    for feed in config.feeds.feeds:
        if not feed.enabled:
            continue
        where = f"{config.path}:{feed.line}: <Feed> {feed.name}"
        try:
            report = parse_source(feed)[0].report
        except FeedError as exc:
            errors.append(f"{where}: does not load: {exc}")
            continue
        if report.malformed:
            warnings.append(
                f"{where}: warning: {report.malformed} malformed record(s) will be skipped, "
                f"e.g. {'; '.join(report.examples)}"
            )
    return errors, warnings
