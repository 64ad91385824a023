"""cluster/: the AWS launcher config passes Ray's own validation and offers exactly the resources the GPU serve
config asks for; the local multi-node cluster starts with its node types' resources, places work by them, honours
one auth mode across processes, and stops every process it started."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

from cluster.prefetch import main as prefetch_main
from instantid_core.config import ModelSources
from k8s import render
from testkit.cluster import NODE_TYPE_RESOURCES, NodeSpec, start_local_cluster

REPO = Path(__file__).resolve().parents[2]
AWS = REPO / "cluster" / "aws.yaml"
# launcher node type -> the node type of testkit.cluster and the KubeRay worker groups
NODE_TYPES = {"ray.head.default": "head", "ray.worker.cpu": "cpu", "ray.worker.gpu": "gpu"}
GPU_INSTANCE_FAMILIES = ("g5.", "g6.", "g6e.", "p4d.", "p5.")


def launcher_config() -> dict[str, Any]:
    return yaml.safe_load(AWS.read_text())


def custom(resources: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}


def test_launcher_config_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher_config())))  # Ray's ray-schema.json + its cross-checks


def test_launcher_node_types_offer_the_resources_the_gpu_serve_config_asks_for() -> None:
    config = launcher_config()
    types = config["available_node_types"]
    assert set(types) == set(NODE_TYPES)
    assert config["head_node_type"] == "ray.head.default"
    for name, node_type in NODE_TYPES.items():
        assert custom(types[name]["resources"]) == NODE_TYPE_RESOURCES[node_type], name
    assert types["ray.head.default"]["resources"]["CPU"] == 0  # no replica on the head
    assert types["ray.worker.gpu"]["node_config"]["InstanceType"].startswith(GPU_INSTANCE_FAMILIES)
    assert not types["ray.worker.cpu"]["node_config"]["InstanceType"].startswith(GPU_INSTANCE_FAMILIES)
    for name in ("ray.worker.cpu", "ray.worker.gpu"):
        assert 1 <= types[name]["min_workers"] <= types[name]["max_workers"] <= config["max_workers"]

    spec = render.app_config(render.render_serve_config("gpu"))
    for stage, options in spec.stages():
        wanted = options["ray_actor_options"].get("resources", {})
        offering = [n for n, t in types.items()
                    if all(custom(t["resources"]).get(k, 0) >= v for k, v in wanted.items())]
        assert offering, f"no node type offers {stage}'s {wanted}"
        if options["ray_actor_options"].get("num_gpus"):
            assert offering == ["ray.worker.gpu"], f"{stage} asks for a GPU but could land on {offering}"
    assert spec.options("Denoiser")["ray_actor_options"]["resources"] == {"gpu_node": 0.75}  # + a Prompt's 0.25


def test_launcher_runs_our_image_with_a_weights_cache_and_prefetches_the_served_config() -> None:
    config = launcher_config()
    run_options = " ".join(config["docker"]["run_options"])
    assert config["docker"]["image"].endswith("instantid-serve:0.1.0")
    assert "-v /mnt/instantid-weights:/weights" in run_options and "HF_HOME=/weights/hf" in run_options
    (prefetch,) = [c for c in config["worker_setup_commands"] if "cluster.prefetch" in c]
    mounted = prefetch.split()[-1]
    remote_dir, local_dir = next((r, loc) for r, loc in config["file_mounts"].items() if mounted.startswith(r))
    assert (REPO / local_dir / Path(mounted).relative_to(remote_dir)).exists()
    served = render.app_config(yaml.safe_load((REPO / local_dir / "serve_config.yaml").read_text()))
    assert served.args.weights.sources.cache_dir.startswith("/weights/")


def test_kuberay_groups_advertise_the_same_node_type_resources() -> None:
    rayservice = yaml.safe_load(render.K8S_DIR.joinpath("base/rayservice.yaml").read_text())
    (cpu,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert json.loads(json.loads(cpu["rayStartParams"]["resources"])) == NODE_TYPE_RESOURCES["cpu"]
    patch = yaml.safe_load(render.K8S_DIR.joinpath("overlays/gpu/gpu-workers.yaml").read_text())
    (gpu,) = [op["value"] for op in patch if op["path"].endswith("/workerGroupSpecs/-")]
    assert json.loads(json.loads(gpu["rayStartParams"]["resources"])) == NODE_TYPE_RESOURCES["gpu"]


def test_prefetch_resolves_and_validates_the_weights_a_serve_config_names(tiny_root: Path, tmp_path: Path,
                                                                        capsys) -> None:
    config = yaml.safe_load(render.SERVE_CONFIG_PATH.read_text())
    args = render.app_entry(config)["args"]
    sources = ModelSources.from_root(str(tiny_root)).model_dump(mode="json")  # the YAML an operator writes
    args["weights"] = {"sources": sources}
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert prefetch_main([str(path)]) == 0
    assert f"sdxl={tiny_root}/sdxl" in capsys.readouterr().out

    args["weights"]["sources"] = ModelSources.from_root(str(tmp_path / "missing")).model_dump(mode="json")
    path.write_text(yaml.safe_dump(config))
    assert prefetch_main([str(path)]) == 2  # a clear one-line failure, not a traceback
    assert "prefetch failed" in capsys.readouterr().err


DRIVER = textwrap.dedent("""
    import json, sys, ray
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]

    @ray.remote(num_cpus=0, resources={"gpu_node": 1})
    def on_gpu_node():
        return ray.get_runtime_context().get_node_id()

    print(json.dumps({"nodes": {n["NodeID"]: n["Resources"] for n in nodes},
                      "gpu_task_node": ray.get(on_gpu_node.remote(), timeout=60)}))
""")


def our_processes(marker: str) -> set[int]:
    """Live processes whose command line names `marker` (the cluster's private temp dir)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.add(int(entry.name))
            except OSError:
                pass
    return found


def test_local_cluster_starts_two_nodes_places_by_resource_and_stops_every_process() -> None:
    cluster = start_local_cluster([NodeSpec("head", num_cpus=0), NodeSpec("gpu", num_cpus=1)], auth="token")
    try:
        assert cluster.env["RAY_AUTH_MODE"] == "token"
        # A separate driver process with the cluster's env: auth agrees across processes.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | cluster.env
        out = subprocess.run([sys.executable, "-c", DRIVER, cluster.address], env=env, check=False, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert len(seen["nodes"]) == 2
        gpu_nodes = [node for node, res in seen["nodes"].items() if res.get("gpu_node") == 1]
        assert len(gpu_nodes) == 1 and seen["gpu_task_node"] == gpu_nodes[0]
        (head,) = [res for node, res in seen["nodes"].items() if node not in gpu_nodes]
        assert head.get("CPU", 0) == 0 and "gpu_node" not in head and "cpu_node" not in head
        started = our_processes(str(cluster.root))
        assert set(cluster.pids) <= started and len(started) > len(cluster.pids)  # raylets, GCS, workers...
    finally:
        root = str(cluster.root)
        cluster.stop()
    assert not our_processes(root), "processes of the stopped cluster are still running"
    assert not Path(root).exists()


def test_cpu_only_keeps_the_gpu_placement_but_runs_the_tiny_preset_without_gpus() -> None:
    gpu = render.render_serve_config("gpu")
    local = render.cpu_only(gpu)
    stages, gpu_stages = render.app_config(local).stages(), render.app_config(gpu).stages()
    for (name, options), (_, gpu_options) in zip(stages, gpu_stages, strict=True):
        assert "num_gpus" not in options["ray_actor_options"], name
        assert options["ray_actor_options"].get("resources") == gpu_options["ray_actor_options"].get("resources"), name
        assert options["autoscaling_config"] == gpu_options["autoscaling_config"], name
    source = render.app_config(yaml.safe_load(render.SERVE_CONFIG_PATH.read_text())).args
    args = render.app_config(local).args
    assert (args.weights, args.pipeline, args.output_uri) == (source.weights, source.pipeline, source.output_uri)
