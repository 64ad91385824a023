"""The app's config models: Serve's shape (args / deployments[] / user_config), weights that never fall back."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.jobs.task_queue import task_processor_config
from instantid_app.config import (
    DEFAULT_OPTIONS,
    SERVE_CONFIG_PATH,
    AppConfig,
    AppSpec,
    app_entry,
    app_spec,
    load_serve_config,
    validate_serve_config,
)
from instantid_app.weights import resolve_app_weights
from instantid_core.config import ModelSources
from instantid_core.errors import WeightsError

TINY = {"preset": "tiny"}


def test_serve_config_yaml_is_serves_shape_and_every_entry_validates() -> None:
    config = load_serve_config()
    spec = validate_serve_config(config)  # Serve's ServeDeploySchema, then ours
    app = app_entry(config)
    assert set(app["args"]) <= set(AppConfig.model_fields)
    assert "jobs" in app["args"]  # an app setting, not a deployment's: the file's app has the sixth deployment
    assert [name for name, _ in spec.stages()] == ["Ingress", "FaceAnalysis", "PromptEncoder", "Denoiser",
                                                   "OutputWriter", "JobConsumer"]
    assert "user_config" not in spec.options("JobConsumer")
    for entry in app.get("deployments", []):  # what the file changes reaches reconfigure() as given
        bound = spec.options(entry["name"]).get("user_config", {})
        assert {k: bound[k] for k in entry.get("user_config", {})} == entry.get("user_config", {})
    assert config["logging_config"]["encoding"] == "JSON"
    assert spec.args.weights.preset == "tiny"  # named explicitly, never a default


@pytest.mark.parametrize("weights, message", [
    ({"preset": "tiny", "sources": {}}, "not both"),
    ({}, "name the real weights"),
    ({"tiny_preset_dir": "/tmp/x"}, "tiny_preset_dir is gone"),
    ({"sources": {}, "preset_dir": "/tmp/x"}, "preset_dir is only read"),
])
def test_weights_are_the_preset_or_sources_never_both_and_never_by_default(weights: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AppConfig.model_validate({"weights": weights})
    with pytest.raises(ValidationError, match="weights"):
        AppConfig.model_validate({})


@pytest.mark.parametrize("weights", [TINY, {"preset": "tiny", "preset_dir": "/tmp/x"}, {"sources": {}}])
def test_args_survive_the_dump_every_replica_validates_again(weights: dict) -> None:
    config = AppConfig.model_validate({"weights": weights, "jobs": {}})
    assert AppConfig.model_validate(config.model_dump(mode="json")) == config  # what build_app binds
    if weights.get("preset"):
        assert config.weights.tiny_dir == weights.get("preset_dir", "/tmp/instantid-tiny")


def test_real_sources_never_touch_the_tiny_preset_and_a_missing_one_names_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    config = AppConfig.model_validate({"weights": {"sources": ModelSources.from_root(str(missing)).model_dump()}})
    with pytest.raises(WeightsError, match=str(missing)):  # the error names the path; nothing stands in
        resolve_app_weights(config)


@pytest.mark.parametrize("key, where", [
    ("max_batch_size", "Denoiser user_config"), ("stage_timeout_s", "Ingress user_config"),
    ("face_cache_bytes", "FaceAnalysis"), ("deployments", "applications[].deployments[]"),
])
def test_a_live_knob_in_args_is_refused_with_where_it_goes(key: str, where: str) -> None:
    with pytest.raises(ValidationError, match=where.replace("[", r"\[").replace("]", r"\]")):
        AppConfig.model_validate({"weights": TINY, key: 1})


def test_deployment_entries_name_our_deployments_and_their_user_config_is_checked() -> None:
    with pytest.raises(ValidationError, match="unknown deployment 'Denoizer'"):
        AppSpec.model_validate({"args": {"weights": TINY}, "deployments": [{"name": "Denoizer"}]})
    with pytest.raises(ValidationError, match="max_batch_size"):
        AppSpec.model_validate({"args": {"weights": TINY},
                                "deployments": [{"name": "Denoiser", "user_config": {"max_batch_size": 0}}]})
    with pytest.raises(ValidationError, match="cache_size"):  # a misspelled setting is an error, not ignored
        AppSpec.model_validate({"args": {"weights": TINY},
                                "deployments": [{"name": "FaceAnalysis", "user_config": {"cache_size": 5}}]})
    with pytest.raises(ValidationError, match="batches can never fill"):
        AppSpec.model_validate({"args": {"weights": TINY}, "deployments": [
            {"name": "Denoiser", "max_ongoing_requests": 2, "user_config": {"max_batch_size": 4}}]})


def test_options_are_the_defaults_with_the_entry_over_them_and_user_config_always_set() -> None:
    spec = AppSpec.model_validate({"args": {"weights": TINY}, "deployments": [
        {"name": "Denoiser", "max_ongoing_requests": 32, "user_config": {"max_batch_size": 8}}]})
    options = spec.options("Denoiser")
    assert options["max_ongoing_requests"] == 32
    assert options["ray_actor_options"] == DEFAULT_OPTIONS["Denoiser"]["ray_actor_options"]  # not in the entry
    assert options["user_config"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}
    assert spec.options("Ingress")["user_config"]["max_body_bytes"] == 20 * 2**20  # reconfigure() always runs


def test_a_serve_schema_error_is_refused_before_our_models() -> None:
    config = copy.deepcopy(load_serve_config())
    app_entry(config)["deployments"] = [{"name": "Ingress", "max_ongoing_requests": "many"}]
    with pytest.raises(Exception, match="max_ongoing_requests"):
        validate_serve_config(config)
    assert yaml.safe_load(SERVE_CONFIG_PATH.read_text()) != config


def test_text_encoders_can_run_on_cpu_by_config_while_the_denoiser_uses_the_gpu() -> None:
    gpu = {"weights": TINY, "pipeline": {"device": "cuda", "dtype": "bfloat16"}}
    assert AppConfig.model_validate(gpu).prompt_pipeline().device == "cuda"  # default: the pipeline's device
    on_cpu = AppConfig.model_validate({**gpu, "prompt_device": "cpu"})
    assert (on_cpu.prompt_pipeline().device, on_cpu.prompt_pipeline().dtype) == ("cpu", "float32")
    assert (on_cpu.pipeline.device, on_cpu.pipeline.dtype) == ("cuda", "bfloat16")  # the Denoiser's, unchanged


JOBS = {"broker_url": "redis://127.0.0.1:1/0"}


def test_the_job_consumer_is_a_sixth_entry_only_with_jobs_and_takes_no_user_config() -> None:
    with pytest.raises(ValidationError, match="JobConsumer runs the async jobs"):
        AppSpec.model_validate({"args": {"weights": TINY}, "deployments": [{"name": "JobConsumer"}]})
    with pytest.raises(ValidationError, match="JobConsumer has no live settings"):
        AppSpec.model_validate({"args": {"weights": TINY, "jobs": JOBS},
                                "deployments": [{"name": "JobConsumer", "user_config": {"x": 1}}]})
    with pytest.raises(ValidationError, match="job_lease_s"):  # jobs lease through jobs.lease_s
        AppSpec.model_validate({"args": {"weights": TINY}, "deployments": [
            {"name": "Ingress", "user_config": {"job_lease_s": 30}}]})
    without = AppSpec.model_validate({"args": {"weights": TINY}})
    assert "JobConsumer" not in dict(without.stages())
    spec = AppSpec.model_validate({"args": {"weights": TINY, "jobs": {**JOBS, "consumer_autoscaling": {
        "min_replicas": 1, "max_replicas": 3}}}, "deployments": [{"name": "JobConsumer", "max_ongoing_requests": 1}]})
    options = dict(spec.stages())["JobConsumer"]
    assert options["autoscaling_config"]["max_replicas"] == 3 and options["max_ongoing_requests"] == 1


def test_a_files_job_consumer_entry_takes_no_autoscaling_config() -> None:
    # Serve replaces the bound autoscaling_config with the file's whole, which would drop the queue-length policy
    # build_app adds: the replicas are jobs.consumer_autoscaling instead.
    config = copy.deepcopy(load_serve_config())
    app_entry(config).setdefault("deployments", []).append(
        {"name": "JobConsumer", "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}})
    with pytest.raises(ValidationError, match="jobs.consumer_autoscaling"):
        validate_serve_config(config)


def test_a_jobs_run_outlasts_the_ingress_stage_timeout() -> None:
    with pytest.raises(ValidationError, match="run_timeout_s"):
        AppSpec.model_validate({"args": {"weights": TINY, "jobs": {**JOBS, "run_timeout_s": 100}}, "deployments": [
            {"name": "Ingress", "user_config": {"stage_timeout_s": 300}}]})


def test_a_job_whose_consumer_died_runs_again_within_five_minutes_by_default() -> None:
    jobs = app_spec(load_serve_config()).args.jobs
    assert jobs is not None and jobs.redelivery_bound_s <= 300
    options = task_processor_config(jobs).adapter_config.broker_transport_options
    # The bound's parts are what the broker is told: its sweep interval included.
    assert options["visibility_timeout"] + options["unacked_restore_interval"] * options["unacked_restore_throttle"] \
        + jobs.lease_s == jobs.redelivery_bound_s


def test_a_job_consumers_graceful_stop_outlasts_a_jobs_run() -> None:
    spec = app_spec(load_serve_config())
    assert spec.options("JobConsumer")["graceful_shutdown_timeout_s"] >= spec.args.jobs.run_timeout_s
    with pytest.raises(ValidationError, match="graceful_shutdown_timeout_s must reach jobs.run_timeout_s"):
        AppSpec.model_validate({"args": {"weights": TINY, "jobs": JOBS}, "deployments": [
            {"name": "JobConsumer", "graceful_shutdown_timeout_s": 60}]})
