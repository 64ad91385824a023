"""FP8 linear layers for the UNet and IdentityNet, through torch's own `torch._scaled_mm` (no torchao needed).

What changes: every `nn.Linear` inside a transformer block (`Transformer2DModel`: attention q/k/v/out, the adapter's
face k/v, the feed-forward, proj_in/proj_out) whose sides are multiples of 16, i.e. the GEMMs that carry most of the
UNet's and IdentityNet's attention FLOPs. Convolutions, norms and the time/text embeddings stay in the model dtype
(torch has no FP8 convolution; the embeddings' GEMMs have one row per sample and cost nothing).

How: weights are quantised once, at construction, to float8_e4m3fn with one float32 scale per tensor (max |w| /
448); activations are quantised per call with a scale from their own max |x| (dynamic scaling: no calibration
data needed). The product accumulates in float32 and comes out in the model's dtype, bias added after.

Backends (`FP8_BACKENDS`):
- "auto": `scaled_mm` on a CUDA GPU of compute capability >= 8.9 (Ada, Hopper); anything else is `FP8Unavailable`.
- "scaled_mm": the FP8 kernel wherever torch has one (recent CPU builds do too: the tests run it there).
- "emulated": the same rounding of weights and activations, multiplied in float32: no FP8 kernel, no speed-up;
  for checking the numerics and the plumbing on any device.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

FP8Backend = Literal["auto", "scaled_mm", "emulated"]
FP8_BACKENDS = ("auto", "scaled_mm", "emulated")
FP8_DTYPE_NAME = "float8_e4m3fn"  # 4 exponent bits, 3 mantissa bits: the forward-pass format of NVIDIA's recipes
MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores
BLOCK_CLASSES = ("Transformer2DModel",)  # where the converted Linear layers live
ALIGN = 16  # _scaled_mm wants both sides of each operand to be multiples of 16


class FP8Unavailable(ValueError):
    """FP8 was asked for on a device (or a torch build) that cannot run it; the message names what is missing."""


def fp8_dtype() -> torch.dtype:
    dtype = getattr(torch, FP8_DTYPE_NAME, None)
    if dtype is None:
        raise FP8Unavailable(f"torch {torch.__version__} has no {FP8_DTYPE_NAME} dtype; FP8 needs torch >= 2.1")
    return dtype


def resolve_backend(device: torch.device, requested: FP8Backend = "auto") -> Literal["scaled_mm", "emulated"]:
    """The backend that will run on `device`, or `FP8Unavailable` saying why none can.

    "auto" and "scaled_mm" are checked by running one 16x16 FP8 product on the device, so a driver or build that
    lacks the kernel fails here, at construction, not in the first request.
    """
    if requested not in FP8_BACKENDS:
        raise ValueError(f"fp8_backend must be one of {', '.join(FP8_BACKENDS)}; got {requested!r}")
    fp8_dtype()
    if requested == "emulated":
        return "emulated"
    if requested == "auto":
        if device.type != "cuda":
            raise FP8Unavailable(f"fp8 needs a CUDA GPU with compute capability >= {MIN_CAPABILITY[0]}."
                                 f"{MIN_CAPABILITY[1]} (Ada, Hopper); this denoiser runs on {device}. Turn "
                                 "pipeline.fp8 off")
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            raise FP8Unavailable(f"fp8 needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada, "
                                 f"Hopper); {torch.cuda.get_device_name(device)} has {capability[0]}."
                                 f"{capability[1]}. Turn pipeline.fp8 off")
    if not hasattr(torch, "_scaled_mm"):
        raise FP8Unavailable(f"torch {torch.__version__} has no torch._scaled_mm")
    try:
        probe = torch.ones(ALIGN, ALIGN, device=device).to(fp8_dtype())
        one = torch.ones((), device=device)
        torch._scaled_mm(probe, probe.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        raise FP8Unavailable(f"torch._scaled_mm does not run on {device} (torch {torch.__version__}): {exc}") from exc
    return "scaled_mm"


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8 quantisation: (x / scale) in float8_e4m3fn and the float32 scale (max |x| / 448)."""
    dtype = fp8_dtype()
    top = torch.finfo(dtype).max
    scale = x.detach().abs().amax().float().clamp(min=1e-12) / top
    return (x.float() / scale).clamp(-top, top).to(dtype), scale


class Float8Linear(nn.Module):
    """A Linear whose weight is stored in FP8 (half the bytes of fp16) and whose product runs in FP8."""

    def __init__(self, linear: nn.Linear, backend: Literal["scaled_mm", "emulated"]) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.backend = backend
        self.out_dtype = linear.weight.dtype  # the model's dtype: what the next layer expects
        weight, scale = quantize(linear.weight.detach())
        self.register_buffer("weight", weight)  # (out, in) float8_e4m3fn; .t() is the column-major mat2
        self.register_buffer("weight_scale", scale)  # () float32
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != fp8_dtype():  # a later model.to(dtype) casts float8 buffers too: refuse, loudly
            raise RuntimeError(f"Float8Linear weight was cast to {self.weight.dtype}; convert after any .to(dtype)")
        shape = x.shape
        rows = x.reshape(-1, self.in_features)  # (M, K)
        x_fp8, x_scale = quantize(rows)
        if self.backend == "scaled_mm":
            m = rows.shape[0]
            pad = -m % ALIGN  # e.g. 2 x 93 text+face tokens: zero rows in, sliced off after
            if pad:
                x_fp8 = torch.cat([x_fp8, x_fp8.new_zeros(pad, self.in_features)])
            out = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                   out_dtype=self.out_dtype)[:m]
        else:
            out = (x_fp8.float() * x_scale) @ (self.weight.float() * self.weight_scale).t()
            out = out.to(self.out_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


def eligible(linear: nn.Module) -> bool:
    return (type(linear) is nn.Linear and linear.in_features % ALIGN == 0 and linear.out_features % ALIGN == 0
            and linear.weight.dtype in (torch.float16, torch.bfloat16, torch.float32))


def convert_linears(model: nn.Module, backend: Literal["scaled_mm", "emulated"]) -> int:
    """Swap the eligible Linear layers inside `model`'s transformer blocks for `Float8Linear`; returns how many.

    A Linear shared by two parents (fused q/k/v views are separate Linears, so none in this model) is converted
    once per parent. Call after the model is on its device: quantising there is fast and needs no host copy.
    """
    count = 0
    for block in [m for m in model.modules() if type(m).__name__ in BLOCK_CLASSES]:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if eligible(child):
                    setattr(parent, name, Float8Linear(child, backend))
                    count += 1
    if count:
        log.info("fp8: %d Linear layers of %s in float8_e4m3fn (%s)", count, type(model).__name__, backend)
    return count
