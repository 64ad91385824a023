"""Overload and faults against the running app: a short bounded load run (the long one is bench/load.py), the
denoiser killed under load, the S3 server stopped mid-run, and an async job whose ingress replica dies.

Every check compares what clients were told with what the S3 test server holds: nothing reported is missing,
nothing stored was never reported, and no answer is a hang or an unexplained 5xx."""

from __future__ import annotations

import json
import time
import uuid

import boto3
import httpx
import pytest

from testkit.api import b64, s3_read
from testkit.load import answered, audit_outputs, run_load
from testkit.net import wait_until
from testkit.serve import kill_replica, replica_actors, wait_replaced

SMALL = {"steps": 2, "width": 64, "height": 64}
RECOVERY_BOUND_S = 90


def objects_under(bucket: str, prefix: str) -> set[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {f"s3://{bucket}/{obj['Key']}" for page in pages for obj in page.get("Contents", [])}


@pytest.fixture
def body_factory(astronaut_bytes):
    face = b64(astronaut_bytes)

    def make(prefix: str):
        return lambda index: {"face_image": face, "prompt": f"portrait {index % 4}", "seed": index, **SMALL,
                              "output": {"prefix": prefix}}
    return make


def test_bounded_load_every_answer_is_200_or_503_and_the_store_matches(served_app, body_factory):
    prefix = f"load-{uuid.uuid4().hex[:8]}"
    result = run_load(served_app.url, body_factory(prefix), clients=32, requests=64, timeout_s=120)
    assert len(result.answers) == 64
    assert set(result.statuses()) <= {"200", "503"}, result.statuses()
    assert all(a.retry_after for a in result.answers if a.status == 503)
    assert result.ok(), result.statuses()
    audit = audit_outputs(result, objects_under(served_app.bucket, f"out/{prefix}/"), s3_read)
    assert audit["missing"] == [] and audit["orphans"] == [] and audit["bad_sidecars"] == 0, audit
    print(f"load: {result.statuses()} p50 {result.percentile_s(50):.2f}s p99 {result.percentile_s(99):.2f}s "
          f"goodput {result.goodput():.1f} img/s")


def test_denoiser_killed_under_load_recovers_without_losses_or_orphans(served_app, body_factory):
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    victims = replica_actors("Denoiser")  # every one: nothing can denoise until Serve has started new ones
    killed_at: list[float] = []

    def kill(live) -> None:
        assert answered(live, 16, timeout_s=120), "the load run ended before the kill"
        killed_at.append(time.monotonic())
        for victim in victims:
            kill_replica(victim)

    result = run_load(served_app.url, body_factory(prefix), clients=8, requests=80, timeout_s=120, during=kill)
    for answer in result.answers:  # in flight at the kill: success, or a 5xx that says to retry
        assert answer.status in (200, 503), (answer.status, answer.error, answer.body)
        if answer.status == 503:
            assert answer.retry_after and "retry" in answer.body["error"]["message"], answer.body
    recovered = [a.started + a.seconds - killed_at[0] for a in result.answers
                 if a.status == 200 and a.started > killed_at[0]]
    # Recovery is Serve noticing the dead replicas, starting new actors and loading the tiny models: 32 s once in CI
    # on 2 cores with the other xdist worker busy. The bound catches a replica that never comes back; it is not a
    # speed figure (bench/load.py's kill run reports that).
    if not recovered:  # the run ended before the new replica was up: keep asking
        probe = body_factory(f"{prefix}-probe")(999)
        while time.monotonic() < killed_at[0] + RECOVERY_BOUND_S and not recovered:
            if httpx.post(f"{served_app.url}/v1/generate", json=probe, timeout=60).status_code == 200:
                recovered.append(time.monotonic() - killed_at[0])
            time.sleep(0.5)
        assert recovered, f"no request succeeded within {RECOVERY_BOUND_S} s of the kill"
    assert min(recovered) < RECOVERY_BOUND_S
    wait_replaced("Denoiser", victims)  # as many replicas as before, none of them the killed ones
    wait_until(lambda: httpx.get(f"{served_app.url}/readyz", timeout=30).status_code == 200, 90,
               "/readyz reports the new replicas ready", 0.5)
    # Every 200 has all its objects; a request that failed at the kill left none (its images never existed).
    audit = audit_outputs(result, objects_under(served_app.bucket, f"out/{prefix}/"), s3_read)
    assert audit["missing"] == [] and audit["orphans"] == [] and audit["bad_sidecars"] == 0, audit
    print(f"kill: {result.statuses()}, first success {min(recovered):.1f}s after the kill")


def test_s3_outage_answers_503_quickly_leaves_nothing_partial_and_recovers(served_app, s3_test_server, body_factory):
    prefix = f"outage-{uuid.uuid4().hex[:8]}"
    make = body_factory(prefix)
    assert httpx.post(f"{served_app.url}/v1/generate", json=make(0), timeout=60).status_code == 200  # warm caches
    s3_test_server.stop()
    try:
        started = time.monotonic()
        down = httpx.post(f"{served_app.url}/v1/generate", json=make(1), timeout=120)
        took = time.monotonic() - started
    finally:
        s3_test_server.start()
    assert down.status_code == 503, down.text
    assert down.json()["error"]["code"] == "storage_unavailable" and down.headers["Retry-After"]
    assert took < 60, f"the 503 took {took:.0f}s"
    assert all(f"/{down.json().get('request_id', '-')}/" not in u for u in objects_under(served_app.bucket, "out/"))
    stored = objects_under(served_app.bucket, f"out/{prefix}/")
    assert len(stored) == 2, stored  # only request 0's image and sidecar: nothing from the failed one
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # no restart needed: the next request succeeds
        again = httpx.post(f"{served_app.url}/v1/generate", json=make(2), timeout=60)
        if again.status_code == 200:
            break
        time.sleep(0.5)
    assert again.status_code == 200, again.text


def test_a_job_survives_its_ingress_replica_dying(served_app, astronaut_bytes):
    body = {"face_image": b64(astronaut_bytes), "prompt": "job", "steps": 20, "width": 256, "height": 256}
    submitted = httpx.post(f"{served_app.url}/v1/jobs", json=body, timeout=60)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    for name in replica_actors("Ingress"):
        kill_replica(name)

    deadline = time.monotonic() + 150
    status = {}
    while time.monotonic() < deadline:
        try:
            poll = httpx.get(f"{served_app.url}/v1/jobs/{job_id}", timeout=30)
        except httpx.HTTPError:
            poll = None
        if poll is not None and poll.status_code == 200:
            status = poll.json()
            if status["status"] in ("done", "failed"):
                break
        time.sleep(1.0)
    assert status.get("status") == "done", status
    # The job lives on the broker and in its Redis record, not in an Ingress replica: losing every Ingress replica
    # loses nothing (a job the consumer was running through one goes back to the queue and runs again).
    result = status["result"]
    assert result["request_id"] == job_id and len(result["images"]) == 1
    sidecar = json.loads(s3_read(result["metadata"]))
    assert sidecar["images"] == result["images"] and sidecar["seed"] == result["seed"]
