"""Resolve the app's weights once per replica or batch actor: the tiny preset (written on first start) or
real sources."""

from __future__ import annotations

from pathlib import Path

from instantid_core.config import ModelSources
from instantid_core.tiny import ensure_tiny_preset
from instantid_core.weights import ResolvedWeights, resolve_weights

from .config import AppConfig


def resolve_app_weights(config: AppConfig) -> ResolvedWeights:
    return resolve_sources(config.weights.sources, config.weights.tiny_preset_dir)


def resolve_sources(sources: ModelSources, tiny_preset_dir: str | None) -> ResolvedWeights:
    """The tiny preset when a folder for it is named (written there on first use), else the sources."""
    if tiny_preset_dir:
        return resolve_weights(ModelSources.from_root(str(ensure_tiny_preset(Path(tiny_preset_dir)))))
    return resolve_weights(sources)
