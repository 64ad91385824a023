"""Faces placed without a pose photo (issue 23): preset keypoints from the five-point ArcFace template, checked
against a plain computation, drawn by draw_kps, and what face_condition makes of them (with the tiny face pack)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from instantid_core.conditioning import RequestPhotos, face_condition
from instantid_core.config import GenerateParams, PipelineSettings
from instantid_core.errors import InvalidParameter
from instantid_core.face import FaceAnalyzer, draw_kps
from instantid_core.poses import ARCFACE_TEMPLATE, MIN_BOX_SIDE, PosePreset, preset_keypoints
from instantid_core.tiny.face import write_tiny_face_pack
from testkit.api import FACE, png_bytes

BOX = (40.0, 30.0, 200.0, 190.0)  # 160 px square in a 256 x 256 output


def test_frontal_is_the_arcface_template_scaled_into_the_box():
    scale = 160 / 112
    expected = ARCFACE_TEMPLATE * scale + np.array([40.0, 30.0])
    np.testing.assert_allclose(preset_keypoints(PosePreset.frontal, BOX), expected, atol=1e-4)


@pytest.mark.parametrize("preset", list(PosePreset))
def test_every_presets_points_land_inside_its_box_in_the_images_order(preset):
    kps = preset_keypoints(preset, BOX)
    assert kps.shape == (5, 2)
    assert (kps[:, 0] > BOX[0]).all() and (kps[:, 0] < BOX[2]).all()
    assert (kps[:, 1] > BOX[1]).all() and (kps[:, 1] < BOX[3]).all()
    assert kps[0, 0] < kps[1, 0] and kps[3, 0] < kps[4, 0]  # left eye and mouth corner stay on the left
    assert kps[2, 1] > kps[:2, 1].max() and kps[2, 1] < kps[3:, 1].min()  # the nose between eyes and mouth


def test_turns_and_tilts_go_the_way_their_names_say():
    frontal = preset_keypoints(PosePreset.frontal, BOX)
    eye_gap = frontal[1, 0] - frontal[0, 0]
    for side, sign in (("left", -1), ("right", 1)):
        three_quarter = preset_keypoints(PosePreset[f"three_quarter_{side}"], BOX)
        profile = preset_keypoints(PosePreset[f"profile_{side}"], BOX)
        # The nose moves towards that side of the image, more in profile, and the eyes come closer together.
        nose_shift = [sign * (p[2, 0] - frontal[2, 0]) for p in (three_quarter, profile)]
        assert 0 < nose_shift[0] < nose_shift[1]
        assert eye_gap > three_quarter[1, 0] - three_quarter[0, 0] > profile[1, 0] - profile[0, 0] > 0
        tilted = preset_keypoints(PosePreset[f"tilt_{side}"], BOX)
        # Leaning the top of the head towards that side: the eye on that side drops below the other.
        near, far = (tilted[0], tilted[1]) if side == "left" else (tilted[1], tilted[0])
        assert near[1] > far[1]
        angle = math.degrees(math.atan2(tilted[1, 1] - tilted[0, 1], tilted[1, 0] - tilted[0, 0]))
        assert angle == pytest.approx(sign * 20, abs=0.5)  # the eye line turns by the roll, 20 degrees (y down)


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory) -> FaceAnalyzer:
    return FaceAnalyzer(write_tiny_face_pack(tmp_path_factory.mktemp("antelopev2")), PipelineSettings())


def condition(analyzer, **params):
    params = GenerateParams(prompt="x", width=256, height=256, **params)
    return face_condition(analyzer, RequestPhotos([FACE.read_bytes()]), params, PipelineSettings())


@pytest.mark.parametrize("preset", [PosePreset.frontal, PosePreset.profile_left])
def test_a_preset_gives_the_keypoint_image_draw_kps_draws_and_its_box(analyzer, preset):
    placed = condition(analyzer, pose={"preset": preset.value, "box": list(BOX)})
    expected = np.asarray(draw_kps((256, 256), preset_keypoints(preset, BOX)))
    np.testing.assert_array_equal(placed.kps_image, expected)
    assert placed.face_box == BOX
    from_photo = condition(analyzer)
    np.testing.assert_array_equal(placed.embedding, from_photo.embedding)  # who: still the face photo
    assert not np.array_equal(placed.kps_image, from_photo.kps_image)


def test_explicit_keypoints_are_drawn_as_given(analyzer):
    points = [[100, 100], [150, 100], [125, 130], [105, 155], [145, 155]]
    placed = condition(analyzer, keypoints=points)
    np.testing.assert_array_equal(placed.kps_image, np.asarray(draw_kps((256, 256), np.array(points, np.float32))))
    x1, y1, x2, y2 = placed.face_box
    assert x1 < 100 and y1 < 100 and x2 > 150 and y2 > 155  # the face's box holds its points


@pytest.mark.parametrize(("params", "field"), [
    ({"pose": {"preset": "frontal", "box": [200, 30, 300, 130]}}, "pose.box"),  # beyond the 256 px output
    ({"pose": {"preset": "frontal", "box": [10, 10, 10 + MIN_BOX_SIDE - 1, 80]}}, "pose.box"),  # too small
    ({"pose": {"preset": "frontal", "box": [90, 30, 40, 130]}}, "pose.box"),  # x2 < x1
    ({"keypoints": [[10, 10], [20, 10], [15, 15], [12, 20], [300, 20]]}, "keypoints"),  # a point outside
    ({"keypoints": [[10, 10]] * 5, "pose": {"preset": "frontal", "box": list(BOX)}}, "keypoints"),  # both
])
def test_placements_that_cannot_work_name_their_field(analyzer, params, field):
    with pytest.raises(InvalidParameter) as caught:
        condition(analyzer, **params)
    assert caught.value.field == field


def test_a_preset_and_a_pose_photo_together_name_pose(analyzer):
    photo = png_bytes(Image.open(FACE))
    with pytest.raises(InvalidParameter) as caught:
        face_condition(analyzer, RequestPhotos([photo], pose=photo),
                       GenerateParams(prompt="x", pose={"preset": "frontal", "box": list(BOX)}),
                       PipelineSettings())
    assert caught.value.field == "pose"


def test_unknown_presets_and_point_counts_are_refused_by_the_model():
    with pytest.raises(ValidationError, match="preset"):
        GenerateParams(prompt="x", pose={"preset": "upside_down", "box": list(BOX)})
    with pytest.raises(ValidationError, match="keypoints"):
        GenerateParams(prompt="x", keypoints=[[1, 2]] * 4)
