"""JobConsumer: a `@task_consumer` deployment (Ray Serve's asynchronous inference) that runs queued jobs.

Each replica runs a Celery worker (threads; as many as the deployment's max_ongoing_requests) on the job queue.
A job runs through the Ingress's own `generate` (the `/v1/generate` path: same stages, same checks) with the job
id as request id and the seed fixed at submit time, so a redelivered job rewrites the same output keys. Delivery
is at least once: the broker acknowledges a job only when its handler returns, and hands a job whose consumer
died to another one after the visibility timeout (`jobs.redelivery_bound_s` states the bound). The job record's
lease decides who runs it: a delivery that finds the job running under a fresh lease waits, and takes it over
only once that lease goes stale. The consumer renews the lease while it waits on the Ingress, and the Ingress
renews it while the run is in its hands (JobsAPI.lease_held), so a consumer that dies mid-run leaves a run whose
redelivery waits for it rather than running it a second time beside it. Outputs are written once: the Ingress
marks the job done as soon as its run writes them (fenced by the attempt number), so a consumer that dies after
that leaves a finished job, and its redelivery only sends the webhook, under a claim that keeps a second delivery
from calling it again.

A graceful stop (scale-down, redeploy, node drain) waits for the replica's running jobs (`__del__`, within the
deployment's graceful_shutdown_timeout_s, which must reach `jobs.run_timeout_s`): a stop never abandons a job
to the visibility timeout.

Each replica also reports the job backlog (queued, running, oldest queued age) as gauges every
`jobs.queue_poll_interval_s`, from the job records' state index, off the Celery threads.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ray import serve
from ray.serve.task_consumer import task_consumer, task_handler

from instantid_app.config import AppConfig
from instantid_core.errors import InstantIDError

from ..errors import JobCancelled, http_status
from ..metrics import JobsMetrics
from ..schemas import ErrorDetail, GenerateRequest, JobStatus
from . import webhooks
from .store import REDIS_ERRORS, TERMINAL, Change, JobStore
from .task_queue import TASK_NAME, task_processor_config

logger = logging.getLogger("ray.serve")
INGRESS_DEPLOYMENT = "Ingress"


class RetryJob(Exception):
    """Raised out of the handler for a transient failure: Celery delivers the job again after a backoff."""


class JobConsumer:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        assert self.config.jobs is not None  # build_app adds this deployment only with jobs configured
        self.jobs = self.config.jobs
        self.store = JobStore(self.jobs.resolved_broker_url(), self.jobs.status_ttl_s, self.jobs.redis_timeout_s)
        secret = self.jobs.webhook_secret()
        self.secret = webhooks.signing_key(secret) if secret else None
        # Looked up, not bound: the Ingress is the application's root and already binds this deployment.
        self.ingress = serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name=serve.get_replica_context().app_name)
        self.metrics = JobsMetrics()
        self.backlog_errors = 0
        self.running = 0  # jobs this replica runs now (the graceful stop waits for them)
        self.idle = threading.Condition()
        threading.Thread(target=self._report_backlog, name="jobs-backlog", daemon=True).start()

    def _report_backlog(self) -> None:
        """Refresh the backlog gauges for as long as the replica lives; a Redis error keeps the last figures (the
        broker's own alert fires on Redis itself) and is logged once per outage."""
        while True:
            try:
                backlog = self.store.backlog()
            except REDIS_ERRORS as exc:
                if not self.backlog_errors:
                    logger.warning("job backlog gauges not refreshed (Redis: %s); retrying", exc)
                self.backlog_errors += 1
            else:
                self.backlog_errors = 0
                self.metrics.backlog(backlog.queued, backlog.running, backlog.oldest_queued_age_s)
            time.sleep(self.jobs.queue_poll_interval_s)

    @task_handler(name=TASK_NAME)
    def run_job(self, job_id: str, payload: dict[str, Any]) -> dict[str, str]:
        """Celery calls this on one of its worker threads; the return value is all Celery's result store keeps."""
        with self.idle:
            self.running += 1
        try:
            status = self._take(job_id)
            final = self._run(status, payload) if status is not None else self.store.get(job_id)
            if final is None:  # its record expired while it waited in the queue
                return {"job_id": job_id, "status": "expired"}
            if payload.get("webhook_url") and final.status in TERMINAL and final.webhook is None:
                self._call_webhook(payload["webhook_url"], final)
            return {"job_id": job_id, "status": final.status}
        finally:
            with self.idle:
                self.running -= 1
                self.idle.notify_all()

    def _call_webhook(self, url: str, final: JobStatus) -> None:
        """Deliver once: a redelivery of this finished job that comes while the call is under way skips it."""
        hold_s = webhooks.longest_delivery_s(self.jobs.webhook_attempts, self.jobs.webhook_timeout_s) + 10
        if not self.store.claim_webhook(final.job_id, hold_s):
            return
        delivery = webhooks.deliver(url, final, secret=self.secret, attempts=self.jobs.webhook_attempts,
                                    backoff_s=self.jobs.webhook_backoff_s, timeout_s=self.jobs.webhook_timeout_s)
        self.store.save(final.model_copy(update={"webhook": delivery}))

    def __del__(self) -> None:
        """Serve calls this on a graceful stop, after Ray's task_consumer wrapper has told Celery to take no more
        jobs: wait for the jobs this replica runs. Serve's graceful_shutdown_timeout_s bounds the wait."""
        idle = getattr(self, "idle", None)  # absent when __init__ failed
        if idle is not None:
            with idle:
                idle.wait_for(lambda: not self.running)

    # --- who runs the job -----------------------------------------------------------------------------------------
    def _take(self, job_id: str) -> JobStatus | None:
        """Start the job (queued -> running, attempts + 1, a fresh lease) unless it is finished, cancelled, or
        running under another consumer's fresh lease (then wait for that one). None: nothing to run."""
        while True:
            status, taken = self.store.transition(job_id, self._start, clear=("progress",))
            if status is None or status.status in TERMINAL:
                return None
            if taken:
                return status
            time.sleep(min(1.0, self.jobs.lease_s / 3))

    def _start(self, status: JobStatus, fields: dict[bytes, bytes]) -> Change | None:
        now = time.time()
        if status.status in TERMINAL:
            return None
        if b"cancel" in fields:
            return status.model_copy(update={"status": "cancelled", "updated_at": now}), {}
        lease = float(fields.get(b"lease", 0) or 0)
        if status.status == "running" and now - lease < self.jobs.lease_s:
            return None  # alive on another consumer
        return status.model_copy(update={"status": "running", "attempts": status.attempts + 1, "started_at": now,
                                         "updated_at": now}), {"lease": repr(now)}

    def _run(self, status: JobStatus, payload: dict[str, Any]) -> JobStatus:
        job_id = status.job_id
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.jobs.lease_s / 3):
                self.store.renew_lease(job_id)

        renewer = threading.Thread(target=renew, name=f"lease-{job_id[:8]}", daemon=True)
        renewer.start()
        try:
            if status.attempts > self.jobs.max_attempts:
                raise _Failed(ErrorDetail(code="too_many_attempts", message=f"job {job_id} was started "
                                          f"{status.attempts - 1} times without finishing"))
            request = GenerateRequest.model_validate(payload["request"])
            response = self.ingress.generate.remote(request, inline=bool(payload.get("inline")),
                                                    request_id=job_id, job_id=job_id, attempt=status.attempts)
            result = response.result(timeout_s=self.jobs.run_timeout_s)  # the Ingress's 504 comes first
            final = status.model_copy(update={"status": "done", "result": result})
        except JobCancelled:
            final = status.model_copy(update={"status": "cancelled"})
        except _Failed as exc:
            final = status.model_copy(update={"status": "failed", "error": exc.detail})
        except InstantIDError as exc:
            if http_status(exc) == 503 and status.attempts < self.jobs.max_attempts:  # a stage restarted: again
                self._requeue(status)
                raise RetryJob(f"job {job_id}: {exc.code}") from None
            final = status.model_copy(update={"status": "failed", "error": ErrorDetail(
                code=exc.code, message=exc.message, field=exc.field, images=getattr(exc, "images", None))})
        except Exception as exc:  # replica loss, full queues (BackPressureError), timeouts: transient
            if status.attempts < self.jobs.max_attempts:
                logger.warning("job %s: %s; it goes back to the queue", job_id, type(exc).__name__)
                self._requeue(status)
                raise RetryJob(f"job {job_id}: {type(exc).__name__}") from None
            logger.exception("job %s failed", job_id)
            final = status.model_copy(update={"status": "failed", "error": ErrorDetail(
                code="internal", message=f"internal error in job {job_id}; it has been logged")})
        finally:
            stop.set()
            renewer.join()
        final = final.model_copy(update={"updated_at": time.time()})
        if final.status != "done":
            self.store.save(final, clear=("progress", "lease"))
        elif not self.store.complete(job_id, status.attempts, final.result):
            final = self.store.get(job_id) or final  # the Ingress marked it done already (or it was cancelled)
        logger.info("job %s: %s (attempt %d)", job_id, final.status, final.attempts)
        return final

    def _requeue(self, status: JobStatus) -> None:
        self.store.save(status.model_copy(update={"status": "queued", "updated_at": time.time()}),
                        clear=("progress", "lease"))

    def check_health(self) -> None:
        """Nothing about Redis: a restart would not bring the broker back, and would drop the jobs this replica
        runs (their results are recorded once Redis answers again). Celery reconnects on its own; the backlog
        thread logs the outage and InstantIDJobsBrokerUnreachable alerts on it."""


class _Failed(Exception):
    def __init__(self, detail: ErrorDetail) -> None:
        super().__init__(detail.message)
        self.detail = detail


def job_consumer_class(config: AppConfig) -> type:
    """JobConsumer wrapped by Serve's `task_consumer` with this app's queue settings (known only at build time,
    so the decorator is applied here rather than at import)."""
    assert config.jobs is not None
    return task_consumer(task_processor_config=task_processor_config(config.jobs))(JobConsumer)
