"""Denoiser deployment: collects requests from different callers with `@serve.batch` and runs those that share
size, steps and scheduler as one IdentityDenoiser batch. Returns uint8 images only."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from instantid_app.config import AppConfig
from instantid_app.weights import resolve_app_weights
from instantid_core.config import GenerateParams
from instantid_core.denoise import BatchKey, DenoiseRequest, IdentityDenoiser
from instantid_core.errors import InstantIDError
from instantid_core.pipeline import denoise_request

from .schemas import DenoiseResult, FaceResult, PromptResult


@dataclass(frozen=True)
class _Item:
    request: DenoiseRequest
    key: BatchKey
    enqueued: float


def _images_in(items: list[_Item]) -> int:
    return sum(item.request.num_images for item in items)


class Denoiser:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        self.denoiser = IdentityDenoiser.from_weights(resolve_app_weights(self.config), self.config.pipeline)
        self._run_batch.set_max_batch_size(self.config.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    async def generate(self, face: FaceResult, prompt: PromptResult, params: GenerateParams,
                       seed: int) -> DenoiseResult:
        request, key = denoise_request(face.condition, prompt.embeds, params, seed,
                                       self.config.pipeline.default_scheduler)
        self.denoiser.check_inputs([request], key)  # a bad request fails alone, never its batch
        item = _Item(request, key, time.perf_counter())
        if request.num_images > self.config.max_batch_size:
            # More images than a batch holds (Serve's batcher would refuse it): it is a batch of its own.
            (result,) = await self._run_group([item])
        else:
            result = await self._run_batch(item)
        if isinstance(result, Exception):
            raise result
        images, batch_size, queue_s, denoise_s = result
        timings = {"face": face.seconds, "prompt": prompt.seconds, "queue": queue_s, "denoise": denoise_s}
        cache_hits = {"face": face.cache_hit, "prompt": prompt.cache_hit}
        return DenoiseResult(images, key.width, key.height, batch_size, timings, cache_hits)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, batch_size_fn=_images_in)
    async def _run_batch(self, items: list[_Item]) -> list[Any]:
        results: list[Any] = [None] * len(items)
        groups: dict[BatchKey, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            groups[item.key].append(index)
        for indices in groups.values():
            for i, result in zip(indices, await self._run_group([items[i] for i in indices]), strict=True):
                results[i] = result
        return results

    async def _run_group(self, items: list[_Item]) -> list[Any]:
        """One IdentityDenoiser call for items that share a BatchKey: per item, (images, batch images, queue s,
        denoise s) or the typed error that item gets."""
        started = time.perf_counter()
        requests = [item.request for item in items]
        try:
            # The forward pass blocks; a thread keeps the replica's event loop (health, new requests) alive.
            outputs = await asyncio.to_thread(self.denoiser, requests, items[0].key)
        except InstantIDError as exc:
            outputs = [exc] * len(items)
        elapsed = time.perf_counter() - started
        batch_images = sum(request.num_images for request in requests)
        return [output if isinstance(output, Exception) else (
            np.ascontiguousarray(output), batch_images, started - item.enqueued, elapsed)
            for item, output in zip(items, outputs, strict=True)]

    async def check_health(self) -> None:
        """A tiny forward pass on the replica's device (Serve restarts the replica when it raises)."""
        await asyncio.to_thread(self.denoiser.probe)
