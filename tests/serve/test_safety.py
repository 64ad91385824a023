"""Issue 24's safety stage through real HTTP on the tiny preset: `served_app` checks in block mode and lets a request
turn the checker off, `keyed_app` blurs. An output the tiny checker flags is made by inpainting its pattern: the
pattern is the init photo and only its middle is regenerated (inpainting keeps every pixel outside the mask)."""

from __future__ import annotations

import base64
import json
import time
import uuid

import httpx
import numpy as np
from PIL import Image

from instantid_core.safety import DISABLED_BY_REQUEST, blur
from instantid_core.tiny.safety import flagged_pattern
from testkit.api import FAST, b64, png_bytes, png_pixels, post, s3_keys, s3_read

SIDE = 64


def _flagged_request(astronaut_bytes: bytes, **extra) -> dict:
    """An inpainting request whose output is the tiny checker's pattern but for a 16 x 16 middle (measured: the
    checker flags it; tests/unit/test_safety.py)."""
    pattern = Image.fromarray(flagged_pattern(SIDE))
    mask = Image.new("L", (SIDE, SIDE), 0)
    mask.paste(255, (24, 24, 40, 40))
    return {"face_image": b64(astronaut_bytes), "init_image": b64(png_bytes(pattern)),
            "mask_image": b64(png_bytes(mask)), "prompt": "x", "steps": 1, "seed": 5, **extra}


def _metric(name: str, app: str) -> float:
    """The sum of counter `name` over the replicas of `app`, as Ray's metrics port exports it."""
    import ray

    port = ray._private.worker._global_node.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and f'application="{app}"' in line)


def test_block_mode_writes_nothing_of_a_flagged_request_and_answers_422_naming_the_images(served_app,
                                                                                          astronaut_bytes):
    flagged_before = _metric("ray_instantid_safety_flagged_images_total", served_app.name)
    checked_before = _metric("ray_instantid_safety_checked_images_total", served_app.name)
    request_id = f"unsafe-{uuid.uuid4().hex[:8]}"
    response = post(served_app, _flagged_request(astronaut_bytes, num_images=2),
                    headers={"x-request-id": request_id})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "unsafe_content" and error["images"] == [0, 1]
    assert not [key for key in s3_keys(served_app.bucket) if request_id in key]  # no image, no sidecar
    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    while (_metric("ray_instantid_safety_flagged_images_total", served_app.name) < flagged_before + 2
           or _metric("ray_instantid_safety_checked_images_total", served_app.name) < checked_before + 2):
        assert time.monotonic() < deadline, "the flag and checked counters never counted the two images"
        time.sleep(0.5)


def test_ordinary_outputs_are_checked_unflagged_and_say_so_in_the_response_and_sidecar(served_app,
                                                                                      astronaut_bytes):
    response = post(served_app, {"face_image": b64(astronaut_bytes), "prompt": "a portrait", **FAST, "seed": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = {"checked": True, "mode": "block", "flagged": [False], "withheld": []}
    assert body["safety"] == expected and len(body["images"]) == 1
    assert json.loads(s3_read(body["metadata"]))["safety"] == expected
    options = httpx.get(f"{served_app.url}/v1/options", timeout=30).json()  # what the playground offers
    assert options["safety"] == {"mode": "block", "allow_request_disable": True}


def test_a_request_may_turn_the_checker_off_only_where_the_operator_allows_it(served_app, keyed_app, api_keys,
                                                                             astronaut_bytes):
    response = post(served_app, _flagged_request(astronaut_bytes, safety_checker=False))
    assert response.status_code == 200, response.text
    body = response.json()
    unchecked = {"checked": False, "withheld": [], "reason": DISABLED_BY_REQUEST}  # no `flagged`: nothing looked
    assert body["safety"] == unchecked and len(body["images"]) == 1
    assert json.loads(s3_read(body["metadata"]))["safety"] == unchecked
    refused = post(keyed_app, _flagged_request(astronaut_bytes, safety_checker=False),
                   headers={"Authorization": f"Bearer {api_keys['full']}"})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["field"] == "safety_checker"


def test_blur_mode_writes_the_flagged_image_blurred(served_app, keyed_app, api_keys, astronaut_bytes):
    # The same request unchecked on the block app (allowed there) is the image the blur app's checker flags.
    plain = post(served_app, _flagged_request(astronaut_bytes, safety_checker=False))
    assert plain.status_code == 200, plain.text
    unflagged = png_pixels(s3_read(plain.json()["images"][0]))
    response = post(keyed_app, _flagged_request(astronaut_bytes), params={"inline": "true"},
                    headers={"Authorization": f"Bearer {api_keys['full']}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["safety"] == {"checked": True, "mode": "blur", "flagged": [True], "withheld": []}
    written = png_pixels(s3_read(body["images"][0]))
    assert np.array_equal(png_pixels(base64.b64decode(body["inline_images"][0])), written)  # inline: blurred too
    assert json.loads(s3_read(body["metadata"]))["safety"]["flagged"] == [True]
    assert written.shape == unflagged.shape == (SIDE, SIDE, 3)
    assert np.abs(written.astype(int) - unflagged).mean() > 30  # the checkerboard is gone ...
    assert np.abs(written.astype(int) - blur(unflagged)).max() <= 2  # ... blurred, not replaced



def test_an_async_job_of_flagged_images_fails_unsafe_content_naming_them(served_app, astronaut_bytes):
    submitted = httpx.post(f"{served_app.url}/v1/jobs", json=_flagged_request(astronaut_bytes), timeout=60)
    assert submitted.status_code == 202, submitted.text
    job_id, deadline = submitted.json()["job_id"], time.monotonic() + 120
    while (status := httpx.get(f"{served_app.url}/v1/jobs/{job_id}", timeout=30).json())["status"] not in (
            "done", "failed"):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert status["status"] == "failed", status
    assert status["error"]["code"] == "unsafe_content" and status["error"]["images"] == [0]
