"""Day one on Kubernetes, read off the rendered overlays as KubeRay and Ray will act on them: the autoscaler can reach
the API server, every Ray group has the environment any stage may need, the GPU overlay survives losing a pod, pods
drain through Ray before stopping, the weights come from one shared read-only volume, and every Ray container runs
under the Pod Security "restricted" profile.

Rendering as in tests/test_k8s.py (`kubectl kustomize`; a missing kubectl fails, it is not skipped).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from instantid_core.config import ModelSources
from k8s import render
from testkit.k8s import K8S, kustomize, one, pod_templates, ray_clusters, ray_start_resources, rendered

OVERLAYS = ("cpu-demo", "gpu")


@pytest.fixture(scope="module")
def incremental(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The GPU overlay with components/incremental-upgrade, rendered from a temp folder."""
    root = tmp_path_factory.mktemp("incremental")
    rel = Path(os.path.relpath(K8S, root))
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(rel / "overlays/gpu")], "components": [str(rel / "components/incremental-upgrade")]}))
    return kustomize(root)


def every_rendering(incremental: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {"cpu-demo": list(rendered("cpu-demo")), "gpu": list(rendered("gpu")), "gpu+incremental": incremental}


def served(docs: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> render.AppSpec:
    return render.app_config(yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"]))


def worker_groups(docs: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


# --- autoscaling ----------------------------------------------------------------------------------------------------

def test_with_in_tree_autoscaling_the_heads_service_account_mounts_a_token_and_workers_none(
        incremental: list[dict[str, Any]]) -> None:
    for name, docs in every_rendering(incremental).items():
        accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
        cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
        assert cluster["enableInTreeAutoscaling"] is True, name

        def mounts_token(template: dict[str, Any], accounts: dict[str, dict[str, Any]] = accounts) -> bool:
            # Kubernetes: the pod's own field wins over its ServiceAccount's, which defaults to true.
            spec = template["spec"]
            account = accounts[spec["serviceAccountName"]]
            return spec.get("automountServiceAccountToken", account.get("automountServiceAccountToken", True))

        # KubeRay binds the autoscaler's Role to the head's ServiceAccount (its rbac.go), and the sidecar reads the
        # in-cluster token from that pod: without the mount it cannot list or patch pods.
        assert mounts_token(cluster["headGroupSpec"]["template"]), name
        for group in cluster["workerGroupSpecs"]:
            assert not mounts_token(group["template"]), (name, group["groupName"])


def test_autoscaler_v2_with_an_idle_timeout_per_group_as_kuberay_validates_it(
        incremental: list[dict[str, Any]]) -> None:
    for name, docs in every_rendering(incremental).items():
        cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
        assert cluster["autoscalerOptions"]["version"] == "v2", name
        head = cluster["headGroupSpec"]["template"]["spec"]
        # KubeRay refuses the version field beside the env var, and a head or worker restartPolicy but Never.
        assert "RAY_enable_autoscaler_v2" not in {e["name"] for e in head["containers"][0].get("env", [])}
        for template in pod_templates(cluster):
            assert template["spec"].get("restartPolicy", "Never") == "Never", name
        for group in cluster["workerGroupSpecs"]:
            assert group["idleTimeoutSeconds"] > 0, (name, group["groupName"])
    gpu = worker_groups(rendered("gpu"))["gpu"]
    assert gpu["idleTimeoutSeconds"] >= 600  # a GPU pod costs minutes to bring back


# --- one environment ------------------------------------------------------------------------------------------------

# What a stage placed in any group may read: the jobs' broker and webhook key (Ingress, Denoiser, JobConsumer open
# the job store), the API keys and the links' signing key (Ingress), the hub cache settings (every replica resolving
# weights), boto3's storage settings (outputs, s3:// inputs and weights).
NEEDED_ENV = {"HF_HOME", "HF_HUB_OFFLINE", "INSTANTID_API_KEYS", "INSTANTID_BROKER_URL", "INSTANTID_WEBHOOK_SECRET",
              "INSTANTID_LINK_SECRET", "AWS_REGION", "AWS_ENDPOINT_URL_S3"}
NEEDED_MOUNTS = {"/weights", "/etc/instantid", "/etc/instantid-keys"}


def test_every_ray_group_has_every_variable_and_mount_any_stage_placed_there_may_read(
        incremental: list[dict[str, Any]]) -> None:
    for name, docs in every_rendering(incremental).items():
        cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
        head_env = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        assert {e["name"] for e in head_env} >= NEEDED_ENV, name
        broker = next(e for e in head_env if e["name"] == "INSTANTID_BROKER_URL")
        assert broker["valueFrom"]["secretKeyRef"]["name"] == "instantid-jobs"
        for template in pod_templates(cluster):
            spec = template["spec"]
            ray = spec["containers"][0]
            where = (name, template["metadata"]["labels"]["app.kubernetes.io/component"])
            assert ray["env"] == head_env, where  # the same list from the same Secrets, not a look-alike
            mounts = {m["mountPath"]: m for m in ray["volumeMounts"]}
            assert set(mounts) >= NEEDED_MOUNTS, where
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert all(m["name"] in volumes for m in mounts.values()), where
            keys = volumes[mounts["/etc/instantid-keys"]["name"]]
            # No subPath: the kubelet then swaps the file in place when the Secret changes (live key rotation).
            assert keys["secret"]["secretName"] == "instantid-api-keys"
            assert "subPath" not in mounts["/etc/instantid-keys"]
            assert volumes[mounts["/etc/instantid"]["name"]]["configMap"]["name"] == "instantid-serve-config"


def test_every_stage_can_land_in_a_group_that_has_that_environment() -> None:
    """A guard for the test above: the GPU group (where the Denoiser opens the job store) is one of those checked."""
    groups = worker_groups(rendered("gpu"))
    spec = served(rendered("gpu"))
    placed = {stage: [g for g, group in groups.items()
                      if all(ray_start_resources(group).get(k, 0) >= v
                             for k, v in options["ray_actor_options"].get("resources", {}).items())]
              for stage, options in spec.stages()}
    assert placed["Denoiser"] == ["gpu"] and placed["JobConsumer"] == ["cpu"]


def test_the_production_overlay_requires_api_keys_from_the_mounted_secret() -> None:
    docs = rendered("gpu")
    access = served(docs).ingress.access
    assert access.enabled and access.api_keys_file is not None
    assert Path(access.api_keys_file).parent == Path("/etc/instantid-keys")
    for template in pod_templates(one(docs, "RayService")["spec"]["rayClusterConfig"]):
        (keys,) = [v for v in template["spec"]["volumes"] if v["name"] == "api-keys"]
        assert keys["secret"].get("optional", False) is False  # a pod without the Secret does not start
    assert not served(rendered("cpu-demo")).ingress.access.enabled  # the demo runs without keys


# --- no single point of failure ---------------------------------------------------------------------------------------

CPU_STAGES = ("Ingress", "FaceAnalysis", "OutputWriter", "JobConsumer")


def test_gpu_overlay_cpu_stages_keep_a_replica_when_one_cpu_pod_goes() -> None:
    docs = rendered("gpu")
    cpu = worker_groups(docs)["cpu"]
    assert cpu["minReplicas"] >= 2 and cpu["replicas"] >= cpu["minReplicas"]
    spec = served(docs)
    for stage in CPU_STAGES:
        options = spec.options(stage)
        autoscaling, per_node = options["autoscaling_config"], options.get("max_replicas_per_node")
        assert "cpu_node" in options["ray_actor_options"]["resources"], stage  # placed on the CPU group
        assert autoscaling["min_replicas"] >= 2 and per_node, stage
        # At most `per_node` on one pod: more than that at the minimum means two pods at least.
        assert autoscaling["min_replicas"] > per_node, stage
        # ... and the group can hold the maximum under that limit.
        assert autoscaling["max_replicas"] <= per_node * cpu["maxReplicas"], stage


def test_pod_disruption_budgets_cover_the_cpu_and_gpu_groups_one_pod_at_a_time() -> None:
    docs = rendered("gpu")
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for group in worker_groups(docs).values():
        labels = group["template"]["metadata"]["labels"]
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, group["groupName"]
        assert covering[0]["spec"] == {**covering[0]["spec"], "maxUnavailable": 1}
        assert "minAvailable" not in covering[0]["spec"]  # a budget that never allows an eviction blocks drains


PRESTOP_DRAIN = re.compile(r"ray drain-node .*--deadline-remaining-seconds (\d+)")


def test_an_evicted_pod_drains_through_ray_and_outlasts_every_replicas_graceful_shutdown() -> None:
    for overlay in OVERLAYS:
        docs = rendered(overlay)
        stages = served(docs).stages()
        for group in worker_groups(docs).values():
            spec = group["template"]["spec"]
            (script,) = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][2:]
            match = PRESTOP_DRAIN.search(script)
            assert match, (overlay, group["groupName"], script)  # drain first: `ray stop` alone kills replicas
            deadline = int(match.group(1))
            assert script.index("ray drain-node") < script.rindex("ray stop")
            offered = ray_start_resources(group)
            needed = [o.get("graceful_shutdown_wait_loop_s", 2) + o.get("graceful_shutdown_timeout_s", 20)
                      for _, o in stages
                      if all(offered.get(k, 0) >= v for k, v in o["ray_actor_options"].get("resources", {}).items())]
            assert deadline >= max(needed), (overlay, group["groupName"])
            # The wait loop is bounded by the deadline, and `ray stop` has 10 s before the kubelet's SIGKILL.
            assert f"seq {deadline})" in script
            assert spec["terminationGracePeriodSeconds"] >= deadline + 10, (overlay, group["groupName"])


def test_the_incremental_upgrade_component_passes_kuberays_validation(incremental: list[dict[str, Any]]) -> None:
    spec = one(incremental, "RayService")["spec"]
    strategy = spec["upgradeStrategy"]
    options = strategy["clusterUpgradeOptions"]
    # KubeRay v1.7's ValidateClusterUpgradeOptions, rule by rule.
    assert strategy["type"] == "NewClusterWithIncrementalUpgrade"
    assert spec["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert 0 <= options["stepSizePercent"] <= options.get("maxSurgePercent", 100) <= 100
    assert options["intervalSeconds"] > 0 and options["gatewayClassName"]
    # Traffic enters through KubeRay's Gateway: nothing may route around the split.
    assert not [d for d in incremental if d["kind"] in ("Ingress", "HTTPRoute")]
    (policy,) = [d for d in incremental if d["metadata"]["name"] == "instantid-serve-from-ingress"]
    (peer,) = policy["spec"]["ingress"][0]["from"]
    assert peer["podSelector"]["matchLabels"] == {"gateway.envoyproxy.io/owning-gateway-name": "instantid-gateway"}
    # The default overlays keep NewCluster (tests/test_k8s.py checks its deletion delay).
    assert one(rendered("gpu"), "RayService")["spec"]["upgradeStrategy"] == {"type": "NewCluster"}


# --- weights once per cluster -----------------------------------------------------------------------------------------

def test_gpu_weights_are_filled_once_by_a_job_and_mounted_read_only_by_every_ray_pod() -> None:
    docs = rendered("gpu")
    claim = one(docs, "PersistentVolumeClaim")
    assert "ReadOnlyMany" in claim["spec"]["accessModes"]
    job = one(docs, "Job")["spec"]["template"]["spec"]
    (download,) = job["containers"]
    # The Job resolves what the replicas resolve: the served config, from the same ConfigMap.
    command = download["command"][-1]
    assert "python -m cluster.prefetch /etc/instantid/serve_config.yaml && touch /weights/.prefetched" == command
    job_mounts = {m["mountPath"]: m for m in download["volumeMounts"]}
    job_volumes = {v["name"]: v for v in job["volumes"]}
    claim_name = claim["metadata"]["name"]
    assert job_volumes[job_mounts["/weights"]["name"]]["persistentVolumeClaim"]["claimName"] == claim_name
    assert not job_mounts["/weights"].get("readOnly")
    assert job_volumes[job_mounts["/etc/instantid"]["name"]]["configMap"]["name"] == "instantid-serve-config"
    assert "HF_TOKEN" in {e["name"] for e in download["env"]}  # the only container with the hub token
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    for template in pod_templates(cluster):
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        on_disk = {v["name"] for v in spec["volumes"] if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"}
        assert on_disk <= {"ray-logs"}  # no per-pod weights cache left
        for container in spec["containers"][:1] + spec.get("initContainers", []):
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/weights"]
            assert mount["readOnly"] is True, container["name"]
            assert volumes[mount["name"]]["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"],
                                                                       "readOnly": True}
        for init in spec.get("initContainers", []):  # waiting for the Job, not downloading
            assert "/weights/.prefetched" in init["command"][-1] and "prefetch " not in init["command"][-1]
    # Replicas look where the Job wrote: the hub cache and the S3 cache are both on the volume.
    env = {e["name"]: e.get("value") for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_HOME"].startswith("/weights/") and env["HF_HUB_OFFLINE"] == "1"
    sources: ModelSources = served(docs).args.weights.sources
    assert sources.cache_dir.startswith("/weights/")


# --- restricted pods --------------------------------------------------------------------------------------------------

def test_every_ray_container_runs_non_root_without_capabilities_under_runtime_default_seccomp(
        incremental: list[dict[str, Any]]) -> None:
    for name, docs in {**every_rendering(incremental), "batch": list(rendered("batch"))}.items():
        for cluster in ray_clusters(docs):
            if cluster.get("enableInTreeAutoscaling"):  # the autoscaler sidecar (the batch's RayJob has none)
                assert cluster["autoscalerOptions"]["securityContext"] == {"allowPrivilegeEscalation": False,
                                                                           "capabilities": {"drop": ["ALL"]}}
            for template in pod_templates(cluster):
                pod = template["spec"]["securityContext"]
                assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, name
                assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
                for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
                    context = container["securityContext"]
                    assert context["allowPrivilegeEscalation"] is False, (name, container["name"])
                    assert context["capabilities"]["drop"] == ["ALL"], (name, container["name"])
        job = one(docs, "Job")["spec"]["template"]["spec"] if name.startswith("gpu") else None
        if job:
            assert job["securityContext"]["runAsNonRoot"] is True
            assert job["containers"][0]["securityContext"]["capabilities"]["drop"] == ["ALL"]


# --- logs and traces out of the pod -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Both overlays with components/tracing, rendered from temp folders."""
    out = {}
    for overlay in OVERLAYS:
        root = tmp_path_factory.mktemp(f"traced-{overlay}")
        rel = Path(os.path.relpath(K8S, root))
        (root / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [str(rel / "overlays" / overlay)], "components": [str(rel / "components/tracing")]}))
        out[overlay] = kustomize(root)
    return out


def test_every_ray_pod_ships_rays_and_serves_log_files_to_stdout_as_json(incremental: list[dict[str, Any]]) -> None:
    for docs in every_rendering(incremental).values():
        (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "instantid-fluent-bit"]
        conf = config["data"]["fluent-bit.conf"]
        assert re.search(r"Path\s+/tmp/ray/session_latest/logs/serve/\*\.log", conf)  # Serve's JSON logs
        assert re.search(r"Parser\s+json", conf) and re.search(r"Format\s+json_lines", conf)
        assert re.search(r"\[OUTPUT\]\s+Name\s+stdout", conf)
        for template in pod_templates(one(docs, "RayService")["spec"]["rayClusterConfig"]):
            spec = template["spec"]
            ray, *others = spec["containers"]
            (logs,) = [c for c in others if c["name"] == "logs"]
            ray_logs = {m["name"] for m in ray["volumeMounts"] if m["mountPath"] == "/tmp/ray"}
            assert ray_logs and ray_logs == {m["name"] for m in logs["volumeMounts"] if m["mountPath"] == "/tmp/ray"}
            volumes = {v["name"]: v for v in spec["volumes"]}
            (conf_mount,) = [m for m in logs["volumeMounts"] if m["mountPath"] != "/tmp/ray"]
            assert volumes[conf_mount["name"]]["configMap"]["name"] == "instantid-fluent-bit"
            assert f"--config={conf_mount['mountPath']}/fluent-bit.conf" in logs["args"]
    # Serve writes those logs as JSON (with request ids) because the served config says so.
    assert yaml.safe_load(one(rendered("gpu"), "RayService")["spec"]["serveConfigV2"])["logging_config"][
        "encoding"] == "JSON"


def test_the_tracing_component_turns_serve_tracing_on_in_every_ray_container(
        traced: dict[str, list[dict[str, Any]]]) -> None:
    from ray.serve.schema import TracingConfig

    for overlay, docs in traced.items():
        cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
        for template in pod_templates(cluster):
            env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
            path = env["RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH"]
            module, _, attr = path.partition(":")
            assert callable(getattr(__import__(module, fromlist=[attr]), attr)), path  # importable in Ray's version
            config = TracingConfig(exporter_import_path=path,
                                   sampling_ratio=float(env["RAY_SERVE_TRACING_SAMPLING_RATIO"]))
            assert 0 < config.sampling_ratio <= 1, overlay
    for overlay in OVERLAYS:  # off unless the component is named
        env = one(rendered(overlay), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
            "containers"][0]["env"]
        assert not [e for e in env if e["name"].startswith("RAY_SERVE_TRACING")]


# --- what Prometheus and Grafana get ----------------------------------------------------------------------------------

def test_the_heads_autoscaler_and_dashboard_metrics_are_scraped_and_rays_serve_dashboards_ship() -> None:
    docs = rendered("gpu")
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert ports["as-metrics"] == 44217 and ports["dash-metrics"] == 44227  # Ray's defaults
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitor" and d["metadata"]["name"] == "instantid-ray-head"]
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"as-metrics", "dash-metrics"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= head["metadata"]["labels"].items()
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    for worker in cluster["workerGroupSpecs"]:  # only the head: workers have no such ports
        assert not selector <= worker["template"]["metadata"]["labels"].items()
    dashboards = {d["metadata"]["name"]: d for d in docs
                  if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"}
    for name in render.RAY_DASHBOARDS:
        (configmap,) = [c for c in dashboards.values() if name in c["data"]]
        # exactly what the image's Ray generates, and filtered by the label the PodMonitors add
        assert configmap["data"][name] == render.ray_dashboard_text(name)
        assert "ray_io_cluster" in configmap["data"][name]
    relabel = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]
    assert relabel["targetLabel"] == "ray_io_cluster"
