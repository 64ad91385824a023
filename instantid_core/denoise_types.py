"""The denoiser's request and batch types, in a module of their own so that the modules the denoiser uses
(`identity`, `img2img`, `memory`, `accel`) can name them without importing the denoiser."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import DEFAULT_GUIDANCE, GenerateParams, Scheduler
from .controls import ControlMap
from .handoff import PromptEmbeds
from .loras import LoraSet

_PARAMS = GenerateParams.model_fields

StepCallback = Callable[[int, int], Sequence[bool]]
"""`on_step(step, steps)`: called after each denoising step (step = steps done, 1..steps); returns, per request of
the call (in the call's order), whether that request is still wanted."""


@dataclass(frozen=True)
class OtherIdentity:
    """A second, third or fourth identity of a request (issue 23): its own face, keypoint image, region and
    strengths. The request's own fields hold the first identity, so a one-identity request is today's request."""

    face_embedding: np.ndarray  # (512,) raw ArcFace embedding (mean over its photos)
    kps_image: np.ndarray  # (H, W, 3) uint8 its keypoints drawn at the output size
    face_box: tuple[float, float, float, float]  # output pixels: its region (required: regions keep faces apart)
    identitynet_strength: float = _PARAMS["identitynet_strength"].default
    adapter_strength: float = _PARAMS["adapter_strength"].default


@dataclass(frozen=True)
class DenoiseRequest:
    """One request's conditioning; all arrays are plain numpy so it can cross a process boundary."""

    prompt: PromptEmbeds
    face_embedding: np.ndarray  # (512,) raw ArcFace embedding
    kps_image: np.ndarray  # (H, W, 3) uint8 keypoint image at the output size
    seed: int
    num_images: int = 1
    # Defaults for callers that build requests by hand (tests, benchmarks); requests from GenerateParams get every
    # value from it (pipeline.denoise_request), so these are its defaults, read from the model.
    guidance: float = DEFAULT_GUIDANCE
    identitynet_strength: float = _PARAMS["identitynet_strength"].default
    adapter_strength: float = _PARAMS["adapter_strength"].default
    face_box: tuple[float, float, float, float] | None = None  # output pixels; region control (`regions`) when set
    controls: tuple[ControlMap, ...] = ()  # extra ControlNets (canny/depth/pose), maps at the output size
    # issue 12 (`identity`, `img2img`): when IdentityNet and the face tokens act, the negative face, the photo
    identity_start: float = _PARAMS["identity_start"].default  # fraction of the steps run before they start acting
    identity_end: float = _PARAMS["identity_end"].default  # fraction of the steps after which they stop
    # uniform noise in [0, this) as the negative branch's face embedding
    negative_face_noise: float = _PARAMS["negative_face_noise"].default
    init_image: np.ndarray | None = None  # (H, W, 3) uint8: img2img / inpainting starts from this photo
    mask: np.ndarray | None = None  # (H, W) uint8, 255 = regenerate (inpainting); needs init_image
    # issue 23: identities 2..K, each in its own region; with any, `face_box` (the first identity's region) is set
    other_identities: tuple[OtherIdentity, ...] = ()


@dataclass(frozen=True)
class BatchKey:
    """What requests must share to run in one batch."""

    width: int
    height: int
    steps: int
    scheduler: Scheduler
    text_tokens: int = 77  # prompt length: 77 per chunk of a long prompt (longer prompts attend over more tokens)
    loras: LoraSet = ()  # sorted (name, scale): one forward activates one LoRA set
    strength: float = 1.0  # img2img strength (the steps skipped are shared); 1: from noise, any mode may join
    identities: int = 1  # faces in the image: each adds an IdentityNet pass and face tokens, the same for a batch


@dataclass(frozen=True)
class IdentityConditioning:
    """One further identity's per-sample tensors (layout as Conditioning's): its face tokens, keypoint images,
    strengths and region masks. Identity 1 lives in Conditioning's own fields."""

    face_tokens: torch.Tensor  # (2B, 16, C) Resampler of the negative face (uncond) then of this face
    control: torch.Tensor  # (2B, 3, H, W) its keypoint images in [0, 1]
    identitynet_scale: torch.Tensor  # (2B, 1, 1, 1)
    adapter_scale: torch.Tensor  # (2B,)
    region_masks: torch.Tensor  # (2B, 1, H, W) its region
    attention_masks: dict[int, torch.Tensor]  # its region per cross-attention token count: (2B, h * w, 1)


@dataclass(frozen=True)
class Conditioning:
    """Per-sample tensors of one call, laid out [uncond samples..., cond samples...] as diffusers' pipelines do
    (`guidance` has one row per sample). Every tensor's first dimension is per sample, so `select_samples` can
    drop a request's rows from all of them."""

    text: torch.Tensor  # (2B, 77, C) negative then positive prompt embeddings
    face_tokens: torch.Tensor  # (2B, 16, C) Resampler of a zero embedding (uncond) then of the face
    unet_states: torch.Tensor  # (2B, 77 + 16, C) what the UNet's cross-attention sees
    added: dict[str, torch.Tensor]  # SDXL's added conditioning: text_embeds (2B, P), time_ids (2B, 6)
    control: torch.Tensor  # (2B, 3, H, W) keypoint images in [0, 1]
    identitynet_scale: torch.Tensor  # (2B, 1, 1, 1) IdentityNet strength
    adapter_scale: torch.Tensor  # (2B,) face-token attention strength
    guidance: torch.Tensor  # (B, 1, 1, 1) CFG scale
    region_masks: torch.Tensor | None = None  # (2B, 1, H, W) face-box masks (region control), None: no box
    attention_masks: dict[int, torch.Tensor] | None = None  # the same masks per cross-attention token count
    # extra ControlNets in use: type -> (maps (2B, 3, H, W), strengths (2B, 1, 1, 1)); empty: none
    extra_controls: dict = field(default_factory=dict)
    identity_window: torch.Tensor | None = None  # (B, 2) CPU (start, end) fractions; None: every step
    init_latents: torch.Tensor | None = None  # (B, 4, h, w) VAE latents of the init photos (zeros without one)
    inpaint_mask: torch.Tensor | None = None  # (B, 1, h, w) 1 = generate, 0 = follow the init photo's latents
    noise: torch.Tensor | None = None  # (B, 4, h, w) the initial noise, re-added to the init latents every step
    other_identities: tuple[IdentityConditioning, ...] = ()  # identities 2..K (BatchKey.identities - 1 of them)
