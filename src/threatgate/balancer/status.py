"""``threatgate balancer status``: each instance's readiness, cluster role and settings digest, side by side.

Why: the one place that sees every node of an HA setup is the balancer's config, so that is where an
operator asks "do all my nodes hold the same settings, and which one is the Control?".  The command
asks each configured instance's ``/readyz`` the way the running balancer does
(:func:`threatgate.balancer.readiness.probe`: the gateway's pinned TLS, a missing pin saved as the
gateway would save it, nothing sent to a node whose certificate does not match its pin) and applies
the same digest rules (:func:`~threatgate.balancer.readiness.compare_digests`).

Rendering and the exit code are pure functions of the views, so they are tested without nodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from threatgate.balancer.gateway import Gateway
from threatgate.balancer.readiness import View, compare_digests, probe, refresh_view, short
from threatgate.balancer.verify import _Standalone
from threatgate.config.balancer import BalancerConfig
from threatgate.lb.instances import Instance

COLUMNS = ("", "INSTANCE", "API", "STATE", "ROLE", "EPOCH", "REVISION", "DIGEST")
LANES_COLUMN = 3
"""Where the LANES column goes (after API) when shown: only when an instance has more than one lane or a
``connections`` setting, so the table of a deployment without worker nodes reads as before."""
MAX_STATE = 72
"""An unreachable node's reason is cut here in the table (``--json`` has it whole)."""


async def collect(config: BalancerConfig) -> list[View]:
    """Every configured instance's view, the enabled ones with an API port asked in parallel."""
    gateway = Gateway(_Standalone(config))  # type: ignore[arg-type]
    await gateway.open_client()
    timeout = max(5.0, config.health.timeout)
    views: list[View] = []
    asked: list[tuple[Instance, View]] = []
    try:
        for settings in config.instances:
            view = refresh_view(View(settings.key), settings)
            views.append(view)
            if view.skip is None:
                asked.append((Instance(settings, rise=1, fall=1), view))
        await asyncio.gather(*(probe(gateway, inst, view, timeout) for inst, view in asked))
    finally:
        await gateway.close()
    return views


def exit_code(views: Sequence[View]) -> int:
    """0 when every asked instance answered and the cluster digests agree, else 1."""
    failed = any(v.skip is None and v.error is not None for v in views)
    return 1 if failed or compare_digests(views).mismatch else 0


def controls(views: Sequence[View]) -> list[View]:
    return [v for v in views if v.role == "control"]


def balancer_states(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """What the running balancer says of each instance (its admin socket's ``list``): ``STATE`` or
    ``STATE (why)``, e.g. ``MAINT (drained at run time)``."""
    return {str(r["instance"]): f"{r['state']} ({r['why']})" if r.get("why") else str(r["state"]) for r in rows}


def render(views: Sequence[View], balancer: Mapping[str, str] | None = None) -> str:
    """The table and a footer line explaining the ``!`` flags and naming the Control.

    ``balancer``: each instance's state in the running balancer (:func:`balancer_states`), shown in a
    BALANCER column after STATE; None when no balancer answered (the column is left out).
    """
    comparison = compare_digests(views)
    rows: list[tuple[str, ...]] = [COLUMNS]
    for v in views:
        r = v.current
        state = v.state if len(v.state) <= MAX_STATE else v.state[: MAX_STATE - 3] + "..."
        rows.append(
            (
                "!" if v.key in comparison.differing else "",
                v.key,
                v.api,
                state,
                v.role,
                _text(r.epoch if r else None),
                _text(r.revision if r else None),
                short(r.sha256 if r else None),
            )
        )
    if balancer is not None:
        cells = ["BALANCER", *(balancer.get(v.key, "-") for v in views)]
        at = COLUMNS.index("STATE") + 1
        rows = [(*row[:at], cell, *row[at:]) for row, cell in zip(rows, cells, strict=True)]
    if any(v.connections != "auto" or v.lanes not in (1, None) for v in views):
        cells = ["LANES", *(lanes_text(v) for v in views)]
        rows = [(*row[:LANES_COLUMN], cell, *row[LANES_COLUMN:]) for row, cell in zip(rows, cells, strict=True)]
    if not comparison.differing:  # no flag to show: no empty column in front
        rows = [row[1:] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join([*lines, footer(views)])


def lanes_text(view: View) -> str:
    """``2`` for ``connections="2"``; ``2 (auto)`` when the node's ``/readyz`` asks for 2; ``? (auto)`` unknown."""
    if view.connections != "auto":
        return str(view.connections)
    return f"{_text(view.lanes).replace('-', '?')} (auto)"


def footer(views: Sequence[View]) -> str:
    comparison = compare_digests(views)
    found = controls(views)
    if len(found) == 1:
        control = f"Control: {found[0].key}"
    elif found:
        control = f"Controls: {', '.join(v.key for v in found)} (more than one: demote all but one)"
    else:
        control = "Control: none reachable (settings are frozen)"
    if not comparison.digests:
        text = "no cluster member reachable: standalone nodes keep their own settings (writes go to every node)"
        return text + (f"; {control}" if found else "")
    if comparison.mismatch:
        majority = short(comparison.majority) if comparison.majority else "none (a tie)"
        return f"! = settings digest differs from the majority ({majority}); {control}"
    return f"all {len(comparison.digests)} cluster instance(s) hold settings {short(comparison.majority)}; {control}"


def as_json(views: Sequence[View], balancer: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What ``--json`` prints: the views in full, the running balancer's view of each (None: no balancer
    answered on its admin socket) and the verdict."""
    comparison = compare_digests(views)
    instances = []
    for v in views:
        r = v.current
        instances.append(
            {
                "instance": v.key,
                "api_port": int(v.api) if v.api.isdigit() else None,
                "connections": v.connections,
                "lanes": v.lanes,
                "state": v.state,
                "role": v.role,
                "ready": r.ready if r else None,
                "cluster_id": r.cluster_id if r else None,
                "node_id": r.node_id if r else None,
                "epoch": r.epoch if r else None,
                "revision": r.revision if r else None,
                "sha256": r.sha256 if r else None,
                "emergency": r.emergency if r else None,
                "differs": v.key in comparison.differing,
                "balancer": balancer.get(v.key) if balancer is not None else None,
            }
        )
    return {
        "instances": instances,
        "majority_sha256": comparison.majority,
        "controls": [v.key for v in controls(views)],
        "ok": exit_code(views) == 0,
    }


def _text(value: int | None) -> str:
    return "-" if value is None else str(value)
