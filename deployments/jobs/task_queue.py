"""The job queue's settings in Ray Serve's own terms: a `TaskProcessorConfig` for its Celery adapter (producer in
the Ingress, consumer in JobConsumer) and the queue-length autoscaling policy of the consumer deployment."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ray.serve._private.broker import Broker
from ray.serve.async_inference_autoscaling_policy import AsyncInferenceAutoscalingPolicy
from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig

from instantid_app.config import JobsConfig

TASK_NAME = "instantid.generate"


def task_processor_config(jobs: JobsConfig) -> TaskProcessorConfig:
    url = jobs.resolved_broker_url()
    return TaskProcessorConfig(
        queue_name=jobs.queue_name,
        adapter_config=CeleryAdapterConfig(
            broker_url=url,
            backend_url=url,
            # The broker hands a job taken by a consumer that died (never acknowledged) to another one after this.
            # kombu sweeps for such jobs every unacked_restore_interval x unacked_restore_throttle seconds.
            broker_transport_options={"visibility_timeout": jobs.visibility_timeout_s, "unacked_restore_throttle": 1,
                                      "unacked_restore_interval": jobs.unacked_restore_interval_s},
            app_custom_config={
                "worker_prefetch_multiplier": 1,  # a replica takes only jobs it can start: the rest wait in Redis
                "task_serializer": "json", "result_serializer": "json", "accept_content": ["json"],
                "result_expires": int(jobs.status_ttl_s),  # Celery's own result records expire with ours
                "worker_hijack_root_logger": False, "worker_redirect_stdouts": False,  # leave Ray's logging alone
                "broker_connection_retry_on_startup": True,
            },
            # Retries are ours (JobConsumer counts attempts in the job record); Celery's retry is for the transient
            # failures the consumer re-raises, with Celery's backoff.
            task_custom_config={"retry_backoff": 2, "retry_backoff_max": 30},
        ),
        max_retries=jobs.max_attempts,
        # No dead-letter queues: they would keep the job's request, face photos included, after the job ended.
        failed_task_queue_name=None,
        unprocessable_task_queue_name=None,
    )


# The TLS settings Celery reads from a rediss:// URL's query (its documented form), as redis-py's keywords.
URL_SSL_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def redis_ssl_options(url: str) -> dict[str, str] | None:
    """The TLS options of a `rediss://...?ssl_cert_reqs=required&ssl_ca_certs=PATH` URL as redis-py keywords (the
    CERT_REQUIRED spelling Celery also accepts becomes `required`); None for a plain redis:// URL."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    options = {key: value for key, value in parse_qsl(parts.query) if key in URL_SSL_OPTIONS}
    if "ssl_cert_reqs" in options:
        options["ssl_cert_reqs"] = options["ssl_cert_reqs"].lower().removeprefix("cert_")
    return options


class JobQueuePolicy(AsyncInferenceAutoscalingPolicy):
    """Serve's queue-length policy (replicas from queued plus running jobs) with the broker URL taken from
    `broker_url_env` where the Serve controller's environment sets it (a Kubernetes Secret), else `broker_url`:
    the file and Serve's stored config name the variable, never a password. Named by `consumer_autoscaling_config`.

    Over TLS (rediss://) it hands Ray's queue reader the URL's TLS options: that reader takes them only as
    `broker_use_ssl` and refuses a rediss:// URL without it, so the consumer would never scale on its queue."""

    def __init__(self, queue_name: str, broker_url: str, broker_url_env: str | None = None,
                 poll_interval_s: float = 5.0) -> None:
        url = (os.environ.get(broker_url_env) if broker_url_env else None) or broker_url
        super().__init__(broker_url=url, queue_name=queue_name, poll_interval_s=poll_interval_s)

    def _ensure_broker(self) -> None:
        # Overrides the parent's lazy set-up (ray 2.x's AsyncInferenceAutoscalingPolicy) for rediss:// only;
        # tests/unit/test_jobs_tls_redis.py reads a TLS queue through this policy, so a Ray change shows there.
        ssl_options = redis_ssl_options(self._broker_url)
        if self._broker is None and ssl_options is not None:
            self._broker = Broker(self._broker_url, broker_use_ssl=ssl_options)
        super()._ensure_broker()


def consumer_autoscaling_config(jobs: JobsConfig) -> dict[str, Any]:
    """The JobConsumer's `autoscaling_config`: `jobs.consumer_autoscaling` and the queue-length policy on
    `jobs`' own queue and broker (the environment variable's name, never the resolved URL, so no Redis password
    lands in Serve's stored config)."""
    policy = {"policy_function": f"{JobQueuePolicy.__module__}:{JobQueuePolicy.__qualname__}",
              "policy_kwargs": {"queue_name": jobs.queue_name, "broker_url": jobs.broker_url,
                                "broker_url_env": jobs.broker_url_env, "poll_interval_s": jobs.queue_poll_interval_s}}
    return {**jobs.consumer_autoscaling.model_dump(mode="json"), "policy": policy}
