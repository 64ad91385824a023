"""Placement on a local multi-node cluster: the GPU overlay's serve config puts the Denoiser only on "GPU" nodes
and the CPU stages only on CPU nodes, a burst of requests scales the Denoiser, not the other stages, and when the
GPU node running the Denoiser is lost, its replicas are rescheduled on the other one and the app serves again.

The cluster is testkit.cluster's (one `ray start` process per node, custom resources standing in for node types;
the "gpu" node advertises `gpu_node` and no GPU, so the tiny preset runs on CPU). The Serve app is driven from a
separate process (testkit/placement.py), a Ray driver of that cluster.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from k8s import render
from testkit.placement import cluster_nodes, run_on_local_cluster

NODES = cluster_nodes()


def expected_node_types() -> dict[str, set[str]]:
    """deployment -> the node types that offer every custom resource it asks for, from the GPU overlay."""
    offered = {"head": {}, "cpu": NODES[1].resources, "gpu": NODES[2].resources}
    expected = {}
    for stage, options in render.app_config(render.render_serve_config("gpu")).stages():
        wanted = options["ray_actor_options"].get("resources", {})
        expected[stage] = {t for t, res in offered.items() if all(res.get(k, 0) >= v for k, v in wanted.items())}
    return expected


@pytest.fixture(scope="module")
def placement_facts(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    returncode, facts, stderr = run_on_local_cluster(tiny_root, tmp_path_factory.mktemp("placement-out"))
    assert returncode == 0 and "burst" in facts, f"driver rc={returncode}; facts={facts}; stderr tail:\n{stderr}"
    print("placement facts:", json.dumps(facts))  # shown with -s, and by pytest when a test fails
    return facts


def test_gpu_overlay_asks_for_node_types_by_custom_resource() -> None:
    expected = expected_node_types()
    assert expected["Denoiser"] == {"gpu"}
    assert expected["FaceAnalysis"] == expected["OutputWriter"] == expected["Ingress"] == {"cpu"}
    assert expected["JobConsumer"] == {"cpu"}  # waiting on the broker never takes a GPU node's CPUs


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
