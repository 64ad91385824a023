"""Session fixtures: the tiny preset written once, and its models loaded once."""

from __future__ import annotations

from pathlib import Path

import pytest

from instantid_core.config import PipelineSettings
from instantid_core.tiny import write_tiny_preset

ASTRONAUT = Path(__file__).resolve().parents[1] / "instantid_core" / "data" / "astronaut.jpg"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_preset(tmp_path_factory.mktemp("tiny"))


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
    return ASTRONAUT.read_bytes()
