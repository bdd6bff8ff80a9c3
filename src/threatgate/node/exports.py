"""IoC export tasks: CSV files of indicators served at ``GET /ioc_exports/<task>``.

A task (``<IoCExports><IoCExport .../>``) names the feeds or suppliers it takes indicators from
(by category, feed name or supplier name; all when empty), the columns and a record limit
(at most 50,000, as documented).  The CSV is generated in a worker thread and cached:

- ``update_frequency="0"``: regenerated after every change of the indicator stores (feed reload or
  supplier push), so the export always reflects what the node matches;
- otherwise: regenerated at most every ``update_frequency`` minutes.

Format (CyberTrace's): ``Content-Type: text/csv``, ``Content-Disposition: attachment;filename=<name>.csv``,
a ``#col1<delim>col2`` header line when ``create_header`` is true, then rows with every value quoted.
FalsePositive snapshots are never exported unless a task names them: they are not threat indicators.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.web_request import BaseRequest

from threatgate.config.node import IoCExportSettings
from threatgate.net.http import json_error, unauthorized
from threatgate.node.auth import BasicAuth
from threatgate.node.feeds import FeedSnapshot, indicator_of

if TYPE_CHECKING:
    from threatgate.node.service import NodeService

log = logging.getLogger("threatgate.exports")


def _selected(task: IoCExportSettings, snap: FeedSnapshot) -> bool:
    s = snap.settings
    if s.supplier == "FalsePositive":
        # Not threat indicators: only a task that names FalsePositive itself exports them (never the
        # false-positive marks a supplier made through the API, which carry that supplier's name).
        return "FalsePositive" in task.sources and s.name == "FalsePositive"
    return not task.sources or s.category in task.sources or s.name in task.sources


def render_export(task: IoCExportSettings, snapshots: list[FeedSnapshot]) -> bytes:
    """The CSV body of ``task`` over ``snapshots`` (blocking: reads records back from feed files)."""
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
        for record_no in range(len(snap.offsets)):
            record = snap.read_record(record_no)
            if record is None:
                continue
            indicator = indicator_of(record)
            if indicator is None:
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
                    value = record.get(name, "")
                    row.append("" if isinstance(value, dict | list) or value is None else str(value))
            writer.writerow(row)
            left -= 1
            if left <= 0:
                break
    return buf.getvalue().encode("utf-8")


class Exports:
    """Serves the configured export tasks of one node."""

    def __init__(self, node: NodeService) -> None:
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
