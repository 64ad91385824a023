"""Per-request LoRAs and extra ControlNets over real HTTP on the tiny preset: real Ray on loopback, real files, the
session app's extensions (two Denoiser replicas; see tests/serve/conftest.py).

Every image is compared with the plain library on the same weights (a fresh process that never held a LoRA), so
"no leak" means: equal to what a fresh replica gives.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from PIL import Image, ImageDraw

from instantid_core.config import GenerateParams
from instantid_core.pipeline import InstantIDPipeline
from testkit.api import b64, png_pixels, post, s3_read

FAST = {"steps": 3, "width": 128, "height": 128}
STYLE = [{"name": "tiny-style", "scale": 0.8}]


def pixels(uri: str) -> np.ndarray:
    return png_pixels(s3_read(uri)).astype(int)


def generate(app, face: bytes, **params) -> tuple[np.ndarray, dict]:
    response = post(app, {"face_image": b64(face), "prompt": "a portrait", **FAST, **params})
    assert response.status_code == 200, response.text
    body = response.json()
    return pixels(body["images"][0]), body


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a - b).max()) <= 1  # PNG round trip of the same float image


def alone(library: InstantIDPipeline, face: bytes, seed: int, **params) -> np.ndarray:
    result = library.generate([face], GenerateParams(prompt="a portrait", **FAST, **params), seed=seed)
    return result.images[0].astype(int)


def test_lora_changes_the_image_and_leaks_into_nothing(served_app, astronaut_bytes, library):
    plain = alone(library, astronaut_bytes, 11)
    styled, body = generate(served_app, astronaut_bytes, seed=11, loras=STYLE)
    assert not same(styled, plain)
    assert same(styled, alone(library, astronaut_bytes, 11, loras=STYLE))
    zero, _ = generate(served_app, astronaut_bytes, seed=11, loras=[{"name": "tiny-style", "scale": 0.0}])
    assert same(zero, plain)
    # The next plain requests, until one lands on the replica that held the LoRA (either replica may take them).
    held, landed = body["denoiser_replica"], set()
    for _ in range(12):
        after, answer = generate(served_app, astronaut_bytes, seed=11)
        assert same(after, plain), answer["denoiser_replica"]
        landed.add(answer["denoiser_replica"])
        if held in landed:
            break
    assert held in landed, f"no plain request reached {held}: {landed}"


def test_kohya_and_diffusers_files_both_load_and_agree(served_app, astronaut_bytes, library):
    diffusers_file, _ = generate(served_app, astronaut_bytes, seed=12, loras=STYLE)
    kohya, _ = generate(served_app, astronaut_bytes, seed=12, loras=[{"name": "tiny-style-kohya", "scale": 0.8}])
    assert same(kohya, diffusers_file) and not same(kohya, alone(library, astronaut_bytes, 12))


def test_concurrent_requests_with_and_without_a_lora_each_equal_their_solo_images(served_app, astronaut_bytes,
                                                                                   library):
    cases = [(20, STYLE), (21, []), (22, STYLE), (23, [])]

    def call(case):
        seed, loras = case
        return generate(served_app, astronaut_bytes, seed=seed, loras=loras)

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(call, cases))
    for (seed, loras), (image, _) in zip(cases, results, strict=True):
        assert same(image, alone(library, astronaut_bytes, seed, loras=loras)), (seed, loras)


def test_each_control_changes_the_image_and_strength_zero_does_not(served_app, astronaut_bytes, library):
    plain = alone(library, astronaut_bytes, 13)
    for kind in ("canny", "depth"):
        controlled, _ = generate(served_app, astronaut_bytes, seed=13, controls=[{"type": kind, "strength": 0.5}])
        assert not same(controlled, plain), kind
        assert same(controlled, alone(library, astronaut_bytes, 13, controls=[{"type": kind, "strength": 0.5}]))
        off, _ = generate(served_app, astronaut_bytes, seed=13, controls=[{"type": kind, "strength": 0.0}])
        assert same(off, plain), kind
    # canny from a given image differs from canny from the face photo
    edges = io.BytesIO()
    Image.new("RGB", (128, 128), (255, 255, 255)).save(edges, "PNG")
    given, _ = generate(served_app, astronaut_bytes, seed=13,
                        controls=[{"type": "canny", "strength": 0.5, "image": b64(edges.getvalue())}])
    from_face, _ = generate(served_app, astronaut_bytes, seed=13, controls=[{"type": "canny", "strength": 0.5}])
    assert not same(given, from_face)


def test_lora_and_control_together_answer_200_with_a_different_image(served_app, astronaut_bytes, library):
    image, body = generate(served_app, astronaut_bytes, seed=14, loras=STYLE,
                           controls=[{"type": "canny", "strength": 0.5}])
    assert not same(image, alone(library, astronaut_bytes, 14))
    assert body["denoiser_replica"]


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_unknown_names_too_many_loras_and_unconfigured_controls_are_refused(served_app, keyed_app, api_keys,
                                                                            astronaut_bytes):
    face = {"face_image": b64(astronaut_bytes), "prompt": "x", **FAST}
    error = _error(post(served_app, {**face, "loras": [{"name": "no-such-style", "scale": 1}]}), 400)
    assert "no-such-style" in error["message"] and error["field"] == "loras[0].name"
    four = [{"name": f"style-{i}"} for i in range(4)]
    assert _error(post(served_app, {**face, "loras": four}), 400)["field"] == "loras"
    # The keyed app registers no pose ControlNet (the session app does).
    error = _error(post(keyed_app, {**face, "controls": [{"type": "pose", "strength": 0.5}]},
                        headers={"X-API-Key": api_keys["full"]}), 400)
    assert "pose" in error["message"] and error["field"] == "controls[0].type"
    assert post(served_app, face).status_code == 200  # still serving


def test_a_file_that_is_not_a_lora_answers_422_naming_it_and_the_replica_keeps_serving(served_app,
                                                                                      astronaut_bytes):
    face = {"face_image": b64(astronaut_bytes), "prompt": "x", **FAST}
    for name in ("not-a-lora", "sdxl-sized"):
        error = _error(post(served_app, {**face, "loras": [{"name": name, "scale": 1.0}]}), 422)
        assert name in error["message"] and error["code"] == "invalid_lora"
    assert post(served_app, {**face, "loras": STYLE}).status_code == 200
    assert post(served_app, face).status_code == 200


def test_pose_control_takes_a_supplied_pose_map(served_app, astronaut_bytes):
    pose = io.BytesIO()
    canvas = Image.new("RGB", (128, 128))
    ImageDraw.Draw(canvas).line([(64, 20), (64, 90), (30, 120)], fill=(255, 0, 0), width=6)
    canvas.save(pose, "PNG")
    plain, _ = generate(served_app, astronaut_bytes, seed=15)
    posed, _ = generate(served_app, astronaut_bytes, seed=15,
                        controls=[{"type": "pose", "strength": 0.8, "image": b64(pose.getvalue())}])
    assert not same(posed, plain)
    error = _error(post(served_app, {"face_image": b64(astronaut_bytes), "prompt": "x", **FAST,
                                       "controls": [{"type": "pose", "strength": 0.8}]}), 400)
    assert error["field"] == "controls[0].image"


def test_requests_for_one_lora_set_land_on_the_replica_that_loaded_it(served_app, astronaut_bytes):
    def replica(loras) -> str:
        return generate(served_app, astronaut_bytes, seed=16, loras=loras)[1]["denoiser_replica"]

    # Without a set, both replicas serve. Serve's router picks one of two at random among those it sees running; on a
    # loaded machine one may be briefly out (a health check missed), so ask until both have answered, within reason.
    plain: set[str] = set()
    for _ in range(40):
        plain.add(replica([]))
        if len(plain) == 2:
            break
    assert len(plain) == 2, plain
    first = replica(STYLE)
    # Serve learns which replica holds the set from the replica itself; give that report a few requests to arrive.
    streak = 0
    for _ in range(20):
        streak = streak + 1 if replica(STYLE) == first else 0
        if streak == 3:
            break
    assert streak == 3
    assert {replica(STYLE) for _ in range(6)} == {first}


def test_the_handle_takes_loras_and_controls_like_http(served_app, astronaut_bytes, library):
    from ray import serve

    from deployments.schemas import GenerateRequest

    handle = serve.get_app_handle("instantid")
    response = handle.generate.remote(GenerateRequest(
        face_image=b64(astronaut_bytes), prompt="a portrait", seed=17, loras=STYLE,
        controls=[{"type": "canny", "strength": 0.5}], **FAST)).result(timeout_s=180)
    expected = alone(library, astronaut_bytes, 17, loras=STYLE, controls=[{"type": "canny", "strength": 0.5}])
    assert same(pixels(response.images[0]), expected)
    assert not same(expected, alone(library, astronaut_bytes, 17))


def test_a_lora_preset_fills_the_steps_and_guidance_a_request_leaves_unset(served_app, astronaut_bytes):
    size = {"width": 128, "height": 128, "seed": 18}
    fast = post(served_app, {"face_image": b64(astronaut_bytes), "prompt": "a portrait", **size,
                               "loras": [{"name": "fast-style", "scale": 0.8}]})
    assert fast.status_code == 200, fast.text
    meta = json.loads(s3_read(fast.json()["metadata"]))
    assert (meta["params"]["steps"], meta["params"]["guidance"]) == (2, 1.0)
    explicit = post(served_app, {"face_image": b64(astronaut_bytes), "prompt": "a portrait", **size, "steps": 2,
                                   "guidance": 1.0, "loras": STYLE})  # the same file under its own name
    assert same(pixels(fast.json()["images"][0]), pixels(explicit.json()["images"][0]))
