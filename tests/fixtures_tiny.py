"""Session fixtures: the tiny preset written once (the one folder every test and app of the session reads), and its
models loaded once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from filelock import FileLock

from instantid_core.config import PipelineSettings
from testkit.api import FACE


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset (its LoRAs, extra ControlNets and depth model included), marked complete as the apps expect.

    Under pytest-xdist, one for the run: the first worker writes it into the run's shared temp folder under a file
    lock, the other finds it complete (ensure_tiny_preset writes only a folder that is not)."""
    from instantid_core.tiny import ensure_tiny_preset

    if "PYTEST_XDIST_WORKER" not in os.environ:
        return ensure_tiny_preset(tmp_path_factory.mktemp("weights") / "tiny")
    run_root = tmp_path_factory.getbasetemp().parent  # this run's, shared by its workers
    with FileLock(str(run_root / "tiny-preset.lock")):
        return ensure_tiny_preset(run_root / "weights" / "tiny")


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
