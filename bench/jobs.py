"""Async jobs benchmark (issue 13): N tiny-preset jobs through 1 and 2 JobConsumer replicas.

    python -m bench.jobs                   # 100 jobs per configuration, 64x64, 2 steps (a few minutes)
    python -m bench.jobs --jobs 20         # harness check
    python -m bench.jobs --write-results   # also writes the "Async jobs (issue 13)" section of bench/RESULTS.md

What runs: a Redis server on a free loopback port (Debian's redis-server), Ray local with Serve's HTTP proxy on
127.0.0.1, the `instantid` app from serve_config.yaml's AppConfig (tiny preset, outputs to a temporary file://
folder, every stage one replica; the consumer min = max = the replica count under test, 2 jobs at a time each).
All N jobs are submitted at once from 8 client threads, then polled until every one has ended.

Per job, from its status record (times stamped by the ingress and the consumer on this one machine):
- queue-to-start = started_at - created_at (waiting in the broker, then taken by a consumer);
- end-to-end = the first poll that saw it done - its submit time at the client (poll interval 0.1 s);
- jobs/s = N / (last job done - first submit).
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from bench.results_md import replace_section, write_raw
from testkit.net import free_port
from testkit.redis import start_redis, stop_redis
from testkit.serve import deploy, small_stage_options

REPO = Path(__file__).resolve().parents[1]

RESULTS_MD = REPO / "bench" / "RESULTS.md"
RESULTS_DIR = REPO / "bench" / "results"
SECTION = "## Async jobs (issue 13)"
FACE = REPO / "instantid_core" / "data" / "astronaut.jpg"
BODY = {"prompt": "a portrait", "steps": 2, "width": 64, "height": 64}


def run_config(url: str, replicas: int, jobs: int) -> dict:
    face = base64.b64encode(FACE.read_bytes()).decode()
    submitted: dict[str, float] = {}

    def submit(i: int) -> None:
        sent = time.time()
        answer = httpx.post(f"{url}/v1/jobs", json={"face_image": face, "seed": i, **BODY}, timeout=60)
        assert answer.status_code == 202, answer.text
        submitted[answer.json()["job_id"]] = sent

    first = time.time()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(submit, range(jobs)))
    done: dict[str, dict] = {}
    seen_done: dict[str, float] = {}
    with httpx.Client(timeout=30) as client:
        while len(done) < jobs:
            for job_id in submitted:
                if job_id in done:
                    continue
                status = client.get(f"{url}/v1/jobs/{job_id}").json()
                if status["status"] in ("done", "failed", "cancelled"):
                    done[job_id], seen_done[job_id] = status, time.time()
            time.sleep(0.1)
    last = max(seen_done.values())
    queue = np.array([s["started_at"] - s["created_at"] for s in done.values() if s.get("started_at")])
    e2e = np.array([seen_done[j] - submitted[j] for j in done])
    statuses = {s: sum(d["status"] == s for d in done.values()) for s in {d["status"] for d in done.values()}}
    return {"replicas": replicas, "jobs": jobs, "statuses": statuses, "jobs_per_s": jobs / (last - first),
            "queue_to_start_p50_s": float(np.percentile(queue, 50)),
            "queue_to_start_p95_s": float(np.percentile(queue, 95)),
            "end_to_end_p50_s": float(np.percentile(e2e, 50)), "end_to_end_p95_s": float(np.percentile(e2e, 95)),
            "attempts_over_1": sum(d.get("attempts", 1) > 1 for d in done.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--tiny-dir", type=Path, default=Path("/tmp/instantid-tiny"))
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()

    import ray
    from ray import serve

    workdir = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    redis_process, redis_url = start_redis(workdir)
    port = free_port()
    results = []
    # Logical CPUs, as the test session's Ray has: six stages (two consumers) ask more than this 2-core machine's
    # default of 2; they share the real cores either way.
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for replicas in (1, 2):
            # One replica per stage (small_stage_options); the consumers' count is what is measured, and the
            # queue-length policy comes with `jobs`.
            jobs = {"broker_url": redis_url, "broker_url_env": None, "queue_name": f"bench-jobs-{replicas}",
                    "consumer_autoscaling": {"min_replicas": replicas, "max_replicas": replicas}}
            options = {**small_stage_options(), "JobConsumer": {"max_ongoing_requests": 2}}
            app = deploy(port, "instantid", "/", {"jobs": jobs, "output_uri": (workdir / "out").as_uri()}, "unused",
                         args.tiny_dir, options=options)
            run_config(app.url, replicas, 4)  # warm-up, not counted
            result = run_config(app.url, replicas, args.jobs)
            print(json.dumps(result), flush=True)
            results.append(result)
            serve.delete("instantid")
    finally:
        serve.shutdown()
        ray.shutdown()
        stop_redis(redis_process)
    if args.write_results:
        write_results(results, args.jobs)
    return 0


def write_results(results: list[dict], jobs: int) -> None:
    stamp, raw = write_raw(RESULTS_DIR, "jobs", results)
    rows = "\n".join(
        f"| {r['replicas']} | {r['jobs']} | {r['statuses']} | {r['jobs_per_s']:.2f} | "
        f"{r['queue_to_start_p50_s']:.2f} / {r['queue_to_start_p95_s']:.2f} | "
        f"{r['end_to_end_p50_s']:.2f} / {r['end_to_end_p95_s']:.2f} |" for r in results)
    section = f"""{SECTION}

{stamp}, `python -m bench.jobs --write-results` on this machine ({platform.machine()}, 2 CPUs, Python
{platform.python_version()}), tiny preset on CPU, 64x64, 2 steps, {jobs} jobs submitted at once from 8 clients,
Redis on loopback, outputs to a local folder. Each consumer replica runs 2 jobs at a time; every other stage is one
replica, so a second consumer adds concurrency in front of the same Denoiser (on 2 CPUs the stages share the cores:
this measures the queue's plumbing, not GPU scaling). No GPU was lent to this task: every figure here is CPU.

| consumer replicas | jobs | statuses | jobs/s | queue-to-start p50 / p95 (s) | end-to-end p50 / p95 (s) |
|---|---|---|---|---|---|
{rows}

Raw JSON: `bench/results/{raw.name}`
"""
    replace_section(RESULTS_MD, SECTION, section)


if __name__ == "__main__":
    sys.exit(main())
