"""Denoiser deployment: collects requests from different callers with `@serve.batch` and runs those that share a
batch key as one IdentityDenoiser batch. Returns uint8 images only.

The batch key (`instantid_core.denoise.BatchKey`) is what requests must share to run in one forward pass:
output width and height, steps, scheduler and LoRA set. Everything else (prompt, seed, guidance, strengths, number of
images, face region) is per sample. A request without a size gets the SDXL bucket nearest its photo's aspect
ratio (`PipelineSettings.size_buckets`), so requests from different photos can share a key.

Under GPU pressure: a batch that runs out of device memory is split and its halves retried, down to one request;
one that does not fit alone answers `gpu_memory` (503, Retry-After), the others of its batch still get images.
A request whose caller went away (client disconnect, or the ingress's 504) leaves its batch at the next
denoising step, through the denoiser's `on_step` hook; when none is left the forward pass stops.

LoRA sets are Serve multiplexed models: the ingress sends a request's set as its `multiplexed_model_id`, Serve
routes it to a replica that already holds that set, and `load_lora_set` (under `@serve.multiplexed`) loads the
adapters on a replica's first use of the set.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve

from instantid_app.config import AppConfig, DenoiserSettings
from instantid_app.weights import resolve_app_weights
from instantid_core.config import GenerateParams
from instantid_core.denoise import BatchKey, DenoiseRequest, IdentityDenoiser
from instantid_core.errors import InstantIDError
from instantid_core.loras import lora_set_id
from instantid_core.memory import run_splitting
from instantid_core.pipeline import denoise_request

from .errors import JobCancelled
from .jobs.store import JobStore
from .metrics import DenoiserMetrics, StageMetrics
from .schemas import DenoiseResult, FaceResult, PromptResult

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class _Item:
    request: DenoiseRequest
    key: BatchKey
    enqueued: float
    abandoned: threading.Event = field(default_factory=threading.Event)  # set when the caller goes away
    job_id: str | None = None  # an async job: progress reported and cancel honoured at every step


# Serve's multiplexed cache size is fixed when the class is defined; it only steers routing (which replica holds
# which set): the memory bound is the core's adapter LRU, `pipeline.max_loaded_loras`.
MAX_LORA_SETS_PER_REPLICA = 8


def _replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (a plain instance in a test or a script)
        return None


def _images_in(items: list[_Item]) -> int:
    return sum(item.request.num_images for item in items)


def _size(item: _Item) -> str:
    return f"{item.key.width}x{item.key.height} with {item.request.num_images} image(s)"


class Denoiser:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        self.denoiser = IdentityDenoiser.from_weights(resolve_app_weights(self.config), self.config.pipeline)
        self.replica_id = _replica_id()
        self.jobs = JobStore(self.config.jobs.resolved_broker_url(), self.config.jobs.status_ttl_s) \
            if self.config.jobs else None
        self.metrics, self.gpu_metrics = StageMetrics(), DenoiserMetrics(self.config.pipeline.device)
        self.reconfigure({})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live settings (`user_config`, applied by Serve without restarting the replica): Serve's batcher is
        retuned in place; a batch already running keeps the size it started with."""
        self.settings = DenoiserSettings.model_validate(user_config)
        self._run_batch.set_max_batch_size(self.settings.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    def live_settings(self) -> dict[str, Any]:
        """What this replica runs with now, and which process it is (for operators and the reconfigure test)."""
        import os

        return {"settings": self.settings.model_dump(), "pid": os.getpid(), "replica": self.replica_id,
                "max_batch_size": self._run_batch._get_max_batch_size(),
                "batch_wait_timeout_s": self._run_batch._get_batch_wait_timeout_s()}

    async def generate(self, face: FaceResult, prompt: PromptResult, params: GenerateParams, seed: int,
                       control_images: list[bytes | None] | None = None,
                       control_fallback: bytes | None = None, job_id: str | None = None) -> DenoiseResult:
        """`control_images`: per `params.controls` entry its own image bytes or None; `control_fallback`: the pose
        photo, else the face photo (the canny/depth input when a control brings no image). `job_id`: an async
        job's, whose progress goes to its record after every step and whose cancel stops it at the next one."""
        with self.metrics.track():
            return await self._generate(face, prompt, params, seed, control_images, control_fallback, job_id)

    async def _generate(self, face: FaceResult, prompt: PromptResult, params: GenerateParams, seed: int,
                        control_images: list[bytes | None] | None,
                        control_fallback: bytes | None, job_id: str | None) -> DenoiseResult:
        self.denoiser.loras.check(params.loras)  # 400 naming an unknown LoRA before anything is loaded
        params = self.denoiser.loras.with_presets(params)  # a few-step LoRA's scheduler/steps/guidance if unset
        controls = ()
        if params.controls:
            size = (face.condition.width, face.condition.height)
            controls = await asyncio.to_thread(self.denoiser.controls.prepare, params.controls,
                                               control_images or [None] * len(params.controls), control_fallback, size)
        request, key = denoise_request(face.condition, prompt.embeds, params, seed,
                                       self.config.pipeline.default_scheduler, controls)
        self.denoiser.check_inputs([request], key)  # a bad request fails alone, never its batch
        if key.loras:
            # Also what tells Serve this replica holds the set; a file that is no LoRA raises InvalidLora here.
            await self.load_lora_set(lora_set_id(key.loras))
        if job_id and self.jobs and await asyncio.to_thread(self.jobs.cancel_requested, job_id):
            raise JobCancelled(f"job {job_id} was cancelled")
        item = _Item(request, key, time.perf_counter(), job_id=job_id if self.jobs else None)
        try:
            if request.num_images > self.settings.max_batch_size:
                # More images than a batch holds (Serve's batcher would refuse it): it is a batch of its own.
                (result,) = await self._run_group([item])
            else:
                result = await self._run_batch(item)
        except asyncio.CancelledError:
            # The caller went away (Serve cancels this call when the client disconnects or the ingress gives up):
            # the running batch drops this request's samples at its next step.
            item.abandoned.set()
            raise
        if result is None and item.job_id:
            raise JobCancelled(f"job {item.job_id} was cancelled")
        if isinstance(result, Exception):
            raise result
        images, batch_size, queue_s, denoise_s = result
        timings = {"face": face.seconds, "prompt": prompt.seconds, "queue": queue_s, "denoise": denoise_s}
        cache_hits = {"face": face.cache_hit, "prompt": prompt.cache_hit}
        run = params.resolved(self.config.pipeline.default_scheduler)
        as_run = {"scheduler": run.scheduler.value, "steps": run.steps, "guidance": run.guidance}
        return DenoiseResult(images, key.width, key.height, batch_size, timings, cache_hits,
                             replica_id=self.replica_id, as_run=as_run)

    @serve.multiplexed(max_num_models_per_replica=MAX_LORA_SETS_PER_REPLICA)
    async def load_lora_set(self, model_id: str) -> tuple[str, ...]:
        """Load the adapters of one LoRA set (`a+b+c`); Serve keeps the most recently used sets per replica and
        routes requests for a set to replicas that hold it. The adapters themselves live in the core's LRU
        (`pipeline.max_loaded_loras`), which the batch job and the CLI share."""
        names = tuple(model_id.split("+"))
        await asyncio.to_thread(self.denoiser.preload_loras, list(names))
        return names

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
        """IdentityDenoiser calls for items that share a BatchKey (one, or more when out of memory splits it): per
        item, (images, batch images, queue s, denoise s) or the typed error that item gets."""
        started = time.perf_counter()
        key = items[0].key
        by_request = {id(item.request): item for item in items}

        def run(requests: list[DenoiseRequest], on_step) -> list[Any]:
            return self.denoiser(requests, key, on_step)

        wanted = [True] * len(items)

        def still_wanted(step: int, steps: int) -> list[bool]:
            for i, item in enumerate(items):
                if wanted[i] and item.abandoned.is_set():
                    wanted[i] = False
                elif wanted[i] and item.job_id and self.jobs is not None:  # progress; False once cancelled
                    wanted[i] = self.jobs.report_step(item.job_id, step, steps)
            return wanted

        def attempt() -> list[Any]:
            return run_splitting(run, [item.request for item in items],
                                 lambda request: _size(by_request[id(request)]), self.denoiser.device,
                                 on_step=still_wanted)

        try:
            # The forward pass blocks; a thread keeps the replica's event loop (health, new requests) alive.
            outputs = await asyncio.to_thread(attempt)
        except InstantIDError as exc:
            outputs = [exc] * len(items)
        elapsed = time.perf_counter() - started
        if any(output is None for output in outputs):
            logger.info("%d of %d requests left their batch (%s): their callers went away",
                        sum(output is None for output in outputs), len(items), _size(items[0]))
        batch_images = sum(item.request.num_images for item in items)
        self.gpu_metrics.batch(batch_images, [started - item.enqueued for item in items], elapsed, key.steps)
        return [output if output is None or isinstance(output, Exception) else (
            np.ascontiguousarray(output), batch_images, started - item.enqueued, elapsed)
            for item, output in zip(items, outputs, strict=True)]

    async def check_health(self) -> None:
        """A tiny forward pass on the replica's device (Serve restarts the replica when it raises)."""
        await asyncio.to_thread(self.denoiser.probe)
