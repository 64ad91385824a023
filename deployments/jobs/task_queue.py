"""The job queue's settings in Ray Serve's own terms: a `TaskProcessorConfig` for its Celery adapter (producer in
the Ingress, consumer in JobConsumer) and the queue-length autoscaling policy of the consumer deployment."""

from __future__ import annotations

import os
from typing import Any

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
                                      "unacked_restore_interval": max(1, min(10, int(jobs.visibility_timeout_s / 4)))},
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


class JobQueuePolicy(AsyncInferenceAutoscalingPolicy):
    """Serve's queue-length policy (replicas from queued plus running jobs) with the broker URL taken from
    `broker_url_env` where the Serve controller's environment sets it (a Kubernetes Secret), else `broker_url`:
    the file and Serve's stored config name the variable, never a password. Named by `consumer_autoscaling_config`."""

    def __init__(self, queue_name: str, broker_url: str, broker_url_env: str | None = None,
                 poll_interval_s: float = 5.0) -> None:
        url = (os.environ.get(broker_url_env) if broker_url_env else None) or broker_url
        super().__init__(broker_url=url, queue_name=queue_name, poll_interval_s=poll_interval_s)


def consumer_autoscaling_config(jobs: JobsConfig) -> dict[str, Any]:
    """The JobConsumer's `autoscaling_config`: `jobs.consumer_autoscaling` and the queue-length policy on
    `jobs`' own queue and broker (the environment variable's name, never the resolved URL, so no Redis password
    lands in Serve's stored config)."""
    policy = {"policy_function": f"{JobQueuePolicy.__module__}:{JobQueuePolicy.__qualname__}",
              "policy_kwargs": {"queue_name": jobs.queue_name, "broker_url": jobs.broker_url,
                                "broker_url_env": jobs.broker_url_env, "poll_interval_s": jobs.queue_poll_interval_s}}
    return {**jobs.consumer_autoscaling.model_dump(mode="json"), "policy": policy}
