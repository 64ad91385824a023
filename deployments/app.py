"""`build_app(args)`: validate AppConfig, then bind the five stage deployments (with `jobs`, the JobConsumer; with
`safety`, the SafetyChecker) into one application.

`serve run serve_config.yaml` points `import_path` here; `args` is the AppConfig as a dict (what builds the models).
Per-deployment options come from the file's `applications[].deployments[]` entries, which Serve applies over the
defaults bound here; live settings are each deployment's `user_config` (its reconfigure()). Python callers give
both at once with `build_app_from_spec(AppSpec(...))`.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from instantid_app.config import JOB_CONSUMER, SAFETY_CHECKER, AppConfig, AppSpec

from .denoiser import Denoiser
from .face import FaceAnalysis
from .ingress import Ingress
from .jobs.consumer import job_consumer_class
from .jobs.task_queue import consumer_autoscaling_config
from .prompt import PromptEncoderDeployment
from .safety import SafetyCheckerDeployment
from .writer import OutputWriter

logger = logging.getLogger("ray.serve")


def build_app(args: dict[str, Any] | AppConfig) -> Application:
    """Build the `instantid` application from its args (Serve's builder: one argument)."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    return build_app_from_spec(AppSpec(args=config))


def build_app_from_spec(spec: AppSpec) -> Application:
    """Build the application with the spec's per-deployment options (a Python caller's deployments[])."""
    plain = spec.args.model_dump(mode="json")
    retry_after_s = spec.ingress.retry_after_s

    def deployment(cls: type, name: str) -> serve.Deployment:
        chosen = spec.options(name)
        if name == JOB_CONSUMER:  # it takes its work from the broker: it scales on the queue, no request waits on it
            chosen["autoscaling_config"] = consumer_autoscaling_config(spec.args.jobs)
        else:
            # A request refused at a full queue gets Retry-After, also where Serve's proxy answers it (the Ingress's
            # own queue); between stages the Ingress turns the same refusal into its JSON 503.
            chosen.setdefault("backpressure_config", {"retry_after_s": retry_after_s})
        logger.info("deployment %s options: %s", name, chosen)
        return serve.deployment(cls, name=name, **chosen)

    face = deployment(FaceAnalysis, "FaceAnalysis").bind(plain)
    prompt = deployment(PromptEncoderDeployment, "PromptEncoder").bind(plain)
    denoiser = deployment(Denoiser, "Denoiser").bind(plain)
    writer = deployment(OutputWriter, "OutputWriter").bind(plain)
    consumer = None
    if spec.args.jobs is not None:
        consumer = deployment(job_consumer_class(spec.args), JOB_CONSUMER).bind(plain)
        logger.info("deployment JobConsumer on queue %s", spec.args.jobs.queue_name)
    safety = None
    if spec.args.safety is not None:  # between the Denoiser and the writer (the Ingress chains them)
        safety = deployment(SafetyCheckerDeployment, SAFETY_CHECKER).bind(plain)
        logger.info("deployment SafetyChecker in mode %s", spec.args.safety.mode.value)
    return deployment(Ingress, "Ingress").bind(face, prompt, denoiser, writer, plain, consumer, safety)
