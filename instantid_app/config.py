"""AppConfig: the one pydantic model behind `serve_config.yaml`, the KubeRay manifest, `build_app` and the batch
job's `--config`; DEFAULT_OPTIONS, every deployment's Serve options; AppSpec, a whole application (args and
deployment entries); and the loader that reads it out of a Serve config file. Each deployment's live settings
(`user_config`) are the models of `instantid_app.settings`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from instantid_core.config import MAX_BEST_OF, ControlType, LoraEntry, ModelSources, PipelineSettings, SafetyMode
from instantid_core.scoring import DEFAULT_MAX_CANDIDATES

from .settings import SETTINGS, DenoiserSettings, IngressSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG_PATH = REPO_ROOT / "serve_config.yaml"
APP_NAME = "instantid"
DEFAULT_TINY_DIR = "/tmp/instantid-tiny"
# What the playground, /v1/options and every response say while the app runs the tiny preset: a newcomer's first
# image is noise, and this says why and the one change that serves real weights.
TINY_PRESET_NOTICE = (
    "Demo weights: this server runs the tiny preset, random tiny models, so every image is noise. To serve "
    "InstantID's real weights, replace weights: {preset: tiny} in the app's args (serve_config.yaml) by "
    "weights: {sources: {}} (the published Hugging Face repos; or name your own hub ids, s3:// prefixes or "
    "folders), best on a GPU (k8s/overlays/gpu).")


class AutoscalingConfig(BaseModel):
    """A subset of Ray Serve's autoscaling_config (the rest passes through to Serve, which validates it)."""

    model_config = ConfigDict(extra="allow")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)


DEPLOYMENT_NAMES = tuple(SETTINGS)
JOB_CONSUMER = "JobConsumer"
SAFETY_CHECKER = "SafetyChecker"
OPTIONAL_STAGES = {JOB_CONSUMER: "jobs", SAFETY_CHECKER: "safety"}  # deployment -> the args key that adds it

# Every deployment's Serve options, bound by build_app: the one home of these defaults. A Serve file's
# `applications[].deployments[]` entries override them key by key, as Serve does, and hold only what differs (tests
# hold serve_config.yaml and the KubeRay serve configs to that). The CPU shares fit the tiny preset's six replicas on
# a 2-core machine; the GPU overlay (k8s/overlays/gpu/serve-patch.yaml) gives the GPU stages their GPUs.
def _scaling(max_replicas: int, target: float) -> dict[str, Any]:
    return {"min_replicas": 1, "max_replicas": max_replicas, "target_ongoing_requests": target}


DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "Ingress": {"max_ongoing_requests": 32, "max_queued_requests": 64, "autoscaling_config": _scaling(2, 8),
                "ray_actor_options": {"num_cpus": 0.25}},
    "FaceAnalysis": {"max_ongoing_requests": 8, "max_queued_requests": 64, "autoscaling_config": _scaling(2, 4),
                     "ray_actor_options": {"num_cpus": 0.5}},
    "PromptEncoder": {"max_ongoing_requests": 8, "max_queued_requests": 64, "autoscaling_config": _scaling(2, 4),
                      "ray_actor_options": {"num_cpus": 0.25}},
    # A replica's max_ongoing_requests must reach DenoiserSettings.max_batch_size or its batches never fill.
    "Denoiser": {"max_ongoing_requests": 16, "max_queued_requests": 64, "autoscaling_config": _scaling(2, 8),
                 "ray_actor_options": {"num_cpus": 0.5}, "graceful_shutdown_timeout_s": 60},
    "OutputWriter": {"max_ongoing_requests": 16, "max_queued_requests": 64, "autoscaling_config": _scaling(2, 8),
                     "ray_actor_options": {"num_cpus": 0.25}},
    # max_ongoing_requests is how many jobs one replica runs at once (its Celery worker threads). Its
    # autoscaling_config is not here: build_app makes it from args.jobs.consumer_autoscaling and the queue-length
    # policy (deployments.jobs.task_queue), so the queue is named once, in `jobs`.
    # Its graceful stop waits for the jobs it runs (JobConsumer.__del__): at least JobsConfig.run_timeout_s, plus
    # a webhook call.
    "JobConsumer": {"max_ongoing_requests": 2, "ray_actor_options": {"num_cpus": 0.25},
                    "graceful_shutdown_timeout_s": 400},
    # Only with `safety` in args. One CLIP vision pass per image (ViT-L/14 at 224 px: a fraction of one SDXL step),
    # so a CPU replica keeps up with a GPU Denoiser's few images per second; the GPU overlay may give it a GPU share.
    "SafetyChecker": {"max_ongoing_requests": 16, "max_queued_requests": 64, "autoscaling_config": _scaling(2, 8),
                      "ray_actor_options": {"num_cpus": 0.5}},
}


class DeploymentEntry(BaseModel):
    """One `applications[].deployments[]` entry. Serve's own DeploymentSchema checks the Serve options (see
    `validate_serve_config`); this model adds what Serve cannot know: the name is one of ours and `user_config` is
    that deployment's settings model."""

    model_config = ConfigDict(extra="allow")

    name: str
    user_config: dict[str, Any] | None = None
    autoscaling_config: AutoscalingConfig | None = None
    max_ongoing_requests: int | None = Field(None, ge=1)
    ray_actor_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _known_deployment_and_settings(self) -> DeploymentEntry:
        if self.name not in SETTINGS:
            raise ValueError(f"deployments: unknown deployment {self.name!r}; the app has {', '.join(SETTINGS)}")
        model = SETTINGS[self.name]
        if self.user_config is not None:
            if model is None:
                raise ValueError(f"deployments: {self.name} has no live settings; remove its user_config")
            model.model_validate(self.user_config)
        return self

    def settings(self) -> BaseModel | None:
        model = SETTINGS[self.name]
        return model.model_validate(self.user_config or {}) if model else None


class WeightsConfig(BaseModel):
    """Real model sources, or the tiny preset when asked for by name: never one in place of the other."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["tiny"] | None = Field(
        None, description="`tiny`: random tiny models in the published layouts (written on first start, seconds).")
    preset_dir: str | None = Field(None, description="Where the tiny preset is written (with `preset`; default "
                                   f"{DEFAULT_TINY_DIR}).")
    sources: ModelSources | None = Field(None, description="Where each part of the real weights lives.")

    @model_validator(mode="before")
    @classmethod
    def _old_shape_is_an_error(cls, data: Any) -> Any:
        if isinstance(data, dict) and "tiny_preset_dir" in data:
            raise ValueError("weights.tiny_preset_dir is gone: use `weights: {preset: tiny}` (and `preset_dir`) for "
                             "the tiny preset, or `weights: {sources: {...}}` for real weights")
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> WeightsConfig:
        if self.preset and self.sources is not None:
            raise ValueError("weights: give `preset: tiny` or `sources`, not both (a preset never stands in for "
                             "real weights)")
        if not self.preset and self.sources is None:
            raise ValueError("weights: name the real weights (`sources: {sdxl: ..., ...}`; `sources: {}` is the "
                             "published Hugging Face repos) or ask for `preset: tiny`")
        # None when not given, so that the dump every replica re-validates (build_app passes args as a dict)
        # carries no preset_dir beside real sources.
        if not self.preset and self.preset_dir is not None:
            raise ValueError("weights.preset_dir is only read with `preset: tiny`")
        return self

    @property
    def tiny_dir(self) -> str:
        """Where the tiny preset is written (with `preset: tiny`)."""
        return self.preset_dir or DEFAULT_TINY_DIR


class JobsConfig(BaseModel):
    """Async jobs on Ray Serve's task queue (`ray.serve.task_consumer`, Celery over Redis)."""

    model_config = ConfigDict(extra="forbid")

    broker_url: str = Field("redis://127.0.0.1:6380/0", description="Redis URL of the queue and the job records "
                            "(`make services` starts one on loopback, on 6380: 6379 is Ray's GCS default port). "
                            "TLS: rediss://[:PASSWORD@]HOST:PORT/0?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem.")
    broker_url_env: str | None = Field("INSTANTID_BROKER_URL", description="When this environment variable is "
                                       "set (e.g. from a Kubernetes Secret), its value replaces broker_url.")
    queue_name: str = Field("instantid-jobs", min_length=1, max_length=100)
    status_ttl_s: float = Field(86400.0, gt=0, description="A job's status record expires this long after its "
                                "last change (then GET answers 404).")
    visibility_timeout_s: float = Field(240.0, gt=0, description="A job taken by a consumer that has not "
                                        "finished it within this time is delivered again (its consumer died): "
                                        "with lease_s and the broker's sweep it bounds the wait for a rerun "
                                        "(redelivery_bound_s: 280 s by default). A job that runs longer is "
                                        "delivered again while it runs; that delivery waits on the job's lease "
                                        "and never runs it a second time at once.")
    lease_s: float = Field(30.0, gt=0, description="A running job's consumer renews its lease this often x3; a "
                           "second delivery waits while the lease is fresh and takes the job over when it is not.")
    max_attempts: int = Field(3, ge=1, description="Starts of one job (first + redeliveries + retries after a "
                              "stage restart) before it fails.")
    webhook_attempts: int = Field(5, ge=1, le=20, description="Tries of one webhook call.")
    webhook_backoff_s: float = Field(1.0, ge=0, description="Wait before the 2nd try; doubles after each.")
    webhook_timeout_s: float = Field(10.0, gt=0, description="Per try.")
    webhook_secret_env: str | None = Field("INSTANTID_WEBHOOK_SECRET", description="Environment variable with "
                                           "the webhooks' signing secret (Standard Webhooks: `whsec_<base64>`, "
                                           "or any other string as the key; unset: webhooks are not signed).")
    queue_poll_interval_s: float = Field(5.0, gt=0, description="How often the autoscaler reads the queue length "
                                         "(and the JobConsumer refreshes its backlog gauges).")
    max_queued: int = Field(1000, ge=1, description="Jobs that may wait in the queue; past it POST /v1/jobs answers "
                            "429 jobs_backlog_full (a bounded backlog: callers learn at once, not hours later).")
    backlog_retry_after_s: int = Field(30, ge=1, description="Retry-After of that 429.")
    redis_timeout_s: float = Field(3.0, gt=0, description="Longest one job-record call to Redis may take; past it "
                                   "the job endpoints answer 503 jobs_unavailable (never a hung request).")
    run_timeout_s: float = Field(360.0, gt=0, description="Longest a consumer waits for one run of a job through "
                                 "the Ingress, which answers its own stage_timeout_s (a live Ingress setting) "
                                 "first; past it the run counts as failed and the job goes back to the queue. "
                                 "Must exceed the Ingress's stage_timeout_s.")
    consumer_autoscaling: AutoscalingConfig = Field(
        default_factory=lambda: AutoscalingConfig(max_replicas=2, target_ongoing_requests=2),
        description="The JobConsumer's replica bounds; build_app adds the policy that scales them on queued plus "
        "running jobs (a JobConsumer entry in a Serve file takes no autoscaling_config).")

    @property
    def unacked_restore_interval_s(self) -> int:
        """How often the broker (kombu's Redis transport) looks for jobs whose consumer never acknowledged them."""
        return max(1, min(10, int(self.visibility_timeout_s / 4)))

    @property
    def redelivery_bound_s(self) -> float:
        """The longest a job whose consumer died waits before it runs again: its delivery turns visible after
        visibility_timeout_s, the broker's next sweep requeues it, and its dead consumer's lease is stale by then
        (or lease_s later)."""
        return self.visibility_timeout_s + self.unacked_restore_interval_s + self.lease_s

    def resolved_broker_url(self) -> str:
        # Read here, in the deployments' process, never in the core: the URL may carry a password.
        return (os.environ.get(self.broker_url_env) if self.broker_url_env else None) or self.broker_url

    def webhook_secret(self) -> str | None:
        return (os.environ.get(self.webhook_secret_env) if self.webhook_secret_env else None) or None


class SafetyConfig(BaseModel):
    """The safety stage (issue 24): diffusers' CompVis safety checker between the Denoiser and the writer, with its
    weights from `weights.sources.safety_checker` (the tiny preset has a tiny one)."""

    model_config = ConfigDict(extra="forbid")

    mode: SafetyMode = Field(SafetyMode.block, description="What happens to a flagged image: `block` (not written; "
                             "a request whose images are all flagged answers 422 unsafe_content), `blur` (written "
                             "blurred), `flag` (written as it is). Every response and sidecar says per image "
                             "whether it was flagged.")
    allow_request_disable: bool = Field(False, description="Let a request turn the checker off with "
                                        "`safety_checker: false` (otherwise that answers 400).")
    device: str | None = Field(None, description="Where the checker runs; default pipeline.device. `cpu` (in "
                               "float32) keeps it off the GPU nodes: then give the SafetyChecker CPU-node resources "
                               "and no num_gpus.")


class ScoringConfig(BaseModel):
    """The identity score (issue 26): every output's face scored against the reference on the FaceAnalysis
    deployment (CPU), by `weights.sources.scoring_face_pack` (unset: the conditioning face_pack, reported as
    `same_model`; the tiny preset has a second tiny recogniser). Enables `best_of` and `min_identity`."""

    model_config = ConfigDict(extra="forbid")

    max_candidates: int = Field(DEFAULT_MAX_CANDIDATES, ge=1, le=64, description="Images one request may generate "
                                "in all (best_of, times the rounds min_identity adds); a best_of above it (or "
                                f"above {MAX_BEST_OF}) answers 400.")


class AppConfig(BaseModel):
    """The application's `args`: only what builds the models and where things are stored. Ray hashes `args` into
    the code version, so a change here restarts every replica; live knobs are each deployment's `user_config`."""

    model_config = ConfigDict(extra="forbid")

    weights: WeightsConfig
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    output_uri: str = Field("file:///tmp/instantid-outputs", description="file:// or s3:// prefix for outputs.")
    allowed_input_buckets: list[str] = Field(default_factory=list, description="s3:// inputs only from these.")
    allow_url_inputs: bool = Field(False, description="Fetch http(s) image URLs server-side (off: SSRF risk).")
    allowed_url_hosts: list[str] = Field(default_factory=list, description="With allow_url_inputs: the only hosts "
                                         "URLs may name (exact host names; redirects are not followed).")
    allowed_webhook_hosts: list[str] = Field(default_factory=list, description="Job webhooks only to these hosts "
                                             "(exact host names; default none; redirects are not followed).")
    jobs: JobsConfig | None = Field(None, description="The async jobs API (/v1/jobs) on a Redis broker; null: "
                                    "/v1/jobs answers 503. With it the app has a sixth deployment, JobConsumer.")
    safety: SafetyConfig | None = Field(None, description="The safety stage (a SafetyChecker deployment between the "
                                        "Denoiser and the writer); null: none, and outputs say `checked: false`.")
    scoring: ScoringConfig | None = Field(None, description="Score each output's identity (per image in the "
                                          "response, sidecar, job result and metrics) and allow best_of / "
                                          "min_identity; null: no scores, and best_of > 1 answers 400.")
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
    prompt_device: str | None = Field(None, description="Where the PromptEncoder's text encoders run; default "
                                      "pipeline.device. `cpu` (in float32) frees the GPU share: then give the "
                                      "PromptEncoder CPU-node resources and no num_gpus.")

    @property
    def notice(self) -> str | None:
        """TINY_PRESET_NOTICE on the tiny preset; None with real weights."""
        return TINY_PRESET_NOTICE if self.weights.preset == "tiny" else None

    def prompt_pipeline(self) -> PipelineSettings:
        """The pipeline settings the PromptEncoder loads its text encoders with (its embeddings cross to the
        Denoiser as float32 numpy whatever device made them)."""
        if not self.prompt_device or self.prompt_device == self.pipeline.device:
            return self.pipeline
        update: dict[str, Any] = {"device": self.prompt_device}
        if self.prompt_device == "cpu":
            update["dtype"] = "float32"  # half precision on CPU is slow and not what the CPU kernels are tuned for
        return self.pipeline.model_copy(update=update)

    def safety_pipeline(self) -> PipelineSettings:
        """The pipeline settings the safety checker loads with (`safety.device` over pipeline.device)."""
        device = self.safety.device if self.safety else None
        if not device or device == self.pipeline.device:
            return self.pipeline
        return self.pipeline.model_copy(update={"device": device, **({"dtype": "float32"} if device == "cpu" else {})})

    @model_validator(mode="before")
    @classmethod
    def _live_knobs_are_not_args(cls, data: Any) -> Any:
        moved = {"deployments": "applications[].deployments[]", "max_batch_size": "Denoiser",
                 "batch_wait_timeout_s": "Denoiser", "face_cache_bytes": "FaceAnalysis (cache_bytes)",
                 "prompt_cache_bytes": "PromptEncoder (cache_bytes)", "inline_max_pixels": "OutputWriter",
                 **{k: "Ingress" for k in IngressSettings.model_fields}}
        if isinstance(data, dict):
            for key in data:
                if key in moved:
                    where = moved[key] if key == "deployments" else f"the {moved[key]} user_config"
                    raise ValueError(f"{key} is not an app arg any more: it goes in {where} (a live setting, "
                                     "changed without restarting replicas)")
        return data

    @model_validator(mode="after")
    def _url_inputs_name_their_hosts(self) -> AppConfig:
        if self.allow_url_inputs and not self.allowed_url_hosts:
            raise ValueError("allow_url_inputs needs allowed_url_hosts: fetching any host would let a request "
                             "reach internal services")
        return self

    @model_validator(mode="after")
    def _safety_names_its_weights(self) -> AppConfig:
        sources = self.weights.sources
        if self.safety is not None and sources is not None and not sources.safety_checker:
            raise ValueError("safety needs weights.sources.safety_checker (e.g. "
                             "CompVis/stable-diffusion-safety-checker): real sources never fall back to a default")
        return self


class AppSpec(BaseModel):
    """A whole `instantid` application: its args and its deployments' options (Serve's shape), as
    `serve_config.yaml` carries them and as Python callers (tests, bench) build it."""

    model_config = ConfigDict(extra="forbid")

    args: AppConfig
    deployments: list[DeploymentEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> AppSpec:
        names = [d.name for d in self.deployments]
        if len(set(names)) != len(names):
            raise ValueError(f"deployments: a name appears twice in {names}")
        denoiser = self.options("Denoiser")
        if denoiser["max_ongoing_requests"] < self.settings("Denoiser").max_batch_size:
            raise ValueError("Denoiser: max_ongoing_requests must be >= user_config.max_batch_size or batches can "
                             "never fill")
        jobs, stage_timeout_s = self.args.jobs, self.settings("Ingress").stage_timeout_s
        if jobs is not None and jobs.run_timeout_s <= stage_timeout_s:
            raise ValueError(f"jobs.run_timeout_s ({jobs.run_timeout_s:g}) must exceed the Ingress's "
                             f"user_config.stage_timeout_s ({stage_timeout_s:g}), or a job's run is abandoned "
                             "before the Ingress answers it")
        consumer = self.entry(JOB_CONSUMER)
        if jobs is not None and self.options(JOB_CONSUMER)["graceful_shutdown_timeout_s"] < jobs.run_timeout_s:
            raise ValueError(f"JobConsumer: graceful_shutdown_timeout_s must reach jobs.run_timeout_s "
                             f"({jobs.run_timeout_s:g}), or a scale-down or drain abandons a running job to the "
                             "visibility timeout")
        if consumer is not None and jobs is None:
            raise ValueError("deployments: JobConsumer runs the async jobs: set `jobs` in args or remove its entry "
                             "(Serve refuses options for a deployment the app does not have)")
        if self.entry(SAFETY_CHECKER) is not None and self.args.safety is None:
            raise ValueError("deployments: SafetyChecker runs the safety stage: set `safety` in args or remove its "
                             "entry (Serve refuses options for a deployment the app does not have)")
        if consumer is not None and consumer.autoscaling_config is not None:
            # Serve replaces a bound autoscaling_config with a file's whole, which would drop the queue-length policy.
            raise ValueError("JobConsumer: its autoscaling comes from args.jobs.consumer_autoscaling (build_app adds "
                             "the queue-length policy); remove autoscaling_config from its deployments entry")
        return self

    def entry(self, name: str) -> DeploymentEntry | None:
        return next((d for d in self.deployments if d.name == name), None)

    def options(self, name: str) -> dict[str, Any]:
        """The Serve options `name` is bound with: DEFAULT_OPTIONS, the entry's keys over them, and `user_config`
        always set (its model's defaults filled in), so reconfigure() runs on every replica start. The JobConsumer
        has no user_config; its autoscaling_config is args.jobs.consumer_autoscaling (build_app adds the policy)."""
        entry = self.entry(name)
        given = entry.model_dump(mode="json", exclude_none=True, exclude={"name"}) if entry else {}
        chosen = {**DEFAULT_OPTIONS[name], **given}
        settings = self.settings(name)
        if settings is not None:
            chosen["user_config"] = settings.model_dump(mode="json")
        if name == JOB_CONSUMER and self.args.jobs is not None:
            chosen["autoscaling_config"] = self.args.jobs.consumer_autoscaling.model_dump(mode="json")
        return chosen

    def settings(self, name: str) -> Any:
        entry = self.entry(name)
        model = SETTINGS[name]
        return entry.settings() if entry else (model() if model else None)

    def stages(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, options) of the app's deployments as they are bound (see `options`): the five stages, the
        JobConsumer when args has `jobs` and the SafetyChecker when it has `safety`."""
        return [(name, self.options(name)) for name in DEPLOYMENT_NAMES
                if name not in OPTIONAL_STAGES or getattr(self.args, OPTIONAL_STAGES[name]) is not None]

    @property
    def ingress(self) -> IngressSettings:
        return self.settings("Ingress")

    @property
    def denoiser(self) -> DenoiserSettings:
        return self.settings("Denoiser")


def load_serve_config(path: Path = SERVE_CONFIG_PATH) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def app_entry(serve_config: dict[str, Any]) -> dict[str, Any]:
    (app,) = [a for a in serve_config["applications"] if a["name"] == APP_NAME]
    return app


def app_spec(serve_config: dict[str, Any]) -> AppSpec:
    """The `instantid` application of a loaded Serve config, validated: args, every deployments[] entry and
    its user_config."""
    app = app_entry(serve_config)
    return AppSpec.model_validate({"args": app.get("args", {}), "deployments": app.get("deployments", [])})


def validate_serve_config(serve_config: dict[str, Any]) -> AppSpec:
    """The whole file as `serve deploy` reads it: Serve's own schema (ServeDeploySchema: every Serve option of every
    entry, http_options, logging_config) and then our models. Raises ValueError (pydantic's ValidationError)."""
    from ray.serve.schema import ServeDeploySchema  # Ray only where a whole Serve file is checked

    ServeDeploySchema.parse_obj(serve_config)
    return app_spec(serve_config)


def app_config_from_serve_config(path: Path = SERVE_CONFIG_PATH) -> AppConfig:
    """The AppConfig (args) carried by the `instantid` application of a Serve config file."""
    return app_spec(load_serve_config(path)).args


def main(argv: list[str] | None = None) -> None:
    """`python -m instantid_app.config [FILE]`: every deployment's options as they are bound for a Serve config
    file (defaults filled in), so an operator sees what a short file runs with."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    spec = app_spec(load_serve_config(Path(args[0]) if args else SERVE_CONFIG_PATH))
    print(yaml.safe_dump({"args": spec.args.model_dump(mode="json", exclude_none=True),
                          "deployments": [{"name": name, **options} for name, options in spec.stages()]},
                         sort_keys=False), end="")


if __name__ == "__main__":
    main()
