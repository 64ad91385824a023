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
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from PIL import Image

from .errors import InvalidParameter

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from .denoise_types import BatchKey, Conditioning, DenoiseRequest

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


def framing(photo_size: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float]:
    """How a photo of `photo_size` becomes the output `size` (both (width, height)): (scale, left, top) of the
    crop. A photo at most 7 px larger than the output in each side (the floor to a multiple of 8) is only
    centre-cropped, so its pixels stay exactly as they were; any other is scaled to cover the output (uniform
    scale) and centre-cropped, as `face.map_kps_to_output` frames keypoints."""
    (pw, ph), (width, height) = photo_size, size
    if 0 <= pw - width < MULTIPLE and 0 <= ph - height < MULTIPLE:
        return 1.0, float((pw - width) // 2), float((ph - height) // 2)
    scale = max(width / pw, height / ph)
    cover = (max(width, round(pw * scale)), max(height, round(ph * scale)))
    return scale, float((cover[0] - width) // 2), float((cover[1] - height) // 2)


def map_points(points: np.ndarray, photo_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(N, 2) points of the init photo in output pixels, with `framing`'s scale and crop."""
    scale, left, top = framing(photo_size, size)
    return (np.asarray(points, np.float64) * scale - np.array([left, top])).astype(np.float32)


def prepare_init(photo: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The init photo at the output size `(width, height)`, framed by `framing`; untouched when it already has
    that size.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    photo = photo.convert("RGB")
    width, height = size
    if photo.size != size:
        scale, left, top = framing(photo.size, size)
        if scale != 1.0:
            cover = (max(width, round(photo.width * scale)), max(height, round(photo.height * scale)))
            photo = photo.resize(cover, Image.Resampling.LANCZOS)
        photo = photo.crop((int(left), int(top), int(left) + width, int(top) + height))
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


# --- the denoiser's side (IdentityDenoiser calls these; every tensor is per sample) --------------------------------
def check_request(request: DenoiseRequest, key: BatchKey) -> None:
    """The init photo and mask fit the batch: output size, and an init photo for every sample below strength 1."""
    size = (key.height, key.width)
    if request.init_image is None:
        if request.mask is not None:
            raise InvalidParameter("mask_image needs an init_image to inpaint", field="mask_image")
        if key.strength < 1:
            raise InvalidParameter("strength below 1 needs an init_image", field="strength")
        return
    if request.init_image.shape != (*size, 3) or request.init_image.dtype != np.uint8:
        raise InvalidParameter(f"init_image has shape {request.init_image.shape}, expected {(*size, 3)} uint8",
                               field="init_image")
    if request.mask is not None:
        if request.mask.shape != size:
            raise InvalidParameter(f"mask_image has shape {request.mask.shape}, expected {size}", field="mask_image")
        check_mask(request.mask)


@torch.inference_mode()
def prepare_init_latents(vae: AutoencoderKL, per_sample: list[DenoiseRequest], size: tuple[int, int],
                         scale: int, dtype: torch.dtype, generators: list[torch.Generator]) -> dict:
    """The init photos' VAE latents and the latent inpainting masks; Nones when no sample has an init photo.

    Each latent is sampled from the VAE's latent distribution with its sample's generator, before that generator
    draws the starting noise: the reference img2img pipeline's order (diffusers' SDXL ControlNet img2img
    `prepare_latents`, with a generator per sample), so the same seed gives the reference's image and a batch
    equals each request run alone. Samples without an init photo draw nothing and get zero latents and a mask
    of ones (generate everywhere), which leaves their latents exactly as they are."""
    from diffusers.utils.torch_utils import randn_tensor

    if all(r.init_image is None for r in per_sample):
        return dict(init_latents=None, inpaint_mask=None)
    height, width = size
    device = vae.device
    pixels = torch.stack([torch.from_numpy(r.init_image if r.init_image is not None
                                           else np.zeros((height, width, 3), np.uint8)) for r in per_sample])
    pixels = pixels.permute(0, 3, 1, 2).to(device, vae.dtype) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
    posterior = vae.encode(pixels).latent_dist
    mean, std = posterior.mean, posterior.std  # (B, 4, h, w)
    draws = [randn_tensor((1, *mean.shape[1:]), generator=generator, device=mean.device, dtype=mean.dtype)
             if request.init_image is not None else torch.zeros_like(mean[:1])
             for request, generator in zip(per_sample, generators, strict=True)]
    latents = vae.config.scaling_factor * (mean + std * torch.cat(draws)).to(dtype)  # as DiagonalGaussian.sample
    has_init = torch.tensor([r.init_image is not None for r in per_sample], device=device)
    latents = torch.where(has_init[:, None, None, None], latents, torch.zeros_like(latents))
    mask = None
    if any(r.mask is not None for r in per_sample):
        cells = [latent_mask(seam_alpha(r.mask), scale) if r.mask is not None
                 else np.ones((height // scale, width // scale), np.float32) for r in per_sample]
        mask = torch.from_numpy(np.stack(cells))[:, None].to(device, dtype)  # (B, 1, h, w)
    return dict(init_latents=latents, inpaint_mask=mask)


def skip_steps(scheduler: SchedulerMixin, steps: int, strength: float) -> None:
    """Drop the first steps the strength skips from the scheduler's timesteps (diffusers' img2img rule)."""
    skipped = start_step(steps, strength) * scheduler.order
    scheduler.timesteps = scheduler.timesteps[skipped:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(skipped)


def start_latents(scheduler: SchedulerMixin, init_latents: torch.Tensor, noise: torch.Tensor,
                  latents: torch.Tensor, strength: float) -> torch.Tensor:
    """At strength 1 the pure-noise latents (the photo's content plays no part, as in diffusers' inpainting at full
    strength); below, the init latents noised to the first step that runs."""
    if strength >= 1:
        return latents
    first = scheduler.timesteps[:1].repeat(len(init_latents))
    return scheduler.add_noise(init_latents, noise, first)


def keep_unmasked_latents(latents: torch.Tensor, cond: Conditioning, scheduler: SchedulerMixin,
                          index: int) -> torch.Tensor:
    """After step `index`: outside the mask the latents are the init photo's, noised to the next step (clean after
    the last), as diffusers' SDXL inpainting does with a 4-channel UNet."""
    known = cond.init_latents
    if index < len(scheduler.timesteps) - 1:
        following = scheduler.timesteps[index + 1:index + 2].repeat(len(known))
        known = scheduler.add_noise(known, cond.noise, following)
    mask = cond.inpaint_mask
    return (1 - mask) * known + mask * latents


def keep_outside_mask(images: np.ndarray, request: DenoiseRequest) -> np.ndarray:
    """(N, H, W, 3) generated images with every pixel beyond the mask's seam the init photo's."""
    if request.mask is None or request.init_image is None:
        return images
    alpha = seam_alpha(request.mask)
    return np.stack([composite(request.init_image, image, alpha) for image in images])
