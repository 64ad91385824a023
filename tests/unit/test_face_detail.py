"""The detail pass for small faces (issue 26, `face_detail`) on the tiny preset: it regenerates only the face box
dilated as inpaint_face dilates it, plus the feather; every other pixel is the first image's, exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from instantid_core.conditioning import RequestPhotos, face_condition
from instantid_core.config import GenerateParams, ModelSources, PipelineSettings
from instantid_core.detail import changed_region, wants_detail
from instantid_core.errors import InvalidParameter
from instantid_core.handoff import FaceCondition
from instantid_core.pipeline import InstantIDPipeline


@pytest.fixture(scope="module")
def detail_pipeline(tiny_root: Path) -> InstantIDPipeline:
    settings = PipelineSettings(face_detail_size=128, face_detail_below=100)
    return InstantIDPipeline(ModelSources.from_root(str(tiny_root)), settings, scoring=True)


def test_the_detail_pass_changes_only_the_dilated_face_box_plus_its_feather(detail_pipeline, astronaut_bytes):
    params = GenerateParams(prompt="a portrait", steps=2, width=192, height=192, num_images=2)
    first = detail_pipeline.generate([astronaut_bytes], params, seed=11)
    detailed = detail_pipeline.generate([astronaut_bytes], params.model_copy(update={"face_detail": "on"}), seed=11)
    face = face_condition(detail_pipeline.face, RequestPhotos([astronaut_bytes]), params, detail_pipeline.settings)
    region = changed_region(face)
    assert region.any() and not region.all()
    assert np.array_equal(detailed.images[:, ~region], first.images[:, ~region])  # exactly as they were
    assert not np.array_equal(detailed.images[:, region], first.images[:, region])
    report = detailed.face_detail
    assert report.ran == [True, True] and len(report.identity_before) == 2 and len(report.identity_after) == 2
    assert report.identity_before == first.identity.scores


def test_auto_runs_only_below_the_size_threshold(detail_pipeline, astronaut_bytes):
    params = GenerateParams(prompt="a portrait", steps=1, width=64, height=64, face_detail="auto")
    small = detail_pipeline.generate([astronaut_bytes], params, seed=2)  # a face far under 100 px
    assert small.face_detail.ran == [True] and small.face_detail.face_side < 100
    face = FaceCondition(np.zeros(512, np.float32), np.zeros((64, 64, 3), np.uint8), (0.0, 0.0, 60.0, 60.0), 64, 64,
                         0.9)
    assert not wants_detail(GenerateParams(prompt="x", face_detail="auto"), face, below=50)


def test_on_without_a_face_on_the_canvas_is_refused_naming_the_field():
    off_canvas = FaceCondition(np.zeros(512, np.float32), np.zeros((64, 64, 3), np.uint8), (80.0, 80.0, 120.0, 120.0),
                               64, 64, 0.9)
    with pytest.raises(InvalidParameter) as err:
        wants_detail(GenerateParams(prompt="x", face_detail="on"), off_canvas, below=256)
    assert err.value.field == "face_detail"
    assert not wants_detail(GenerateParams(prompt="x", face_detail="auto"), off_canvas, below=256)
