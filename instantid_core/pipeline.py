"""The three InstantID stages and their glue, usable one by one (serving app, batch job) or together
(`InstantIDPipeline`, for the CLI, tests and parity checks).

    photo bytes [+ pose photo]   --face_condition--> FaceCondition (embedding, keypoint image, face box, size)
    prompt, negative, style      --PromptEncoder--> PromptEmbeds
    both + params + seed         --denoise_request--> DenoiseRequest --IdentityDenoiser--> uint8 images
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import img2img
from .conditioning import RequestPhotos, face_condition
from .config import ControlParams, GenerateParams, ModelSources, PipelineSettings, Scheduler
from .controls import ControlMap
from .denoise import BatchKey, DenoiseRequest, IdentityDenoiser
from .denoise_types import OtherIdentity
from .detail import FaceDetailReport, crop_box, detail_condition, detail_params, face_side, paste_back, wants_detail
from .face import FaceAnalyzer
from .handoff import FaceCondition, PromptEmbeds
from .images import load_image
from .loras import lora_set
from .request_rules import draw_seed
from .scorer import reference_embedding, scorer_for
from .scoring import (
    DEFAULT_MAX_CANDIDATES,
    IdentityReport,
    check_scoring_params,
    run_rounds,
)
from .text import PromptEncoder
from .weight_layout import ResolvedWeights
from .weights import resolve_weights


def denoise_request(face: FaceCondition, prompt: PromptEmbeds, params: GenerateParams, seed: int,
                    default_scheduler: Scheduler,
                    controls: tuple[ControlMap, ...] = ()) -> tuple[DenoiseRequest, BatchKey]:
    """Everything one request brings to the denoiser, and the key of the batch it may join.

    `controls`: the request's extra ControlNet maps (`ExtraControlNets.prepare`), at the output size."""
    params = params.resolved(default_scheduler)  # unset steps/guidance: the scheduler's preset
    strengths = [(params.identitynet_strength if who.identitynet_strength is None else who.identitynet_strength,
                  params.adapter_strength if who.adapter_strength is None else who.adapter_strength)
                 for who in params.identities or [params]]
    others = tuple(OtherIdentity(person.embedding, person.kps_image, person.face_box, *strength)
                   for person, strength in zip(face.identities[1:], strengths[1:], strict=True))
    request = DenoiseRequest(
        prompt=prompt, face_embedding=face.embedding, kps_image=face.kps_image, seed=seed,
        num_images=params.candidates, guidance=params.guidance, identitynet_strength=strengths[0][0],
        adapter_strength=strengths[0][1],
        # several identities are always held to their regions: that is what keeps them apart
        face_box=face.face_box if params.enhance_face_region or others else None,
        controls=controls, identity_start=params.identity_start, identity_end=params.identity_end,
        negative_face_noise=params.negative_face_noise, init_image=face.init_image, mask=face.mask,
        other_identities=others,
    )
    strength = 1.0  # text-to-image; img2img and inpainting at their strength (default per mode)
    if face.init_image is not None:
        default = img2img.INPAINT_STRENGTH if face.mask is not None else img2img.IMG2IMG_STRENGTH
        strength = params.strength if params.strength is not None else default
    key = BatchKey(face.width, face.height, params.steps, params.scheduler,
                   text_tokens=prompt.prompt_embeds.shape[0], loras=lora_set(params.loras), strength=strength,
                   identities=1 + len(others))
    return request, key


@dataclass
class GenerationResult:
    images: np.ndarray  # (num_images, H, W, 3) uint8
    seed: int
    width: int
    height: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    params: GenerateParams | None = None  # the parameters as run: unset steps/guidance/scheduler filled in
    face: FaceCondition | None = None  # where the faces went (the identities form records it in the sidecar)
    identity: IdentityReport | None = None  # with a scorer: each image's score and seed, candidates run
    face_detail: FaceDetailReport | None = None  # with face_detail auto | on: whether it ran, scores before/after


class InstantIDPipeline:
    """All three stages in one process."""

    def __init__(self, sources: ModelSources, settings: PipelineSettings | None = None,
                 weights: ResolvedWeights | None = None, *, scoring: bool = False,
                 max_candidates: int = DEFAULT_MAX_CANDIDATES) -> None:
        """`scoring`: score every image (the sources' scoring_face_pack, else the conditioning pack) and allow
        best_of / min_identity, whose rounds stop at `max_candidates` images in all."""
        self.settings = settings or PipelineSettings()
        self.weights = weights or resolve_weights(sources, dtype=self.settings.dtype)
        self.face = FaceAnalyzer(self.weights.face_pack, self.settings)
        self.text = PromptEncoder(self.weights.sdxl, self.settings)
        self.denoiser = IdentityDenoiser.from_weights(self.weights, self.settings)
        self.scorer = (scorer_for(self.weights.face_pack, self.weights.scoring_face_pack, self.settings)
                       if scoring else None)
        self.max_candidates = max_candidates

    @classmethod
    def from_root(cls, root: str | Path, settings: PipelineSettings | None = None, **options) -> InstantIDPipeline:
        return cls(ModelSources.from_root(str(root)), settings, **options)

    def generate(self, face_images: list[bytes], params: GenerateParams, pose_image: bytes | None = None,
                 seed: int | None = None, *, face_names: list[str] | None = None,
                 pose_name: str = "pose_image", init_image: bytes | None = None, mask_image: bytes | None = None,
                 init_name: str = "init_image", mask_name: str = "mask_image",
                 identity_images: list[list[bytes]] | None = None) -> GenerationResult:
        """Run face analysis, prompt encoding and denoising for one request; with `init_image` (and `mask_image`
        or `params.inpaint_face`) as img2img / inpainting; with `params.identities`, `identity_images` holds each
        identity's photos (and `face_images` is empty).

        `face_names` / `pose_name` / `init_name` / `mask_name` name the inputs in error messages (default the API
        field names); the CLI passes the file paths."""
        timings: dict[str, float] = {}
        check_scoring_params(params, self.scorer is not None, self.max_candidates)
        params = self.denoiser.loras.with_presets(params).resolved(self.settings.default_scheduler)
        seed = seed if seed is not None else (params.seed if params.seed is not None else draw_seed())
        start = time.perf_counter()
        photos = RequestPhotos(face_images, pose_image, init_image, mask_image, face_names, pose_name, init_name,
                               mask_name, identities=identity_images)
        face = face_condition(self.face, photos, params, self.settings)
        detail = wants_detail(params, face, self.settings.face_detail_below)  # face_detail: on without a face: 4xx
        timings["face"] = time.perf_counter() - start

        start = time.perf_counter()
        prompt = self.text.encode(params.prompt, params.negative_prompt, params.style)
        timings["prompt"] = time.perf_counter() - start

        start = time.perf_counter()
        controls = self.denoiser.controls.prepare(
            params.controls, [_control_image(c) for c in params.controls],
            pose_image if pose_image is not None else (face_images or identity_images[0])[0],
            (face.width, face.height))
        request, key = denoise_request(face, prompt, params, seed, self.settings.default_scheduler, controls)
        images = self.denoiser([request], key)[0]
        timings["denoise"] = time.perf_counter() - start
        if self.scorer is None or params.identities:  # several identities: no one reference to score against
            seeds = [(seed + i) % 2**63 for i in range(len(images))]
            images, report = self._face_detail(images, face, prompt, params, seeds, detail, timings)
            return GenerationResult(images, seed, face.width, face.height, timings, params, face, face_detail=report)

        start = time.perf_counter()
        photos = [load_image(data, max_pixels=self.settings.max_image_pixels, max_side=self.settings.max_image_side)
                  for data in face_images]
        reference = reference_embedding(self.scorer, photos, params.face_index)

        def run_round(_pairs: list[int], first_seeds: list[int]) -> list[np.ndarray]:
            return [self.denoiser([replace(request, seed=first)], key)[0] for first in first_seeds]

        def score(_pair: int, candidates: np.ndarray) -> list[float | None]:
            return self.scorer.score(candidates, reference, face.face_box)

        ((images, identity),) = run_rounds(run_round, [seed], [params], score, self.max_candidates,
                                           self.scorer.same_model)
        timings["score"] = time.perf_counter() - start
        images, report = self._face_detail(images, face, prompt, params, identity.seeds, detail, timings,
                                           (reference, identity.scores))
        return GenerationResult(images, seed, face.width, face.height, timings, params, face, identity, report)

    def _face_detail(self, images: np.ndarray, face: FaceCondition, prompt: PromptEmbeds, params: GenerateParams,
                     seeds: list[int], run: bool, timings: dict[str, float],
                     scored: tuple[np.ndarray | None, list[float | None]] | None = None
                     ) -> tuple[np.ndarray, FaceDetailReport | None]:
        """The detail pass on each image (its own seed), when `run`; the report whenever face_detail is not off."""
        if params.face_detail == "off":
            return images, None
        report = FaceDetailReport(mode=params.face_detail, ran=[run] * len(images), face_side=face_side(face))
        if not run:
            return images, report
        start = time.perf_counter()
        box, size = crop_box(face), self.settings.face_detail_size
        detailed = []
        for image, image_seed in zip(images, seeds, strict=True):
            request, key = denoise_request(detail_condition(face, image, box, size), prompt, detail_params(params),
                                           image_seed, self.settings.default_scheduler)
            detailed.append(paste_back(image, self.denoiser([request], key)[0][0], face, box))
        images = np.stack(detailed)
        if scored is not None and self.scorer is not None:
            reference, before = scored
            report.identity_before, report.identity_after = before, self.scorer.score(images, reference,
                                                                                      face.face_box)
        timings["face_detail"] = time.perf_counter() - start
        return images, report


def _control_image(control: ControlParams) -> bytes | None:
    """A control's own image as bytes (the library takes base64 in the params, like the HTTP API)."""
    return base64.b64decode(control.image) if control.image else None
