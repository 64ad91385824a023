"""Resolve the app's weights once per replica or batch actor: the tiny preset (written on first start) or
real sources."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from instantid_core.config import ModelSources
from instantid_core.tiny import ensure_tiny_preset
from instantid_core.weight_layout import ResolvedWeights
from instantid_core.weights import resolve_weights

from .config import AppConfig

# What each stage loads, so its replicas resolve (fetch and check) nothing else: a FaceAnalysis replica on a CPU pod
# never lists, downloads or validates SDXL. None (the default) resolves every part: the prefetch Job, the CLI.
FACE_PARTS = ("face_pack",)
PROMPT_PARTS = ("sdxl_text",)  # tokenizers and text encoders of the SDXL folder
DENOISER_PARTS = ("sdxl", "identitynet", "adapter", "lcm_lora", "extensions")
SAFETY_PARTS = ("safety_checker",)
SCORING_PARTS = ("scoring_face_pack",)  # the FaceAnalysis stage's too, with `scoring` in args
STAGE_PARTS = {"FaceAnalysis": FACE_PARTS, "PromptEncoder": PROMPT_PARTS, "Denoiser": DENOISER_PARTS,
               "SafetyChecker": SAFETY_PARTS}


def resolve_app_weights(config: AppConfig, parts: Collection[str] | None = None, *,
                        stage: str | None = None) -> ResolvedWeights:
    """`weights.preset: tiny` -> the tiny preset; otherwise exactly `weights.sources`, and a source that is
    missing or broken raises WeightsError naming the part and the path (the deploy fails; nothing stands in).
    `parts`: only these (instantid_core.weight_layout.PARTS); the rest are None. `stage`: a deployment's name, for the
    parts it loads (STAGE_PARTS), so the deployments name themselves and the mapping lives here once."""
    if stage is not None:
        parts = STAGE_PARTS[stage]
        if stage == "FaceAnalysis" and config.scoring is not None:
            parts = (*parts, *SCORING_PARTS)
    weights, dtype = config.weights, config.pipeline.dtype
    if weights.preset == "tiny":
        return resolve_sources(None, weights.tiny_dir, config, dtype=dtype, parts=parts)
    return resolve_sources(weights.sources, None, config, dtype=dtype, parts=parts)


def with_extensions(sources: ModelSources, config: AppConfig | None) -> ModelSources:
    """The app config's `loras`/`controlnets`/`depth_estimator` over the weights' own; a null value removes."""
    if config is None:
        return sources
    loras = {**sources.loras, **config.loras}
    controlnets = {**sources.controlnets, **config.controlnets}
    return sources.model_copy(update={
        "loras": {name: value for name, value in loras.items() if value is not None},
        "controlnets": {kind: value for kind, value in controlnets.items() if value is not None},
        "depth_estimator": config.depth_estimator or sources.depth_estimator,
    })


def resolve_sources(sources: ModelSources | None, tiny_preset_dir: str | None,
                    config: AppConfig | None = None, *, dtype: str = "float32",
                    parts: Collection[str] | None = None) -> ResolvedWeights:
    """The tiny preset when a folder for it is named (written there on first use), else the sources; with the
    app config's LoRAs and ControlNets over theirs. `dtype` is the replicas': half precision fetches SDXL's fp16
    files. `parts` as for `resolve_app_weights`."""
    if tiny_preset_dir:
        sources = ModelSources.from_root(str(ensure_tiny_preset(Path(tiny_preset_dir))))
    return resolve_weights(with_extensions(sources, config), dtype=dtype, parts=parts)
