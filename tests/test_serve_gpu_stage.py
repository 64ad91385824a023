"""The served Denoiser under GPU conditions, proven on CPU: out of memory answers one request 503 `gpu_memory` and
the rest of its batch succeed; a request whose client went away stops at the next step and writes nothing."""

from __future__ import annotations

import base64
import uuid
from concurrent.futures import ThreadPoolExecutor

import boto3
import httpx
import pytest

from tests.fixtures_serve import deploy

FAST = {"steps": 2, "width": 64, "height": 64}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def tight_app(ray_instance, s3_server, serve_tiny_dir):
    """The app with a denoiser whose forward pass runs out of memory above one sample (the test-only setting),
    batching long enough for concurrent requests to meet."""
    bucket = f"oom-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    live = {"Denoiser": {"batch_wait_timeout_s": 1.0, "max_batch_size": 4}}
    app = deploy(ray_instance, "tight", "/tight", {"pipeline": {"oom_above_samples": 1}}, bucket, serve_tiny_dir,
                 user_config=live)
    yield app
    from ray import serve

    serve.delete("tight")


@pytest.mark.slow
def test_out_of_memory_splits_the_batch_the_request_too_large_alone_gets_503_and_the_rest_succeed(
        tight_app, astronaut_bytes):
    bodies = [{"face_image": b64(astronaut_bytes), "prompt": f"portrait {i}", "seed": i, **FAST} for i in range(3)]
    bodies.append({"face_image": b64(astronaut_bytes), "prompt": "two at once", "num_images": 2, **FAST})
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(
            lambda body: httpx.post(f"{tight_app.url}/v1/generate", json=body, timeout=300), bodies))
    assert [r.status_code for r in responses[:3]] == [200, 200, 200], [r.text for r in responses]
    assert max(r.json()["batch_size"] for r in responses[:3]) > 1  # they did meet in one batch, which then split
    too_large = responses[3]
    assert too_large.status_code == 503 and too_large.headers["retry-after"], too_large.text
    error = too_large.json()["error"]
    assert error["code"] == "gpu_memory" and "64x64 with 2 image(s)" in error["message"]
    # The replica is healthy and serves the next request.
    assert httpx.get(f"{tight_app.url}/readyz", timeout=60).status_code == 200
    again = httpx.post(f"{tight_app.url}/v1/generate", json=bodies[0], timeout=300)
    assert again.status_code == 200, again.text


@pytest.mark.slow
def test_a_dropped_client_stops_its_denoising_and_writes_nothing(served_app, astronaut_bytes):
    prefix = f"dropped-{uuid.uuid4().hex[:8]}"
    # Hundreds of seconds of denoising on this CPU at this size: far more than the short request below may wait.
    long = {"face_image": b64(astronaut_bytes), "prompt": "a long one", "steps": 100, "width": 1024, "height": 1024,
            "output": {"prefix": prefix}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served_app.url}/v1/generate", json=long, timeout=httpx.Timeout(120, read=4))
    # The connection is closed: Serve cancels the request, the Denoiser drops it at its next step. Had it run on,
    # the short request would wait behind it (one forward pass at a time) for far longer than this read timeout.
    short = httpx.post(f"{served_app.url}/v1/generate",
                       json={"face_image": b64(astronaut_bytes), "prompt": "a short one", **FAST}, timeout=150)
    assert short.status_code == 200, short.text
    listed = boto3.client("s3").list_objects_v2(Bucket=served_app.bucket, Prefix=f"out/{prefix}/")
    assert listed.get("KeyCount", 0) == 0, listed.get("Contents")
