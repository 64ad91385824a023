"""The serving app end to end: real Ray on loopback, real HTTP, outputs in the S3 test server."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import boto3
import httpx
import numpy as np
from PIL import Image

from instantid_core.config import GenerateParams
from testkit.api import b64, png_pixels, post, s3_read

FAST = {"steps": 3, "width": 128, "height": 128}


def test_generate_writes_images_and_sidecar_that_replays_in_the_library(served_app, astronaut_bytes, library):
    response = post(served_app, {"face_image": b64(astronaut_bytes), "prompt": "a watercolor portrait",
                                 "num_images": 2, "seed": 1234, **FAST})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["seed"] == 1234 and len(body["images"]) == 2
    assert all(uri.startswith(f"s3://{served_app.bucket}/out/") for uri in body["images"])
    assert {"face", "prompt", "denoise", "write", "total"} <= set(body["timings_ms"])
    assert set(body["cache_hits"]) == {"face", "prompt"}
    meta = json.loads(s3_read(body["metadata"]))
    assert meta["request_id"] == body["request_id"] and meta["seed"] == 1234
    assert meta["params"]["scheduler"] == "euler"  # the scheduler that ran, not "the default"

    replay = library.generate([astronaut_bytes], GenerateParams.model_validate(meta["params"]), seed=meta["seed"])
    for uri, expected in zip(body["images"], replay.images, strict=False):
        served = png_pixels(s3_read(uri))
        assert served.shape == expected.shape
        assert np.abs(served.astype(int) - expected.astype(int)).max() <= 1


def test_concurrent_clients_are_batched_and_each_equals_its_request_alone(served_app, astronaut_bytes, library):
    prompts = [f"portrait number {i}, {style}" for i, style in enumerate(["oil", "ink", "neon", "snow", "clay", "sun"])]

    def call(index: int) -> dict:
        response = post(served_app, {"face_image": b64(astronaut_bytes), "prompt": prompts[index],
                                     "seed": 100 + index, **FAST})
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(6)))
    assert max(result["batch_size"] for result in results) > 1
    for index, result in enumerate(results):
        alone = library.generate([astronaut_bytes], GenerateParams(prompt=prompts[index], **FAST), seed=100 + index)
        served = png_pixels(s3_read(result["images"][0]))
        assert np.abs(served.astype(int) - alone.images[0].astype(int)).max() <= 1


def test_multipart_upload_and_inline_images(served_app, astronaut_bytes):
    response = httpx.post(
        f"{served_app.url}/v1/generate", params={"inline": "true"}, timeout=120,
        files={"face_image": ("face.jpg", astronaut_bytes, "image/jpeg")},
        data={"params": json.dumps({"prompt": "a portrait", "seed": 3, **FAST, "output": {"format": "webp"}})},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["images"][0].endswith(".webp")
    assert Image.open(io.BytesIO(base64.b64decode(body["inline_images"][0]))).size == (128, 128)


def test_s3_input_from_an_allowed_bucket(served_app, astronaut_bytes):
    boto3.client("s3").put_object(Bucket=served_app.bucket, Key="inputs/face.jpg", Body=astronaut_bytes)
    response = post(served_app, {"face_image": f"s3://{served_app.bucket}/inputs/face.jpg", "prompt": "x", **FAST})
    assert response.status_code == 200, response.text


def _error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    return error


def test_error_table_each_code_from_a_real_request(served_app, astronaut_bytes):
    face = b64(astronaut_bytes)
    blank = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 200, 200)).save(blank, "PNG")

    error = _error(post(served_app, {"face_image": face, "prompt": "x", "steps": 0}), 400, "invalid_parameter")
    assert error["field"] == "steps"
    assert _error(post(served_app, {"face_image": face, "prompt": "x", "bogus": 1}), 400,
                  "invalid_parameter")["field"] == "bogus"
    assert _error(post(served_app, {"face_image": "%%%not base64%%%", "prompt": "x"}), 400,
                  "invalid_parameter")["field"].startswith("face_image")
    _error(httpx.post(f"{served_app.url}/v1/generate", content=b"{not json", timeout=30,
                      headers={"content-type": "application/json"}), 400, "invalid_parameter")
    _error(post(served_app, {"face_image": b64(b"just some text"), "prompt": "x", **FAST}), 415, "invalid_image")
    _error(post(served_app, {"face_image": b64(blank.getvalue()), "prompt": "x", **FAST}), 422, "no_face")
    _error(post(served_app, {"face_image": face, "prompt": "x", "face_index": 5, **FAST}), 422, "no_face")
    oversized = "A" * (served_app.config.ingress.max_body_bytes + 10)
    _error(httpx.post(f"{served_app.url}/v1/generate", content=oversized, timeout=60,
                      headers={"content-type": "application/json"}), 413, "image_too_large")
    # A chunked multipart upload declares no length: it is counted as it streams and refused past the limit.
    _error(httpx.post(f"{served_app.url}/v1/generate", content=chunked_upload(served_app.config.ingress.max_body_bytes),
                      headers={"content-type": "multipart/form-data; boundary=xyz"}, timeout=60),
           413, "image_too_large")
    assert _error(post(served_app, {"face_image": "s3://some-other-bucket/face.jpg", "prompt": "x"}), 403,
                  "input_not_allowed")["field"] == "face_image[0]"
    _error(post(served_app, {"face_image": f"s3://{served_app.bucket}/missing.jpg", "prompt": "x"}), 404,
           "input_not_found")
    _error(post(served_app, {"face_image": "https://example.com/face.jpg", "prompt": "x"}), 403,
           "input_not_allowed")
    # The app still serves afterwards.
    assert post(served_app, {"face_image": face, "prompt": "x", **FAST}).status_code == 200


def chunked_upload(limit: int):
    """A multipart body with one file part a megabyte over `limit`, sent in chunks with no Content-Length."""
    yield (b'--xyz\r\nContent-Disposition: form-data; name="face_image"; filename="f.jpg"\r\n'
           b"Content-Type: image/jpeg\r\n\r\n")
    for _ in range(limit // 2**20 + 1):
        yield b"\0" * 2**20
    yield b"\r\n--xyz--\r\n"


def test_health_readiness_metrics_and_openapi(served_app, astronaut_bytes):
    assert httpx.get(f"{served_app.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{served_app.url}/readyz").json()
    # served_app has the jobs API on, so the JobConsumer's health is part of readiness too.
    assert ready["ready"] and set(ready["stages"]) == {"face", "prompt", "denoiser", "writer", "safety", "jobs"}
    for face in (astronaut_bytes, astronaut_bytes):  # a miss or a hit, then surely a hit
        assert post(served_app, {"face_image": b64(face), "prompt": "metrics", **FAST}).status_code == 200
    blank = io.BytesIO()
    Image.new("RGB", (64, 64)).save(blank, "PNG")
    assert post(served_app, {"face_image": b64(blank.getvalue()), "prompt": "x", **FAST}).status_code == 422
    # No Prometheus text on the public port: each stage's metrics are on Ray's metrics port (tests/test_operator.py).
    assert httpx.get(f"{served_app.url}/metrics").status_code == 404
    schema = httpx.get(f"{served_app.url}/openapi.json").json()
    assert "/v1/generate" in schema["paths"] and "GenerateRequest" in schema["components"]["schemas"]
    dangling = {ref for ref in refs_in(schema) if ref.removeprefix("#/components/schemas/")
                not in schema["components"]["schemas"]}
    assert not dangling, f"the OpenAPI schema refers to undefined schemas: {dangling}"


def refs_in(node) -> list[str]:
    """Every `$ref` string anywhere in a JSON document."""
    if isinstance(node, dict):
        return [ref for key, value in node.items() for ref in ([value] if key == "$ref" else refs_in(value))]
    if isinstance(node, list):
        return [ref for item in node for ref in refs_in(item)]
    return []


def test_async_job_submit_and_poll(served_app, astronaut_bytes):
    import time

    submitted = httpx.post(f"{served_app.url}/v1/jobs", json={"face_image": b64(astronaut_bytes), "prompt": "x",
                                                             **FAST}, timeout=30)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = httpx.get(f"{served_app.url}/v1/jobs/{job_id}", timeout=30).json()
        if status["status"] in ("done", "failed"):
            break
        time.sleep(0.3)
    assert status["status"] == "done", status
    assert s3_read(status["result"]["images"][0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert httpx.get(f"{served_app.url}/v1/jobs/{'0' * 32}").status_code == 404


def test_handle_call_from_the_driver_returns_the_same_pydantic_response(served_app, astronaut_bytes):
    from ray import serve

    from deployments.schemas import GenerateRequest, GenerateResponse

    handle = serve.get_app_handle("instantid")
    response = handle.generate.remote(GenerateRequest(face_image=b64(astronaut_bytes), prompt="x", seed=5,
                                                      **FAST)).result(timeout_s=120)
    assert isinstance(response, GenerateResponse) and response.seed == 5 and len(response.images) == 1
