"""Checks of each weight part's files before a loader sees them: a missing file, a nested
`antelopev2/antelopev2/` folder or a truncated download becomes a WeightsError naming the file, not a stack trace
from deep inside a loader."""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ModelSources
from .errors import WeightsError
from .weight_layout import (
    ADAPTER_FILE,
    ADAPTER_KEYS,
    FACE_MODELS,
    SAFETY_CHECKER_WEIGHTS,
    SDXL_FILES,
    SDXL_MODELS,
    SDXL_TEXT_MODELS,
    UNET_WEIGHTS,
    ResolvedWeights,
)


def check_sdxl(path: Path) -> Path:
    """Check an SDXL base 1.0 diffusers folder; returns it. Raises WeightsError naming the missing/broken file."""
    need_dir("sdxl", path)
    for rel in SDXL_FILES:
        need_file("sdxl", path, rel)
    check_json("sdxl", path / "model_index.json")
    for model, names in SDXL_MODELS.items():
        check_json("sdxl", need_file("sdxl", path, f"{model}/config.json"))
        _check_weight_files("sdxl", path, model, names)
    return path


def check_sdxl_text(path: Path) -> Path:
    """Check the parts of an SDXL folder the prompt encoder loads: tokenizers and both text encoders; returns it."""
    need_dir("sdxl", path)
    for rel in SDXL_FILES:
        if rel.startswith("tokenizer"):
            need_file("sdxl", path, rel)
    for model in SDXL_TEXT_MODELS:
        check_json("sdxl", need_file("sdxl", path, f"{model}/config.json"))
        _check_weight_files("sdxl", path, model, SDXL_MODELS[model])
    return path


def check_identitynet(path: Path) -> Path:
    """Check InstantID's `ControlNetModel/` folder (config.json + weights); returns it."""
    need_dir("identitynet", path)
    check_json("identitynet", need_file("identitynet", path, "config.json"))
    _check_weight_files("identitynet", path, "", UNET_WEIGHTS)
    return path


def check_adapter(path: Path) -> Path:
    """Check `ip-adapter.bin` (or a folder holding it): loadable, with `image_proj` and `ip_adapter` keys."""
    if path.is_dir():
        path = need_file("adapter", path, ADAPTER_FILE)
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
        check_safetensors("lcm_lora", file)
    return path


def check_safety_checker(path: Path) -> Path:
    """diffusers' StableDiffusionSafetyChecker as CompVis publishes it: config.json, preprocessor_config.json (its
    CLIPImageProcessor) and model.safetensors or pytorch_model.bin."""
    part = "safety_checker"
    need_dir(part, path)
    for name in ("config.json", "preprocessor_config.json"):
        check_json(part, need_file(part, path, name))
    _check_weight_files(part, path, "", SAFETY_CHECKER_WEIGHTS)
    return path


def check_scoring_face_pack(path: Path) -> Path:
    """An insightface pack for the identity scorer: any folder (or one nested level) of ONNX files, which
    insightface's model_zoo routes by their graphs (antelopev2, buffalo_l, ...); each file must parse. Whether it
    holds a detector and a recogniser is the scorer's check when it loads them.

    Returns:
        The folder that holds the ONNX files.
    """
    part = "scoring_face_pack"
    need_dir(part, path)
    folder = path if any(path.glob("*.onnx")) else next(
        (sub for sub in sorted(path.iterdir()) if sub.is_dir() and any(sub.glob("*.onnx"))), None)
    if folder is None:
        raise WeightsError(f"{part}: no ONNX files in {path} (nor in a nested folder)", field=part)
    for file in sorted(folder.glob("*.onnx")):
        _check_onnx(part, file)
    return folder


CHECKS: dict[str, Callable[[Path], Path]] = {
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
        parts = {part: getattr(resolved_or_root, part) for part in CHECKS}
    else:
        sources = ModelSources.from_root(str(Path(resolved_or_root).expanduser()))
        parts = {part: Path(getattr(sources, part)) for part in CHECKS if part != "lcm_lora"}
    for part, path in parts.items():
        if path is not None:
            CHECKS[part](Path(path))


def need_dir(part: str, path: Path) -> None:
    if not path.is_dir():
        what = "is a file, expected a folder" if path.exists() else "does not exist"
        raise WeightsError(f"{part}: {path} {what}", field=part)


def need_file(part: str, root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise WeightsError(f"{part}: missing {rel} in {root}", field=part)
    return path


def check_json(part: str, path: Path) -> None:
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
            check_safetensors(part, path)
        else:
            _load_torch_bin(part, path)


def check_safetensors(part: str, path: Path) -> None:
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
    need_dir("face_pack", path)
    level = [path]
    for _ in range(3):  # the folder itself, then up to two nested levels (the zip gives antelopev2/antelopev2/)
        for folder in level:
            if all((folder / name).is_file() for name in FACE_MODELS):
                return folder
        level = [sub for folder in level for sub in sorted(folder.iterdir()) if sub.is_dir() and sub.name[0] != "."]
    missing = next(name for name in FACE_MODELS if not (path / name).is_file())
    raise WeightsError(f"face_pack: missing {missing} in {path} (nor in a nested folder)", field="face_pack")
