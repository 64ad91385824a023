"""GPU denoiser benchmark (issue 4): the product's IdentityDenoiser, baseline vs each speed switch, on one device.

    python -m bench.gpu --device cuda --write-results        # the H100 run: SDXL 1024x1024, 30 steps, batch 1/2/4
    python -m bench.gpu --device cuda --quick                # smoke run: 512x512, 2 steps, batch 1/2, 2 repeats
    python -m bench.gpu --tiny --device cpu --quick          # harness check on the tiny preset (tests), seconds
    python -m bench.gpu --flops-only                         # FLOPs of the published architecture, meta tensors

One lease of a lent GPU (about 15 minutes) runs `bench/gpu_lease.sh` instead: the configurations that matter, in
priority order under a time budget, each row brought back as it ends (bench/gpu_lease.py).

What runs: `instantid_core.denoise.IdentityDenoiser.__call__` end to end (Resampler, IdentityNet + UNet with the
decoupled face attention, classifier-free guidance, Euler scheduler, VAE decode, uint8 conversion), with every
option switched through `instantid_core.accel.AccelSettings`, the same switches a replica uses. Models: full-size
SDXL base 1.0 + InstantID architectures from the published configs (`bench/sdxl_configs.py`) with random weights,
written once in the published on-disk layout and loaded through the product loaders (no downloads); `--weights DIR`
loads real weights laid out as `ModelSources.from_root(DIR)` expects; `--tiny` uses the tiny preset.

Baseline: fp16, eager, PyTorch's default attention, IdentityNet and UNet called as separate modules each step (the
community pipeline's way). Each option is then measured alone, and combined ("ours_*"). Per configuration and batch:
s/image, it/s (denoising steps per second, loop only), images/s, peak memory, first-call (compile/warm-up) time,
MFU = FLOPs per image (torch's FlopCounterMode over real calls of the eager model) x images/s / the bf16 matmul
rate measured in the same run (8192^3 on CUDA). Timings: CUDA events after warm-up, median of --repeats (>= 5 by
default); on CPU, perf_counter. Outputs are compared with the baseline's from the same seeds (max abs diff in
uint8 levels, PSNR); a configuration below --psnr-min is marked and never chosen. Cold start (process start to
first image, empty vs warm compile cache) runs the product's own constructor + warm-up in a fresh subprocess.

Not offered: running IdentityNet on the conditional half of the CFG batch only. InstantID adds IdentityNet's
residuals to both halves; skipping the unconditional half is cheaper but changes the image.

Which settings a GPU replica should turn on is decided by this benchmark on a GPU, and that run has not happened
yet (no GPU was lent to issue 4): `PipelineSettings` keeps every switch off (CPU-safe). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
SECTION = "## GPU denoiser (issue 4)"
SCHEMA = "instantid-bench-gpu/1"
PROMPT = ("a portrait photo of a person in a neon-lit street, cinematic light, film grain", "blurry, lowres, watermark")
GUIDANCE = 5.0
SEED = 1234
GIB = 2**30

# Targets from issue 4, evaluated only on a CUDA device with full-size models.
TARGET_S_PER_IMAGE = 1.2
TARGET_SPEEDUP = 2.0
TARGET_BATCH4_GAIN = 1.2
TARGET_COLD_START_WARM_S = 60.0


@dataclass(frozen=True)
class BenchConfig:
    """One row group of the table: a dtype and the accel switches on top of the baseline."""

    name: str
    dtype: str = "float16"
    accel: dict = field(default_factory=dict)
    needs_cuda: bool = False
    candidate: bool = True  # may be chosen as the winner (the fp32 reference may not)
    note: str = ""


OURS = dict(channels_last=True, fuse_qkv=True, cudnn_benchmark=True, compile=True, compile_mode="max-autotune",
            compile_vae=True)
REGIONAL = dict(compile_regional=True, inductor_tuning=True, compile_mode="default")
CONFIGS = [
    BenchConfig("baseline", note="fp16, eager, default SDPA, separate IdentityNet/UNet modules"),
    BenchConfig("fp32_reference", "float32", candidate=False, note="reference for the output check only"),
    BenchConfig("bf16", "bfloat16"),
    BenchConfig("channels_last", accel=dict(channels_last=True)),
    BenchConfig("fused_qkv", accel=dict(fuse_qkv=True)),
    BenchConfig("sdpa_flash", accel=dict(sdpa_backend="flash"), needs_cuda=True),
    BenchConfig("sdpa_cudnn", accel=dict(sdpa_backend="cudnn"), needs_cuda=True),
    BenchConfig("sdpa_efficient", accel=dict(sdpa_backend="efficient"), needs_cuda=True),
    BenchConfig("cudnn_benchmark", accel=dict(cudnn_benchmark=True), needs_cuda=True),
    BenchConfig("compile_default", accel=dict(compile=True, compile_mode="default")),
    BenchConfig("compile_autotune", accel=dict(compile=True, compile_mode="max-autotune-no-cudagraphs")),
    BenchConfig("compile_cudagraphs", accel=dict(compile=True, compile_mode="reduce-overhead"), needs_cuda=True),
    BenchConfig("compile_autotune_cudagraphs", accel=dict(compile=True, compile_mode="max-autotune"),
                needs_cuda=True),
    BenchConfig("compile_vae", accel=dict(compile_vae=True, compile_mode="max-autotune-no-cudagraphs")),
    BenchConfig("ours_fp16", "float16", accel=OURS, note="channels_last + fused QKV + compile (CUDA graphs) + VAE"),
    BenchConfig("ours_bf16", "bfloat16", accel=OURS, note="as ours_fp16, in bf16"),
    # Issue 22: regional compile (each transformer block, diffusion-fast's inductor settings) and FP8 Linear layers.
    BenchConfig("compile_regional", accel=REGIONAL, note="torch.compile of each transformer block + diffusion-fast "
                "inductor settings"),
    BenchConfig("fp8_regional", accel=REGIONAL | dict(fp8=True), note="FP8 Linear layers (torch._scaled_mm) in "
                "UNet + IdentityNet transformer blocks, regional compile"),
    BenchConfig("fp8_eager", accel=dict(fp8=True), note="FP8 Linear layers, eager (quantisation unfused)"),
    BenchConfig("regional_cudagraphs", accel=REGIONAL | dict(compile_mode="reduce-overhead"), needs_cuda=True,
                note="regional compile with CUDA graphs"),
]
CONFIG_NAMES = [config.name for config in CONFIGS]


# --- plan: what one run measures -------------------------------------------------------------------------------
@dataclass
class Plan:
    device: str
    models: str  # "tiny" | "sdxl-random" | "weights:<dir>"
    root: str  # folder laid out as ModelSources.from_root expects
    width: int
    height: int
    steps: int
    batches: list[int]
    repeats: int
    warm_calls: int
    compile_backend: str
    psnr_min: float
    workdir: str
    prompt_file: str
    fp8_backend: str = "auto"  # off CUDA (default_fp8_backend) the FP8 rows check numerics and plumbing, not speed
    check_steps: int = 0  # > 0: the output check of `run_config` (batch 1, this many steps, vs the baseline)
    check_factor: float = 16.0  # allowed latent difference: this x the unit roundoff of the lower precision
    rows_file: str | None = None  # JSON lines file each finished row is appended to (bench/lease_rows.py)
    row_tags: dict = field(default_factory=dict)  # fields every appended row carries (run, device, versions)


def build_plan(args: argparse.Namespace, workdir: Path) -> Plan:
    device = args.device
    if args.tiny:
        from instantid_core.tiny import ensure_tiny_preset

        root, models = ensure_tiny_preset(Path(args.models_dir or REPO / ".cache" / "tiny")), "tiny"
        size, steps = (64 if args.quick else 128), 2
    elif args.weights:
        root, models = Path(args.weights), f"weights:{args.weights}"
        size, steps = (512 if args.quick else 1024), (2 if args.quick else 30)
    else:
        name = "sdxl-shrunk" if args.shrunk else "sdxl-random"
        root = write_random_sdxl(Path(args.models_dir or REPO / ".cache" / f"bench-{name}"), device, args.shrunk)
        models = name
        size, steps = (512 if args.quick else 1024), (2 if args.quick else 30)
        if args.shrunk:
            size = 64 if args.quick else 128
    # On a CPU, inductor spends minutes compiling C++ for each shape: trace with dynamo only unless asked.
    backend = args.compile_backend or ("inductor" if is_cuda(device) else "eager")
    return Plan(
        device=device, models=models, root=str(root), width=args.size or size, height=args.size or size,
        steps=args.steps or steps, batches=args.batches or ([1, 2] if args.quick else [1, 2, 4]),
        repeats=args.repeats or (2 if args.quick else 5), warm_calls=1 if args.quick else 2, compile_backend=backend,
        psnr_min=args.psnr_min, workdir=str(workdir), prompt_file=str(workdir / "prompt.npz"),
        fp8_backend=getattr(args, "fp8_backend", None) or default_fp8_backend(device),
    )


def default_fp8_backend(device: str) -> str:
    """"auto" on CUDA (the FP8 kernel, or FP8Unavailable); elsewhere the same `torch._scaled_mm` where this torch
    build has it on the CPU, else the emulated backend (same rounding, no kernel)."""
    if is_cuda(device):
        return "auto"
    from instantid_core.fp8 import FP8Unavailable, resolve_backend

    try:
        return resolve_backend(torch.device(device), "scaled_mm")
    except FP8Unavailable:
        return "emulated"


def published_configs():
    """bench/sdxl_configs.py, whether this file runs as `python -m bench.gpu` or as `python bench/gpu.py`."""
    try:
        from bench import sdxl_configs
    except ImportError:  # run as a script: bench/ itself is on sys.path, its parent is not
        import sdxl_configs
    return sdxl_configs


def model_paths(root: str) -> tuple[Path, Path, Path]:
    from instantid_core.config import ModelSources

    sources = ModelSources.from_root(root)
    return Path(sources.sdxl), Path(sources.identitynet), Path(sources.adapter)


# --- full-size random weights in the published layout ----------------------------------------------------------
def write_random_sdxl(root: Path, device: str, shrunk: bool = False, seed: int = 0) -> Path:
    """SDXL base 1.0 + InstantID architectures with random fp16 weights, in the published layout (once).

    `shrunk`: the same depths at tiny widths (`sdxl_configs.SHRUNK`), to check this writer on a CPU."""
    if (root / ".complete").exists():
        return root
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from instantid_core.tiny.models import write_tiny_tokenizer

    published = published_configs()
    arch = published.SHRUNK if shrunk else published.PUBLISHED
    print(f"writing {'shrunk' if shrunk else 'full-size'} random models to {root} (once) ...", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(seed)
    with torch.device(device):  # initialising 4.7B parameters is minutes on a CPU, seconds on a GPU
        unet, vae = published.build_unet(arch), published.build_vae(arch)
        text_encoder, text_encoder_2 = published.build_text_encoders(arch)
        identitynet = published.build_identitynet(unet)
        # from_unet zero-initialises IdentityNet's output convs (a no-op network); a trained one is not.
        with torch.no_grad():
            for conv in [*identitynet.controlnet_down_blocks, identitynet.controlnet_mid_block,
                         identitynet.controlnet_cond_embedding.conv_out]:
                conv.weight.normal_(0.0, 0.5 / conv.weight[0].numel() ** 0.5)
    generator = torch.Generator(device).manual_seed(seed + 1)
    adapter = {"image_proj": published.resampler_state_dict(generator, device, arch),
               "ip_adapter": published.ip_adapter_state_dict(unet, generator, device)}
    tokenizer = write_tiny_tokenizer(root / "sdxl" / "tokenizer", pad_token="<|endoftext|>")
    tokenizer_2 = write_tiny_tokenizer(root / "sdxl" / "tokenizer_2", pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**published.SCHEDULER),
        force_zeros_for_empty_prompt=True,
    ).to(torch.float16)
    pipe.save_pretrained(root / "sdxl")
    identitynet.to(torch.float16).save_pretrained(root / "InstantID" / "ControlNetModel")
    adapter = {part: {k: v.to("cpu", torch.float16) for k, v in state.items()} for part, state in adapter.items()}
    torch.save(adapter, root / "InstantID" / "ip-adapter.bin")
    (root / ".complete").touch()
    del pipe, unet, vae, text_encoder, text_encoder_2, identitynet
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return root


# --- measurement helpers -----------------------------------------------------------------------------------------
def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def synchronize(device: str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


class Clock:
    """Elapsed seconds of a region: CUDA events on a CUDA device, perf_counter otherwise."""

    def __init__(self, device: str) -> None:
        self.cuda = is_cuda(device)
        self.spans: dict[str, tuple] = {}

    @contextmanager
    def span(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans[name] = (start, end)
        else:
            started = time.perf_counter()
            yield
            self.spans[name] = (started, time.perf_counter())

    def seconds(self, name: str) -> float:
        start, end = self.spans[name]
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start


def timed_denoiser_class():
    """IdentityDenoiser that also times its denoising loop and its VAE decode (measurement only)."""
    from instantid_core.accel import apply_model_switches
    from instantid_core.denoise import IdentityDenoiser
    from instantid_core.fp8 import Float8Linear

    class TimedDenoiser(IdentityDenoiser):
        clock = Clock("cpu")  # replaced per run; this one serves calls made inside the constructor (warm-up)
        finite = True
        last_latents: torch.Tensor | None = None

        def apply_accel(self) -> None:
            super().apply_accel()
            # FP8 and regional compile; a no-op where the product's apply_accel already made this call, so the
            # row's counts are read off the models.
            apply_model_switches(self.unet, self.identitynet, self.accel, self.device)
            modules = [m for model in (self.unet, self.identitynet) for m in model.modules()]
            self.switches = dict(fp8_linears=sum(isinstance(m, Float8Linear) for m in modules),
                                 compiled_blocks=sum(getattr(m, "_compiled_call_impl", None) is not None
                                                     for m in modules))

        def denoise(self, latents, cond, scheduler, generators, *args, **kwargs):
            with self.clock.span("loop"):
                return super().denoise(latents, cond, scheduler, generators, *args, **kwargs)

        def decode(self, latents):
            self.finite = bool(torch.isfinite(latents).all())
            self.last_latents = latents.detach()  # the output check compares these (a view, copied only then)
            with self.clock.span("decode"):
                return super().decode(latents)

    return TimedDenoiser


def measure_matmul(device: str) -> dict:
    """bf16 dense matmul rate of this device, measured now: n^3 product, median of 10 after warm-up."""
    n = 8192 if is_cuda(device) else 512
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    clock, times = Clock(device), []
    for _ in range(10):
        with clock.span("mm"):
            a @ b
        times.append(clock.seconds("mm"))
    seconds = statistics.median(times)
    return dict(dtype="bfloat16", n=n, seconds_median=seconds, tflops=2 * n**3 / seconds / 1e12)


def make_requests(prompt, batch: int, width: int, height: int):
    """`batch` requests of one image each, with their own seeds, faces and keypoint images."""
    from instantid_core.denoise import DenoiseRequest

    rng = np.random.default_rng(SEED)
    requests = []
    for index in range(batch):
        kps = np.zeros((height, width, 3), np.uint8)
        for point, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]):
            x = int(width * (0.35 + 0.075 * point + 0.02 * index))
            y = int(height * (0.4 + 0.05 * (point % 3)))
            r = max(width // 100, 1)
            kps[max(y - r, 0):y + r, max(x - r, 0):x + r] = colour
        requests.append(DenoiseRequest(prompt=prompt, face_embedding=rng.standard_normal(512).astype(np.float32),
                                       kps_image=kps, seed=SEED + index, guidance=GUIDANCE))
    return requests


def load_prompt(path: str):
    from instantid_core.handoff import PromptEmbeds

    with np.load(path) as data:
        return PromptEmbeds(*(data[name] for name in ("prompt_embeds", "negative_prompt_embeds", "pooled",
                                                      "negative_pooled")))


def encode_prompt(plan: Plan) -> None:
    """Encode the benchmark prompt once, on the CPU in float32 (text encoding is another stage's cost)."""
    from instantid_core.config import PipelineSettings
    from instantid_core.text import PromptEncoder

    sdxl, _, _ = model_paths(plan.root)
    embeds = PromptEncoder(sdxl, PipelineSettings(device="cpu", dtype="float32")).encode(*PROMPT)
    np.savez(plan.prompt_file, **asdict(embeds))


def count_flops(denoiser, prompt, width: int, height: int) -> dict:
    """FLOPs per image from torch's FlopCounterMode over real eager calls (1 and 2 steps, batch 1): the difference
    is one guided step (IdentityNet + UNet on both CFG halves); the rest is Resampler + VAE decode."""
    from torch.utils.flop_counter import FlopCounterMode

    from instantid_core.config import Scheduler
    from instantid_core.denoise import BatchKey

    counts = []
    for steps in (1, 2):
        with FlopCounterMode(display=False) as counter:
            denoiser(make_requests(prompt, 1, width, height), BatchKey(width, height, steps, Scheduler.euler))
        counts.append(counter.get_total_flops())
    per_step = counts[1] - counts[0]
    return dict(per_step=per_step, fixed=counts[0] - per_step, method="FlopCounterMode, eager, batch 1, CFG on")


# --- one configuration ------------------------------------------------------------------------------------------
def compiles(accel: dict) -> bool:
    return bool(accel.get("compile") or accel.get("compile_vae") or accel.get("compile_regional"))


def run_config(config: BenchConfig, plan: Plan, count: bool, on_row: Callable[[dict], None] | None = None) -> dict:
    """Load the product denoiser with this configuration, time every batch size, save its images.

    `on_row` gets each row the moment its batch size is done (failed ones with the full traceback), so a process
    killed later keeps what it finished. With `plan.check_steps` the output check runs first (`output_check`)."""
    from instantid_core.accel import AccelSettings
    from instantid_core.config import PipelineSettings, Scheduler
    from instantid_core.denoise import BatchKey

    rows, images = [], {}
    result = dict(config=config.name, rows=rows, flops=None)
    if config.needs_cuda and not is_cuda(plan.device):
        for batch in plan.batches:
            rows.append(base_row(config, plan, batch) | dict(status="skipped", reason="needs a CUDA device"))
            if on_row:
                on_row(rows[-1])
        return result
    accel = dict(config.accel)
    if accel.get("fp8"):
        accel["fp8_backend"] = plan.fp8_backend
    if compiles(accel):
        accel.update(compile_backend=plan.compile_backend,
                     compile_cache_dir=str(Path(plan.workdir) / f"compile-cache-{config.name}"))  # empty: cold compile
    prompt = load_prompt(plan.prompt_file)
    key_for = lambda steps: BatchKey(plan.width, plan.height, steps, Scheduler.euler)  # noqa: E731
    cuda = is_cuda(plan.device)
    denoiser = None
    saved = dict(cudnn=torch.backends.cudnn.benchmark, cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sdxl, identitynet, adapter = model_paths(plan.root)
        started = time.perf_counter()
        denoiser = timed_denoiser_class()(sdxl, identitynet, adapter,
                                          PipelineSettings(device=plan.device, dtype=config.dtype),
                                          accel=AccelSettings(**accel))
        denoiser.clock = Clock(plan.device)
        synchronize(plan.device)
        load_s = time.perf_counter() - started
        if count:
            result["flops"] = count_flops(denoiser, prompt, plan.width, plan.height)
        check = output_check(denoiser, config, plan, prompt) if plan.check_steps else {}
        for batch in plan.batches:
            row = base_row(config, plan, batch) | dict(load_s=load_s, switches=getattr(denoiser, "switches", None))
            row |= check
            requests = make_requests(prompt, batch, plan.width, plan.height)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            clock = Clock(plan.device)
            with clock.span("call"):
                denoiser(requests, key_for(plan.steps))  # first call of this shape: compiles when compiling
            row["first_call_s"] = clock.seconds("call")
            for _ in range(plan.warm_calls):  # CUDA graphs record on the calls after the first
                denoiser(requests, key_for(plan.steps))
            calls, loops, decodes, outputs = [], [], [], []
            for _ in range(plan.repeats):
                with clock.span("call"):
                    out = denoiser(requests, key_for(plan.steps))
                calls.append(clock.seconds("call"))
                loops.append(denoiser.clock.seconds("loop"))
                decodes.append(denoiser.clock.seconds("decode"))
                outputs.append(np.concatenate(out))
            call_s, loop_s = statistics.median(calls), statistics.median(loops)
            row.update(
                status="ok", call_s=call_s, call_s_all=calls, s_per_image=call_s / batch, images_per_s=batch / call_s,
                it_per_s=plan.steps / loop_s, loop_s=loop_s, decode_s=statistics.median(decodes),
                peak_mem_gib=torch.cuda.max_memory_allocated() / GIB if cuda else None,
                finite=denoiser.finite,
                repeat_max_abs_diff=int(max(np.abs(o.astype(int) - outputs[0]).max() for o in outputs)),
            )
            images[f"b{batch}"] = outputs[0]
            rows.append(row)
            if on_row:
                on_row(row)
    except Exception as exc:  # a configuration that fails is a row that says why, not a dead benchmark
        reason = f"{type(exc).__name__}: {exc}".strip()[:400]
        done = {row["batch"] for row in rows}
        failed = [base_row(config, plan, b) | dict(status="error", reason=reason, error=traceback.format_exc())
                  for b in plan.batches if b not in done]
        rows += failed
        for row in failed if on_row else []:
            on_row(row)
    finally:
        if denoiser is not None:
            denoiser.close()
        del denoiser
        torch.backends.cudnn.benchmark = saved["cudnn"]
        if saved["cache"] is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved["cache"]
        torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
    if images:
        np.savez(Path(plan.workdir) / f"images-{config.name}.npz", **images)
    return result


def base_row(config: BenchConfig, plan: Plan, batch: int) -> dict:
    accel = {k: v for k, v in config.accel.items()}
    if accel.get("fp8"):
        accel["fp8_backend"] = plan.fp8_backend
    if compiles(accel):
        accel["compile_backend"] = plan.compile_backend
    return dict(config=config.name, batch=batch, dtype=config.dtype, accel=accel, candidate=config.candidate,
                note=config.note, status="pending", reason=None)


def run_isolated(config: BenchConfig, plan: Plan, count: bool) -> dict:
    """run_config in a fresh process: no compiled graphs, CUDA graph pools, flags or allocator state carry over."""
    plan_file = Path(plan.workdir) / f"plan-{config.name}.json"
    out_file = Path(plan.workdir) / f"result-{config.name}.json"
    plan_file.write_text(json.dumps(asdict(plan)))
    command = [sys.executable, "-m", "bench.gpu", "--_child", config.name, "--_plan", str(plan_file),
               "--_out", str(out_file)] + (["--_count"] if count else [])
    proc = subprocess.run(command, text=True, capture_output=True, cwd=REPO)
    if proc.returncode == 0 and out_file.exists():
        return json.loads(out_file.read_text())
    reason = f"subprocess exit {proc.returncode}: {(proc.stderr or proc.stdout)[-400:]}"
    rows = [base_row(config, plan, b) | dict(status="error", reason=reason) for b in plan.batches]
    return dict(config=config.name, rows=rows, flops=None)


# --- output check against the baseline at the same seed (issue 22) ---------------------------------------------
# Unit roundoff of each precision: the relative error of one rounding. FP8 is e4m3 (3 mantissa bits).
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8, "fp8": 2.0**-4}
BASELINE = "baseline"
# Whatever the precision, latents further than this from the baseline's are another image: all zeros is 1.0, an
# unrelated sample of the same spread about 1.4.
MAX_REL_RMS = 0.25


def precision_of(config: BenchConfig) -> str:
    return "fp8" if config.accel.get("fp8") else config.dtype


def output_check(denoiser, config: BenchConfig, plan: Plan, prompt) -> dict:
    """One batch-1 call of `plan.check_steps` steps (a short schedule that ends at sigma 0, so the final latents are
    the model's own prediction, not the shared starting noise), saved, and compared with the baseline's."""
    from instantid_core.config import Scheduler
    from instantid_core.denoise import BatchKey

    clock = Clock(plan.device)
    with clock.span("check"):
        out = denoiser(make_requests(prompt, 1, plan.width, plan.height),
                       BatchKey(plan.width, plan.height, plan.check_steps, Scheduler.euler))
    own = dict(latents=denoiser.last_latents.float().cpu().numpy(), image=out[0][0])
    np.savez(Path(plan.workdir) / f"check-{config.name}.npz", **own)
    result = dict(check_steps=plan.check_steps, check_call_s=clock.seconds("check"), precision=precision_of(config))
    base_file = Path(plan.workdir) / f"check-{BASELINE}.npz"
    if config.name == BASELINE:
        return result | dict(check="reference")
    if not base_file.exists():
        return result | dict(check="no baseline", check_reason="the baseline did not finish in this run")
    with np.load(base_file) as data:
        base = {name: data[name] for name in data.files}
    baseline = next(c for c in CONFIGS if c.name == BASELINE)
    return result | compare_outputs(own, base, precision_of(config), precision_of(baseline), plan.check_factor)


def compare_outputs(own: dict, base: dict, precision: str, base_precision: str, factor: float) -> dict:
    """Latents and image of a candidate vs the baseline's. The candidate is refused when its latents differ by more
    than `factor` x the unit roundoff of the lower of the two precisions (RMS of the difference over the RMS of the
    baseline's latents; never more than MAX_REL_RMS), or are not finite: a kernel that changes the computation
    shows up far above that line, rounding (grown through a few steps of a deep network) stays below it."""
    latents, reference = own["latents"].astype(np.float64), base["latents"].astype(np.float64)
    allowed = min(factor * max(UNIT_ROUNDOFF[precision], UNIT_ROUNDOFF[base_precision]), MAX_REL_RMS)
    if latents.shape != reference.shape:
        return dict(check="refused", allowed_rel_rms=allowed,
                    check_reason=f"latents shape {latents.shape} vs baseline {reference.shape}")
    diff = latents - reference
    rel = float(np.sqrt(np.mean(diff**2)) / max(np.sqrt(np.mean(reference**2)), 1e-30))
    image_diff = np.abs(own["image"].astype(int) - base["image"].astype(int))
    result = dict(latents_max_abs_diff=float(np.abs(diff).max()), latents_rel_rms=rel, allowed_rel_rms=allowed,
                  image_max_abs_diff=int(image_diff.max()), image_psnr_db=psnr(own["image"], base["image"]))
    if not np.isfinite(latents).all():
        return result | dict(check="refused", check_reason="non-finite latents")
    if not rel <= allowed:
        return result | dict(check="refused", check_reason=f"latents differ by {rel:.3g} (relative RMS), more than "
                             f"{factor:g} x the {precision} unit roundoff allows ({allowed:.3g})")
    return result | dict(check="ok")


# --- output check, choice, cold start ----------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(255.0**2 / mse)


def check_outputs(rows: list[dict], plan: Plan) -> None:
    """Every row vs the baseline (and the fp32 reference) of the same batch: same seeds, same requests."""
    def images(name: str) -> dict:
        path = Path(plan.workdir) / f"images-{name}.npz"
        if not path.exists():
            return {}
        with np.load(path) as data:
            return {k: data[k] for k in data.files}

    baseline, reference, cache = images("baseline"), images("fp32_reference"), {}
    for row in rows:
        if row["status"] != "ok":
            continue
        own = cache.setdefault(row["config"], images(row["config"])).get(f"b{row['batch']}")
        for label, other in (("", baseline), ("_vs_fp32", reference)):
            theirs = other.get(f"b{row['batch']}")
            if own is None or theirs is None:
                continue
            row[f"max_abs_diff{label}"] = int(np.abs(own.astype(int) - theirs.astype(int)).max())
            row[f"psnr_db{label}"] = psnr(own, theirs)
        if "max_abs_diff" not in row:
            row["within_tolerance"] = None
            continue
        value = row["psnr_db"]
        row["within_tolerance"] = bool(row["finite"] and (value is None or value >= plan.psnr_min))
        if not row["within_tolerance"]:
            row["status"] = "mismatch"  # marked, never chosen


def add_derived(rows: list[dict], flops: dict | None, matmul: dict, plan: Plan) -> None:
    base = {row["batch"]: row for row in rows if row["config"] == "baseline" and "images_per_s" in row}
    for row in rows:
        if "images_per_s" not in row:
            continue
        if row["batch"] in base:
            row["speedup_vs_baseline"] = row["images_per_s"] / base[row["batch"]]["images_per_s"]
        if flops:
            achieved = (flops["fixed"] + plan.steps * flops["per_step"]) * row["images_per_s"]
            row["achieved_tflops"] = achieved / 1e12
            row["mfu"] = achieved / (matmul["tflops"] * 1e12)


def choose(rows: list[dict]) -> dict | None:
    """The fastest candidate at batch 1 whose output is within tolerance of the baseline."""
    ok = [r for r in rows if r["batch"] == 1 and r["status"] == "ok" and r["candidate"] and r.get("within_tolerance")]
    return min(ok, key=lambda r: r["s_per_image"]) if ok else None


def run_cold_start(plan: Plan, config_name: str) -> list[dict]:
    """Process start to first image, twice on one compile-cache folder: empty, then warm."""
    cache = Path(plan.workdir) / "cold-start-cache"
    plan_file = Path(plan.workdir) / "plan-cold.json"
    plan_file.write_text(json.dumps(asdict(plan)))
    results = []
    for label in ("empty_cache", "warm_cache"):
        out_file = Path(plan.workdir) / f"cold-{label}.json"
        spawned = time.time()
        proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--_cold", config_name, "--_plan",
                               str(plan_file), "--_out", str(out_file), "--_cache", str(cache)],
                              text=True, capture_output=True, cwd=REPO)
        row = dict(config=config_name, cache=label, status="error", reason=None)
        if proc.returncode == 0 and out_file.exists():
            marks = json.loads(out_file.read_text())
            row.update(status="ok", imports_s=marks["imported"] - spawned, ready_s=marks["ready"] - spawned,
                       first_image_s=marks["first_image"] - spawned, warmup_s=marks["warmup_s"])
        else:
            row["reason"] = f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-400:]}"
        results.append(row)
    return results


def cold_child(config_name: str, plan: Plan, out: Path, cache: Path, imported: float) -> None:
    """The product's start-up path: text encoders + denoiser (compiling for the plan's size, batch 1) -> image."""
    from instantid_core.accel import AccelSettings
    from instantid_core.config import PipelineSettings, Scheduler
    from instantid_core.denoise import BatchKey
    from instantid_core.text import PromptEncoder

    config = next(c for c in CONFIGS if c.name == config_name)
    accel = dict(config.accel, compile_backend=plan.compile_backend, compile_cache_dir=str(cache))
    if accel.get("fp8"):
        accel["fp8_backend"] = plan.fp8_backend
    settings = PipelineSettings(device=plan.device, dtype=config.dtype, warmup_sizes=[(plan.width, plan.height)],
                                warmup_batch_sizes=[1])
    sdxl, identitynet, adapter = model_paths(plan.root)
    encoder = PromptEncoder(sdxl, settings)
    # The timed subclass only to apply FP8 / regional compile like run_config (see timed_denoiser_class).
    denoiser = timed_denoiser_class()(sdxl, identitynet, adapter, settings, accel=AccelSettings(**accel))
    ready = time.time()
    prompt = encoder.encode(*PROMPT)
    denoiser(make_requests(prompt, 1, plan.width, plan.height), BatchKey(plan.width, plan.height, plan.steps,
                                                                          Scheduler.euler))
    out.write_text(json.dumps(dict(imported=imported, ready=ready, first_image=time.time(),
                                   warmup_s=sum(denoiser.warmup_seconds.values()))))
    denoiser.close()


# --- report -------------------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import diffusers

    env = dict(python=platform.python_version(), torch=torch.__version__, diffusers=diffusers.__version__,
               platform=platform.platform(), cpu_count=os.cpu_count(), device=device)
    if is_cuda(device):
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), driver=nvidia_driver())
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine())
    return env


def nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], text=True,
                             capture_output=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def fmt(value, digits: int = 3) -> str:
    """A figure as the tables show it (the lease's row writer's format)."""
    try:
        from bench.lease_rows import fmt as row_fmt
    except ImportError:  # run as a script: bench/ itself is on sys.path, its parent is not
        from lease_rows import fmt as row_fmt
    return row_fmt(value, digits)


def evaluate_targets(report: dict) -> list[str]:
    models = report["plan"]["models"]
    if not is_cuda(report["plan"]["device"]) or not (models == "sdxl-random" or models.startswith("weights:")):
        return ["not evaluated: not a CUDA device with full-size models"]
    chosen, rows = report["chosen"], report["rows"]
    if chosen is None:
        return ["no configuration within tolerance"]
    lines = [f"s/image at batch 1: {chosen['s_per_image']:.3f} (target <= {TARGET_S_PER_IMAGE}): "
             f"{'met' if chosen['s_per_image'] <= TARGET_S_PER_IMAGE else 'missed'}"]
    if chosen.get("speedup_vs_baseline") is not None:
        gain = chosen["speedup_vs_baseline"]
        lines.append(f"images/s vs baseline: {gain:.2f}x (target >= {TARGET_SPEEDUP}x): "
                     f"{'met' if gain >= TARGET_SPEEDUP else 'missed'}")
    b4 = next((r for r in rows if r["config"] == chosen["config"] and r["batch"] == 4 and r["status"] == "ok"), None)
    if b4:
        gain = b4["images_per_s"] / chosen["images_per_s"]
        lines.append(f"batch 4 vs batch 1 images/s: {gain:.2f}x (target >= {TARGET_BATCH4_GAIN}x): "
                     f"{'met' if gain >= TARGET_BATCH4_GAIN else 'missed'}")
    warm = next((c for c in report["cold_start"] if c["cache"] == "warm_cache" and c["status"] == "ok"), None)
    if warm:
        lines.append(f"cold start, warm cache: {warm['first_image_s']:.1f} s (target < {TARGET_COLD_START_WARM_S}): "
                     f"{'met' if warm['first_image_s'] < TARGET_COLD_START_WARM_S else 'missed'}")
    return lines


def markdown(report: dict) -> str:
    env, plan, matmul, flops = report["env"], report["plan"], report["matmul"], report["flops"]
    where = env["gpu"] or f"CPU ({env['cpu']}, {env['cpu_count']} cores)"
    lines = [f"### {report['started'][:19]}Z, {where}, models {plan['models']}", ""]
    versions = f"torch {env['torch']}, diffusers {env['diffusers']}, python {env['python']}"
    if env.get("cuda"):
        versions += f", CUDA {env['cuda']}, cuDNN {env['cudnn']}, driver {env['driver']}"
    lines += [f"- {versions}",
              f"- {plan['width']}x{plan['height']}, {plan['steps']} steps, guidance {GUIDANCE}, Euler, batches "
              f"{plan['batches']}, median of {plan['repeats']} timed calls after {plan['warm_calls'] + 1} warm-up "
              f"calls; compile backend {plan['compile_backend']}",
              f"- measured bf16 matmul ({matmul['n']}^3): {matmul['tflops']:.3g} TFLOP/s"]
    if flops:
        per_image = flops["fixed"] + plan["steps"] * flops["per_step"]
        lines.append(f"- FLOPs per image (FlopCounterMode): {per_image / 1e12:.4g} TFLOP "
                     f"({flops['per_step'] / 1e12:.4g} per guided step + {flops['fixed'] / 1e12:.4g} decode/Resampler);"
                     f" floor at the measured matmul rate: {per_image / (matmul['tflops'] * 1e12):.3g} s/image")
    lines += [f"- output check: PSNR vs baseline >= {plan['psnr_min']} dB (uint8 images, same seeds)", "",
              "| config | batch | status | s/image | it/s | images/s | vs base | peak GiB | first call s | MFU "
              "| max diff | PSNR dB |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        psnr_text = "identical" if row.get("max_abs_diff") == 0 else fmt(row.get("psnr_db"))
        cells = [row["config"], row["batch"], row["status"]]
        cells += [fmt(row.get(name)) for name in ("s_per_image", "it_per_s", "images_per_s", "speedup_vs_baseline",
                                                  "peak_mem_gib", "first_call_s", "mfu", "max_abs_diff")]
        lines.append("| " + " | ".join(str(cell) for cell in [*cells, psnr_text]) + " |")
    problems = [r for r in report["rows"] if r["status"] in ("error", "skipped") and r["batch"] == plan["batches"][0]]
    if problems:
        lines += [""] + [f"- {r['config']}: {r['status']}: {r['reason']}" for r in problems]
    if report["cold_start"]:
        lines += ["", "| cold start | cache | status | imports s | ready s | first image s | warm-up s |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for c in report["cold_start"]:
            lines.append(f"| {c['config']} | {c['cache']} | {c['status']} | {fmt(c.get('imports_s'))} | "
                         f"{fmt(c.get('ready_s'))} | {fmt(c.get('first_image_s'))} | {fmt(c.get('warmup_s'))} |")
    chosen = report["chosen"]
    lines += ["", f"- chosen (fastest at batch 1 within tolerance): {chosen['config'] if chosen else 'none'}"]
    lines += [f"- target: {line}" for line in report["targets"]]
    return "\n".join(lines) + "\n"


def append_results(text: str, raw: Path) -> None:
    """Add this run under the issue-4 heading of bench/RESULTS.md (the heading is created when missing)."""
    body = text + f"\nRaw JSON: `{raw.relative_to(REPO) if raw.is_relative_to(REPO) else raw}`\n"
    current = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    if SECTION not in current:
        current = current.rstrip("\n") + f"\n\n{SECTION}\n"
    start = current.index(SECTION) + len(SECTION)
    end = current.find("\n## ", start)
    end = len(current) if end < 0 else end + 1
    current = current[:end].rstrip("\n") + "\n\n" + body + ("\n" + current[end:] if end < len(current) else "")
    RESULTS_MD.write_text(current)


# --- FLOPs of the published architecture (no weights, no device) --------------------------------------------------
def flops_only(size: int) -> dict:
    """FlopCounterMode over one guided step (IdentityNet + UNet, both CFG halves) and one VAE decode of the
    published architectures at `size`, on meta tensors: exact op counts, nothing is computed."""
    from torch.utils.flop_counter import FlopCounterMode

    from instantid_core.adapter import install_identity_adapter

    published = published_configs()
    h = size // 8
    with torch.device("meta"), torch.inference_mode():
        unet, vae = published.build_unet(), published.build_vae()
        identitynet = published.build_identitynet(unet)
        install_identity_adapter(unet, published.ip_adapter_state_dict(unet, None, "meta"))
        latents, t = torch.randn(2, 4, h, h), torch.tensor(999.0)
        states = torch.randn(2, 77 + 16, published.UNET["cross_attention_dim"])
        added = dict(text_embeds=torch.randn(2, 1280), time_ids=torch.randn(2, 6))
        counts = {}
        with FlopCounterMode(display=False) as counter:
            down, mid = identitynet(latents, t, encoder_hidden_states=states[:, -16:],
                                    controlnet_cond=torch.randn(2, 3, size, size), added_cond_kwargs=added,
                                    return_dict=False)
        counts["identitynet_per_guided_step"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            unet(latents, t, encoder_hidden_states=states, added_cond_kwargs=added,
                 cross_attention_kwargs={"ip_adapter_scale": torch.ones(2)}, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid)
        counts["unet_per_guided_step"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            vae.decode(torch.randn(1, 4, h, h))
        counts["vae_decode_per_image"] = counter.get_total_flops()
    per_image = 30 * (counts["identitynet_per_guided_step"] + counts["unet_per_guided_step"])
    per_image += counts["vae_decode_per_image"]
    return dict(size=size, steps=30, **counts, per_image_30_steps=per_image,
                method="FlopCounterMode on meta tensors, published configs (bench/sdxl_configs.py)")


# --- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset instead of full-size models")
    parser.add_argument("--weights", help="real weights, laid out as ModelSources.from_root(DIR) expects")
    parser.add_argument("--shrunk", action="store_true",
                        help="random models with SDXL's depths at tiny widths (checks the full-size writer on a CPU)")
    parser.add_argument("--models-dir", help="where random full-size models (or the tiny preset) are written once")
    parser.add_argument("--quick", action="store_true", help="harness check: 2 steps, batches 1 2, 2 repeats")
    parser.add_argument("--configs", help=f"comma-separated subset of: {', '.join(CONFIG_NAMES)}")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--size", type=int, help="square image side (default 1024; tiny 128; quick 512/64)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int, help="timed calls per batch (median; default 5)")
    parser.add_argument("--psnr-min", type=float, default=30.0, help="output check tolerance vs baseline, dB")
    parser.add_argument("--compile-backend", help="inductor (default) or eager/aot_eager (tracing check only)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="one subprocess per configuration (default: on for CUDA)")
    parser.add_argument("--cold-start", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cold-config", default="ours_bf16")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    parser.add_argument("--write-results", action="store_true", help=f"append the table to {RESULTS_MD.name}")
    parser.add_argument("--flops-only", action="store_true", help="FLOPs of the published architecture (meta)")
    for hidden in ("--_child", "--_cold", "--_plan", "--_out", "--_cache"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--_count", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    imported = time.time()
    args = parse_args(argv)
    if args._child or args._cold:
        plan = Plan(**json.loads(Path(args._plan).read_text()))
        if args._cold:
            cold_child(args._cold, plan, Path(args._out), Path(args._cache), imported)
        else:
            config = next(c for c in CONFIGS if c.name == args._child)
            on_row = None
            if plan.rows_file:
                from bench.lease_rows import RowWriter

                on_row = RowWriter(Path(plan.rows_file), plan.row_tags).append
            Path(args._out).write_text(json.dumps(run_config(config, plan, args._count, on_row), default=str))
        return 0
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    if args.flops_only:
        size = args.size or 1024
        report = flops_only(size)
        path = results_dir / f"flops-sdxl-instantid-{size}.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        return 0

    configs = CONFIGS
    if args.configs:
        unknown = set(args.configs.split(",")) - set(CONFIG_NAMES)
        if unknown:
            raise SystemExit(f"--configs: unknown {sorted(unknown)}; known: {', '.join(CONFIG_NAMES)}")
        configs = [c for c in CONFIGS if c.name in args.configs.split(",")]
    if args.cold_start and args.cold_config not in CONFIG_NAMES:
        raise SystemExit(f"--cold-config: unknown {args.cold_config!r}")
    isolate = is_cuda(args.device) if args.isolate is None else args.isolate
    workdir = Path(tempfile.mkdtemp(prefix="instantid-bench-gpu-"))
    try:
        plan = build_plan(args, workdir)
        started = datetime.now(timezone.utc).isoformat()
        encode_prompt(plan)
        matmul = measure_matmul(plan.device)
        if is_cuda(plan.device):
            torch.cuda.empty_cache()  # the parent keeps no GPU memory while configurations run
        rows, flops = [], None
        # FLOPs are counted once, on the first eager configuration (FlopCounterMode cannot see into compiled code).
        counter = next((c.name for c in configs if not (compiles(c.accel) or c.needs_cuda)), None)
        for config in configs:
            began = time.perf_counter()
            result = (run_isolated if isolate else run_config)(config, plan, config.name == counter)
            statuses = sorted({row["status"] for row in result["rows"]})
            print(f"[gpu bench] {config.name}: {', '.join(statuses)} in {time.perf_counter() - began:.1f} s",
                  flush=True)
            flops = result["flops"] or flops
            rows += result["rows"]
        check_outputs(rows, plan)
        add_derived(rows, flops, matmul, plan)
        began = time.perf_counter()
        cold = run_cold_start(plan, args.cold_config) if args.cold_start else []
        if cold:
            print(f"[gpu bench] cold start ({args.cold_config}) in {time.perf_counter() - began:.1f} s", flush=True)
        report = dict(schema=SCHEMA, started=started, argv=sys.argv[1:], env=environment(plan.device),
                      plan={k: v for k, v in asdict(plan).items() if k not in ("workdir", "prompt_file")},
                      isolate=isolate, matmul=matmul, flops=flops, configs=[asdict(c) for c in configs], rows=rows,
                      cold_start=cold, chosen=None, targets=[])
        report["chosen"] = choose(rows)
        report["targets"] = evaluate_targets(report)
        label = plan.models.split(":")[0]
        path = results_dir / f"gpu-{plan.device.split(':')[0]}-{label}-{stamp}.json"
        path.write_text(json.dumps(report, indent=1, default=str) + "\n")
        text = markdown(report)
        print(text)
        print(f"raw JSON: {path}")
        if args.write_results:
            append_results(text, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
