"""Resolve weight sources (local path | Hugging Face `org/repo[/path][@rev]` | `s3://bucket/prefix`) to
validated local paths.

Every part is checked before a loader sees it, so a missing file, a nested `antelopev2/antelopev2/` folder or a
truncated download becomes a `WeightsError` naming the file instead of a stack trace from deep inside a loader.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import struct
import uuid
import zipfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instantid_core.config import LCM_LORA_DIR, ModelSources
from instantid_core.errors import WeightsError

_UNET_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
)
_TEXT_WEIGHTS = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin")
_SDXL_MODELS = {
    "unet": _UNET_WEIGHTS,
    "vae": _UNET_WEIGHTS,
    "text_encoder": _TEXT_WEIGHTS,
    "text_encoder_2": _TEXT_WEIGHTS,
}
_SDXL_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
)
FACE_MODELS = ("scrfd_10g_bnkps.onnx", "glintr100.onnx")  # detector, recogniser: all the pipeline loads
ADAPTER_FILE = "ip-adapter.bin"
ADAPTER_KEYS = ("image_proj", "ip_adapter")


def _without_fp16(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if ".fp16." not in name]


# What is fetched (hub, S3) and materialised (download_all) per part, relative to the part's folder. The SDXL repo
# also holds fp16 duplicates, ONNX/OpenVINO exports and a 7 GB single-file checkpoint: fetching only what diffusers
# loads by default keeps the download at ~14 GB instead of ~70 GB. Local folders may still use fp16 variants.
FETCH_PATTERNS: dict[str, list[str]] = {
    "sdxl": [
        "model_index.json",
        "scheduler/*",
        "tokenizer/*",
        "tokenizer_2/*",
        *(f"{model}/{name}" for model, names in _SDXL_MODELS.items()
          for name in ["config.json", *_without_fp16(names)]),
    ],
    "identitynet": ["config.json", *_without_fp16(_UNET_WEIGHTS)],
    "adapter": [ADAPTER_FILE],
    "face_pack": [*FACE_MODELS, *(f"*/{name}" for name in FACE_MODELS)],  # `*` also matches a nested antelopev2/
    "lcm_lora": ["*.safetensors"],
    "loras": ["*.safetensors"],
    "controlnets": ["config.json", *_without_fp16(_UNET_WEIGHTS)],
    "depth_estimator": ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"],
}
HALF_DTYPES = ("float16", "bfloat16")
FP16 = "fp16"  # the published SDXL repo's half-precision files: `<name>.fp16.safetensors` beside `<name>.safetensors`


def weight_variant(dtype: str) -> str | None:
    """The weight files a replica of `dtype` fetches: fp16 and bf16 replicas take the fp16 files (half the download,
    disk and host memory of the full-precision ones; bf16 is cast from them on load), float32 the full ones."""
    return FP16 if dtype in HALF_DTYPES else None


def _sdxl_patterns(variant: str) -> list[str]:
    """SDXL's FETCH_PATTERNS with each model's `variant` weight files in place of the full-precision ones."""
    return [*(p for p in FETCH_PATTERNS["sdxl"] if p.split("/")[0] not in _SDXL_MODELS),
            *(f"{model}/{name}" for model, names in _SDXL_MODELS.items()
              for name in ["config.json", *(n for n in names if f".{variant}." in n)])]


def _models_without_weights(path: Path) -> list[str]:
    return [model for model, names in _SDXL_MODELS.items() if not any((path / model / n).is_file() for n in names)]


def load_variant(folder: Path, dtype: str) -> str | None:
    """The `variant=` for diffusers'/transformers' `from_pretrained` of one model folder: the fp16 files when the
    dtype is half and they are there, or when they are all the folder has (an fp16-only mirror); else None."""
    names = [p.name for p in folder.glob("*.safetensors")] if folder.is_dir() else []
    has_variant = any(f".{FP16}." in name for name in names)
    has_full = any(f".{FP16}." not in name for name in names) or any(folder.glob("*.bin"))
    return FP16 if has_variant and (weight_variant(dtype) or not has_full) else None


# Small parts first: a broken adapter or face pack fails before a 14 GB SDXL download starts.
_PART_ORDER = ("adapter", "face_pack", "identitynet", "lcm_lora", "sdxl")

# What `resolve_weights(parts=...)` may name: a ResolvedWeights part, `sdxl_text` (the SDXL folder with only what the
# prompt encoder loads: tokenizers and text encoders, not the UNet and VAE) and `extensions` (LoRAs, extra ControlNets,
# the depth estimator). A stage resolves only what it loads: a face replica never lists, fetches or checks SDXL.
PARTS = (*_PART_ORDER, "sdxl_text", "extensions")
_SDXL_TEXT_MODELS = ("text_encoder", "text_encoder_2")


def _sdxl_text_patterns(variant: str | None) -> list[str]:
    """The SDXL fetch patterns of the tokenizers and text encoders alone (`variant`: fp16 files for half dtypes)."""
    return ["model_index.json", "tokenizer/*", "tokenizer_2/*",
            *(f"{model}/{name}" for model in _SDXL_TEXT_MODELS
              for name in ["config.json", *(n for n in _SDXL_MODELS[model]
                                            if (f".{variant}." in n if variant else ".fp16." not in n))])]


@dataclass(frozen=True)
class ResolvedWeights:
    """Local, validated paths of every part, and where they came from."""

    # None: a part the resolution was not asked for (resolve_weights `parts`).
    sdxl: Path | None  # with `sdxl_text` only: the folder, its tokenizers and text encoders checked
    identitynet: Path | None
    adapter: Path | None  # the ip-adapter.bin file
    face_pack: Path | None  # the folder that holds the ONNX files (a nested antelopev2/ already followed)
    lcm_lora: Path | None = None
    loras: dict[str, Path] = field(default_factory=dict)  # LoRA name -> .safetensors file (folders expanded)
    lora_presets: dict[str, dict] = field(default_factory=dict)  # LoRA name -> {scheduler, steps, guidance}
    controlnets: dict[str, Path] = field(default_factory=dict)  # control type -> ControlNet folder
    depth_estimator: Path | None = None
    revisions: dict[str, str] = field(default_factory=dict)  # part -> commit sha | "etag:<digest>" | "local"
    downloaded_files: int = 0


# -- validators ------------------------------------------------------------------------------------------------


def check_sdxl(path: Path) -> Path:
    """Check an SDXL base 1.0 diffusers folder; returns it. Raises WeightsError naming the missing/broken file."""
    _need_dir("sdxl", path)
    for rel in _SDXL_FILES:
        _need_file("sdxl", path, rel)
    _check_json("sdxl", path / "model_index.json")
    for model, names in _SDXL_MODELS.items():
        _check_json("sdxl", _need_file("sdxl", path, f"{model}/config.json"))
        _check_weight_files("sdxl", path, model, names)
    return path


def check_sdxl_text(path: Path) -> Path:
    """Check the parts of an SDXL folder the prompt encoder loads: tokenizers and both text encoders; returns it."""
    _need_dir("sdxl", path)
    for rel in _SDXL_FILES:
        if rel.startswith("tokenizer"):
            _need_file("sdxl", path, rel)
    for model in _SDXL_TEXT_MODELS:
        _check_json("sdxl", _need_file("sdxl", path, f"{model}/config.json"))
        _check_weight_files("sdxl", path, model, _SDXL_MODELS[model])
    return path


def check_identitynet(path: Path) -> Path:
    """Check InstantID's `ControlNetModel/` folder (config.json + weights); returns it."""
    _need_dir("identitynet", path)
    _check_json("identitynet", _need_file("identitynet", path, "config.json"))
    _check_weight_files("identitynet", path, "", _UNET_WEIGHTS)
    return path


def check_adapter(path: Path) -> Path:
    """Check `ip-adapter.bin` (or a folder holding it): loadable, with `image_proj` and `ip_adapter` keys."""
    if path.is_dir():
        path = _need_file("adapter", path, ADAPTER_FILE)
    elif not path.is_file():
        raise WeightsError(f"adapter: missing {path.name} in {path.parent}", field="adapter")
    state = _load_torch_bin("adapter", path)
    if not isinstance(state, dict):
        raise WeightsError(f"adapter: {path} holds a {type(state).__name__}, expected a dict", field="adapter")
    missing = [key for key in ADAPTER_KEYS if key not in state]
    if missing:
        found = ", ".join(sorted(map(str, state))[:6]) or "nothing"
        raise WeightsError(
            f"adapter: {path} has no {' and no '.join(repr(k) for k in missing)} key "
            f"(expected {ADAPTER_KEYS}, found: {found})",
            field="adapter",
        )
    return path


def check_face_pack(path: Path) -> Path:
    """Find the antelopev2 ONNX files (in `path` or a nested folder, as the zip unpacks) and check them.

    Returns:
        The folder that holds the ONNX files.
    """
    folder = _find_face_pack(path)
    for name in FACE_MODELS:
        _check_onnx("face_pack", folder / name)
    return folder


def check_lcm_lora(path: Path) -> Path:
    """Check an LCM-LoRA safetensors file, or a folder with at least one; returns the path."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        raise WeightsError(f"lcm_lora: no .safetensors file at {path}", field="lcm_lora")
    for file in files:
        _check_safetensors("lcm_lora", file)
    return path


_CHECKS: dict[str, Callable[[Path], Path]] = {
    "sdxl": check_sdxl,
    "identitynet": check_identitynet,
    "adapter": check_adapter,
    "face_pack": check_face_pack,
    "lcm_lora": check_lcm_lora,
}


def check_weights(resolved_or_root: ResolvedWeights | str | Path) -> None:
    """Validate every part of resolved weights, or of a folder in the ROOT layout (`ModelSources.from_root`).

    Raises:
        WeightsError: the first missing, truncated or corrupt file, by name.
    """
    if isinstance(resolved_or_root, ResolvedWeights):
        parts = {part: getattr(resolved_or_root, part) for part in _CHECKS}
    else:
        sources = ModelSources.from_root(str(Path(resolved_or_root).expanduser()))
        parts = {part: Path(getattr(sources, part)) for part in _CHECKS if part != "lcm_lora"}
    for part, path in parts.items():
        if path is not None:
            _CHECKS[part](Path(path))


def _need_dir(part: str, path: Path) -> None:
    if not path.is_dir():
        what = "is a file, expected a folder" if path.exists() else "does not exist"
        raise WeightsError(f"{part}: {path} {what}", field=part)


def _need_file(part: str, root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise WeightsError(f"{part}: missing {rel} in {root}", field=part)
    return path


def _check_json(part: str, path: Path) -> None:
    try:
        json.loads(path.read_bytes())
    except ValueError as err:
        raise WeightsError(f"{part}: {path} is not valid JSON (truncated?): {err}", field=part) from err


def _check_weight_files(part: str, root: Path, sub: str, names: tuple[str, ...]) -> None:
    """At least one of `names` in `root/sub`; every one present must be intact (fp32 and fp16 may coexist)."""
    folder = root / sub if sub else root
    present = [folder / name for name in names if (folder / name).is_file()]
    if not present:
        first = f"{sub}/{names[0]}" if sub else names[0]
        others = ", ".join(name.removeprefix(names[0].split(".")[0]) for name in names[1:])
        raise WeightsError(f"{part}: missing {first} (or {others}) in {root}", field=part)
    for path in present:
        if path.suffix == ".safetensors":
            _check_safetensors(part, path)
        else:
            _load_torch_bin(part, path)


def _check_safetensors(part: str, path: Path) -> None:
    """Compare the data end the header declares with the file size: catches truncation without loading tensors."""
    size = path.stat().st_size
    try:
        with path.open("rb") as file:
            head = file.read(8)
            if len(head) < 8:
                raise ValueError(f"only {size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ValueError(f"header declares {header_len} bytes but the file has {size}")
            header = json.loads(file.read(header_len))
        data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise WeightsError(f"{part}: {path} is truncated or not a safetensors file ({err})", field=part) from err
    expected = 8 + header_len + data_end
    if expected != size:
        raise WeightsError(
            f"{part}: {path} is truncated or corrupt: its header declares {expected} bytes, the file has {size}",
            field=part,
        )


def _load_torch_bin(part: str, path: Path) -> Any:
    import torch  # deferred: only .bin checks need it

    try:
        # mmap keeps a multi-GB checkpoint out of RAM; legacy (non-zip) pickles cannot be mmapped.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # torch raises many types (RuntimeError, UnpicklingError, EOFError, ...)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise WeightsError(f"{part}: {path} is corrupt or truncated (torch.load failed: {reason})", field=part) from err


def _check_onnx(part: str, path: Path) -> None:
    import onnx  # deferred: only face-pack checks need it

    if not path.is_file():
        raise WeightsError(f"{part}: missing {path.name} in {path.parent}", field=part)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf DecodeError, or onnx's own errors for a non-model file
        reason = f"{part}: {path} is truncated or not an ONNX model ({type(err).__name__})"
        raise WeightsError(reason, field=part) from err
    # Protobuf has no end marker: a cut on a field boundary parses, but then the graph or opsets are missing.
    if not model.graph.node or not model.graph.output or not model.opset_import:
        raise WeightsError(f"{part}: {path} is truncated or empty (no graph nodes, outputs or opsets)", field=part)


def _find_face_pack(path: Path) -> Path:
    _need_dir("face_pack", path)
    level = [path]
    for _ in range(3):  # the folder itself, then up to two nested levels (the zip gives antelopev2/antelopev2/)
        for folder in level:
            if all((folder / name).is_file() for name in FACE_MODELS):
                return folder
        level = [sub for folder in level for sub in sorted(folder.iterdir()) if sub.is_dir() and sub.name[0] != "."]
    missing = next(name for name in FACE_MODELS if not (path / name).is_file())
    raise WeightsError(f"face_pack: missing {missing} in {path} (nor in a nested folder)", field="face_pack")


# -- resolver ----------------------------------------------------------------------------------------------------


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
    for part in _PART_ORDER:
        source = getattr(sources, part)
        if source is None or part not in wanted:
            paths[part] = None
            continue
        if source.startswith("s3://") and s3_client is None:
            from instantid_core.storage import make_s3_client

            s3_client = make_s3_client()
        variant = weight_variant(dtype) if part == "sdxl" else None
        if part == "sdxl" and text_only:
            patterns = _sdxl_text_patterns(variant)
        else:
            patterns = _sdxl_patterns(variant) if variant else FETCH_PATTERNS[part]
        path, revisions[part], count = _fetch(part, source, offline=offline, cache_root=cache_root, client=s3_client,
                                              patterns=patterns)
        downloaded += count
        missing = _models_without_weights(path) if variant and path.is_dir() else []
        if text_only:
            missing = [model for model in missing if model in _SDXL_TEXT_MODELS]
        if missing and not _is_local(source):
            # A source without fp16 files (a mirror of the full-precision ones): those models' full files instead.
            fallback = [f"{model}/{name}" for model in missing for name in _without_fp16(_SDXL_MODELS[model])]
            path, _, count = _fetch(part, source, offline=offline, cache_root=cache_root, client=s3_client,
                                    patterns=fallback)
            downloaded += count
        check = check_sdxl_text if part == "sdxl" and text_only else _CHECKS[part]
        try:
            paths[part] = check(path)
        except WeightsError as err:
            raise WeightsError(f"{err.message} (source: {source})", field=part) from err
    extensions = (resolve_extensions(sources, offline=offline, cache_root=cache_root, client=s3_client)
                  if "extensions" in wanted else {})
    return ResolvedWeights(**paths, **extensions, revisions=revisions,  # type: ignore[arg-type]
                           downloaded_files=downloaded)


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
        path, _, _ = _fetch("loras", entry.source, offline=offline, cache_root=cache_root, client=client)
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            raise WeightsError(f"loras.{key}: no .safetensors file at {path} (source: {entry.source})",
                               field=f"loras.{key}")
        for file in files:
            name = key if path.is_file() else file.stem
            _check_safetensors(f"loras.{key}", file)
            if name in loras and loras[name] != file:
                raise WeightsError(f"loras.{key}: the name {name!r} is also given by {loras[name]}",
                                   field=f"loras.{key}")
            loras[name], presets[name] = file, entry.preset()
    controlnets = {}
    for kind, source in sources.controlnets.items():
        kind = getattr(kind, "value", kind)
        path, _, _ = _fetch("controlnets", source, offline=offline, cache_root=cache_root, client=client)
        try:
            controlnets[kind] = check_identitynet(path)
        except WeightsError as err:
            raise WeightsError(err.message.replace("identitynet", f"controlnets.{kind}", 1) + f" (source: {source})",
                               field=f"controlnets.{kind}") from err
    depth = None
    if sources.depth_estimator:
        depth, _, _ = _fetch("depth_estimator", sources.depth_estimator, offline=offline, cache_root=cache_root,
                             client=client)
        _need_dir("depth_estimator", depth)
        _check_json("depth_estimator", _need_file("depth_estimator", depth, "config.json"))
    return {"loras": loras, "lora_presets": presets, "controlnets": controlnets, "depth_estimator": depth}


def _extension_sources(sources: ModelSources) -> list[str]:
    out = [v if isinstance(v, str) else v.source for v in sources.loras.values()]
    return [*out, *sources.controlnets.values(), *([sources.depth_estimator] if sources.depth_estimator else [])]


def download_all(
    dest_root: Path, sources: ModelSources | None = None, *, offline: bool | None = None, s3_client: Any = None,
    dtype: str = "float32",
) -> ResolvedWeights:
    """Resolve `sources` and materialise them into the ROOT layout (`ModelSources.from_root(dest_root)`).

    Files are hard-linked from the hub/S3 cache when on the same filesystem (no second copy of 14 GB), copied
    otherwise; a file already in place with the same size and mtime is kept, so a re-run is cheap. The nested
    antelopev2 folder is flattened. `dtype` as for `resolve_weights` (float16/bfloat16: SDXL's fp16 files).

    Returns:
        The weights under `dest_root`, with the revisions and download count of the resolve.
    """
    resolved = resolve_weights(sources or ModelSources(), offline=offline, s3_client=s3_client, dtype=dtype)
    dest_root = Path(dest_root).expanduser()
    layout = ModelSources.from_root(str(dest_root))
    dests: dict[str, Path | None] = {part: Path(getattr(layout, part)) for part in _CHECKS if part != "lcm_lora"}
    dests["lcm_lora"] = None
    if resolved.lcm_lora is not None:
        lora = dest_root / LCM_LORA_DIR
        dests["lcm_lora"] = lora / resolved.lcm_lora.name if resolved.lcm_lora.is_file() else lora
    for part, dest in dests.items():
        if dest is not None:
            _materialise(getattr(resolved, part), dest, FETCH_PATTERNS[part])
            dests[part] = _CHECKS[part](dest)
    return ResolvedWeights(
        **dests, revisions=resolved.revisions, downloaded_files=resolved.downloaded_files  # type: ignore[arg-type]
    )


def _fetch(part: str, source: str, *, offline: bool | None, cache_root: Path, client: Any,
           patterns: list[str] | None = None) -> tuple[Path, str, int]:
    """One source to a local path: (path, revision, files downloaded); `patterns`: what to fetch of a folder
    (default the part's FETCH_PATTERNS)."""
    patterns = FETCH_PATTERNS[part] if patterns is None else patterns
    if source.startswith("s3://"):
        return _fetch_s3(part, source, offline=bool(offline), cache_root=cache_root, client=client,
                         patterns=patterns)
    if _is_local(source):
        return Path(source.removeprefix("file://")).expanduser(), "local", 0  # the part's check names what is missing
    return _fetch_hf(part, source, offline=bool(offline), patterns=patterns)


def _is_local(source: str) -> bool:
    return source.startswith(("/", ".", "~", "file://")) or Path(source).exists()


def _fetch_hf(part: str, source: str, *, offline: bool, patterns: list[str]) -> tuple[Path, str, int]:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    spec, _, revision = source.partition("@")
    segments = spec.strip("/").split("/")
    if len(segments) < 2 or not all(segments) or ".." in segments:
        raise WeightsError(
            f"{part}: {source!r} is neither an existing path, an s3:// URI nor a hub id org/repo[/path][@revision]",
            field=part,
        )
    repo_id, sub = "/".join(segments[:2]), "/".join(segments[2:])
    # `sub` alone matches a file subpath; `sub/<pattern>` a folder's needed files.
    patterns = [sub, *(f"{sub}/{p}" for p in patterns)] if sub else patterns
    blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"
    before = _count_files(blobs)
    try:
        snapshot = Path(
            snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns, local_files_only=offline)
        )
    except Exception as err:  # the hub raises many types (offline, not found, gated, HTTP, incomplete cache)
        raise WeightsError(f"{part}: cannot get {source!r} from the Hugging Face hub: {err}", field=part) from err
    path = snapshot / sub if sub else snapshot
    if not path.exists():
        reason = f"{part}: no {sub!r} in {repo_id} at revision {snapshot.name} (source: {source})"
        raise WeightsError(reason, field=part)
    # Counting new blobs is how the hub cache tells what this call downloaded.
    return path, snapshot.name, max(0, _count_files(blobs) - before)


def _fetch_s3(part: str, source: str, *, offline: bool, cache_root: Path, client: Any,
              patterns: list[str]) -> tuple[Path, str, int]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = source[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    data_root = cache_root / "s3" / bucket
    # ETag records live outside the data folders (so loaders never see them); bucket names cannot start with ".".
    etag_root = cache_root / "s3" / ".etags" / bucket
    local = data_root / prefix if prefix else data_root
    if offline:
        return _cached_s3(part, source, local, etag_root, prefix)
    try:
        objects = _list_s3(client, bucket, prefix, patterns)
    except (BotoCoreError, ClientError) as err:
        raise WeightsError(f"{part}: cannot list {source}: {err}", field=part) from err
    if not objects:
        raise WeightsError(f"{part}: no objects under {source} (looked for {patterns})", field=part)
    downloaded = 0
    for key, etag, size in objects:
        if ".." in key.split("/") or key.startswith("/"):
            raise WeightsError(f"{part}: refusing S3 key {key!r} (escapes the cache folder)", field=part)
        dest, record = data_root / key, etag_root / key
        if dest.is_file() and dest.stat().st_size == size and record.is_file() and record.read_text() == etag:
            continue  # unchanged since the last download
        try:
            _download_s3(client, bucket, key, dest)
        except (BotoCoreError, ClientError, OSError) as err:
            raise WeightsError(f"{part}: cannot download s3://{bucket}/{key}: {err}", field=part) from err
        _write_atomic(record, etag.encode())  # after the data: a crash in between means one more download
        downloaded += 1
    return local, _etag_digest((key, etag) for key, etag, _ in objects), downloaded


def _list_s3(client: Any, bucket: str, prefix: str, patterns: list[str]) -> list[tuple[str, str, int]]:
    """(key, etag, size) of the needed objects: the prefix itself when it is a file, else matches under it."""
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if prefix and key == prefix:
                return [(key, obj["ETag"], obj["Size"])]
            rel = key[len(prefix) + 1:] if prefix else key
            if (not prefix or key.startswith(prefix + "/")) and any(fnmatch.fnmatch(rel, p) for p in patterns):
                found.append((key, obj["ETag"], obj["Size"]))
    return found


def _download_s3(client: Any, bucket: str, key: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    try:
        client.download_file(bucket, key, str(tmp))  # s3transfer: parallel ranged GETs for large files
        os.replace(tmp, dest)  # a reader never sees a half-written file under the final name
    finally:
        tmp.unlink(missing_ok=True)


def _cached_s3(part: str, source: str, local: Path, etag_root: Path, prefix: str) -> tuple[Path, str, int]:
    records = etag_root / prefix if prefix else etag_root
    files = [records] if records.is_file() else sorted(p for p in records.rglob("*") if p.is_file())
    if not local.exists() or not files:
        raise WeightsError(f"{part}: offline and {source} is not cached in {local}", field=part)
    entries = ((p.relative_to(etag_root).as_posix(), p.read_text()) for p in files if not p.name.endswith(".part"))
    return local, _etag_digest(entries), 0


def _etag_digest(entries: Any) -> str:
    text = "".join(f"{key}\0{etag}\n" for key, etag in sorted(entries))
    return "etag:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _count_files(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if not p.name.endswith(".incomplete")) if folder.is_dir() else 0


def _materialise(src: Path, dest: Path, patterns: list[str]) -> None:
    """Link or copy `src` (a file, or the needed files of a folder) to `dest`."""
    if src.is_file():
        _link_or_copy(src, dest)
        return
    def wanted(rel: str) -> bool:
        return any(fnmatch.fnmatch(rel, p) for p in patterns)

    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(src).parts):
            continue
        plain = rel.replace(".fp16.", ".")
        # An fp16 variant is taken only when its full-precision sibling is absent (a local fp16-only folder).
        if wanted(rel) or (plain != rel and wanted(plain) and not (src / plain).is_file()):
            _link_or_copy(path, dest / rel)


def _link_or_copy(src: Path, dest: Path) -> None:
    src = src.resolve()  # hub snapshots are symlinks into blobs/: link the blob, not the symlink
    if dest.exists():
        if os.path.samefile(src, dest):
            return
        a, b = src.stat(), dest.stat()
        if a.st_size == b.st_size and int(a.st_mtime) == int(b.st_mtime):  # rsync's quick check; copy2 keeps mtime
            return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    try:
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
