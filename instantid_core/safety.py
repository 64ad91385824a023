"""The safety stage: diffusers' CompVis `StableDiffusionSafetyChecker` (a CLIP vision model and concept embeddings,
`CompVis/stable-diffusion-safety-checker`) with its `CLIPImageProcessor`, and what a mode does to flagged images.

`SafetyChecker.check` gives diffusers' own verdict per image (its `forward`), plus each image's score (the largest
concept score, cosine minus threshold as diffusers computes it: above 0 is flagged), read from the same pass.
`apply_safety` is the one place the modes act, shared by the serving app's writer and the batch job:
block = flagged images are not written (UnsafeContent when none is left), blur = written blurred, flag = written.
Every output records a `SafetyReport`: per image `flagged`, or `checked: false` and the reason no checker ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter
from pydantic import BaseModel, Field

from .config import PipelineSettings, SafetyMode
from .errors import UnsafeContent

if TYPE_CHECKING:
    import torch

NOT_CONFIGURED = "no safety stage is configured (the app config has no `safety`)"
DISABLED_BY_REQUEST = "disabled by the request (safety_checker: false)"
BLUR_FRACTION = 8  # blur radius = the shorter side / this: nothing recognisable is left


class SafetyReport(BaseModel):
    """What the safety stage did to one request's images (response, sidecar, job result, batch manifest)."""

    checked: bool = Field(description="Whether a safety checker looked at the images.")
    mode: SafetyMode | None = Field(None, description="What was done to flagged images (when checked).")
    flagged: list[bool] | None = Field(None, description="Per generated image, in generation order: flagged by "
                                       "the checker. null when no checker ran (see `reason`).")
    withheld: list[int] = Field(default_factory=list, description="block mode: the generated images (indices) "
                                "that were not written; `images` lists the others in order.")
    reason: str | None = Field(None, description="Why no checker ran.")

    @classmethod
    def unchecked(cls, reason: str) -> SafetyReport:
        return cls(checked=False, reason=reason)


@dataclass(frozen=True)
class SafetyVerdict:
    flagged: list[bool]  # diffusers' decision per image
    scores: list[float]  # the largest concept score per image (cosine - threshold, + the special-care adjustment)


class SafetyChecker:
    """A StableDiffusionSafetyChecker folder in the published layout, loaded once."""

    def __init__(self, folder: Path, settings: PipelineSettings | None = None) -> None:
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        settings = settings or PipelineSettings()
        self.device, self.dtype = torch.device(settings.device), getattr(torch, settings.dtype)
        self.model = StableDiffusionSafetyChecker.from_pretrained(folder, torch_dtype=self.dtype).to(self.device)
        self.model.eval()
        self.processor = CLIPImageProcessor.from_pretrained(folder)

    def check(self, images: np.ndarray) -> SafetyVerdict:
        """`images`: (N, H, W, 3) uint8. Never changes them (diffusers' forward blacks out its own copy)."""
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        if len(images) == 0:
            return SafetyVerdict([], [])
        clip_input = self.processor(images=list(images), return_tensors="pt").pixel_values
        embeds: list[torch.Tensor] = []
        # diffusers' forward returns only its decision; its image embeddings are caught on the way for the scores.
        hook = self.model.visual_projection.register_forward_hook(lambda _m, _i, out: embeds.append(out))
        try:
            with torch.inference_mode():
                _, flagged = self.model(clip_input=clip_input.to(self.device, self.dtype),
                                        images=np.zeros((len(images), 1, 1, 3), np.float32))
        finally:
            hook.remove()
        model = self.model
        with torch.inference_mode():
            special = cosine_distance(embeds[0], model.special_care_embeds) - model.special_care_embeds_weights
            adjustment = (special > 0).any(dim=1, keepdim=True) * 0.01
            concept = cosine_distance(embeds[0], model.concept_embeds) - model.concept_embeds_weights + adjustment
        scores = concept.max(dim=1).values.float().cpu().tolist()
        return SafetyVerdict([bool(f) for f in flagged], [round(s, 4) for s in scores])


def blur(image: np.ndarray) -> np.ndarray:
    """A Gaussian blur strong enough that nothing in the image is recognisable; same size, uint8."""
    radius = max(2, min(image.shape[:2]) // BLUR_FRACTION)
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def apply_safety(images: np.ndarray, flagged: list[bool], mode: SafetyMode) -> tuple[list[np.ndarray],
                                                                                        SafetyReport]:
    """The images to write under `mode`, in order, and the report.

    Raises:
        UnsafeContent: block mode and every image is flagged (nothing may be written).
    """
    if len(flagged) != len(images):
        raise ValueError(f"{len(flagged)} verdicts for {len(images)} images")
    report = SafetyReport(checked=True, mode=mode, flagged=list(flagged))
    if mode == SafetyMode.block:
        report.withheld = [i for i, f in enumerate(flagged) if f]
        if flagged and len(report.withheld) == len(flagged):
            raise UnsafeContent(f"the safety checker flagged every image of this request (images "
                                f"{report.withheld}); nothing was written", images=report.withheld)
        return [image for image, f in zip(images, flagged, strict=True) if not f], report
    if mode == SafetyMode.blur:
        return [blur(image) if f else image for image, f in zip(images, flagged, strict=True)], report
    return list(images), report


def safety_outcome(images: np.ndarray, flagged: list[bool] | None, mode: SafetyMode | None,
                   unchecked_reason: str) -> tuple[list[np.ndarray], SafetyReport]:
    """What the writers (serving app, batch job) write and record: `apply_safety` when a checker ran under a
    mode, otherwise the images as they are and why no checker looked at them."""
    if flagged is None or mode is None:
        return list(images), SafetyReport.unchecked(unchecked_reason)
    return apply_safety(images, flagged, mode)
