"""Fixtures and options shared by every test directory.

The matching engines (issue 13): the compiled batch engine and the pure-Python reference must give the same
answers, so the tests that build matchers run on both.  A module (or a test) opts in by using the ``engine``
fixture, for example ``pytestmark = pytest.mark.usefixtures("engine")``; nothing else is parametrised, so the
rest of the suite runs once.  The fixture sets ``THREATGATE_ENGINE`` for the module, and
``threatgate.node.engine.make_matcher(config, store)`` builds the matcher of that engine.  Module scope: a
module runs all its tests on one engine, then all on the other, so a module fixture that loads feeds or
builds a matcher (and depends on ``engine``) is built once per engine, not once per test.

``--engine compiled`` or ``--engine reference`` runs one of them only (a quick local run, or a CI job that
splits the two); the default is both.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from threatgate.node.engine import ENGINE_ENV, ENGINES


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--engine",
        action="append",
        choices=ENGINES,
        help="run the tests that use the `engine` fixture on this matching engine only (repeatable; default: all)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that uses ``engine`` (as an argument or through usefixtures) once per selected engine."""
    if "engine" in metafunc.fixturenames:
        selected = metafunc.config.getoption("engine") or list(ENGINES)
        metafunc.parametrize("engine", selected, indirect=True, scope="module")


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """The engine name; ``THREATGATE_ENGINE`` names it while the module's tests run."""
    name: str = request.param
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENGINE_ENV, name)
        yield name
