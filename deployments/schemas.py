"""Request/response models shared by the HTTP API and the Python handle API, and the small plain payloads that
travel between deployments (numpy arrays and dataclasses only: never a torch tensor, never a model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from instantid_core.config import MAX_IDENTITIES, GenerateParams, IdentityParams
from instantid_core.detail import FaceDetailReport
from instantid_core.errors import InvalidParameter
from instantid_core.handoff import FaceCondition, PromptEmbeds
from instantid_core.safety import SafetyReport
from instantid_core.scoring import IdentityReport
from instantid_core.storage import check_prefix


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefix: str | None = Field(None, max_length=200, description="Sub-prefix under the configured output URI.")
    format: Literal["png", "jpeg", "webp"] = "png"
    url_ttl_s: int | None = Field(
        None, ge=0, title="Link lifetime (s)", description="Lifetime in seconds of the response's `urls` (links "
        "that expire); default the server's links.default_ttl_s (an hour), at most its links.max_ttl_s (a week); "
        "0: no links.")

    @field_validator("prefix")
    @classmethod
    def _safe_prefix(cls, value: str | None) -> str | None:
        # Checked here, not only in the writer, so a bad prefix costs no denoising.
        if value is not None:
            try:
                check_prefix(value)
            except InvalidParameter as exc:
                raise ValueError(exc.message) from None
        return value


class IdentityInput(IdentityParams):
    """One identity of `GenerateRequest.identities`: its photos plus where it goes and how strongly."""

    face_image: str | list[str] = Field(..., description="Base64 image or s3:// URI; a list averages several "
                                        "photos of this person.")


class GenerateRequest(GenerateParams):
    """POST /v1/generate body and the handle API's argument: the parameters plus the images."""

    model_config = ConfigDict(extra="forbid")

    face_image: str | list[str] | None = Field(
        None, description="Base64 image, or an s3:// URI in an allowed bucket; a list averages several photos. "
        "Required unless `identities` is given.")
    identities: list[IdentityInput] | None = Field(None, min_length=1, max_length=MAX_IDENTITIES, description=(
        f"Several people in one image (up to {MAX_IDENTITIES}), instead of face_image: each with its photos and a "
        "box (x1, y1, x2, y2 output pixels, not overlapping), a pose or keypoints, or none (then the pose photo's "
        "faces, left to right); each acts only in its region. Optional identitynet_strength/adapter_strength."))
    pose_image: str | None = Field(None, description="Take the face keypoints (pose) from this image.")
    init_image: str | None = Field(None, description="img2img / inpainting: start from this photo (base64 or s3://); "
                                   "the output takes its size unless width/height are given.")
    mask_image: str | None = Field(None, description="With init_image: white = regenerate, black = keep (resized "
                                   "to the init image when its size differs).")
    output: OutputSpec = Field(default_factory=OutputSpec)
    safety_checker: bool = Field(True, description="false: skip the safety checker for this request; only where "
                                 "the operator allows it (`safety.allow_request_disable`), otherwise a 400.")

    @model_validator(mode="after")
    def _one_face_form(self) -> GenerateRequest:
        if self.face_image is not None and self.identities is not None:
            raise ValueError("identities: give face_image (one person) or identities, not both")
        if self.face_image is None and self.identities is None:
            raise ValueError("face_image: required (or identities, for several people)")
        return self

    def params(self) -> GenerateParams:
        return GenerateParams.model_validate(self.model_dump(
            exclude={"face_image": True, "pose_image": True, "init_image": True, "mask_image": True, "output": True,
                     "safety_checker": True, "identities": {"__all__": {"face_image"}}}))


class GenerateResponse(BaseModel):
    request_id: str
    seed: int
    width: int
    height: int
    images: list[str] = Field(description="Output URIs, one per image.")
    metadata: str = Field(description="URI of the sidecar JSON (parameters, seed, weights, timings).")
    timings_ms: dict[str, float] = Field(default_factory=dict, description="Per-stage wall time.")
    batch_size: int = Field(1, description="Images in the denoiser batch this request ran in.")
    cache_hits: dict[str, bool] = Field(default_factory=dict, description="Whether the face and prompt stages "
                                        "answered from their caches.")
    inline_images: list[str] | None = Field(None, description="Base64 images when ?inline=true.")
    denoiser_replica: str | None = Field(None, description="The Denoiser replica that ran the request (requests "
                                         "for one LoRA set are routed to replicas that hold it).")
    urls: list[str] | None = Field(None, description="Links that expire, one per image, for clients without "
                                   "storage credentials: presigned HTTPS GET URLs for s3:// outputs, signed links "
                                   "to /v1/outputs for file:// outputs; 403 once expired. Absent with "
                                   "output.url_ttl_s 0.")
    urls_expire_at: int | None = Field(None, description="Unix time the `urls` expire (output.url_ttl_s after the "
                                       "images were written).")
    notice: str | None = Field(None, description="Set while the server runs the tiny preset: its weights are random, "
                               "its images noise, and how to serve real weights.")
    safety: SafetyReport | None = Field(None, description="The safety stage: per generated image `flagged` (block "
                                        "mode: flagged ones are `withheld`, not in `images`), or `checked: false` "
                                        "and the reason.")
    identity: IdentityReport | None = Field(None, description="With the server's `scoring`: per image its identity "
                                            "score (cosine to the reference; null: no face found) and seed, and how "
                                            "many candidates ran (best_of, min_identity).")
    face_detail: FaceDetailReport | None = Field(None, description="With face_detail auto | on: whether the detail "
                                                 "pass ran per image, and (with scoring) the identity score before "
                                                 "and after.")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    images: list[int] | None = Field(None, description="unsafe_content: the images (generation order) the safety "
                                     "checker flagged.")


class ErrorBody(BaseModel):
    error: ErrorDetail


class JobRequest(GenerateRequest):
    """POST /v1/jobs body and `submit_job`'s argument: a GenerateRequest plus where to report the end."""

    webhook_url: str | None = Field(None, max_length=2048, description="POST the job's final status JSON here "
                                    "when it ends; the host must be in the server's allowed_webhook_hosts.")

    def generate_request(self) -> GenerateRequest:
        return GenerateRequest.model_validate(self.model_dump(exclude={"webhook_url"}))


class JobProgress(BaseModel):
    step: int = Field(description="Denoising steps done.")
    steps: int = Field(description="Denoising steps in all.")


class WebhookDelivery(BaseModel):
    delivered: bool
    attempts: int
    status_code: int | None = Field(None, description="The receiver's last HTTP status, if it answered.")
    error: str | None = None


class JobStatus(BaseModel):
    job_id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: JobProgress | None = Field(None, description="While running: denoising steps done of all.")
    result: GenerateResponse | None = Field(None, description="When done: the /v1/generate response.")
    error: ErrorDetail | None = Field(None, description="When failed: what went wrong (typed, as HTTP errors).")
    cancel_requested: bool | None = Field(None, description="A cancel was asked for; a running job stops at its "
                                          "next denoising step.")
    created_at: float | None = Field(None, description="Unix time the job was queued.")
    updated_at: float | None = Field(None, description="Unix time of the last change of status.")
    started_at: float | None = Field(None, description="Unix time a consumer last started it.")
    attempts: int = Field(0, description="Times a consumer started it (more than 1 after a redelivery).")
    webhook: WebhookDelivery | None = Field(None, description="How the webhook call went, once it was made.")


# --- payloads between deployments ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaceResult:
    condition: FaceCondition
    seconds: float
    cache_hit: bool


@dataclass(frozen=True)
class PromptResult:
    embeds: PromptEmbeds
    seconds: float
    cache_hit: bool


@dataclass(frozen=True)
class DenoiseResult:
    images: np.ndarray  # (num_images, H, W, 3) uint8
    width: int
    height: int
    batch_size: int  # images in the batch this request ran in
    timings: dict[str, float] = field(default_factory=dict)  # seconds: face, prompt, queue, denoise
    cache_hits: dict[str, bool] = field(default_factory=dict)  # face, prompt
    replica_id: str | None = None  # the Denoiser replica that ran it (LoRA sets route by replica)
    as_run: dict = field(default_factory=dict)  # scheduler/steps/guidance as run (a LoRA preset may set them)
    # the identities form: (box, keypoints) per identity as placed on the output, for the sidecar
    layout: list[tuple[list[float], list[list[float]]]] | None = None
    flagged: list[bool] | None = None  # per image, set by the SafetyChecker; None: no checker looked at them
    identity: IdentityReport | None = None  # per image score and seed, set by FaceAnalysis.score (with `scoring`)
    face_detail: FaceDetailReport | None = None  # set by Denoiser.detail (face_detail auto | on)
