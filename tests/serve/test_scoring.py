"""Issue 26's identity score through real HTTP on the tiny preset (`served_app` scores with the preset's second tiny
recogniser, up to 6 candidates). Outputs with a face to score are inpainting round trips that keep the reference
photo's face pixels and regenerate the rest."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from instantid_core.conditioning import RequestPhotos, face_condition
from instantid_core.config import GenerateParams, PipelineSettings
from instantid_core.detail import changed_region
from instantid_core.face import FaceAnalyzer
from testkit.api import FAST, b64, png_bytes, png_pixels, post, s3_read
from tests.serve.test_safety import _metric


def _round_trip(tiny_root: Path, astronaut_bytes: bytes, **extra) -> dict:
    """The astronaut's head and shoulders as init photo, everything but its face (and the seam) regenerated."""
    photo = Image.open(io.BytesIO(astronaut_bytes)).convert("RGB").crop((96, 0, 352, 320))
    x1, y1, x2, y2 = FaceAnalyzer(tiny_root / "antelopev2", PipelineSettings()).analyze(photo).bbox
    mask = np.full((photo.height, photo.width), 255, np.uint8)
    mask[max(0, int(y1) - 24):int(y2) + 24, max(0, int(x1) - 24):int(x2) + 24] = 0
    return {"face_image": b64(astronaut_bytes), "init_image": b64(png_bytes(photo)),
            "mask_image": b64(png_bytes(Image.fromarray(mask))), "prompt": "x", "steps": 1, "strength": 0.05,
            "seed": 40, **extra}


def test_best_of_returns_the_best_scored_candidates_with_their_seeds_in_response_and_sidecar(
        served_app, tiny_root, astronaut_bytes):
    scored_before = _metric("ray_instantid_identity_score_count", served_app.name)
    response = post(served_app, _round_trip(tiny_root, astronaut_bytes, best_of=3, num_images=2))
    assert response.status_code == 200, response.text
    body = response.json()
    identity = body["identity"]
    assert identity["candidates"] == 3 and identity["same_model"] is False and len(body["images"]) == 2
    scores = identity["scores"]
    assert all(score is not None and score > 0.5 for score in scores) and scores == sorted(scores, reverse=True)
    assert len(set(identity["seeds"])) == 2 and set(identity["seeds"]) <= {40, 41, 42}
    sidecar = json.loads(s3_read(body["metadata"]))
    assert sidecar["identity"] == identity and sidecar["params"]["best_of"] == 3
    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    while _metric("ray_instantid_identity_score_count", served_app.name) < scored_before + 3:
        assert time.monotonic() < deadline, "the identity histogram never counted the three candidates"
        time.sleep(0.5)


def test_min_identity_runs_more_candidates_up_to_the_bound_and_flags_the_miss(served_app, astronaut_bytes):
    # noise at 64 px: no face, or one the tiny detector imagines, far from the floor: every round misses it, until
    # the server's 6 candidates
    response = post(served_app, {"face_image": b64(astronaut_bytes), "prompt": "x", **FAST, "steps": 1, "seed": 3,
                                 "best_of": 2, "min_identity": 0.99})
    assert response.status_code == 200, response.text
    identity = response.json()["identity"]
    assert identity["candidates"] == 6 and identity["below_floor"] == [True] and identity["min_identity"] == 0.99


def test_scoring_parameters_out_of_bounds_answer_4xx_naming_the_field(served_app, astronaut_bytes):
    body = {"face_image": b64(astronaut_bytes), "prompt": "x", **FAST}
    above_bound = post(served_app, {**body, "best_of": 7})  # the schema allows 8, this server 6
    assert above_bound.status_code == 400 and above_bound.json()["error"]["field"] == "best_of"
    for field, value in (("min_identity", 1.5), ("best_of", 9)):
        response = post(served_app, {**body, field: value})
        assert response.status_code in (400, 422) and field in json.dumps(response.json()), response.text


def test_face_detail_changes_only_the_dilated_face_box_plus_its_feather(served_app, tiny_root, astronaut_bytes):
    body = {"face_image": b64(astronaut_bytes), "prompt": "x", "steps": 1, "width": 192, "height": 192, "seed": 8}
    plain, detailed = (post(served_app, {**body, "face_detail": mode}) for mode in ("off", "on"))
    assert plain.status_code == 200 and detailed.status_code == 200, detailed.text
    report = detailed.json()["face_detail"]
    assert report["ran"] == [True] and len(report["identity_before"]) == len(report["identity_after"]) == 1
    assert json.loads(s3_read(detailed.json()["metadata"]))["face_detail"] == report
    params = GenerateParams(**{k: v for k, v in body.items() if k != "face_image"})
    face = face_condition(FaceAnalyzer(tiny_root / "antelopev2", PipelineSettings()), RequestPhotos([astronaut_bytes]),
                          params, PipelineSettings())
    region = changed_region(face)
    before, after = (png_pixels(s3_read(r.json()["images"][0])) for r in (plain, detailed))
    assert np.array_equal(after[~region], before[~region]) and not np.array_equal(after[region], before[region])


def test_face_detail_on_without_a_face_on_the_canvas_or_an_unknown_mode_answers_4xx_naming_the_field(
        served_app, astronaut_bytes):
    body = {"face_image": b64(astronaut_bytes), "prompt": "x", **FAST}
    # a pose photo whose face the square output's centre crop cuts away: the astronaut at the left of a wide canvas
    photo = np.asarray(Image.open(io.BytesIO(astronaut_bytes)).convert("RGB"))
    wide = np.pad(photo, ((0, 0), (0, 3 * photo.shape[1]), (0, 0)), constant_values=128)
    off_canvas = b64(png_bytes(Image.fromarray(wide)))
    for extra in ({"face_detail": "on", "pose_image": off_canvas}, {"face_detail": "sometimes"}):
        response = post(served_app, {**body, **extra})
        assert response.status_code in (400, 422), response.text
        assert "face_detail" in json.dumps(response.json()), response.text


def test_a_jobs_result_carries_the_identity_of_its_best_of_candidates(served_app, astronaut_bytes):
    from tests.serve.test_jobs import submit, wait_for

    submitted = submit(served_app, {"face_image": b64(astronaut_bytes), "prompt": "x", **FAST, "seed": 30,
                                    "best_of": 2})
    assert submitted.status_code == 202, submitted.text
    final = wait_for(served_app, submitted.json()["job_id"])
    assert final["status"] == "done", final
    identity = final["result"]["identity"]
    assert identity["candidates"] == 2 and len(identity["scores"]) == 1 and identity["seeds"][0] in (30, 31)
