"""Region control, the demo's "enhance face region": the face box limits the face's influence in two places.

1. IdentityNet's residuals are multiplied by the box mask, resized *bilinearly* to each residual's resolution.
2. In every cross-attention layer of the UNet, the face tokens' attention output is multiplied by the box mask,
   resized *nearest* to that layer's resolution, before it is scaled and added to the text attention.

Both halves of classifier-free guidance are masked, as in the demo. The masks are per sample: they travel with
each call (`cross_attention_kwargs`), never as state on a module, so requests with and without a box, or with
different boxes, share one batch. A sample without a box gets an all-ones mask (multiplying by 1 is exact).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# What the cross-attention processors receive: tokens of a layer (h * w) -> (B, h * w, 1) mask at that layer.
AttentionMasks = dict[int, torch.Tensor]


def face_box_mask(box: tuple[float, float, float, float] | None, size: tuple[int, int], *,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (1, H, W) mask: 1 inside the face box, 0 outside; all ones when `box` is None.

    The corners are truncated with `int()` as the demo does (`x1, y1, x2, y2 = int(x1), ...`), so a box of
    (10.9, 5.2, 40.7, 30.1) covers columns 10..39 and rows 5..29. Corners left of or above the image are clamped to
    0 (the demo's numpy slice would wrap a negative start around and leave the mask empty).
    """
    height, width = size
    if box is None:
        return torch.ones(1, height, width, device=device, dtype=dtype)
    x1, y1, x2, y2 = (max(int(v), 0) for v in box)
    mask = torch.zeros(1, height, width, device=device, dtype=dtype)
    mask[:, y1:y2, x1:x2] = 1.0
    return mask


def latent_levels(height: int, width: int, vae_scale_factor: int, levels: int) -> list[tuple[int, int]]:
    """(h, w) of the UNet's feature maps at each level: the latent size, then halved by each stride-2 conv
    (kernel 3, padding 1: ceil(n / 2))."""
    h, w = height // vae_scale_factor, width // vae_scale_factor
    sizes = [(h, w)]
    for _ in range(levels - 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    return sizes


def attention_masks(masks: torch.Tensor, sizes: list[tuple[int, int]]) -> AttentionMasks:
    """(B, 1, H, W) image-size masks -> {h * w: (B, h * w, 1)} per UNet level, resized nearest (the demo's
    `F.interpolate(..., mode='nearest')` of the full-size mask to the layer's resolution)."""
    out: AttentionMasks = {}
    for h, w in sizes:
        resized = F.interpolate(masks, size=(h, w), mode="nearest")  # (B, 1, h, w)
        out[h * w] = resized.flatten(2).transpose(1, 2)  # (B, h * w, 1), in the order of the layer's tokens
    return out


def residual_mask(masks: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) image-size masks resized bilinearly to a residual's (h, w), as the demo's `control_mask`
    (`F.interpolate(mask, (h // scale, w // scale), mode='bilinear')`), in the residual's dtype."""
    return F.interpolate(masks.to(residual.dtype), size=residual.shape[-2:], mode="bilinear")
