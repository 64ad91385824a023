"""InstantID as a plain library: configs eagerly, heavy stages (torch, diffusers, insightface) on first use."""

from __future__ import annotations

import importlib
from typing import Any

from .config import GenerateParams, ModelSources, PipelineSettings, Scheduler, Style
from .errors import (
    ImageTooLarge,
    InputNotAllowed,
    InputNotFound,
    InstantIDError,
    InvalidImage,
    InvalidParameter,
    NoFaceDetected,
    StorageError,
    WeightsError,
)

_LAZY = {
    "InstantIDPipeline": "pipeline", "FaceAnalyzer": "face", "PromptEncoder": "text",
    "IdentityDenoiser": "denoise", "OutputStore": "storage", "resolve_weights": "weights",
    "write_tiny_preset": "tiny",
}

__all__ = ["GenerateParams", "ModelSources", "PipelineSettings", "Scheduler", "Style", "ImageTooLarge",
           "InputNotAllowed", "InputNotFound", "InstantIDError", "InvalidImage", "InvalidParameter",
           "NoFaceDetected", "StorageError", "WeightsError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
