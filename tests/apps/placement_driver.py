"""Driver for tests/test_placement.py: runs in its own process against a local multi-node cluster.

    python -m tests.apps.placement_driver --address 127.0.0.1:PORT --dashboard-url http://127.0.0.1:PORT \
        --port PORT --tiny-dir DIR --output-dir DIR

Deploys the GPU overlay's serve config (`k8s.render.cpu_only(render_serve_config("gpu"))`: its custom resources
and replica counts, the tiny preset, no `num_gpus`) with one change, the Denoiser's autoscaling (min 1, max 2, a
target of 1 ongoing request, a short upscale delay), sends a burst of concurrent HTTP requests to 127.0.0.1, and
prints one JSON line of facts: which node type every replica actor runs on before and after the burst, the most
replicas each deployment had from the burst until the Denoiser's second replica ran, and the HTTP status counts.
The test decides what is right.

A separate process because the test session may already hold an in-process Ray instance (`ray_instance`); a
process is connected to one Ray cluster at a time.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
ASTRONAUT = REPO / "instantid_core" / "data" / "astronaut.jpg"
APP = "instantid"
REPLICA_CLASS_PREFIX = f"ServeReplica:{APP}:"  # Serve names a replica actor's class ServeReplica:<app>:<deployment>
DENOISER_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                        "upscale_delay_s": 1, "downscale_delay_s": 600, "look_back_period_s": 2}
# Routers (the Ingress's handles) report ongoing requests every 10 s by default; 1 s keeps the test short.
METRICS_ENV = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
               "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
# Big enough that the Denoiser, not the cached face/prompt stages, is where requests wait (~0.5 s per image here).
REQUEST = {"prompt": "a portrait, watercolor", "steps": 8, "width": 256, "height": 256}


def node_types() -> dict[str, str]:
    """node id -> node type, read from the custom resources each alive node advertises (cluster/local.py)."""
    import ray

    types = {}
    for node in ray.nodes():
        if node["Alive"]:
            res = node["Resources"]
            types[node["NodeID"]] = "gpu" if "gpu_node" in res else "cpu" if "cpu_node" in res else "head"
    return types


def replica_placement(types: dict[str, str], dashboard_url: str) -> dict[str, list[str]]:
    """deployment -> sorted node types of its alive replica actors (Ray's state API, served by the dashboard)."""
    from ray.util.state import list_actors

    placed: dict[str, list[str]] = {}
    alive = list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000,
                        raise_on_missing_output=False)
    for actor in alive:
        if actor.class_name.startswith(REPLICA_CLASS_PREFIX):
            name = actor.class_name.removeprefix(REPLICA_CLASS_PREFIX)
            placed.setdefault(name, []).append(types.get(actor.node_id, f"unknown:{actor.node_id}"))
    return {name: sorted(where) for name, where in sorted(placed.items())}


def replica_counts() -> dict[str, dict[str, int]]:
    """deployment -> {"running": n, "all": replicas in any state (starting, running, ...)} (Serve's status)."""
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return {}
    return {name: {"running": d.replica_states.get("RUNNING", 0), "all": sum(d.replica_states.values())}
            for name, d in app.deployments.items()}


def app_config(tiny_dir: str, output_dir: str) -> Any:
    from deployments.config import AppConfig
    from k8s.render import app_entry, cpu_only, render_serve_config

    args = app_entry(cpu_only(render_serve_config("gpu")))["args"]
    args["weights"]["tiny_preset_dir"] = tiny_dir
    args["output_uri"] = Path(output_dir).resolve().as_uri()
    args["deployments"]["denoiser"]["autoscaling_config"] = dict(DENOISER_AUTOSCALING)
    return AppConfig.model_validate(args)


def wait_ready(url: str, deadline: float) -> None:
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{url}/readyz", timeout=10)
            if answer.status_code == 200:
                return
            last = f"{answer.status_code} {answer.text[:300]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz not 200 in time; last answer: {last}")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="GCS address of the local cluster")
    parser.add_argument("--dashboard-url", required=True, help="http://127.0.0.1:PORT, for Ray's state API")
    parser.add_argument("--tiny-dir", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--port", type=int, required=True, help="Serve's HTTP port on 127.0.0.1")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--ready-timeout", type=float, default=90)
    parser.add_argument("--scale-timeout", type=float, default=60, help="for Serve to decide on a 2nd Denoiser")
    parser.add_argument("--start-timeout", type=float, default=90, help="for that replica to start, once decided")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from deployments.app import build_app

    facts: dict[str, Any] = {}
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    ray.init(address=args.address, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": METRICS_ENV})
    try:
        types = node_types()
        facts["nodes"] = dict(Counter(types.values()))
        config = app_config(args.tiny_dir, args.output_dir)
        facts["asked"] = {name: options.ray_actor_options.get("resources", {})
                          for name, options in config.deployments}
        # One proxy, on the head: every node of this cluster shares the machine's ports.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app(config), name=APP, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{args.port}"
        wait_ready(url, time.monotonic() + args.ready_timeout)
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
