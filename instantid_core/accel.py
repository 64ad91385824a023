"""Speed switches for the denoiser, each decided once at construction and off by default (CPU-safe).

- `fuse_qkv`: one projection GEMM instead of three (self-attention: q/k/v; cross-attention: k/v; the adapter's
  face k/v). The unfused weights become views into the fused ones, so memory does not grow. Same result up to
  GEMM rounding.
- `channels_last`: NHWC convolutions in the UNet and IdentityNet. Same result up to conv rounding.
- `sdpa_backend`: pin scaled-dot-product attention to flash / cuDNN / memory-efficient kernels (CUDA only),
  around the UNet+IdentityNet step only (the VAE may run in float32, which flash attention cannot).
- `compile`: `torch.compile(dynamic=False)` of the whole per-step function (IdentityNet, residual masking, UNet) as
  one graph; modes with CUDA graphs (`reduce-overhead`, `max-autotune`) run every call on one dedicated thread,
  because inductor keeps CUDA graph trees per thread. `compile_vae` does the same for the VAE decode.
- `compile_regional`: `torch.compile` of each repeated transformer block of UNet and IdentityNet instead of the whole
  step (diffusers' `compile_repeated_blocks`, also applied to IdentityNet): one graph per block shape, so it compiles
  in a fraction of the whole step's time. Not with `compile` (that compiles the step around the same blocks).
- `inductor_tuning`: the inductor settings diffusion-fast uses (1x1 convs as matmuls, coordinate-descent tuning, no
  epilogue fusion); process-wide, set with the compile state.
- `fp8`: FP8 Linear layers in the UNet's and IdentityNet's transformer blocks (`fp8.py`; Ada/Hopper; a device
  without FP8 raises `fp8.FP8Unavailable` at construction). `fp8_backend` "emulated" checks the numerics anywhere.
- `compile_cache_dir`: inductor's on-disk cache (FX graphs, autotuning) plus a mega-cache file, so a restarted
  replica re-traces but does not recompile.

Which of these a GPU replica turns on is decided by the GPU lease's rows (`bench/gpu_lease.sh`, bench/README.md).

Never run IdentityNet on the conditional half of the CFG batch only: InstantID feeds its residuals to both halves,
so skipping the unconditional half changes the image. It is not offered here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0
from torch import nn

from . import fp8 as fp8_layers

if TYPE_CHECKING:  # pragma: no cover
    from .config import PipelineSettings

log = logging.getLogger(__name__)

SdpaBackend = Literal["default", "flash", "cudnn", "efficient", "math"]
SDPA_BACKENDS: dict[str, list[torch.nn.attention.SDPBackend]] = {
    "flash": [torch.nn.attention.SDPBackend.FLASH_ATTENTION],
    "cudnn": [torch.nn.attention.SDPBackend.CUDNN_ATTENTION],
    "efficient": [torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION],
    "math": [torch.nn.attention.SDPBackend.MATH],
}
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
MEGA_CACHE_FILE = "mega_cache.bin"


@dataclass(frozen=True)
class AccelSettings:
    """Every speed switch of the denoiser. `from_settings` takes the ones `PipelineSettings` carries."""

    channels_last: bool = False
    fuse_qkv: bool = False
    sdpa_backend: SdpaBackend = "default"
    compile: bool = False
    compile_mode: str = "max-autotune-no-cudagraphs"
    compile_fullgraph: bool = True  # a graph break would split the step; fail loudly instead
    compile_backend: str = "inductor"  # "eager" / "aot_eager" check tracing only (CPU tests)
    compile_vae: bool = False
    compile_cache_dir: str | None = None
    cudnn_benchmark: bool = False  # process-wide flag: let cuDNN time its conv algorithms per shape
    compile_regional: bool = False  # compile each repeated transformer block, not the whole step
    inductor_tuning: bool = False  # diffusion-fast's inductor settings (process-wide)
    fp8: bool = False  # FP8 Linear layers in UNet + IdentityNet transformer blocks
    fp8_backend: fp8_layers.FP8Backend = "auto"  # "emulated": same rounding without an FP8 kernel (tests, CPU)

    @classmethod
    def from_settings(cls, settings: PipelineSettings, **overrides) -> AccelSettings:
        shared = {f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)}
        return replace(cls(**shared), **overrides)

    @property
    def any_compile(self) -> bool:
        return self.compile or self.compile_vae or self.compile_regional

    def uses_cudagraphs(self, device: torch.device) -> bool:
        return (device.type == "cuda" and self.any_compile and self.compile_backend == "inductor"
                and self.compile_mode in CUDAGRAPH_MODES)

    def check(self, device: torch.device, *, lora: bool) -> None:
        """Reject combinations that cannot work, at construction (ValueError names the setting)."""
        if self.sdpa_backend not in ("default", *SDPA_BACKENDS):
            raise ValueError(f"sdpa_backend must be one of default, {', '.join(SDPA_BACKENDS)}; "
                             f"got {self.sdpa_backend!r}")
        if self.sdpa_backend not in ("default", "math") and device.type != "cuda":
            raise ValueError(f"sdpa_backend={self.sdpa_backend!r} needs a CUDA device, got {device}")
        if self.fuse_qkv and lora:
            # The LCM-LoRA wraps to_q/to_k/to_v; fused projections would silently bypass it.
            raise ValueError("fuse_qkv cannot be combined with an LCM-LoRA (lcm_lora); turn one of them off")
        if self.compile and self.compile_regional:
            raise ValueError("compile (the whole step) and compile_regional (its blocks) exclude each other; "
                             "turn one of them off")
        if self.fp8:
            if lora:
                # LoRAs (peft) wrap nn.Linear; an FP8 layer would silently drop their update.
                raise ValueError("fp8 cannot be combined with LoRAs (lcm_lora, loras); turn one of them off")
            fp8_layers.resolve_backend(device, self.fp8_backend)  # FP8Unavailable names what the device lacks

    def describe(self) -> str:
        on = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) != f.default]
        return ", ".join(on) or "all off"


# --- fused projections ----------------------------------------------------------------------------------------
def fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear holding the given ones' weights stacked; the originals then view into it (no extra memory)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    has_bias = all(linear.bias is not None for linear in linears)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if has_bias:
            fused.bias.copy_(torch.cat([linear.bias.detach() for linear in linears]))
    fused.requires_grad_(False)
    start = 0
    for linear in linears:
        rows = linear.out_features
        linear.weight = nn.Parameter(fused.weight[start:start + rows], requires_grad=False)
        if has_bias:
            linear.bias = nn.Parameter(fused.bias[start:start + rows], requires_grad=False)
        start += rows
    return fused


def fuse_qkv(model: nn.Module) -> int:
    """Fuse the attention projections of every `Attention` in `model`; returns how many were fused.

    Self-attention gets `to_qkv`, cross-attention `to_kv` (the query comes from other states), and an adapter
    processor with `to_k_ip`/`to_v_ip` gets `to_kv_ip`. Processors that do not read fused weights (diffusers'
    plain `AttnProcessor2_0`) are swapped for `FusedAttnProcessor2_0`; ours read `attn.fused_projections`.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, Attention) or module.fused_projections:
            continue
        if getattr(module, "added_kv_proj_dim", None) is not None:
            continue  # added-KV attention (not in SDXL) has its own processors; leave it unfused
        if module.is_cross_attention:
            module.to_kv = fuse_linears([module.to_k, module.to_v])
        else:
            module.to_qkv = fuse_linears([module.to_q, module.to_k, module.to_v])
        module.fused_projections = True
        processor = module.processor
        if type(processor) is AttnProcessor2_0:
            module.set_processor(FusedAttnProcessor2_0())
        elif hasattr(processor, "fuse_projections"):
            processor.fuse_projections()
        elif not getattr(processor, "reads_fused_projections", False):
            raise ValueError(f"fuse_qkv: processor {type(processor).__name__} does not read fused projections")
        count += 1
    return count


# --- memory format, attention backend ---------------------------------------------------------------------------
def to_channels_last(*models: nn.Module) -> None:
    for model in models:
        model.to(memory_format=torch.channels_last)


def sdpa_context(backend: SdpaBackend) -> contextlib.AbstractContextManager:
    """The SDPA kernel restriction for `backend` ("default": PyTorch's own choice)."""
    if backend == "default":
        return contextlib.nullcontext()
    return torch.nn.attention.sdpa_kernel(SDPA_BACKENDS[backend])


# --- model switches: FP8 layers, regional compile ----------------------------------------------------------------
REPEATED_BLOCKS = ("BasicTransformerBlock",)  # diffusers' UNet2DConditionModel._repeated_blocks; IdentityNet too
DIFFUSION_FAST_INDUCTOR = dict(conv_1x1_as_mm=True, coordinate_descent_tuning=True, epilogue_fusion=False,
                               coordinate_descent_check_all_directions=True)


def apply_model_switches(unet: nn.Module, identitynet: nn.Module, accel: AccelSettings,
                         device: torch.device) -> dict[str, int]:
    """FP8 layers and regional compile on the loaded, placed UNet and IdentityNet; returns what changed per switch.

    Once per switch and model: a switch already applied to a model (by the denoiser's constructor, then again by
    a benchmark) changes nothing; a switch that was off then may still be applied later. FP8 first, so the compiled
    blocks trace the FP8 layers (their quantisation then fuses into the surrounding kernels).
    """
    done = {"fp8_linears": 0, "compiled_blocks": 0}
    for model in (unet, identitynet):
        if accel.fp8 and not getattr(model, "_instantid_fp8", False):
            done["fp8_linears"] += fp8_layers.convert_linears(model, fp8_layers.resolve_backend(device,
                                                                                                 accel.fp8_backend))
            model._instantid_fp8 = True
        if accel.compile_regional and not getattr(model, "_instantid_regional", False):
            done["compiled_blocks"] += compile_regions(model, accel)
            model._instantid_regional = True
    return done


def compile_regions(model: nn.Module, accel: AccelSettings) -> int:
    """`torch.compile` every repeated block of `model` in place (regional compilation); returns how many.

    Blocks of one class share their code, so blocks of one shape share one compiled graph (dynamo treats the
    parameters as inputs): compile time grows with the number of block shapes, not of blocks.
    """
    names = set(REPEATED_BLOCKS) | set(getattr(model, "_repeated_blocks", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"compile_regional: {type(model).__name__} has none of {sorted(names)}")
    options = dict(fullgraph=accel.compile_fullgraph, dynamic=False, backend=accel.compile_backend)
    if accel.compile_backend == "inductor":
        options["mode"] = accel.compile_mode
    for block in blocks:
        block.compile(**options)
    return len(blocks)


# --- compile + persistent cache --------------------------------------------------------------------------------
def configure_compile(accel: AccelSettings, shapes: int) -> None:
    """Process-wide compile state, set once by the denoiser's constructor (announced in the log).

    `shapes` is how many static shapes the replica will compile (sizes x batch sizes x CFG on/off): dynamo's
    recompile limit (8 by default) is raised to fit so a warmed shape never falls back to eager.
    """
    if accel.compile_cache_dir:
        cache = Path(accel.compile_cache_dir).expanduser().resolve()
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")  # read by inductor at first compile
        load_mega_cache(cache)
    if accel.inductor_tuning:
        import torch._inductor.config as inductor_config  # not loaded by `import torch` alone

        for name, value in DIFFUSION_FAST_INDUCTOR.items():
            setattr(inductor_config, name, value)
    if accel.compile_regional:
        shapes *= 8  # one graph per block shape: several levels and encoder lengths (UNet 77+16, IdentityNet 16)
    dynamo = torch._dynamo.config
    limit = max(dynamo.recompile_limit, shapes + 8)
    dynamo.recompile_limit = limit
    if hasattr(dynamo, "accumulated_recompile_limit"):
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * limit)
    log.info("torch.compile: mode=%s fullgraph=%s backend=%s regional=%s inductor_tuning=%s cache=%s "
             "recompile_limit=%d", accel.compile_mode, accel.compile_fullgraph, accel.compile_backend,
             accel.compile_regional, accel.inductor_tuning, accel.compile_cache_dir, limit)


def compile_fn(fn: Callable, accel: AccelSettings) -> Callable:
    # dynamic=False: one specialised graph per (size, batch), the fastest kernels; warmup() compiles each.
    options = dict(fullgraph=accel.compile_fullgraph, dynamic=False, backend=accel.compile_backend)
    if accel.compile_backend == "inductor":
        options["mode"] = accel.compile_mode
    return torch.compile(fn, **options)


def load_mega_cache(cache_dir: Path) -> bool:
    """Load compile artifacts saved by `save_mega_cache` (portable across machines with the same software)."""
    path = Path(cache_dir) / MEGA_CACHE_FILE
    if not path.exists():
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as exc:  # a stale or foreign cache only costs a recompile
        log.warning("ignoring compile cache %s: %s", path, exc)
        return False
    return True


def save_mega_cache(cache_dir: Path) -> int:
    """Write torch's mega-cache (everything compiled so far) next to the inductor cache; returns its size."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return 0
    data, _ = artifacts
    path = Path(cache_dir) / MEGA_CACHE_FILE
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_bytes(data)
    staging.replace(path)  # atomic: replicas sharing the folder never read a half-written file
    return len(data)
