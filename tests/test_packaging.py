"""What a user gets from ``pip install`` of the wheel, and from the systemd units in packaging/.

The wheel is built with pip from this checkout, installed into a directory of its own and run from
another directory, so nothing of the checkout (its examples/, its src/) can stand in for what the
wheel ships.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import NodeProcess, example_config, free_port

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "threatgate")
"""The console script of the test venv (its bin/ need not be on PATH)."""


def run(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """The wheel built from this checkout, installed (without its dependencies, which the test venv has)
    into a directory of its own: (that directory, an environment that imports threatgate from it)."""
    out = tmp_path_factory.mktemp("wheel")
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT), cwd=out)
    assert built.returncode == 0, built.stderr
    [wheel] = out.glob("threatgate-*.whl")
    target = tmp_path_factory.mktemp("site")
    done = run(sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel), cwd=out)
    assert done.returncode == 0, done.stderr
    env = dict(os.environ, PYTHONPATH=str(target))
    yield wheel, env


def test_the_wheel_carries_the_license_and_the_examples(installed: tuple[Path, dict[str, str]]) -> None:
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = z.read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text.splitlines()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    shipped = ("node.conf", "balancer.conf", "events.txt", "feeds/malicious_urls.json", "feeds/misp/manifest.json")
    for example in shipped:
        assert f"threatgate/examples/{example}" in names, example


def test_the_installed_examples_validate_from_any_directory(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """``threatgate examples DIR`` writes the shipped examples; they validate; a second run refuses to
    overwrite them without --force."""
    _, env = installed
    where = run(sys.executable, "-c", "import threatgate; print(threatgate.__file__)", cwd=tmp_path, env=env)
    assert not where.stdout.startswith(str(ROOT)), where.stdout  # the installed copy, not the checkout
    wrote = run(sys.executable, "-m", "threatgate", "examples", "ex", cwd=tmp_path, env=env)
    assert wrote.returncode == 0, wrote.stderr
    assert "next: threatgate validate ex/node.conf" in wrote.stdout
    for name in ("node.conf", "balancer.conf"):
        checked = run(sys.executable, "-m", "threatgate", "validate", f"ex/{name}", cwd=tmp_path, env=env)
        assert checked.returncode == 0, checked.stderr
        assert f"ex/{name}: " in checked.stdout and " config OK" in checked.stdout
    again = run(sys.executable, "-m", "threatgate", "examples", "ex", cwd=tmp_path, env=env)
    assert again.returncode == 2 and "already exist" in again.stderr and "--force" in again.stderr
    forced = run(sys.executable, "-m", "threatgate", "examples", "ex", "--force", cwd=tmp_path, env=env)
    assert forced.returncode == 0, forced.stderr


@pytest.mark.timeout(300)
def test_the_installed_demo_runs_from_any_directory(installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    _, env = installed
    demo = run(sys.executable, "-m", "threatgate", "demo", "--workdir", "work", cwd=tmp_path, env=env, timeout=280)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert (tmp_path / "work" / ".threatgate-demo").is_file()


def test_the_demo_never_empties_a_directory_it_did_not_make(tmp_path: Path) -> None:
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    refused = run(sys.executable, "-m", "threatgate", "demo", "--workdir", str(precious), cwd=tmp_path)
    assert refused.returncode == 1
    assert "is not a previous demo directory" in refused.stderr
    assert (precious / "keep.txt").read_text() == "mine"


def test_shell_completion_is_generated_by_click() -> None:
    env = dict(os.environ, _THREATGATE_COMPLETE="bash_source")
    out = run(CLI, cwd=ROOT, env=env)
    assert out.returncode == 0 and "_threatgate_completion()" in out.stdout


@pytest.mark.parametrize("unit", ["threatgate-node.service", "threatgate-balancer.service"])
def test_the_systemd_units_verify_clean(unit: str, tmp_path: Path) -> None:
    """``systemd-analyze verify`` finds nothing to say (it only warns, so its output must be empty)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = (ROOT / "packaging" / unit).read_text().replace("/usr/local/bin/threatgate", CLI)
    assert "Type=notify" in text and "ExecReload=/bin/kill -HUP $MAINPID" in text
    (tmp_path / unit).write_text(text)
    checked = run(analyze, "verify", str(tmp_path / unit), cwd=tmp_path)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked


def test_a_node_tells_systemd_when_it_is_ready_and_when_it_stops(tmp_path: Path) -> None:
    """``Type=notify``: READY=1 once the node listens for events (feeds loaded), STOPPING=1 at SIGTERM."""
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(30)
        port = free_port()
        config = example_config(tmp_path / "node", port=port)
        os.environ["NOTIFY_SOCKET"] = address
        try:
            node = NodeProcess(config, port)
        finally:
            del os.environ["NOTIFY_SOCKET"]
        try:
            ready = sock.recv(4096).decode()
            assert ready.splitlines()[0] == "READY=1", ready
            assert "node listening for events" in node.log()  # not before the node can take events
            node.signal(signal.SIGTERM)
            assert sock.recv(4096).decode() == "STOPPING=1"
            assert node.proc.wait(20) == 0
        finally:
            node.stop()
