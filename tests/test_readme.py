"""The README's commands, run exactly as written, as a new user would on a fresh machine.

Every fenced ``sh`` block of README.md is a session: it runs top to bottom in bash (``set -euo
pipefail``) from a fresh directory holding a copy of ``examples/`` and the checkout's ``.venv`` (what
``./scripts/test`` made), inside a network namespace of its own, so the README's fixed ports (9999,
8443, 10001...) never clash with anything else. Processes a block starts with ``&`` are stopped when
it ends. A block preceded by ``<!-- not run by tests/test_readme.py: why -->`` is skipped (the quick
start's two commands: this test runs inside the second one). Each block must exit 0, and what it
prints must show what the README promises (``PROMISES``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SKIP = re.compile(r"<!-- not run by tests/test_readme\.py: [^>]+ -->\s*$")
BLOCK_TIMEOUT = 180.0

PROMISES: dict[str, list[str]] = {
    "Using a node": [
        "config OK",
        "1 category=Malicious_URL matchedIndicator=http://fakess123.nu",
        "1 LookupFinished",
        "PONG",
        "a running node uses it at once",
        '[{"object":"http://fakess123.nu","result":"detected"',
        "wrote 100000 indicators",
    ],
    "Using a balancer": ["config OK", "matchedIndicator=http://fakess123.nu", "LookupFinished"],
    "Sending events over TLS": [
        "PONG",
        "1 category=Malicious_URL matchedIndicator=http://fakess123.nu",
        "1 LookupFinished",
        "2 category=Malicious_URL matchedIndicator=http://fakess123.nu",
        "2 LookupFinished",
    ],
    "Running a cluster": ["this node is its Control", "joined cluster", "secondary"],
}
"""Per README section: text its output must contain (what the section says will happen)."""


def blocks() -> list[tuple[str, str]]:
    """(section heading, script) of every ``sh`` block the test runs, in README order."""
    out: list[tuple[str, str]] = []
    heading = ""
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            heading = line[3:].strip()
        if line.strip() == "```sh":
            skipped = i > 0 and SKIP.search(lines[i - 1]) is not None
            end = lines.index("```", i + 1)
            if not skipped:
                out.append((heading, "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return out


def test_every_section_with_commands_is_run_or_says_why_not() -> None:
    run = [heading for heading, _ in blocks()]
    assert sorted(run) == sorted(PROMISES), run


@pytest.mark.timeout(BLOCK_TIMEOUT + 60)
@pytest.mark.parametrize(("heading", "script"), blocks(), ids=[h for h, _ in blocks()])
def test_readme_block_runs_as_written(heading: str, script: str, tmp_path: Path) -> None:
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.fail("this test needs root and iproute2 (ip netns): ./scripts/test installs iproute2; CI runs as root")
    work = tmp_path / "checkout"
    work.mkdir()
    shutil.copytree(ROOT / "examples", work / "examples")
    (work / ".venv").symlink_to(ROOT / ".venv")
    wrapped = f"set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null || true' EXIT\n{script}\n"
    netns = f"tg-readme-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, PATH=f"{work / '.venv' / 'bin'}:{os.environ['PATH']}", HOME=str(tmp_path))
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True)
        done = subprocess.run(
            ["ip", "netns", "exec", netns, "bash", "-c", wrapped],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
        )
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False)
    shown = f"exit {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    assert done.returncode == 0, shown
    for promise in PROMISES[heading]:
        assert promise in done.stdout + done.stderr, f"{promise!r} not printed\n{shown}"
