"""Event matching: framed events in, detection and finished lines out.

Rules (CyberTrace semantics, docs/matching.md):
1. Source: by the sender's IP, then by the syslog host name in the event, else ``default``.
2. The source's replace rules run first (an output containing LF splits the event), then its ignore
   rules (a matching part is dropped).
3. Typed rules run in order: the source's own rules, then ``default`` rules; a default rule whose
   name the source also defines runs only when the source's rule found nothing.  CONTEXT values are
   never looked up; every rule's first value is available as ``%RuleName%``.
4. Each extracted value is normalised and looked up.  One detection per (value, matching record),
   at most ``per_scan_detect_limit`` per value.  A value listed by the FalsePositive supplier
   detects nothing, except through InternalTI records.
5. With SendFinishedEvent, exactly one finished line follows each event's detections, even for an
   event that was ignored, oversized or matched nothing.
Pure: no I/O (detected records are read from the store's snapshots, never from feed files); no clock.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from threatgate.config.node import NodeConfig, Rule, RuleType, Source
from threatgate.node import normalize
from threatgate.node.feeds import FeedSnapshot, Indicator, Kind, mask_matches
from threatgate.node.render import FieldFormat, Fields, Template
from threatgate.node.snapfile import Record
from threatgate.node.store import Candidate, IndicatorStore
from threatgate.wire.framing import FramedEvent, Oversized

_SYSLOG_HOST = re.compile(
    r"(?:\d+\s)?(?:<\d{1,3}>)?(?:"  # an optional balancer request id first
    r"\d \S+ (?P<h5424>\S+)"  # RFC 5424: <PRI>VERSION TIMESTAMP HOSTNAME
    r"|[A-Z][a-z]{2} [ \d]?\d \d\d:\d\d:\d\d (?P<h3164>\S+)"  # RFC 3164: Mmm dd hh:mm:ss HOSTNAME
    r")"
)
_HEX = re.compile(r"[0-9A-Fa-f]+\Z")
_URL_CACHE_MAX = 65536
"""Normalised URLs remembered per matcher; proxies log the same URLs over and over."""
_RECORD_CACHE_MAX = 16384


@dataclass(slots=True)
class MatchStats:
    """Counters for one batch (the service adds them to its metrics)."""

    events: int = 0
    detections: int = 0
    suppressed: int = 0
    ignored: int = 0
    oversized: int = 0
    per_category: dict[str, int] = field(default_factory=dict)
    per_source: dict[str, int] = field(default_factory=dict)  # feed or API supplier name -> detections
    per_indicator: dict[str, int] = field(default_factory=dict)  # matched indicator -> detections (this batch)
    decided: int = 0  # events the compiled engine answered alone (node/engine.py)
    confirmed: int = 0  # events it found candidate indicators in (confirmed against the stored records)


_MISSING: Any = object()


def _covers(record: Record, cand: Candidate) -> bool:
    """Whether a mask or CIDR record holds the probed URL or address."""
    if cand.kind == Kind.MASK:
        return mask_matches(record.value, cand.probe)
    parsed = normalize.parse_ip(cand.probe)
    if parsed is None:
        return False
    version, number = parsed
    indicator = record.indicator()
    assert indicator.cidr is not None
    v, plen, net = indicator.cidr
    return v == version and number >> ((32 if version == 4 else 128) - plen) == net


@dataclass(frozen=True, slots=True)
class Hit:
    """A confirmed match of one value against one record."""

    snapshot: FeedSnapshot
    record_no: int
    indicator: Indicator
    context: tuple[tuple[str, str], ...]
    actionable: tuple[tuple[str, str], ...]


_FINDALL, _SEARCH, _GENERIC = 0, 1, 2


@dataclass(frozen=True, slots=True)
class _Step:
    """One rule ready to run: how to extract (findall / search / generic) and its lookup, or None."""

    rule: Rule
    mode: int
    lookup: Callable[[str, list[Candidate]], bool] | None
    fallback: _Step | None  # the default rule of the same name, run only when ``rule`` finds nothing


def _run(step: _Step, text: str) -> list[str]:
    """The values ``step``'s rule extracts from ``text`` (empty matches dropped)."""
    mode = step.mode
    if mode == _FINDALL:
        values: list[str] = step.rule.pattern.findall(text)
        return values if all(values) else [v for v in values if v]
    if mode == _SEARCH:
        m = step.rule.pattern.search(text)
        if m is None:
            return []
        v = m.group(step.rule.pattern.groups)
        return [v] if v else []
    return _values(step.rule, text)


def _values(rule: Rule, text: str) -> list[str]:
    pattern = rule.pattern
    if pattern.groups <= 1:
        if rule.extract_all:
            return [v for v in pattern.findall(text) if v]
        m = pattern.search(text)
        if m is None:
            return []
        v = m.group(pattern.groups)
        return [v] if v else []
    out = []
    for m in pattern.finditer(text) if rule.extract_all else filter(None, [pattern.search(text)]):
        v = next((g for g in m.groups() if g), "")
        if v:
            out.append(v)
            if not rule.extract_all:
                break
    return out


class Matcher:
    """Matches events against an :class:`IndicatorStore` with one node configuration.

    Swap the store with :meth:`use_store`; a matcher is otherwise immutable configuration plus caches.
    """

    def __init__(self, config: NodeConfig, store: IndicatorStore) -> None:
        self.config = config
        self.store = store
        self.suppliers: IndicatorStore | None = None
        self._snapshots: dict[int, FeedSnapshot] = dict(store.snapshots)
        out = config.output
        self._event = Template(out.event_format)
        self._finished = Template(out.finished_format)
        self._record_field = FieldFormat(out.record_field_format)
        self._actionable_field = FieldFormat(out.actionable_field_format)
        self._limit = config.feeds.per_scan_detect_limit
        sources = {s.id: s for s in config.input.sources}
        self._default = sources["default"]
        self._by_ip = {ip: s.id for s in config.input.sources for ip in s.ips}
        self._by_host = {h: s.id for s in config.input.sources for h in s.hostnames}
        self._url_cache: dict[str, str | None] = {}
        self._record_cache: dict[tuple[int, int], Record | None] = {}
        self._finished_needs_context = bool(self._finished.names & {"RecordContext", "Date"})
        self._lookups: dict[RuleType, Callable[[str, list[Candidate]], bool]] = {
            RuleType.URL: self._lookup_url,
            RuleType.DOMAIN: self._lookup_domain,
            RuleType.IP: self._lookup_ip,
            RuleType.MD5: self._lookup_hash_of(32),
            RuleType.SHA1: self._lookup_hash_of(40),
            RuleType.SHA256: self._lookup_hash_of(64),
            RuleType.HASH: self._lookup_hash_of(0),
        }
        self._plans: dict[str, tuple[Source, tuple[_Step, ...]]] = {
            sid: (s, self._plan(s)) for sid, s in sources.items()
        }

    def __repr__(self) -> str:
        return f"<Matcher sources={len(self._plans)} store={self.store!r}>"

    def use_store(self, store: IndicatorStore) -> None:
        """Swap in a newly built feed store (one reference assignment; caches of records are dropped)."""
        self.store = store
        self._swapped()

    @property
    def snapshots(self) -> dict[int, FeedSnapshot]:
        """Every snapshot matched against: feeds, then API suppliers."""
        return self._snapshots

    def use_suppliers(self, store: IndicatorStore | None) -> None:
        """Swap in the store of REST API suppliers (small, rebuilt on every change; None when empty).

        Kept apart from the feed store so a push costs a rebuild of the pushed supplier only, not of
        millions of feed indicators.  Slots never collide (see ``suppliers.SUPPLIER_SLOT_BASE``).
        """
        self.suppliers = store if store is not None and len(store) else None
        self._swapped()

    def _swapped(self) -> None:
        snapshots = dict(self.store.snapshots)
        if self.suppliers is not None:
            snapshots.update(self.suppliers.snapshots)
        self._snapshots = snapshots
        self._record_cache = {}

    def _step(self, rule: Rule, fallback: Rule | None = None) -> _Step:
        if rule.pattern.groups > 1:
            mode = _GENERIC
        else:
            mode = _FINDALL if rule.extract_all else _SEARCH
        return _Step(
            rule,
            mode,
            self._lookups.get(rule.type),
            self._step(fallback) if fallback is not None else None,
        )

    def _plan(self, source: Source) -> tuple[_Step, ...]:
        default_rules = {r.name: r for r in self._default.rules}
        if source.id == "default":
            return tuple(self._step(r) for r in source.rules)
        own = {r.name for r in source.rules}
        steps = [self._step(r, default_rules.get(r.name)) for r in source.rules]
        steps += [self._step(r) for r in self._default.rules if r.name not in own]
        return tuple(steps)

    # -- lookups ------------------------------------------------------------------------------

    def _lookup_url(self, raw: str, out: list[Candidate]) -> bool:
        cache = self._url_cache
        value = cache.get(raw, "")
        if value == "":
            value = normalize.normalize_url(raw)
            if len(cache) >= _URL_CACHE_MAX:
                cache.clear()
            cache[raw] = value
        if value is None:
            return False
        self.store.lookup_url(value, out)
        if self.suppliers is not None:
            self.suppliers.lookup_url(value, out)
        return True

    def _lookup_domain(self, raw: str, out: list[Candidate]) -> bool:
        value = normalize.normalize_domain(raw)
        if value is None:
            return False
        self.store.lookup_domain(value, out)
        if self.suppliers is not None:
            self.suppliers.lookup_domain(value, out)
        return True

    def _lookup_ip(self, raw: str, out: list[Candidate]) -> bool:
        value = normalize.normalize_ip(raw)
        if value is None:
            return False
        self.store.lookup_ip(value, out)
        if self.suppliers is not None:
            self.suppliers.lookup_ip(value, out)
        return True

    def _lookup_hash_of(self, length: int) -> Callable[[str, list[Candidate]], bool]:
        def lookup(raw: str, out: list[Candidate]) -> bool:
            value = normalize.normalize_hash(raw)
            if value is None or (length and len(value) != length):
                return False
            self.store.lookup_hash(value, out)
            if self.suppliers is not None:
                self.suppliers.lookup_hash(value, out)
            return True

        return lookup

    def lookup(self, rule_type: RuleType, raw: str) -> list[Hit]:
        """Confirmed hits for one value (FalsePositive already applied)."""
        return self.lookup_suppressed(rule_type, raw)[0]

    def lookup_suppressed(self, rule_type: RuleType, raw: str) -> tuple[list[Hit], int]:
        """Confirmed hits for one value, and how many hits the FalsePositive supplier suppressed."""
        candidates: list[Candidate] = []
        lookup = self._lookups.get(rule_type)
        if lookup is None or not lookup(raw, candidates) or not candidates:
            return [], 0
        return self._confirm(candidates)

    def lookup_object(self, raw: str) -> tuple[list[Hit], int]:
        """A REST lookup object of unknown type: an IP, a hash, else a URL (which covers its host).

        Returns the hits and how many the FalsePositive supplier suppressed.
        """
        text = raw.strip()
        if len(text) in (32, 40, 64) and _HEX.match(text):
            return self.lookup_suppressed(RuleType.HASH, text)
        if "/" not in text and normalize.parse_ip(text) is not None:  # a URL is never tried as IPv6
            return self.lookup_suppressed(RuleType.IP, text)
        return self.lookup_suppressed(RuleType.URL, text)

    def lookup_objects(self, objects: list[str]) -> list[tuple[list[Hit], int]]:
        """:meth:`lookup_object` for each of a REST request's objects (the compiled engine batches them)."""
        return [self.lookup_object(value) for value in objects]

    def _confirm(self, candidates: list[Candidate]) -> tuple[list[Hit], int]:
        """Hits confirmed against the stored records, and how many the FalsePositive supplier suppressed."""
        hits: list[Hit] = []
        false_positive = False
        seen: set[tuple[int, int]] = set()
        for cand in candidates:
            ref = (cand.slot, cand.record_no)
            if ref in seen:
                continue
            seen.add(ref)
            snap = self._snapshots.get(cand.slot)
            if snap is None:
                continue
            record = self._record(snap, cand)
            if record is None:
                continue
            supplier = snap.settings.supplier
            if supplier == "FalsePositive":
                false_positive = True
                continue
            context = record.context
            wanted = snap.settings.actionable_fields
            actionable = tuple((n, v) for n, v in context if n in wanted) if wanted else ()
            hits.append(Hit(snap, cand.record_no, record.indicator(), context, actionable))
        if not false_positive:
            return hits, 0
        kept = [h for h in hits if h.snapshot.settings.supplier == "InternalTI"]
        return kept, len(hits) - len(kept)

    def _record(self, snap: FeedSnapshot, cand: Candidate) -> Record | None:
        """The stored record of ``cand`` when it really matches the probed value (None for a Bloom or
        64-bit key collision): equal kind and value; a mask that covers the URL; a CIDR whose network
        holds the address."""
        key = (cand.slot, cand.record_no)
        cache = self._record_cache
        record = cache.get(key, _MISSING)
        if record is _MISSING:
            record = snap.record(cand.record_no)
            if record is not None:  # a failed read is tried again next time (and counted each time)
                if len(cache) >= _RECORD_CACHE_MAX:
                    cache.clear()
                cache[key] = record
        if record is None or record.kind != cand.kind:
            return None
        if cand.kind == Kind.MASK or cand.kind == Kind.CIDR:
            return record if _covers(record, cand) else None
        return record if record.value == cand.probe else None

    # -- events -------------------------------------------------------------------------------

    def match(
        self,
        events: list[FramedEvent],
        *,
        date: str,
        peer_ip: str = "",
        finished: bool = False,
        stats: MatchStats | None = None,
    ) -> list[str]:
        """Match a batch of events; returns the output lines (each ending in LF) in event order.

        Args:
            events: framed events (``Oversized`` markers included).
            date: the text of ``%Date%`` for this batch.
            peer_ip: the sender's address, for source selection.
            finished: emit one FinishedEventFormat line after each event.
            stats: counters to add to.
        """
        st = stats if stats is not None else MatchStats()
        out: list[str] = []
        peer_source = self._by_ip.get(peer_ip)
        for event in events:
            self.match_one(event, peer_source, date, finished, out, st)
        return out

    def match_one(
        self, event: FramedEvent, peer_source: str | None, date: str, finished: bool, out: list[str], st: MatchStats
    ) -> None:
        """Match one event, appending its lines to ``out`` (the compiled engine hands events it cannot
        decide alone to this method, so both paths share one definition of every answer)."""
        st.events += 1
        by_host = self._by_host
        if isinstance(event, Oversized):
            st.oversized += 1
            if finished:
                text = event.prefix
                source_id = peer_source or self._host_source(text, by_host) or "default"
                fields = self._context_only(text, source_id)
                out.append(self._finished_line(fields, 0, {}, date))
            return
        text = event
        source_id = peer_source or (by_host and self._host_source(text, by_host)) or "default"
        source, steps = self._plans[source_id]
        parts: list[str]
        if source.replace:
            for rule in source.replace:
                text = rule.pattern.sub(rule.template, text)
            parts = [p for p in text.split("\n") if p] if "\n" in text else [text]
        else:
            parts = [text]
        if source.ignore:
            kept = [p for p in parts if not any(i.search(p) for i in source.ignore)]
            if len(kept) < len(parts):
                st.ignored += len(parts) - len(kept)
            if not kept:
                if finished:
                    out.append(self._finished_line(self._context_only(parts[0], source_id), 0, {}, date))
                return
            parts = kept
        totals: dict[str, int] = {}
        sent = 0
        first_fields: Fields | None = None
        for part in parts:
            fields, found = self._extract(part, steps, source_id)
            if first_fields is None:
                first_fields = fields
            if found:
                sent += self._detect(found, fields, date, out, totals, st)
        if finished:
            out.append(self._finished_line(first_fields or Fields(), sent, totals, date))

    @staticmethod
    def _host_source(text: str, by_host: dict[str, str]) -> str | None:
        m = _SYSLOG_HOST.match(text)
        if m is None:
            return None
        host = (m.group("h5424") or m.group("h3164") or "").lower()
        return by_host.get(host)

    def _context_only(self, text: str, source_id: str) -> Fields:
        fields = Fields(SourceId=source_id)
        for step in self._plans[source_id][1]:
            if step.lookup is None:
                values = _run(step, text)
                if values:
                    fields[step.rule.name] = values[0]
        return fields

    def _extract(self, text: str, steps: tuple[_Step, ...], source_id: str) -> tuple[Fields, list[tuple[_Step, str]]]:
        fields = Fields(SourceId=source_id)
        found: list[tuple[_Step, str]] = []
        for step in steps:
            values = _run(step, text)
            if not values and step.fallback is not None:
                step = step.fallback
                values = _run(step, text)
            if not values:
                continue
            fields[step.rule.name] = values[0]
            if step.lookup is not None:
                for value in values:
                    found.append((step, value))
        return fields, found

    def _detect(
        self,
        found: list[tuple[_Step, str]],
        fields: Fields,
        date: str,
        out: list[str],
        totals: dict[str, int],
        st: MatchStats,
    ) -> int:
        looked_up: list[tuple[_Step, str, list[Candidate]]] = []
        for step, value in found:
            candidates: list[Candidate] = []
            assert step.lookup is not None
            if step.lookup(value, candidates) and candidates:
                looked_up.append((step, value, candidates))
        return self._detect_candidates(looked_up, fields, date, out, totals, st)

    def _detect_candidates(
        self,
        found: list[tuple[_Step, str, list[Candidate]]],
        fields: Fields,
        date: str,
        out: list[str],
        totals: dict[str, int],
        st: MatchStats,
    ) -> int:
        """Detection lines for the values of one event that have candidates (the compiled engine lists
        them itself, in the store's order, and calls this directly)."""
        sent = 0
        limit = self._limit
        done: set[tuple[str, int, int]] = set()  # (value, snapshot, record): one detection each
        for step, value, candidates in found:
            rule = step.rule
            hits, suppressed = self._confirm(candidates)
            st.suppressed += suppressed
            if not hits:
                continue
            emitted = 0
            for hit in hits:
                ref = (value, id(hit.snapshot), hit.record_no)
                if ref in done:
                    continue
                done.add(ref)
                if limit and emitted >= limit:
                    break
                emitted += 1
                settings = hit.snapshot.settings
                category = settings.category
                line_fields = Fields(fields)
                line_fields[rule.name] = value
                line_fields["Date"] = date
                line_fields["Category"] = category
                line_fields["MatchedIndicator"] = hit.indicator.raw
                line_fields["Confidence"] = str(settings.confidence)
                line_fields["RecordContext"] = self._record_field.join(hit.context, " ")
                line_fields["ActionableFields"] = self._actionable_field.join(hit.actionable, "")
                out.append(self._event.render(line_fields) + "\n")
                totals[category] = totals.get(category, 0) + 1
                st.per_category[category] = st.per_category.get(category, 0) + 1
                source, raw = hit.snapshot.name, hit.indicator.raw
                st.per_source[source] = st.per_source.get(source, 0) + 1
                st.per_indicator[raw] = st.per_indicator.get(raw, 0) + 1
                st.detections += 1
                sent += 1
        return sent

    def _finished_line(self, fields: Fields, sent: int, totals: dict[str, int], date: str = "") -> str:
        if not self._finished_needs_context:
            return self._finished.render(fields) + "\n"  # the HA format "%REQ% LookupFinished"
        line_fields = Fields(fields)
        line_fields["Date"] = date
        total = "".join(f"{category}:{count};" for category, count in totals.items())
        line_fields["RecordContext"] = self._record_field.join(
            (("event_type", "LookupFinished"), ("sent_events", str(sent)), ("total", total)), " "
        )
        return self._finished.render(line_fields) + "\n"
