"""Cost of the extensions (issue 14) on the tiny preset, on the CPU: per-step cost of each extra ControlNet next to
IdentityNet alone, and a LoRA's first-use load against a cached one.

    python bench/extensions.py --weights .cache/tiny                   # print the tables
    python bench/extensions.py --weights .cache/tiny --write-results   # and replace the section in bench/RESULTS.md

What is timed, through the product's own code (`IdentityDenoiser.__call__`, `LoraLibrary.load`):
- per denoising step: one request at --size, timed at --steps-low and --steps-high steps; the difference divided
  by the step difference is the cost of one step (conditioning and VAE decode cancel out). Configurations:
  IdentityNet alone, + canny, + depth, + pose, + all three, + the tiny-style LoRA (cached).
- control map preparation per request (`ExtraControlNets.prepare`: OpenCV Canny, the depth-estimation pipeline).
- LoRA load: `LoraLibrary.load` of a name not yet loaded (read + key conversion + peft injection), and of a name
  already loaded (the LRU hit every later request of that set pays).

Figures are CPU milliseconds of this process on one torch thread (the least of --repeats runs after a
warm-up), not wall time: the machine is shared, and CPU time is what a step costs. The tiny preset's ControlNets
are `from_unet` copies of the tiny UNet's encoder, as the published SDXL ControlNets are of SDXL's: the ratio to
IdentityNet is the figure that carries over, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from instantid_core.conditioning import RequestPhotos, face_condition
from instantid_core.config import ControlParams, GenerateParams, ModelSources, PipelineSettings
from instantid_core.pipeline import InstantIDPipeline, denoise_request
from instantid_core.tiny import ensure_tiny_preset

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
RESULTS_DIR = BENCH_DIR / "results"
SECTION = "## Extensions: extra ControlNets and LoRAs (issue 14, tiny preset, CPU)"
FACE_PHOTO = REPO / "instantid_core" / "data" / "astronaut.jpg"


def median_time(fn, repeats: int) -> float:
    """The least CPU time of `repeats` runs after a warm-up, on one torch thread: this process's own CPU seconds
    (`time.process_time`), so other processes on a shared 2-core machine do not count as our cost the way they do
    in wall time."""
    fn()  # warm-up
    laps = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        laps.append(time.process_time() - start)
    return min(laps)


def run(weights: Path, size: int, steps_low: int, steps_high: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    root = ensure_tiny_preset(weights)
    sources = ModelSources.from_root(str(root)).model_copy(
        update={"controlnets": {kind: str(root / "controlnets" / kind) for kind in ("canny", "depth", "pose")}})
    pipe = InstantIDPipeline(sources, PipelineSettings())
    face_bytes = FACE_PHOTO.read_bytes()
    base = GenerateParams(prompt="a portrait", width=size, height=size, steps=steps_low)
    face = face_condition(pipe.face, RequestPhotos([face_bytes]), base, pipe.settings)
    prompt = pipe.text.encode(base.prompt, base.negative_prompt, base.style)
    denoiser = pipe.denoiser
    pose_map = face.kps_image  # a supplied pose map: the keypoint drawing stands in for an OpenPose image

    def controls_for(kinds: list[str]) -> tuple:
        params = [ControlParams(type=kind, strength=0.5) for kind in kinds]
        images = [_png(pose_map) if kind == "pose" else None for kind in kinds]
        return denoiser.controls.prepare(params, images, face_bytes, (size, size))

    configs = {"IdentityNet alone": ([], []), "+ canny": (["canny"], []), "+ depth": (["depth"], []),
               "+ pose": (["pose"], []), "+ canny + depth + pose": (["canny", "depth", "pose"], []),
               "+ tiny-style LoRA (cached)": ([], [{"name": "tiny-style", "scale": 0.8}])}
    rows = {}
    for label, (kinds, loras) in configs.items():
        controls = controls_for(kinds)
        times = {}
        for steps in (steps_low, steps_high):
            params = base.model_copy(update={"steps": steps, "loras": GenerateParams(prompt="x", loras=loras).loras})
            request, key = denoise_request(face, prompt, params, 7, pipe.settings.default_scheduler, controls)
            times[steps] = median_time(lambda request=request, key=key: denoiser([request], key), repeats)
        per_step = (times[steps_high] - times[steps_low]) / (steps_high - steps_low)
        prepare = median_time(lambda kinds=kinds: controls_for(kinds), repeats) if kinds else 0.0
        rows[label] = {"per_step_ms": per_step * 1000, "prepare_ms": prepare * 1000}
    alone = rows["IdentityNet alone"]["per_step_ms"]
    for row in rows.values():
        row["vs_identitynet_alone"] = row["per_step_ms"] / alone

    library = denoiser.loras
    lora = {"first_use_ms": _first_use(library, "tiny-style", repeats) * 1000,
            "kohya_first_use_ms": _first_use(library, "tiny-style-kohya", repeats) * 1000}
    lora["cached_ms"] = median_time(lambda: library.load(["tiny-style"]), repeats) * 1000
    return {"when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": f"{platform.machine()}, {_cores()} cores", "size": size,
            "steps": [steps_low, steps_high], "repeats": repeats, "per_step": rows, "lora": lora,
            "load_average": round(__import__("os").getloadavg()[0], 1)}


def _first_use(library, name: str, repeats: int) -> float:
    """Median time of loading `name` when it is not loaded (evicted before each run, as the LRU would)."""
    laps = []
    for _ in range(repeats):
        if name in library.loaded:
            library.unet.delete_adapters([library._loaded.pop(name)])
        start = time.perf_counter()
        library.load([name])
        laps.append(time.perf_counter() - start)
    return statistics.median(laps)


def _png(image) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def markdown(result: dict) -> str:
    lines = [SECTION, "", f"### {result['when']}, CPU ({result['machine']}), {result['size']}x{result['size']}, "
             f"steps {result['steps'][0]} vs {result['steps'][1]}, CPU time on 1 thread, least of "
             f"{result['repeats']}, load average {result.get('load_average', '?')} (other processes)", "",
             "`python bench/extensions.py --weights .cache/tiny --write-results`", "",
             "| configuration | CPU ms / step | vs IdentityNet alone | map preparation CPU ms / request |",
             "|---|---:|---:|---:|"]
    for label, row in result["per_step"].items():
        lines.append(f"| {label} | {row['per_step_ms']:.1f} | {row['vs_identitynet_alone']:.2f}x | "
                     f"{row['prepare_ms']:.1f} |")
    lora = result["lora"]
    lines += ["", "| LoRA load (tiny-style, 64 tensors) | CPU ms |", "|---|---:|",
              f"| first use, diffusers keys | {lora['first_use_ms']:.1f} |",
              f"| first use, kohya keys (converted) | {lora['kohya_first_use_ms']:.1f} |",
              f"| cached (LRU hit) | {lora['cached_ms']:.3f} |", "",
              "An SDXL ControlNet has IdentityNet's architecture: by the FLOP count in this file each adds about "
              "0.3x of a guided step on SDXL (counted, not measured on a GPU here).", ""]
    return "\n".join(lines)


def write_section(text: str) -> None:
    current = RESULTS_MD.read_text()
    if SECTION in current:
        start = current.index(SECTION)
        rest = current[start + len(SECTION):]
        end = rest.find("\n## ")
        current = current[:start] + text + (rest[end + 1:] if end >= 0 else "")
    else:
        current = current.rstrip("\n") + "\n\n" + text
    RESULTS_MD.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=REPO / ".cache" / "tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps-low", type=int, default=2)
    parser.add_argument("--steps-high", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    result = run(args.weights, args.size, args.steps_low, args.steps_high, args.repeats)
    text = markdown(result)
    print(text)
    if args.write_results:
        RESULTS_DIR.mkdir(exist_ok=True)
        stamp = result["when"].replace("-", "").replace(":", "")
        (RESULTS_DIR / f"extensions-{stamp}.json").write_text(json.dumps(result, indent=2))
        write_section(text)


if __name__ == "__main__":
    main()
