"""Half-precision replicas take SDXL's fp16 files: the tiny preset holds them as the published repo does, a
float16/bfloat16 resolve from S3 fetches only them (half the bytes), a source without them gets the full files,
and the loaders read the fp16 files into the models (a bfloat16 pipeline then generates from them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from instantid_core import GenerateParams, InstantIDPipeline
from instantid_core.config import ModelSources, PipelineSettings
from instantid_core.denoise import IdentityDenoiser
from instantid_core.text import PromptEncoder
from instantid_core.weight_layout import load_variant
from instantid_core.weights import resolve_weights

SDXL_WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}


def upload(client, bucket: str, root: Path, prefix: str, *, skip_fp16: bool = False) -> None:
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if skip_fp16 and ".fp16." in path.name:
            continue
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}", Body=path.read_bytes())


def s3_sources(bucket: str, prefix: str, cache: Path) -> ModelSources:
    base = f"s3://{bucket}/{prefix}"
    return ModelSources(sdxl=f"{base}/sdxl", identitynet=f"{base}/InstantID/ControlNetModel",
                        adapter=f"{base}/InstantID/ip-adapter.bin", face_pack=f"{base}/antelopev2",
                        lcm_lora=None, cache_dir=str(cache))


def weight_files(sdxl: Path) -> dict[str, list[str]]:
    return {model: sorted(p.name for p in (sdxl / model).glob("*.safetensors")) for model in SDXL_WEIGHTS}


def test_the_tiny_preset_holds_sdxls_fp16_files_as_the_published_repo(tiny_root: Path) -> None:
    for model, stem in SDXL_WEIGHTS.items():
        folder = tiny_root / "sdxl" / model
        full, half = load_file(folder / f"{stem}.safetensors"), load_file(folder / f"{stem}.fp16.safetensors")
        assert set(full) == set(half) and full
        for key, tensor in full.items():
            assert half[key].dtype == torch.float16 and torch.equal(half[key], tensor.to(torch.float16)), key


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_resolve_fetches_only_the_fp16_files(tmp_path: Path, tiny_root: Path, s3_client,
                                                              s3_bucket: str, dtype: str) -> None:
    upload(s3_client, s3_bucket, tiny_root, "tiny")
    half = resolve_weights(s3_sources(s3_bucket, "tiny", tmp_path / "half"), s3_client=s3_client, dtype=dtype)
    full = resolve_weights(s3_sources(s3_bucket, "tiny", tmp_path / "full"), s3_client=s3_client)
    assert weight_files(half.sdxl) == {m: [f"{s}.fp16.safetensors"] for m, s in SDXL_WEIGHTS.items()}
    assert weight_files(full.sdxl) == {m: [f"{s}.safetensors"] for m, s in SDXL_WEIGHTS.items()}
    assert half.downloaded_files == full.downloaded_files

    def size(root: Path) -> int:
        return sum(p.stat().st_size for p in root.rglob("*.safetensors"))

    assert size(half.sdxl) < 0.55 * size(full.sdxl)  # fp16 halves every weight tensor; headers stay


def test_a_source_without_fp16_files_gives_a_half_precision_replica_the_full_ones(
        tmp_path: Path, tiny_root: Path, s3_client, s3_bucket: str) -> None:
    upload(s3_client, s3_bucket, tiny_root, "full-only", skip_fp16=True)
    resolved = resolve_weights(s3_sources(s3_bucket, "full-only", tmp_path / "cache"), s3_client=s3_client,
                               dtype="float16")
    assert weight_files(resolved.sdxl) == {m: [f"{s}.safetensors"] for m, s in SDXL_WEIGHTS.items()}
    assert load_variant(resolved.sdxl / "unet", "float16") is None


def test_the_loaders_read_the_fp16_files_into_a_half_precision_replica(tmp_path: Path, tiny_root: Path) -> None:
    # A copy whose fp16 files differ from the full ones (x2), so what each dtype loaded is plain to see.
    root = tmp_path / "tiny"
    shutil.copytree(tiny_root, root)
    for model, stem in SDXL_WEIGHTS.items():
        full = load_file(root / "sdxl" / model / f"{stem}.safetensors")
        save_file({k: (t * 2).to(torch.float16) for k, t in full.items()},
                  root / "sdxl" / model / f"{stem}.fp16.safetensors")
    unet_folder = root / "sdxl" / "unet"
    assert load_variant(unet_folder, "float16") == "fp16" and load_variant(unet_folder, "float32") is None
    resolved = resolve_weights(ModelSources.from_root(str(root)))
    for dtype, factor in (("float16", 2), ("float32", 1)):
        settings = PipelineSettings(dtype=dtype)
        denoiser = IdentityDenoiser.from_weights(resolved, settings)
        encoder = PromptEncoder(resolved.sdxl, settings)
        for model, loaded in (("unet", denoiser.unet), ("vae", denoiser.vae),
                              ("text_encoder", encoder._pipe.text_encoder),
                              ("text_encoder_2", encoder._pipe.text_encoder_2)):
            full = load_file(root / "sdxl" / model / f"{SDXL_WEIGHTS[model]}.safetensors")
            state = loaded.state_dict()
            compared = [k for k in full if k in state and "_ip." not in k]
            assert len(compared) > 10, model
            for key in compared:
                stored = torch.float16 if factor == 2 else torch.float32  # what the loaded file holds
                expected = (full[key] * factor).to(stored).to(state[key].dtype)  # the fp16 VAE is upcast
                assert torch.equal(state[key], expected), (dtype, model, key)


def test_a_bfloat16_pipeline_generates_from_the_fp16_files(tmp_path: Path, tiny_root: Path, s3_client,
                                                           s3_bucket: str, astronaut_bytes: bytes) -> None:
    upload(s3_client, s3_bucket, tiny_root, "bf16")
    # Only the fp16 files are in this cache: the pipeline cannot have loaded the full-precision ones.
    sources = s3_sources(s3_bucket, "bf16", tmp_path / "cache")
    settings = PipelineSettings(dtype="bfloat16")
    weights = resolve_weights(sources, s3_client=s3_client, dtype="bfloat16")
    pipe = InstantIDPipeline(sources, settings, weights=weights)
    assert pipe.denoiser.unet.dtype == torch.bfloat16
    result = pipe.generate([astronaut_bytes], GenerateParams(prompt="a portrait", steps=2, width=64, height=64,
                                                             seed=3))
    assert result.images.shape == (1, 64, 64, 3) and result.images.dtype == np.uint8
    assert result.images.std() > 0  # an image, not a constant fill


def test_download_all_for_bfloat16_materialises_the_fp16_files_and_checks(tmp_path: Path, tiny_root: Path,
                                                                          s3_client, s3_bucket: str) -> None:
    from instantid_core.weight_checks import check_weights
    from instantid_core.weights import download_all

    upload(s3_client, s3_bucket, tiny_root, "dl")
    resolved = download_all(tmp_path / "root", s3_sources(s3_bucket, "dl", tmp_path / "cache"),
                            s3_client=s3_client, dtype="bfloat16")
    assert weight_files(resolved.sdxl) == {m: [f"{s}.fp16.safetensors"] for m, s in SDXL_WEIGHTS.items()}
    check_weights(tmp_path / "root")  # an fp16-only root is a complete weights folder
    assert load_variant(resolved.sdxl / "vae", "float32") == "fp16"  # all it has, whatever the dtype
