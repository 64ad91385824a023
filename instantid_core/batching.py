"""Requests that share a BatchKey run as one denoiser call: the grouping the Denoiser deployment and the batch job
share, with the out-of-memory split (`memory.run_splitting`) inside each group."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from .denoise import IdentityDenoiser
from .denoise_types import BatchKey, DenoiseRequest, StepCallback
from .errors import InstantIDError
from .memory import run_splitting

Outcome = np.ndarray | Exception | None
"""Per request: its images (num_images, H, W, 3) uint8, the error it gets, or None when `on_step` dropped it."""


def describe_size(key: BatchKey, request: DenoiseRequest) -> str:
    return f"{key.width}x{key.height} with {request.num_images} image(s)"


def run_grouped(denoiser: IdentityDenoiser, work: Sequence[tuple[DenoiseRequest, BatchKey]], *,
                on_step: Callable[[list[int]], StepCallback | None] | None = None,
                on_group: Callable[[BatchKey, list[int], float, float], None] | None = None,
                catch: tuple[type[Exception], ...] = (InstantIDError,)) -> list[Outcome]:
    """Run `work` as one denoiser call per BatchKey (groups in first-seen order), splitting a group that runs out
    of device memory. `on_step(indices)` gives the step callback of the group made of those indices of `work`;
    `on_group(key, indices, started, seconds)` is told when each group ends. An exception of a `catch` type
    raised by a group's call becomes that group's requests' outcome; any other propagates."""
    groups: dict[BatchKey, list[int]] = defaultdict(list)
    for index, (_, key) in enumerate(work):
        groups[key].append(index)
    outcomes: list[Outcome] = [None] * len(work)
    for key, indices in groups.items():
        started = time.perf_counter()

        def run(requests: list[DenoiseRequest], step: StepCallback | None, key: BatchKey = key) -> list[np.ndarray]:
            return denoiser(requests, key, step)

        try:
            results: list[Outcome] = list(run_splitting(
                run, [work[i][0] for i in indices], lambda request, key=key: describe_size(key, request),
                denoiser.device, on_step=on_step(indices) if on_step else None))
        except catch as exc:
            results = [exc] * len(indices)
        for index, result in zip(indices, results, strict=True):
            outcomes[index] = result
        if on_group is not None:
            on_group(key, indices, started, time.perf_counter() - started)
    return outcomes
