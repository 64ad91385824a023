"""Resolve the app's weights once per replica: the tiny preset (written on first start) or real sources."""

from __future__ import annotations

from pathlib import Path

from instantid_core.config import ModelSources
from instantid_core.tiny import ensure_tiny_preset
from instantid_core.weights import ResolvedWeights, resolve_weights

from .config import AppConfig


def resolve_app_weights(config: AppConfig) -> ResolvedWeights:
    if config.weights.tiny_preset_dir:
        root = ensure_tiny_preset(Path(config.weights.tiny_preset_dir))
        return resolve_weights(ModelSources.from_root(str(root)))
    return resolve_weights(config.weights.sources)
