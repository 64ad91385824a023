"""Where each weight part's files live in its published layout (SDXL base 1.0 in diffusers' layout,
InstantID's ControlNetModel/ and ip-adapter.bin, the antelopev2 ONNX pack), which of them a resolution fetches
(full or fp16 files), and ResolvedWeights, the local paths a resolution gives."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

UNET_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
)
TEXT_WEIGHTS = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin")
SDXL_MODELS = {
    "unet": UNET_WEIGHTS,
    "vae": UNET_WEIGHTS,
    "text_encoder": TEXT_WEIGHTS,
    "text_encoder_2": TEXT_WEIGHTS,
}
SDXL_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
)
FACE_MODELS = ("scrfd_10g_bnkps.onnx", "glintr100.onnx")  # detector, recogniser: all the pipeline loads
ADAPTER_FILE = "ip-adapter.bin"
ADAPTER_KEYS = ("image_proj", "ip_adapter")
SAFETY_CHECKER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def without_fp16(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if ".fp16." not in name]


# What is fetched (hub, S3) and materialised (download_all) per part, relative to the part's folder. The SDXL repo
# also holds fp16 duplicates, ONNX/OpenVINO exports and a 7 GB single-file checkpoint: fetching only what diffusers
# loads by default keeps the download at ~14 GB instead of ~70 GB. Local folders may still use fp16 variants.
FETCH_PATTERNS: dict[str, list[str]] = {
    "sdxl": [
        "model_index.json",
        "scheduler/*",
        "tokenizer/*",
        "tokenizer_2/*",
        *(f"{model}/{name}" for model, names in SDXL_MODELS.items()
          for name in ["config.json", *without_fp16(names)]),
    ],
    "identitynet": ["config.json", *without_fp16(UNET_WEIGHTS)],
    "adapter": [ADAPTER_FILE],
    "face_pack": [*FACE_MODELS, *(f"*/{name}" for name in FACE_MODELS)],  # `*` also matches a nested antelopev2/
    "lcm_lora": ["*.safetensors"],
    "loras": ["*.safetensors"],
    "controlnets": ["config.json", *without_fp16(UNET_WEIGHTS)],
    "depth_estimator": ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"],
    "safety_checker": ["config.json", "preprocessor_config.json", *SAFETY_CHECKER_WEIGHTS],
    "scoring_face_pack": ["*.onnx", "*/*.onnx"],
}
HALF_DTYPES = ("float16", "bfloat16")
FP16 = "fp16"  # the published SDXL repo's half-precision files: `<name>.fp16.safetensors` beside `<name>.safetensors`


def weight_variant(dtype: str) -> str | None:
    """The weight files a replica of `dtype` fetches: fp16 and bf16 replicas take the fp16 files (half the download,
    disk and host memory of the full-precision ones; bf16 is cast from them on load), float32 the full ones."""
    return FP16 if dtype in HALF_DTYPES else None


def sdxl_patterns(variant: str) -> list[str]:
    """SDXL's FETCH_PATTERNS with each model's `variant` weight files in place of the full-precision ones."""
    return [*(p for p in FETCH_PATTERNS["sdxl"] if p.split("/")[0] not in SDXL_MODELS),
            *(f"{model}/{name}" for model, names in SDXL_MODELS.items()
              for name in ["config.json", *(n for n in names if f".{variant}." in n)])]


def models_without_weights(path: Path) -> list[str]:
    return [model for model, names in SDXL_MODELS.items() if not any((path / model / n).is_file() for n in names)]


def load_variant(folder: Path, dtype: str) -> str | None:
    """The `variant=` for diffusers'/transformers' `from_pretrained` of one model folder: the fp16 files when the
    dtype is half and they are there, or when they are all the folder has (an fp16-only mirror); else None."""
    names = [p.name for p in folder.glob("*.safetensors")] if folder.is_dir() else []
    has_variant = any(f".{FP16}." in name for name in names)
    has_full = any(f".{FP16}." not in name for name in names) or any(folder.glob("*.bin"))
    return FP16 if has_variant and (weight_variant(dtype) or not has_full) else None


# Small parts first: a broken adapter or face pack fails before a 14 GB SDXL download starts.
PART_ORDER = ("adapter", "face_pack", "identitynet", "lcm_lora", "sdxl")

# What `resolve_weights(parts=...)` may name: a ResolvedWeights part, `sdxl_text` (the SDXL folder with only what the
# prompt encoder loads: tokenizers and text encoders, not the UNet and VAE), `extensions` (LoRAs, extra ControlNets,
# the depth estimator), `safety_checker` and `scoring_face_pack` (each when its source is set). A stage resolves only
# what it loads: a face replica never lists, fetches or checks SDXL.
PARTS = (*PART_ORDER, "sdxl_text", "extensions", "safety_checker", "scoring_face_pack")
SDXL_TEXT_MODELS = ("text_encoder", "text_encoder_2")


def sdxl_text_patterns(variant: str | None) -> list[str]:
    """The SDXL fetch patterns of the tokenizers and text encoders alone (`variant`: fp16 files for half dtypes)."""
    return ["model_index.json", "tokenizer/*", "tokenizer_2/*",
            *(f"{model}/{name}" for model in SDXL_TEXT_MODELS
              for name in ["config.json", *(n for n in SDXL_MODELS[model]
                                            if (f".{variant}." in n if variant else ".fp16." not in n))])]


@dataclass(frozen=True)
class ResolvedWeights:
    """Local, validated paths of every part, and where they came from."""

    # None: a part the resolution was not asked for (resolve_weights `parts`).
    sdxl: Path | None  # with `sdxl_text` only: the folder, its tokenizers and text encoders checked
    identitynet: Path | None
    adapter: Path | None  # the ip-adapter.bin file
    face_pack: Path | None  # the folder that holds the ONNX files (a nested antelopev2/ already followed)
    lcm_lora: Path | None = None
    loras: dict[str, Path] = field(default_factory=dict)  # LoRA name -> .safetensors file (folders expanded)
    lora_presets: dict[str, dict] = field(default_factory=dict)  # LoRA name -> {scheduler, steps, guidance}
    controlnets: dict[str, Path] = field(default_factory=dict)  # control type -> ControlNet folder
    depth_estimator: Path | None = None
    safety_checker: Path | None = None  # a StableDiffusionSafetyChecker folder (with its preprocessor_config.json)
    scoring_face_pack: Path | None = None  # the identity scorer's insightface pack (its ONNX files' folder)
    revisions: dict[str, str] = field(default_factory=dict)  # part -> commit sha | "etag:<digest>" | "local"
    downloaded_files: int = 0
