"""The image the manifests run (Dockerfile): a base pinned by digest, one CUDA runtime, every Python package from a
hashed lock that agrees with pyproject.toml, and the non-root user the pods' securityContext names."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
LOCK = (REPO / "requirements-image.lock").read_text()


def lock_pins() -> dict[str, str]:
    """name -> version of every package in the lock (names normalised as PEP 503 does)."""
    return {re.sub(r"[-_.]+", "-", name).lower(): version
            for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", LOCK, re.MULTILINE)}


def instructions(keyword: str) -> list[str]:
    """The Dockerfile's instructions of one kind, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.split(None, 1)[:1] == [keyword]]


def test_the_base_image_is_pinned_by_digest() -> None:
    (base,) = instructions("FROM")
    args = dict(arg.split("=", 1) for arg in instructions("ARG") if "=" in arg)
    reference = args[base.strip("${}")] if base.startswith("${") else base
    assert re.fullmatch(r"[a-z0-9./_-]+:[\w.-]+@sha256:[0-9a-f]{64}", reference), reference
    assert "nvidia/cuda" not in reference  # torch's wheels carry CUDA; a CUDA base would be a second copy


def test_one_cuda_runtime_torchs_wheels_only() -> None:
    pins = lock_pins()
    assert "torch" in pins and "onnxruntime-gpu" not in pins
    cuda_majors = {m for name in pins if name.startswith("nvidia-") for m in re.findall(r"-cu(\d+)$", name)}
    assert len(cuda_majors) <= 1, cuda_majors  # never two CUDA families side by side
    assert "onnxruntime-gpu" not in DOCKERFILE.replace("no onnxruntime-gpu", "")


def test_every_locked_package_has_a_hash_and_is_installed_with_require_hashes() -> None:
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK.strip())
    packages = [e for e in entries if not e.startswith("#")]
    assert len(packages) == len(lock_pins()) > 50
    for entry in packages:
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), entry.splitlines()[0]
    installs = [run for run in instructions("RUN") if "pip install" in run]
    assert any("--require-hashes" in run and "-r requirements-image.lock" in run and "--no-deps" in run
               for run in installs)
    # The project itself adds no unhashed package: no dependencies, no isolated build environment.
    (project,) = [run for run in installs if "pip install --no-deps --no-build-isolation ." in run]
    assert project


def test_the_lock_agrees_with_pyproject_pins() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = lock_pins()
    for requirement in project["dependencies"]:
        name, version = re.match(r"([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==([^\s;]+)", requirement).groups()
        assert pins.get(re.sub(r"[-_.]+", "-", name).lower()) == version, f"{requirement}: regenerate the lock"


def test_the_image_runs_as_the_non_root_user_the_pods_name() -> None:
    (user,) = instructions("USER")
    uid = int(user.split(":")[0])
    assert uid != 0 and f"--uid {uid}" in DOCKERFILE
    rayservice = (REPO / "k8s" / "base" / "rayservice.yaml").read_text()
    assert re.search(rf"runAsUser: {uid}\b", rayservice)
    # procps gives the preStop hook its pgrep (the drain waits for replicas by their process title).
    assert "pgrep" in yaml.safe_dump(yaml.safe_load(rayservice)) and "procps" in DOCKERFILE
