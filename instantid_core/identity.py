"""Identity controls from the ComfyUI InstantID node, per sample:

- `identity_start` / `identity_end`: fractions of the denoising steps during which IdentityNet and the face tokens
  act. Step i of n (0-based) is inside the window when i / n >= start and (i + 1) / n <= end, the rule diffusers'
  ControlNet pipelines apply to `control_guidance_start/end`; outside it both strengths are 0 for that sample (at
  strength 0 the adapter's attention is plain SDXL attention, bit for bit). Late steps without the identity let the
  prompt finish details; a late start lets the composition form first.
- `negative_face_noise`: the negative branch of classifier-free guidance sees the Resampler of a zero embedding in
  the reference; with noise > 0 it sees uniform noise in [0, noise) instead (the node's `noise` input), drawn from
  the sample's seed so the image stays reproducible. Pushing away from a noisy face rather than from "no face"
  tends to soften the over-saturated look strong identity settings give.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .denoise_types import Conditioning

_NOISE_SEED_OFFSET = 0x1D_F4CE  # the negative face's generator is not the latents' (same seed, other stream)


def windows(spans: list[tuple[float, float]]) -> torch.Tensor | None:
    """(B, 2) float64 CPU tensor of (start, end) per sample, or None when every sample acts on every step."""
    if all(span == (0.0, 1.0) for span in spans):
        return None
    return torch.tensor(spans, dtype=torch.float64)


def active(window: torch.Tensor, index: int, steps: int) -> torch.Tensor:
    """(B,) bool: which samples' identity acts at step `index` of `steps`."""
    return (index / steps >= window[:, 0]) & ((index + 1) / steps <= window[:, 1])


def at_step(cond: Conditioning, index: int, steps: int) -> Conditioning:
    """The conditioning of one step: IdentityNet and face-token strengths zeroed for samples outside their window
    (`cond` itself, untouched, when no sample has a window)."""
    if cond.identity_window is None:
        return cond
    keep = active(cond.identity_window, index, steps)
    if bool(keep.all()):
        return cond
    both = torch.cat([keep, keep]).to(cond.adapter_scale.device)  # (2B,): uncond, cond halves
    net_scale = cond.identitynet_scale * both.to(cond.identitynet_scale.dtype)[:, None, None, None]
    others = tuple(replace(o, adapter_scale=o.adapter_scale * both.to(o.adapter_scale.dtype),
                           identitynet_scale=o.identitynet_scale * both.to(o.identitynet_scale.dtype)[:, None, None,
                                                                                                       None])
                   for o in cond.other_identities)  # identities 2..K follow the sample's window too
    return replace(cond, adapter_scale=cond.adapter_scale * both.to(cond.adapter_scale.dtype),
                   identitynet_scale=net_scale, other_identities=others)


def negative_faces(noise: list[float], seeds: list[int], face: torch.Tensor) -> torch.Tensor:
    """(B, 1, D) negative face embeddings: zeros, or uniform [0, noise) from each sample's seed."""
    negative = torch.zeros_like(face)
    for row, (amount, seed) in enumerate(zip(noise, seeds, strict=True)):
        if amount > 0:
            generator = torch.Generator("cpu").manual_seed((seed + _NOISE_SEED_OFFSET) % 2**63)
            draw = torch.rand(face.shape[1:], generator=generator, dtype=torch.float32) * amount
            negative[row] = draw.to(face.device, face.dtype)
    return negative
