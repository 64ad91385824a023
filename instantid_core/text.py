"""PromptEncoder: SDXL's two CLIP text encoders, through diffusers' own `encode_prompt`
(penultimate hidden states of both encoders, pooled output of encoder 2, zeros for an empty negative prompt).

Weighted prompts (`(word:1.3)`, see `weighting`) and prompts longer than CLIP's 77 tokens are encoded by compel
(per-token weights, the prompt cut into 77-token chunks each with its own start/end tokens, concatenated), per
encoder exactly as diffusers joins them; a prompt without weights that fits in 77 tokens takes diffusers' path
unchanged. The pooled embedding is always the one diffusers computes from the first 77 tokens of the text without
its weight syntax (as compel does too): CLIP has one pooled vector per chunk, SDXL takes one.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from compel import Compel, ReturnedEmbeddingsType
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .config import NO_STYLE, PipelineSettings
from .handoff import PromptEmbeds
from .styles import apply_style, load_styles
from .weight_layout import load_variant
from .weighting import is_weighted, parse_weighted_prompt, plain_text


class PromptEncoder:
    """Encodes (prompt, negative prompt, style) with SDXL's two text encoders."""

    def __init__(self, sdxl_dir: Path, settings: PipelineSettings) -> None:
        dtype = getattr(torch, settings.dtype)
        self.device = torch.device(settings.device)
        def load(cls: Any, folder: Path) -> Any:  # the fp16 files when the dtype is half and they are there
            return cls.from_pretrained(folder, torch_dtype=dtype, variant=load_variant(folder, settings.dtype))

        # A pipeline holding only the text parts, so encoding is diffusers' own code, not a copy of it.
        self._pipe = StableDiffusionXLPipeline(
            vae=None, unet=None, scheduler=None,
            text_encoder=load(CLIPTextModel, sdxl_dir / "text_encoder").to(self.device),
            text_encoder_2=load(CLIPTextModelWithProjection, sdxl_dir / "text_encoder_2").to(self.device),
            tokenizer=CLIPTokenizer.from_pretrained(sdxl_dir / "tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(sdxl_dir / "tokenizer_2"),
            force_zeros_for_empty_prompt=_force_zeros(sdxl_dir),
        )
        self._pipe.set_progress_bar_config(disable=True)
        self.styles = load_styles(settings)  # built-in presets + the operator's
        self._force_zeros = self._pipe.config.force_zeros_for_empty_prompt
        # One compel per encoder (compel's own multi-encoder mode is deprecated), giving what encode_prompt takes
        # from each: the penultimate hidden states, not normalised; long prompts chunked, not truncated.
        self._compel = [
            Compel(tokenizer=tokenizer, text_encoder=encoder, truncate_long_prompts=False, device=str(self.device),
                   returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED)
            for tokenizer, encoder in ((self._pipe.tokenizer, self._pipe.text_encoder),
                                       (self._pipe.tokenizer_2, self._pipe.text_encoder_2))
        ]
        # transformers sets padding/truncation on the shared Rust tokenizer on every call: concurrent callers
        # would see each other's settings, so encoding is serialised (it takes milliseconds).
        self._lock = threading.Lock()

    @torch.inference_mode()
    def encode(self, prompt: str, negative_prompt: str = "", style: str = NO_STYLE) -> PromptEmbeds:
        """Encode one prompt pair after applying the style template; both may carry `(word:1.3)` weights and be
        longer than 77 tokens (then both come back as the same number of 77-token chunks)."""
        prompt, negative_prompt = apply_style(self.styles, style, prompt, negative_prompt)
        positive, negative_parts = parse_weighted_prompt(prompt), parse_weighted_prompt(negative_prompt)
        plain, plain_negative = plain_text(positive), plain_text(negative_parts)
        with self._lock:
            embeds, negative, pooled, negative_pooled = self._pipe.encode_prompt(
                prompt=plain, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=plain_negative or None,
            )
            if (is_weighted(positive) or is_weighted(negative_parts) or self._too_long(plain)
                    or self._too_long(plain_negative)):
                embeds, negative = self._encode_weighted(positive, negative_parts, zero_negative=not plain_negative)

        def to_numpy(tensor: torch.Tensor) -> np.ndarray:
            return tensor[0].float().cpu().numpy()

        return PromptEmbeds(to_numpy(embeds), to_numpy(negative), to_numpy(pooled), to_numpy(negative_pooled))

    def _too_long(self, text: str) -> bool:
        return any(len(tokenizer(text).input_ids) > tokenizer.model_max_length
                   for tokenizer in (self._pipe.tokenizer, self._pipe.tokenizer_2))

    def _encode_weighted(self, positive: list[tuple[str, float]], negative: list[tuple[str, float]], *,
                         zero_negative: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, T, C) prompt and negative embeddings from compel, both padded to the longer one's chunks with
        compel's empty-prompt chunk; an empty negative is zeros when the SDXL config asks for it, as diffusers'."""
        per_encoder = []
        for compel in self._compel:
            provider = compel.conditioning_provider

            def embed(parts: list[tuple[str, float]], provider=provider) -> torch.Tensor:
                parts = parts or [("", 1.0)]  # an empty prompt is one empty fragment (compel cannot take none)
                return provider.get_embeddings_for_weighted_prompt_fragments(
                    [[text for text, _ in parts]], [[weight for _, weight in parts]], device=str(self.device))

            per_encoder.append(compel.pad_conditioning_tensors_to_same_length([embed(positive), embed(negative)]))
        embeds = torch.cat([pair[0] for pair in per_encoder], dim=-1)  # (1, T, C1 + C2), as encode_prompt joins
        negative_embeds = torch.cat([pair[1] for pair in per_encoder], dim=-1)
        if zero_negative and self._force_zeros:
            negative_embeds = torch.zeros_like(embeds)
        return embeds, negative_embeds


def _force_zeros(sdxl_dir: Path) -> bool:
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    return bool(index.get("force_zeros_for_empty_prompt", True))
