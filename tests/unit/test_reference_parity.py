"""Where our images must equal the official InstantID code's for the same weights, inputs and seed (issue 26): the
canny edge map of its multi-ControlNet demo (gradio_demo/controlnet_util.py, `get_canny_image`), and img2img as its
img2img pipeline draws it (pipeline_stable_diffusion_xl_instantid_img2img.py, built on diffusers' SDXL ControlNet
img2img pipeline): the init photo's latent sampled with the request's generator, then the noise."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from PIL import Image

from instantid_core.config import Scheduler
from instantid_core.controls import CANNY_THRESHOLDS, canny_map
from instantid_core.denoise import BatchKey, DenoiseRequest
from instantid_core.img2img import prepare_init
from testkit.api import FACE

WIDTH, HEIGHT = 128, 96


def demo_canny(rgb: np.ndarray) -> np.ndarray:
    """The demo's computation, written out: cv2.Canny on the BGR colour image, thresholds 100 and 200."""
    return cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), 100, 200)


def test_canny_edges_are_taken_on_the_colour_photo_as_the_demo_takes_them():
    assert CANNY_THRESHOLDS == (100, 200)
    photo = np.asarray(Image.open(FACE).convert("RGB"))
    ours = np.asarray(canny_map(Image.fromarray(photo)))
    assert ours.shape == (*photo.shape[:2], 3) and (ours == demo_canny(photo)[..., None]).all()


def test_an_edge_between_two_colours_of_one_brightness_is_kept():
    halves = np.zeros((64, 64, 3), np.uint8)
    halves[:, :32] = (200, 0, 0)
    halves[:, 32:] = (0, 102, 0)  # the same luma as the red (0.299 * 200 = 0.587 * 102)
    grey = cv2.cvtColor(halves, cv2.COLOR_RGB2GRAY)
    assert not cv2.Canny(grey, 100, 200).any()  # a grey conversion first loses the edge
    edges = np.asarray(canny_map(Image.fromarray(halves)))[..., 0]
    assert edges[:, 30:34].any() and not edges[:, :28].any() and not edges[:, 36:].any()


@pytest.mark.parametrize("scheduler", [Scheduler.euler, Scheduler.euler_ancestral])  # deterministic, stochastic
def test_img2img_equals_diffusers_sdxl_img2img_for_the_same_seed(denoiser, prompt_encoder, tiny_root, scheduler):
    """With IdentityNet and the face tokens at strength 0, what is left is SDXL img2img: diffusers' pipeline, fed the
    same photo, prompt, strength and seed, must give the same pixels (the random draws in the same order). A batch
    of requests equals each alone to the batched kernels' rounding (test_img2img's mixed-batch test)."""
    photo = prepare_init(Image.open(FACE), (WIDTH, HEIGHT))
    request = DenoiseRequest(prompt=prompt_encoder.encode("a photo of a man", "blurry"), seed=7, guidance=5.0,
                             face_embedding=np.ones(512, np.float32), kps_image=np.zeros((HEIGHT, WIDTH, 3), np.uint8),
                             identitynet_strength=0.0, adapter_strength=0.0, init_image=photo)
    ours = denoiser([request], BatchKey(WIDTH, HEIGHT, 4, scheduler, strength=0.6))[0][0]
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_root / "sdxl")
    pipe.scheduler = denoiser.make_scheduler(scheduler)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("a photo of a man", negative_prompt="blurry", image=Image.fromarray(photo), strength=0.6,
                     num_inference_steps=4, guidance_scale=5.0, output_type="np",
                     generator=torch.Generator().manual_seed(7)).images[0]
    assert np.array_equal(ours, (reference * 255).round().astype(np.uint8))
