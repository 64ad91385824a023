"""AppConfig: the one pydantic model behind `serve_config.yaml`, the KubeRay manifest, `build_app` and the batch
job's `--config`, and the loader that reads it out of a Serve config file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from instantid_core.config import ControlType, LoraEntry, ModelSources, PipelineSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG_PATH = REPO_ROOT / "serve_config.yaml"
APP_NAME = "instantid"


class AccessConfig(BaseModel):
    """AppConfig.access: off unless a key source is given."""

    model_config = ConfigDict(extra="forbid")

    api_keys_file: str | None = Field(None, description="YAML/JSON list of {name, key, actions} (a mounted Secret).")
    api_keys_env: str | None = Field(None, description="Environment variable holding the same list as JSON.")
    rate_limit_per_minute: float | None = Field(None, gt=0, description="Per key; unset: no limit.")
    rate_limit_burst: int = Field(10, ge=1, description="Requests a key may send at once before the rate applies.")

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys_file or self.api_keys_env)


class AutoscalingConfig(BaseModel):
    """A subset of Ray Serve's autoscaling_config, passed through as is."""

    model_config = ConfigDict(extra="allow")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)


class DeploymentOptions(BaseModel):
    """Ray Serve options of one stage; anything Serve accepts in `serve.deployment(...)` may be added."""

    model_config = ConfigDict(extra="allow")

    autoscaling_config: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    max_ongoing_requests: int = Field(8, ge=1)
    max_queued_requests: int = Field(64, ge=-1, description="-1: unbounded; else excess requests get 503")
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1})
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)

    def serve_options(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class StageOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ingress: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(
        max_ongoing_requests=32, max_queued_requests=64, ray_actor_options={"num_cpus": 0.25}))
    face: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(ray_actor_options={"num_cpus": 0.5}))
    prompt: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(ray_actor_options={"num_cpus": 0.5}))
    denoiser: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(
        max_ongoing_requests=16, ray_actor_options={"num_cpus": 1}))
    writer: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(ray_actor_options={"num_cpus": 0.25}))
    # The job consumer: max_ongoing_requests is how many jobs one replica runs at once (its Celery worker threads);
    # it scales on the broker's queue length (build_app sets Serve's AsyncInferenceAutoscalingPolicy).
    jobs: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(
        max_ongoing_requests=4, ray_actor_options={"num_cpus": 0.25},
        autoscaling_config=AutoscalingConfig(target_ongoing_requests=4)))


class JobsConfig(BaseModel):
    """Async jobs on Ray Serve's task queue (`ray.serve.task_consumer`, Celery over Redis)."""

    model_config = ConfigDict(extra="forbid")

    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL of the queue and the job records "
                            "(`make services` starts one on loopback).")
    broker_url_env: str | None = Field("INSTANTID_BROKER_URL", description="When this environment variable is "
                                       "set (e.g. from a Kubernetes Secret), its value replaces broker_url.")
    queue_name: str = Field("instantid-jobs", min_length=1, max_length=100)
    status_ttl_s: float = Field(86400.0, gt=0, description="A job's status record expires this long after its "
                                "last change (then GET answers 404).")
    visibility_timeout_s: float = Field(3600.0, gt=0, description="A job taken by a consumer that has not "
                                        "finished it within this time is delivered again (its consumer died).")
    lease_s: float = Field(30.0, gt=0, description="A running job's consumer renews its lease this often x3; a "
                           "second delivery waits while the lease is fresh and takes the job over when it is not.")
    max_attempts: int = Field(3, ge=1, description="Starts of one job (first + redeliveries + retries after a "
                              "stage restart) before it fails.")
    webhook_attempts: int = Field(5, ge=1, le=20, description="Tries of one webhook call.")
    webhook_backoff_s: float = Field(1.0, ge=0, description="Wait before the 2nd try; doubles after each.")
    webhook_timeout_s: float = Field(10.0, gt=0, description="Per try.")
    webhook_secret_env: str | None = Field("INSTANTID_WEBHOOK_SECRET", description="Environment variable with "
                                           "the HMAC-SHA256 key for the X-InstantID-Signature header (unset: "
                                           "webhooks are not signed).")
    queue_poll_interval_s: float = Field(5.0, gt=0, description="How often the autoscaler reads the queue length.")

    def resolved_broker_url(self) -> str:
        # Read here, in the deployments' process, never in the core: the URL may carry a password.
        return (os.environ.get(self.broker_url_env) if self.broker_url_env else None) or self.broker_url

    def webhook_secret(self) -> bytes | None:
        value = os.environ.get(self.webhook_secret_env) if self.webhook_secret_env else None
        return value.encode() if value else None


class WeightsConfig(BaseModel):
    """Either the tiny preset (written on first start, seconds, no download) or real model sources."""

    model_config = ConfigDict(extra="forbid")

    tiny_preset_dir: str | None = Field(
        "/tmp/instantid-tiny", description="Write/use the tiny preset here; set to null to use `sources`.")
    sources: ModelSources = Field(default_factory=ModelSources)


class AppConfig(BaseModel):
    """Everything `build_app` needs. `serve_config.yaml`'s application `args` are exactly this model."""

    model_config = ConfigDict(extra="forbid")

    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    output_uri: str = Field("file:///tmp/instantid-outputs", description="file:// or s3:// prefix for outputs.")
    allowed_input_buckets: list[str] = Field(default_factory=list, description="s3:// inputs only from these.")
    allow_url_inputs: bool = Field(False, description="Fetch http(s) image URLs server-side (off: SSRF risk).")
    allowed_url_hosts: list[str] = Field(default_factory=list, description="With allow_url_inputs: the only hosts "
                                         "URLs may name (exact host names; redirects are not followed).")
    max_body_bytes: int = Field(20 * 2**20, ge=1024, description="HTTP body limit; larger bodies get 413.")
    max_image_bytes: int = Field(15 * 2**20, ge=1024, description="Per-image limit after base64 decoding.")
    stage_timeout_s: float = Field(300.0, gt=0, description="A request whose stages take longer than this in all "
                                   "answers 504, and its stages are cancelled.")
    inline_max_pixels: int = Field(1024 * 1024, description="?inline=true returns images up to this many pixels.")
    max_batch_size: int = Field(4, ge=1, description="Denoiser: most images per GPU batch.")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="Denoiser: how long a batch waits to fill.")
    face_cache_bytes: int = Field(16 * 2**20, ge=0, description="FaceAnalysis: bytes of face analyses kept "
                                  "(about 2.2 KB each; 0: no cache).")
    prompt_cache_bytes: int = Field(256 * 2**20, ge=0, description="PromptEncoder: bytes of prompt embeddings kept "
                                    "(about 1.3 MB each with SDXL; 0: no cache).")
    retry_after_s: int = Field(2, ge=1, description="Retry-After on 503.")
    allowed_webhook_hosts: list[str] = Field(default_factory=list, description="Job webhooks only to these hosts "
                                             "(exact host names; default none; redirects are not followed).")
    jobs: JobsConfig | None = Field(None, description="The async jobs API (/v1/jobs) on a Redis broker; null: "
                                    "/v1/jobs answers 503.")
    access: AccessConfig = Field(default_factory=AccessConfig)
    loras: dict[str, str | LoraEntry | None] = Field(
        default_factory=dict, description="LoRA registry added over the weights' own (the tiny preset registers "
        "tiny-style): name -> source (file, folder or s3:// prefix whose .safetensors files become names, hub id) "
        "or {source, scheduler, steps, guidance}; null removes a name.")
    controlnets: dict[ControlType, str | None] = Field(
        default_factory=dict, description="Extra ControlNets added over the weights' own (the tiny preset "
        "registers canny and depth): type (canny, depth, pose) -> ControlNetModel source; null removes one.")
    depth_estimator: str | None = Field(None, description="transformers depth-estimation model for the `depth` "
                                        "control; default the weights' own (the tiny preset has one).")
    playground: bool = Field(True, description="Serve the browser playground at `/` (false: `/` answers 404).")
    deployments: StageOptions = Field(default_factory=StageOptions)

    @model_validator(mode="after")
    def _url_inputs_name_their_hosts(self) -> AppConfig:
        if self.allow_url_inputs and not self.allowed_url_hosts:
            raise ValueError("allow_url_inputs needs allowed_url_hosts: fetching any host would let a request "
                             "reach internal services")
        return self

    @model_validator(mode="after")
    def _denoiser_can_hold_a_batch(self) -> AppConfig:
        if self.deployments.denoiser.max_ongoing_requests < self.max_batch_size:
            raise ValueError("deployments.denoiser.max_ongoing_requests must be >= max_batch_size "
                             "or batches can never fill")
        return self


def load_serve_config(path: Path = SERVE_CONFIG_PATH) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def app_config_from_serve_config(path: Path = SERVE_CONFIG_PATH) -> AppConfig:
    """The AppConfig carried by the `instantid` application of a Serve config file."""
    config = load_serve_config(path)
    (app,) = [a for a in config["applications"] if a["name"] == APP_NAME]
    return AppConfig.model_validate(app.get("args", {}))
