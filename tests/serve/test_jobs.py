"""Async jobs on Ray Serve's task queue, end to end: real Ray on loopback, a real Redis broker, real HTTP, outputs
in the S3 test server, webhooks to a receiver on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import boto3
import httpx
import pytest
import redis
from standardwebhooks.webhooks import Webhook

from testkit.api import FAST, b64
from testkit.net import wait_until
from testkit.serve import kill_replica, replica_actors
from testkit.webhooks import WebhookReceiver

SLOW = {"steps": 60, "width": 256, "height": 256}  # long enough to watch it run and stop it


def submit(app, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{app.url}/v1/jobs", json=body, timeout=60, **kwargs)


def status_of(app, job_id: str) -> dict:
    answer = httpx.get(f"{app.url}/v1/jobs/{job_id}", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_for(app, job_id: str, until=("done", "failed", "cancelled"), timeout_s: float = 180,
             seen: list | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = status_of(app, job_id)
        except httpx.HTTPError:  # the ingress may be restarting in a fault test
            time.sleep(0.5)
            continue
        if seen is not None:
            seen.append(status)
        if status["status"] in until:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not in {until} after {timeout_s}s: {status}")


def wait_running_with_progress(app, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = status_of(app, job_id)
        if status["status"] == "running" and status.get("progress"):
            return status
        assert status["status"] in ("queued", "running"), status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reported progress")


def objects_of(app, job_id: str) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=app.bucket, Prefix="out/")
    return sorted(obj["Key"] for obj in listing.get("Contents", []) if job_id in obj["Key"])


def test_job_reports_progress_and_ends_done_with_images(served_app, astronaut_bytes):
    submitted = submit(served_app, {"face_image": b64(astronaut_bytes), "prompt": "a portrait", "seed": 5, **SLOW})
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["status"] == "queued"
    job_id = submitted.json()["job_id"]
    seen: list[dict] = []
    final = wait_for(served_app, job_id, seen=seen)
    assert final["status"] == "done", final
    progress = [s["progress"] for s in seen if s["status"] == "running" and s.get("progress")]
    assert progress, "no progress seen while the job ran"
    assert all(p["steps"] == SLOW["steps"] and 1 <= p["step"] <= p["steps"] for p in progress)
    assert progress[0]["step"] < SLOW["steps"]  # seen mid-run, not only at the end
    assert [p["step"] for p in progress] == sorted(p["step"] for p in progress)
    result = final["result"]
    assert result["request_id"] == job_id and result["seed"] == 5 and len(result["images"]) == 1
    assert final["attempts"] == 1 and "progress" not in final
    keys = objects_of(served_app, job_id)
    assert len(keys) == 2 and any(key.endswith(".png") for key in keys), keys  # the image and its sidecar


def test_cancel_stops_a_running_job_at_its_next_step_and_a_queued_one_at_once(served_app, astronaut_bytes):
    face = b64(astronaut_bytes)
    # The consumer runs two jobs at a time: the third waits in the queue.
    running = [submit(served_app, {"face_image": face, "prompt": f"long {i}", **SLOW}).json()["job_id"]
               for i in range(2)]
    queued = submit(served_app, {"face_image": face, "prompt": "waits", **FAST}).json()["job_id"]
    assert status_of(served_app, queued)["status"] == "queued"
    answer = httpx.delete(f"{served_app.url}/v1/jobs/{queued}", timeout=30)
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled", answer.text

    before = wait_running_with_progress(served_app, running[0])
    answer = httpx.delete(f"{served_app.url}/v1/jobs/{running[0]}", timeout=30)
    assert answer.status_code in (200, 202), answer.text
    final = wait_for(served_app, running[0])
    assert final["status"] == "cancelled", final
    assert before["progress"]["step"] < SLOW["steps"]
    other = wait_for(served_app, running[1])
    assert other["status"] == "done", other  # its batch-mate went on
    assert wait_for(served_app, queued)["status"] == "cancelled"
    assert objects_of(served_app, running[0]) == [] and objects_of(served_app, queued) == []
    assert len(objects_of(served_app, running[1])) == 2
    # Cancelling a finished job leaves it as it is.
    answer = httpx.delete(f"{served_app.url}/v1/jobs/{running[1]}", timeout=30)
    assert answer.status_code == 200 and answer.json()["status"] == "done"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver([503])  # the first call fails: the consumer must retry
    yield server
    server.close()


def test_webhook_reaches_an_allowed_receiver_signed_and_retried(served_app, astronaut_bytes, receiver,
                                                                 webhook_secret):
    job_id = submit(served_app, {"face_image": b64(astronaut_bytes), "prompt": "hook", "webhook_url": receiver.url,
                                 **FAST}).json()["job_id"]
    assert wait_for(served_app, job_id)["status"] == "done"
    deadline = time.monotonic() + 30
    while len(receiver.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(receiver.calls) == 2, receiver.calls  # one 503, one retry
    headers, body, _ = receiver.calls[-1]
    sent = json.loads(body)
    assert sent["job_id"] == job_id and sent["status"] == "done" and sent["result"]["images"]
    # Standard Webhooks, checked by its own library; the app's secret is a plain string: the key is its bytes.
    assert Webhook(webhook_secret.encode()).verify(body, headers)["job_id"] == job_id
    assert headers["webhook-id"] == job_id
    deadline = time.monotonic() + 10
    while "webhook" not in (status := status_of(served_app, job_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status["webhook"] == {"delivered": True, "attempts": 2, "status_code": 200}


def test_webhook_redirect_is_not_followed(served_app, astronaut_bytes):
    server = WebhookReceiver([302])
    try:
        job_id = submit(served_app, {"face_image": b64(astronaut_bytes), "prompt": "hook", "webhook_url": server.url,
                                     **FAST}).json()["job_id"]
        assert wait_for(served_app, job_id)["status"] == "done"
        deadline = time.monotonic() + 10
        while "webhook" not in (status := status_of(served_app, job_id)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status["webhook"]["delivered"] is False and status["webhook"]["status_code"] == 302
        assert len(server.calls) == 1
    finally:
        server.close()


@pytest.mark.parametrize(("url", "code", "status"), [
    ("http://169.254.169.254/latest/meta-data", "webhook_not_allowed", 403),
    ("http://localhost:8080/hook", "webhook_not_allowed", 403),
    ("ftp://127.0.0.1/hook", "invalid_parameter", 400),
    ("http://user:pw@127.0.0.1/hook", "invalid_parameter", 400),
])
def test_webhook_to_a_host_not_allowed_is_refused_at_submit(served_app, astronaut_bytes, url, code, status):
    answer = submit(served_app, {"face_image": b64(astronaut_bytes), "prompt": "x", "webhook_url": url, **FAST})
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code and answer.json()["error"]["field"] == "webhook_url"


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), [
    ("GET", "/v1/jobs/abc$def", None, 400, "invalid_parameter"),
    ("DELETE", "/v1/jobs/abc$def", None, 400, "invalid_parameter"),
    ("GET", "/v1/jobs/" + "a" * 65, None, 400, "invalid_parameter"),
    ("GET", "/v1/jobs/0123456789abcdef", None, 404, "job_not_found"),
    ("DELETE", "/v1/jobs/0123456789abcdef", None, 404, "job_not_found"),
    ("POST", "/v1/jobs", {"prompt": "no face"}, 400, "invalid_parameter"),
    ("POST", "/v1/jobs", {"face_image": "x", "prompt": "x", "steps": 0}, 400, "invalid_parameter"),
    ("POST", "/v1/jobs", {"face_image": "x", "prompt": "x", "bogus": 1}, 400, "invalid_parameter"),
    ("POST", "/v1/jobs", {"face_image": "A" * (21 * 2**20), "prompt": "x"}, 413, "image_too_large"),
])
def test_jobs_api_bad_inputs_get_the_documented_4xx(served_app, method, path, body, status, code):
    answer = httpx.request(method, f"{served_app.url}{path}", json=body, timeout=60)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code


def queue_length(url: str, queue: str) -> int:
    import asyncio

    from ray.serve._private.broker import Broker  # what AsyncInferenceAutoscalingPolicy reads

    queues = asyncio.run(Broker(url).queues([queue]))
    return sum(q.get("messages", 0) for q in queues or [] if q.get("name") == queue)


@pytest.mark.slow
def test_twenty_jobs_on_one_consumer_all_end_done_as_the_queue_rises_and_falls(served_app, astronaut_bytes):
    jobs = served_app.config.args.jobs
    face = b64(astronaut_bytes)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: submit(served_app, {"face_image": face, "prompt": f"job {i}", "seed": i,
                                                              **FAST}), range(20)))
    assert all(a.status_code == 202 for a in answers)
    ids = [a.json()["job_id"] for a in answers]
    lengths = [queue_length(jobs.broker_url, jobs.queue_name)]
    finals = {}
    deadline = time.monotonic() + 240
    while len(finals) < len(ids) and time.monotonic() < deadline:
        lengths.append(queue_length(jobs.broker_url, jobs.queue_name))
        for job_id in ids:
            if job_id not in finals and (s := status_of(served_app, job_id))["status"] in ("done", "failed"):
                finals[job_id] = s
        time.sleep(0.2)
    assert [s["status"] for s in finals.values()] == ["done"] * 20, finals
    assert max(lengths) >= 10, lengths  # the queue held the jobs the one consumer had not taken yet
    assert queue_length(jobs.broker_url, jobs.queue_name) == 0
    assert all(len(objects_of(served_app, job_id)) == 2 for job_id in ids)


@pytest.mark.slow
def test_a_job_whose_consumer_is_killed_mid_run_ends_done_once_without_duplicates(served_app, astronaut_bytes):
    s3 = boto3.client("s3")
    s3.put_bucket_versioning(Bucket=served_app.bucket, VersioningConfiguration={"Status": "Enabled"})  # counts PUTs
    hook = WebhookReceiver([])
    try:
        job_id = submit(served_app, {"face_image": b64(astronaut_bytes), "prompt": "survive", "num_images": 2,
                                     "webhook_url": hook.url, **SLOW}).json()["job_id"]
        wait_running_with_progress(served_app, job_id)
        (replica,) = replica_actors("JobConsumer")
        kill_replica(replica)
        final = wait_for(served_app, job_id, timeout_s=240)
        # The run the dead consumer started goes on in the Ingress, which marks the job done once it has written
        # the outputs: no second run, each output written once.
        assert final["status"] == "done" and final["attempts"] == 1, final
        keys = objects_of(served_app, job_id)
        assert len(keys) == 3, keys  # two images and one sidecar
        versions = s3.list_object_versions(Bucket=served_app.bucket, Prefix="out/")["Versions"]
        assert sorted(v["Key"] for v in versions if job_id in v["Key"]) == keys  # one PUT each
        assert sorted(final["result"]["images"]) == sorted(f"s3://{served_app.bucket}/{k}" for k in keys
                                                           if not k.endswith(".json"))
        # The job's redelivery (visibility timeout 8 s) finds it done and sends the webhook the dead consumer
        # never sent, once.
        webhook = wait_until(lambda: status_of(served_app, job_id).get("webhook"), 120,
                             "the redelivery sent the webhook")
        assert webhook["delivered"] is True
        assert [json.loads(body)["job_id"] for _, body, _ in hook.calls] == [job_id], hook.calls
    finally:
        hook.close()


def test_a_rerun_of_a_job_whose_outputs_were_written_returns_them_without_writing_again(served_app, astronaut_bytes):
    """What a redelivery meets when the run before it wrote the outputs but could not record the job done (its
    consumer died with Redis away): the Ingress reads the run's sidecar back instead of generating again."""
    from ray import serve

    from deployments.schemas import GenerateRequest

    s3 = boto3.client("s3")
    s3.put_bucket_versioning(Bucket=served_app.bucket, VersioningConfiguration={"Status": "Enabled"})
    body = {"face_image": b64(astronaut_bytes), "prompt": "once", "seed": 11, **FAST}
    job_id = submit(served_app, body).json()["job_id"]
    first = wait_for(served_app, job_id)
    assert first["status"] == "done" and first["attempts"] == 1, first
    ingress = serve.get_app_handle(served_app.name)
    again = ingress.generate.remote(GenerateRequest(**body), request_id=job_id, job_id=job_id, attempt=2).result()
    assert (again.images, again.metadata, again.seed) == (first["result"]["images"], first["result"]["metadata"], 11)
    versions = s3.list_object_versions(Bucket=served_app.bucket, Prefix="out/")["Versions"]
    written = [v["Key"] for v in versions if job_id in v["Key"]]
    assert len(written) == 2 and len(set(written)) == 2, written  # one image and its sidecar, each written once
    assert status_of(served_app, job_id)["result"] == first["result"]  # the finished record is left as it was


def redis_values(client: redis.Redis, key: bytes) -> list[bytes]:
    kind = client.type(key)
    if kind == b"string":
        return [client.get(key)]
    if kind == b"hash":
        return list(client.hgetall(key).values())
    if kind == b"list":
        return client.lrange(key, 0, -1)
    if kind == b"set":
        return list(client.smembers(key))
    if kind == b"zset":
        return client.zrange(key, 0, -1)
    raise AssertionError(f"unexpected redis type {kind!r} of {key!r}")


def test_no_photo_bytes_remain_in_the_broker_or_the_store_once_jobs_end(served_app, astronaut_bytes):
    job_id = submit(served_app, {"face_image": b64(astronaut_bytes), "prompt": "forget me", **FAST}).json()["job_id"]
    assert wait_for(served_app, job_id)["status"] == "done"
    client = redis.Redis.from_url(served_app.config.args.jobs.broker_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # every job of this module has ended and been acknowledged
        if all(json.loads(client.hget(key, "record"))["status"] in ("done", "failed", "cancelled")
               for key in client.scan_iter("instantid:job:*")) and not client.hlen("unacked"):
            break
        time.sleep(0.5)
    encoded = b64(astronaut_bytes)
    needles = [encoded[i:i + 48].encode() for i in range(1000, len(encoded) - 48, len(encoded) // 7)]
    needles += [astronaut_bytes[i:i + 48] for i in range(1000, len(astronaut_bytes) - 48, len(astronaut_bytes) // 7)]
    for key in client.scan_iter("*"):
        for value in redis_values(client, key):
            assert not any(needle in value for needle in needles), f"photo bytes left in redis key {key!r}"
        if key.startswith(b"instantid:job:"):
            assert 0 < client.ttl(key) <= served_app.config.args.jobs.status_ttl_s  # records expire
    s3 = boto3.client("s3")
    # Everything the app wrote (its output_uri); not the inputs other tests uploaded to the bucket on purpose.
    written = served_app.config.args.output_uri.removeprefix(f"s3://{served_app.bucket}/").rstrip("/") + "/"
    for obj in s3.list_objects_v2(Bucket=served_app.bucket, Prefix=written).get("Contents", []):
        data = s3.get_object(Bucket=served_app.bucket, Key=obj["Key"])["Body"].read()
        assert not any(needle in data for needle in needles), f"photo bytes left in {obj['Key']}"


def test_handle_api_submits_polls_and_cancels_with_the_same_models(served_app, astronaut_bytes):
    from ray import serve

    from deployments.schemas import JobRequest, JobStatus

    handle = serve.get_app_handle("instantid")
    request = JobRequest(face_image=b64(astronaut_bytes), prompt="from python", seed=3, **FAST)
    submitted = handle.submit_job.remote(request).result()
    assert isinstance(submitted, JobStatus) and submitted.status == "queued"
    deadline = time.monotonic() + 120
    while (status := handle.job_status.remote(submitted.job_id).result()).status not in ("done", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status.status == "done" and status.result.seed == 3
    assert handle.cancel_job.remote(submitted.job_id).result().status == "done"


def scraped(name: str) -> list[float]:
    """The values of gauge `name` the served app's JobConsumer replicas export on Ray's metrics port."""
    import ray

    port = ray._private.worker._global_node.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{") and 'application="instantid"' in line and "JobConsumer" in line]


def test_the_backlog_gauges_show_queued_and_running_jobs_then_drain(served_app, astronaut_bytes):
    face = b64(astronaut_bytes)
    # The consumer runs two jobs at a time: of five long ones, three wait in the queue at first.
    ids = [submit(served_app, {"face_image": face, "prompt": f"gauge {i}", **SLOW}).json()["job_id"]
           for i in range(5)]
    peak: dict[str, float] = {}

    def busy_seen() -> bool:
        for name in ("ray_instantid_jobs_queued", "ray_instantid_jobs_running",
                     "ray_instantid_jobs_oldest_queued_age_seconds"):
            peak[name] = max([peak.get(name, 0.0), *scraped(name)])
        return (peak["ray_instantid_jobs_queued"] >= 1 and peak["ray_instantid_jobs_running"] >= 1
                and peak["ray_instantid_jobs_oldest_queued_age_seconds"] > 0)

    deadline = time.monotonic() + 90
    while not busy_seen():
        assert time.monotonic() < deadline, f"the backlog gauges never showed the queue: {peak}"
        time.sleep(0.5)
    assert peak["ray_instantid_jobs_queued"] <= 5
    for job_id in ids:
        httpx.delete(f"{served_app.url}/v1/jobs/{job_id}", timeout=30)
    for job_id in ids:
        wait_for(served_app, job_id)

    def drained() -> bool:
        queued, running = scraped("ray_instantid_jobs_queued"), scraped("ray_instantid_jobs_running")
        return bool(queued) and max(queued) == 0 and max(running) == 0

    deadline = time.monotonic() + 60
    while not drained():
        assert time.monotonic() < deadline, "the backlog gauges did not fall back to 0"
        time.sleep(0.5)


def redis_pid(url: str) -> int:
    return int(redis.Redis.from_url(url).info("server")["process_id"])


def test_with_redis_frozen_jobs_answer_a_typed_503_and_generate_200_and_a_running_job_ends_done(
        served_app, astronaut_bytes):
    """Last in this module: it freezes the session's Redis (up, but silent: what a partition looks like) for a few
    seconds under a running job."""
    import os
    import signal

    face = b64(astronaut_bytes)
    url = served_app.config.args.jobs.broker_url
    job_id = submit(served_app, {"face_image": face, "prompt": "through the fault", **SLOW}).json()["job_id"]
    wait_running_with_progress(served_app, job_id)
    pid = redis_pid(url)
    os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(2) as pool:
            generated = pool.submit(httpx.post, f"{served_app.url}/v1/generate",
                                    json={"face_image": face, "prompt": "sync", **FAST}, timeout=60)
            started = time.monotonic()
            refused = submit(served_app, {"face_image": face, "prompt": "while down", **FAST})
            took = time.monotonic() - started
            polled = httpx.get(f"{served_app.url}/v1/jobs/{job_id}", timeout=30)
            assert generated.result().status_code == 200, generated.result().text
    finally:
        os.kill(pid, signal.SIGCONT)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "jobs_unavailable" and int(refused.headers["retry-after"]) >= 1
    assert took < 3 * served_app.config.args.jobs.redis_timeout_s, took
    assert polled.status_code == 503 and polled.json()["error"]["code"] == "jobs_unavailable"
    final = wait_for(served_app, job_id, timeout_s=120)
    assert final["status"] == "done", final
    assert len(objects_of(served_app, job_id)) == 2
    assert submit(served_app, {"face_image": face, "prompt": "after", **FAST}).status_code == 202
