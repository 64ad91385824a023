"""img2img and inpainting around the InstantID denoiser: the init photo, the mask, the seam, the strength.

    init photo --prepare_init--> (H, W, 3) uint8 at the output size (the "input photo" every kept pixel equals)
    mask photo --prepare_mask--> (H, W) uint8, 255 = regenerate   (or face_box_mask_image: the face box, dilated)
    mask       --seam_alpha-->   (H, W) float32: 1 on the mask, falling to 0 within SEAM_PX outside it
    denoising: the masked latents are generated, the others follow the init photo's latents noised to each step
               (diffusers' SDXL inpainting with a 4-channel UNet); at the end the pixels are composited:
               out = init * (1 - alpha) + generated * alpha, so beyond the seam every pixel is the input photo's.

Strength (0 < s <= 1) is the fraction of the denoising steps that run, from a photo noised to that point; at 1 the
latents start from pure noise, as diffusers' inpainting does at full strength.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

from .errors import InvalidParameter

SEAM_PX = 16  # the feathered seam outside the mask (the bound: at most 16 px)
FACE_MASK_DILATION = 0.25  # inpaint_face: the face box grown by this fraction of its larger side on every side
IMG2IMG_STRENGTH = 0.8  # default without a mask: the InstantID img2img pipeline's default strength
INPAINT_STRENGTH = 1.0  # default with a mask: diffusers' SDXL inpainting default (0.9999), from pure noise
MULTIPLE = 8  # the VAE's downsampling


def init_size(photo_size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The output size an init photo gives when no size is asked for: the photo's own, downscaled to fit
    `max_side` if larger, each side floored to a multiple of 8 (`prepare_init` crops the remainder)."""
    width, height = photo_size
    scale = min(1.0, max_side / max(width, height))
    width, height = max(MULTIPLE, math.floor(width * scale)), max(MULTIPLE, math.floor(height * scale))
    return width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE


def prepare_init(photo: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The init photo at the output size `(width, height)`: resized to cover it (uniform scale) and centre-cropped,
    the framing `face.map_kps_to_output` gives keypoints; untouched when it already has that size.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    photo = photo.convert("RGB")
    width, height = size
    if photo.size != size:
        scale = max(width / photo.width, height / photo.height)
        cover = (max(width, round(photo.width * scale)), max(height, round(photo.height * scale)))
        if cover != photo.size:
            photo = photo.resize(cover, Image.Resampling.LANCZOS)
        left, top = (photo.width - width) // 2, (photo.height - height) // 2
        photo = photo.crop((left, top, left + width, top + height))
    return np.asarray(photo, dtype=np.uint8).copy()


def prepare_mask(mask: Image.Image, size: tuple[int, int], init_photo_size: tuple[int, int]) -> np.ndarray:
    """A mask photo (white = regenerate) as a binary (H, W) uint8 mask (255 / 0) at the output size.

    A mask of another size than the init photo is resized to it (nearest: it stays binary) before both get the
    same framing to the output size; "white" is a grey level of at least 128.
    """
    grey = mask.convert("L")
    if grey.size != init_photo_size:
        grey = grey.resize(init_photo_size, Image.Resampling.NEAREST)
    framed = prepare_init(grey.convert("RGB"), size)[:, :, 0]
    return np.where(framed >= 128, 255, 0).astype(np.uint8)


def face_box_mask_image(box: tuple[float, float, float, float], size: tuple[int, int],
                        dilation: float = FACE_MASK_DILATION) -> np.ndarray:
    """inpaint_face: the face box (output pixels) grown by `dilation` x its larger side on every side, as a binary
    (H, W) uint8 mask (255 = regenerate), clipped to the image."""
    width, height = size
    x1, y1, x2, y2 = box
    grow = dilation * max(x2 - x1, y2 - y1)
    left, top = max(0, math.floor(x1 - grow)), max(0, math.floor(y1 - grow))
    right, bottom = min(width, math.ceil(x2 + grow)), min(height, math.ceil(y2 + grow))
    mask = np.zeros((height, width), np.uint8)
    mask[top:bottom, left:right] = 255
    return mask


def check_mask(mask: np.ndarray, name: str = "mask_image") -> None:
    if not mask.any():
        raise InvalidParameter(f"{name} has no white pixel: nothing to regenerate (white = regenerate)", field=name)


def seam_alpha(mask: np.ndarray, seam: int = SEAM_PX) -> np.ndarray:
    """(H, W) float32 blend weight of the generated image: 1 on the mask, then linearly down to 0 at `seam` px
    (Euclidean) outside it; exactly 0 farther away."""
    outside = (mask == 0).astype(np.uint8)
    distance = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # 0 on the mask
    return np.clip(1.0 - distance / seam, 0.0, 1.0).astype(np.float32)


def latent_mask(alpha: np.ndarray, scale: int = MULTIPLE) -> np.ndarray:
    """(h, w) float32 latent mask, 1 where a latent cell touches the mask or its seam (the generated image must
    exist wherever it is blended in), 0 where the photo's latents are kept."""
    height, width = alpha.shape
    cells = (alpha > 0).reshape(height // scale, scale, width // scale, scale)
    return cells.any(axis=(1, 3)).astype(np.float32)


def composite(init: np.ndarray, generated: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Generated pixels blended over the init photo by `alpha`; where alpha is 0 the photo's pixel, exactly."""
    blend = init.astype(np.float32) * (1.0 - alpha[..., None]) + generated.astype(np.float32) * alpha[..., None]
    out = np.clip(np.round(blend), 0, 255).astype(np.uint8)
    return np.where(alpha[..., None] > 0, out, init)


def start_step(steps: int, strength: float) -> int:
    """How many of `steps` are skipped at this strength (diffusers' img2img `get_timesteps` rule, but at least one
    step runs)."""
    return steps - max(1, min(int(steps * strength), steps))  # at least one step runs
