"""The identity score (issue 26) on the tiny preset: a second tiny recogniser scores outputs against the reference,
best_of keeps the best candidates with their seeds, min_identity runs more rounds up to the bound."""

from __future__ import annotations

import io
from pathlib import Path

import insightface
import numpy as np
import pytest
from PIL import Image

from instantid_core.config import GenerateParams, ModelSources
from instantid_core.errors import InvalidParameter
from instantid_core.pipeline import InstantIDPipeline
from instantid_core.scoring import keep_best

GROUP_PHOTO = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"  # insightface's sample, in colour
ROUND_TRIP = {"steps": 2, "strength": 0.05}  # an inpainting round trip that keeps the face's pixels


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def scoring_pipeline(tiny_root: Path) -> InstantIDPipeline:
    return InstantIDPipeline.from_root(tiny_root, scoring=True, max_candidates=6)


def _keep_face_mask(pipeline: InstantIDPipeline, photo: bytes) -> bytes:
    """White (regenerate) everywhere but the photo's face box grown by the inpainting seam (16 px) and a little."""
    image = Image.open(io.BytesIO(photo)).convert("RGB")
    x1, y1, x2, y2 = pipeline.face.analyze(image).bbox
    mask = np.full((image.height, image.width), 255, np.uint8)
    mask[max(0, int(y1) - 24):int(y2) + 24, max(0, int(x1) - 24):int(x2) + 24] = 0
    return _png(Image.fromarray(mask))


def test_the_tiny_preset_scores_with_a_recogniser_of_its_own(tiny_root: Path):
    sources = ModelSources.from_root(str(tiny_root))
    assert sources.scoring_face_pack == f"{tiny_root}/buffalo_l"
    assert sorted(p.name for p in (tiny_root / "buffalo_l").iterdir()) == ["det_10g.onnx", "w600k_r50.onnx"]


def test_a_pasted_back_reference_face_scores_above_an_unrelated_face(scoring_pipeline, astronaut_bytes):
    # another person (the largest face of insightface's group photo) with room around the face to regenerate
    other_photo = _png(Image.open(GROUP_PHOTO).convert("RGB").crop((630, 260, 958, 588)).resize((384, 384)))
    params = GenerateParams(prompt="a portrait", **ROUND_TRIP)
    own = scoring_pipeline.generate([astronaut_bytes], params, seed=3, init_image=astronaut_bytes,
                                    mask_image=_keep_face_mask(scoring_pipeline, astronaut_bytes))
    other = scoring_pipeline.generate([astronaut_bytes], params, seed=3, init_image=other_photo,
                                      mask_image=_keep_face_mask(scoring_pipeline, other_photo))
    (own_score,), (other_score,) = own.identity.scores, other.identity.scores
    assert own_score is not None and other_score is not None
    assert own_score > 0.8  # the reference's own pixels (the face box moved a few px: not exactly 1)
    assert own_score > other_score + 0.1
    assert own.identity.same_model is False and own.identity.candidates == 1 and own.identity.seeds == [3]


def test_best_of_returns_the_best_candidates_with_their_seeds(scoring_pipeline, astronaut_bytes):
    mask = _keep_face_mask(scoring_pipeline, astronaut_bytes)
    common = {"prompt": "a portrait", **ROUND_TRIP}
    every = scoring_pipeline.generate([astronaut_bytes], GenerateParams(num_images=3, **common), seed=10,
                                      init_image=astronaut_bytes, mask_image=mask)
    best = scoring_pipeline.generate([astronaut_bytes], GenerateParams(best_of=3, num_images=2, **common), seed=10,
                                     init_image=astronaut_bytes, mask_image=mask)
    assert every.identity.seeds == [10, 11, 12] and best.identity.candidates == 3
    ranked = sorted(range(3), key=lambda i: -every.identity.scores[i])[:2]
    assert best.identity.seeds == [10 + i for i in ranked]
    assert best.identity.scores == [every.identity.scores[i] for i in ranked]
    assert np.array_equal(best.images, every.images[ranked])  # the same candidates, chosen by score


def test_best_of_one_is_todays_request_bit_for_bit(tiny_root: Path, scoring_pipeline, astronaut_bytes):
    plain = InstantIDPipeline(ModelSources.from_root(str(tiny_root)), weights=scoring_pipeline.weights)
    params = GenerateParams(prompt="a portrait", steps=2, width=64, height=64, num_images=2)
    today = plain.generate([astronaut_bytes], params, seed=5)
    scored = scoring_pipeline.generate([astronaut_bytes], params.model_copy(update={"best_of": 1}), seed=5)
    assert today.identity is None and scored.identity.candidates == 2 and scored.identity.seeds == [5, 6]
    assert np.array_equal(today.images, scored.images)


def test_min_identity_runs_more_rounds_up_to_the_bound_and_flags_the_miss(scoring_pipeline, astronaut_bytes):
    params = GenerateParams(prompt="a portrait", steps=1, width=64, height=64, best_of=2, min_identity=0.99)
    result = scoring_pipeline.generate([astronaut_bytes], params, seed=7)  # noise: no face, never above the floor
    assert result.identity.candidates == 6  # rounds of 2 up to max_candidates
    assert result.identity.below_floor == [True] and result.identity.min_identity == 0.99
    assert result.images.shape[0] == 1


def test_scoring_parameters_are_checked_naming_the_field(tiny_root, scoring_pipeline, astronaut_bytes):
    with pytest.raises(InvalidParameter) as err:
        scoring_pipeline.generate([astronaut_bytes], GenerateParams(prompt="x", best_of=8), seed=1)
    assert err.value.field == "best_of"
    with pytest.raises(ValueError, match="min_identity"):
        GenerateParams(prompt="x", min_identity=1.5)


def test_keep_best_keeps_generation_order_when_nothing_is_chosen():
    assert keep_best([0.1, None, 0.5], 3) == [0, 1, 2]
    assert keep_best([0.1, None, 0.5, 0.5], 2) == [2, 3]
    assert keep_best([None, None, 0.0], 2) == [2, 0]
