"""Tests mirror the package: each module with logic has a test file of its own name (docs/architecture.md).

``src/threatgate/<package>/<module>.py`` is tested in ``tests/<package>/test_<module>.py`` and a top-level
``src/threatgate/<module>.py`` in ``tests/test_<module>.py``, as h11 and uvicorn lay theirs out
(../shared/STYLE.md, "Tests mirror modules"): whoever changes a module knows where its unit tests are, and
whoever reads a test file knows what it is about.  Tests that cut across modules (the layering, the
sans-IO rule, the examples, the integration tests with real processes) keep their own names beside them.

A module without a mirror file must be in ``EXEMPT`` below, with the test file that covers it instead
(an integration file when the module only makes sense with real processes) and why.  The other way
round, a unit test file named after no module must be in ``ACROSS``, saying what it checks across
modules, so that a test file of a module is never named otherwise.  Both lists are kept short and honest:
an entry for a module that now has its mirror file, or for a file that no longer exists, fails too.
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
        "tests/balancer/test_service.py",
        "the balancer's composition root (build_balancer); tests/balancer/test_admin.py and the processes use it",
    ),
    # -- records only: what the dispatcher returns, tested with it ----------------------------------------------
    "lb/actions.py": Exempt("tests/lb/test_dispatcher.py", "NamedTuples the dispatcher returns, no logic"),
    # -- being reworked in issue 15 (the lean gateway): their tests move with them ------------------------------
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
    # -- only meaningful with real processes, sockets or etcd: the integration tests cover them ----------------
    "node/service.py": Exempt(
        "tests/integration/test_node_process.py",
        "the node's sockets, reloads and shutdown; its decisions live in the modules it calls",
    ),
    "node/pool.py": Exempt(
        "tests/integration/test_node_workers.py",
        "spawns and supervises worker processes; its decisions are node/spread.py and node/supervisor.py",
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


ACROSS: dict[str, str] = {
    # -- rules over the whole package ---------------------------------------------------------------------------
    "test_layers.py": "no import runs back up the layers or forms a circle",
    "test_sans_io.py": "the protocol and matching cores import no event loop, sockets, TLS or clock",
    "test_mirror.py": "this file: the tests mirror the modules",
    "test_packaging.py": "the wheel builds, installs and runs (python -m threatgate, the demo)",
    "test_readme.py": "the README's commands run as written",
    "test_examples.py": "examples/monitoring: the dashboard and scrape config name metrics the source exports",
    "test_bench.py": "the benchmarks in bench/ still run",
    # -- features that span modules -----------------------------------------------------------------------------
    "config/test_bounds.py": "config bounds are declared once, on the models, and the XML readers use them",
    "config/test_examples.py": "the example configs stay one configuration on other ports",
    "config/test_unknown_names.py": "every misspelt name in node.conf, kl_balancer.conf and <Settings> is refused",
    "config/test_feed_columns.py": "<Feed indicator_column, context_columns>: read by config/node.py, used by readers",
    "config/test_feed_formats.py": "<Feed format>: read by config/node.py, loaded by each reader",
    "node/test_feeds_published.py": "CSV feeds as the world publishes them, through every reader",
    "node/test_shared_snapshots.py": "snapshots passed to workers by descriptor: snapfile, feedsnapshot, store",
    "node/test_worker_imports.py": "a worker process imports no server, parser or cluster code",
    "lb/test_scan.py": "the compiled lb/_scan.c against its Python references in lb/correlation.py",
    # -- being reworked in issue 15: their tests move to the mirror files with the modules ---------------------
    "balancer/test_gateway_unit.py": "balancer/gateway.py, pins.py and verify.py; being reworked in issue 15",
}
"""Unit test files named after no module (paths under tests/), and what each checks across modules."""


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


def unit_test_files() -> list[Path]:
    return [p for p in sorted(TESTS.rglob("test_*.py")) if "integration" not in p.relative_to(TESTS).parts]


@pytest.mark.parametrize("test_file", unit_test_files(), ids=lambda p: p.relative_to(TESTS).as_posix())
def test_each_unit_test_file_is_a_mirror_or_says_what_it_checks_across_modules(test_file: Path) -> None:
    mirrors = {mirror(m) for m in modules()}
    key = test_file.relative_to(TESTS).as_posix()
    if key in ACROSS:
        assert test_file not in mirrors, f"{key} is the mirror of a module now: drop it from ACROSS"
    else:
        assert test_file in mirrors, (
            f"{key} is named after no module: put its tests in the mirror file of the module they test, "
            "or add it to ACROSS in tests/test_mirror.py saying what it checks across modules"
        )


def test_every_entry_of_across_names_a_test_file() -> None:
    assert sorted(k for k in ACROSS if not (TESTS / k).is_file()) == []


def test_package_inits_hold_no_logic() -> None:
    """An ``__init__`` has no mirror file, so it may hold a docstring and re-exports only."""
    for init in sorted(PACKAGE.rglob("__init__.py")):
        body = [line for line in init.read_text(encoding="utf-8").splitlines() if line.strip()]
        assert not any(line.lstrip().startswith(("def ", "class ", "async def ")) for line in body), init


def test_the_mirror_path_of_a_module() -> None:
    assert mirror(PACKAGE / "wire" / "framing.py") == TESTS / "wire" / "test_framing.py"
    assert mirror(PACKAGE / "errors.py") == TESTS / "test_errors.py"
