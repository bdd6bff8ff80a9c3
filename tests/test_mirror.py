"""Tests mirror the package: each module with logic has a test file of its own name (docs/architecture.md).

``src/threatgate/<package>/<module>.py`` is tested in ``tests/<package>/test_<module>.py`` and a top-level
``src/threatgate/<module>.py`` in ``tests/test_<module>.py``, as h11 and uvicorn lay theirs out
(../shared/STYLE.md, "Tests mirror modules"): whoever changes a module knows where its unit tests are, and
whoever reads a test file knows what it is about.  Tests that cut across modules (the layering, the
sans-IO rule, the examples, the integration tests with real processes) keep their own names beside them.

A module without a mirror file must be in ``EXEMPT`` below, with the test file that covers it instead
(an integration file when the module only makes sense with real processes) and why.  The list is kept
short and honest both ways: an exemption for a module that now has its mirror file, or that no longer
exists, fails too.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "threatgate"
TESTS = ROOT / "tests"


class Exempt(NamedTuple):
    """Why a module has no mirror file, and which test file covers it instead ("" when nothing needs to)."""

    covered_by: str
    why: str


EXEMPT: dict[str, Exempt] = {
    # -- glue with no logic of its own --------------------------------------------------------------------------
    "__main__.py": Exempt("tests/test_packaging.py", "three lines that call cli.main"),
    "_version.py": Exempt("tests/test_packaging.py", "one constant, the version the wheel is built with"),
    # -- composition roots: they build and wire a process's parts, so the processes test them ------------------
    "node/app.py": Exempt("tests/integration/test_node_process.py", "the node's composition root"),
    "balancer/app.py": Exempt(
        "tests/integration/test_balancer.py", "the balancer's composition root; being reworked in issue 15"
    ),
    # -- being reworked in issue 15 (the dispatcher and the lean gateway): their tests move with them -----------
    "balancer/service.py": Exempt(
        "tests/integration/test_balancer.py",
        "also tests/balancer/test_lanes.py and tests/integration/test_balancer_faults.py; being reworked in issue 15",
    ),
    "balancer/upstream.py": Exempt(
        "tests/balancer/test_lanes.py", "also tests/integration/test_balancer_faults.py; being reworked in issue 15"
    ),
    "balancer/gateway.py": Exempt(
        "tests/balancer/test_gateway_unit.py", "also tests/integration/test_gateway.py; being reworked in issue 15"
    ),
    "balancer/pins.py": Exempt(
        "tests/balancer/test_gateway_unit.py", "the pin store's tests; being reworked in issue 15"
    ),
    "balancer/verify.py": Exempt(
        "tests/balancer/test_gateway_unit.py",
        "pin_rows, decide_renewal, fingerprint_text; also tests/integration/test_gateway.py; "
        "being reworked in issue 15",
    ),
    "net/events.py": Exempt(
        "tests/integration/test_balancer.py", "tests/net/test_events.py is being written in another slice of issue 15"
    ),
    # -- only meaningful with real processes, sockets or etcd: the integration tests cover them ----------------
    "node/service.py": Exempt(
        "tests/integration/test_node_process.py",
        "the node's sockets, reloads and shutdown; its decisions live in the modules it calls",
    ),
    "node/pool.py": Exempt(
        "tests/integration/test_node_workers.py", "spawns and supervises worker processes (the plan is node/spread.py)"
    ),
    "node/worker.py": Exempt(
        "tests/integration/test_node_workers.py", "a worker process's main; tests/node/test_worker_imports.py too"
    ),
    "cluster/agent.py": Exempt(
        "tests/integration/test_cluster.py",
        "the agent's HTTP server and loops (its decisions are in cluster/sync.py); being split in issue 15",
    ),
    "demo.py": Exempt("tests/test_packaging.py", "runs a node and a balancer for a person to look at"),
}


def mirror(module: Path) -> Path:
    """Where the unit tests of ``module`` (a path under the package) live."""
    relative = module.relative_to(PACKAGE)
    return TESTS.joinpath(*relative.parent.parts, f"test_{relative.name}")


def modules() -> list[Path]:
    """Every module of the package; a package's ``__init__`` holds no logic (test_mirror checks that too)."""
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py"]


def name(module: Path) -> str:
    return module.relative_to(PACKAGE).as_posix()


@pytest.mark.parametrize("module", modules(), ids=name)
def test_each_module_has_its_mirror_test_file_or_a_stated_exemption(module: Path) -> None:
    exempt = EXEMPT.get(name(module))
    if exempt is None:
        assert mirror(module).is_file(), (
            f"{name(module)} has no {mirror(module).relative_to(ROOT)}: put its unit tests there, or add it to "
            "EXEMPT in tests/test_mirror.py saying which test covers it and why"
        )
    else:
        assert not mirror(module).is_file(), f"{name(module)} has its mirror file now: drop it from EXEMPT"
        assert exempt.why, name(module)
        assert not exempt.covered_by or (ROOT / exempt.covered_by).is_file(), exempt.covered_by


def test_every_exemption_names_a_module_that_exists() -> None:
    assert sorted(set(EXEMPT) - {name(m) for m in modules()}) == []


def test_package_inits_hold_no_logic() -> None:
    """An ``__init__`` has no mirror file, so it may hold a docstring and re-exports only."""
    for init in sorted(PACKAGE.rglob("__init__.py")):
        body = [line for line in init.read_text(encoding="utf-8").splitlines() if line.strip()]
        assert not any(line.lstrip().startswith(("def ", "class ", "async def ")) for line in body), init


def test_the_mirror_path_of_a_module() -> None:
    assert mirror(PACKAGE / "wire" / "framing.py") == TESTS / "wire" / "test_framing.py"
    assert mirror(PACKAGE / "errors.py") == TESTS / "test_errors.py"
