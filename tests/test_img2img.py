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
