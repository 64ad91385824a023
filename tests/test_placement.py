"""Placement on a local multi-node cluster: the GPU overlay's serve config puts the Denoiser only on "GPU" nodes
and the CPU stages only on CPU nodes, a burst of requests scales the Denoiser, not the other stages, and when the
GPU node running the Denoiser is lost, its replicas are rescheduled on the other one and the app serves again.

The cluster is cluster/local.py's (one `ray start` process per node, custom resources standing in for node types;
the "gpu" node advertises `gpu_node` and no GPU, so the tiny preset runs on CPU). The Serve app is driven from a
separate process (tests/apps/placement_driver.py), since this session may hold its own in-process Ray instance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local import NodeSpec, start_local_cluster
from k8s import render
from tests.fixtures_serve import free_port

REPO = Path(__file__).resolve().parents[1]
# A run takes ~2 min; the driver's own waits (ready 90, scale 60, start 90, node loss 120) fit in this.
DRIVER_TIMEOUT_S = 420
# One CPU node and two "GPU" nodes, each standing in for a 4-GPU machine (gpu_node = GPUs on the node, as on a
# g6.12xlarge): either has room for two Denoisers (gpu_node 1 each) and the PromptEncoder's GPU share (0.25), so
# losing one leaves room for everything. The CPU node has logical CPUs to spare for a Denoiser too, so only the
# custom resource keeps Denoisers off it. `loss_*` markers tell the driver which `ray start` process is which node.
GPU_MARKERS = ("loss_gpu_a", "loss_gpu_b")
NODES = [NodeSpec("head", num_cpus=0), NodeSpec("cpu", num_cpus=8)] + [
    NodeSpec("gpu", num_cpus=8, extra_resources={"gpu_node": 4, marker: 1}) for marker in GPU_MARKERS]


def expected_node_types() -> dict[str, set[str]]:
    """deployment -> the node types that offer every custom resource it asks for, from the GPU overlay."""
    offered = {"head": {}, "cpu": NODES[1].resources, "gpu": NODES[2].resources}
    names = {"ingress": "Ingress", "face": "FaceAnalysis", "prompt": "PromptEncoder", "denoiser": "Denoiser",
             "writer": "OutputWriter"}
    expected = {}
    for stage, options in render.app_config(render.render_serve_config("gpu")).deployments:
        wanted = options.ray_actor_options.get("resources", {})
        expected[names[stage]] = {t for t, res in offered.items() if all(res.get(k, 0) >= v for k, v in wanted.items())}
    return expected


@pytest.fixture(scope="module")
def placement_facts(serve_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    output_dir = tmp_path_factory.mktemp("placement-out")
    cluster = start_local_cluster(list(NODES), auth="token", dashboard=True)  # the state API needs the dashboard
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | cluster.env
        env["PYTHONPATH"] = str(REPO)
        node_pids = {marker: pid for spec, pid in zip(NODES, cluster.pids, strict=True)
                     for marker in GPU_MARKERS if marker in spec.resources}
        command = [sys.executable, "-m", "tests.apps.placement_driver", "--address", cluster.address,
                   "--dashboard-url", cluster.dashboard_url, "--lose-node", json.dumps(node_pids),
                   "--tiny-dir", str(serve_tiny_dir), "--output-dir", str(output_dir), "--port", str(free_port())]
        try:
            run = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=DRIVER_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"placement driver did not finish in {DRIVER_TIMEOUT_S}s; stdout: {exc.stdout!r:.2000}; "
                        f"stderr tail: {(exc.stderr or b'')[-3000:]!r}")
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        facts = json.loads(lines[-1]) if lines else {}
        assert run.returncode == 0 and "burst" in facts, (
            f"driver rc={run.returncode}; facts={facts}; stderr tail:\n{run.stderr[-4000:]}")
        print("placement facts:", json.dumps(facts))  # shown with -s, and by pytest when a test fails
        return facts
    finally:
        cluster.stop()


def test_gpu_overlay_asks_for_node_types_by_custom_resource() -> None:
    expected = expected_node_types()
    assert expected["Denoiser"] == {"gpu"}
    assert expected["FaceAnalysis"] == expected["OutputWriter"] == expected["Ingress"] == {"cpu"}


def test_replicas_land_only_on_the_node_types_that_offer_their_resources(placement_facts: dict) -> None:
    assert placement_facts["nodes"] == {"head": 1, "cpu": 1, "gpu": 2}
    expected = expected_node_types()
    for key in ("placement_before", "placement_after"):
        placed = placement_facts[key]
        assert set(placed) == set(expected), f"{key}: replicas of {sorted(placed)}"
        for deployment, where in placed.items():
            assert set(where) <= expected[deployment], (
                f"{key}: {deployment} replicas on {where}; it asks for {placement_facts['asked']}, "
                f"which only {sorted(expected[deployment])} offers")
    assert set(placement_facts["placement_after"]["Denoiser"]) == {"gpu"}
    assert set(placement_facts["placement_after"]["FaceAnalysis"]) == {"cpu"}


def test_a_burst_scales_the_denoiser_and_not_the_other_stages(placement_facts: dict) -> None:
    before, after, burst = placement_facts["running_before"], placement_facts["running_after"], placement_facts["burst"]
    assert {name: counts["all"] for name, counts in before.items()} == dict.fromkeys(before, 1), before
    assert burst["denoiser_running_2_after_s"] is not None, f"the Denoiser never had 2 running replicas: {burst}"
    assert after["Denoiser"]["running"] == 2 and len(placement_facts["placement_after"]["Denoiser"]) == 2
    for deployment in before:
        if deployment != "Denoiser":
            assert burst["max_replicas"][deployment] == 1 == after[deployment]["all"], (
                f"{deployment} scaled too: at most {burst['max_replicas'][deployment]} replicas during the burst")
    assert set(burst["statuses"]) == {"200"}, burst["errors"]


def test_a_lost_gpu_node_has_its_replicas_rescheduled_and_the_app_serves_again(placement_facts: dict) -> None:
    loss = placement_facts["node_loss"]
    assert "error" not in loss, loss
    assert loss["victim_type"] == "gpu" and loss["replicas_on_victim"].get("Denoiser", 0) >= 1, loss
    assert loss.get("node_dead_after_s") is not None, f"Ray never saw the node die: {loss}"
    assert loss.get("rescheduled_after_s") is not None, f"replicas were not rescheduled in time: {loss}"
    # Every deployment runs as many replicas as before the loss, on node types that offer their resources.
    expected = expected_node_types()
    after = loss["placement_after_loss"]
    for deployment, running in loss["wanted_running"].items():
        assert len(after.get(deployment, [])) >= running, (deployment, after)
        assert set(after[deployment]) <= expected[deployment], (deployment, after)
    assert loss.get("served_after_s") is not None, f"no request succeeded after the loss: {loss}"
    print(f"node loss: dead after {loss['node_dead_after_s']} s, rescheduled after {loss['rescheduled_after_s']} s, "
          f"served after {loss['served_after_s']} s")
