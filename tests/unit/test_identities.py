"""Several identities in one image (issue 23): each identity's face tokens act only inside its region (its mask,
nearest-resized per cross-attention layer), IdentityNet runs once per identity with its residuals masked to its
region and summed, and one identity given through `identities` is exactly the single-face request."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from pydantic import ValidationError
from skimage import data as skimage_data

from instantid_core.adapter import NUM_FACE_TOKENS
from instantid_core.batching import run_grouped
from instantid_core.conditioning import RequestPhotos, face_condition
from instantid_core.config import GenerateParams, PipelineSettings, Scheduler
from instantid_core.denoise import BatchKey, DenoiseRequest
from instantid_core.denoise_types import OtherIdentity
from instantid_core.errors import InvalidParameter
from instantid_core.face import FaceAnalyzer, draw_kps
from instantid_core.pipeline import denoise_request
from instantid_core.poses import PosePreset, preset_keypoints
from instantid_core.regions import attention_masks, face_box_mask, latent_levels
from instantid_core.tiny.face import write_tiny_face_pack
from testkit.api import FACE, png_bytes
from testkit.attention import face_attention_layer

WIDTH, HEIGHT = 128, 64
LEFT, RIGHT = (0.0, 0.0, 64.0, 64.0), (64.0, 0.0, 128.0, 64.0)  # two regions side by side, touching


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory) -> FaceAnalyzer:
    return FaceAnalyzer(write_tiny_face_pack(tmp_path_factory.mktemp("antelopev2")), PipelineSettings())


def _plain_nearest(box, size, level) -> torch.Tensor:
    """A box mask at a layer's (h, w) by hand: output cell (r, c) reads input pixel (floor(r * H / h),
    floor(c * W / w)), F.interpolate's `nearest`; the box covers int()-truncated corners."""
    (height, width), (h, w) = size, level
    x1, y1, x2, y2 = (int(v) for v in box)
    rows = [math.floor(r * height / h) for r in range(h)]
    cols = [math.floor(c * width / w) for c in range(w)]
    cells = [float(y1 <= row < y2 and x1 <= col < x2) for row in rows for col in cols]
    return torch.tensor(cells).reshape(-1, 1)


def _two_people(embedding_b: np.ndarray, prompt, *, embedding_a: np.ndarray | None = None, width: int = WIDTH,
                left=LEFT, right=RIGHT, regions=None) -> DenoiseRequest:
    """A request with identity A in `left` and B in `right` (frontal faces); `regions` replaces both regions (the
    keypoints stay in the boxes)."""
    if embedding_a is None:
        embedding_a = np.random.default_rng(1).standard_normal(512).astype(np.float32)

    def kps(box):
        return np.asarray(draw_kps((width, HEIGHT), preset_keypoints(PosePreset.frontal, box)), np.uint8)

    region_a, region_b = regions or (left, right)
    other = OtherIdentity(embedding_b, kps(right), region_b, identitynet_strength=0.9, adapter_strength=0.7)
    return DenoiseRequest(prompt=prompt, face_embedding=embedding_a, kps_image=kps(left), face_box=region_a, seed=3,
                          other_identities=(other,))


def test_each_identitys_masks_at_every_layer_match_a_plain_nearest_resize(denoiser, prompt_encoder):
    prompt = prompt_encoder.encode("two people", "")
    request = _two_people(np.ones(512, np.float32), prompt)
    key = BatchKey(WIDTH, HEIGHT, 2, Scheduler.euler, identities=2)
    samples = denoiser.expand_samples([request])
    cond = denoiser.prepare_conditioning([request], samples, key)
    levels = latent_levels(HEIGHT, WIDTH, denoiser.vae_scale_factor, len(denoiser.unet.config.block_out_channels))
    (other,) = cond.other_identities
    for box, masks in ((LEFT, cond.attention_masks), (RIGHT, other.attention_masks)):
        assert sorted(masks) == sorted(h * w for h, w in levels)
        for h, w in levels:
            expected = _plain_nearest(box, (HEIGHT, WIDTH), (h, w))
            for row in masks[h * w]:  # both CFG halves
                torch.testing.assert_close(row, expected, rtol=0, atol=0)
    # the regions are disjoint at every layer: no face token acts where another identity's does
    for n in cond.attention_masks:
        assert float((cond.attention_masks[n] * other.attention_masks[n]).max()) == 0.0
    assert other.adapter_scale.tolist() == pytest.approx([0.7, 0.7])
    assert other.identitynet_scale.flatten().tolist() == pytest.approx([0.9, 0.9])


def test_face_attention_sums_each_identity_in_its_own_region():
    layer = face_attention_layer()
    attention, processor, attend = layer.attention, layer.processor, layer.plain
    h, w = HEIGHT // 16, WIDTH // 16
    hidden = torch.randn(2, h * w, layer.query_dim)
    text = torch.randn(2, 7, layer.cross_dim)
    faces = [torch.randn(2, NUM_FACE_TOKENS, layer.cross_dim) for _ in range(3)]
    boxes = [(0, 0, 40, 64), (40, 0, 88, 64), (88, 0, 128, 64)]
    scales = [torch.tensor([0.8, 0.3]), torch.tensor([1.2, 0.5]), torch.tensor([0.4, 1.0])]
    masks = [attention_masks(torch.stack([face_box_mask(box, (HEIGHT, WIDTH))] * 2), [(h, w)]) for box in boxes]
    ours = processor(attention, hidden, torch.cat([text, faces[0]], dim=1), ip_adapter_scale=scales[0],
                     face_region=masks[0], other_faces=list(zip(faces[1:], scales[1:], masks[1:], strict=True)))

    query = attention.to_q(hidden)
    expected = attend(query, attention.to_k(text), attention.to_v(text))
    for face, scale, box in zip(faces, scales, boxes, strict=True):
        mask = _plain_nearest(box, (HEIGHT, WIDTH), (h, w))
        expected = expected + scale.view(2, 1, 1) * mask * attend(query, processor.to_k_ip(face),
                                                                  processor.to_v_ip(face))
    torch.testing.assert_close(ours, attention.to_out[0](expected), rtol=1e-5, atol=1e-5)


def test_changing_identity_b_changes_its_region_and_barely_touches_a(denoiser, prompt_encoder):
    # A at the left end, B at the right end of a 256 x 64 image, 128 px of background between them.
    width, left, right = 256, (0.0, 0.0, 64.0, 64.0), (192.0, 0.0, 256.0, 64.0)
    prompt = prompt_encoder.encode("two people", "")
    key = BatchKey(width, HEIGHT, 4, Scheduler.euler, identities=2)
    a1, a2, b1, b2 = (np.random.default_rng(seed).standard_normal(512).astype(np.float32) * 3 for seed in range(4))

    def image(a, b, **kwargs):
        request = _two_people(b, prompt, embedding_a=a, width=width, left=left, right=right, **kwargs)
        return denoiser([request], key)[0][0].astype(int)

    def change(first, second, region):
        return float(np.abs(first - second)[:, int(region[0]):int(region[2])].mean())

    base = image(a1, b1)
    b_changed, a_changed = image(a1, b2), image(a2, b1)
    everywhere = (0.0, 0.0, float(width), float(HEIGHT))
    unmasked = change(image(a1, b1, regions=(everywhere,) * 2), image(a1, b2, regions=(everywhere,) * 2), left)
    in_b, in_a, a_own = change(base, b_changed, right), change(base, b_changed, left), change(base, a_changed, left)
    assert in_b > 0.5  # B's new face shows in B's region
    # B's face tokens and IdentityNet residuals are exactly zero inside A (the masks; see the tests above), but A
    # and B share the latents: the tiny UNet's self-attention is global over its 32 x 8 latent and its convolutions
    # overlap, so B's change reaches A through them and A is not bit-equal. Bounds, from the measured CPU float32
    # values (in B 1.25, in A 0.43, A's own change in A 4.01, B's change in A without regions 0.69 per channel):
    # the spill-over into A stays under half of B's own change, under a quarter of what A's own face changes
    # there, and below the spill-over with no regions (which is what the masks remove).
    assert in_a < 0.5 * in_b
    assert in_a < 0.25 * a_own
    assert in_a < unmasked


def test_requests_with_as_many_identities_share_a_batch_and_each_equals_its_run_alone(denoiser, prompt_encoder):
    prompt = prompt_encoder.encode("two people", "")
    rng = np.random.default_rng(5)
    pairs = [_two_people(rng.standard_normal(512).astype(np.float32), prompt) for _ in range(2)]
    single = DenoiseRequest(prompt=prompt, face_embedding=rng.standard_normal(512).astype(np.float32),
                            kps_image=pairs[0].kps_image, face_box=LEFT, seed=9)
    two, one = (BatchKey(WIDTH, HEIGHT, 2, Scheduler.euler, identities=k) for k in (2, 1))
    calls = []
    outcomes = run_grouped(denoiser, [(pairs[0], two), (single, one), (pairs[1], two)],
                           on_group=lambda key, indices, *_: calls.append((key.identities, indices)))
    assert calls == [(2, [0, 2]), (1, [1])]  # the batch key keeps the counts apart, joins the equal ones
    for outcome, (request, key) in zip(outcomes, [(pairs[0], two), (single, one), (pairs[1], two)], strict=True):
        alone = denoiser([request], key)[0]
        assert np.abs(outcome.astype(int) - alone.astype(int)).max() <= 1  # float rounding, as test_denoise's


def condition(analyzer, photos: RequestPhotos, **params):
    return face_condition(analyzer, photos, GenerateParams(prompt="x", width=256, height=256, **params),
                          PipelineSettings())


@pytest.mark.parametrize("place", [{}, {"box": [40, 30, 200, 190]}], ids=["from_photo", "box"])
def test_one_identity_is_the_single_face_request_bit_for_bit(analyzer, denoiser, prompt_encoder, place):
    photo = FACE.read_bytes()
    classic_place = {"pose": {"preset": "frontal", "box": place["box"]}} if place else {}
    classic = condition(analyzer, RequestPhotos([photo]), **classic_place)
    through = condition(analyzer, RequestPhotos([], identities=[[photo]]), identities=[place])
    for name in ("embedding", "kps_image", "face_box", "width", "height", "det_score"):
        np.testing.assert_array_equal(getattr(classic, name), getattr(through, name))
    prompt = prompt_encoder.encode("a portrait", "")
    images = []
    for face, params in ((classic, GenerateParams(prompt="x", steps=2, **classic_place)),
                         (through, GenerateParams(prompt="x", steps=2, identities=[place]))):
        request, key = denoise_request(face, prompt, params, 11, Scheduler.euler)
        assert key.identities == 1 and request.other_identities == ()
        images.append(denoiser([request], key)[0])
    np.testing.assert_array_equal(images[0], images[1])


def test_two_identities_are_placed_in_their_boxes_with_their_own_faces(analyzer):
    photo = FACE.read_bytes()
    mirrored = png_bytes(ImageOps.mirror(Image.open(FACE)))
    placed = condition(analyzer, RequestPhotos([], identities=[[photo], [mirrored]]),
                       identities=[{"box": [0, 40, 120, 160]},
                                   {"pose": {"preset": "profile_left", "box": [130, 40, 250, 160]},
                                    "adapter_strength": 0.5}])
    a, b = placed.identities
    assert a.face_box == (0.0, 40.0, 120.0, 160.0) and b.face_box == (130.0, 40.0, 250.0, 160.0)
    np.testing.assert_allclose(b.keypoints, preset_keypoints(PosePreset.profile_left, (130, 40, 250, 160)))
    assert not np.array_equal(a.embedding, b.embedding)



def test_identities_without_boxes_take_the_pose_photos_faces_left_to_right(analyzer):
    # The astronaut large on the right, mirrored and smaller bottom left: largest-first would pick the right one.
    crop = skimage_data.astronaut()[0:320, 96:352]
    small = np.asarray(Image.fromarray(np.ascontiguousarray(crop[:, ::-1])).resize((179, 224)))
    canvas = np.full((480, 256 + 179, 3), 128, np.uint8)
    canvas[480 - 224:, :179] = small
    canvas[:320, 179:] = crop
    photo = FACE.read_bytes()
    placed = face_condition(analyzer, RequestPhotos([], pose=png_bytes(Image.fromarray(canvas)),
                                                    identities=[[photo], [photo]]),
                            GenerateParams(prompt="x", width=256, height=256, identities=[{}, {}]), PipelineSettings())
    left, right = placed.identities
    assert left.face_box[2] <= right.face_box[0]  # the first identity on the left face, apart from the second
    assert (left.face_box[2] - left.face_box[0]) < (right.face_box[2] - right.face_box[0])  # the smaller one


@pytest.mark.parametrize(("identities", "field"), [
    ([{"box": [0, 0, 120, 120]}, {"box": [100, 100, 220, 220]}], "identities[1].box"),  # overlapping
    ([{"box": [0, 0, 120, 120]}, {"keypoints": [[130, 10], [150, 10], [140, 20], [135, 30], [300, 30]]}],
     "identities[1].keypoints"),  # a point beyond the 256 px output
    ([{"box": [0, 0, 120, 120]}, {"box": [200, 200, 300, 300]}], "identities[1].box"),  # outside the output
    ([{"box": [0, 0, 120, 120]}, {}], "identities[1].box"),  # nowhere to go without a pose photo
])
def test_identities_that_cannot_be_placed_name_their_field(analyzer, identities, field):
    photo = FACE.read_bytes()
    with pytest.raises(InvalidParameter) as caught:
        condition(analyzer, RequestPhotos([], identities=[[photo]] * len(identities)), identities=identities)
    assert caught.value.field == field
    assert caught.value.message.startswith(field)


def test_the_model_refuses_five_identities_and_single_face_fields_beside_them():
    with pytest.raises(ValidationError, match="identities"):
        GenerateParams(prompt="x", identities=[{}] * 5)
    with pytest.raises(ValidationError, match="identities: give keypoints per identity"):
        GenerateParams(prompt="x", identities=[{}], keypoints=[[1, 2]] * 5)
