"""A node's worker process stays lean: each one more costs an interpreter and buffers (issue 14's memory target)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    "aiohttp",
    "pyarrow",
    "orjson",
    "cryptography",
    "prometheus_client",
    "threatgate.cluster",
    "threatgate.node.api",
)


def test_the_worker_module_imports_no_server_parser_or_cluster_code() -> None:
    code = f"import sys, threatgate.node.worker\nprint(sorted({{m for m in sys.modules if m.startswith({HEAVY!r})}}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
