"""Each stage resolves only the weight parts it loads (`resolve_app_weights(config, stage=...)`), so a CPU pod's
FaceAnalysis replica never lists, downloads or checks SDXL: shown on a real S3 API on loopback (moto, tests/
fixtures_s3.py) holding the tiny preset in the published layout, and on local folders where SDXL is broken.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from instantid_app.config import AppConfig
from instantid_app.weights import STAGE_PARTS, resolve_app_weights
from instantid_core.config import ModelSources
from instantid_core.errors import WeightsError
from instantid_core.weight_layout import PARTS
from instantid_core.weights import resolve_weights


def upload(client: object, bucket: str, root: Path, prefix: str) -> int:
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    for path in files:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}",  # type: ignore[attr-defined]
                          Body=path.read_bytes())
    return len(files)


def s3_config(bucket: str, tiny_root: Path, cache: Path) -> AppConfig:
    """An AppConfig whose sources are the tiny preset's parts under s3://bucket/weights (the ROOT layout)."""
    local = ModelSources.from_root(str(tiny_root))

    def remote(path: str) -> str:
        return f"s3://{bucket}/weights/{Path(path).relative_to(tiny_root).as_posix()}"

    sources = {part: remote(getattr(local, part)) for part in ("sdxl", "identitynet", "adapter", "face_pack")}
    return AppConfig.model_validate({"weights": {"sources": {**sources, "cache_dir": str(cache)}}})


def cached_files(cache: Path) -> set[str]:
    """Data files the resolution downloaded into its S3 cache (ETag records excluded), relative to the bucket."""
    (bucket,) = [p for p in (cache / "s3").iterdir() if not p.name.startswith(".")]
    return {p.relative_to(bucket).as_posix() for p in bucket.rglob("*") if p.is_file()}


def test_a_face_analysis_replica_fetches_only_the_face_pack(
        tiny_root: Path, tmp_path: Path, s3_client: object, s3_bucket: str) -> None:
    total = upload(s3_client, s3_bucket, tiny_root, "weights")
    config = s3_config(s3_bucket, tiny_root, tmp_path / "cache")
    face_pack = Path(config.weights.sources.face_pack.removeprefix(f"s3://{s3_bucket}/")).as_posix()

    resolved = resolve_app_weights(config, stage="FaceAnalysis")

    fetched = cached_files(tmp_path / "cache")
    assert fetched and all(f.startswith(face_pack + "/") for f in fetched), fetched
    assert resolved.downloaded_files == len(fetched) < total
    assert resolved.face_pack is not None and (resolved.face_pack / "scrfd_10g_bnkps.onnx").is_file()
    assert (resolved.sdxl, resolved.identitynet, resolved.adapter) == (None, None, None)
    assert set(resolved.revisions) == {"face_pack"}


def test_a_prompt_encoder_fetches_sdxls_tokenizers_and_text_encoders_only_and_loads_them(
        tiny_root: Path, tmp_path: Path, s3_client: object, s3_bucket: str) -> None:
    from instantid_core.text import PromptEncoder

    upload(s3_client, s3_bucket, tiny_root, "weights")
    config = s3_config(s3_bucket, tiny_root, tmp_path / "cache")

    resolved = resolve_app_weights(config, stage="PromptEncoder")

    folders = {f.split("/")[2] for f in cached_files(tmp_path / "cache") if f.count("/") >= 3}
    assert folders == {"tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"}  # no unet/, no vae/
    assert resolved.face_pack is None and resolved.identitynet is None
    encoder = PromptEncoder(resolved.sdxl, config.prompt_pipeline())  # what was fetched is enough to load
    assert encoder is not None


def test_a_face_replica_never_touches_a_broken_sdxl_while_the_denoiser_refuses_it(
        tiny_root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "sdxl"
    shutil.copytree(tiny_root / "sdxl", broken)
    shutil.rmtree(broken / "unet")
    local = ModelSources.from_root(str(tiny_root)).model_copy(update={"sdxl": str(broken)})
    config = AppConfig.model_validate({"weights": {"sources": local.model_dump(mode="json")}})

    assert resolve_app_weights(config, stage="FaceAnalysis").face_pack is not None
    assert resolve_app_weights(config, stage="PromptEncoder").sdxl == broken  # no UNet needed to encode prompts
    with pytest.raises(WeightsError, match="sdxl: missing unet/"):
        resolve_app_weights(config, stage="Denoiser")


def test_stage_parts_name_only_known_parts_and_an_unknown_part_is_refused(tiny_root: Path) -> None:
    assert {part for parts in STAGE_PARTS.values() for part in parts} <= set(PARTS)
    with pytest.raises(ValueError, match="unet"):
        resolve_weights(ModelSources.from_root(str(tiny_root)), parts=("unet",))
