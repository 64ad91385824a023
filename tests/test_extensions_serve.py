"""Per-request LoRAs and extra ControlNets over real HTTP on the tiny preset: real Ray on loopback, real files.

Every image is compared with the plain library on the same weights (a fresh process that never held a LoRA), so
"no leak" means: equal to what a fresh replica gives.
"""

from __future__ import annotations

import base64
import io
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from instantid_core.config import GenerateParams
from instantid_core.pipeline import InstantIDPipeline

from .fixtures_serve import deploy, small_stage_options

FAST = {"steps": 3, "width": 128, "height": 128}
STYLE = [{"name": "tiny-style", "scale": 0.8}]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pixels(uri: str) -> np.ndarray:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    data = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def post(app, body: dict) -> httpx.Response:
    return httpx.post(f"{app.url}/v1/generate", json=body, timeout=180)


def generate(app, face: bytes, **params) -> tuple[np.ndarray, dict]:
    response = post(app, {"face_image": b64(face), "prompt": "a portrait", **FAST, **params})
    assert response.status_code == 200, response.text
    body = response.json()
    return pixels(body["images"][0]), body


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a - b).max()) <= 1  # PNG round trip of the same float image


@pytest.fixture(scope="module")
def library(served_app) -> InstantIDPipeline:
    return InstantIDPipeline.from_root(served_app.tiny_dir)


def alone(library: InstantIDPipeline, face: bytes, seed: int, **params) -> np.ndarray:
    result = library.generate([face], GenerateParams(prompt="a portrait", **FAST, **params), seed=seed)
    return result.images[0].astype(int)


def test_lora_changes_the_image_and_leaks_into_nothing(served_app, astronaut_bytes, library):
    plain = alone(library, astronaut_bytes, 11)
    styled, _ = generate(served_app, astronaut_bytes, seed=11, loras=STYLE)
    assert not same(styled, plain)
    assert same(styled, alone(library, astronaut_bytes, 11, loras=STYLE))
    zero, _ = generate(served_app, astronaut_bytes, seed=11, loras=[{"name": "tiny-style", "scale": 0.0}])
    assert same(zero, plain)
    after, _ = generate(served_app, astronaut_bytes, seed=11)  # the next request, on the replica that held it
    assert same(after, plain)


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


def test_unknown_names_too_many_loras_and_unconfigured_controls_are_refused(served_app, astronaut_bytes):
    face = {"face_image": b64(astronaut_bytes), "prompt": "x", **FAST}
    error = _error(post(served_app, {**face, "loras": [{"name": "no-such-style", "scale": 1}]}), 400)
    assert "no-such-style" in error["message"] and error["field"] == "loras[0].name"
    four = [{"name": f"style-{i}"} for i in range(4)]
    assert _error(post(served_app, {**face, "loras": four}), 400)["field"] == "loras"
    error = _error(post(served_app, {**face, "controls": [{"type": "pose", "strength": 0.5}]}), 400)
    assert "pose" in error["message"] and error["field"] == "controls[0].type"
    assert post(served_app, face).status_code == 200  # still serving


# --- an app with two Denoiser replicas, the pose ControlNet and two files that are not LoRAs for this UNet ---------
@pytest.fixture(scope="module")
def extended_app(ray_instance, s3_server, serve_tiny_dir, tmp_path_factory):
    bad = tmp_path_factory.mktemp("bad-loras")
    save_file({"foo.weight": torch.zeros(2, 2)}, str(bad / "not-a-lora.safetensors"))
    # A LoRA for the real SDXL UNet (1280-wide attention) does not fit the tiny one.
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{key}.lora_A.weight": torch.zeros(4, 1280), f"{key}.lora_B.weight": torch.zeros(1280, 4)},
              str(bad / "sdxl-sized.safetensors"))
    bucket = f"ext-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    stages = small_stage_options(autoscaling_config={"min_replicas": 2, "max_replicas": 2})
    preset = {"source": str(Path(serve_tiny_dir) / "loras" / "tiny-style.safetensors"), "steps": 2, "guidance": 1.0}
    args = {"loras": {"broken": str(bad), "fast-style": preset},
            "controlnets": {"pose": str(Path(serve_tiny_dir) / "controlnets" / "pose")}}
    return deploy(ray_instance, "instantid-ext", "/ext", args, bucket, serve_tiny_dir, options=stages)


def test_a_file_that_is_not_a_lora_answers_422_naming_it_and_the_replica_keeps_serving(extended_app,
                                                                                      astronaut_bytes):
    face = {"face_image": b64(astronaut_bytes), "prompt": "x", **FAST}
    for name in ("not-a-lora", "sdxl-sized"):
        error = _error(post(extended_app, {**face, "loras": [{"name": name, "scale": 1.0}]}), 422)
        assert name in error["message"] and error["code"] == "invalid_lora"
    assert post(extended_app, {**face, "loras": STYLE}).status_code == 200
    assert post(extended_app, face).status_code == 200


def test_pose_control_takes_a_supplied_pose_map(extended_app, astronaut_bytes):
    pose = io.BytesIO()
    canvas = Image.new("RGB", (128, 128))
    ImageDraw.Draw(canvas).line([(64, 20), (64, 90), (30, 120)], fill=(255, 0, 0), width=6)
    canvas.save(pose, "PNG")
    plain, _ = generate(extended_app, astronaut_bytes, seed=15)
    posed, _ = generate(extended_app, astronaut_bytes, seed=15,
                        controls=[{"type": "pose", "strength": 0.8, "image": b64(pose.getvalue())}])
    assert not same(posed, plain)
    error = _error(post(extended_app, {"face_image": b64(astronaut_bytes), "prompt": "x", **FAST,
                                       "controls": [{"type": "pose", "strength": 0.8}]}), 400)
    assert error["field"] == "controls[0].image"


def test_requests_for_one_lora_set_land_on_the_replica_that_loaded_it(extended_app, astronaut_bytes):
    def replica(loras) -> str:
        return generate(extended_app, astronaut_bytes, seed=16, loras=loras)[1]["denoiser_replica"]

    plain = {replica([]) for _ in range(12)}
    assert len(plain) == 2  # without a set, both replicas serve
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


def test_a_lora_preset_fills_the_steps_and_guidance_a_request_leaves_unset(extended_app, astronaut_bytes):
    size = {"width": 128, "height": 128, "seed": 18}
    fast = post(extended_app, {"face_image": b64(astronaut_bytes), "prompt": "a portrait", **size,
                               "loras": [{"name": "fast-style", "scale": 0.8}]})
    assert fast.status_code == 200, fast.text
    bucket, key = fast.json()["metadata"].removeprefix("s3://").split("/", 1)
    import json

    meta = json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())
    assert (meta["params"]["steps"], meta["params"]["guidance"]) == (2, 1.0)
    explicit = post(extended_app, {"face_image": b64(astronaut_bytes), "prompt": "a portrait", **size, "steps": 2,
                                   "guidance": 1.0, "loras": STYLE})  # the same file under its own name
    assert same(pixels(fast.json()["images"][0]), pixels(explicit.json()["images"][0]))
