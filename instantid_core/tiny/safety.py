"""The tiny preset's safety checker: diffusers' `StableDiffusionSafetyChecker` on a tiny CLIP vision model, laid out
as `CompVis/stable-diffusion-safety-checker` is (config.json, model.safetensors, preprocessor_config.json).

Random weights know no concepts, so the tiny checker is given one it can see: every concept embedding is its own
embedding of a fixed pattern (`tiny-flagged.png`, written beside it), with a threshold that only images very close
to that pattern pass. Tests flag an output by making it the pattern (inpainting keeps the init photo outside the
mask); the tiny pipeline's ordinary outputs score far below (tests/unit/test_safety.py measures both).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

FLAGGED_IMAGE = "tiny-flagged.png"  # the pattern the tiny checker flags, beside its weights
FLAGGED_SIDE = 128
CONCEPT_THRESHOLD = 0.97  # cosine to the pattern above which an image is flagged; ordinary outputs stay below ~0.9
NEVER = 1.5  # a threshold no cosine reaches: the special-care concepts never fire (no score adjustment)
IMAGE_SIZE = 32


def flagged_pattern(side: int = FLAGGED_SIDE) -> np.ndarray:
    """A magenta and green checkerboard of 8 x 8 squares, (side, side, 3) uint8: nothing the tiny pipeline draws."""
    y, x = np.mgrid[0:side, 0:side]
    cells = ((x * 8 // side + y * 8 // side) % 2).astype(bool)
    image = np.zeros((side, side, 3), np.uint8)
    image[cells], image[~cells] = (255, 0, 255), (0, 255, 0)
    return image


def write_tiny_safety_checker(folder: Path, *, seed: int) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=8)
    # The checker never builds its text tower; CLIPConfig still records one (tiny here, as in the published file).
    text = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=100, max_position_embeddings=77, bos_token_id=98, eos_token_id=99)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    # The published preprocessor_config.json's fields (CLIP's mean/std, bicubic, centre crop) at the tiny size.
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                                                                    "width": IMAGE_SIZE})
    pattern = flagged_pattern()
    with torch.no_grad():
        pixels = processor(images=[pattern], return_tensors="pt").pixel_values
        embed = checker.visual_projection(checker.vision_model(pixels)[1])[0]
        checker.concept_embeds.copy_(embed.expand_as(checker.concept_embeds))
        checker.concept_embeds_weights.fill_(CONCEPT_THRESHOLD)
        checker.special_care_embeds.copy_(embed.expand_as(checker.special_care_embeds))
        checker.special_care_embeds_weights.fill_(NEVER)
    checker.save_pretrained(folder)
    processor.save_pretrained(folder)
    Image.fromarray(pattern).save(folder / FLAGGED_IMAGE)
