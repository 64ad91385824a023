"""Per-stage timings of the core pipeline (issue 3) on the tiny preset, on the CPU.

    python bench/core.py --weights .cache/tiny                    # print the tables (`make bench`)
    python bench/core.py --weights .cache/tiny --write-results    # and replace the section in bench/RESULTS.md

What is timed, each stage through the product's own code (`instantid_core`), nothing re-implemented:
- weights load: `resolve_weights` (validation of every file), then `FaceAnalyzer`, `PromptEncoder` and
  `IdentityDenoiser` construction: what `InstantIDPipeline.__init__` does, part by part.
- per request, at each size: photo decode + face analysis + keypoint image (`face_condition`); prompt
  encoding (`PromptEncoder.encode`); the denoiser's own stages in the order `IdentityDenoiser._run` calls them:
  conditioning (Resampler on the face embedding, keypoint image preprocessing), the denoising loop (UNet +
  IdentityNet, classifier-free guidance, scheduler; also per step), VAE decode to uint8; then PNG encoding and the
  write of image + sidecar (`encode_image`, `OutputStore.write_request` to a temporary folder).
- the whole `IdentityDenoiser.__call__`, as a check that the staged run is the product's path: its image must equal
  the staged run's image exactly, and its time is close to the sum of the staged parts.

Every figure is the median of --repeats runs after --warmup runs (the warm-up pays one-off costs: first-call
allocations, onnxruntime's first session run, lazy imports). The tiny preset keeps SDXL's 8x VAE downsampling, so
latents are 1/8 of the image side, as with the real weights; its absolute times say nothing about SDXL's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from instantid_core.config import GenerateParams, ModelSources, PipelineSettings, Style

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
RESULTS_DIR = BENCH_DIR / "results"
SECTION = "## Core pipeline (tiny preset, CPU)"
FACE_PHOTO = REPO / "instantid_core" / "data" / "astronaut.jpg"
PROMPT, NEGATIVE = "a portrait photo of an astronaut, studio light", "blurry, lowres"
SEED = 1234


class Laps:
    """Consecutive laps: each `lap(name)` records the time since the previous one, so the laps add up to the
    whole run and nothing between two stages goes uncounted."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.parts[name] = now - self._last
        self._last = now

    def total(self) -> float:
        return sum(self.parts.values())


def summary(seconds: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "n": len(seconds)}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers
    import onnxruntime

    return {
        "cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }


def bench_load(root: Path, settings: PipelineSettings, warmup: int, repeats: int) -> dict[str, dict]:
    """Weights load, part by part, as InstantIDPipeline.__init__ does it."""
    from instantid_core.denoise import IdentityDenoiser
    from instantid_core.face import FaceAnalyzer
    from instantid_core.text import PromptEncoder
    from instantid_core.weights import resolve_weights

    times: dict[str, list[float]] = {}
    for run in range(warmup + repeats):
        laps = Laps()
        weights = resolve_weights(ModelSources.from_root(str(root)))
        laps.lap("resolve + validate weights")
        FaceAnalyzer(weights.face_pack, settings)
        laps.lap("load face pack (onnxruntime)")
        PromptEncoder(weights.sdxl, settings)
        laps.lap("load text encoders")
        IdentityDenoiser.from_weights(weights, settings)
        laps.lap("load UNet + IdentityNet + adapter + VAE")
        laps.parts["weights load, total"] = laps.total()
        if run >= warmup:
            for name, seconds in laps.parts.items():
                times.setdefault(name, []).append(seconds)
    return {name: summary(values) for name, values in times.items()}


def bench_size(pipeline, size: int, steps: int, warmup: int, repeats: int, out_dir: Path) -> dict:
    """One request at `size` x `size`, stage by stage, then the denoiser's own call as a check."""
    from instantid_core.conditioning import RequestPhotos, face_condition
    from instantid_core.pipeline import denoise_request
    from instantid_core.storage import OutputStore, encode_image

    params = GenerateParams(prompt=PROMPT, negative_prompt=NEGATIVE, style=Style.none, seed=SEED, steps=steps,
                            width=size, height=size)
    photo_bytes = FACE_PHOTO.read_bytes()
    store = OutputStore(str(out_dir))
    denoiser, settings = pipeline.denoiser, pipeline.settings
    times: dict[str, list[float]] = {}
    staged_image = called_image = None
    for run in range(warmup + repeats):
        laps = Laps()
        face = face_condition(pipeline.face, RequestPhotos([photo_bytes]), params, settings)
        laps.lap("face: decode + analyze + keypoint image")
        prompt = pipeline.text.encode(params.prompt, params.negative_prompt, params.style)
        laps.lap("prompt encoding")
        request, key = denoise_request(face, prompt, params, SEED, settings.default_scheduler)
        with torch.inference_mode():  # IdentityDenoiser._run, stage by stage
            denoiser.check_inputs([request], key)
            samples = denoiser.expand_samples([request])
            cond = denoiser.prepare_conditioning([request], samples, key)
            laps.lap("denoiser: conditioning (Resampler, kps image)")
            scheduler = denoiser.make_scheduler(key.scheduler)
            scheduler.set_timesteps(key.steps, device=denoiser.device)
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in samples.seeds]
            latents = denoiser.prepare_latents(generators, key, scheduler)
            laps.lap("denoiser: scheduler + initial noise")
            latents = denoiser.denoise(latents, cond, scheduler, generators)
            laps.lap("denoiser: denoising loop")
            images = denoiser.decode(latents)
            laps.lap("denoiser: VAE decode + uint8")
        store.write_request(f"bench{size}r{run}", [encode_image(image, "png") for image in images], "png",
                            {"bench": "core"})
        laps.lap("encode PNG + write image and sidecar")
        parts = dict(laps.parts)
        parts["request total (all of the above)"] = laps.total()
        parts["denoiser: one step (loop / steps)"] = parts["denoiser: denoising loop"] / steps
        start = time.perf_counter()
        called = denoiser([request], key)[0]
        parts["check: IdentityDenoiser.__call__ (whole)"] = time.perf_counter() - start
        if run >= warmup:
            for name, seconds in parts.items():
                times.setdefault(name, []).append(seconds)
        staged_image, called_image = images, called
    if not np.array_equal(staged_image, called_image):
        raise AssertionError("the staged run's image differs from IdentityDenoiser.__call__'s: the benchmark no "
                             "longer follows the product's path (update bench_size to match IdentityDenoiser._run)")
    return {"size": size, "steps": steps, "stages": {name: summary(values) for name, values in times.items()}}


def run(args: argparse.Namespace) -> dict:
    from instantid_core.pipeline import InstantIDPipeline
    from instantid_core.tiny import ensure_tiny_preset
    from instantid_core.weights import resolve_weights

    root = Path(args.weights)
    if not root.exists():
        print(f"{root} missing: writing the tiny preset there", file=sys.stderr)
        ensure_tiny_preset(root)
    settings = PipelineSettings()
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    report = {"schema": "instantid-bench-core/1", "started": started.isoformat(timespec="seconds"),
              "machine": machine(), "weights": str(root), "warmup": args.warmup, "repeats": args.repeats,
              "load_repeats": args.load_repeats, "guidance": GenerateParams.model_fields["guidance"].default,
              "scheduler": settings.default_scheduler.value}
    print(f"weights load: {args.load_repeats} timed runs after 1 warm-up", file=sys.stderr)
    report["load"] = bench_load(root, settings, warmup=1, repeats=args.load_repeats)
    pipeline = InstantIDPipeline(ModelSources.from_root(str(root)), settings,
                                 weights=resolve_weights(ModelSources.from_root(str(root))))
    report["sizes"] = []
    with tempfile.TemporaryDirectory(prefix="bench-core-") as out_dir:
        for size in args.sizes:
            print(f"{size}x{size}, {args.steps} steps: {args.repeats} timed runs after {args.warmup} warm-up",
                  file=sys.stderr)
            report["sizes"].append(bench_size(pipeline, size, args.steps, args.warmup, args.repeats, Path(out_dir)))
    report["load_average"] = {"start": load_before, "end": os.getloadavg()}
    report["wall_s"] = (datetime.now(timezone.utc) - started).total_seconds()
    return report


def ms(value: float) -> str:
    return f"{value * 1000:.1f}" if value < 10 else f"{value * 1000:.0f}"


def to_markdown(report: dict, raw: Path | None) -> str:
    m = report["machine"]
    start_load = ", ".join(f"{x:.1f}" for x in report["load_average"]["start"])
    end_load = ", ".join(f"{x:.1f}" for x in report["load_average"]["end"])
    lines = [
        f"### {report['started']}, {m['cpu']} ({m['logical_cores']} logical cores)", "",
        f"- torch {m['torch']} ({m['torch_threads']} threads), diffusers {m['diffusers']}, onnxruntime "
        f"{m['onnxruntime']}, python {m['python']}",
        f"- `python bench/core.py --weights {report['weights']}`: median of {report['repeats']} timed runs after "
        f"{report['warmup']} warm-up (weights load: {report['load_repeats']} after 1), guidance "
        f"{report['guidance']}, {report['scheduler']} scheduler, one image per request, float32",
        f"- load average (1, 5, 15 min) at start: {start_load}; at end: {end_load}. The machine is shared: "
        "with a load above its core count every figure is inflated by other processes; min shows the best case.",
        "", "Weights load (`InstantIDPipeline.__init__`, part by part):", "",
        "| part | median ms | min ms | max ms |", "|---|---:|---:|---:|",
    ]
    for name, s in report["load"].items():
        lines.append(f"| {name} | {ms(s['median_s'])} | {ms(s['min_s'])} | {ms(s['max_s'])} |")
    sizes = report["sizes"]
    header = " | ".join(f"{r['size']}x{r['size']} median ms (min-max)" for r in sizes)
    lines += ["", f"One request, {sizes[0]['steps']} steps:", "", f"| stage | {header} |",
              "|---|" + "---:|" * len(sizes)]
    for name in sizes[0]["stages"]:
        cells = [f"{ms(r['stages'][name]['median_s'])} ({ms(r['stages'][name]['min_s'])}-"
                 f"{ms(r['stages'][name]['max_s'])})" for r in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "The check row runs the denoiser's own `__call__` on the same request; its image equals the staged "
              "run's exactly (asserted)."]
    if raw is not None:
        lines += ["", f"Raw JSON: `{raw.relative_to(REPO) if raw.is_relative_to(REPO) else raw}`"]
    return "\n".join(lines) + "\n"


def write_results(text: str) -> None:
    """Replace this benchmark's section of RESULTS.md (created at the end when missing); other sections untouched."""
    current = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    body = f"{SECTION}\n\nPer-stage times of `instantid_core` on the tiny preset (`bench/core.py`; what each row " \
           "covers is in its docstring). Tiny random models on a CPU: these show where a request's time goes " \
           "and catch regressions in the glue; they say nothing about SDXL on a GPU (see the GPU section).\n\n" + text
    if SECTION in current:
        start = current.index(SECTION)
        end = current.find("\n## ", start + len(SECTION))
        rest = "" if end < 0 else current[end:]
        current = current[:start] + body + rest
    else:
        current = current.rstrip("\n") + "\n\n" + body
    RESULTS_MD.write_text(current)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(REPO / ".cache" / "tiny"),
                        help="a tiny-preset folder (written there when missing)")
    parser.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[256, 512],
                        help="square output sizes, comma-separated (default 256,512)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (default 8, as `make demo-cli`)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--load-repeats", type=int, default=3)
    parser.add_argument("--write-results", action="store_true",
                        help=f"replace the '{SECTION[3:]}' section of bench/RESULTS.md, raw JSON to bench/results/")
    args = parser.parse_args(argv)

    report = run(args)
    raw = None
    if args.write_results:
        RESULTS_DIR.mkdir(exist_ok=True)
        raw = RESULTS_DIR / f"core-tiny-cpu-{report['started'].replace(':', '').replace('-', '')[:15]}.json"
        raw.write_text(json.dumps(report, indent=2) + "\n")
    text = to_markdown(report, raw)
    print(text)
    if args.write_results:
        write_results(text)
        print(f"wrote {RESULTS_MD.relative_to(REPO)} and {raw.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
