"""JobProgressRelay: the Denoiser's per-step progress and cancel flags, in memory on the forward thread and carried
to and from Redis by an asyncio task off it.

The forward thread only writes a step count into a dict and reads a `threading.Event`; the relay task flushes the
counts to the job records and reads their cancel flags every `interval_s`, with the Redis calls in a worker thread.
So the GPU thread never waits on Redis, and a Redis error (logged, counted, retried next round) never fails or
slows a batch, synchronous requests and jobs alike: a job then shows stale progress, or its cancel takes effect a
round later.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field

import redis

from .store import JobStore

logger = logging.getLogger("ray.serve")


@dataclass
class TrackedJob:
    cancelled: threading.Event = field(default_factory=threading.Event)
    step: tuple[int, int] | None = None  # (steps done, steps) last reported by the forward thread
    flushed: tuple[int, int] | None = None  # what the job record holds


class JobProgressRelay:
    def __init__(self, store: JobStore, interval_s: float = 0.5) -> None:
        self.store, self.interval_s = store, interval_s
        self.jobs: dict[str, TrackedJob] = {}
        self.redis_errors = 0
        self._task: asyncio.Task | None = None

    def track(self, job_id: str) -> TrackedJob:
        """Start relaying a job (on the replica's event loop); the relay task starts with the first job."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self.jobs.setdefault(job_id, TrackedJob())

    def report(self, job_id: str, step: int, steps: int) -> bool:
        """On the forward thread: record the step; returns whether the job is still wanted. No I/O."""
        job = self.jobs.get(job_id)
        if job is None:
            return True
        job.step = (step, steps)
        return not job.cancelled.is_set()

    async def untrack(self, job_id: str) -> None:
        """The job's run ended: its last step is flushed (best effort), then it is forgotten."""
        job = self.jobs.pop(job_id, None)
        if job is not None and job.step != job.flushed:
            await self._exchange({job_id: job})

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self.jobs:
                await self._exchange(dict(self.jobs))

    async def _exchange(self, jobs: dict[str, TrackedJob]) -> None:
        try:
            await asyncio.to_thread(self._exchange_blocking, jobs)
        except (redis.RedisError, OSError) as exc:
            self.redis_errors += 1
            logger.warning("job progress not relayed (Redis: %s); retrying in %.1f s", exc, self.interval_s)

    def _exchange_blocking(self, jobs: dict[str, TrackedJob]) -> None:
        for job_id, job in jobs.items():
            step = job.step
            if step is not None and step != job.flushed:
                wanted = self.store.report_step(job_id, *step)
                job.flushed = step
            else:
                wanted = not self.store.cancel_requested(job_id)
            if not wanted:
                job.cancelled.set()
