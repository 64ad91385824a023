"""Resolve weight sources (local path | Hugging Face `org/repo[/path][@rev]` | `s3://bucket/prefix`) to
validated local paths.

Every part is checked before a loader sees it, so a missing file, a nested `antelopev2/antelopev2/` folder or a
truncated download becomes a `WeightsError` naming the file instead of a stack trace from deep inside a loader.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from .config import LCM_LORA_DIR, SAFETY_CHECKER_DIR, SCORING_FACE_PACK_DIR, ModelSources
from .errors import WeightsError
from .weight_checks import (
    CHECKS,
    check_identitynet,
    check_json,
    check_safetensors,
    check_safety_checker,
    check_scoring_face_pack,
    check_sdxl_text,
    need_dir,
    need_file,
)
from .weight_fetch import fetch_source, is_local, materialise
from .weight_layout import (
    FETCH_PATTERNS,
    PART_ORDER,
    PARTS,
    SDXL_MODELS,
    SDXL_TEXT_MODELS,
    ResolvedWeights,
    models_without_weights,
    sdxl_patterns,
    sdxl_text_patterns,
    weight_variant,
    without_fp16,
)


def resolve_weights(
    sources: ModelSources, *, offline: bool | None = None, s3_client: Any = None, dtype: str = "float32",
    parts: Collection[str] | None = None,
) -> ResolvedWeights:
    """Fetch (if needed) and validate every part of the weights, or only `parts`.

    Args:
        sources: one source per part: a local path (exists, or starts with `/`, `.`, `~`, `file://`), an
            `s3://bucket/prefix` (cached under `sources.cache_dir or ~/.cache/instantid` + `/s3/bucket/prefix`,
            re-downloading only objects whose ETag changed), or a hub id `org/repo[/sub/path][@revision]`
            (`huggingface_hub.snapshot_download`, so HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE / HF_TOKEN apply).
        offline: True: use only what is cached (hub cache, S3 cache). None: huggingface_hub's own setting
            (HF_HUB_OFFLINE); S3 is contacted.
        s3_client: a boto3 S3 client; default `storage.make_s3_client()` when a source is on S3.
        dtype: the replicas' dtype. float16/bfloat16 fetch SDXL's fp16 files instead of the full-precision ones
            (`weight_variant`); a model whose source has no fp16 file gets its full-precision one.
        parts: only these (names in PARTS); the others are neither fetched nor checked and are None in the result.
            None: every part. `sdxl_text` fetches and checks only SDXL's tokenizers and text encoders.

    Returns:
        Validated local paths, revisions and how many files were downloaded.

    Raises:
        WeightsError: a source cannot be fetched, or a part is incomplete or corrupt; names the source and file.
    """
    wanted = set(PARTS if parts is None else parts)
    unknown = wanted - set(PARTS)
    if unknown:
        raise ValueError(f"parts: {sorted(unknown)} not among {PARTS}")
    text_only = "sdxl_text" in wanted and "sdxl" not in wanted
    if text_only:
        wanted.add("sdxl")
    cache_root = Path(sources.cache_dir).expanduser() if sources.cache_dir else Path.home() / ".cache" / "instantid"
    paths: dict[str, Path | None] = {}
    revisions: dict[str, str] = {}
    downloaded = 0
    for part in PART_ORDER:
        source = getattr(sources, part)
        if source is None or part not in wanted:
            paths[part] = None
            continue
        if source.startswith("s3://") and s3_client is None:
            from instantid_core.storage import make_s3_client

            s3_client = make_s3_client()
        variant = weight_variant(dtype) if part == "sdxl" else None
        if part == "sdxl" and text_only:
            patterns = sdxl_text_patterns(variant)
        else:
            patterns = sdxl_patterns(variant) if variant else FETCH_PATTERNS[part]
        path, revisions[part], count = fetch_source(part, source, offline=offline, cache_root=cache_root,
                                                    client=s3_client, patterns=patterns)
        downloaded += count
        missing = models_without_weights(path) if variant and path.is_dir() else []
        if text_only:
            missing = [model for model in missing if model in SDXL_TEXT_MODELS]
        if missing and not is_local(source):
            # A source without fp16 files (a mirror of the full-precision ones): those models' full files instead.
            fallback = [f"{model}/{name}" for model in missing for name in without_fp16(SDXL_MODELS[model])]
            path, _, count = fetch_source(part, source, offline=offline, cache_root=cache_root,
                                          client=s3_client, patterns=fallback)
            downloaded += count
        check = check_sdxl_text if part == "sdxl" and text_only else CHECKS[part]
        try:
            paths[part] = check(path)
        except WeightsError as err:
            raise WeightsError(f"{err.message} (source: {source})", field=part) from err
    extensions = (resolve_extensions(sources, offline=offline, cache_root=cache_root, client=s3_client)
                  if "extensions" in wanted else {})
    safety = None
    if "safety_checker" in wanted and sources.safety_checker:
        safety, revisions["safety_checker"], count = _resolve_safety_checker(
            sources.safety_checker, offline=offline, cache_root=cache_root, client=s3_client)
        downloaded += count
    scoring = None
    if "scoring_face_pack" in wanted and sources.scoring_face_pack:
        scoring, revisions["scoring_face_pack"], count = _resolve_optional_part(
            "scoring_face_pack", sources.scoring_face_pack, offline=offline, cache_root=cache_root, client=s3_client)
        downloaded += count
    return ResolvedWeights(**paths, **extensions, safety_checker=safety,  # type: ignore[arg-type]
                           scoring_face_pack=scoring, revisions=revisions, downloaded_files=downloaded)


def _resolve_safety_checker(source: str, *, offline: bool | None, cache_root: Path,
                            client: Any) -> tuple[Path, str, int]:
    """The safety checker's folder (path, revision, files downloaded), checked; read only by the safety stage."""
    return _resolve_optional_part("safety_checker", source, offline=offline, cache_root=cache_root, client=client)


OPTIONAL_CHECKS = {"safety_checker": check_safety_checker, "scoring_face_pack": check_scoring_face_pack}


def _resolve_optional_part(part: str, source: str, *, offline: bool | None, cache_root: Path,
                           client: Any) -> tuple[Path, str, int]:
    """An optional stage's weights (path, revision, files downloaded), fetched and checked like every part."""
    if source.startswith("s3://") and client is None:
        from instantid_core.storage import make_s3_client

        client = make_s3_client()
    path, revision, count = fetch_source(part, source, offline=offline, cache_root=cache_root, client=client,
                                         patterns=FETCH_PATTERNS[part])
    try:
        return OPTIONAL_CHECKS[part](path), revision, count
    except WeightsError as err:
        raise WeightsError(f"{err.message} (source: {source})", field=part) from err


def resolve_extensions(sources: ModelSources, *, offline: bool | None, cache_root: Path,
                       client: Any) -> dict[str, Any]:
    """Fetch and check the LoRA registry, the extra ControlNets and the depth estimator (the same fetchers as
    every part). A LoRA folder or prefix gives one name per .safetensors file in it (its stem)."""
    from instantid_core.config import LoraEntry

    if client is None and any(str(v).startswith("s3://") for v in _extension_sources(sources)):
        from instantid_core.storage import make_s3_client

        client = make_s3_client()
    loras: dict[str, Path] = {}
    presets: dict[str, dict] = {}
    for key, value in sources.loras.items():
        entry = value if isinstance(value, LoraEntry) else LoraEntry(source=value)
        path, _, _ = fetch_source("loras", entry.source, offline=offline, cache_root=cache_root, client=client)
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            raise WeightsError(f"loras.{key}: no .safetensors file at {path} (source: {entry.source})",
                               field=f"loras.{key}")
        for file in files:
            name = key if path.is_file() else file.stem
            check_safetensors(f"loras.{key}", file)
            if name in loras and loras[name] != file:
                raise WeightsError(f"loras.{key}: the name {name!r} is also given by {loras[name]}",
                                   field=f"loras.{key}")
            loras[name], presets[name] = file, entry.preset()
    controlnets = {}
    for kind, source in sources.controlnets.items():
        kind = getattr(kind, "value", kind)
        path, _, _ = fetch_source("controlnets", source, offline=offline, cache_root=cache_root, client=client)
        try:
            controlnets[kind] = check_identitynet(path)
        except WeightsError as err:
            raise WeightsError(err.message.replace("identitynet", f"controlnets.{kind}", 1) + f" (source: {source})",
                               field=f"controlnets.{kind}") from err
    depth = None
    if sources.depth_estimator:
        depth, _, _ = fetch_source("depth_estimator", sources.depth_estimator, offline=offline,
                                   cache_root=cache_root, client=client)
        need_dir("depth_estimator", depth)
        check_json("depth_estimator", need_file("depth_estimator", depth, "config.json"))
    return {"loras": loras, "lora_presets": presets, "controlnets": controlnets, "depth_estimator": depth}


def _extension_sources(sources: ModelSources) -> list[str]:
    out = [v if isinstance(v, str) else v.source for v in sources.loras.values()]
    return [*out, *sources.controlnets.values(), *([sources.depth_estimator] if sources.depth_estimator else [])]


def download_all(
    dest_root: Path, sources: ModelSources | None = None, *, offline: bool | None = None, s3_client: Any = None,
    dtype: str = "float32",
) -> ResolvedWeights:
    """Resolve `sources` and materialise them into the ROOT layout (`ModelSources.from_root(dest_root)`); a safety
    checker the sources name goes to `safety-checker/`, a scoring pack to `buffalo_l/`.

    Files are hard-linked from the hub/S3 cache when on the same filesystem (no second copy of 14 GB), copied
    otherwise; a file already in place with the same size and mtime is kept, so a re-run is cheap. The nested
    antelopev2 folder is flattened. `dtype` as for `resolve_weights` (float16/bfloat16: SDXL's fp16 files).

    Returns:
        The weights under `dest_root`, with the revisions and download count of the resolve.
    """
    resolved = resolve_weights(sources or ModelSources(), offline=offline, s3_client=s3_client, dtype=dtype)
    dest_root = Path(dest_root).expanduser()
    layout = ModelSources.from_root(str(dest_root))
    dests: dict[str, Path | None] = {part: Path(getattr(layout, part)) for part in CHECKS if part != "lcm_lora"}
    dests["lcm_lora"] = None
    if resolved.lcm_lora is not None:
        lora = dest_root / LCM_LORA_DIR
        dests["lcm_lora"] = lora / resolved.lcm_lora.name if resolved.lcm_lora.is_file() else lora
    for part, dest in dests.items():
        if dest is not None:
            materialise(getattr(resolved, part), dest, FETCH_PATTERNS[part])
            dests[part] = CHECKS[part](dest)
    safety = None
    if resolved.safety_checker is not None:  # where ModelSources.from_root(dest_root) finds it
        safety = dest_root / SAFETY_CHECKER_DIR
        materialise(resolved.safety_checker, safety, FETCH_PATTERNS["safety_checker"])
        safety = check_safety_checker(safety)
    scoring = None
    if resolved.scoring_face_pack is not None:
        scoring = dest_root / SCORING_FACE_PACK_DIR
        materialise(resolved.scoring_face_pack, scoring, ["*.onnx"])
        scoring = check_scoring_face_pack(scoring)
    return ResolvedWeights(
        **dests, safety_checker=safety, scoring_face_pack=scoring, revisions=resolved.revisions,  # type: ignore[arg-type]
        downloaded_files=resolved.downloaded_files,
    )
