"""API keys, per-key rate limits, overload (503 + Retry-After), stage timeouts (504), a request larger than a
batch, and URL inputs from allow-listed hosts, each produced by real requests to the session's keyed app
(tests/serve/conftest.py), and a grep proving keys and S3 credentials never reach logs, error bodies, sidecars or
metrics."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import pytest
import ray

from testkit.api import FAST, b64
from testkit.net import wait_until
from testkit.serve import ongoing_requests, replica_actors

SLOW = {"steps": 40, "width": 512, "height": 512}


@pytest.fixture(scope="module")
def keys(api_keys):
    """FULL (generate, jobs), JOBS (jobs only), LOAD (the overload test's own rate bucket: its burst must not meet a
    429), UNKNOWN (in no file)."""
    return {"FULL": api_keys["full"], "JOBS": api_keys["poller"], "LOAD": api_keys["load"],
            "UNKNOWN": api_keys["unknown"]}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error_of(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


def test_keys_guard_the_api_and_health_stays_open(keyed_app, keys, astronaut_bytes):
    body = {"face_image": b64(astronaut_bytes), "prompt": "x", **FAST}
    url = keyed_app.url
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert httpx.get(f"{url}{path}", timeout=30).status_code == 200, path

    missing = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
    assert "API key" in error_of(missing, 401, "unauthorized")["message"]
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    error_of(httpx.post(f"{url}/v1/generate", json=body, headers=auth(keys["UNKNOWN"]), timeout=60), 401,
             "unauthorized")
    error_of(httpx.post(f"{url}/v1/generate", json=body, headers={"Authorization": "Basic " + keys["FULL"]},
                        timeout=60), 401, "unauthorized")
    forbidden = httpx.post(f"{url}/v1/generate", json=body, headers=auth(keys["JOBS"]), timeout=60)
    assert "'poller' may not use 'generate'" in error_of(forbidden, 403, "forbidden")["message"]

    ok = httpx.post(f"{url}/v1/generate", json=body, headers=auth(keys["FULL"]), timeout=60)
    assert ok.status_code == 200, ok.text
    via_header = httpx.post(f"{url}/v1/generate", json=body, headers={"X-API-Key": keys["FULL"]}, timeout=60)
    assert via_header.status_code == 200, via_header.text
    assert httpx.get(f"{url}/v1/jobs/0123abcd", headers=auth(keys["JOBS"]), timeout=30).status_code == 404


def test_a_key_over_its_rate_gets_429_with_retry_after(keyed_app, keys):
    burst = keyed_app.config.ingress.access.rate_limit_burst
    answers = [httpx.get(f"{keyed_app.url}/v1/jobs/0123abcd", headers=auth(keys["JOBS"]), timeout=30)
               for _ in range(burst + 3)]
    codes = [a.status_code for a in answers]
    assert codes[: burst - 2].count(404) == burst - 2, codes  # the burst passes (a request may refill a token)
    limited = [a for a in answers if a.status_code == 429]
    assert limited, codes
    assert 1 <= int(limited[0].headers["Retry-After"]) <= 2
    assert "poller" in error_of(limited[0], 429, "rate_limited")["message"]
    # Another key has its own bucket.
    assert httpx.get(f"{keyed_app.url}/v1/jobs/0123abcd", headers=auth(keys["FULL"]), timeout=30).status_code == 404


def test_overload_answers_503_with_retry_after_and_the_stage_timeout_504(keyed_app, keys, astronaut_bytes):
    body = {"face_image": b64(astronaut_bytes), "prompt": "x", "steps": 8, "width": 128, "height": 128}
    blocker = {**body, "steps": 20, "width": 256, "height": 256}  # ~1.5 s in the denoiser, under the 4 s timeout

    def send(payload: dict) -> httpx.Response:
        return httpx.post(f"{keyed_app.url}/v1/generate", json=payload, headers=auth(keys["LOAD"]), timeout=60)

    def ongoing(deployment: str) -> int:
        return sum(ongoing_requests(name) for name in replica_actors(deployment, app=keyed_app.name))

    # Warm the face and prompt caches, so the burst reaches the denoiser at once rather than paced by face analysis.
    # The blocker's first (cold) run may pass the 4 s stage timeout on a loaded machine: its face and prompt are
    # cached either way, and the denoiser is idle again before the burst.
    assert send(body).is_success and send(blocker).status_code in (200, 504)
    wait_until(lambda: not ongoing("Denoiser"), 60, "the denoiser is idle after the warm-up", 0.1)
    with ThreadPoolExecutor(10) as pool:
        # The denoiser runs one request and queues one. Serve counts a request as queued once its inputs (the face
        # and prompt stages) are ready, so: the blocker runs, a second request waits in the queue (both in the
        # Ingress, only one in the denoiser, none left in the face and prompt stages), then a burst finds it full.
        busy = pool.submit(send, {**blocker, "seed": 99})
        wait_until(lambda: busy.done() or ongoing("Denoiser"), 60, "the blocker runs in the denoiser", 0.05)
        queued = pool.submit(send, {**body, "seed": 98})
        wait_until(lambda: busy.done() or (ongoing("Ingress") == 2 and not ongoing("FaceAnalysis")
                                           and not ongoing("PromptEncoder")), 60, "a request waits for the denoiser",
                   0.05)
        answers = list(pool.map(lambda i: send({**body, "seed": i}), range(8)))
        # Done, or past the 4 s stage timeout on a heavily loaded machine: they filled the denoiser either way.
        assert {busy.result().status_code, queued.result().status_code} <= {200, 504}
    codes = sorted(a.status_code for a in answers)
    assert set(codes) <= {200, 503} and 503 in codes, codes
    overloaded = next(a for a in answers if a.status_code == 503)
    assert error_of(overloaded, 503, "overloaded") and int(overloaded.headers["Retry-After"]) >= 1

    # The burst spent LOAD's rate bucket, so from here a 429 is waited out as its Retry-After says (a client would)
    # rather than taken for the answer under test.
    def send_within_rate(payload: dict) -> httpx.Response:
        answer = send(payload)
        while answer.status_code == 429:
            time.sleep(int(answer.headers["Retry-After"]))
            answer = send(payload)
        return answer

    # Every answer is in, so nothing is left in the denoiser; a request that gets in now meets an idle one.
    wait_until(lambda: send_within_rate(body).status_code == 200, 60, "a request answered 200 after the burst")
    slow = send_within_rate({**body, **SLOW})
    assert "4s" in error_of(slow, 504, "stage_timeout")["message"]
    # The app serves again once the slow request has left the denoiser.
    wait_until(lambda: send_within_rate(body).status_code == 200, 60, "a request answered 200 after the stage timeout",
               interval_s=1)


def test_keys_and_credentials_never_reach_logs_bodies_sidecars_or_metrics(keyed_app, keys, astronaut_bytes):
    body = {"face_image": b64(astronaut_bytes), "prompt": "x", **FAST}
    seen: list[str] = []
    request_id = f"leak-check-{time.monotonic_ns()}"  # named, so the wait below knows which log line to look for
    for headers in ({**auth(keys["FULL"]), "x-request-id": request_id}, auth(keys["UNKNOWN"]),
                    {"X-API-Key": keys["JOBS"]}, {"X-API-Key": keys["UNKNOWN"]}):
        response = httpx.post(f"{keyed_app.url}/v1/generate", json=body, headers=headers, timeout=60)
        seen.append(response.text)
        if response.status_code == 200:
            meta = response.json()["metadata"]
            bucket, key = meta.removeprefix("s3://").split("/", 1)
            seen.append(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode())
    metrics_port = ray._private.worker._global_node.metrics_export_port  # Ray's port: where the app's metrics are
    seen.append(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text)
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())

    def ingress_logged_the_requests() -> list[Path]:  # replica log lines are flushed asynchronously
        return [p for p in (logs_dir / "serve").glob("replica_keyed_Ingress_*.log")
                if request_id.encode() in p.read_bytes()]

    wait_until(ingress_logged_the_requests, 30, f"the keyed app's Ingress log names {request_id}")
    log_files = [p for p in logs_dir.rglob("*") if p.is_file()]
    assert any("Ingress" in p.name for p in log_files), "no ingress replica log found to check"
    secrets_to_find = {"API key": [keys["FULL"], keys["UNKNOWN"], keys["JOBS"]],
                       "S3 secret": [os.environ["AWS_SECRET_ACCESS_KEY"]]}  # the S3 test server's (fixtures_s3)
    for what, values in secrets_to_find.items():
        for value in values:
            assert not any(value in text for text in seen), f"{what} in a response, sidecar or metrics"
            leaked = [str(p) for p in log_files if value.encode() in p.read_bytes()]
            assert not leaked, f"{what} found in {leaked}"
    assert json.loads(seen[0])["images"]  # the check above read real responses


def test_a_request_with_more_images_than_a_batch_runs_as_a_batch_of_its_own(keyed_app, keys, astronaut_bytes):
    body = {"face_image": b64(astronaut_bytes), "prompt": "x", "num_images": 3, **FAST}  # max_batch_size is 1
    answer = httpx.post(f"{keyed_app.url}/v1/generate", json=body, headers=auth(keys["FULL"]), timeout=120)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 3 and answer.json()["batch_size"] == 3


@pytest.fixture
def image_host(astronaut_bytes):
    """An HTTP server on 127.0.0.1 with /face.jpg, a redirect at /moved, and 404 for anything else."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/face.jpg":
                self.send_response(200)
                self.send_header("Content-Length", str(len(astronaut_bytes)))
                self.end_headers()
                self.wfile.write(astronaut_bytes)
            elif self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
            else:
                self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_inputs_only_from_allowed_hosts_and_never_through_a_redirect(keyed_app, keys, image_host):
    def generate(url: str) -> httpx.Response:
        return httpx.post(f"{keyed_app.url}/v1/generate", json={"face_image": url, "prompt": "x", **FAST},
                          headers=auth(keys["FULL"]), timeout=120)

    assert generate(f"http://{image_host}/face.jpg").status_code == 200
    port = image_host.rsplit(":", 1)[1]
    assert error_of(generate(f"http://localhost:{port}/face.jpg"), 403, "input_not_allowed")["field"] == \
        "face_image[0]"
    assert "redirect" in error_of(generate(f"http://{image_host}/moved"), 403, "input_not_allowed")["message"]
    error_of(generate(f"http://{image_host}/missing.jpg"), 404, "input_not_found")


def test_a_key_added_to_the_mounted_file_works_and_a_removed_one_is_refused_without_a_restart(keyed_app):
    import secrets

    import yaml

    (ingress,) = [d for d in keyed_app.config.deployments if d.name == "Ingress"]
    path = Path(ingress.user_config["access"]["api_keys_file"])
    original = path.read_text()
    replicas = replica_actors("Ingress", app=keyed_app.name)
    rotated = f"rotated-{secrets.token_hex(16)}"

    def accepted() -> bool:
        # A cheap keyed route: past the key check the keyed app (no jobs API) answers 404 job_not_found (or 429 once
        # this key's burst is spent); a key it does not know answers 401.
        answer = httpx.get(f"{keyed_app.url}/v1/jobs/0123abcd", headers=auth(rotated), timeout=30)
        assert answer.status_code in (401, 404, 429), answer.text
        return answer.status_code != 401

    assert not accepted()
    try:
        entries = yaml.safe_load(original)["keys"]
        path.write_text(yaml.safe_dump({"keys": [*entries, {"name": "rotated", "key": rotated}]}))
        wait_until(accepted, 15, "the added key is accepted", 0.5)
        path.write_text(original)
        wait_until(lambda: not accepted(), 15, "the removed key is refused", 0.5)
    finally:
        path.write_text(original)
    assert replica_actors("Ingress", app=keyed_app.name) == replicas  # no replica restarted


def test_readyz_answers_from_health_state_while_the_denoiser_is_saturated(keyed_app, keys, astronaut_bytes):
    """The keyed Denoiser takes one request and queues one: with both taken, a readiness probe that went through
    its request queue (a model pass per probe) would be refused; readiness comes from Serve's health state."""
    body = {"face_image": b64(astronaut_bytes), "prompt": "ready", "steps": 20, "width": 256, "height": 256}

    def send(payload: dict) -> httpx.Response:
        return httpx.post(f"{keyed_app.url}/v1/generate", json=payload, headers=auth(keys["FULL"]), timeout=60)

    def ongoing(deployment: str) -> int:
        return sum(ongoing_requests(name) for name in replica_actors(deployment, app=keyed_app.name))

    # Face and prompt cached: the next ones go straight to the denoiser. This first (cold) run may pass the 4 s stage
    # timeout on a loaded machine; they are cached either way, and the denoiser is idle again before the test.
    assert send(body).status_code in (200, 504)
    wait_until(lambda: not ongoing("Denoiser"), 60, "the denoiser is idle after the warm-up", 0.1)
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(send, {**body, "seed": 1})
        wait_until(lambda: busy.done() or ongoing("Denoiser"), 60, "the first request runs in the denoiser", 0.05)
        queued = pool.submit(send, {**body, "seed": 2})
        wait_until(lambda: busy.done() or (ongoing("Ingress") == 2 and not ongoing("FaceAnalysis")
                                           and not ongoing("PromptEncoder")), 60, "a request waits for the denoiser",
                   0.05)
        saturated = not busy.done()
        started = time.monotonic()
        ready = httpx.get(f"{keyed_app.url}/readyz", timeout=30)
        took = time.monotonic() - started
        # Both are answered: done, or on a heavily loaded machine past the keyed app's 4 s stage timeout. Either
        # way they held the denoiser while the probe ran, which is what this test needs of them.
        assert {busy.result().status_code, queued.result().status_code} <= {200, 504}
    assert saturated, "the denoiser finished before the probe: the test proved nothing"
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"ready": True,
                            "stages": dict.fromkeys(("face", "prompt", "denoiser", "writer", "safety"), True)}
    assert took < 1.0, took  # no model pass, no queue
