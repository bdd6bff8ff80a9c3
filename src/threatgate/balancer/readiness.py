"""What the balancer knows of each node's ``/readyz``: cluster role, settings revision and digest.

Why: behind one balancer, nodes of a Control/Secondary cluster must hold the same settings, and only
the Control accepts REST writes (a Secondary answers 409).  So the balancer polls every enabled
instance's unauthenticated ``GET /readyz`` over the gateway's pinned TLS (:meth:`Gateway.forward`, a
missing pin saved on first use exactly as a gateway request would) and keeps the last answer, to

- route gateway writes (:func:`route_write`): standalone nodes keep the fan-out to every node; in a
  cluster a write goes to the one Control, whose agent distributes it; no Control: 503;
- flag nodes whose settings digest differs from the others' (:func:`compare_digests`): a gauge, a
  WARNING when they start to differ and an INFO when they agree again, never a line per poll;
- answer ``threatgate balancer status`` (:mod:`threatgate.balancer.status`) with the same rules;
- learn how many event connections ("lanes") the node wants (``event_connections``: one per worker
  process), for instances with ``connections="auto"`` (balancer/upstream.py).

The decisions are pure functions of :class:`View` values; :class:`ReadinessMonitor` does the I/O.
An instance without ``api_port`` in the config is never asked (443 by default may be anything).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric

from threatgate import runtime
from threatgate.balancer.gateway import Gateway
from threatgate.balancer.upstream import BalancerView, json_answer
from threatgate.config.balancer import MAX_LANES, InstanceSettings
from threatgate.errors import PinMismatch, UpstreamFailed
from threatgate.lb.instances import Instance, lane_count

log = logging.getLogger("threatgate.balancer")

CLUSTER_ROLES = frozenset({"control", "secondary"})
ROLES = ("standalone", "control", "secondary", "unknown")
"""Every value of the role gauge's ``role`` label (one is 1, the others 0)."""
SHORT = 12
"""Hex digits of a settings digest shown to people (48 bits: a collision by chance is not a concern)."""
MISMATCH_POLLS = 2
"""Polls in a row that must show differing digests before the gauge and the log say so: a settings
change on its way from the Control to the Secondaries (well under a second) is not a mismatch."""
PROBE_HEADERS = {"Accept": "application/json"}
NO_CONTROL = "no Control node: settings are frozen (emergency mode)"


@dataclass(frozen=True, slots=True)
class Readiness:
    """One ``/readyz`` answer, validated (cluster fields are None on a standalone node)."""

    ready: bool
    role: str
    cluster_id: str | None = None
    node_id: str | None = None
    epoch: int | None = None
    revision: int | None = None
    sha256: str | None = None
    emergency: str | None = None
    reason: str | None = None  # why it is not ready (e.g. a feed that did not load)
    max_event_size: int | None = None  # its MaxEventSize in bytes
    event_connections: int = 1  # event connections it wants (one per worker); 1 when it does not say
    event_connections_said: int | None = None  # what it said when that was above 64 (clamped), for the log

    @property
    def in_cluster(self) -> bool:
        return self.role in CLUSTER_ROLES


def parse_readiness(status: int, body: bytes) -> Readiness:
    """A node's ``/readyz`` answer (200 ready, 503 loading).

    Raises:
        ValueError: anything else (another server on that port, a proxy's error page...).
    """
    data = json_answer(status, body, (200, 503))
    if not isinstance(data, dict) or not isinstance(data.get("ready"), bool):
        raise ValueError("no readiness object")
    role = data.get("role")
    if role not in ("standalone", *CLUSTER_ROLES):
        raise ValueError(f"unknown role {str(role)[:40]!r}")

    def opt(name: str, kind: type) -> Any:
        value = data.get(name)
        if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
            return value
        raise ValueError(f"{name} is not a {kind.__name__}")

    sha256 = opt("sha256", str)
    said = opt("event_connections", int)
    lanes = _event_connections(said)
    if sha256 is not None and (len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256)):
        raise ValueError("sha256 is not a hex digest")
    return Readiness(
        ready=data["ready"],
        role=role,
        cluster_id=opt("cluster_id", str),
        node_id=opt("node_id", str),
        epoch=opt("epoch", int),
        revision=opt("revision", int),
        sha256=sha256,
        emergency=opt("emergency", str),
        reason=_reason(data),
        max_event_size=_positive(opt("max_event_size", int)),
        event_connections=lanes,
        event_connections_said=said if said is not None and said > MAX_LANES else None,
    )


def _event_connections(said: int | None) -> int:
    """``event_connections``: missing is 1 (a node without workers); below 1 is 1 (no worker ready: the
    node says not ready anyway); above :data:`MAX_LANES` is clamped (the caller keeps what it said, for the log)."""
    return 1 if said is None else min(max(said, 1), MAX_LANES)


def _reason(data: dict[str, Any]) -> str | None:
    """Why the node says it is not ready: its ``reason``, else the feeds it names, else None."""
    reason = data.get("reason")
    if isinstance(reason, str) and reason:
        return reason[:300]
    feeds = data.get("feeds")
    if isinstance(feeds, dict):
        named = [f"{k}: {v}" for k, v in feeds.items() if isinstance(k, str) and isinstance(v, str)]
        if named:
            return "; ".join(named)[:300]
    return None


def _positive(value: int | None) -> int | None:
    return value if value is not None and value > 0 else None


@dataclass(slots=True)
class View:
    """One instance as the readiness checks see it.

    ``skip`` says why it is not asked (disabled, no ``api_port``); ``answer`` is the last answer, kept
    when a later poll fails (``error`` set) so a Control that went away is still known as a cluster
    member: writes are then refused rather than sent to every node.
    """

    key: str
    api: str = "-"
    skip: str | None = None
    answer: Readiness | None = None
    error: str | None = None
    pin_mismatch: bool = False
    connections: int | Literal["auto"] = "auto"  # the instance's ``connections`` setting

    @property
    def lanes(self) -> int | None:
        """Event connections the balancer opens to it (None: ``auto`` and its ``/readyz`` did not answer)."""
        current = self.current
        if self.connections == "auto" and self.skip is None and current is None:
            return None
        return lane_count(self.connections, current.event_connections if current is not None else None)

    @property
    def current(self) -> Readiness | None:
        """The answer of the last poll, None when that poll failed or there was none."""
        return self.answer if self.error is None else None

    @property
    def role(self) -> str:
        current = self.current
        return current.role if current is not None else "unknown"

    @property
    def state(self) -> str:
        if self.skip is not None:
            return self.skip
        if self.error is not None:
            return f"{'refused' if self.pin_mismatch else 'unreachable'}: {self.error}"
        if self.answer is None:
            return "not polled yet"
        return "ready" if self.answer.ready else "loading"


@dataclass(frozen=True, slots=True)
class Comparison:
    """The settings digests of the reachable cluster instances."""

    digests: dict[str, str] = field(default_factory=dict)  # instance key -> sha256
    majority: str | None = None
    differing: tuple[str, ...] = ()  # instance keys whose digest is not the majority's

    @property
    def mismatch(self) -> bool:
        return len(set(self.digests.values())) > 1


def compare_digests(views: Iterable[View]) -> Comparison:
    """The majority digest and the instances that differ from it.

    A tie goes to the digest the Control holds (it is the reference the others converge to); a tie
    without the Control has no majority, so every instance of the tie is flagged.
    """
    current = [(v.key, v.current) for v in views]
    digests = {k: r.sha256 for k, r in current if r is not None and r.in_cluster and r.sha256 is not None}
    if not digests:
        return Comparison()
    counts = Counter(digests.values())
    top = max(counts.values())
    leaders = {d for d, n in counts.items() if n == top}
    if len(leaders) > 1:
        held = {r.sha256 for _, r in current if r is not None and r.role == "control" and r.sha256} & leaders
        leaders = held if len(held) == 1 else set()
    majority = next(iter(leaders)) if leaders else None
    differing = tuple(k for k, d in digests.items() if d != majority)
    return Comparison(digests, majority, differing)


@dataclass(frozen=True, slots=True)
class WriteRoute:
    """Where a gateway write goes: every enabled node (``fan_out``), the Control (``control``), or 503."""

    fan_out: bool = False
    control: str | None = None
    refusal: str | None = None


def route_write(views: Iterable[View]) -> WriteRoute:
    """The route of a REST write, from the readiness of the enabled instances.

    No instance known as a cluster member: fan-out, as before clusters existed.  Cluster members:
    the Control alone (it distributes the write; a Secondary would refuse it with 409).  Several
    Controls (one promoted while the other was away): the highest epoch, the one the cluster follows.
    No Control reachable, or standalone nodes mixed with cluster members (a write would miss them): 503.
    """
    views = [v for v in views if v.skip is None]
    members = [v for v in views if v.answer is not None and v.answer.in_cluster]
    if not members:
        return WriteRoute(fan_out=True)
    standalone = [v.key for v in views if v.current is not None and not v.current.in_cluster]
    if standalone:
        return WriteRoute(
            refusal=f"standalone instance(s) {', '.join(standalone)} behind the balancer beside cluster members "
            f"{', '.join(v.key for v in members)}: a write through the Control would not reach them"
        )
    controls = [(v.current.epoch or 0, v.key) for v in views if v.current is not None and v.current.role == "control"]
    if controls:
        top = max(e for e, _ in controls)
        leaders = [k for e, k in controls if e == top]
        if len(leaders) == 1:
            return WriteRoute(control=leaders[0])
        return WriteRoute(
            refusal=f"{NO_CONTROL}: instances {', '.join(leaders)} all report role control at epoch {top}; "
            "demote one (threatgate cluster demote)"
        )
    seen = "; ".join(f"{v.key} {_described(v)}" for v in views)
    return WriteRoute(
        refusal=f"{NO_CONTROL}: no instance reports role control ({seen}); bring the Control back or promote "
        "a Secondary (threatgate cluster promote)"
    )


def _described(view: View) -> str:
    current = view.current
    if current is None:
        return view.state
    if current.emergency:
        return f"{current.role}, emergency: {current.emergency}"
    return current.role


def _outcome(view: View) -> str:
    """How one poll went, for ``threatgate_balancer_readiness_polls_total{result}``."""
    if view.pin_mismatch:
        return "pin_mismatch"
    if view.error is not None or view.answer is None:
        return "failed"
    return "ready" if view.answer.ready else "not_ready"


def short(digest: str | None) -> str:
    return digest[:SHORT] if digest else "-"


def refresh_view(view: View, settings: InstanceSettings) -> View:
    """``view`` brought in line with the instance's settings: asked or not, and why not."""
    view.api = f"{settings.api_port}" if settings.api_port_set else "-"
    view.connections = settings.connections
    view.skip = "disabled" if not settings.enabled else None if settings.api_port_set else "no api_port"
    if view.skip is not None:
        view.answer = view.error = None
    return view


async def probe(gateway: Gateway, inst: Instance, view: View, client_timeout: float) -> None:
    """One ``GET /readyz`` through the gateway's pinned path; the answer or the error lands in ``view``.

    A certificate that does not match the pin gets no request byte (the pinned pool checks it first), as for
    every gateway request; ``view.pin_mismatch`` tells it apart from a node that is just unreachable.
    """
    view.pin_mismatch = False
    try:
        answer = await gateway.forward(inst, "GET", "/readyz", PROBE_HEADERS, b"", client_timeout, probe=True)
        view.answer, view.error = parse_readiness(answer.status, answer.body), None
    except PinMismatch as exc:
        view.error = exc.reason
        view.pin_mismatch = True
    except UpstreamFailed as exc:
        view.error = str(exc)
    except ValueError as exc:
        view.error = f"unexpected /readyz answer: {exc}"


class ReadinessHost(BalancerView, Protocol):
    """What :class:`ReadinessMonitor` reads and calls of the balancer (``BalancerService`` is one)."""

    def resize_lanes(self, inst: Instance, why: str) -> None: ...
    def dispatch(self) -> None: ...


class ReadinessMonitor:
    """Polls the enabled instances' ``/readyz`` every health-check interval and keeps the views."""

    def __init__(self, service: ReadinessHost, gateway: Gateway) -> None:
        self.service = service
        self.gateway = gateway
        self.views: dict[str, View] = {}
        self.mismatch = False
        self._mismatch_polls = 0
        self._clamped: dict[str, int | None] = {}  # instance key -> the absurd event_connections last logged
        self._periodic = runtime.Periodic(
            "readiness checks", self.round, lambda: self.service.config.health.interval, log
        )

    def start(self) -> None:
        self._periodic.start()

    async def close(self) -> None:
        await self._periodic.close()

    async def round(self) -> None:
        """One interval's work; the switch is read each time, since SIGHUP may turn the checks on or off."""
        if self.service.config.readiness:
            await self.poll()
            self.evaluate()
        else:
            self.views, self.mismatch, self._mismatch_polls = {}, False, 0
            for inst in self.service.instances.values():
                inst.ready, inst.not_ready_reason = True, ""
                self._learn_lanes(inst, View(inst.key, skip="readiness checks off"))

    async def poll(self, only_unknown: bool = False) -> None:
        """Ask every enabled instance with an API port (``only_unknown``: those never asked yet)."""
        views: dict[str, View] = {}
        asked: list[tuple[Instance, View]] = []
        for inst in self.service.instances.values():
            view = refresh_view(self.views.get(inst.key) or View(inst.key), inst.settings)
            if view.skip is None and (not only_unknown or (view.answer is None and view.error is None)):
                asked.append((inst, view))
            elif view.skip is not None:
                inst.ready, inst.not_ready_reason = True, ""  # not asked: nothing says it is not ready
                self._learn_lanes(inst, view)  # and nothing says it wants more than one lane
            views[inst.key] = view
        self.views = views
        await asyncio.gather(*(self._poll_one(inst, view) for inst, view in asked))

    async def _poll_one(self, inst: Instance, view: View) -> None:
        before = (view.role, view.error is None)
        await probe(self.gateway, inst, view, self.service.config.health.timeout)
        stats = self.service.stats
        stats.bump(stats.readiness_polls, _outcome(view))
        self._apply(inst, view)
        if self.service.instances.get(inst.key) is inst:  # not removed by a reload while the poll ran
            self._learn_lanes(inst, view)
        if (view.role, view.error is None) != before:  # a change, never a line per poll
            current = view.current
            if current is None:
                log.info("instance %s: readiness not known (%s)", inst.key, view.error)
            elif current.in_cluster:
                log.info(
                    "instance %s: cluster %s, role %s, epoch %s, settings r%s %s",
                    inst.key,
                    current.cluster_id,
                    current.role,
                    current.epoch,
                    current.revision,
                    short(current.sha256),
                )
            else:
                log.info("instance %s: role %s", inst.key, current.role)

    def _learn_lanes(self, inst: Instance, view: View) -> None:
        """The node's ``event_connections`` (kept when a poll fails: a node that cannot answer ``/readyz`` for
        a moment keeps its lanes); lanes opened or retired when the count the instance wants changes."""
        current = view.current if view.skip is None else None
        if view.skip is None and current is None:
            return
        learned = current.event_connections if current is not None else None
        said = current.event_connections_said if current is not None else None
        if said is not None and self._clamped.get(inst.key) != said:
            log.warning(
                "instance %s: /readyz asks for %d event connections; opening at most %d", inst.key, said, MAX_LANES
            )
        self._clamped[inst.key] = said
        before = inst.wanted_lanes()
        inst.event_connections = learned
        if inst.wanted_lanes() != before:
            self.service.resize_lanes(inst, f"the node's /readyz event_connections {learned}")

    def _apply(self, inst: Instance, view: View) -> None:
        """What the event path takes from the answer: ready or not (and why), and the node's MaxEventSize.

        Unknown (no answer) counts as ready: a node whose API is unreachable may still match events.
        """
        current = view.current
        ready = current.ready if current is not None else True
        if current is not None and current.max_event_size is not None:
            inst.max_event_size = current.max_event_size
        reason = (current.reason if current is not None else None) or "not ready"
        if ready != inst.ready:
            if ready and inst.ready is not None:
                log.info("instance %s is ready again: it gets events again", inst.key)
            elif not ready:
                log.warning(
                    "instance %s is not ready (%s): events go to ready instances while there are any",
                    inst.key,
                    reason,
                )
        changed = ready != inst.ready
        inst.ready, inst.not_ready_reason = ready, "" if ready else reason
        if changed and ready:
            self.service.dispatch()  # events that waited for its first answer, or for a ready instance

    def evaluate(self) -> Comparison:
        """Update the mismatch flag from the views; log when it turns on or off."""
        comparison = compare_digests(self.views.values())
        self._mismatch_polls = self._mismatch_polls + 1 if comparison.mismatch else 0
        mismatch = self._mismatch_polls >= MISMATCH_POLLS
        if mismatch and not self.mismatch:
            held = ", ".join(f"{k} {short(d)}" for k, d in sorted(comparison.digests.items()))
            log.warning(
                "settings digests differ between cluster instances: %s (differing from the majority: %s)",
                held,
                ", ".join(comparison.differing),
            )
        elif self.mismatch and not comparison.mismatch:
            log.info(
                "settings digests agree again: %s on %d instance(s)",
                short(comparison.majority),
                len(comparison.digests),
            )
        self.mismatch = mismatch
        return comparison

    async def route_write(self) -> WriteRoute:
        """:func:`route_write` on the views, asking first any instance never asked (just started or added)."""
        if not self.service.config.readiness:
            return WriteRoute(fan_out=True)
        await self.poll(only_unknown=True)
        return route_write(self.views.values())

    def families(self) -> Iterator[Metric]:
        """The readiness gauges, built at scrape time."""
        revision = GaugeMetricFamily(
            "threatgate_balancer_instance_settings_revision",
            "Settings revision each reachable cluster instance has applied",
            labels=["instance"],
        )
        role = GaugeMetricFamily(
            "threatgate_balancer_instance_role", "1 for each instance's current role", labels=["instance", "role"]
        )
        for key, view in sorted(self.views.items()):
            current = view.current
            if current is not None and current.revision is not None:
                revision.add_metric([key], current.revision)
            for name in ROLES:
                role.add_metric([key, name], 1 if view.role == name else 0)
        yield revision
        yield role
        yield GaugeMetricFamily(
            "threatgate_balancer_settings_digest_mismatch",
            "1 when reachable cluster instances hold different settings digests",
            value=1 if self.mismatch else 0,
        )
