"""PromptEncoder: SDXL's two CLIP text encoders, through diffusers' own `encode_prompt`
(penultimate hidden states of both encoders, pooled output of encoder 2, zeros for an empty negative prompt)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .config import PipelineSettings, Style

# Our own wording of the demo's style presets: (prompt template, extra negative prompt).
STYLE_TEMPLATES: dict[Style, tuple[str, str]] = {
    Style.none: ("{prompt}", ""),
    Style.watercolor: ("watercolor painting of {prompt}, soft washes of colour, painterly, textured paper",
                       "photograph, photorealistic, 3d render, glitch, noise"),
    Style.film_noir: ("film noir still of {prompt}, black and white, high contrast, dramatic shadows, moody",
                      "colour, vibrant, cheerful, cartoon"),
    Style.neon: ("{prompt} in a neon-lit city at night, glowing signs, cyberpunk, vivid magenta and cyan light",
                 "daylight, dull colours, washed out"),
    Style.jungle: ("{prompt} in a lush tropical jungle, dense foliage, humid air, cinematic light",
                   "desert, snow, urban, dull"),
    Style.mars: ("{prompt} on the surface of Mars, red dust, rocky plains, thin hazy sky, science fiction",
                 "green vegetation, ocean, earth sky"),
    Style.vibrant_color: ("{prompt}, vibrant saturated colours, bold palette, joyful, high detail",
                          "monochrome, black and white, dull, desaturated"),
    Style.snow: ("{prompt} in falling snow, winter landscape, cold blue light, frost",
                 "summer, desert, heat, tropical"),
    Style.line_art: ("line art drawing of {prompt}, clean black ink lines, minimal, white background",
                     "photograph, colour, shading, realistic, 3d render"),
}


def apply_style(style: Style, prompt: str, negative_prompt: str) -> tuple[str, str]:
    """The style's template around the prompt, its negative words before the user's."""
    template, style_negative = STYLE_TEMPLATES[style]
    negative = " ".join(part for part in (style_negative, negative_prompt) if part)
    return template.replace("{prompt}", prompt), negative


@dataclass(frozen=True)
class PromptEmbeds:
    """One prompt's conditioning as plain float32 arrays (crosses process boundaries as numpy)."""

    prompt_embeds: np.ndarray  # (77, C): C = 2048 for SDXL
    negative_prompt_embeds: np.ndarray  # (77, C)
    pooled: np.ndarray  # (P,): P = 1280 for SDXL
    negative_pooled: np.ndarray  # (P,)


class PromptEncoder:
    """Encodes (prompt, negative prompt, style) with SDXL's two text encoders."""

    def __init__(self, sdxl_dir: Path, settings: PipelineSettings) -> None:
        dtype = getattr(torch, settings.dtype)
        self.device = torch.device(settings.device)
        load = dict(torch_dtype=dtype)
        # A pipeline holding only the text parts, so encoding is diffusers' own code, not a copy of it.
        self._pipe = StableDiffusionXLPipeline(
            vae=None, unet=None, scheduler=None,
            text_encoder=CLIPTextModel.from_pretrained(sdxl_dir / "text_encoder", **load).to(self.device),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(sdxl_dir / "text_encoder_2", **load).to(
                self.device),
            tokenizer=CLIPTokenizer.from_pretrained(sdxl_dir / "tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(sdxl_dir / "tokenizer_2"),
            force_zeros_for_empty_prompt=_force_zeros(sdxl_dir),
        )
        self._pipe.set_progress_bar_config(disable=True)
        # transformers sets padding/truncation on the shared Rust tokenizer on every call: concurrent callers
        # would see each other's settings, so encoding is serialised (it takes milliseconds).
        self._lock = threading.Lock()

    @torch.inference_mode()
    def encode(self, prompt: str, negative_prompt: str = "", style: Style = Style.none) -> PromptEmbeds:
        """Encode one prompt pair after applying the style template."""
        prompt, negative_prompt = apply_style(style, prompt, negative_prompt)
        with self._lock:
            embeds, negative, pooled, negative_pooled = self._pipe.encode_prompt(
                prompt=prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=negative_prompt or None,
            )

        def to_numpy(tensor: torch.Tensor) -> np.ndarray:
            return tensor[0].float().cpu().numpy()

        return PromptEmbeds(to_numpy(embeds), to_numpy(negative), to_numpy(pooled), to_numpy(negative_pooled))


def _force_zeros(sdxl_dir: Path) -> bool:
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    return bool(index.get("force_zeros_for_empty_prompt", True))
