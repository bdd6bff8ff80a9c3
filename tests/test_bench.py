"""The node benchmarks still run and still check what they measure, on a tiny generated set.

The benchmarks are not part of the suite's speed budget, but they import threatgate's internals (the
store, ``make_matcher``, the config): a change there must not leave them broken until the next
measuring session.  Each script runs as a user runs it, on 2,000 indicators and 3,000 events, with both
engines, and its raw results (``--json``) are checked: the detections equal ``expected.txt``, both engines
answer byte for byte the same, and a real node answers over TCP what the same engine answers in process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SIZE = ["--indicators", "2000", "--events", "3000"]


def run_bench(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], cwd=cwd, capture_output=True, text=True, timeout=240
    )


@pytest.mark.timeout(300)
def test_node_throughput_checks_both_engines_against_expected_and_each_other(tmp_path: Path) -> None:
    done = run_bench(
        "node_throughput.py", *SIZE, "--data-dir", str(tmp_path / "data"), "--no-grep",
        "--json", str(tmp_path / "out.json"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    [result] = json.loads((tmp_path / "out.json").read_text())
    assert result["indicators"] == 2000 and result["events"] == 3000
    runs = result["engines"]
    assert set(runs) == {"compiled", "reference"}
    for run in runs.values():
        assert run["detections"] == result["expected_detections"] > 0
        assert run["output_lines"] == result["events"] + run["detections"]
    assert runs["compiled"]["output_digest"] == runs["reference"]["output_digest"]
    assert "| 2,000 |" in done.stdout and "MISMATCH" not in done.stdout  # the markdown row for the docs
    restart = result["restart"]
    assert restart["seconds"] is None or restart["seconds"] > 0, restart


@pytest.mark.timeout(300)
def test_node_e2e_streams_to_a_real_node_on_each_engine_and_gets_the_in_process_answer(tmp_path: Path) -> None:
    done = run_bench(
        "node_e2e.py", *SIZE, "--data-dir", str(tmp_path / "data"), "--warmup", "200", "--no-socat",
        "--json", str(tmp_path / "out.json"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    runs = result["runs"]
    assert [r["engine"] for r in runs] == ["compiled", "reference"]
    for run in runs:
        assert run["valid"] and run["run"]["finished"] == 3000, run
    answers = {name: r["digest"] for name, r in result["in_process"].items()}
    assert answers["compiled"] == answers["reference"]
    assert min(r["detections"] for r in result["in_process"].values()) > 0


@pytest.mark.timeout(300)
def test_node_workers_streams_direct_and_through_a_balancer_and_reads_worker_memory(tmp_path: Path) -> None:
    # Workers 1 only: the harness (split streams, the balancer path, CPU and memory readings) on any build.
    done = run_bench(
        "node_workers.py", *SIZE, "--data-dir", str(tmp_path / "data"), "--warmup", "200", "--workers", "1",
        "--connections", "2", "--rounds", "1", "--json", str(tmp_path / "out.json"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    [node] = result["nodes"]
    assert node["workers"] == 1
    runs = {r["path"]: r for r in node["runs"]}
    assert set(runs) == {"direct", "balancer"}
    assert runs["direct"]["connections"] == 2 and runs["balancer"]["connections"] == 1
    for run in runs.values():
        assert run["valid"] and run["events"] == 3000 and run["wall"] > 0, run
    [memory] = node["memory"]
    assert 0 < memory["uss"] <= memory["pss"] <= memory["rss"]
    assert "2 workers / 1 worker, direct" in done.stdout


@pytest.mark.timeout(300)
def test_balancer_throughput_runs_every_path_over_plain_tcp_and_tls(tmp_path: Path) -> None:
    # Tiny: the harness (the TLS twins of each path, the client's sealed records, HAProxy's TLS
    # frontend and backend, the second balancer with TLS to the nodes), not the figures.
    args = ["--events", "3000", "--warmup", "0", "--rr-events", "200", "--rr-warmup", "20"]
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        args.append("--no-haproxy")
    done = run_bench("balancer_throughput.py", *args, "--json", str(tmp_path / "out.json"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    streams = {r["path"]: r for r in result["streams"]}
    tls_paths = {"direct tls", "balancer tls-in", "balancer tls", "direct x2 tls"}
    assert tls_paths <= set(streams) and {"direct", "balancer", "direct x2"} <= set(streams)
    for path, run in streams.items():
        assert run["lines"] == run["events"] == 3000 and not run["error"], run
        assert run["cipher"].startswith("TLSv1.3 ") == (path in tls_paths | {"haproxy tls"}), (path, run["cipher"])
    latency = [r for r in result["latency"] if r["path"] in tls_paths]
    assert {r["mode"] for r in latency} == {"request-reply", "paced"}
    assert all(r["cipher"].startswith("TLSv1.3 ") and not r["error"] for r in latency), latency
    assert "events/s balancer tls / balancer, streaming" in done.stdout
