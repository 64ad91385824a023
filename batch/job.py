"""Batch generation over an image set: every photo x every prompt, on Ray Data, resumable, with a manifest.

    instantid batch --input s3://bucket/faces/ --prompts prompts.yaml --output s3://bucket/out/ [--params JSON]
    ray job submit -- python -m instantid_cli batch --input ... --prompts ... --output ...

Stages (the core library's, not the HTTP app's): face analysis on a CPU actor pool, prompt encoding once per prompt
(in one task before the dataset runs), the denoiser on an actor pool that asks for GPUs when the pipeline runs on
CUDA (with the config's `scoring` it also chooses by identity score: best_of, min_identity's rounds), writing through
OutputStore. Each (image, prompt) pair has a deterministic request id and seed, so a rerun
writes the same keys and reproduces the same images; finished pairs are read back from the manifest (and from
sidecars already written) and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from instantid_core.config import GenerateParams, ModelSources, PipelineSettings
from instantid_core.errors import InstantIDError, InvalidParameter
from instantid_core.scoring import DEFAULT_MAX_CANDIDATES, check_scoring_params
from instantid_core.storage import OutputStore

from .manifest import Manifest, recover_written
from .pairs import INPUT_PHOTO, TERMINAL, BatchSettings, PromptSpec, as_uri, list_inputs, load_prompts, resolve_models
from .stages import DenoiseStage, FaceStage, WriteStage


def split_photo_params(params: dict[str, Any], store: OutputStore,
                       pipeline: PipelineSettings) -> tuple[dict[str, Any], dict[str, bytes]]:
    """--params minus `init_image` / `mask_image` (a path or s3:// URI, read here once, or "$input" for
    init_image) and each `identities[i].face_image` (a path or s3:// URI, or "$input", the default: the row's photo),
    and those photos' bytes, checked to decode before the job starts."""
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
    if isinstance(params.get("identities"), list):  # several people: each identity's photo, or the row's ("$input")
        entries = []
        for i, entry in enumerate(params["identities"]):
            entry = dict(entry) if isinstance(entry, dict) else entry
            source = entry.pop("face_image", "$input") if isinstance(entry, dict) else "$input"
            field = f"identities[{i}].face_image"
            if not isinstance(source, str):
                raise InvalidParameter(f"--params {field}: a path or s3:// URI, or \"$input\"", field=field)
            if source == "$input":
                photos[field] = INPUT_PHOTO
            else:
                try:
                    photos[field] = store.read_bytes(as_uri(source))
                except Exception as exc:  # a missing file or object, no access: one line naming the parameter
                    raise InvalidParameter(f"--params {field}: cannot read {source}: {exc}", field=field) from exc
                load_image(photos[field], name=f"--params {field}", max_pixels=pipeline.max_image_pixels,
                           max_side=pipeline.max_image_side)
            entries.append(entry)
        params["identities"] = entries
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
    if any(p.face_detail != "off" for p in per_prompt.values()):
        raise InvalidParameter("face_detail: the batch job does not run the detail pass (the HTTP API, the library "
                               "and the CLI do)", field="face_detail")
    scoring = settings.app.scoring if settings.app is not None else None
    for prompt_params in per_prompt.values():  # best_of / min_identity need the config's `scoring`, within its bound
        check_scoring_params(prompt_params, scoring is not None,
                             scoring.max_candidates if scoring else DEFAULT_MAX_CANDIDATES)
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
            "default_scheduler": settings.pipeline.default_scheduler,
            "safety_mode": settings.app.safety.mode if settings.app and settings.app.safety else None},
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

    encoder = PromptEncoder(resolve_models(settings).sdxl, settings.pipeline)
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
