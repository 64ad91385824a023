"""Batch fill of the Denoiser for a mixed-size workload (issue 11), before and after the default size buckets.

    python bench/batching.py                  # 16 requests, 1 step, windows of 8; prints the table
    python bench/batching.py --write-results  # the same, then replaces its section of bench/RESULTS.md

The workload: requests without a size whose face photos have the sizes callers send (camera and phone frames, crops
near their aspect ratio: the bundled astronaut photo padded to the aspect ratio of 4032x3024, 1080x1080, 1600x1190,
...). Each photo goes through the product's own face stage (`face_condition`), so its output size is what the
service would pick: the reference's exact rule ("before", `size_buckets: false`: nearly every photo its own size)
or the nearest SDXL bucket ("after", the default). Requests then reach the denoiser as `@serve.batch` hands them
over when they arrive together: windows of `--max-batch-size` requests in arrival order, each window split by batch
key (size, steps, scheduler), one `IdentityDenoiser` call per key, as `deployments/denoiser.py` does.

Batch fill = requests per forward call (the most is --max-batch-size). images/s = images / seconds in the
denoiser calls. Tiny random models on this CPU: a CPU gains little from batching (it is busy either way), so
images/s moves little here; the fill is what a GPU turns into throughput. No GPU figure is claimed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from instantid_core.config import GenerateParams, ModelSources, PipelineSettings

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
RESULTS_DIR = BENCH_DIR / "results"
SECTION = "## Batching of mixed sizes (issue 11)"
FACE_PHOTO = REPO / "instantid_core" / "data" / "astronaut.jpg"
# Photo sizes as callers send them, in arrival order: camera and phone frames, and crops near their ratio.
PHOTO_SIZES = [(4032, 3024), (1080, 1080), (3024, 4032), (1600, 1190), (1000, 1050), (1190, 1600), (1024, 768),
               (1200, 1140), (768, 1024), (2000, 1480), (1100, 1080), (1480, 2000), (1920, 1440), (900, 880),
               (1440, 1920), (1300, 960)]


def padded(photo: Image.Image, ratio: tuple[int, int]) -> bytes:
    """The photo on a black canvas of the given aspect ratio (the face unchanged, so the detector finds it)."""
    w, h = photo.size
    rw, rh = ratio
    width, height = (max(w, round(h * rw / rh)), max(h, round(w * rh / rw)))
    canvas = Image.new("RGB", (width, height))
    canvas.paste(photo, ((width - w) // 2, (height - h) // 2))
    out = io.BytesIO()
    canvas.save(out, "PNG")
    return out.getvalue()


def run_mode(buckets: bool, photos: list[bytes], args: argparse.Namespace, parts: dict) -> dict:
    from instantid_core.conditioning import RequestPhotos, face_condition
    from instantid_core.face import FaceAnalyzer
    from instantid_core.pipeline import denoise_request

    settings = PipelineSettings(size_buckets=buckets)
    analyzer = FaceAnalyzer(parts["weights"].face_pack, settings)
    params = GenerateParams(prompt="a portrait", steps=args.steps)
    queued = []
    for i, photo in enumerate(photos):
        condition = face_condition(analyzer, RequestPhotos([photo]), params, settings)
        queued.append(denoise_request(condition, parts["prompt"], params, 1000 + i, settings.default_scheduler))
    calls, seconds, images = [], 0.0, 0
    for start in range(0, len(queued), args.max_batch_size):
        groups = defaultdict(list)
        for request, key in queued[start:start + args.max_batch_size]:
            groups[key].append(request)
        for key, requests in groups.items():
            started = time.perf_counter()
            outputs = parts["denoiser"](requests, key)
            seconds += time.perf_counter() - started
            images += sum(len(output) for output in outputs)
            calls.append({"size": f"{key.width}x{key.height}", "requests": len(requests)})
    sizes = sorted({f"{key.width}x{key.height}" for _, key in queued})
    return {"mode": "buckets" if buckets else "reference", "requests": len(queued), "distinct_sizes": len(sizes),
            "sizes": sizes, "forward_calls": len(calls), "batch_fill": round(len(queued) / len(calls), 2),
            "images": images, "denoise_s": round(seconds, 2), "images_per_s": round(images / seconds, 3),
            "calls": calls}


def run(args: argparse.Namespace) -> dict:
    from instantid_core.denoise import IdentityDenoiser
    from instantid_core.text import PromptEncoder
    from instantid_core.tiny import ensure_tiny_preset
    from instantid_core.weights import resolve_weights

    torch_threads = os.environ.get("OMP_NUM_THREADS")
    weights = resolve_weights(ModelSources.from_root(str(ensure_tiny_preset(Path(args.weights)))))
    settings = PipelineSettings()
    parts = {"weights": weights, "denoiser": IdentityDenoiser.from_weights(weights, settings),
             "prompt": PromptEncoder(weights.sdxl, settings).encode("a portrait")}
    photo = Image.open(FACE_PHOTO).convert("RGB")
    photos = [padded(photo, PHOTO_SIZES[i % len(PHOTO_SIZES)]) for i in range(args.requests)]
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    modes = [run_mode(False, photos, args, parts), run_mode(True, photos, args, parts)]
    return {"schema": "instantid-bench-batching/1", "started": started, "steps": args.steps,
            "max_batch_size": args.max_batch_size,
            "photo_sizes": [f"{w}x{h}" for w, h in (PHOTO_SIZES * 2)[:args.requests]],
            "machine": {"cpu": platform.processor() or platform.machine(), "logical_cores": os.cpu_count(),
                        "omp_num_threads": torch_threads}, "modes": modes}


def to_markdown(report: dict, raw: Path | None) -> str:
    m = report["machine"]
    lines = [f"### {report['started']}, {m['cpu']} ({m['logical_cores']} logical cores)", "",
             f"{len(report['photo_sizes'])} requests without a size, face photos (padded to) "
             f"{', '.join(report['photo_sizes'])}; {report['steps']} step(s); windows of {report['max_batch_size']} "
             "requests split by batch key, as the Denoiser deployment runs them.", "",
             "| default output size | distinct sizes | forward calls | batch fill (requests/call) | images/s |",
             "|---|---|---|---|---|"]
    for mode in report["modes"]:
        name = "reference rule (before)" if mode["mode"] == "reference" else "SDXL buckets (after)"
        lines.append(f"| {name} | {mode['distinct_sizes']} | {mode['forward_calls']} | {mode['batch_fill']} | "
                     f"{mode['images_per_s']} |")
    lines += ["", "Sizes: " + "; ".join(f"{mode['mode']}: {', '.join(mode['sizes'])}" for mode in report["modes"])]
    if raw is not None:
        lines += ["", f"Raw: `{raw.relative_to(REPO)}`"]
    return "\n".join(lines) + "\n"


def write_results(text: str) -> None:
    """Replace this benchmark's section of RESULTS.md (appended when missing); other sections untouched."""
    current = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    body = (f"{SECTION}\n\n`bench/batching.py` (tiny preset, CPU; what runs is in its docstring). Batch fill is "
            "what default sizes change. images/s is from this shared 2-core machine, measured while other "
            "work ran on it: a rough figure, not a GPU's.\n\n" + text)
    if SECTION in current:
        start = current.index(SECTION)
        end = current.find("\n## ", start + len(SECTION))
        current = current[:start] + body + ("" if end < 0 else current[end:])
    else:
        current = current.rstrip("\n") + "\n\n" + body
    RESULTS_MD.write_text(current)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(REPO / ".cache" / "tiny"), help="a tiny-preset folder")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=8, help="as the tests' served app (config: 4)")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    report = run(args)
    raw = None
    if args.write_results:
        RESULTS_DIR.mkdir(exist_ok=True)
        raw = RESULTS_DIR / f"batching-{report['started'].replace(':', '').replace('-', '')[:15]}.json"
        raw.write_text(json.dumps(report, indent=2) + "\n")
    text = to_markdown(report, raw)
    print(text)
    if args.write_results:
        write_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
