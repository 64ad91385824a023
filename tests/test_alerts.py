"""The alert rules (k8s/components/monitoring/alerts.yaml) fire when they should and only then: `promtool test rules`
on recorded series (alerts-test.yaml), every rule covered both firing and quiet, and thresholds that mirror the
deployed config held to it.

promtool is Debian's `prometheus` package (`make setup` installs it); without it the test fails, it is not skipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s import render

MONITORING = Path(__file__).resolve().parents[1] / "k8s" / "components" / "monitoring"


def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        pytest.fail("promtool is not installed: `apt-get install prometheus` (Debian) or `make setup`")
    return path


def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load((MONITORING / "alerts.yaml").read_text())["spec"]["groups"]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in rule_groups() for rule in group["rules"]}


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)


def write_rules(folder: Path, groups: list[dict[str, Any]], *, annotations: bool) -> None:
    """The PrometheusRule's groups as a plain Prometheus rules file (what the operator hands Prometheus)."""
    if not annotations:  # text for humans: `check rules` parses their templates; `test rules` checks the rest
        groups = [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
                  for g in groups]
    (folder / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))


def test_alert_rules_parse_with_their_annotation_templates(tmp_path: Path) -> None:
    write_rules(tmp_path, rule_groups(), annotations=True)
    result = run("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_on_the_recorded_series_and_stays_quiet_on_a_healthy_cluster(tmp_path: Path) -> None:
    write_rules(tmp_path, rule_groups(), annotations=False)
    shutil.copy(MONITORING / "alerts-test.yaml", tmp_path / "alerts-test.yaml")
    result = run("test", "rules", "alerts-test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_promtool_tests_cover_every_rule_firing_and_quiet() -> None:
    tests = yaml.safe_load((MONITORING / "alerts-test.yaml").read_text())["tests"]
    firing = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for test in tests for case in test["alert_rule_test"] if not case["exp_alerts"]}
    assert set(alerts()) == firing == quiet, (set(alerts()) ^ firing, set(alerts()) ^ quiet)


def test_a_broken_rule_fails_the_promtool_tests(tmp_path: Path) -> None:
    """The check above can fail: a backlog threshold doubled no longer fires on the recorded backlog."""
    groups = rule_groups()
    for group in groups:
        for rule in group["rules"]:
            if rule["alert"] == "InstantIDJobBacklogDeep":
                rule["expr"] = rule["expr"].replace("> 100", "> 200")
    write_rules(tmp_path, groups, annotations=False)
    shutil.copy(MONITORING / "alerts-test.yaml", tmp_path / "alerts-test.yaml")
    result = run("test", "rules", "alerts-test.yaml", cwd=tmp_path)
    assert result.returncode != 0 and "InstantIDJobBacklogDeep" in result.stdout + result.stderr


def test_the_alerts_operators_need_on_day_one_exist() -> None:
    assert {"InstantIDRayServiceNotReady", "InstantIDUpgradeStuck", "InstantIDJobBacklogDeep",
            "InstantIDJobBacklogOld", "InstantIDJobsBrokerUnreachable", "InstantIDGPUOutOfMemory",
            "InstantIDGPUReplicasBelowMinimum"} <= set(alerts())
    expr = alerts()["InstantIDRayServiceNotReady"]["expr"] + alerts()["InstantIDUpgradeStuck"]["expr"]
    # KubeRay v1.7's metric names (ray-operator/controllers/ray/metrics/ray_service_metrics.go)
    assert "kuberay_service_condition_ready" in expr and "kuberay_service_condition_upgrade_in_progress" in expr
    assert 'code="gpu_memory"' in alerts()["InstantIDGPUOutOfMemory"]["expr"]  # GPUMemoryError's code: the 503


def test_gpu_replicas_below_minimum_uses_the_gpu_overlays_min_replicas() -> None:
    rule = alerts()["InstantIDGPUReplicasBelowMinimum"]["expr"]
    (stages,) = [s.split("|") for s in re.findall(r'deployment=~"([^"]+)"', rule)]
    threshold = float(rule.rsplit("<", 1)[1])
    spec = render.app_config(render.render_serve_config("gpu"))
    gpu_stages = [name for name, options in spec.stages() if options["ray_actor_options"].get("num_gpus")]
    assert sorted(stages) == sorted(gpu_stages)
    assert {spec.options(name)["autoscaling_config"]["min_replicas"] for name in gpu_stages} == {threshold}
