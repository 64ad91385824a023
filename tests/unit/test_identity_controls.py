"""identity_start / identity_end, negative_face_noise and pose_face_index, with the tiny preset."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from instantid_core.conditioning import RequestPhotos, face_condition
from instantid_core.config import GenerateParams, Scheduler
from instantid_core.denoise import BatchKey, DenoiseRequest
from instantid_core.identity import active
from testkit.api import png_bytes

WIDTH, HEIGHT = 128, 96
KEY = BatchKey(WIDTH, HEIGHT, 4, Scheduler.euler)


def _request(prompt_encoder, **fields) -> DenoiseRequest:
    kps = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    kps[30:40, 50:60] = (255, 0, 0)
    kps[30:40, 70:80] = (0, 255, 0)
    return DenoiseRequest(**{**dict(prompt=prompt_encoder.encode("a portrait", "blurry"), seed=8, kps_image=kps,
                                    face_embedding=np.random.default_rng(5).standard_normal(512).astype(np.float32),
                                    identitynet_strength=1.2, adapter_strength=1.0), **fields})


def _differ(a, b) -> bool:
    return np.abs(a.astype(int) - b.astype(int)).mean() > 0.05


def test_the_window_follows_diffusers_control_guidance_rule():
    import torch

    window = torch.tensor([[0.0, 1.0], [0.5, 1.0], [0.0, 0.5]], dtype=torch.float64)
    assert [active(window, i, 4).tolist() for i in range(4)] == [
        [True, False, True], [True, False, True], [True, True, False], [True, True, False]]


def test_identity_window_limits_when_identitynet_and_face_tokens_act(denoiser, prompt_encoder):
    full = denoiser([_request(prompt_encoder)], KEY)[0]
    assert np.array_equal(full, denoiser([_request(prompt_encoder, identity_start=0.0, identity_end=1.0)], KEY)[0])
    never = denoiser([_request(prompt_encoder, identity_start=0.9, identity_end=1.0)], KEY)[0]  # no step of 4
    off = denoiser([_request(prompt_encoder, identitynet_strength=0.0, adapter_strength=0.0)], KEY)[0]
    assert np.array_equal(never, off)  # outside the window both strengths are exactly 0
    early = denoiser([_request(prompt_encoder, identity_end=0.5)], KEY)[0]
    late = denoiser([_request(prompt_encoder, identity_start=0.5)], KEY)[0]
    assert _differ(early, full) and _differ(late, full) and _differ(early, late) and _differ(early, off)


def test_negative_face_noise_changes_the_image_reproducibly(denoiser, prompt_encoder):
    reference = denoiser([_request(prompt_encoder)], KEY)[0]
    assert np.array_equal(reference, denoiser([_request(prompt_encoder, negative_face_noise=0.0)], KEY)[0])
    noisy = denoiser([_request(prompt_encoder, negative_face_noise=1.0)], KEY)[0]
    assert _differ(noisy, reference)
    assert np.array_equal(noisy, denoiser([_request(prompt_encoder, negative_face_noise=1.0)], KEY)[0])


@pytest.fixture(scope="module")
def two_faces() -> Image.Image:
    """The astronaut's portrait top left, the same portrait mirrored and smaller bottom right."""
    crop = skimage_data.astronaut()[0:320, 96:352]
    small = np.asarray(Image.fromarray(np.ascontiguousarray(crop[:, ::-1])).resize((179, 224)))
    canvas = np.full((480, 256 + 179, 3), 128, np.uint8)
    canvas[:320, :256] = crop
    canvas[480 - 224:, 256:] = small
    return Image.fromarray(canvas)


def test_pose_face_index_picks_the_pose_photos_face_largest_by_default(tiny_root, settings, two_faces):
    from instantid_core.face import FaceAnalyzer

    analyzer = FaceAnalyzer(tiny_root / "antelopev2", settings)
    face = Image.fromarray(skimage_data.astronaut())
    params = dict(prompt="x", width=256, height=256)
    photos = RequestPhotos([png_bytes(face)], pose=png_bytes(two_faces))
    default = face_condition(analyzer, photos, GenerateParams(**params), settings)
    largest = face_condition(analyzer, photos, GenerateParams(**params, pose_face_index=0), settings)
    other = face_condition(analyzer, photos, GenerateParams(**params, pose_face_index=1), settings)
    assert default.face_box == largest.face_box and np.array_equal(default.kps_image, largest.kps_image)
    assert other.face_box[0] > largest.face_box[2]  # the small face is right of the large one
    np.testing.assert_array_equal(other.embedding, largest.embedding)  # identity: still the face photo's
