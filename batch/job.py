"""Batch generation over an image set: every photo x every prompt, on Ray Data, resumable, with a manifest.

    instantid batch --input s3://bucket/faces/ --prompts prompts.yaml --output s3://bucket/out/ [--params JSON]
    ray job submit -- python -m instantid_cli batch --input ... --prompts ... --output ...

Stages (the core library's, not the HTTP app's): face analysis on a CPU actor pool, prompt encoding once per prompt
(in one task before the dataset runs), the denoiser on an actor pool that asks for GPUs when the pipeline runs on
CUDA, writing through OutputStore. Each (image, prompt) pair has a deterministic request id and seed, so a rerun
writes the same keys and reproduces the same images; finished pairs are read back from the manifest (and from
sidecars already written) and skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm import tqdm

from instantid_app.cache import LRUCache
from instantid_app.config import AppConfig
from instantid_core.config import NO_STYLE, GenerateParams, ModelSources, PipelineSettings, Scheduler
from instantid_core.errors import ImageTooLarge, InstantIDError, InvalidImage, InvalidParameter, NoFaceDetected
from instantid_core.storage import OutputStore

TERMINAL = ("ok", "no_face", "bad_image")  # an `error` record is retried on the next run


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


# --- Ray Data stages (classes: one model per actor, loaded once) ---------------------------------------------------
def _resolve(settings: BatchSettings):
    from instantid_app.weights import resolve_sources

    return resolve_sources(settings.sources, settings.tiny_preset_dir, settings.app, dtype=settings.pipeline.dtype)


class FaceStage:
    def __init__(self, settings: BatchSettings, params: dict[str, GenerateParams],
                 photos: dict[str, bytes] | None = None) -> None:
        from instantid_core.face import FaceAnalyzer

        self.settings = settings
        self.analyzer = FaceAnalyzer(_resolve(settings).face_pack, settings.pipeline)
        self.params = params
        self.photos = photos or {}  # --params init_image / mask_image, read once by the driver
        self.store = OutputStore("file:///")
        self.cache = LRUCache(64 * 2**20)  # pickled FaceConditions (keypoint image included), by bytes

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from instantid_core.pipeline import RequestPhotos, face_condition

        out: dict[str, list] = {"image": [], "prompt_id": [], "status": [], "message": [], "face": []}
        cache = self.cache  # one analysis per (image, output size, face index), across batches
        for image_uri, prompt_id in zip(batch["image"], batch["prompt_id"], strict=False):
            params = self.params[prompt_id]
            status, message, face = "ok", "", b""
            try:
                key = (image_uri, params.width, params.height, params.face_index, params.pose_face_index,
                       params.inpaint_face)
                face = cache.get(key) if not self.photos else None  # img2img rows carry the photo: not cached
                if face is None:
                    data = self.store.read_bytes(image_uri)
                    photos = RequestPhotos([data], init=self._photo("init_image", data),
                                           mask=self._photo("mask_image", data), face_names=[image_uri])
                    face = pickle.dumps(face_condition(self.analyzer, photos, params, self.settings.pipeline))
                    if not self.photos:
                        cache.put(key, face)
            except NoFaceDetected as exc:
                status, message = "no_face", exc.message
            except (InvalidImage, ImageTooLarge) as exc:
                status, message = "bad_image", exc.message
            except Exception as exc:  # one bad input never stops the job: recorded, retried next run
                status, message = "error", f"{type(exc).__name__}: {exc}"
            for name, value in (("image", image_uri), ("prompt_id", prompt_id), ("status", status),
                                ("message", message), ("face", face)):
                out[name].append(value)
        return out

    def _photo(self, name: str, row_photo: bytes) -> bytes | None:
        """`init_image: "$input"` is each row's own photo (restyle it, or swap its face: inpaint_face)."""
        photo = self.photos.get(name)
        return row_photo if photo == INPUT_PHOTO else photo


class DenoiseStage:
    def __init__(self, settings: BatchSettings, params: dict[str, GenerateParams], prompts: dict[str, Any],
                 base_seed: dict[str, int | None]) -> None:
        from instantid_core.denoise import IdentityDenoiser

        self.denoiser = IdentityDenoiser.from_weights(_resolve(settings), settings.pipeline)
        self.settings, self.params, self.prompts, self.base_seed = settings, params, prompts, base_seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from instantid_core.batching import run_grouped
        from instantid_core.pipeline import denoise_request

        rows = len(batch["image"])
        images: list[bytes] = [b""] * rows
        status, message = list(batch["status"]), list(batch["message"])
        work, rows_of_work = [], []
        for i in range(rows):
            if status[i] != "ok":
                continue
            prompt_id, image_uri = batch["prompt_id"][i], batch["image"][i]
            seed = pair_seed(image_uri, prompt_id, self.base_seed[prompt_id])
            work.append(denoise_request(pickle.loads(batch["face"][i]), self.prompts[prompt_id],
                                        self.denoiser.loras.with_presets(self.params[prompt_id]), seed,
                                        self.settings.pipeline.default_scheduler))
            rows_of_work.append(i)
        # Rows sharing size/steps/scheduler/LoRA set run as one GPU batch (split when out of device memory); an
        # error is recorded on its rows (retried next run) and the job goes on.
        for i, output in zip(rows_of_work, run_grouped(self.denoiser, work, catch=(Exception,)), strict=True):
            if isinstance(output, Exception):
                status[i], message[i] = "error", f"{type(output).__name__}: {output}"
            else:
                images[i] = pickle.dumps(output)
        return {"image": batch["image"], "prompt_id": batch["prompt_id"], "status": status, "message": message,
                "images": images}


class WriteStage:
    def __init__(self, output_uri: str, fmt: str, params: dict[str, GenerateParams], day: str,
                 base_seed: dict[str, int | None], default_scheduler: Scheduler) -> None:
        self.store = OutputStore(output_uri)
        self.fmt, self.params, self.base_seed = fmt, params, base_seed
        self.default_scheduler = default_scheduler
        self.now = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from instantid_core.sidecar import build_sidecar
        from instantid_core.storage import encode_image

        records = []
        for i in range(len(batch["image"])):
            image_uri, prompt_id = batch["image"][i], batch["prompt_id"][i]
            record = {"image": image_uri, "prompt_id": prompt_id, "status": batch["status"][i],
                      "request_id": pair_id(image_uri, prompt_id)}
            if record["status"] == "ok":
                try:
                    arrays = pickle.loads(batch["images"][i])
                    height, width = arrays.shape[1:3]
                    meta = build_sidecar(self.params[prompt_id], seed=pair_seed(image_uri, prompt_id,
                                                                                self.base_seed[prompt_id]),
                                         width=width, height=height, inputs={"face": [image_uri]},
                                         default_scheduler=self.default_scheduler, prompt_id=prompt_id)
                    stored = self.store.write_request(record["request_id"],
                                                      [encode_image(a, self.fmt) for a in arrays], self.fmt, meta,
                                                      now=self.now)
                    record.update(outputs=stored.image_uris, metadata=stored.meta_uri)
                except Exception as exc:
                    record.update(status="error", message=f"{type(exc).__name__}: {exc}")
            else:
                record["message"] = batch["message"][i]
            records.append(json.dumps(record))
        return {"record": records}


# --- the job --------------------------------------------------------------------------------------------------------
class Manifest:
    """JSONL parts under `{output}/manifest/` (S3 has no append), plus `summary.json` at the end."""

    def __init__(self, store: OutputStore, flush_every: int = 8, flush_seconds: float = 5.0) -> None:
        self.store, self.flush_every, self.flush_seconds = store, flush_every, flush_seconds
        self.run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.pending: list[dict] = []
        self.parts = 0
        self.last_flush = time.monotonic()

    def load(self) -> dict[tuple[str, str], dict]:
        """The newest record per (image, prompt) over all earlier runs."""
        latest: dict[tuple[str, str], dict] = {}
        for uri in sorted(self.store.list_uris(f"{self.store.base_uri.rstrip('/')}/manifest/")):
            for line in self.store.read_bytes(uri).decode().splitlines():
                if line.strip():
                    record = json.loads(line)
                    latest[(record["image"], record["prompt_id"])] = record
        return latest

    def add(self, record: dict) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.flush_every or time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            body = "".join(json.dumps(r) + "\n" for r in self.pending).encode()
            self.store.write_bytes(f"manifest/part-{self.run_id}-{self.parts:05d}.jsonl", body, "application/x-ndjson")
            self.parts += 1
            self.pending = []
        self.last_flush = time.monotonic()


def recover_written(store: OutputStore, pairs: Iterable[tuple[str, str]], day: str) -> dict[tuple[str, str], dict]:
    """Pairs whose sidecar exists (written, but the run died before its manifest part was flushed): one listing of
    the day's folder, then a read of each sidecar found (not one request per pair)."""
    base = store.base_uri.rstrip("/")
    written = {uri.removeprefix(f"{base}/") for uri in store.list_uris(f"{base}/{day}/") if uri.endswith("/meta.json")}
    found = {}
    for image_uri, prompt_id in pairs:
        request_id = pair_id(image_uri, prompt_id)
        meta_key = f"{day}/{request_id}/meta.json"
        if meta_key in written:
            meta = store.get_json(meta_key)
            found[(image_uri, prompt_id)] = {"image": image_uri, "prompt_id": prompt_id, "status": "ok",
                                             "request_id": request_id, "outputs": meta.get("images", []),
                                             "metadata": f"{base}/{meta_key}"}
    return found


INPUT_PHOTO = b"$input"  # --params '{"init_image": "$input"}': every row starts from its own photo


def split_photo_params(params: dict[str, Any], store: OutputStore,
                       pipeline: PipelineSettings) -> tuple[dict[str, Any], dict[str, bytes]]:
    """--params minus `init_image` / `mask_image` (a path or s3:// URI, read here once, or "$input" for
    init_image), and those photos' bytes, checked to decode before the job starts."""
    from instantid_core.images import load_image

    params, photos = dict(params), {}
    for name in ("init_image", "mask_image"):
        source = params.pop(name, None)
        if source is None:
            continue
        if not isinstance(source, str) or (source == "$input" and name != "init_image"):
            raise InvalidParameter(f"--params {name}: a path or s3:// URI" + (' or "$input"' if name == "init_image"
                                                                                else ""), field=name)
        if source == "$input":
            photos[name] = INPUT_PHOTO
            continue
        try:
            data = store.read_bytes(as_uri(source))
        except Exception as exc:  # a missing file or object, no access: one line naming the parameter
            raise InvalidParameter(f"--params {name}: cannot read {source}: {exc}", field=name) from exc
        load_image(data, name=f"--params {name}", max_pixels=pipeline.max_image_pixels,
                   max_side=pipeline.max_image_side)
        photos[name] = data
    return params, photos


def run_batch(input_uri: str, prompts: list[PromptSpec], output_uri: str, settings: BatchSettings,
              params: dict[str, Any] | None = None, limit: int | None = None, fmt: str = "png",
              denoise_actors: int = 1, face_actors: int = 1, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a batch job; returns the summary that is also written to `{output}/summary.json`."""
    import ray

    started = time.perf_counter()
    input_uri, output_uri = as_uri(input_uri), as_uri(output_uri)
    store = OutputStore(output_uri)
    inputs_store = OutputStore("file:///")
    images = list_inputs(inputs_store, input_uri, limit, output_uri)
    if not images:  # checked before anything is written: a mistyped prefix leaves no job behind
        raise InvalidParameter(f"--input {input_uri}: no files under this prefix", field="input")
    params, photos = split_photo_params(params or {}, inputs_store, settings.pipeline)  # before anything is written
    state = store.get_json("job.json") if store.exists("job.json") else {
        "day": f"{datetime.now(timezone.utc):%Y-%m-%d}", "input": input_uri}
    store.put_json("job.json", state)  # the date partition of the first run is kept, so reruns hit the same keys
    per_prompt = {p.id: GenerateParams.model_validate({**params, **p.params, "prompt": p.prompt,
                                                       "negative_prompt": p.negative_prompt, "style": p.style})
                  for p in prompts}
    if any(p.controls for p in per_prompt.values()):  # the face actors keep no photo bytes for canny/depth maps
        raise InvalidParameter("controls: the batch job does not run extra ControlNets (the HTTP API and the "
                               "library do); LoRAs (`loras`) work here", field="controls")
    base_seed = {pid: p.seed for pid, p in per_prompt.items()}
    pairs = [(image, p.id) for image in images for p in prompts]

    manifest = Manifest(store)
    done = {k: r for k, r in manifest.load().items() if r["status"] in TERMINAL}
    recovered = recover_written(store, [pair for pair in pairs if pair not in done], state["day"])
    for record in recovered.values():
        manifest.add(record)
    done.update(recovered)
    todo = [pair for pair in pairs if pair not in done]
    _log(f"{len(images)} images x {len(prompts)} prompts = {len(pairs)} pairs; {len(done)} done, {len(todo)} to run",
         progress)

    counts, written = Counter(), 0  # this run's records by status, and the images they wrote
    if todo:
        if not ray.is_initialized():
            ray.init(logging_level="WARNING", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = progress
        on_gpu = settings.pipeline.device.startswith("cuda")
        # Once per prompt, on the device the pipeline names (a task without a GPU sees none: Ray hides them).
        encode = ray.remote(num_gpus=1 if on_gpu else 0, num_cpus=1)(_encode_prompts)
        embeds = ray.get(encode.remote(settings, per_prompt))
        dataset = ray.data.from_items([{"image": image, "prompt_id": pid} for image, pid in todo])
        dataset = dataset.map_batches(FaceStage, fn_constructor_kwargs={"settings": settings, "params": per_prompt,
                                                                          "photos": photos},
                                      batch_size=8, concurrency=face_actors, num_cpus=1,
                                      resources=settings.face_resources or None)
        dataset = dataset.map_batches(DenoiseStage, fn_constructor_kwargs={
            "settings": settings, "params": per_prompt, "prompts": embeds, "base_seed": base_seed},
            batch_size=4, concurrency=denoise_actors, num_gpus=1 if on_gpu else 0, num_cpus=0 if on_gpu else 1,
            resources=settings.denoise_resources or None)
        dataset = dataset.map_batches(WriteStage, fn_constructor_kwargs={
            "output_uri": output_uri, "fmt": fmt, "params": per_prompt, "day": state["day"], "base_seed": base_seed,
            "default_scheduler": settings.pipeline.default_scheduler},
            batch_size=8, concurrency=1, num_cpus=0.5)
        with tqdm(total=len(todo), desc="pairs", unit="pair", disable=not progress, file=sys.stderr) as bar:
            for row in dataset.iter_rows():
                record = json.loads(row["record"])
                counts[record["status"]] += 1
                written += len(record.get("outputs", []))
                manifest.add(record)
                bar.update()
                bar.set_postfix({**counts, "img/s": f"{written / bar.format_dict['elapsed']:.2f}"
                                 if bar.format_dict["elapsed"] else "-"}, refresh=False)
    manifest.flush()

    wanted = set(pairs)
    final = {k: r for k, r in manifest.load().items() if k in wanted}
    seconds = time.perf_counter() - started
    summary = {
        "input": input_uri, "output": output_uri, "images": len(images), "prompts": len(prompts),
        "pairs": len(pairs), "this_run": dict(counts), "skipped": len(pairs) - len(todo),
        "status": dict(Counter(r["status"] for r in final.values())),
        "outputs": sum(len(r.get("outputs", [])) for r in final.values()),
        "seconds": round(seconds, 2), "images_per_s": round(written / seconds, 3),
    }
    store.put_json("summary.json", summary)
    _log(f"done: {summary['status']} over {summary['pairs']} pairs; this run {dict(counts)}, {written} images "
         f"in {summary['seconds']}s ({summary['images_per_s']} images/s)", True)
    return summary


def _encode_prompts(settings: BatchSettings, params: dict[str, GenerateParams]) -> dict[str, Any]:
    from instantid_core.text import PromptEncoder

    encoder = PromptEncoder(_resolve(settings).sdxl, settings.pipeline)
    return {pid: encoder.encode(p.prompt, p.negative_prompt, p.style) for pid, p in params.items()}


def _log(message: str, enabled: bool) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


# --- command line ---------------------------------------------------------------------------------------------------
def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="s3://bucket/prefix/ or a folder of face photos")
    parser.add_argument("--prompts", required=True, type=Path, help="prompts.yaml (list) or prompts.jsonl")
    parser.add_argument("--output", required=True, help="s3://bucket/prefix/ or a folder")
    parser.add_argument("--params", default="{}", help="job-wide GenerateParams as JSON, e.g. '{\"steps\": 20}'")
    parser.add_argument("--limit", type=int, help="only the first N images (sorted by key)")
    parser.add_argument("--format", choices=("png", "jpeg", "webp"), default="png")
    parser.add_argument("--config", type=Path, help="serve_config.yaml whose AppConfig gives weights + pipeline")
    parser.add_argument("--weights", help="a weights folder (overrides --config's sources)")
    parser.add_argument("--denoise-actors", type=int, default=1)
    parser.add_argument("--face-actors", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")


def settings_from_args(args: argparse.Namespace) -> BatchSettings:
    from instantid_app.config import SERVE_CONFIG_PATH, app_spec, load_serve_config

    spec = app_spec(load_serve_config(args.config or SERVE_CONFIG_PATH))
    app = spec.args
    # The same node types as the serving app: face actors where FaceAnalysis goes, denoisers where the Denoiser goes.
    placement = {"face_resources": spec.options("FaceAnalysis")["ray_actor_options"].get("resources", {}),
                 "denoise_resources": spec.options("Denoiser")["ray_actor_options"].get("resources", {})}
    if args.weights:
        return BatchSettings(ModelSources.from_root(args.weights), None, app.pipeline, **placement, app=app)
    tiny = app.weights.tiny_dir if app.weights.preset == "tiny" else None
    return BatchSettings(app.weights.sources or ModelSources(), tiny, app.pipeline, **placement, app=app)


def run_from_args(args: argparse.Namespace) -> None:
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as exc:
        raise InstantIDError(f"--params is not JSON: {exc}") from exc
    run_batch(args.input, load_prompts(args.prompts), args.output, settings_from_args(args), params, args.limit,
              args.format, args.denoise_actors, args.face_actors, progress=not args.no_progress)

