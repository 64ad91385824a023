"""Out of device memory: split the failing batch and retry the halves, down to one request.

A batch that does not fit is not the fault of any one request in it: the halves usually fit (activation memory
grows with the batch), so every request that fits on its own still gets its images. A single request that does
not fit even alone answers `GPUMemoryError` naming its size; the others of its batch are unaffected. Memory is
released between tries (the failed attempt's tensors are unreachable once its exception is gone).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from .denoise_types import StepCallback
from .errors import GPUMemoryError

log = logging.getLogger(__name__)

R = TypeVar("R")
T = TypeVar("T")


def release_memory(device: torch.device | str) -> None:
    """Drop what the failed attempt left: Python references first, then the CUDA caching allocator's free
    blocks, so the next try (and other processes on the device) see the memory as free."""
    gc.collect()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_splitting(run: Callable[[list[T], StepCallback | None], list[R]], requests: list[T],
                  describe: Callable[[T], str], device: torch.device | str,
                  on_step: StepCallback | None = None) -> list[R | GPUMemoryError]:
    """`run(requests, on_step)` on the whole batch; on `torch.OutOfMemoryError`, on each half (recursively).

    Returns, per request, `run`'s result or the GPUMemoryError of a request that did not fit alone (`describe`
    names its size in the message). Any other exception propagates, as before.
    """
    try:
        return list(run(requests, on_step))
    except torch.OutOfMemoryError as exc:
        failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    # Outside the except block: the exception (and the frames holding the attempt's tensors) is gone.
    release_memory(device)
    if len(requests) == 1:
        log.warning("out of device memory for one request alone (%s): %s", describe(requests[0]), failed)
        return [GPUMemoryError(f"{describe(requests[0])} does not fit in the GPU's free memory right now; retry "
                               "later, or ask for a smaller size or fewer images", field="width")]
    half = len(requests) // 2
    log.warning("out of device memory for a batch of %d requests: retrying as %d + %d (%s)", len(requests), half,
                len(requests) - half, failed)
    results: list[R | GPUMemoryError] = []
    for lo, hi in ((0, half), (half, len(requests))):
        part = None if on_step is None else _slice(on_step, lo, hi)
        results.extend(run_splitting(run, requests[lo:hi], describe, device, part))
    return results


def _slice(on_step: StepCallback, lo: int, hi: int) -> StepCallback:
    def part(step: int, steps: int) -> Sequence[bool]:
        return list(on_step(step, steps))[lo:hi]

    return part
