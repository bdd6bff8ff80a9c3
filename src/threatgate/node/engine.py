"""Which matching engine a node runs: the compiled batch engine (default) or the pure-Python reference.

``THREATGATE_ENGINE=reference`` selects the reference :class:`~threatgate.node.matcher.Matcher`;
``compiled`` (the default) selects :class:`CompiledMatcher`.

Theory of operation (docs/architecture.md, "The compiled engine"): most events detect nothing.  The C
engine (:mod:`threatgate.node._engine`) runs a whole batch: source selection, ignore rules, every rule's
regex (PCRE2, from :mod:`threatgate.node.pcre`), the normalisers' fast paths, the store keys and the
store's prefilter (Bloom bitmap, sorted keys, CIDR intervals, mask hosts), and renders the finished line of
every event it proves detects nothing.  An event that may detect, or that the engine cannot run exactly
(bytes outside ASCII, an oversized event, a replace rule, a Python-only regex feature), goes, in its place in
the batch, to the reference :meth:`Matcher.match_one`.  So both paths share one definition of every
detection, and the differential tests check the rest byte for byte.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from threatgate.config.node import PATTERN_RE, NodeConfig, Rule, RuleType, Source
from threatgate.errors import UnsupportedRegex
from threatgate.node import _engine, normalize
from threatgate.node.matcher import _SYSLOG_HOST, Hit, Matcher, MatchStats, _Step
from threatgate.node.pcre import ANCHORED, ENDANCHORED, to_pcre2
from threatgate.node.render import Fields
from threatgate.node.snapfile import engine_records_view
from threatgate.node.store import Candidate, IndicatorStore
from threatgate.wire.framing import FramedEvent

log = logging.getLogger(__name__)

ENGINE_ENV = "THREATGATE_ENGINE"
ENGINES = ("compiled", "reference")

_LOOKUPS = {
    RuleType.CONTEXT: -1,
    RuleType.URL: 0,
    RuleType.DOMAIN: 1,
    RuleType.IP: 2,
    RuleType.MD5: 3,
    RuleType.SHA1: 4,
    RuleType.SHA256: 5,
    RuleType.HASH: 6,
}
_FINDALL, _SEARCH, _GENERIC = 0, 1, 2
_SOURCE_ID, _DATE = -1, -2
_RESERVED = frozenset(
    {"SourceId", "Date", "RecordContext", "Category", "MatchedIndicator", "Confidence", "ActionableFields"}
)


INTERFACE = 2
"""The version of the C module's interface this module calls (``_engine.INTERFACE``; 2: ``match`` reports
each detection's slot and indicator).  A module built from older source is refused with a clear message
rather than failing at the first batch."""
if getattr(_engine, "INTERFACE", 1) != INTERFACE:
    raise ImportError(
        f"threatgate.node._engine ({_engine.__file__}) was built from other source than this threatgate "
        f"(interface {getattr(_engine, 'INTERFACE', 1)}, expected {INTERFACE}): rebuild it "
        "(pip install ., or .venv/bin/python setup.py build_ext --inplace)"
    )


def engine_choice(environ: Mapping[str, str] = os.environ) -> str:
    """The engine named by ``THREATGATE_ENGINE`` ("compiled" when unset); ValueError for another name."""
    name = environ.get(ENGINE_ENV, "compiled").strip().lower() or "compiled"
    if name not in ENGINES:
        raise ValueError(f"{ENGINE_ENV}={name!r} is not an engine; use one of: {', '.join(ENGINES)}")
    return name


def make_matcher(config: NodeConfig, store: IndicatorStore, engine: str | None = None) -> Matcher:
    """A matcher of the chosen engine (``engine`` None: from the environment)."""
    name = engine_choice({ENGINE_ENV: engine} if engine is not None else os.environ)
    if name == "reference":
        return Matcher(config, store)
    return CompiledMatcher(config, store)


def _pair(pattern: re.Pattern[str], extra: int = 0) -> tuple[str, int]:
    """PCRE2 text and options for ``pattern``; UnsupportedRegex when the compiled engine cannot run it.

    ``extra``: PCRE2_ANCHORED for ``re.match``, with PCRE2_ENDANCHORED for ``re.fullmatch`` (given at
    compile time: PCRE2's JIT does not take them at match time and would fall back to its interpreter).
    """
    text, options = to_pcre2(pattern)
    options |= extra
    error = _engine.compile_error(text, options)
    if error is not None:
        raise UnsupportedRegex(f"PCRE2 refuses its translation: {error}")
    return text, options


def step_tuple(rule: Rule, field: int, fallback: int) -> tuple[Any, ...]:
    """One rule as the C engine takes it: ((pattern, options), groups, mode, all, lookup, field, fallback)."""
    groups = rule.pattern.groups
    mode = _GENERIC if groups > 1 else (_FINDALL if rule.extract_all else _SEARCH)
    return (_pair(rule.pattern), groups, mode, int(rule.extract_all), _LOOKUPS[rule.type], field, fallback)


class CompiledMatcher(Matcher):
    """The reference :class:`Matcher` with its batch loop run by the compiled engine (module docstring)."""

    def __init__(self, config: NodeConfig, store: IndicatorStore) -> None:
        self.reference_sources: dict[str, str] = {}  # source id -> why it runs on the reference path
        super().__init__(config, store)
        names = sorted({r.name for s in config.input.sources for r in s.rules})
        self._field_of = {name: i for i, name in enumerate(names)}
        sources = [self._default] + [s for s in config.input.sources if s.id != "default"]
        self._plan_of = {s.id: i for i, s in enumerate(sources)}
        plans = [self._plan_tuple(s) for s in sources]
        self._names = names
        self._plan_ids = [s.id for s in sources]
        self._plan_steps: list[tuple[_Step, ...]] = []
        for s in sources:
            steps = self._plans[s.id][1]
            self._plan_steps.append(steps + tuple(st.fallback for st in steps if st.fallback is not None))
        by_host = {host: self._plan_of[sid] for host, sid in self._by_host.items()}
        self._engine = _engine.Engine(
            plans,
            len(names),
            _pair(_SYSLOG_HOST, ANCHORED) if by_host else None,
            by_host,
            _pair(normalize._FAST_URL, ANCHORED | ENDANCHORED),
            _pair(normalize._FAST_DOMAIN, ANCHORED | ENDANCHORED),
            (normalize.normalize_url, normalize.normalize_domain, normalize.normalize_ip, normalize.parse_ip),
            self._template(),
        )
        out = config.output
        event_codes = {**_EVENT_CODES, "RecordContext": -6}
        self._engine.use_detection(
            pieces(out.event_format, event_codes, self._field_of),
            pieces(out.record_field_format, _PARAM_CODES),
            pieces(out.actionable_field_format, _PARAM_CODES),
            pieces(out.finished_format, {"SourceId": -1, "Date": -2, "RecordContext": -6}, self._field_of),
            self._finished_needs_context,
            self._limit,
        )
        for sid, why in self.reference_sources.items():
            log.warning("source %s runs on the reference matcher (slower, same answers): %s", sid, why)
        self._swapped()

    def _plan_tuple(self, source: Source) -> tuple[Any, ...]:
        sid = source.id.encode("utf-8", "surrogatepass")
        default_rules = {r.name: r for r in self._default.rules}
        if source.id == "default":
            pairs: list[tuple[Rule, Rule | None]] = [(r, None) for r in source.rules]
        else:
            own = {r.name for r in source.rules}
            pairs = [(r, default_rules.get(r.name)) for r in source.rules]
            pairs += [(r, None) for r in self._default.rules if r.name not in own]
        try:
            clash = _RESERVED & {r.name for r, _ in pairs}
            if clash:
                raise UnsupportedRegex(f"a rule is named {sorted(clash)[0]}, which is also an output field")
            replace = []
            for rewrite in source.replace:
                if not rewrite.output.isascii():
                    raise UnsupportedRegex("a replace rule writes characters outside ASCII")
                replace.append((_pair(rewrite.pattern), rewrite.output.encode("ascii")))
            main: list[tuple[Any, ...]] = []
            fallbacks: list[tuple[Any, ...]] = []
            for rule, fallback in pairs:
                index = -1
                if fallback is not None:
                    index = len(pairs) + len(fallbacks)
                    fallbacks.append(step_tuple(fallback, self._field_of[fallback.name], -1))
                main.append(step_tuple(rule, self._field_of[rule.name], index))
            ignore = [_pair(p) for p in source.ignore]
        except UnsupportedRegex as exc:
            self.reference_sources[source.id] = str(exc)
            return sid, True, [], 0, [], []
        return sid, False, main + fallbacks, len(main), ignore, replace

    def _template(self) -> tuple[bytes | int, ...] | None:
        """The finished line of an event with no detection, as literal bytes and field numbers."""
        source = self.config.output.finished_format
        context = self._record_field.join((("event_type", "LookupFinished"), ("sent_events", "0"), ("total", "")), " ")
        pieces: list[bytes | int] = []
        pos = 0
        needs_context = self._finished_needs_context
        for m in PATTERN_RE.finditer(source):
            pieces.append(source[pos : m.start()].encode("utf-8", "surrogatepass"))
            name = m.group(1)
            if name == "SourceId":
                pieces.append(_SOURCE_ID)
            elif name == "Date" and needs_context:
                pieces.append(_DATE)
            elif name == "RecordContext" and needs_context:
                before = source[: m.start()]
                spaced = bool(before) and not before[-1].isspace()
                text = (" " + context if context else "") if spaced else context
                pieces.append(text.encode("utf-8", "surrogatepass"))
            elif name in self._field_of:
                pieces.append(self._field_of[name])
            pos = m.end()
        pieces.append(source[pos:].encode("utf-8", "surrogatepass"))
        return tuple(p for p in pieces if p != b"")

    def _swapped(self) -> None:
        super()._swapped()
        engine = getattr(self, "_engine", None)
        if engine is None:
            return
        views = _views(self.store, 0)
        if self.suppliers is not None:
            views += _views(self.suppliers, 1)
        engine.use_indexes(views)

    def match(
        self,
        events: list[FramedEvent],
        *,
        date: str,
        peer_ip: str = "",
        finished: bool = False,
        stats: MatchStats | None = None,
    ) -> list[str]:
        """As :meth:`Matcher.match`; events the engine cannot decide alone go to :meth:`Matcher.match_one`."""
        st = stats if stats is not None else MatchStats()
        out: list[str] = []
        peer_source = self._by_ip.get(peer_ip)
        plan = self._plan_of[peer_source] if peer_source is not None else -1

        def reference(event: FramedEvent) -> None:
            self.match_one(event, peer_source, date, finished, out, st)

        def detect(event: str, plan: int, values: tuple[str | None, ...], found: list[tuple[int, str, Any]]) -> None:
            # The reference's own detection code over the values that have candidates (listed by the engine
            # in the store's order): the values it skipped have none, so they add no line and change no count.
            fields = Fields(SourceId=self._plan_ids[plan])
            for name, value in zip(self._names, values, strict=True):
                if value is not None:
                    fields[name] = value
            steps = self._plan_steps[plan]
            totals: dict[str, int] = {}
            st.events += 1
            st.confirmed += 1
            looked_up = [(steps[k], v, [Candidate(*c) for c in cands]) for k, v, cands in found]
            sent = self._detect_candidates(looked_up, fields, date, out, totals, st)
            if finished:
                out.append(self._finished_line(fields, sent, totals, date))

        batch = events if type(events) is list else list(events)
        decided, ignored, confirmed, detections, suppressed, per_category, hits = self._engine.match(
            batch, plan, date, finished, out, reference, detect
        )
        st.events += decided + confirmed  # after the call: the reference path counts its own events meanwhile
        st.decided += decided
        st.confirmed += confirmed
        st.ignored += ignored
        st.detections += detections
        st.suppressed += suppressed
        if per_category:
            for category, n in per_category.items():
                st.per_category[category] = st.per_category.get(category, 0) + n
        if hits:
            self._count_hits(hits, st)
        return out

    def _count_hits(self, hits: list[tuple[int, str]], st: MatchStats) -> None:
        """The engine's detections by source (feed or supplier of the slot) and matched indicator."""
        snapshots = self._snapshots
        per_source, per_indicator = st.per_source, st.per_indicator
        for slot, raw in hits:
            snap = snapshots.get(slot)
            source = snap.name if snap is not None else "unknown"
            per_source[source] = per_source.get(source, 0) + 1
            per_indicator[raw] = per_indicator.get(raw, 0) + 1

    def lookup_objects(self, objects: list[str]) -> list[tuple[list[Hit], int]]:
        """As the reference; objects the engine proves absent answer at once, the rest go to lookup_object."""
        results: list[tuple[list[Hit], int]] = []
        for value, answer in zip(objects, self._engine.lookup(objects), strict=True):
            if answer is None:
                results.append(([], 0))
            elif answer is True:
                results.append(self.lookup_object(value))
            else:
                results.append(self._confirm([Candidate(*c) for c in answer]) if answer else ([], 0))
        return results

    @property
    def reference_events(self) -> int:
        """Events handed whole to the reference path so far (non-ASCII, oversized, ignored...)."""
        return int(self._engine.reference_events)

    @property
    def detect_events(self) -> int:
        """Events with values the prefilter could not rule out, confirmed by the reference lookups."""
        return int(self._engine.detect_events)


# -- store views ------------------------------------------------------------------------------------------


_SUPPLIERS = {"FalsePositive": 1, "InternalTI": 2}


def _views(store: IndicatorStore, number: int) -> list[tuple[Any, ...]]:
    """Every feed index of ``store`` as the C engine reads it (store number 0: feeds, 1: API suppliers)."""
    return [
        (
            *snap.index.engine_view(),
            slot,
            number,
            *engine_records_view(snap.index),
            snap.settings.category.encode("utf-8", "surrogatepass"),
            str(snap.settings.confidence).encode("ascii"),
            _SUPPLIERS.get(snap.settings.supplier or "", 0),
            tuple(name.encode("utf-8", "surrogatepass") for name in snap.settings.actionable_fields),
        )
        for slot, snap in sorted(store.snapshots.items())
    ]


_EVENT_CODES = {
    "SourceId": -1,
    "Date": -2,
    "Category": -3,
    "MatchedIndicator": -4,
    "Confidence": -5,
    "ActionableFields": -8,
}
_PARAM_CODES = {"ParamName": -10, "ParamValue": -11}


def pieces(source: str, codes: Mapping[str, int], fields: Mapping[str, int] | None = None) -> tuple[bytes | int, ...]:
    """A format (render.Template's rules) as literal bytes and field codes for the C engine.

    ``%RecordContext%`` is -6, or -7 where render.Template puts a space in front of it (the character
    before it is not a space); a name neither in ``codes`` nor in ``fields`` renders as "" and is left out.
    """
    out: list[bytes | int] = []
    pos = 0
    for m in PATTERN_RE.finditer(source):
        out.append(source[pos : m.start()].encode("utf-8", "surrogatepass"))
        name = m.group(1)
        if name == "RecordContext" and "RecordContext" in codes:
            before = source[: m.start()]
            out.append(-6 if not before or before[-1].isspace() else -7)
        elif name in codes:
            out.append(codes[name])
        elif fields is not None and name in fields:
            out.append(fields[name])
        pos = m.end()
    out.append(source[pos:].encode("utf-8", "surrogatepass"))
    return tuple(p for p in out if p != b"")
