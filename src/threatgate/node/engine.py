"""Which matching engine a node runs: the compiled batch engine (default) or the pure-Python reference.

``THREATGATE_ENGINE=reference`` selects the reference :class:`~threatgate.node.matcher.Matcher`;
``compiled`` (the default) the batch engine of :mod:`threatgate.node._engine` (issue 13, in progress: until it
lands both names give the reference matcher).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from threatgate.config.node import NodeConfig
from threatgate.node.matcher import Matcher
from threatgate.node.store import IndicatorStore

ENGINE_ENV = "THREATGATE_ENGINE"
ENGINES = ("compiled", "reference")


def engine_choice(environ: Mapping[str, str] = os.environ) -> str:
    """The engine named by ``THREATGATE_ENGINE`` ("compiled" when unset); ValueError for another name."""
    name = environ.get(ENGINE_ENV, "compiled").strip().lower() or "compiled"
    if name not in ENGINES:
        raise ValueError(f"{ENGINE_ENV}={name!r} is not an engine; use one of: {', '.join(ENGINES)}")
    return name


def make_matcher(config: NodeConfig, store: IndicatorStore, engine: str | None = None) -> Matcher:
    """A matcher of the chosen engine (``engine`` None: from the environment)."""
    engine_choice({ENGINE_ENV: engine} if engine is not None else os.environ)
    return Matcher(config, store)
