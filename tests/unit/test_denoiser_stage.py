"""The Denoiser deployment's batch path in this process, on the tiny preset: `_run_items` is what Serve's batcher
calls with the requests it collected (the batcher itself needs a replica, so tests/serve covers it). A job's
progress reaches Redis off the forward thread, Redis stopping mid-batch fails no request of it, a cancel in Redis
stops the job; out of device memory splits a batch (the fault injected by patching the forward pass, as a full GPU
raises it) and only the request too large alone gets `gpu_memory`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deployments.denoiser import Denoiser, _Item
from deployments.jobs.store import JobStore
from deployments.schemas import FaceResult, JobStatus, PromptResult
from instantid_core.config import GenerateParams
from instantid_core.errors import GPUMemoryError
from instantid_core.handoff import FaceCondition
from instantid_core.pipeline import denoise_request
from testkit.redis import start_redis, stop_redis

SIZE = 64


def face(seed: int) -> FaceResult:
    rng = np.random.default_rng(seed)
    condition = FaceCondition(embedding=rng.standard_normal(512).astype(np.float32),
                              kps_image=np.zeros((SIZE, SIZE, 3), np.uint8), face_box=(8.0, 8.0, 40.0, 40.0),
                              width=SIZE, height=SIZE, det_score=0.9)
    return FaceResult(condition, 0.0, False)


def make_denoiser(tiny_dir: Path, broker_url: str | None, **settings) -> Denoiser:
    jobs = {"jobs": {"broker_url": broker_url, "broker_url_env": None}} if broker_url else {}
    denoiser = Denoiser({"weights": {"preset": "tiny", "preset_dir": str(tiny_dir)}, **jobs})
    denoiser.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.5, **settings})
    if denoiser.jobs is not None:
        denoiser.jobs.interval_s = 0.02  # relay rounds well inside the tiny preset's few-ms steps
    return denoiser


def item(denoiser: Denoiser, prompt: PromptResult, params: GenerateParams, seed: int,
         job_id: str | None = None) -> _Item:
    """One request as Denoiser.generate enqueues it (call on the event loop: a job starts the relay)."""
    request, key = denoise_request(face(seed).condition, prompt.embeds, params, seed, "euler")
    job = denoiser.jobs.track(job_id) if job_id else None
    return _Item(request, key, time.perf_counter(), job_id=job_id, job=job)


@pytest.fixture(scope="module")
def prompt(prompt_encoder) -> PromptResult:
    return PromptResult(prompt_encoder.encode("a portrait"), 0.0, False)


def test_redis_stopped_mid_batch_fails_no_request_of_it_and_progress_flowed_while_it_was_up(
        tiny_root: Path, prompt: PromptResult, tmp_path: Path) -> None:
    process, url = start_redis(tmp_path)
    stopped = False
    try:
        store = JobStore(url, 60)
        store.create(JobStatus(job_id="job-1", status="running"))
        denoiser = make_denoiser(tiny_root, url)
        params = GenerateParams(prompt="a portrait", steps=100, width=SIZE, height=SIZE)

        async def scenario() -> tuple[list, list[str]]:
            batch = asyncio.create_task(denoiser._run_items(
                [item(denoiser, prompt, params, 1, "job-1"), item(denoiser, prompt, params, 2)]))
            seen = []
            while not batch.done():  # progress reaches the record while the batch runs, then Redis goes away
                record = await asyncio.to_thread(store.get, "job-1")
                if record is not None and record.progress is not None:
                    seen.append(f"{record.progress.step}/{record.progress.steps}")
                    break
                await asyncio.sleep(0.05)
            stop_redis(process)
            results = await batch
            await denoiser.jobs.untrack("job-1")  # as generate() does when the run ends: Redis is gone by now
            return results, seen

        (job_result, sync_result), seen = asyncio.run(scenario())
        stopped = True
    finally:
        if not stopped:
            stop_redis(process)
    assert seen and seen[0].endswith("/100"), seen  # the relay wrote progress before Redis stopped
    for result in (job_result, sync_result):  # (images, images in the batch, queue s, denoise s)
        assert not isinstance(result, BaseException) and result is not None, result
        assert result[0].shape == (1, SIZE, SIZE, 3) and result[1] == 2  # they shared the batch Redis left
    assert denoiser.jobs.redis_errors >= 1  # the relay met the dead Redis, logged it and went on


def test_a_cancel_in_redis_stops_the_job_at_a_later_step_and_its_batch_mate_finishes(
        tiny_root: Path, prompt: PromptResult, tmp_path: Path) -> None:
    process, url = start_redis(tmp_path)
    try:
        store = JobStore(url, 60)
        store.create(JobStatus(job_id="job-2", status="running"))
        denoiser = make_denoiser(tiny_root, url)
        params = GenerateParams(prompt="a portrait", steps=60, width=SIZE, height=SIZE)

        async def scenario() -> list:
            batch = asyncio.create_task(denoiser._run_items(
                [item(denoiser, prompt, params, 1, "job-2"), item(denoiser, prompt, params, 2)]))
            while (record := await asyncio.to_thread(store.get, "job-2")) is None or record.progress is None:
                assert not batch.done(), batch.result()  # it ended (or failed) before reporting any progress
                await asyncio.sleep(0.02)
            await asyncio.to_thread(store.request_cancel, "job-2")
            return await batch

        job_result, sync_result = asyncio.run(scenario())
    finally:
        stop_redis(process)
    assert job_result is None  # it left its batch (generate() answers JobCancelled for that)
    assert sync_result[0].shape == (1, SIZE, SIZE, 3)


def test_out_of_memory_splits_the_batch_and_only_the_request_too_large_alone_fails(
        tiny_root: Path, prompt: PromptResult, monkeypatch: pytest.MonkeyPatch) -> None:
    denoiser = make_denoiser(tiny_root, None)
    real_step, batches = denoiser.denoiser._step, []

    def step_that_fits_one_sample(model_input, t, cond, use_cfg):  # the fault a full GPU raises, at the forward
        samples = model_input.shape[0] // (2 if use_cfg else 1)
        batches.append(samples)
        if samples > 1:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {samples} samples)")
        return real_step(model_input, t, cond, use_cfg)

    monkeypatch.setattr(denoiser.denoiser, "_step", step_that_fits_one_sample)
    params = GenerateParams(prompt="a portrait", steps=2, width=SIZE, height=SIZE)

    two = params.model_copy(update={"num_images": 2})

    async def scenario() -> tuple[list, object]:
        # One event loop for the whole test: Serve's batcher belongs to the loop it first ran on.
        results = await denoiser._run_items([*(item(denoiser, prompt, params, i) for i in range(3)),
                                             item(denoiser, prompt, two, 9)])
        monkeypatch.undo()  # afterwards the same replica serves a two-image request as before
        return results, (await denoiser._run_items([item(denoiser, prompt, two, 9)]))[0]

    results, again = asyncio.run(scenario())
    assert batches[0] == 5, batches  # all four requests met in one batch of five samples, which then split
    for result in results[:3]:
        assert not isinstance(result, BaseException), result
        assert result[0].shape == (1, SIZE, SIZE, 3)
    assert isinstance(results[3], GPUMemoryError) and "64x64 with 2 image(s)" in results[3].message
    assert again[0].shape == (2, SIZE, SIZE, 3)
