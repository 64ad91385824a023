"""What one stage hands the next across processes (face analysis -> denoiser, prompt encoder -> denoiser): plain
numpy arrays, no torch, so the processes that only pass them on (the Ingress, the writer) never import a model
library."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IdentityFace:
    """One identity of a request with several (issue 23), placed on the output."""

    embedding: np.ndarray  # (512,) mean over its photos
    kps_image: np.ndarray  # (H, W, 3) uint8 its keypoints drawn at the output size
    keypoints: np.ndarray  # (5, 2) float32 output pixels (recorded in the sidecar)
    face_box: tuple[float, float, float, float]  # output pixels: its region


@dataclass(frozen=True)
class FaceCondition:
    """What the denoiser needs from the face stage: plain arrays, small enough to cross processes."""

    embedding: np.ndarray  # (512,) identity: mean over the reference photos
    kps_image: np.ndarray  # (H, W, 3) uint8, keypoints drawn at the output size
    face_box: tuple[float, float, float, float]  # output pixels
    width: int
    height: int
    det_score: float
    init_image: np.ndarray | None = None  # (H, W, 3) uint8 img2img / inpainting photo at the output size
    mask: np.ndarray | None = None  # (H, W) uint8, 255 = regenerate (mask_image and/or inpaint_face)
    # issue 23, the `identities` form: every identity in request order; the fields above are the first one's
    identities: tuple[IdentityFace, ...] = ()
    identity_reference: np.ndarray | None = None  # (512,) the scoring recogniser's mean embedding (with scoring)


@dataclass(frozen=True)
class PromptEmbeds:
    """One prompt's conditioning as plain float32 arrays (crosses process boundaries as numpy)."""

    prompt_embeds: np.ndarray  # (T, C): T = 77 per chunk of a long prompt, C = 2048 for SDXL
    negative_prompt_embeds: np.ndarray  # (T, C): padded to the prompt's chunks (or the prompt to its)
    pooled: np.ndarray  # (P,): P = 1280 for SDXL
    negative_pooled: np.ndarray  # (P,)
