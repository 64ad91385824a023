"""Session fixtures: the tiny preset written once (the one folder every test and app of the session reads), and its
models loaded once."""

from __future__ import annotations

from pathlib import Path

import pytest

from instantid_core.config import PipelineSettings
from testkit.api import FACE


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset (its LoRAs, extra ControlNets and depth model included), marked complete as the apps expect."""
    from instantid_core.tiny import ensure_tiny_preset

    return ensure_tiny_preset(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture(scope="session")
def settings() -> PipelineSettings:
    return PipelineSettings()


@pytest.fixture(scope="session")
def prompt_encoder(tiny_root: Path, settings: PipelineSettings):
    from instantid_core.text import PromptEncoder

    return PromptEncoder(tiny_root / "sdxl", settings)


@pytest.fixture(scope="session")
def denoiser(tiny_root: Path, settings: PipelineSettings):
    from instantid_core.denoise import IdentityDenoiser

    return IdentityDenoiser(tiny_root / "sdxl", tiny_root / "InstantID" / "ControlNetModel",
                            tiny_root / "InstantID" / "ip-adapter.bin", settings)


@pytest.fixture(scope="session")
def astronaut_bytes() -> bytes:
    return FACE.read_bytes()
