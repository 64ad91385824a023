"""Denoiser deployment: collects requests from different callers with `@serve.batch` and runs those that share a
batch key as one IdentityDenoiser batch. Returns uint8 images only.

The batch key (`instantid_core.denoise.BatchKey`) is what requests must share to run in one forward pass:
output width and height, steps, scheduler, LoRA set and the number of identities (each adds an IdentityNet pass and
face tokens per layer). Everything else (prompt, seed, guidance, strengths, number of
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
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from instantid_app.config import AppConfig
from instantid_app.settings import DenoiserSettings
from instantid_app.weights import resolve_app_weights
from instantid_core.config import GenerateParams
from instantid_core.detail import (
    FaceDetailReport,
    crop_box,
    detail_condition,
    detail_params,
    face_side,
    paste_back,
    wants_detail,
)
from instantid_core.loras import lora_set_id

from .errors import JobCancelled
from .jobs.progress import JobProgressRelay, TrackedJob
from .jobs.store import JobStore
from .metrics import DenoiserMetrics, StageMetrics
from .schemas import DenoiseResult, FaceResult, PromptResult

if TYPE_CHECKING:
    from instantid_core.denoise_types import BatchKey, DenoiseRequest

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class _Item:
    request: DenoiseRequest
    key: BatchKey
    enqueued: float
    abandoned: threading.Event = field(default_factory=threading.Event)  # set when the caller goes away
    job_id: str | None = None  # an async job: progress reported and cancel honoured at every step
    job: TrackedJob | None = None  # its in-memory progress and cancel flag (JobProgressRelay)


# Serve's multiplexed cache size is fixed when the class is defined; it only steers routing (which replica holds
# which set): the memory bound is the core's adapter LRU, `pipeline.max_loaded_loras`.
MAX_LORA_SETS_PER_REPLICA = 8
_DEFAULT_SETTINGS = DenoiserSettings()


def _replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (a plain instance in a test or a script)
        return None


def _images_in(items: list[_Item]) -> int:
    return sum(item.request.num_images for item in items)


def _size(item: _Item) -> str:
    from instantid_core.batching import describe_size

    return describe_size(item.key, item.request)


class Denoiser:
    def __init__(self, config: dict[str, Any]) -> None:
        # The model code (torch, diffusers) is imported in the replica, not with this module: Serve's app build
        # (`serve deploy` on the controller, a driver's `serve.run`) imports it only to bind the graph.
        from instantid_core.denoise import IdentityDenoiser

        self.config = AppConfig.model_validate(config)
        self.denoiser = IdentityDenoiser.from_weights(resolve_app_weights(self.config, stage="Denoiser"),
                                                      self.config.pipeline)
        self.replica_id = _replica_id()
        # Jobs' progress and cancel flags cross to Redis off the forward thread (JobProgressRelay).
        self.jobs = JobProgressRelay(JobStore(self.config.jobs.resolved_broker_url(), self.config.jobs.status_ttl_s)) \
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
                # What the batcher itself holds, to prove reconfigure() reached it. Serve's @serve.batch wrapper has
                # public setters but exposes its getters only as _get_* (Ray 2.60): no public API reads them.
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
        from instantid_core.pipeline import denoise_request  # lazily, as in __init__

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
        job = self.jobs.track(job_id) if job_id and self.jobs else None
        item = _Item(request, key, time.perf_counter(), job_id=job_id if job else None, job=job)
        try:
            if request.num_images > self.settings.max_batch_size:
                # More images than a batch holds (Serve's batcher would refuse it): it is a batch of its own.
                (result,) = await self._run_items([item])
            else:
                result = await self._run_batch(item)
        except asyncio.CancelledError:
            # The caller went away (Serve cancels this call when the client disconnects or the ingress gives up):
            # the running batch drops this request's samples at its next step.
            item.abandoned.set()
            raise
        finally:
            if job is not None:
                await self.jobs.untrack(job_id)
        if result is None and item.job_id:
            raise JobCancelled(f"job {item.job_id} was cancelled")
        if isinstance(result, Exception):
            raise result
        images, batch_size, queue_s, denoise_s = result
        timings = {"face": face.seconds, "prompt": prompt.seconds, "queue": queue_s, "denoise": denoise_s}
        cache_hits = {"face": face.cache_hit, "prompt": prompt.cache_hit}
        run = params.resolved(self.config.pipeline.default_scheduler)
        as_run = {"scheduler": run.scheduler.value, "steps": run.steps, "guidance": run.guidance}
        layout = [([float(v) for v in person.face_box], person.keypoints.tolist())
                  for person in face.condition.identities] if params.identities else None
        return DenoiseResult(images, key.width, key.height, batch_size, timings, cache_hits,
                             replica_id=self.replica_id, as_run=as_run, layout=layout)

    async def detail(self, result: DenoiseResult, face: FaceResult, prompt: PromptResult, params: GenerateParams,
                     seed: int, job_id: str | None = None) -> DenoiseResult:
        """face_detail: each image's face crop regenerated at pipeline.face_detail_size (its own seed, through the
        batcher like any request) and pasted back feathered (`instantid_core.detail`); auto runs it for a face
        below pipeline.face_detail_below (FaceAnalysis refused `on` without a face). Crops and pastes run in a
        worker thread."""
        run = wants_detail(params, face.condition, self.config.pipeline.face_detail_below)
        report = FaceDetailReport(mode=params.face_detail, ran=[run] * len(result.images),
                                  face_side=face_side(face.condition),
                                  identity_before=result.identity.scores if result.identity and run else None)
        if not run:
            return dataclasses.replace(result, face_detail=report)
        start = time.perf_counter()
        seeds = result.identity.seeds if result.identity else [(seed + i) % 2**63 for i in range(len(result.images))]
        box, size = crop_box(face.condition), self.config.pipeline.face_detail_size
        detailed = []
        for image, image_seed in zip(result.images, seeds, strict=True):
            condition = await asyncio.to_thread(detail_condition, face.condition, image, box, size)
            crop = await self._generate(dataclasses.replace(face, condition=condition), prompt, detail_params(params),
                                        image_seed, None, None, job_id)
            detailed.append(await asyncio.to_thread(paste_back, image, crop.images[0], face.condition, box))
        timings = {**result.timings, "face_detail": time.perf_counter() - start}
        return dataclasses.replace(result, images=np.stack(detailed), face_detail=report, timings=timings)

    @serve.multiplexed(max_num_models_per_replica=MAX_LORA_SETS_PER_REPLICA)
    async def load_lora_set(self, model_id: str) -> tuple[str, ...]:
        """Load the adapters of one LoRA set (`a+b+c`); Serve keeps the most recently used sets per replica and
        routes requests for a set to replicas that hold it. The adapters themselves live in the core's LRU
        (`pipeline.max_loaded_loras`), which the batch job and the CLI share."""
        names = tuple(model_id.split("+"))
        await asyncio.to_thread(self.denoiser.preload_loras, list(names))
        return names

    # The batcher starts from DenoiserSettings' defaults; reconfigure() retunes it to the replica's user_config.
    @serve.batch(max_batch_size=_DEFAULT_SETTINGS.max_batch_size,
                 batch_wait_timeout_s=_DEFAULT_SETTINGS.batch_wait_timeout_s, batch_size_fn=_images_in)
    async def _run_batch(self, items: list[_Item]) -> list[Any]:
        return await self._run_items(items)

    async def _run_items(self, items: list[_Item]) -> list[Any]:
        """One IdentityDenoiser call per BatchKey among `items` (split when out of memory): per item, (images, batch
        images, queue s, denoise s), the typed error that item gets, or None when it left its batch."""
        from instantid_core.batching import run_grouped  # lazily, as in __init__

        started_at: dict[int, tuple[float, float, int]] = {}  # item index -> (group start, seconds, group images)

        def still_wanted(indices: list[int]):
            wanted = [True] * len(indices)

            def on_step(step: int, steps: int) -> list[bool]:
                # In memory only: the relay carries job progress and cancel flags to and from Redis.
                for n, i in enumerate(indices):
                    item = items[i]
                    if wanted[n] and (item.abandoned.is_set() or (
                            item.job is not None and not self.jobs.report(item.job_id, step, steps))):
                        wanted[n] = False
                return wanted

            return on_step

        def ended(key: BatchKey, indices: list[int], started: float, seconds: float) -> None:
            group = [items[i] for i in indices]
            images = _images_in(group)
            started_at.update({i: (started, seconds, images) for i in indices})
            self.gpu_metrics.batch(images, [started - item.enqueued for item in group], seconds, key.steps)
            if dropped := sum(item.abandoned.is_set() or (item.job is not None and item.job.cancelled.is_set())
                              for item in group):
                logger.info("%d of %d requests left their batch (%s)", dropped, len(group), _size(group[0]))

        # The forward pass blocks; a thread keeps the replica's event loop (health, new requests, the relay) alive.
        outcomes = await asyncio.to_thread(run_grouped, self.denoiser, [(item.request, item.key) for item in items],
                                           on_step=still_wanted, on_group=ended)
        results: list[Any] = []
        for i, (item, outcome) in enumerate(zip(items, outcomes, strict=True)):
            if outcome is None or isinstance(outcome, Exception):
                results.append(outcome)
            else:
                started, seconds, images = started_at[i]
                results.append((np.ascontiguousarray(outcome), images, started - item.enqueued, seconds))
        return results

    async def check_health(self) -> None:
        """A tiny forward pass on the replica's device (Serve restarts the replica when it raises); and the GPU
        memory gauges again: Ray's exporter drops a gauge two report intervals (20 s) after its last value, so an
        idle Denoiser's would vanish from the dashboard between batches (Serve checks health every 10 s)."""
        await asyncio.to_thread(self.denoiser.probe)
        self.gpu_metrics.record_gpu_memory()
