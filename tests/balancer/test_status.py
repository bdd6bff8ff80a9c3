"""balancer/status.py: the ``balancer status`` table, its footer, ``--json`` and the exit code, from views alone.

Rendering and the exit code are pure functions of the readiness views, so no node is asked here (the command
against running nodes is in tests/integration/test_balancer_cluster.py).
"""

from __future__ import annotations

import json
from typing import Any

from threatgate.balancer.readiness import Readiness, View, parse_readiness
from threatgate.balancer.status import as_json, balancer_states, exit_code, render

A, B = "a" * 64, "b" * 64


def answer(role: str = "standalone", sha256: str | None = None, **fields: Any) -> Readiness:
    return Readiness(ready=fields.pop("ready", True), role=role, sha256=sha256, **fields)


def view(key: str, role: str = "standalone", sha256: str | None = None, **fields: Any) -> View:
    return View(key, api="443", answer=answer(role, sha256, **fields))


def down(key: str, last: Readiness | None = None, error: str = "cannot connect: Connection refused") -> View:
    return View(key, api="443", answer=last, error=error)


def test_the_table_flags_the_differing_node_and_names_the_control() -> None:
    views = [
        view("127.0.0.1:10001", "control", A, epoch=2, revision=7),
        view("127.0.0.1:10002", "secondary", B, epoch=2, revision=6),
        view("127.0.0.1:10003", "secondary", A, epoch=2, revision=7, ready=False),
    ]
    assert render(views).splitlines() == [
        "   INSTANCE         API  STATE    ROLE       EPOCH  REVISION  DIGEST",
        "   127.0.0.1:10001  443  ready    control    2      7         aaaaaaaaaaaa",
        "!  127.0.0.1:10002  443  ready    secondary  2      6         bbbbbbbbbbbb",
        "   127.0.0.1:10003  443  loading  secondary  2      7         aaaaaaaaaaaa",
        "! = settings digest differs from the majority (aaaaaaaaaaaa); Control: 127.0.0.1:10001",
    ]
    assert exit_code(views) == 1
    assert [i["differs"] for i in as_json(views)["instances"]] == [False, True, False]


def test_agreement_exits_0_and_an_unreachable_node_exits_1() -> None:
    views = [view("n1", "control", A, epoch=1, revision=1), view("n2", "secondary", A, epoch=1, revision=1)]
    assert render(views).splitlines()[-1] == "all 2 cluster instance(s) hold settings aaaaaaaaaaaa; Control: n1"
    assert exit_code(views) == 0 and as_json(views)["ok"] is True
    views.append(down("n3", error="x" * 200))
    lines = render(views).splitlines()
    assert lines[3].split()[:3] == ["n3", "443", "unreachable:"] and lines[3].count("x") < 72
    assert exit_code(views) == 1
    assert as_json(views)["instances"][2]["state"] == "unreachable: " + "x" * 200  # whole in --json


def test_skipped_instances_do_not_fail_the_status_and_standalone_needs_no_digest() -> None:
    views = [view("n1"), View("n2", skip="disabled"), View("n3", skip="no api_port")]
    lines = render(views).splitlines()
    assert lines[0] == "INSTANCE  API  STATE        ROLE        EPOCH  REVISION  DIGEST"  # no flag column in use
    assert lines[2] == "n2        -    disabled     unknown     -      -         -"
    assert lines[-1].startswith("no cluster member reachable: standalone nodes keep their own settings")
    assert exit_code(views) == 0


def test_no_control_and_several_controls_are_said_in_the_footer() -> None:
    frozen = [down("n1", last=answer("control", A)), view("n2", "secondary", A)]
    assert render(frozen).splitlines()[-1].endswith("; Control: none reachable (settings are frozen)")
    two = [view("n1", "control", A, epoch=1), view("n2", "control", B, epoch=1)]
    assert render(two).splitlines()[-1] == (
        "! = settings digest differs from the majority (none (a tie)); "
        "Controls: n1, n2 (more than one: demote all but one)"
    )


def test_a_pin_mismatch_is_a_refusal_not_an_outage() -> None:
    refused = View("n1", api="443", error="certificate mismatch: pinned X, presented Y", pin_mismatch=True)
    assert refused.state == "refused: certificate mismatch: pinned X, presented Y"
    assert exit_code([refused]) == 1


def readyz(**fields: Any) -> View:
    return View("127.0.0.1:1", api="443", answer=parse_readiness(200, json.dumps(fields).encode()))


def test_status_shows_lanes_only_when_there_is_more_than_one() -> None:
    plain = [readyz(ready=True, role="standalone")]
    assert "LANES" not in render(plain)
    workers = [readyz(ready=True, role="standalone", event_connections=2), View("127.0.0.1:2", skip="no api_port")]
    workers[1].connections = 3
    lines = render(workers).splitlines()
    assert lines[0].split()[:3] == ["INSTANCE", "API", "LANES"]
    assert lines[1].split()[:4] == ["127.0.0.1:1", "443", "2", "(auto)"]
    assert lines[2].split()[:3] == ["127.0.0.1:2", "-", "3"]
    rows = as_json(workers)["instances"]
    assert [(r["connections"], r["lanes"]) for r in rows] == [("auto", 2), (3, 3)]


def test_the_running_balancers_states_show_beside_the_nodes_answers() -> None:
    rows = [
        {"instance": "127.0.0.1:1", "state": "MAINT", "why": "drained at run time"},
        {"instance": "127.0.0.1:2", "state": "UP", "why": ""},
    ]
    running = balancer_states(rows)
    assert running == {"127.0.0.1:1": "MAINT (drained at run time)", "127.0.0.1:2": "UP"}
    views = [readyz(ready=True, role="standalone"), View("127.0.0.1:2", skip="no api_port")]
    header, first, second = render(views, running).splitlines()[:3]
    assert header.split()[:4] == ["INSTANCE", "API", "STATE", "BALANCER"]
    assert "MAINT (drained at run time)" in first and second.split()[:2] == ["127.0.0.1:2", "-"]
    assert "BALANCER" not in render(views)  # no balancer answered: the column is left out
    assert [i["balancer"] for i in as_json(views, running)["instances"]] == ["MAINT (drained at run time)", "UP"]
    assert [i["balancer"] for i in as_json(views)["instances"]] == [None, None]
