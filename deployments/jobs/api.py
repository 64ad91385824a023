"""The jobs API behind `POST /v1/jobs`, `GET`/`DELETE /v1/jobs/{id}` and the handle's `submit_job`, `job_status`,
`cancel_job`: records in the JobStore, the job itself on Ray Serve's task queue (its Celery adapter, as producer).

What goes on the queue is the request (face photos included) and the webhook URL: the broker holds it until a
consumer acknowledges the job, which it does when the job has ended, so no photo outlives its job there; the job
record (status, progress, result URIs) holds no input and expires `status_ttl_s` after the job's last change.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from ray.serve.task_consumer import instantiate_adapter_from_config

from instantid_app.config import AppConfig
from instantid_core.errors import InvalidParameter
from instantid_core.pipeline import draw_seed

from ..errors import JobNotFound, JobsDisabled
from ..schemas import JobRequest, JobStatus
from .store import JobStore
from .task_queue import TASK_NAME, task_processor_config
from .webhooks import check_webhook_url


def check_job_id(job_id: str) -> None:
    if not (job_id.isascii() and job_id.isalnum()) or len(job_id) > 64:
        raise InvalidParameter("job_id must be alphanumeric, at most 64 characters", field="job_id")


class JobsAPI:
    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.enabled = config.jobs is not None
        if config.jobs is not None:
            self.store = JobStore(config.jobs.resolved_broker_url(), config.jobs.status_ttl_s)
            self.queue = instantiate_adapter_from_config(task_processor_config(config.jobs))

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
        await asyncio.to_thread(self.store.create, status)
        payload = {"request": generate.model_dump(mode="json"), "inline": inline, "webhook_url": request.webhook_url}
        # The Celery adapter is synchronous: a thread keeps the replica's event loop free.
        await asyncio.to_thread(self.queue.enqueue_task_sync, TASK_NAME, args=[job_id, payload], task_id=job_id)
        return status

    async def status(self, job_id: str) -> JobStatus:
        return await self._existing(job_id, lambda: self.store.get(job_id))

    async def cancel(self, job_id: str) -> JobStatus:
        return await self._existing(job_id, lambda: self.store.request_cancel(job_id))

    async def _existing(self, job_id: str, read: Callable[[], JobStatus | None]) -> JobStatus:
        """The job record `read` returns (in a thread: the store is synchronous), or JobNotFound naming job_id."""
        check_job_id(job_id)
        status = await asyncio.to_thread(read) if self.enabled else None
        if status is None:
            raise JobNotFound(f"no job {job_id} (unknown, or its record expired)", field="job_id")
        return status
