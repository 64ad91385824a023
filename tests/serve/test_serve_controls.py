"""Issue 12's controls over HTTP and the handle: inpainting the face into a photo, weighted prompts, styles, LCM
presets in the sidecar, and their bad inputs with the right codes (real Ray on loopback, the tiny preset)."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
from PIL import Image

from instantid_core.img2img import face_box_mask_image, prepare_init, seam_alpha
from testkit.api import b64, png_pixels, post, s3_read

FAST = {"steps": 3, "width": 128, "height": 128}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _error(response: httpx.Response, status: int, field: str | None) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field, response.text


def test_inpaint_face_over_http_keeps_the_photo_outside_the_face(served_app, astronaut_bytes):
    scene = Image.open(io.BytesIO(astronaut_bytes)).convert("RGB").resize((160, 160))
    response = post(served_app, {"face_image": b64(astronaut_bytes), "init_image": b64(_png(scene)),
                                 "inpaint_face": True, "prompt": "a (portrait:1.2)", "steps": 3, "seed": 2},
                    params={"inline": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (160, 160)  # the init photo's size
    image = png_pixels(base64.b64decode(body["inline_images"][0]))
    meta = json.loads(s3_read(body["metadata"]))
    assert meta["params"]["inpaint_face"] and meta["params"]["steps"] == 3
    assert meta["inputs"]["init_image_sha256"]
    from instantid_core.config import PipelineSettings
    from instantid_core.face import FaceAnalyzer  # where the face is: the tiny pack, as the app sees it

    box = FaceAnalyzer(served_app.tiny_dir / "antelopev2", PipelineSettings()).analyze(scene).bbox
    outside = seam_alpha(face_box_mask_image(tuple(float(v) for v in box), (160, 160))) == 0
    assert outside.mean() > 0.3 and np.array_equal(image[outside], prepare_init(scene, (160, 160))[outside])


def test_multipart_mask_and_the_handle_take_the_same_fields(served_app, astronaut_bytes):
    scene = _png(Image.open(io.BytesIO(astronaut_bytes)).convert("RGB").resize((128, 128)))
    mask = Image.new("L", (64, 64), 0)  # half the size of the init photo: resized to it
    mask.paste(255, (16, 16, 48, 48))
    files = [("face_image", ("face.jpg", astronaut_bytes)), ("init_image", ("scene.png", scene)),
             ("mask_image", ("mask.png", _png(mask)))]
    response = httpx.post(f"{served_app.url}/v1/generate", params={"inline": "true"}, timeout=120, files=files,
                          data={"params": json.dumps({"prompt": "x", "steps": 2, "seed": 1, "strength": 0.7})})
    assert response.status_code == 200, response.text
    image = png_pixels(base64.b64decode(response.json()["inline_images"][0]))
    assert np.array_equal(image[:8], png_pixels(scene)[:8])  # far from the mask: the photo

    from ray import serve

    from deployments.schemas import GenerateRequest

    handle = serve.get_app_handle("instantid")
    result = handle.generate.remote(GenerateRequest(face_image=b64(astronaut_bytes), init_image=b64(scene),
                                                    mask_image=b64(_png(mask)), prompt="x", steps=2, seed=1,
                                                    strength=0.7)).result(timeout_s=120)
    assert np.array_equal(png_pixels(s3_read(result.images[0])), image)


def test_bad_control_inputs_get_their_codes_and_fields(served_app, astronaut_bytes):
    face = b64(astronaut_bytes)
    grey = b64(_png(Image.new("RGB", (128, 128), (128, 128, 128))))
    _error(post(served_app, {"face_image": face, "init_image": face, "strength": 1.5, "prompt": "x"}), 400,
           "strength")
    _error(post(served_app, {"face_image": face, "mask_image": grey, "prompt": "x"}), 400, "mask_image")
    _error(post(served_app, {"face_image": face, "init_image": b64(b"not an image"), "prompt": "x"}), 415,
           "init_image")
    _error(post(served_app, {"face_image": face, "init_image": grey, "inpaint_face": True, "prompt": "x", **FAST}),
           422, "init_image")
    _error(post(served_app, {"face_image": face, "prompt": "x", "style": "Cubism-9000", **FAST}), 400, "style")
    _error(post(served_app, {"face_image": face, "prompt": "x", "identity_start": 0.6, "identity_end": 0.5}), 400,
           "identity_end")
    # read literally, never a 500; the demo's "(No style)"
    ok = post(served_app, {"face_image": face, "prompt": "a (smiling man [x", "style": "(No style)", **FAST})
    assert ok.status_code == 200, ok.text
    meta = json.loads(s3_read(ok.json()["metadata"]))
    assert meta["params"]["style"] == "No style"


def test_a_pose_preset_over_http_places_the_face_and_bad_placements_name_their_field(served_app, astronaut_bytes):
    body = {"face_image": b64(astronaut_bytes), "prompt": "x", "seed": 4, **FAST}
    placed = post(served_app, {**body, "pose": {"preset": "profile_right", "box": [16, 16, 112, 112]}})
    assert placed.status_code == 200, placed.text
    meta = json.loads(s3_read(placed.json()["metadata"]))
    assert meta["params"]["pose"] == {"preset": "profile_right", "box": [16.0, 16.0, 112.0, 112.0]}
    from_photo = post(served_app, body)
    assert png_pixels(s3_read(placed.json()["images"][0])).tolist() != \
        png_pixels(s3_read(from_photo.json()["images"][0])).tolist()  # the keypoints moved the face
    _error(post(served_app, {**body, "pose": {"preset": "frontal", "box": [100, 100, 200, 200]}}), 400, "pose.box")
    _error(post(served_app, {**body, "keypoints": [[1, 1], [2, 1], [1, 2], [2, 2], [500, 2]]}), 400, "keypoints")
    _error(post(served_app, {**body, "pose_image": b64(astronaut_bytes),
                             "pose": {"preset": "frontal", "box": [16, 16, 112, 112]}}), 400, "pose")
    assert post(served_app, body).status_code == 200  # the replicas keep serving
