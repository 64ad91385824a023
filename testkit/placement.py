"""Placement driver for tests/cluster/test_placement.py and bench/load.py: runs in its own process against a local
multi-node cluster.

    python -m testkit.placement --address 127.0.0.1:PORT --dashboard-url http://127.0.0.1:PORT \
        --port PORT --tiny-dir DIR --output-dir DIR

Deploys the GPU overlay's serve config (`k8s.render.cpu_only(render_serve_config("gpu"))`: its custom resources
and replica counts, the tiny preset, no `num_gpus`) with one change, the Denoiser's autoscaling (min 1, max 2, a
target of 1 ongoing request, a short upscale delay), sends a burst of concurrent HTTP requests to 127.0.0.1, and
prints one JSON line of facts: which node type every replica actor runs on before and after the burst, the most
replicas each deployment had from the burst until the Denoiser's second replica ran, and the HTTP status counts.
With `--lose-node`, it then kills the worker node that runs the most Denoiser replicas (SIGKILL to its `ray start`
process group: a machine lost, not drained) and records how Serve recovers: where the replicas run afterwards and
when a request succeeds again. The test decides what is right.

A separate process because the test session may already hold an in-process Ray instance (`ray_instance`); a
process is connected to one Ray cluster at a time. `run_on_local_cluster` starts the cluster (cluster_nodes()) and
this driver against it. The driver imports `k8s.render`: it runs from the repository root (`python -m`, cwd REPO).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from testkit.net import free_port, wait_ready

REPO = Path(__file__).resolve().parents[1]
# One CPU node and two "GPU" nodes, each standing in for a 4-GPU machine (gpu_node = GPUs on the node, as on a
# g6.12xlarge): either has room for two Denoisers (gpu_node 1 each) and the PromptEncoder's GPU share (0.25), so
# losing one leaves room for everything. The CPU node has logical CPUs to spare for a Denoiser too, so only the
# custom resource keeps Denoisers off it. `loss_*` markers tell the driver which `ray start` process is which node.
GPU_MARKERS = ("loss_gpu_a", "loss_gpu_b")
# A run takes ~2 min; the driver's own waits (ready 90, scale 60, start 90, node loss 120) fit in this.
DRIVER_TIMEOUT_S = 420
ASTRONAUT = REPO / "instantid_core" / "data" / "astronaut.jpg"
APP = "instantid"
REPLICA_CLASS_PREFIX = f"ServeReplica:{APP}:"  # Serve names a replica actor's class ServeReplica:<app>:<deployment>
DENOISER_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                        "upscale_delay_s": 1, "downscale_delay_s": 600, "look_back_period_s": 2}
# Routers (the Ingress's handles) report ongoing requests every 10 s by default; 1 s keeps the test short.
METRICS_ENV = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
               "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
# The GCS calls a node dead after 5 failed health checks, one every 3 s by default (the lost node was seen dead
# ~15 s after its SIGKILL). One a second: a killed node fails each check at once (~5 s); a live one still has to miss
# 5 checks in a row, each allowed Ray's own 10 s timeout, so a loaded machine does not lose a node that is alive.
NODE_LOSS_ENV = {"RAY_health_check_period_ms": "1000"}
# Big enough that the Denoiser, not the cached face/prompt stages, is where requests wait (~0.5 s per image here).
REQUEST = {"prompt": "a portrait, watercolor", "steps": 8, "width": 256, "height": 256}


def cluster_nodes() -> list:
    from testkit.cluster import NodeSpec

    return [NodeSpec("head", num_cpus=0), NodeSpec("cpu", num_cpus=8)] + [
        NodeSpec("gpu", num_cpus=8, extra_resources={"gpu_node": 4, marker: 1}) for marker in GPU_MARKERS]


def run_on_local_cluster(tiny_dir: Path, output_dir: Path, *, lose_node: bool = True,
                         timeout_s: float = DRIVER_TIMEOUT_S) -> tuple[int, dict[str, Any], str]:
    """Start a Redis (the JobConsumer's broker) and cluster_nodes() with testkit.cluster, run this driver against
    them, stop both.

    Returns the driver's exit code, its facts (empty if it printed none) and the tail of its stderr."""
    import tempfile

    from testkit.cluster import start_local_cluster
    from testkit.redis import start_redis, stop_redis

    nodes = cluster_nodes()
    redis_dir = tempfile.TemporaryDirectory(prefix="placement-redis-")
    redis_process, broker_url = start_redis(Path(redis_dir.name))
    # the state API needs the dashboard
    cluster = start_local_cluster(nodes, auth="token", dashboard=True, env=NODE_LOSS_ENV)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | cluster.env
        command = [sys.executable, "-m", "testkit.placement", "--address", cluster.address,
                   "--dashboard-url", cluster.dashboard_url, "--tiny-dir", str(tiny_dir),
                   "--output-dir", str(output_dir), "--port", str(free_port()), "--broker-url", broker_url]
        if lose_node:
            node_pids = {marker: pid for spec, pid in zip(nodes, cluster.pids, strict=True)
                         for marker in GPU_MARKERS if marker in spec.resources}
            command += ["--lose-node", json.dumps(node_pids)]
        try:
            run = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:  # its output comes as bytes here, whatever `text` says
            raw = exc.stderr or b""
            stderr = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
            return -1, {}, f"the driver did not finish in {timeout_s:.0f}s; stderr tail: {stderr[-3000:]}"
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        return run.returncode, json.loads(lines[-1]) if lines else {}, run.stderr[-4000:]
    finally:
        cluster.stop()
        stop_redis(redis_process)
        redis_dir.cleanup()


def node_types() -> dict[str, str]:
    """node id -> node type, read from the custom resources each alive node advertises (testkit.cluster)."""
    import ray

    types = {}
    for node in ray.nodes():
        if node["Alive"]:
            res = node["Resources"]
            types[node["NodeID"]] = "gpu" if "gpu_node" in res else "cpu" if "cpu_node" in res else "head"
    return types


def replica_nodes(dashboard_url: str) -> dict[str, list[str]]:
    """deployment -> node ids of its alive replica actors (Ray's state API, served by the dashboard)."""
    from ray.util.state import list_actors

    placed: dict[str, list[str]] = {}
    alive = list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000,
                        raise_on_missing_output=False)
    for actor in alive:
        if actor.class_name.startswith(REPLICA_CLASS_PREFIX):
            placed.setdefault(actor.class_name.removeprefix(REPLICA_CLASS_PREFIX), []).append(actor.node_id)
    return placed


def replica_placement(types: dict[str, str], dashboard_url: str) -> dict[str, list[str]]:
    """deployment -> sorted node types of its alive replica actors."""
    return {name: sorted(types.get(node, f"unknown:{node}") for node in nodes)
            for name, nodes in sorted(replica_nodes(dashboard_url).items())}


def replica_counts() -> dict[str, dict[str, int]]:
    """deployment -> {"running": n, "all": replicas in any state (starting, running, ...)} (Serve's status)."""
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return {}
    return {name: {"running": d.replica_states.get("RUNNING", 0), "all": sum(d.replica_states.values())}
            for name, d in app.deployments.items()}


def app_config(tiny_dir: str, output_dir: str, broker_url: str) -> Any:
    from instantid_app.config import app_spec
    from k8s.render import app_entry, cpu_only, render_serve_config

    config = cpu_only(render_serve_config("gpu"))
    app = app_entry(config)
    app["args"]["weights"]["preset_dir"] = tiny_dir
    app["args"]["output_uri"] = Path(output_dir).resolve().as_uri()
    # This run's own Redis, never whatever may listen on the default port (or an INSTANTID_BROKER_URL in the env).
    # One replica of every other stage (the overlay runs two of some, for a machine lost): the placement the test
    # checks comes from the resources each asks for, and a 2-core machine starts a third fewer replica processes.
    app["args"]["jobs"] = {**app["args"].get("jobs", {}), "broker_url": broker_url, "broker_url_env": None,
                           "consumer_autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    for entry in app["deployments"]:
        if entry["name"] == "Denoiser":
            entry["autoscaling_config"] = dict(DENOISER_AUTOSCALING)
        elif entry["name"] != "JobConsumer":
            entry["autoscaling_config"] = {**entry.get("autoscaling_config", {}), "min_replicas": 1, "max_replicas": 1}
    return app_spec(config)


def burst(url: str, clients: int, scale_timeout_s: float, start_timeout_s: float) -> dict[str, Any]:
    """`clients` closed-loop HTTP clients until Serve has decided on a second Denoiser replica (at most
    `scale_timeout_s`); then, with the machine quiet again, wait until that replica runs (at most `start_timeout_s`
    more). Records the most replicas (in any state) of every deployment meanwhile."""
    body = {**REQUEST, "face_image": base64.b64encode(ASTRONAUT.read_bytes()).decode()}
    stop = threading.Event()
    statuses: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        seed = index * 1000
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                seed += 1
                try:
                    answer = http.post(f"{url}/v1/generate", json={**body, "seed": seed})
                    code, text = answer.status_code, answer.text[:300]
                except httpx.HTTPError as exc:
                    code, text = "exception", repr(exc)
                with lock:
                    statuses[code] += 1
                    if code != 200 and len(errors) < 5:
                        errors.append(f"{code}: {text}")

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    most: Counter = Counter()
    decided_after = running_after = None
    deadline = started + scale_timeout_s
    try:
        while time.monotonic() < deadline:
            for name, counts in replica_counts().items():
                most[name] = max(most[name], counts["all"])
                if name == "Denoiser" and counts["running"] >= 2:
                    running_after = round(time.monotonic() - started, 1)
            if decided_after is None and most["Denoiser"] >= 2:
                decided_after = round(time.monotonic() - started, 1)
                stop.set()  # the burst has done its work; let the new replica start on a quiet machine
                deadline = time.monotonic() + start_timeout_s
            if running_after is not None:
                break
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=130)
    return {"max_replicas": dict(most), "denoiser_second_replica_after_s": decided_after,
            "denoiser_running_2_after_s": running_after, "burst_s": round(time.monotonic() - started, 1),
            "statuses": {str(k): v for k, v in statuses.items()}, "errors": errors}


def lose_node(node_pids: dict[str, int], types: dict[str, str], url: str, dashboard_url: str,
              timeout_s: float) -> dict[str, Any]:
    """Kill the worker node that runs the most Denoiser replicas, then wait (at most `timeout_s`) until every
    deployment runs as many replicas as before, none of them on the lost node, and a request succeeds.

    `node_pids`: marker resource -> pid of the `ray start --block` process of the node that advertises it (each
    process leads its own process group, so the group is the node: raylet, object store, workers)."""
    import ray

    marker_of = {node["NodeID"]: marker for node in ray.nodes() if node["Alive"]
                 for marker in node_pids if marker in node["Resources"]}
    placed = replica_nodes(dashboard_url)
    on_marked = Counter(node for node in placed.get("Denoiser", []) if node in marker_of)
    if not on_marked:
        return {"error": f"no Denoiser replica on a node that may be killed: {placed}"}
    victim = on_marked.most_common(1)[0][0]
    wanted = {name: counts["running"] for name, counts in replica_counts().items()}
    facts: dict[str, Any] = {
        "victim_type": types[victim],
        "replicas_on_victim": {name: nodes.count(victim) for name, nodes in sorted(placed.items())
                               if victim in nodes},
        "wanted_running": wanted,
    }
    killed = time.monotonic()
    os.killpg(node_pids[marker_of[victim]], signal.SIGKILL)

    body = {**REQUEST, "seed": 7, "face_image": base64.b64encode(ASTRONAUT.read_bytes()).decode()}
    statuses: Counter = Counter()
    deadline = killed + timeout_s
    while time.monotonic() < deadline:
        if "node_dead_after_s" not in facts and not any(
                node["NodeID"] == victim and node["Alive"] for node in ray.nodes()):
            facts["node_dead_after_s"] = round(time.monotonic() - killed, 1)
        counts, where = replica_counts(), replica_nodes(dashboard_url)
        # Serve's running counts lag the loss (they still held the lost replicas when the state API no longer
        # listed them alive), so the alive replica actors must make up the numbers too, with the node seen dead.
        rescheduled = ("node_dead_after_s" in facts
                       and all(counts.get(name, {}).get("running", 0) >= n and len(where.get(name, [])) >= n
                               for name, n in wanted.items())
                       and not any(victim in nodes for nodes in where.values()))
        if rescheduled and "rescheduled_after_s" not in facts:
            facts["rescheduled_after_s"] = round(time.monotonic() - killed, 1)
            facts["placement_after_loss"] = {name: sorted(types.get(n, f"unknown:{n}") for n in nodes)
                                             for name, nodes in sorted(where.items())}
        if rescheduled:
            try:
                answer = httpx.post(f"{url}/v1/generate", json=body, timeout=120)
                statuses[answer.status_code] += 1
                if answer.status_code == 200:
                    facts["served_after_s"] = round(time.monotonic() - killed, 1)
                    break
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
        time.sleep(0.5)
    facts["statuses_after_loss"] = {str(k): v for k, v in statuses.items()}
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="GCS address of the local cluster")
    parser.add_argument("--dashboard-url", required=True, help="http://127.0.0.1:PORT, for Ray's state API")
    parser.add_argument("--tiny-dir", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--broker-url", required=True, help="redis://127.0.0.1:PORT/0, the job queue's broker")
    parser.add_argument("--port", type=int, required=True, help="Serve's HTTP port on 127.0.0.1")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--ready-timeout", type=float, default=90)
    parser.add_argument("--scale-timeout", type=float, default=60, help="for Serve to decide on a 2nd Denoiser")
    parser.add_argument("--start-timeout", type=float, default=90, help="for that replica to start, once decided")
    parser.add_argument("--lose-node", type=json.loads, default=None, metavar="JSON",
                        help='after the burst, kill a node: {"marker resource": pid of its ray start process}')
    parser.add_argument("--loss-timeout", type=float, default=120, help="for Serve to recover from the lost node")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from deployments.app import build_app_from_spec

    facts: dict[str, Any] = {}
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    ray.init(address=args.address, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": METRICS_ENV})
    try:
        types = node_types()
        facts["nodes"] = dict(Counter(types.values()))
        config = app_config(args.tiny_dir, args.output_dir, args.broker_url)
        facts["asked"] = {name: options["ray_actor_options"].get("resources", {})
                          for name, options in config.stages()}
        # One proxy, on the head: every node of this cluster shares the machine's ports.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app_from_spec(config), name=APP, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{args.port}"
        wait_ready(url, args.ready_timeout)
        timings["ready_s"] = round(time.monotonic() - t0, 1)
        facts["placement_before"] = replica_placement(types, args.dashboard_url)
        warm = httpx.post(f"{url}/v1/generate", timeout=120, json={
            **REQUEST, "seed": 1, "face_image": base64.b64encode(ASTRONAUT.read_bytes()).decode()})
        facts["warmup_status"] = warm.status_code
        if warm.status_code != 200:
            facts["warmup_error"] = warm.text[:500]
        else:
            facts["running_before"] = replica_counts()
            facts["burst"] = burst(url, args.clients, args.scale_timeout, args.start_timeout)
            facts["placement_after"] = replica_placement(types, args.dashboard_url)
            facts["running_after"] = replica_counts()
            if args.lose_node:
                facts["node_loss"] = lose_node(args.lose_node, types, url, args.dashboard_url, args.loss_timeout)
        timings["total_s"] = round(time.monotonic() - t0, 1)
        facts["timings"] = timings
    finally:
        print(json.dumps(facts), flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
