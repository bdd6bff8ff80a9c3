"""examples/monitoring: the Grafana dashboard and the Prometheus scrape configuration load, and every metric
they name is one threatgate exports (a renamed metric would leave an empty panel nobody notices)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "examples" / "monitoring"
METRIC = re.compile(r"\bthreatgate_[a-z_]*[a-z]\b")


def exported() -> set[str]:
    """Every ``threatgate_...`` string constant of the source: the metric family names (a counter family is
    named without ``_total``, which prometheus-client adds)."""
    names: set[str] = set()
    for path in (ROOT / "src" / "threatgate").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(METRIC, node.value):
                names.add(node.value)
    return names


def exists(name: str, known: set[str]) -> bool:
    return name in known or (name.endswith("_total") and name.removesuffix("_total") in known)


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_the_dashboard_is_valid_and_names_only_metrics_that_exist() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text(encoding="utf-8"))
    assert dashboard["title"] and dashboard["uid"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    exprs = expressions(dashboard)
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert len(used) >= 15, used
    known = exported()
    assert "threatgate_balancer_deployment_detections" in known, "the scan of the source is broken"
    missing = sorted(name for name in used if not exists(name, known))
    assert not missing, f"the dashboard names metrics threatgate does not export: {missing}"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def test_the_check_catches_a_metric_that_does_not_exist() -> None:
    known = exported()
    assert exists("threatgate_balancer_deployment_detections_total", known)
    assert exists("threatgate_balancer_backlog", known)
    assert not exists("threatgate_balancer_deployment_detections_by_category_total", known)
    assert not exists("threatgate_no_such_metric", known)


def test_the_scrape_configuration_names_the_balancer_and_the_nodes() -> None:
    # No YAML parser among the test dependencies: the file is plain enough to check line by line.
    text = (MONITORING / "prometheus.yml").read_text(encoding="utf-8")
    assert "\t" not in text
    jobs = re.findall(r"^  - job_name: (\S+)$", text, re.M)
    targets = re.findall(r'^      - targets: \[("[\w.:-]+"(?:, "[\w.:-]+")*)\]$', text, re.M)
    assert jobs == ["threatgate-balancer", "threatgate-node"] and len(targets) == 2, (jobs, targets)
    assert "scrape_configs:\n" in text and "metrics_path" not in text  # /metrics, Prometheus's default
