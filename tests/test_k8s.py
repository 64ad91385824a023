"""The KubeRay manifests: kustomize renders every overlay, the serve config they carry is serve_config.yaml's (so the
two cannot drift), the proxies' limits follow AppConfig, and every manifest names only fields its API has.

Rendering uses `kubectl kustomize` (kubectl with kustomize v5 is on the project's machines; the test fails, it is
not skipped, when neither `kubectl` nor `kustomize` is installed). Schemas: core kinds from the `kubernetes-validate`
package (strict), custom resources from k8s/schemas/ (how those were written: k8s/schemas/README.md).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from instantid_app.config import SERVE_CONFIG_PATH, load_serve_config
from k8s import render
from testkit.k8s import (
    CUSTOM_SCHEMAS,
    K8S,
    core_registry,
    kustomize,
    one,
    pod_templates,
    quantity,
    queried_metrics,
    ray_clusters,
    ray_start_resources,
    rendered,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def all_options(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The GPU overlay with every component on (the Gateway API route included), rendered from a temp folder."""
    root = tmp_path_factory.mktemp("all-options")
    rel = Path(os.path.relpath(K8S, root))
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(rel / "overlays/gpu")],
        "components": [str(rel / "components/gateway-api")],  # gcs-ft and monitoring: already in gpu
    }))
    return kustomize(root)


# --- drift: the serve config the cluster runs is serve_config.yaml's -------------------------------------------------

def test_committed_serve_configs_equal_render_output() -> None:
    stale = render.stale_files()
    assert not stale, f"stale generated files {stale}: run `python k8s/render.py` and commit the result"


def test_cpu_demo_rayservice_serves_exactly_serve_config_yaml() -> None:
    rayservice = one(rendered("cpu-demo"), "RayService")
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"]) == load_serve_config(SERVE_CONFIG_PATH)


def test_gpu_rayservice_serves_serve_config_yaml_with_the_gpu_patch() -> None:
    rayservice = one(rendered("gpu"), "RayService")
    served = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert served == render.render_serve_config("gpu")
    # ... and the patch changes only what it names: everything else is serve_config.yaml's.
    source = load_serve_config(SERVE_CONFIG_PATH)
    assert {k: v for k, v in served.items() if k != "applications"} == \
        {k: v for k, v in source.items() if k != "applications"}
    spec = render.app_config(served)
    args = spec.args
    assert (args.pipeline.device, args.pipeline.dtype) == ("cuda", "bfloat16")
    assert args.weights.preset is None and args.weights.sources is not None  # real weights, no preset
    # A Denoiser and a PromptEncoder share one GPU node: 0.75 + 0.25 of its GPU and of its `gpu_node`.
    assert spec.options("Denoiser")["ray_actor_options"]["num_gpus"] == 0.75
    assert spec.options("Denoiser")["ray_actor_options"]["resources"] == {"gpu_node": 0.75}
    assert spec.options("PromptEncoder")["ray_actor_options"]["num_gpus"] == 0.25
    assert spec.options("PromptEncoder")["ray_actor_options"]["resources"] == {"gpu_node": 0.25}
    assert spec.options("FaceAnalysis")["ray_actor_options"]["resources"] == {"cpu_node": 1}


def test_a_serve_config_edit_reaches_the_gpu_overlay(tmp_path: Path) -> None:
    edited = load_serve_config(SERVE_CONFIG_PATH)
    stages = render.app_entry(edited).setdefault("deployments", [])  # none listed: every stage on its defaults
    denoiser = next((d for d in stages if d["name"] == "Denoiser"), None) or {"name": "Denoiser"}
    if denoiser not in stages:
        stages.append(denoiser)
    denoiser.setdefault("user_config", {})["max_batch_size"] = 2
    source = tmp_path / "serve_config.yaml"
    source.write_text(yaml.safe_dump(edited))
    rendered_args = render.app_config(render.render_serve_config("gpu", source=source))
    assert rendered_args.denoiser.max_batch_size == 2
    assert rendered_args.args.pipeline.device == "cuda"  # the patch still applies on top


def test_an_overlay_without_jobs_drops_the_job_consumer_entry_by_name() -> None:
    patch = {**render.load_patch("gpu")}
    patch["args"] = {**patch["args"], "jobs": None}
    with pytest.raises(ValueError, match="JobConsumer runs the async jobs"):  # the entry would name no deployment
        render.render_serve_config("gpu", patch=patch)
    patch["deployments"] = [*patch["deployments"], {"name": "JobConsumer", "remove": True}]
    spec = render.app_config(render.render_serve_config("gpu", patch=patch))
    assert spec.args.jobs is None and spec.entry("JobConsumer") is None
    assert "JobConsumer" not in dict(spec.stages()) and spec.entry("Denoiser") is not None


def test_the_configmap_the_prefetch_reads_is_the_served_config() -> None:
    for overlay in ("cpu-demo", "gpu"):
        docs = rendered(overlay)
        (configmap,) = [d for d in docs
                        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "instantid-serve-config"]
        # (a fixed name, no hash suffix: see kustomization)
        assert configmap["data"]["serve_config.yaml"] == one(docs, "RayService")["spec"]["serveConfigV2"]


# --- shape: node groups, placement, proxies ----------------------------------------------------------------------

def test_gpu_overlay_has_head_cpu_and_gpu_groups_sized_for_sdxl() -> None:
    cluster = one(rendered("gpu"), "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    assert ray_start_resources(groups["cpu"]) == {"cpu_node": 1000}
    assert ray_start_resources(groups["gpu"]) == {"gpu_node": 1}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu_pod = groups["gpu"]["template"]["spec"]
    ray_container = gpu_pod["containers"][0]
    assert ray_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert ray_container["resources"]["requests"]["memory"] == "32Gi"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    assert gpu_pod["nodeSelector"]
    for group in groups.values():  # weights come from the shared volume the weights Job fills, never the image
        (init,) = group["template"]["spec"]["initContainers"]
        assert init["name"] == "wait-for-weights" and "/weights/.prefetched" in init["command"][-1]
    redis = cluster["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert redis == {"name": "instantid-redis", "key": "password"}


def test_the_gpu_group_can_hold_every_gpu_replica_at_its_maximum() -> None:
    rayservice = one(rendered("gpu"), "RayService")
    (gpu,) = [g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    stages = render.app_config(yaml.safe_load(rayservice["spec"]["serveConfigV2"])).stages()
    wanted = [(options["autoscaling_config"]["max_replicas"], options["ray_actor_options"].get("resources", {})
               .get("gpu_node", 0)) for _, options in stages]
    per_node = ray_start_resources(gpu)["gpu_node"]
    # Replicas are whole actors: pack the largest first, each onto a node with room (first fit).
    free: list[float] = []
    for size in sorted((share for count, share in wanted for _ in range(count) if share), reverse=True):
        fit = next((i for i, room in enumerate(free) if room >= size), None)
        if fit is None:
            free.append(per_node)
            fit = len(free) - 1
        free[fit] -= size
    assert len(free) <= gpu["maxReplicas"], f"{len(free)} GPU nodes needed, the group allows {gpu['maxReplicas']}"


def test_every_custom_resource_a_deployment_asks_for_is_offered_by_a_worker_group() -> None:
    for overlay in ("cpu-demo", "gpu"):
        rayservice = one(rendered(overlay), "RayService")
        groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        offered = [ray_start_resources(g) for g in groups]
        stages = render.app_config(yaml.safe_load(rayservice["spec"]["serveConfigV2"])).stages()
        for name, options in stages:
            wanted = options["ray_actor_options"].get("resources", {})
            assert any(all(r.get(k, 0) >= v for k, v in wanted.items()) for r in offered), (overlay, name)


def test_cpu_demo_needs_no_gpu_no_secret_and_no_extra_crd() -> None:
    docs = rendered("cpu-demo")
    assert {d["kind"] for d in docs} == {"ConfigMap", "Ingress", "RayService", "ServiceAccount", "NetworkPolicy",
                                         "Secret", "Service", "Deployment",  # + the jobs' Redis and its volume
                                         "PersistentVolumeClaim"}  # (components/jobs-redis)
    assert "nvidia.com/gpu" not in json.dumps(docs)
    assert "gcsFaultToleranceOptions" not in one(docs, "RayService")["spec"]["rayClusterConfig"]


def test_proxies_enforce_the_apps_body_limit_and_outwait_its_timeouts(all_options: list[dict[str, Any]]) -> None:
    for overlay in ("cpu-demo", "gpu"):
        docs = rendered(overlay)
        served = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
        app = render.app_config(served)
        annotations = one(docs, "Ingress")["metadata"]["annotations"]
        body_size = render.nginx_body_size(app.ingress.max_body_bytes)
        assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == body_size
        assert render.nginx_body_size(20 * 2**20) == "20m"
        timeout = render.proxy_timeout_s(served)
        assert timeout > app.ingress.stage_timeout_s  # the app's JSON 504 answers first
        for key in ("proxy-read-timeout", "proxy-send-timeout"):
            assert annotations[f"nginx.ingress.kubernetes.io/{key}"] == str(timeout)
        backend = one(docs, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend == {"name": "instantid-serve-svc", "port": {"number": 8000}}
    route = one(all_options, "HTTPRoute")
    assert not [d for d in all_options if d["kind"] == "Ingress"]  # the route replaces the Ingress
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": "instantid-serve-svc", "port": 8000}]
    assert rule["timeouts"]["request"] == f"{render.proxy_timeout_s(render.render_serve_config('gpu'))}s"


def test_monitors_scrape_ray_metrics_port_of_every_ray_pod_and_never_the_public_port() -> None:
    docs = rendered("gpu")
    (pod_monitor,) = [d for d in docs if d["kind"] == "PodMonitor" and d["metadata"]["name"] == "instantid-ray"]
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]  # the Serve port carries no Prometheus text
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    for template in templates:  # every Ray pod is selected and names its metrics port
        assert selector.items() <= template["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == 8080 and ports["serve"] == 8000


# Names the alerts may query before the app exports them (none now: the jobs' backlog gauges are exported by the
# JobConsumer). Remove a name from here once deployments.metrics.EXPORTED lists it.
PENDING_METRICS: set[str] = set()


def test_dashboard_and_alerts_cover_what_operators_need_and_ship_with_the_monitoring_component() -> None:
    from deployments.metrics import EXPORTED

    names = queried_metrics()
    assert {"ray_instantid_stage_latency_seconds", "ray_instantid_denoiser_queue_wait_seconds",
            "ray_instantid_denoiser_batch_images", "ray_instantid_images_generated_total",
            "ray_instantid_stage_requests_total", "ray_instantid_http_requests_total",
            "ray_serve_deployment_replica_healthy", "ray_instantid_gpu_memory_allocated_bytes"} <= names
    # Only names the app exports, and the job backlog gauges the jobs-metrics work adds (PENDING_METRICS).
    assert {n for n in names if n.startswith("ray_instantid_")} <= set(EXPORTED) | PENDING_METRICS
    docs = rendered("gpu")
    (dashboard,) = [d for d in docs
                    if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "instantid-grafana-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["instantid-dashboard.json"])["uid"] == "instantid-serve"
    alerts = {r["alert"] for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    assert {"InstantIDErrorRatioHigh", "InstantIDQueueWaitHigh", "InstantIDNoHealthyReplica"} <= alerts


def test_histograms_reach_the_request_timeout() -> None:
    from deployments.metrics import LATENCY_BUCKETS_S

    served = render.render_serve_config("gpu")
    assert LATENCY_BUCKETS_S[-1] >= served["http_options"]["request_timeout_s"]
    assert render.app_config(served).ingress.stage_timeout_s in LATENCY_BUCKETS_S


def test_secret_template_holds_placeholders_only() -> None:
    docs = [d for d in yaml.safe_load_all((K8S / "secrets.template.yaml").read_text()) if d]
    assert {d["metadata"]["name"] for d in docs} == {"instantid-hf", "instantid-api-keys", "instantid-jobs",
                                                     "instantid-redis", "instantid-tls"}
    for doc in docs:
        assert "data" not in doc
        for key, value in doc["stringData"].items():
            assert re.fullmatch(r"<[^<>]+>", value), f"{key} must be a <placeholder>, not a value"
    for overlay in ("gpu", "batch"):  # never applied by kustomize: it would overwrite the real secrets
        assert not [d for d in rendered(overlay) if d["kind"] == "Secret"]
    # The demo's one Secret is the in-cluster jobs Redis's address (components/jobs-redis): no credential in it.
    (demo_secret,) = [d for d in rendered("cpu-demo") if d["kind"] == "Secret"]
    assert demo_secret["metadata"]["name"] == "instantid-jobs" and set(demo_secret["data"]) == {"INSTANTID_BROKER_URL"}


# --- schema: every field exists in its API ----------------------------------------------------------------------

def test_every_manifest_names_only_fields_of_its_api(all_options: list[dict[str, Any]]) -> None:
    docs = [*rendered("cpu-demo"), *rendered("gpu"), *rendered("batch"), *all_options,
            *[d for d in yaml.safe_load_all((K8S / "secrets.template.yaml").read_text()) if d]]
    kinds = set()
    for doc in docs:
        validate(doc)
        kinds.add(doc["kind"])
    assert kinds == {"ConfigMap", "Ingress", "RayService", "PodMonitor", "PrometheusRule", "HTTPRoute", "Gateway",
                     "Secret", "ServiceAccount", "NetworkPolicy", "RayJob", "PriorityClass", "Service", "Deployment",
                     "Job", "PersistentVolumeClaim", "PodDisruptionBudget"}


@pytest.mark.parametrize("where, bad", [
    ("spec.rayClusterConfig", {"enableInTreeAutoscalling": True}),  # misspelled KubeRay field
    ("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0", {"gpus": 1}),  # not a container field
    ("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.resources", {"limit": {"cpu": "1"}}),
])
def test_schema_check_rejects_a_field_the_api_does_not_have(where: str, bad: dict[str, Any]) -> None:
    doc = json.loads(json.dumps(one(rendered("gpu"), "RayService")))
    target = doc
    for key in where.split("."):
        target = target[int(key)] if key.isdigit() else target[key]
    target.update(bad)
    with pytest.raises(AssertionError, match=next(iter(bad))):
        validate(doc)


def test_nginx_body_size_uses_the_largest_exact_unit() -> None:
    assert render.nginx_body_size(15 * 2**20) == "15m" and render.nginx_body_size(2**30) == "1g"
    assert render.nginx_body_size(1500) == f"{math.ceil(1500 / 1024)}k"


# --- the schemas are generated from the upstream CRDs, not written -----------------------------------------------

def test_every_custom_schema_is_generated_from_the_release_generate_py_names() -> None:
    from k8s.schemas import generate

    by_file = {Path(file).name: (repo, tag) for repo, tag, file, _ in generate.SOURCES}
    on_disk = {p.name for p in (K8S / "schemas").glob("*.json")}
    assert on_disk == set(CUSTOM_SCHEMAS.values())
    for name in on_disk:
        schema = json.loads((K8S / "schemas" / name).read_text())
        source = schema["x-generated-from"]
        assert by_file[Path(source["file"]).name] == (source["repository"], source["tag"]), name
        assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]) and re.fullmatch(r"[0-9a-f]{64}", source["sha256"])
    kuberay = {tag for repo, tag, *_ in generate.SOURCES if repo == "ray-project/kuberay"}
    assert len(kuberay) == 1  # one KubeRay release for RayService, RayCluster and RayJob


def test_generator_closes_objects_and_shares_repeated_subtrees() -> None:
    from k8s.schemas import generate

    pod = {"type": "object", "properties": {f"field{i}": {"type": "string", "maxLength": 10**30} for i in range(12)}}
    crd = {"spec": {"group": "example.io", "names": {"kind": "Thing"}, "versions": [{"name": "v1", "schema": {
        "openAPIV3Schema": {"type": "object", "description": "dropped", "properties": {
            "metadata": {"type": "object"},
            "spec": {"type": "object", "properties": {"a": pod, "b": pod, "open": {
                "type": "object", "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"x": {"type": "string"}}},
                "default": {"type": "object", "properties": {}}}}}}}}]}}
    source = {"repository": "r", "tag": "t", "file": "f"}
    name, schema = generate.generate(yaml.safe_dump(crd), "v1", source)
    assert name == "thing.example.io-v1.json" and "description" not in json.dumps(schema)
    spec = schema["properties"]["spec"]
    assert spec["additionalProperties"] is False and "additionalProperties" not in spec["properties"]["open"]
    assert spec["properties"]["a"] == spec["properties"]["b"] == {"$ref": f"#/$defs/{next(iter(schema['$defs']))}"}
    validator = jsonschema.Draft202012Validator(schema, registry=core_registry()[1])
    valid = {"metadata": {"name": "n"}, "spec": {"a": {"field1": "v"}, "open": {"y": 1}}}
    assert not list(validator.iter_errors(valid))
    assert list(validator.iter_errors({"metadata": {"name": "n"}, "spec": {"b": {"feild1": "v"}}}))


# --- operating it: upgrades, shutdown, auth, network, identity, TLS, disk, weights, scaling, batch -------------

def test_an_upgrade_keeps_the_old_cluster_until_its_longest_request_is_answered() -> None:
    for overlay in ("cpu-demo", "gpu"):
        spec = one(rendered(overlay), "RayService")["spec"]
        assert spec["upgradeStrategy"] == {"type": "NewCluster"}
        served = yaml.safe_load(spec["serveConfigV2"])
        assert spec["rayClusterDeletionDelaySeconds"] >= served["http_options"]["request_timeout_s"]


def test_worker_pods_outlast_the_graceful_shutdown_of_every_stage_they_can_hold() -> None:
    for overlay in ("cpu-demo", "gpu"):
        rayservice = one(rendered(overlay), "RayService")
        stages = render.app_config(yaml.safe_load(rayservice["spec"]["serveConfigV2"])).stages()
        for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
            offered = ray_start_resources(group)
            # Serve's default graceful_shutdown_wait_loop_s is 2 s; the wait loop runs before the timeout starts.
            needed = [options.get("graceful_shutdown_wait_loop_s", 2) + options.get("graceful_shutdown_timeout_s", 20)
                      for _, options in stages
                      if all(offered.get(k, 0) >= v
                             for k, v in options["ray_actor_options"].get("resources", {}).items())]
            grace = group["template"]["spec"]["terminationGracePeriodSeconds"]
            assert needed and grace >= max(needed), (overlay, group["groupName"], grace, needed)


def test_every_ray_cluster_requires_ray_token_auth() -> None:
    for overlay in ("cpu-demo", "gpu", "batch"):
        for cluster in ray_clusters(rendered(overlay)):
            assert cluster["authOptions"] == {"mode": "token"}, overlay
            # KubeRay refuses token mode below Ray 2.52.0 (its validation.go) and needs rayVersion to tell.
            assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52, 0)


def test_network_policies_open_ray_ports_to_own_pods_and_serve_only_to_the_ingress(
        all_options: list[dict[str, Any]]) -> None:
    for docs, serve_from in ((rendered("gpu"), "ingress-nginx"), (all_options, "envoy-gateway-system")):
        policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
        (rayservice,) = [d for d in docs if d["kind"] == "RayService"]
        for template in pod_templates(rayservice["spec"]["rayClusterConfig"]):
            labels = template["metadata"]["labels"]
            selecting = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
            assert selecting, labels  # selected: everything not allowed below is refused
            ports = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
            for policy in selecting:
                assert policy["spec"]["policyTypes"] == ["Ingress"]
                for rule in policy["spec"]["ingress"]:
                    (peer,) = rule["from"]
                    if "namespaceSelector" not in peer:  # own namespace: only the cluster's own pods, any port
                        assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "instantid"}
                        continue
                    opened = {p["port"] for p in rule["ports"]}
                    namespace = peer["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name")
                    assert opened in ({"serve"}, {"metrics"}, {"dashboard"}, {"as-metrics", "dash-metrics"}), opened
                    assert opened <= ports | {"dashboard"}
                    if opened == {"serve"}:
                        assert namespace == serve_from
                    elif "metrics" in opened or opened == {"as-metrics", "dash-metrics"}:
                        assert namespace == "monitoring"
                    else:
                        assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    batch_policies = [d for d in rendered("batch") if d["kind"] == "NetworkPolicy"]
    for template in pod_templates(ray_clusters(rendered("batch"))[0]):
        labels = template["metadata"]["labels"]
        assert [p for p in batch_policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]


def test_cloud_credentials_come_from_the_service_account_never_from_keys_in_containers() -> None:
    for overlay in ("cpu-demo", "gpu", "batch"):
        docs = rendered(overlay)
        accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
        for cluster in ray_clusters(docs):
            for template in pod_templates(cluster):
                spec = template["spec"]
                assert spec["serviceAccountName"] == "instantid"
                for container in spec["containers"] + spec.get("initContainers", []):
                    names = {e["name"] for e in container.get("env", [])}
                    assert "envFrom" not in container, container["name"]
                    assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                        "GOOGLE_APPLICATION_CREDENTIALS"}, container["name"]
                for container in spec["containers"]:  # the hub token only where weights are downloaded
                    assert "HF_TOKEN" not in {e["name"] for e in container.get("env", [])}
                ray = spec["containers"][0]  # the Ray container (the others: the log sidecar)
                assert {"name": "HF_HUB_OFFLINE", "value": "1"} in ray["env"] or overlay == "cpu-demo" \
                    or ray["name"] == "ray-head"
        if overlay != "batch":  # the batch runs as the online service's account, which the overlays create
            assert "instantid" in accounts
    annotations = one(rendered("gpu"), "ServiceAccount")["metadata"]["annotations"]
    assert set(annotations) == {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"}


def test_tls_on_the_ingress_and_on_the_gateway(all_options: list[dict[str, Any]]) -> None:
    ingress = one(rendered("gpu"), "Ingress")
    (tls,) = ingress["spec"]["tls"]
    assert tls["hosts"] == [rule["host"] for rule in ingress["spec"]["rules"]] and tls["secretName"] == "instantid-tls"
    gateway, route = one(all_options, "Gateway"), one(all_options, "HTTPRoute")
    (listener,) = gateway["spec"]["listeners"]
    assert (listener["protocol"], listener["port"], listener["tls"]["mode"]) == ("HTTPS", 443, "Terminate")
    assert listener["tls"]["certificateRefs"] == [{"kind": "Secret", "name": tls["secretName"]}]
    assert route["spec"]["hostnames"] == [listener["hostname"]] == tls["hosts"]
    assert route["spec"]["parentRefs"] == [{"name": gateway["metadata"]["name"], "sectionName": listener["name"]}]


def test_ephemeral_storage_requests_cover_the_weights_cache() -> None:
    for overlay in ("cpu-demo", "gpu", "batch"):
        for cluster in ray_clusters(rendered(overlay)):
            for template in pod_templates(cluster):
                spec = template["spec"]
                on_disk = sum(quantity(v["emptyDir"].get("sizeLimit", 0)) for v in spec.get("volumes", [])
                              if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
                requested = sum(quantity(c["resources"]["requests"].get("ephemeral-storage", 0))
                                for c in spec["containers"])
                assert requested > on_disk, (overlay, template["metadata"]["labels"], requested, on_disk)


def test_gpu_overlay_pins_the_hub_revisions_it_can() -> None:
    sources = render.app_config(render.render_serve_config("gpu")).args.weights.sources
    for part in ("sdxl", "identitynet", "adapter"):
        assert re.fullmatch(r"[^@]+@[0-9a-f]{40}", getattr(sources, part)), part
    # face_pack stays unpinned: no commit of DIAMONIKAKA/antelopev2 could be verified (serve-patch.yaml says so).


def test_gpu_stages_scale_down_slower_than_a_gpu_pod_starts() -> None:
    rayservice = one(rendered("gpu"), "RayService")
    stages = render.app_config(yaml.safe_load(rayservice["spec"]["serveConfigV2"])).stages()
    for name, options in stages:
        if options["ray_actor_options"].get("num_gpus"):
            assert options["autoscaling_config"]["downscale_delay_s"] >= 600, name
            assert options["autoscaling_config"]["upscale_delay_s"] >= 10, name  # not on a single burst
    assert rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]["idleTimeoutSeconds"] >= 600


def test_a_denoiser_and_a_prompt_encoder_share_one_gpu_node() -> None:
    rayservice = one(rendered("gpu"), "RayService")
    (gpu,) = [g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    spec = render.app_config(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    pair = [spec.options("Denoiser")["ray_actor_options"], spec.options("PromptEncoder")["ray_actor_options"]]
    gpus_per_pod = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert sum(o["num_gpus"] for o in pair) <= gpus_per_pod
    assert sum(o["resources"]["gpu_node"] for o in pair) <= ray_start_resources(gpu)["gpu_node"]


def test_batch_rayjob_runs_instantid_batch_on_its_own_cluster_and_cleans_up() -> None:
    import shlex
    from importlib.metadata import entry_points

    docs = rendered("batch")
    job = one(docs, "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert 0 < job["ttlSecondsAfterFinished"] <= 3600 and job["activeDeadlineSeconds"] > 0
    # SidecarMode, as KubeRay validates it: no submitter pod template or config, head restartPolicy unset/Never.
    assert job["submissionMode"] == "SidecarMode" and "submitterPodTemplate" not in job
    assert job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].get("restartPolicy", "Never") == "Never"
    # The entrypoint is a valid `instantid batch` command line (the installed console script's own parser).
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["instantid", "batch"]
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "instantid"]
    parsed = import_module_attr(script.value.split(":")[0], "build_parser")().parse_args(argv[1:])
    # The files it names are the ConfigMap's, mounted where it reads them; the config is the GPU overlay's.
    configmap = one(docs, "ConfigMap")
    mounts = {m["mountPath"]: m for c in [job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]]
              for m in c["volumeMounts"]}
    assert str(parsed.config).startswith("/etc/instantid/") and "/etc/instantid" in mounts
    assert yaml.safe_load(configmap["data"][Path(parsed.config).name]) == render.render_serve_config("gpu")
    from batch.pairs import load_prompts

    prompts = Path(render.K8S_DIR / "batch" / Path(parsed.prompts).name)
    assert configmap["data"][prompts.name] == prompts.read_text() and load_prompts(prompts)
    # Its own GPU group, the online service's image, and a priority below the online pods'.
    groups = {g["groupName"]: g for g in job["rayClusterSpec"]["workerGroupSpecs"]}
    assert ray_start_resources(groups["batch-gpu"]) == {"gpu_node": 1}
    assert groups["batch-gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    online_image = one(rendered("gpu"), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"][
        "spec"]["containers"][0]["image"]
    priority = one(docs, "PriorityClass")
    assert priority["value"] < 0 and priority["preemptionPolicy"] == "Never"
    for template in pod_templates(job["rayClusterSpec"]):
        assert template["spec"]["priorityClassName"] == priority["metadata"]["name"]
        assert {c["image"] for c in template["spec"]["containers"]} == {online_image}
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "instantid-batch"  # not the online pods'


def import_module_attr(module: str, attr: str) -> Any:
    import importlib

    return getattr(importlib.import_module(module), attr)
