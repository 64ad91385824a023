"""The jobs API behind `POST /v1/jobs`, `GET`/`DELETE /v1/jobs/{id}` and the handle's `submit_job`, `job_status`,
`cancel_job`: records in the JobStore, the job itself on Ray Serve's task queue (its Celery adapter, as producer).

What goes on the queue is the request (face photos included) and the webhook URL: the broker holds it until a
consumer acknowledges the job, which it does when the job has ended, so no photo outlives its job there; the job
record (status, progress, result URIs) holds no input and expires `status_ttl_s` after the job's last change.

Redis faults answer 503 `jobs_unavailable` (with Retry-After) within `jobs.redis_timeout_s`: every Redis call runs
in a worker thread under that bound, so the Ingress's event loop, and /v1/generate with it, never waits on Redis.
Those threads are the jobs API's own pool, not the event loop's default executor: a call stuck on a frozen Redis
(Celery's producer has no bound of its own) must not hold a thread /v1/generate needs for its file and S3 work.
A full backlog (`jobs.max_queued` jobs waiting) answers 429 `jobs_backlog_full`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from kombu.exceptions import OperationalError
from ray.serve.task_consumer import instantiate_adapter_from_config

from instantid_app.config import AppConfig
from instantid_core.errors import InvalidParameter
from instantid_core.request_rules import draw_seed

from ..errors import JobNotFound, JobsBacklogFull, JobsDisabled, JobsUnavailable
from ..schemas import GenerateResponse, JobRequest, JobStatus
from .store import REDIS_ERRORS, JobStore
from .task_queue import TASK_NAME, task_processor_config
from .webhooks import check_webhook_url

logger = logging.getLogger("ray.serve")
T = TypeVar("T")
# What Celery's producer raises when it cannot publish (kombu's error once its retries are spent), besides Redis's.
BROKER_ERRORS = (*REDIS_ERRORS, OperationalError)


def check_job_id(job_id: str) -> None:
    if not (job_id.isascii() and job_id.isalnum()) or len(job_id) > 64:
        raise InvalidParameter("job_id must be alphanumeric, at most 64 characters", field="job_id")


class JobsAPI:
    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.enabled = config.jobs is not None
        if config.jobs is not None:
            self.timeout_s = config.jobs.redis_timeout_s
            self.store = JobStore(config.jobs.resolved_broker_url(), config.jobs.status_ttl_s, self.timeout_s)
            # Connects lazily (on the first enqueue): an Ingress starts, and serves /v1/generate, with Redis down.
            self.queue = instantiate_adapter_from_config(task_processor_config(config.jobs))
            self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="jobs-redis")

    async def _redis(self, call: Callable[[], T], timeout_s: float | None = None) -> T:
        """`call` in a worker thread (the store and Celery's producer are synchronous), bounded in time; a broker
        that fails or does not answer in time is a JobsUnavailable (503), never a 500 or a hung request. A thread
        left running past the bound finishes (or fails) on its own; its result is not used."""
        try:
            work = asyncio.get_running_loop().run_in_executor(self.pool, call)
            return await asyncio.wait_for(work, timeout_s or self.timeout_s)
        except (TimeoutError, *BROKER_ERRORS) as exc:
            logger.warning("jobs: Redis unavailable (%s: %s)", type(exc).__name__, exc)
            raise JobsUnavailable("the job queue (Redis) is unavailable; retry after Retry-After "
                                  "(synchronous /v1/generate is not affected)") from None

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise JobsDisabled("async jobs are not configured on this server (AppConfig.jobs); use /v1/generate")

    async def submit(self, request: JobRequest, inline: bool = False) -> JobStatus:
        self._check_enabled()
        if request.webhook_url is not None:
            check_webhook_url(request.webhook_url, self.config.allowed_webhook_hosts)
        generate = request.generate_request()
        if generate.seed is None:  # fixed now, so a redelivered job makes the same images
            generate = generate.model_copy(update={"seed": draw_seed()})
        job_id = uuid.uuid4().hex
        now = time.time()
        status = JobStatus(job_id=job_id, status="queued", created_at=now, updated_at=now)
        jobs = self.config.jobs
        if not await self._redis(lambda: self.store.create(status, jobs.max_queued)):
            raise JobsBacklogFull(f"{jobs.max_queued} jobs are already queued (jobs.max_queued); retry later",
                                  retry_after_s=jobs.backlog_retry_after_s)
        payload = {"request": generate.model_dump(mode="json"), "inline": inline, "webhook_url": request.webhook_url}
        try:
            # Celery's producer retries a lost connection a few times (under a second): twice the bound covers it.
            await self._redis(lambda: self.queue.enqueue_task_sync(TASK_NAME, args=[job_id, payload],
                                                                   task_id=job_id), 2 * self.timeout_s)
        except JobsUnavailable:
            # Not queued (or not known to be): no record may say `queued` for ever. Were the message published
            # after all, its consumer finds no record and skips it (run_job's "expired").
            try:
                await self._redis(lambda: self.store.delete(job_id))
            except JobsUnavailable:
                pass  # Redis is down: the record expires with status_ttl_s
            raise
        return status

    async def complete(self, job_id: str, attempt: int, result: GenerateResponse) -> None:
        """Record a job's run as done (see JobStore.complete). With Redis away, the consumer records it when the
        run's answer reaches it, so this only logs."""
        try:
            await self._redis(lambda: self.store.complete(job_id, attempt, result))
        except JobsUnavailable:
            logger.warning("job %s: done, but not recorded by the Ingress (Redis unavailable)", job_id)

    @contextlib.asynccontextmanager
    async def lease_held(self, job_id: str, attempt: int) -> AsyncIterator[None]:
        """While a job's run is in this process, renew its lease as its consumer does (fenced by `attempt`): a
        consumer that died leaves the run here, and the job's redelivery then waits for it instead of running the
        job a second time beside it. A Redis error only skips a renewal; it never fails the run."""
        period_s = self.config.jobs.lease_s / 3

        async def renew() -> None:
            while True:
                await asyncio.sleep(period_s)
                try:
                    await self._redis(lambda: self.store.renew_lease(job_id, attempt))
                except JobsUnavailable:
                    pass  # logged by _redis; the next period tries again

        renewer = asyncio.create_task(renew())
        try:
            yield
        finally:
            renewer.cancel()

    async def status(self, job_id: str) -> JobStatus:
        return await self._existing(job_id, lambda: self.store.get(job_id))

    async def cancel(self, job_id: str) -> JobStatus:
        return await self._existing(job_id, lambda: self.store.request_cancel(job_id))

    async def _existing(self, job_id: str, read: Callable[[], JobStatus | None]) -> JobStatus:
        """The job record `read` returns (in a thread: the store is synchronous), or JobNotFound naming job_id."""
        check_job_id(job_id)
        status = await self._redis(read) if self.enabled else None
        if status is None:
            raise JobNotFound(f"no job {job_id} (unknown, or its record expired)", field="job_id")
        return status
