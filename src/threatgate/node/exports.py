"""IoC export tasks: CSV files of indicators served at ``GET /ioc_exports/<task>``.

A task (``<IoCExports><IoCExport .../>``) names the feeds or suppliers it takes indicators from
(by category, feed name or supplier name; all when empty), the columns and a record limit
(at most 50,000, as documented).  The CSV is generated in a worker thread and cached:

- ``update_frequency="0"``: regenerated after every change of the indicator stores (feed reload or
  supplier push), so the export always reflects what the node matches;
- otherwise: regenerated at most every ``update_frequency`` minutes.

Format (CyberTrace's): ``Content-Type: text/csv``, ``Content-Disposition: attachment;filename=<name>.csv``,
a ``#col1<delim>col2`` header line when ``create_header`` is true, then rows with every value quoted.

An export lists what the node detects, so what the FalsePositive supplier suppresses in matching is
left out (:class:`FalsePositives`): a feed's indicator whose lookup the matcher would answer "false
positive" is not in the file (an ``InternalTI`` one is, as it still detects).  FalsePositive snapshots
themselves are never exported unless a task names them: they are not threat indicators.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import time
from collections.abc import Mapping
from typing import Protocol

from aiohttp import web
from aiohttp.web_request import BaseRequest

from threatgate.config.node import IoCExportSettings, NodeConfig
from threatgate.net.http import json_error, unauthorized
from threatgate.node.auth import Authenticator, BasicAuth
from threatgate.node.feeds import FeedSnapshot, Indicator, Kind, mask_matches, url_host
from threatgate.node.normalize import parse_ip
from threatgate.stats import NodeStats

log = logging.getLogger("threatgate.exports")


def _selected(task: IoCExportSettings, snap: FeedSnapshot) -> bool:
    s = snap.settings
    if s.supplier == "FalsePositive":
        # Not threat indicators: only a task that names FalsePositive itself exports them (never the
        # false-positive marks a supplier made through the API, which carry that supplier's name).
        return "FalsePositive" in task.sources and s.name == "FalsePositive"
    return not task.sources or s.category in task.sources or s.name in task.sources


class FalsePositives:
    """What the FalsePositive supplier suppresses, decided as the matcher decides it (matcher.py rule 4).

    The matcher looks a value up and, when a FalsePositive record matches that value too, drops every hit
    but InternalTI ones.  So an exported indicator is suppressed when looking up its own value would meet
    a FalsePositive record: an exact record of that value, a mask covering the URL, a sub-domain record of
    one of the domain's suffixes, a CIDR holding the address (for a URL, also its host as a domain or IP).
    A pattern record (CIDR, sub-domain record, mask) is suppressed when every value it covers is: a
    FalsePositive record of the same pattern or, for CIDRs and sub-domain records, a wider one.
    Blocking (reads the FalsePositive records from their snapshots); built per export from the snapshots in use.
    """

    def __init__(self, snapshots: list[FeedSnapshot]) -> None:
        self.exact: set[tuple[int, str]] = set()  # (kind, value) of URL, domain, IP and hash records
        self.suffixes: set[str] = set()  # domains whose sub-domains are marked
        self.cidrs: set[tuple[int, int, int]] = set()  # (ip version, prefix length, network)
        self.masks: set[str] = set()
        for snap in snapshots:
            if snap.settings.supplier != "FalsePositive":
                continue
            for record_no in range(len(snap)):
                indicator = snap.indicator(record_no)
                if indicator is not None:
                    self._add(indicator)

    def _add(self, indicator: Indicator) -> None:
        if indicator.kind == Kind.DOMAIN_SUFFIX:
            self.suffixes.add(indicator.value)
        elif indicator.kind == Kind.CIDR and indicator.cidr is not None:
            self.cidrs.add(indicator.cidr)
        elif indicator.kind == Kind.MASK:
            self.masks.add(indicator.value)
        else:
            self.exact.add((indicator.kind, indicator.value))

    def __bool__(self) -> bool:
        return bool(self.exact or self.suffixes or self.cidrs or self.masks)

    def suppresses(self, indicator: Indicator) -> bool:
        """Whether the matcher would answer a lookup of ``indicator`` "false positive" (see the class)."""
        kind, value = indicator.kind, indicator.value
        if kind == Kind.HASH:
            return (kind, value) in self.exact
        if kind == Kind.IP:
            return self._ip(value)
        if kind == Kind.DOMAIN:
            return self._domain(value)
        if kind == Kind.URL:
            return self._url(value)
        if kind == Kind.DOMAIN_SUFFIX:
            return self._suffix_marked(value)
        if kind == Kind.CIDR and indicator.cidr is not None:
            return self._cidr_marked(*indicator.cidr)
        return kind == Kind.MASK and value in self.masks

    def _ip(self, value: str) -> bool:
        if (Kind.IP, value) in self.exact:
            return True
        parsed = parse_ip(value)
        if parsed is None:
            return False
        version, number = parsed
        return self._cidr_marked(version, 32 if version == 4 else 128, number)  # the address as a /32 or /128

    def _cidr_marked(self, version: int, plen: int, net: int) -> bool:
        """A FalsePositive CIDR holds every address of ``version/plen/net`` (the same network or a wider one)."""
        return any(v == version and p <= plen and net >> (plen - p) == n for v, p, n in self.cidrs)

    def _domain(self, value: str) -> bool:
        return (Kind.DOMAIN, value) in self.exact or self._suffix_marked(value)

    def _suffix_marked(self, value: str) -> bool:
        """``value`` or one of its parent domains is a FalsePositive sub-domain record."""
        labels = value.split(".")
        return any(".".join(labels[i:]) in self.suffixes for i in range(len(labels)))

    def _url(self, value: str) -> bool:
        if (Kind.URL, value) in self.exact or any(mask_matches(m, value) for m in self.masks):
            return True
        host = url_host(value)
        if not host:
            return False
        if host[-1:].isdigit() or host.startswith("["):
            return self._ip(host.strip("[]"))
        return self._domain(host)


def render_export(task: IoCExportSettings, snapshots: list[FeedSnapshot]) -> bytes:
    """The CSV body of ``task`` over ``snapshots`` (blocking: reads the records from the snapshots)."""
    false_positives = FalsePositives(snapshots)
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=task.delimiter, quoting=csv.QUOTE_ALL, lineterminator="\n")
    if task.create_header:
        buf.write("#" + task.delimiter.join(task.fields) + "\n")
    left = task.records_limit
    for snap in snapshots:
        if left <= 0:
            break
        if not _selected(task, snap):
            continue
        settings = snap.settings
        for record_no in range(len(snap)):
            record = snap.record(record_no)
            if record is None:
                continue
            indicator = record.indicator()
            context = dict(record.context)
            if false_positives and settings.supplier not in ("FalsePositive", "InternalTI"):
                if false_positives.suppresses(indicator):
                    continue
            row = []
            for name in task.fields:
                if name == "indicator":
                    row.append(indicator.raw)
                elif name == "category":
                    row.append(settings.category)
                elif name == "source":
                    row.append(settings.name)
                elif name == "confidence":
                    row.append(str(settings.confidence))
                else:
                    row.append(context.get(name, ""))
            writer.writerow(row)
            left -= 1
            if left <= 0:
                break
    return buf.getvalue().encode("utf-8")


class SnapshotSource(Protocol):
    """The matcher as an export reads it: the feed and supplier snapshots in use."""

    @property
    def snapshots(self) -> Mapping[int, FeedSnapshot]: ...


class ExportsHost(Protocol):
    """What :class:`Exports` reads of its node (``NodeService`` is one), at every request."""

    @property
    def config(self) -> NodeConfig: ...
    @property
    def stats(self) -> NodeStats: ...
    @property
    def auth(self) -> Authenticator: ...
    @property
    def ready(self) -> bool: ...
    @property
    def store_version(self) -> int: ...
    @property
    def matcher(self) -> SnapshotSource: ...


class Exports:
    """Serves the configured export tasks of one node."""

    def __init__(self, node: ExportsHost) -> None:
        self.node = node
        self._cache: dict[str, tuple[float, int, bytes]] = {}  # name -> (made at, store version, body)
        self._locks: dict[str, asyncio.Lock] = {}
        self._auth: dict[str, BasicAuth] = {}
        for task in node.config.exports:
            if task.user is not None and task.password_hash is not None:
                self._auth[task.name] = BasicAuth({task.user: task.password_hash})

    async def handle(self, request: BaseRequest, segments: tuple[str, ...]) -> web.StreamResponse:
        tasks = {t.name: t for t in self.node.config.exports if t.enabled}
        task = tasks.get(segments[1]) if len(segments) == 2 else None
        auth = self._auth.get(task.name) if task is not None else None
        user = await (auth or self.node.auth).authenticate(request.headers.get("Authorization"))
        if user is None:
            self.node.stats.bump(self.node.stats.bad_input, "api_unauthorized")
            return unauthorized()
        if task is None:
            return json_error(404, f"no enabled export task {'/'.join(segments[1:])[:80]!r}")
        if request.method not in ("GET", "HEAD"):
            return json_error(405, "method not allowed here; allowed: GET", {"Allow": "GET"})
        if not self.node.ready:
            return json_error(425, "feeds are still loading; retry shortly", {"Retry-After": "1"})
        body = await self._body(task)
        return web.Response(
            body=body,
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": f"attachment;filename={task.name}.csv"},
        )

    async def _body(self, task: IoCExportSettings) -> bytes:
        lock = self._locks.setdefault(task.name, asyncio.Lock())
        async with lock:  # one generation per task at a time; concurrent requests share it
            cached = self._cache.get(task.name)
            version = self.node.store_version
            now = time.monotonic()
            if cached is not None:
                made, made_version, body = cached
                fresh = (
                    made_version == version if task.update_frequency == 0 else now - made < task.update_frequency * 60
                )
                if fresh:
                    return body
            snapshots = list(self.node.matcher.snapshots.values())
            started = time.monotonic()
            body = await asyncio.to_thread(render_export, task, snapshots)
            log.info("export %s generated: %d bytes in %.2f s", task.name, len(body), time.monotonic() - started)
            self._cache[task.name] = (now, version, body)
            return body
