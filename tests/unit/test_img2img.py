"""img2img and inpainting: the init photo and mask at the output size, the seam, and the denoiser's behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from instantid_core.img2img import (
    SEAM_PX,
    composite,
    face_box_mask_image,
    init_size,
    latent_mask,
    prepare_init,
    prepare_mask,
    seam_alpha,
    start_step,
)


def test_output_size_follows_the_init_photo():
    assert init_size((1000, 750), 2048) == (1000, 744)  # floored to multiples of 8
    assert init_size((4000, 3000), 2048) == (2048, 1536)  # downscaled to fit first
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (750, 1000, 3), np.uint8))
    init = prepare_init(photo, (1000, 744))
    assert init.shape == (744, 1000, 3)
    assert np.array_equal(init, np.asarray(photo)[3:747])  # centre crop, no resampling


def test_a_mask_of_another_size_is_resized_to_the_init_photo():
    mask = Image.new("L", (50, 40), 0)
    mask.paste(255, (25, 0, 50, 40))  # right half white
    out = prepare_mask(mask, (96, 80), (96, 80))
    assert out.shape == (80, 96) and set(np.unique(out)) == {0, 255}
    assert out[:, 48:].all() and not out[:, :48].any()


def test_the_face_mask_is_the_box_dilated_and_clipped():
    mask = face_box_mask_image((40.0, 30.0, 60.0, 50.0), (128, 96), dilation=0.25)  # 20 px box: +5 px each side
    rows, cols = np.nonzero(mask)
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (35, 64, 25, 54)
    assert face_box_mask_image((0.0, 0.0, 120.0, 90.0), (128, 96)).all()  # clipped to the image


def test_seam_is_at_most_16_px_and_pixels_beyond_it_are_the_photos():
    mask = np.zeros((96, 128), np.uint8)
    mask[40:60, 50:70] = 255
    alpha = seam_alpha(mask)
    assert (alpha[mask > 0] == 1).all()
    ys, xs = np.nonzero(alpha > 0)
    assert ys.min() >= 40 - SEAM_PX and ys.max() < 60 + SEAM_PX and xs.min() >= 50 - SEAM_PX
    rng = np.random.default_rng(1)
    init, generated = (rng.integers(0, 255, (96, 128, 3), np.uint8) for _ in range(2))
    out = composite(init, generated, alpha)
    assert np.array_equal(out[alpha == 0], init[alpha == 0])
    assert np.array_equal(out[mask > 0], generated[mask > 0])
    cells = latent_mask(alpha)
    assert cells.shape == (12, 16) and cells[5:8, 6:9].all() and not cells[0].any()


@pytest.mark.parametrize(("steps", "strength", "skipped"), [(30, 1.0, 0), (30, 0.5, 15), (10, 0.85, 2), (4, 0.1, 3)])
def test_strength_skips_the_first_steps(steps, strength, skipped):
    assert start_step(steps, strength) == skipped


# --- the denoiser: strength, inpainting, mixed batches (tiny preset) ---------------------------------------------
from instantid_core.config import Scheduler  # noqa: E402
from instantid_core.denoise import BatchKey, DenoiseRequest  # noqa: E402
from instantid_core.errors import InvalidParameter  # noqa: E402

WIDTH, HEIGHT = 128, 96


@pytest.fixture(scope="module")
def photo(astronaut_bytes) -> np.ndarray:
    import io

    return prepare_init(Image.open(io.BytesIO(astronaut_bytes)), (WIDTH, HEIGHT))


def _request(prompt_encoder, photo=None, mask=None, seed=4, **fields) -> DenoiseRequest:
    kps = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    kps[30:40, 50:60] = (255, 0, 0)
    kps[30:40, 70:80] = (0, 255, 0)
    return DenoiseRequest(prompt=prompt_encoder.encode("a portrait"), face_embedding=np.random.default_rng(2)
                          .standard_normal(512).astype(np.float32), kps_image=kps, seed=seed,
                          face_box=(40.0, 20.0, 90.0, 80.0), init_image=photo, mask=mask, **fields)


def _face_mask() -> np.ndarray:
    return face_box_mask_image((50.0, 25.0, 80.0, 60.0), (WIDTH, HEIGHT))


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def test_img2img_strength_orders_closeness_to_the_init_photo(denoiser, prompt_encoder, photo):
    # The tiny VAE is random: what a photo can come back as is its own VAE round trip, the image at the lowest
    # strength. Higher strengths move away from it; full strength is the text-to-image image.
    images = {s: denoiser([_request(prompt_encoder, photo)], BatchKey(WIDTH, HEIGHT, 10, Scheduler.euler,
                                                                    strength=s))[0][0] for s in (0.1, 0.4, 0.7, 1.0)}
    distances = [_distance(images[s], images[0.1]) for s in (0.4, 0.7, 1.0)]
    assert distances == sorted(distances) and distances[0] > 0
    # Strength 1 starts from pure noise: the photo's content plays no part (its latent is still drawn first from
    # the generator, as the reference img2img pipeline draws it, so the noise is not text-to-image's).
    other = np.ascontiguousarray(photo[::-1])
    elsewhere = denoiser([_request(prompt_encoder, other)], BatchKey(WIDTH, HEIGHT, 10, Scheduler.euler))[0][0]
    assert np.array_equal(images[1.0], elsewhere)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_keeps_every_pixel_beyond_the_seam_and_changes_the_mask(denoiser, prompt_encoder, photo,
                                                                           strength):
    mask = _face_mask()
    out = denoiser([_request(prompt_encoder, photo, mask)], BatchKey(WIDTH, HEIGHT, 4, Scheduler.euler,
                                                                     strength=strength))[0][0]
    outside = seam_alpha(mask) == 0
    assert out.shape == photo.shape
    assert np.array_equal(out[outside], photo[outside])
    assert _distance(out[mask > 0], photo[mask > 0]) > 5


def test_a_batch_of_mixed_modes_equals_each_request_alone(denoiser, prompt_encoder, photo):
    # Mode is per sample: text-to-image, img2img and inpainting share a batch at the same strength (the strength,
    # the steps skipped, is part of the batch key).
    key = BatchKey(WIDTH, HEIGHT, 3, Scheduler.euler_ancestral)
    requests = [_request(prompt_encoder, seed=1), _request(prompt_encoder, photo, _face_mask(), seed=2, num_images=2),
                _request(prompt_encoder, photo, seed=3, identity_end=0.5, negative_face_noise=0.3)]
    batched = denoiser(requests, key)
    for request, images in zip(requests, batched, strict=True):
        alone = denoiser([request], key)[0]
        assert images.shape == alone.shape and np.abs(images.astype(int) - alone.astype(int)).max() <= 1
    img2img_key = BatchKey(WIDTH, HEIGHT, 4, Scheduler.euler, strength=0.5)
    pair = [_request(prompt_encoder, photo, seed=5), _request(prompt_encoder, photo, _face_mask(), seed=6)]
    for request, images in zip(pair, denoiser(pair, img2img_key), strict=True):
        assert np.abs(images.astype(int) - denoiser([request], img2img_key)[0].astype(int)).max() <= 1


def test_bad_img2img_inputs_are_invalid_parameters(denoiser, prompt_encoder, photo):
    key = BatchKey(WIDTH, HEIGHT, 2, Scheduler.euler, strength=0.5)
    with pytest.raises(InvalidParameter) as err:
        denoiser([_request(prompt_encoder)], key)  # strength < 1 without a photo
    assert err.value.field == "strength"
    with pytest.raises(InvalidParameter) as err:
        denoiser([_request(prompt_encoder, photo, np.zeros((HEIGHT, WIDTH), np.uint8))], key)
    assert err.value.field == "mask_image"
    with pytest.raises(InvalidParameter) as err:
        denoiser([_request(prompt_encoder, photo[:64])], key)
    assert err.value.field == "init_image"


# --- the library pipeline: inpaint_face end to end, bad inputs --------------------------------------------------
from instantid_core.config import GenerateParams  # noqa: E402
from instantid_core.errors import InvalidImage, NoFaceDetected  # noqa: E402


@pytest.fixture(scope="module")
def pipeline(tiny_root):
    from instantid_core.pipeline import InstantIDPipeline

    return InstantIDPipeline.from_root(tiny_root)


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_inpaint_face_swaps_the_face_and_keeps_the_rest_of_the_photo(pipeline, astronaut_bytes):
    import io

    scene = Image.open(io.BytesIO(astronaut_bytes)).convert("RGB").resize((300, 300))  # 300: not a multiple of 8
    params = GenerateParams(prompt="a portrait", steps=3, seed=1, inpaint_face=True)
    result = pipeline.generate([astronaut_bytes], params, init_image=_png(scene))
    image = result.images[0]
    assert image.shape == (296, 296, 3) and (result.width, result.height) == (296, 296)  # follows the init photo
    init = prepare_init(scene, (296, 296))
    face = pipeline.face.analyze(scene)
    x1, y1, x2, y2 = (float(v) - 2 for v in face.bbox)  # the 300 px photo loses 2 px each side to the crop
    mask = face_box_mask_image((x1, y1, x2, y2), (296, 296))
    outside = seam_alpha(mask) == 0
    assert outside.mean() > 0.5 and np.array_equal(image[outside], init[outside])
    assert _distance(image[mask > 0], init[mask > 0]) > 5
    assert result.params.strength is None and result.params.inpaint_face


def test_img2img_inputs_that_cannot_work_are_named(pipeline, astronaut_bytes):
    params = GenerateParams(prompt="a portrait", steps=2, seed=1)
    grey = _png(Image.new("RGB", (128, 128), (128, 128, 128)))
    with pytest.raises(NoFaceDetected) as err:  # 422: inpaint_face on a photo without a face
        pipeline.generate([astronaut_bytes], params.model_copy(update={"inpaint_face": True}), init_image=grey)
    assert err.value.field == "init_image"
    with pytest.raises(InvalidImage) as err:  # 415: not an image
        pipeline.generate([astronaut_bytes], params, init_image=b"not an image")
    assert err.value.field == "init_image"
    for update, extra, field in (({}, {"mask_image": grey}, "mask_image"), ({"inpaint_face": True}, {}, "inpaint_face"),
                                 ({"strength": 0.5}, {}, "strength")):
        with pytest.raises(InvalidParameter) as err:  # 400: needs an init image
            pipeline.generate([astronaut_bytes], params.model_copy(update=update), **extra)
        assert err.value.field == field
    black = _png(Image.new("L", (64, 64), 0))
    with pytest.raises(InvalidParameter) as err:  # a mask with nothing to regenerate
        pipeline.generate([astronaut_bytes], params, init_image=astronaut_bytes, mask_image=black)
    assert err.value.field == "mask_image"
    from pydantic import ValidationError

    for strength in (0, 1.5, -1):
        with pytest.raises(ValidationError, match="strength"):
            GenerateParams(prompt="x", strength=strength)
