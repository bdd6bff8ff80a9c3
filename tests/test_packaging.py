"""What a user gets from ``pip install`` of the wheel or the sdist, and from the systemd units in packaging/.

The sdist and the wheel are built with the standard tool (``python -m build``: the sdist first, then the
wheel from the unpacked sdist, so the wheel proves the sdist carries everything the compiled engine needs).
The wheel is installed into a directory of its own and run from another directory, so nothing of the
checkout (its examples/, its src/, its in-place ``_engine*.so``) can stand in for what the wheel ships.
The sdist is installed into a fresh venv by pip, which builds the C extension from it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import venv
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


def clean_tree(dest: Path) -> Path:
    """The checkout's files that git tracks or would track (not ignored), copied to ``dest``, links as links.

    A build in the checkout itself would read its stale ``*.egg-info/SOURCES.txt`` and put in the sdist
    files that MANIFEST.in no longer names; a fresh clone has no such thing.
    """
    listed = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    assert listed.returncode == 0, listed.stderr
    for name in filter(None, listed.stdout.split("\0")):
        source, target = ROOT / name, dest / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree, not yet in the index
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel) of this checkout, from ``python -m build`` (in the test venv, which has setuptools)."""
    out = tmp_path_factory.mktemp("dist")
    tree = clean_tree(tmp_path_factory.mktemp("tree"))
    done = run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(tree), cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [sdist] = out.glob("threatgate-*.tar.gz")
    [wheel] = out.glob("threatgate-*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def installed(
    built: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict[str, str]]]:
    """The wheel installed (without its dependencies, which the test venv has) into a directory of its
    own: (the wheel, an environment that imports threatgate from that directory)."""
    _, wheel = built
    target = tmp_path_factory.mktemp("site")
    done = run(
        sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel), cwd=target
    )
    assert done.returncode == 0, done.stderr
    env = dict(os.environ, PYTHONPATH=str(target))
    yield wheel, env


ENGINE_CHECK = """
import sys, threatgate.node._engine as engine
print(engine.__file__)
print(engine.key_of(6, b"cdn7.example"))
"""
"""Imports the compiled engine and prints where it was loaded from and one fixed store key."""


def expected_key() -> str:
    """The documented store key of the MASK host "cdn7.example" (xxh3_64, seed = kind 6), as text."""
    import xxhash

    return str(xxhash.xxh3_64_intdigest(b"cdn7.example", seed=6))


def test_the_sdist_carries_the_engine_sources_and_not_a_built_engine(built: tuple[Path, Path]) -> None:
    sdist, _ = built
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for source in (
        "setup.py",
        "MANIFEST.in",
        "src/threatgate/node/_engine.c",
        "src/threatgate/node/_native/xxhash.h",
        "src/threatgate/node/_native/LICENSE.xxhash",
    ):
        assert source in names, source
    assert not [n for n in names if n.endswith(".so")], "a compiled object in the sdist"


def test_the_wheel_carries_the_compiled_engine_and_it_imports(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    wheel, env = installed
    assert "-cp3" in wheel.name and not wheel.name.endswith("-none-any.whl"), wheel.name  # a platform wheel
    with zipfile.ZipFile(wheel) as z:
        engines = [n for n in z.namelist() if n.startswith("threatgate/node/_engine") and n.endswith(".so")]
    assert len(engines) == 1, engines
    done = run(sys.executable, "-c", ENGINE_CHECK, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    where, key = done.stdout.split()
    assert where.startswith(env["PYTHONPATH"]), where  # the wheel's engine, not the checkout's in-place build
    assert key == expected_key()


@pytest.mark.timeout(300)
def test_the_sdist_installs_in_a_fresh_venv_and_builds_the_engine(built: tuple[Path, Path], tmp_path: Path) -> None:
    """pip builds the sdist in an isolated build environment (setuptools from the index) and compiles the
    engine against the vendored header and the system's PCRE2: what a user without a wheel gets."""
    sdist, _ = built
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=True)
    python = str(fresh / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "THREATGATE_ENGINE")}
    done = run(
        python, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check", str(sdist),
        cwd=tmp_path, env=env, timeout=280,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checked = run(python, "-c", ENGINE_CHECK, cwd=tmp_path, env=env)
    assert checked.returncode == 0, checked.stderr
    where, key = checked.stdout.split()
    assert where.startswith(str(fresh)), where
    assert key == expected_key()


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
    for page in ("index.html", "login.html", "console.js", "console.css"):
        assert f"threatgate/balancer/console_page/{page}" in names, page


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
