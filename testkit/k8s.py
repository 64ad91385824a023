"""The KubeRay manifests as tests read them: `kubectl kustomize` of an overlay, strict schema validation (core kinds
from the `kubernetes-validate` package, custom resources from k8s/schemas/), and small readers of what a rendered
RayCluster holds."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
K8S_VERSION = "1.32"  # the strict core schemas to check against (kubernetes-validate ships 1.25 .. 1.37)
CUSTOM_SCHEMAS = {  # generated from the upstream CRDs by k8s/schemas/generate.py (versions: k8s/schemas/README.md)
    ("ray.io/v1", "RayService"): "rayservice.ray.io-v1.json",
    ("ray.io/v1", "RayCluster"): "raycluster.ray.io-v1.json",
    ("ray.io/v1", "RayJob"): "rayjob.ray.io-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.monitoring.coreos.com-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute.gateway.networking.k8s.io-v1.json",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway.gateway.networking.k8s.io-v1.json",
}


def kustomize(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize PATH` (or `kustomize build PATH`), parsed."""
    if shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(path)]
    elif shutil.which("kustomize"):
        command = ["kustomize", "build", str(path)]
    else:
        pytest.fail("neither kubectl nor kustomize is installed: install kubectl (it carries kustomize v5)")
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """An overlay (`cpu-demo`, `gpu`) or `batch` (k8s/batch, the RayJob), rendered."""
    return tuple(kustomize(K8S / "batch" if overlay == "batch" else K8S / "overlays" / overlay))


def one(docs: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def ray_start_resources(group: dict[str, Any]) -> dict[str, float]:
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}  # KubeRay's documented quoting: '"{\"gpu_node\": 1}"'


MONITORING = K8S / "components" / "monitoring"
def queried_metrics() -> set[str]:
    """Every metric name the shipped dashboard and alerts query (histograms by their base name)."""
    dashboard = json.loads((MONITORING / "instantid-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    exprs += [rule["expr"] for group in rules["spec"]["groups"] for rule in group["rules"]]
    names = {name for expr in exprs for name in re.findall(r"\b(ray_[a-z0-9_]+)", expr)}
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}


@cache
def core_registry() -> tuple[Path, Registry]:
    import kubernetes_validate

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"
    definitions = json.loads((root / "_definitions.json").read_text())
    return root, Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))


def validate(doc: dict[str, Any]) -> None:
    """Validate one manifest strictly: a core kind against kubernetes-validate's schema, a custom resource against
    k8s/schemas/ (whose core parts resolve to the same strict core definitions)."""
    root, registry = core_registry()
    custom = CUSTOM_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if custom:
        schema = json.loads((K8S / "schemas" / custom).read_text())
    else:
        group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
        path = root / f"{doc['kind'].lower()}-{group_version}.json"
        assert path.exists(), f"no schema for {doc['apiVersion']} {doc['kind']}"
        schema = json.loads(path.read_text())
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{doc['kind']}/{doc['metadata']['name']} at "
                                 f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def ray_clusters(docs: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every RayClusterSpec in the documents (a RayService's rayClusterConfig, a RayJob's rayClusterSpec)."""
    return [d["spec"]["rayClusterConfig"] if d["kind"] == "RayService" else d["spec"]["rayClusterSpec"]
            for d in docs if d["kind"] in ("RayService", "RayJob")]


def pod_templates(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]


def quantity(value: str) -> float:
    """A Kubernetes quantity in bytes ("64Gi", "500M", "1e3"): the few suffixes resources use; no client library
    in the test extra parses them (the `kubernetes` package would be one dependency for one function)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    number, unit = re.fullmatch(r"([0-9.e+-]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units.get(unit, 1)
