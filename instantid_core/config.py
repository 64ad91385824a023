"""Pydantic models for everything a user can configure: weight sources, pipeline settings,
per-request generation parameters. One source of truth for the CLI, the serving app and the batch job."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from .poses import MIN_BOX_SIDE, PosePreset

DEFAULT_STEPS = 30  # the published InstantID defaults (README, gradio_demo/app.py): 30 steps ...
DEFAULT_GUIDANCE = 5.0  # ... at guidance 5
# LCM fast mode: what the InstantID demo switches to when "Enable Fast Inference with LCM" is ticked
# (gradio_demo/app.py, toggle_lcm_ui: steps 5, guidance 1.5). 30 steps at guidance 5 burn LCM images.
LCM_STEPS = 5
LCM_GUIDANCE = 1.5
MIN_SIDE = 64
MAX_SIDE = 2048
LCM_LORA_DIR = "lcm-lora-sdxl"  # where `instantid weights download` puts an LCM-LoRA under a weights root
LORAS_DIR, CONTROLNETS_DIR, DEPTH_ESTIMATOR_DIR = "loras", "controlnets", "depth-estimator"  # extensions, same root
SAFETY_CHECKER_DIR = "safety-checker"  # the CompVis checker's layout (config.json, weights, preprocessor_config.json)
SCORING_FACE_PACK_DIR = "buffalo_l"  # the identity scorer's insightface pack (issue 26), beside antelopev2/
MAX_BEST_OF = 8  # candidates one request may ask for (`best_of`); an operator may allow fewer
DEFAULT_CONTROLS = ("canny", "depth")


class Scheduler(str, Enum):
    """Schedulers a request may pick; all share the SDXL scheduler config on disk."""

    euler = "euler"
    euler_ancestral = "euler_ancestral"
    dpmpp_2m_karras = "dpmpp_2m_karras"
    ddim = "ddim"
    unipc = "unipc"
    lcm = "lcm"


NO_STYLE = "No style"


def canonical_style(name: str) -> str:
    """A style name as the presets are keyed: the demo's "(No style)" is "No style"."""
    return NO_STYLE if name.strip() in (NO_STYLE, f"({NO_STYLE})") else name


class StylePreset(BaseModel):
    """One prompt style: `prompt` is a template with `{prompt}` where the user's prompt goes; `negative` comes
    before the user's negative prompt."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., max_length=2000)
    negative: str = Field("", max_length=2000)

    @field_validator("prompt")
    @classmethod
    def _has_placeholder(cls, value: str) -> str:
        if "{prompt}" not in value:
            raise ValueError("must contain {prompt}, where the user's prompt goes")
        return value


class Style(str, Enum):
    """The built-in style names (instantid_core/styles.yaml, the InstantID demo's); operators may add more."""

    none = "No style"
    watercolor = "Watercolor"
    film_noir = "Film Noir"
    neon = "Neon"
    jungle = "Jungle"
    mars = "Mars"
    vibrant_color = "Vibrant Color"
    snow = "Snow"
    line_art = "Line art"


# --- extensions: per-request LoRAs and extra ControlNets (logic in `loras` and `controls`) ------------------------
MAX_LORAS_PER_REQUEST = 3
MAX_CONTROLS_PER_REQUEST = 3
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class LoraWeight(BaseModel):
    """One LoRA a request asks for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., pattern=LORA_NAME_PATTERN, description="A LoRA registered on the server (`loras:`).")
    scale: float = Field(1.0, ge=-2.0, le=2.0, description="Adapter scale; 0 is exactly no LoRA.")


class LoraEntry(BaseModel):
    """A LoRA registry entry: where the file is, and optionally the sampling preset it was trained for (few-step
    LoRAs: LCM, SDXL-Lightning, Hyper-SD, TCD), used for the fields a request leaves unset."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., description="A .safetensors file, a folder or s3:// prefix (each .safetensors file "
                        "in it becomes a name: its stem), or a hub id `org/repo[/file.safetensors][@rev]`.")
    scheduler: Scheduler | None = None
    steps: int | None = Field(None, ge=1, le=100)
    guidance: float | None = Field(None, ge=0.0, le=20.0)

    def preset(self) -> dict:
        return {k: v for k, v in (("scheduler", self.scheduler), ("steps", self.steps),
                                  ("guidance", self.guidance)) if v is not None}


class SafetyMode(str, Enum):
    """What happens to an image the safety checker flags (instantid_core/safety.py)."""

    block = "block"  # never written; a request whose images are all flagged fails (unsafe_content)
    blur = "blur"  # written blurred beyond recognition
    flag = "flag"  # written as it is, marked flagged


class ControlType(str, Enum):
    canny = "canny"
    depth = "depth"
    pose = "pose"


class PoseParams(BaseModel):
    """Where the face goes and which way it turns, without a pose photo (instantid_core/poses.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: PosePreset = Field(PosePreset.frontal, description="The face template turned: "
                               f"{', '.join(p.value for p in PosePreset)} (directions are the image's).")
    box: tuple[float, float, float, float] = Field(..., description="x1, y1, x2, y2 in output pixels: the face's "
                                                   f"square fits the box's shorter side (at least {MIN_BOX_SIDE} px).")


MAX_IDENTITIES = 4  # issue 23: each identity adds an IdentityNet pass and a face-token attention per layer


class IdentityParams(BaseModel):
    """One of several identities in one image (`GenerateParams.identities`); its photos travel beside the parameters.
    Where it goes: `box` (its region; without `pose`/`keypoints` a frontal face is placed in it), `pose`,
    `keypoints`, or else the next face, left to right, of the pose photo."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    box: tuple[float, float, float, float] | None = Field(None, description="x1, y1, x2, y2 in output pixels: the "
                                                          "region this identity acts in (boxes must not overlap).")
    identitynet_strength: float | None = Field(None, ge=0.0, le=1.5, description="Default: the request's.")
    adapter_strength: float | None = Field(None, ge=0.0, le=1.5, description="Default: the request's.")
    pose: PoseParams | None = Field(None, description="A pose preset in a box (its box is the region unless `box` is "
                                    "given).")
    keypoints: list[tuple[float, float]] | None = Field(None, min_length=5, max_length=5, description="Five points in "
                                                        "output pixels, as the request-level `keypoints`.")

    @field_validator("identitynet_strength", "adapter_strength")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class ControlParams(BaseModel):
    """One extra ControlNet a request asks for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ControlType
    strength: float = Field(0.5, ge=0.0, le=2.0, description="Residual scale; 0 is exactly without it.")
    image: str | None = Field(None, description="Base64 image or s3:// URI: the canny/depth input (default: the "
                              "pose photo, else the face photo); for pose, the pose map itself (required).")


def _unique(values: list, what: str, limit: int, key) -> list:
    if len(values) > limit:
        raise ValueError(f"at most {limit} {what}s per request, got {len(values)}")
    keys = [key(v) for v in values]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"{what} {twice[0]!r} given twice")
    return values


class ModelSources(BaseModel):
    """Where each part of the weights lives: a local folder, a Hugging Face repo id
    (optionally `repo@revision`), or an `s3://bucket/prefix`."""

    model_config = ConfigDict(extra="forbid")

    sdxl: str = Field("stabilityai/stable-diffusion-xl-base-1.0", description="SDXL base 1.0 in diffusers layout.")
    identitynet: str = Field(
        "InstantX/InstantID/ControlNetModel",
        description="IdentityNet (ControlNet) folder; `repo/subfolder` picks a folder inside a hub repo.",
    )
    adapter: str = Field(
        "InstantX/InstantID/ip-adapter.bin", description="ip-adapter.bin with image_proj + ip_adapter."
    )
    face_pack: str = Field("DIAMONIKAKA/antelopev2", description="antelopev2 ONNX pack (SCRFD + ArcFace).")
    lcm_lora: str | None = Field(None, description="Optional LCM-LoRA for SDXL (enables the `lcm` scheduler).")
    cache_dir: str | None = Field(None, description="Where s3:// sources are cached; default ~/.cache/instantid.")
    loras: dict[str, str | LoraEntry] = Field(default_factory=dict, description="LoRA registry: name -> source "
                                              "(file, folder, s3:// prefix or hub id) or {source, preset}.")
    controlnets: dict[ControlType, str] = Field(default_factory=dict, description="Extra ControlNets by type "
                                                "(canny, depth, pose): diffusers ControlNetModel folders.")
    depth_estimator: str | None = Field(None, description="A transformers depth-estimation model (the `depth` "
                                        "control's input), e.g. a Depth Anything folder or hub id.")
    safety_checker: str | None = Field(None, description="diffusers' StableDiffusionSafetyChecker with its "
                                       "CLIPImageProcessor (config.json, weights, preprocessor_config.json), e.g. "
                                       "CompVis/stable-diffusion-safety-checker; read only when the app has `safety`.")
    scoring_face_pack: str | None = Field(None, description="The insightface pack (a detector and a recogniser, "
                                          "e.g. buffalo_l) that scores each output's identity against the "
                                          "reference; unset: the conditioning face_pack, which flatters itself "
                                          "(responses say `same_model: true`). Read only when the app has "
                                          "`scoring`.")

    @classmethod
    def from_root(cls, root: str, **overrides: str) -> ModelSources:
        """Sources for a folder laid out like `instantid weights tiny|download DIR` writes it (with its
        `lcm-lora-sdxl/` when a local root has one); `overrides` replace single parts."""
        root = root.rstrip("/")
        lcm = f"{root}/{LCM_LORA_DIR}"
        local = "://" not in root
        return cls(**{
            **(extension_sources(root) if local else {}),
            "sdxl": f"{root}/sdxl",
            "identitynet": f"{root}/InstantID/ControlNetModel",
            "adapter": f"{root}/InstantID/ip-adapter.bin",
            "face_pack": f"{root}/antelopev2",
            "lcm_lora": lcm if "://" not in root and Path(lcm).is_dir() else None,
            **overrides,
        })


def extension_sources(root: str) -> dict:
    """The LoRAs, extra ControlNets, depth estimator, safety checker and scoring pack a local root holds (the tiny
    preset writes them): `loras/` (each .safetensors file a name), `controlnets/{canny,depth}/`, `depth-estimator/`,
    `safety-checker/`, `buffalo_l/`. `pose` is left
    out: the issue's default offer is tiny-style, canny and depth; a config adds pose by naming its folder."""
    out: dict = {}
    if Path(f"{root}/{LORAS_DIR}").is_dir():
        out["loras"] = {Path(root).name or "root": f"{root}/{LORAS_DIR}"}
    controlnets = {kind: f"{root}/{CONTROLNETS_DIR}/{kind}" for kind in DEFAULT_CONTROLS
                   if Path(f"{root}/{CONTROLNETS_DIR}/{kind}").is_dir()}
    if controlnets:
        out["controlnets"] = controlnets
    if Path(f"{root}/{DEPTH_ESTIMATOR_DIR}").is_dir():
        out["depth_estimator"] = f"{root}/{DEPTH_ESTIMATOR_DIR}"
    if Path(f"{root}/{SAFETY_CHECKER_DIR}").is_dir():
        out["safety_checker"] = f"{root}/{SAFETY_CHECKER_DIR}"
    if Path(f"{root}/{SCORING_FACE_PACK_DIR}").is_dir():
        out["scoring_face_pack"] = f"{root}/{SCORING_FACE_PACK_DIR}"
    return out


class PipelineSettings(BaseModel):
    """How the models run: device, precision, defaults chosen once at construction."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field("cpu", description="torch device for the denoiser and text encoders, e.g. `cuda`, `cuda:1`.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Weights and activation dtype.")
    default_scheduler: Scheduler = Scheduler.euler
    face_providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="onnxruntime providers for the face pack, first available wins.",
    )
    det_size: int = Field(640, ge=128, le=1280, description="Face detector input size (square).")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Reject images that declare more pixels than this before decoding them."
    )
    max_image_side: int = Field(4096, ge=64, description="Larger input images are downscaled to this longest side.")
    channels_last: bool = Field(False, description="Run UNet and IdentityNet in channels_last memory format.")
    fuse_qkv: bool = Field(False, description="Fuse attention q/k/v projections (same result, fewer kernels).")
    compile: bool = Field(False, description="torch.compile the UNet+IdentityNet step (GPU).")
    compile_mode: str = Field("max-autotune-no-cudagraphs", description="torch.compile mode when `compile` is on.")
    compile_cache_dir: str | None = Field(None, description="Persistent inductor cache so restarts skip compiling.")
    compile_regional: bool = Field(False, description="torch.compile each repeated transformer block of UNet and "
                                   "IdentityNet instead of the whole step (compiles in a fraction of the time); not "
                                   "with `compile`.")
    inductor_tuning: bool = Field(False, description="diffusion-fast's inductor settings for compiled code (1x1 "
                                  "convs as matmuls, coordinate-descent tuning); process-wide.")
    fp8: bool = Field(False, description="FP8 (e4m3, dynamic per-tensor scales) Linear layers in the UNet's and "
                      "IdentityNet's transformer blocks; needs a GPU of compute capability >= 8.9 (Ada, Hopper), "
                      "else the denoiser refuses to start (FP8Unavailable). Not with LoRAs.")
    warmup_sizes: list[tuple[int, int]] = Field(
        default_factory=list, description="(width, height) pairs a GPU denoiser compiles before it reports ready."
    )
    warmup_batch_sizes: list[int] = Field(default_factory=lambda: [1], description="Batch sizes to warm up.")
    size_buckets: bool = Field(True, description="A request without a size gets the SDXL bucket nearest its photo's "
                               "aspect ratio (requests share batches); false: the reference's exact rule.")
    face_threads: int | None = Field(None, ge=1, description="onnxruntime threads per face session; unset: "
                                     "onnxruntime's default (every core). The serving app sets its replica's CPUs.")
    vae_tile_above_pixels: int | None = Field(
        1536 * 1536, ge=64 * 64, description="Decode images larger than this in overlapping tiles (VAE memory "
        "grows with the image); batches always decode one image at a time. Unset: never tile.")
    styles_file: str | None = Field(None, description="A YAML file of extra prompt styles (name: {prompt, negative}, "
                                    "the shape of instantid_core/styles.yaml); same names replace built-ins.")
    styles: dict[str, StylePreset] = Field(default_factory=dict, description="Extra prompt styles inline; they "
                                           "win over styles_file and the built-ins.")
    max_loaded_loras: int = Field(8, ge=3, le=256, description="LoRA adapters kept loaded per denoiser (LRU).")
    face_detail_below: int = Field(256, ge=8, le=MAX_SIDE, description="face_detail: auto runs the detail pass "
                                   "when the face box's larger side is below this (output pixels).")
    face_detail_size: int = Field(1024, ge=MIN_SIDE, le=MAX_SIDE, multiple_of=8, description="The side the face "
                                  "crop is regenerated at (SDXL works best near 1024).")


class GenerateParams(BaseModel):
    """One generation request's parameters (the face images travel beside it)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=2000, description="What to draw.")
    negative_prompt: str = Field("", max_length=2000)
    style: str = Field(NO_STYLE, min_length=1, max_length=100, description="A prompt style preset: a built-in "
                       f"({', '.join(s.value for s in Style)}) or one the operator configured; \"(No style)\" is "
                       "accepted for \"No style\".")
    width: int | None = Field(None, description=f"Output width, multiple of 8 in [{MIN_SIDE}, {MAX_SIDE}]; "
                              "default follows the face (or pose) photo like the reference: short side 1024.")
    height: int | None = Field(None, description="Output height; same rules as width.")
    steps: int | None = Field(None, ge=1, le=100, description=f"Denoising steps; default {DEFAULT_STEPS}, or "
                              f"{LCM_STEPS} with the lcm scheduler (the demo's LCM preset).")
    guidance: float | None = Field(None, ge=0.0, le=20.0, description="Classifier-free guidance; <= 1 disables it. "
                                   f"Default {DEFAULT_GUIDANCE}, or {LCM_GUIDANCE} with the lcm scheduler.")
    identitynet_strength: float = Field(0.8, ge=0.0, le=1.5)
    adapter_strength: float = Field(0.8, ge=0.0, le=1.5)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Random seed; drawn and reported when omitted.")
    num_images: int = Field(1, ge=1, le=4)
    scheduler: Scheduler | None = Field(None, description="Default: the pipeline's default scheduler.")
    enhance_face_region: bool = Field(True, description="Limit IdentityNet and the face tokens to the face box "
                                      "(region control, the demo's default).")
    face_index: int | None = Field(None, ge=0, le=63, description="Which face to use; default the largest.")
    loras: list[LoraWeight] = Field(default_factory=list, description=f"Up to {MAX_LORAS_PER_REQUEST} registered "
                                    "LoRAs with their scales, active for this request only.")
    controls: list[ControlParams] = Field(default_factory=list, description="Extra ControlNets (canny, depth, "
                                          "pose) beside IdentityNet, each with its strength.")
    # --- issue 12: identity controls, pose face, img2img / inpainting (the images travel beside the parameters)
    identity_start: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the steps after which IdentityNet "
                                  "and the face tokens start acting (0 = from the first step).")
    identity_end: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of the steps after which they stop "
                                "(1 = to the last step); lower it to let the prompt finish the details.")
    negative_face_noise: float = Field(0.0, ge=0.0, le=1.0, description="The negative branch's face embedding is "
                                       "uniform noise in [0, this) drawn from the request's seed (the ComfyUI "
                                       "node's noise) instead of zeros; 0 is the reference.")
    pose_face_index: int | None = Field(None, ge=0, le=63, description="Which face of the pose photo (or of the "
                                        "init photo, when it gives the pose) gives the keypoints; default the "
                                        "largest.")
    strength: float | None = Field(None, gt=0.0, le=1.0, description="With an init image: the fraction of the steps "
                                   "that run from the photo noised to that point (1 = from pure noise). Default 0.8 "
                                   "for img2img, 1.0 for inpainting.")
    inpaint_face: bool = Field(False, description="With an init image: regenerate only its face (the detected face "
                               "box, dilated), keep every other pixel.")
    # --- issue 23: faces placed without a pose photo
    pose: PoseParams | None = Field(None, description="Place the face without a pose photo: a preset turned and "
                                    "placed in a box of the output (not with pose_image or keypoints).")
    keypoints: list[tuple[float, float]] | None = Field(None, min_length=5, max_length=5, description="Five points "
                                                        "in output pixels (left eye, right eye, nose tip, left and "
                                                        "right mouth corner, as the image shows them) instead of a "
                                                        "pose photo's.")
    # --- issue 23: several identities in one image (their photos travel beside the parameters)
    identities: list[IdentityParams] | None = Field(None, min_length=1, max_length=MAX_IDENTITIES, description=(
        f"Up to {MAX_IDENTITIES} identities, each acting only in its own region, instead of the single face (then "
        "not with pose, keypoints, face_index or an init image); one identity gives exactly the single-face image."))
    # --- issue 26: identity score, best of N, a floor (needs the app's `scoring`)
    best_of: int = Field(1, ge=1, le=MAX_BEST_OF, description="Generate this many candidates (consecutive seeds, "
                         "at least num_images) and return the num_images with the highest identity scores.")
    face_detail: Literal["off", "auto", "on"] = Field("off", description="A detail pass for small faces: the face "
                                                      "cropped, upscaled, regenerated (same identity, prompt, seed) "
                                                      "and pasted back feathered; `auto`: only for a face smaller "
                                                      "than the server's face_detail_below.")
    min_identity: float | None = Field(None, ge=-1.0, le=1.0, description="A floor on the identity score: while a "
                                       "returned image scores below it, more candidates run with the next seeds, "
                                       "up to the server's bound; then the best found, flagged below the floor.")

    @field_validator("loras")
    @classmethod
    def _few_distinct_loras(cls, value: list[LoraWeight]) -> list[LoraWeight]:
        return _unique(value, "LoRA", MAX_LORAS_PER_REQUEST, lambda lora: lora.name)

    @field_validator("controls")
    @classmethod
    def _few_distinct_controls(cls, value: list[ControlParams]) -> list[ControlParams]:
        return _unique(value, "control", MAX_CONTROLS_PER_REQUEST, lambda control: control.type.value)

    @field_validator("width", "height")
    @classmethod
    def _side_multiple_of_8(cls, value: int | None) -> int | None:
        if value is None:
            return value
        if not MIN_SIDE <= value <= MAX_SIDE or value % 8:
            raise ValueError(f"must be a multiple of 8 between {MIN_SIDE} and {MAX_SIDE}, got {value}")
        return value

    @field_validator("guidance", "identitynet_strength", "adapter_strength", "strength", "negative_face_noise",
                     "identity_start", "identity_end", "min_identity")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("style", mode="before")
    @classmethod
    def _style_name(cls, value: object) -> object:
        value = getattr(value, "value", value)  # a Style member is its name
        return canonical_style(value) if isinstance(value, str) else value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _printable(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    def resolved(self, default_scheduler: Scheduler) -> GenerateParams:
        """These parameters with the scheduler, steps and guidance filled in: what was left unset takes the
        scheduler's preset (LCM: few steps, low guidance; any other: the published 30 steps at guidance 5)."""
        scheduler = self.scheduler or default_scheduler
        lcm = scheduler == Scheduler.lcm
        return self.model_copy(update={
            "scheduler": scheduler,
            "steps": self.steps if self.steps is not None else (LCM_STEPS if lcm else DEFAULT_STEPS),
            "guidance": self.guidance if self.guidance is not None else (LCM_GUIDANCE if lcm else DEFAULT_GUIDANCE),
        })

    @field_validator("identity_end")
    @classmethod
    def _identity_window(cls, value: float, info: ValidationInfo) -> float:
        start = info.data.get("identity_start")
        if start is not None and start >= value:
            raise ValueError(f"must be above identity_start ({start}), got {value}")
        return value

    @property
    def candidates(self) -> int:
        """Images one round generates: `best_of`, and never fewer than the images returned."""
        return max(self.best_of, self.num_images)

    @model_validator(mode="after")
    def _both_sides_or_none(self) -> GenerateParams:
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither")
        return self

    @model_validator(mode="after")
    def _identities_alone(self) -> GenerateParams:
        if self.identities is not None:
            single = [name for name in ("pose", "keypoints", "face_index") if getattr(self, name) is not None]
            if single:
                raise ValueError(f"identities: give {single[0]} per identity, not beside identities")
            # The identity score compares an image with one reference face; several people have no one reference.
            scored = [name for name, off in (("best_of", 1), ("min_identity", None), ("face_detail", "off"))
                      if getattr(self, name) != off]
            if scored:
                raise ValueError(f"{scored[0]}: scores one identity; not with several identities")
        return self
