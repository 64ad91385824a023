"""`build_app(args)`: validate AppConfig, then bind the five deployments into one application.

`serve run serve_config.yaml` points `import_path` here; `args` is the AppConfig as a dict.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from instantid_app.config import AppConfig

from .denoiser import Denoiser
from .face import FaceAnalysis
from .ingress import Ingress
from .job_consumer import job_consumer_class
from .job_queue import autoscaling_policy
from .prompt import PromptEncoderDeployment
from .writer import OutputWriter

logger = logging.getLogger("ray.serve")


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    """Build the `instantid` application from an AppConfig (or its dict form)."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    plain = config.model_dump(mode="json")
    stages = config.deployments

    def deployment(cls: type, name: str, options) -> serve.Deployment:
        chosen = options.serve_options()
        # A request refused at a full queue gets Retry-After, also where Serve's proxy answers it (the Ingress's
        # own queue); between stages the Ingress turns the same refusal into its JSON 503.
        chosen.setdefault("backpressure_config", {"retry_after_s": config.retry_after_s})
        logger.info("deployment %s options: %s", name, chosen)
        return serve.deployment(cls, name=name, **chosen)

    face = deployment(FaceAnalysis, "FaceAnalysis", stages.face).bind(plain)
    prompt = deployment(PromptEncoderDeployment, "PromptEncoder", stages.prompt).bind(plain)
    denoiser = deployment(Denoiser, "Denoiser", stages.denoiser).bind(plain)
    writer = deployment(OutputWriter, "OutputWriter", stages.writer).bind(plain)
    consumer = None
    if config.jobs is not None:
        options = stages.jobs.model_copy(deep=True)
        autoscaling = options.autoscaling_config.model_dump(mode="json")
        autoscaling.setdefault("policy", autoscaling_policy(config.jobs))  # scale on the queue's length
        consumer = serve.deployment(job_consumer_class(config), name="JobConsumer",
                                    **{**options.serve_options(), "autoscaling_config": autoscaling}).bind(plain)
        logger.info("deployment JobConsumer on queue %s", config.jobs.queue_name)
    return deployment(Ingress, "Ingress", stages.ingress).bind(face, prompt, denoiser, writer, plain, consumer)
