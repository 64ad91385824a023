"""Resolve the app's weights once per replica or batch actor: the tiny preset (written on first start) or
real sources."""

from __future__ import annotations

from pathlib import Path

from instantid_core.config import ModelSources
from instantid_core.tiny import ensure_tiny_preset
from instantid_core.weights import ResolvedWeights, resolve_weights

from .config import AppConfig


def resolve_app_weights(config: AppConfig) -> ResolvedWeights:
    """`weights.preset: tiny` -> the tiny preset; otherwise exactly `weights.sources`, and a source that is
    missing or broken raises WeightsError naming the part and the path (the deploy fails; nothing stands in)."""
    weights, dtype = config.weights, config.pipeline.dtype
    if weights.preset == "tiny":
        return resolve_sources(None, weights.tiny_dir, config, dtype=dtype)
    return resolve_sources(weights.sources, None, config, dtype=dtype)


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
                    config: AppConfig | None = None, *, dtype: str = "float32") -> ResolvedWeights:
    """The tiny preset when a folder for it is named (written there on first use), else the sources; with the
    app config's LoRAs and ControlNets over theirs. `dtype` is the replicas': half precision fetches SDXL's fp16
    files."""
    if tiny_preset_dir:
        sources = ModelSources.from_root(str(ensure_tiny_preset(Path(tiny_preset_dir))))
    return resolve_weights(with_extensions(sources, config), dtype=dtype)
