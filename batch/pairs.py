"""What a batch run is made of: its settings, its prompt set, its input photos, and the deterministic id and seed
of each (photo, prompt) pair (a rerun writes the same keys and reproduces the same images)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from instantid_app.config import AppConfig
from instantid_core.config import NO_STYLE, ModelSources, PipelineSettings
from instantid_core.errors import InvalidParameter
from instantid_core.storage import OutputStore
from instantid_core.weight_layout import ResolvedWeights

# An `error` record is retried on the next run; `unsafe_content` (block mode flagged every image) is final: the pair's
# seed is fixed, so a rerun would make the same images.
TERMINAL = ("ok", "no_face", "bad_image", "unsafe_content")


class PromptSpec(BaseModel):
    """One prompt of the set; `params` overrides the job-wide parameters for it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    prompt: str
    negative_prompt: str = ""
    style: str = Field(NO_STYLE, max_length=100, description="a built-in style or one of the config's styles")
    params: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class BatchSettings:
    """Where the models come from and how they run (from `--config` / `--weights`)."""

    sources: ModelSources
    tiny_preset_dir: str | None
    pipeline: PipelineSettings
    face_resources: dict[str, float] = field(default_factory=dict)  # custom resources (e.g. cpu_node) per actor
    denoise_resources: dict[str, float] = field(default_factory=dict)  # e.g. gpu_node
    app: AppConfig | None = None  # --config's: its loras, controlnets and depth_estimator over the weights' own


def load_prompts(path: Path) -> list[PromptSpec]:
    """A YAML list or JSONL file of prompts; ids must be unique (they name outputs).

    Raises:
        InvalidParameter: the file is missing, does not parse, is not a list, or repeats an id (named).
    """
    try:
        text = path.read_text()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InvalidParameter(f"--prompts {path}: {exc}", field="prompts") from None
    if not isinstance(rows, list) or not rows:
        raise InvalidParameter(f"--prompts {path}: expected a non-empty list of prompts", field="prompts")
    specs = []
    for index, row in enumerate(rows):
        try:
            specs.append(PromptSpec.model_validate(row))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise InvalidParameter(f"--prompts {path}: prompt {index}: {where}: {first['msg']}",
                                   field="prompts") from None
    duplicates = [pid for pid, n in Counter(s.id for s in specs).items() if n > 1]
    if duplicates:
        raise InvalidParameter(f"--prompts {path}: duplicate prompt ids: {duplicates}", field="prompts")
    return specs


def pair_id(image_key: str, prompt_id: str) -> str:
    """Deterministic request id of one (image, prompt) pair: the same keys on every run."""
    return hashlib.sha256(f"{image_key}\0{prompt_id}".encode()).hexdigest()[:32]


def pair_seed(image_key: str, prompt_id: str, base_seed: int | None) -> int:
    digest = hashlib.sha256(f"{image_key}\0{prompt_id}\0{'-' if base_seed is None else base_seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def as_uri(location: str) -> str:
    """s3:// and file:// URIs as given; a plain folder path becomes a file:// URI."""
    return location if "://" in location else Path(location).resolve().as_uri()


def list_inputs(store: OutputStore, input_uri: str, limit: int | None, output_uri: str | None = None) -> list[str]:
    """Every object under the input prefix, taken as a folder (`faces` never matches `faces_old/`), without
    hidden files, folder markers and anything under the output prefix (an output inside the input is no input)."""
    prefix = input_uri.rstrip("/") + "/"
    outputs = output_uri.rstrip("/") + "/" if output_uri else None
    uris = sorted(u for u in store.list_uris(prefix) if not u.endswith("/")
                  and not u.rsplit("/", 1)[-1].startswith(".") and not (outputs and u.startswith(outputs)))
    return uris[:limit] if limit else uris




INPUT_PHOTO = b"$input"  # --params '{"init_image": "$input"}': every row starts from its own photo




def resolve_models(settings: BatchSettings) -> ResolvedWeights:
    """The weights every actor of the job loads: the tiny preset or the sources, with the config's extensions."""
    from instantid_app.weights import resolve_sources

    return resolve_sources(settings.sources, settings.tiny_preset_dir, settings.app, dtype=settings.pipeline.dtype)
