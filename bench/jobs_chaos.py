"""Chaos benchmark of the async jobs (issue 25): N jobs through the faults an operator meets, and what they lost.

    python -m bench.jobs_chaos                          # every scenario, 4 jobs each (about 5 minutes here)
    python -m bench.jobs_chaos --scenario consumer_killed --jobs 2
    python -m bench.jobs_chaos --write-results          # also writes its section of bench/RESULTS.md

What runs, all real and on loopback: Ray local with Serve's HTTP proxy, the `instantid` app (tiny preset, every
stage one replica, one JobConsumer running 2 jobs at a time), a redis-server with an append-only file (fsync on
every write, as the shipped in-cluster Redis persists), moto's S3 server holding the outputs in a bucket with
versioning on (so a second write of an output shows as a second version), and a webhook receiver. Every job asks
for a webhook.

Scenarios (each submits N jobs, waits until one runs, then):
1. `consumer_killed`: the JobConsumer replica is killed (ray.kill, as an OOM kill or a lost node).
2. `redis_restarted`: Redis is stopped and started again (a pod restart).
3. `redis_down_30s`: Redis is stopped for 30 s while synchronous /v1/generate requests keep coming.
4. `webhook_down`: the webhook receiver is down from before the jobs end until 5 s after the first one ends.
5. `object_store_down`: the S3 server is stopped for 10 s mid-job.

Per scenario: jobs done (of N), failed, lost (no terminal status by the deadline, or no record), doubled (an
output written more than once, or a webhook delivered more than once for one job: the receiver's calls that it
answered 2xx, by `webhook-id`), synchronous requests failed (non-200), and time to recover: from the fault's end to
the last job done with its webhook delivered. The visibility timeout is 20 s here (240 s by default), so a
redelivery shows within the run; `jobs.redelivery_bound_s` states the bound for any setting.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx

from bench.results_md import replace_section, write_raw
from testkit.net import free_port, wait_until
from testkit.redis import RedisServer
from testkit.s3 import S3TestServer
from testkit.serve import deploy, kill_replica, replica_actors, small_stage_options
from testkit.webhooks import WebhookReceiver

REPO = Path(__file__).resolve().parents[1]
RESULTS_MD = REPO / "bench" / "RESULTS.md"
RESULTS_DIR = REPO / "bench" / "results"
SECTION = "## Async jobs under faults (issue 25)"
FACE = base64.b64encode((REPO / "instantid_core" / "data" / "astronaut.jpg").read_bytes()).decode()
JOB_BODY = {"prompt": "a portrait", "steps": 40, "width": 192, "height": 192}  # long enough to be caught mid-run
SYNC_BODY = {"prompt": "a portrait", "steps": 2, "width": 64, "height": 64}
TERMINAL = ("done", "failed", "cancelled")
VISIBILITY_TIMEOUT_S = 20.0


@dataclass
class Chaos:
    """What a scenario acts on: the app's URL and bucket, and the parts it may take down (None: not available)."""

    url: str
    bucket: str
    receiver: WebhookReceiver
    redis: RedisServer | None = None
    s3: S3TestServer | None = None
    app: str = "instantid"


@dataclass
class Outcome:
    scenario: str
    jobs: int
    done: int = 0
    failed: int = 0
    lost: int = 0
    doubled: int = 0
    sync_sent: int = 0
    sync_failed: int = 0
    recover_s: float = 0.0
    attempts: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def submit_jobs(chaos: Chaos, count: int) -> list[str]:
    """`count` jobs with webhooks, each its own seed; their ids."""
    ids = []
    for _ in range(count):
        body = {"face_image": FACE, "seed": uuid.uuid4().int % 2**31, "webhook_url": chaos.receiver.url, **JOB_BODY}
        answer = httpx.post(f"{chaos.url}/v1/jobs", json=body, timeout=60)
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["job_id"])
    return ids


def job_status(chaos: Chaos, job_id: str) -> dict | None:
    """The job's record, None when the app answers 404 (unknown: lost); raises while the API cannot answer."""
    answer = httpx.get(f"{chaos.url}/v1/jobs/{job_id}", timeout=30)
    if answer.status_code == 404:
        return None
    answer.raise_for_status()
    return answer.json()


def wait_one_running(chaos: Chaos, ids: list[str], timeout_s: float = 120) -> None:
    def running() -> bool:
        return any((job_status(chaos, j) or {}).get("progress") for j in ids)

    wait_until(running, timeout_s, "a job runs", interval_s=0.1)


def settle(chaos: Chaos, ids: list[str], outcome: Outcome, fault_ended: float, timeout_s: float) -> None:
    """Wait until every job has ended and every done job's webhook is delivered (or the deadline), then count."""
    deadline = time.monotonic() + timeout_s
    final: dict[str, dict | None] = {}
    while time.monotonic() < deadline:
        try:
            final = {j: job_status(chaos, j) for j in ids}
        except httpx.HTTPError:
            time.sleep(1)
            continue
        if all(s is not None and s["status"] in TERMINAL and (s["status"] != "done" or s.get("webhook"))
               for s in final.values()):
            break
        time.sleep(0.5)
    outcome.recover_s = round(time.monotonic() - fault_ended, 1)
    for job_id in ids:
        status = final.get(job_id)
        if status is None or status["status"] not in TERMINAL:
            outcome.lost += 1
            outcome.notes.append(f"{job_id[:8]}: {status['status'] if status else 'no record'}")
            continue
        outcome.attempts.append(status.get("attempts", 0))
        outcome.done += status["status"] == "done"
        if status["status"] == "failed":
            outcome.failed += 1
            outcome.notes.append(f"{job_id[:8]} failed: {status['error']['code']}")
        elif status["status"] == "done" and not (status.get("webhook") or {}).get("delivered"):
            outcome.notes.append(f"{job_id[:8]}: webhook {status.get('webhook')}")
    outcome.doubled = doubled_outputs(chaos, ids) + doubled_webhooks(chaos, ids)


def doubled_outputs(chaos: Chaos, ids: list[str]) -> int:
    """Output objects of these jobs written more than once (the bucket keeps every version)."""
    versions: Counter[str] = Counter()
    pages = boto3.client("s3").get_paginator("list_object_versions").paginate(Bucket=chaos.bucket, Prefix="out/")
    for page in pages:
        for version in page.get("Versions", []):
            if any(job_id in version["Key"] for job_id in ids):
                versions[version["Key"]] += 1
    return sum(1 for count in versions.values() if count > 1)


def doubled_webhooks(chaos: Chaos, ids: list[str]) -> int:
    """Jobs whose webhook the receiver accepted more than once (a refused or unanswered call is a retry)."""
    accepted = Counter(headers.get("webhook-id") for headers, _, _ in chaos.receiver.calls
                       if headers.get("webhook-id") in ids)
    return sum(1 for count in accepted.values() if count > 1)


def sync_requests_while(chaos: Chaos, seconds: float, outcome: Outcome) -> None:
    """Synchronous /v1/generate requests one after another for `seconds`; counts those not answered 200."""
    end = time.monotonic() + seconds
    with httpx.Client(timeout=60) as client:
        while time.monotonic() < end:
            answer = client.post(f"{chaos.url}/v1/generate", json={"face_image": FACE, **SYNC_BODY})
            outcome.sync_sent += 1
            if answer.status_code != 200:
                outcome.sync_failed += 1
                outcome.notes.append(f"sync {answer.status_code}: {answer.text[:80]}")


# --- the scenarios ---------------------------------------------------------------------------------------------------
def with_fault(name: str, chaos: Chaos, jobs: int, fault: Callable[[Outcome], None],
               timeout_s: float = 240) -> Outcome:
    """Submit `jobs` jobs, wait until one runs, apply `fault` (it returns once the fault has ended), then wait for
    every job to settle and count."""
    outcome = Outcome(name, jobs)
    ids = submit_jobs(chaos, jobs)
    wait_one_running(chaos, ids)
    fault(outcome)
    settle(chaos, ids, outcome, time.monotonic(), timeout_s)
    return outcome


def consumer_killed(chaos: Chaos, jobs: int) -> Outcome:
    def kill(_: Outcome) -> None:
        for replica in replica_actors("JobConsumer", app=chaos.app):
            kill_replica(replica)

    return with_fault("consumer_killed", chaos, jobs, kill)


def redis_restarted(chaos: Chaos, jobs: int) -> Outcome:
    assert chaos.redis is not None

    def restart(_: Outcome) -> None:
        chaos.redis.stop()
        chaos.redis.start()

    return with_fault("redis_restarted", chaos, jobs, restart)


def redis_down_30s(chaos: Chaos, jobs: int) -> Outcome:
    assert chaos.redis is not None

    def down(outcome: Outcome) -> None:
        chaos.redis.stop()
        try:
            sync_requests_while(chaos, 30, outcome)
            refused = httpx.post(f"{chaos.url}/v1/jobs", json={"face_image": FACE, **SYNC_BODY}, timeout=60)
            outcome.notes.append(f"POST /v1/jobs while down: {refused.status_code} "
                                 f"{refused.json().get('error', {}).get('code')}")
        finally:
            chaos.redis.start()

    return with_fault("redis_down_30s", chaos, jobs, down)


def webhook_down(chaos: Chaos, jobs: int) -> Outcome:
    """The receiver is down from before the jobs are submitted (so not `with_fault`) until 5 s after one ends."""
    outcome = Outcome("webhook_down", jobs)
    chaos.receiver.close()
    try:
        ids = submit_jobs(chaos, jobs)

        def one_done() -> bool:
            return any((job_status(chaos, j) or {}).get("status") == "done" for j in ids)

        wait_until(one_done, 120, "a job ends", interval_s=0.2)
        time.sleep(5)  # its webhook's first tries meet a closed port
    finally:
        chaos.receiver.start()
    settle(chaos, ids, outcome, time.monotonic(), timeout_s=240)
    return outcome


def object_store_down(chaos: Chaos, jobs: int) -> Outcome:
    assert chaos.s3 is not None

    def down(_: Outcome) -> None:
        chaos.s3.stop()
        time.sleep(10)
        chaos.s3.start()

    return with_fault("object_store_down", chaos, jobs, down, timeout_s=300)


SCENARIOS: dict[str, Callable[[Chaos, int], Outcome]] = {
    f.__name__: f for f in (consumer_killed, redis_restarted, redis_down_30s, webhook_down, object_store_down)}


def jobs_args(redis_url: str) -> dict[str, Any]:
    """The app's args for the chaos run: jobs on this Redis, webhooks to loopback, a short visibility timeout."""
    return {"allowed_webhook_hosts": ["127.0.0.1"],
            "jobs": {"broker_url": redis_url, "broker_url_env": None, "visibility_timeout_s": VISIBILITY_TIMEOUT_S,
                     "queue_poll_interval_s": 1, "consumer_autoscaling": {"min_replicas": 1, "max_replicas": 1}}}


def stage_options() -> dict[str, dict]:
    return {**small_stage_options(), "JobConsumer": {"max_ongoing_requests": 2, "ray_actor_options": {"num_cpus": 0.1}}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append",
                        help="run only this one (repeatable); default all, in the order listed above")
    parser.add_argument("--jobs", type=int, default=4, help="jobs per scenario")
    parser.add_argument("--tiny-dir", type=Path, default=Path("/tmp/instantid-tiny"))
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")

    import logging

    import ray
    from ray import serve

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="bench-jobs-chaos-"))
    s3 = S3TestServer()
    os.environ.update({k: v for k, v in s3.environment("testing", workdir).items() if v is not None})
    bucket = f"chaos-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    boto3.client("s3").put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    redis = RedisServer(workdir, persistent=True)
    receiver = WebhookReceiver([])
    port = free_port()
    # Logical CPUs as the test session's Ray has: the stages share this machine's real cores either way.
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    outcomes: list[Outcome] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deploy(port, "instantid", "/", jobs_args(redis.url), bucket, args.tiny_dir, options=stage_options())
        chaos = Chaos(app.url, bucket, receiver, redis, s3)
        settle(chaos, submit_jobs(chaos, 1), Outcome("warm-up", 1), time.monotonic(), 300)  # every stage ran once
        for name in args.scenario or list(SCENARIOS):
            outcome = SCENARIOS[name](chaos, args.jobs)
            print(json.dumps(outcome.__dict__), flush=True)
            outcomes.append(outcome)
        bound_s = app.config.args.jobs.redelivery_bound_s
    finally:
        serve.shutdown()
        ray.shutdown()
        redis.stop()
        receiver.close()
        s3.stop()
    if args.write_results:
        write_results(outcomes, args.jobs, bound_s)
    return 0 if all(o.lost == 0 and o.doubled == 0 for o in outcomes) else 1


def write_results(outcomes: list[Outcome], jobs: int, bound_s: float) -> None:
    stamp, raw = write_raw(RESULTS_DIR, "jobs-chaos", [o.__dict__ for o in outcomes])
    rows = "\n".join(
        f"| {o.scenario} | {o.done}/{o.jobs} | {o.failed} | {o.lost} | {o.doubled} | "
        f"{f'{o.sync_failed}/{o.sync_sent}' if o.sync_sent else '-'} | {o.recover_s:.1f} | "
        f"{','.join(map(str, o.attempts))} |" for o in outcomes)
    section = f"""{SECTION}

{stamp}, `python -m bench.jobs_chaos --write-results` on this machine ({platform.machine()}, 2 CPUs, Python
{platform.python_version()}): tiny preset on CPU, {jobs} jobs per scenario ({JOB_BODY['steps']} steps,
{JOB_BODY['width']}x{JOB_BODY['height']}), each with a webhook; Ray, Redis (append-only file, fsync always), moto's
S3 server (versioned bucket) and the webhook receiver all on loopback. Visibility timeout {VISIBILITY_TIMEOUT_S:g} s
(default 240 s), so the redelivery bound of this run is {bound_s:g} s (280 s with the defaults). No GPU was lent to
this task: every figure here is CPU.

| scenario | done | failed | lost | doubled | sync failed / sent | recover (s) | attempts per job |
|---|---|---|---|---|---|---|---|
{rows}

Lost: no terminal status by the deadline. Doubled: an output written twice (S3 versions) or a webhook accepted
twice for one job. Recover: from the fault's end until every job ended with its webhook delivered. Attempts above
1 are starts, not writes: with Redis down as a run ended, its rerun reads the run's sidecar back and writes nothing;
with S3 down, the first run's write failed (503 storage_unavailable) and the job went back to the queue.
Raw JSON: `bench/results/{raw.name}`
"""
    replace_section(RESULTS_MD, SECTION, section)


if __name__ == "__main__":
    sys.exit(main())
