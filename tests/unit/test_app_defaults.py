"""Every default has one home, the models in instantid_app.config (and instantid_core.config): Serve files hold only
what differs from them, the JobConsumer's queue policy is derived from `jobs` and never restated, and the batch job
reads every extension a config registers."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from instantid_app.config import (
    DEFAULT_OPTIONS,
    JOB_CONSUMER,
    SAFETY_CHECKER,
    SERVE_CONFIG_PATH,
    AppConfig,
    AppSpec,
    app_entry,
    app_spec,
    load_serve_config,
)
from instantid_app.settings import SETTINGS
from instantid_core.config import GenerateParams

REPO = Path(__file__).resolve().parents[2]
SERVE_FILES = [SERVE_CONFIG_PATH, *sorted((REPO / "k8s").rglob("serve_config.yaml"))]


def restated(given: Any, model: type[BaseModel]) -> list[str]:
    """Keys of `given` (a file's mapping for `model`) whose value equals the model's default, recursively."""
    same = []
    for name, value in (given or {}).items():
        info = model.model_fields.get(name)
        if info is None:
            continue
        default = info.get_default(call_default_factory=True)
        inner = info.annotation if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel) \
            else type(default) if isinstance(default, BaseModel) else None
        if inner is not None and isinstance(value, dict):
            same += [f"{name}.{key}" for key in restated(value, inner)]
        elif isinstance(default, BaseModel):
            continue
        elif value == (default.value if hasattr(default, "value") else default) or value == default:
            same.append(name)
    return same


def test_the_restated_finder_sees_a_restated_default_and_accepts_a_change() -> None:
    assert restated({"output_uri": "file:///tmp/instantid-outputs", "playground": False}, AppConfig) == ["output_uri"]
    assert restated({"pipeline": {"dtype": "float32", "device": "cuda"}}, AppConfig) == ["pipeline.dtype"]


@pytest.mark.parametrize("path", SERVE_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_a_serve_files_args_hold_only_what_differs_from_the_models(path: Path) -> None:
    args = app_entry(load_serve_config(path)).get("args", {})
    if "weights" in args:  # the preset folder is part of the weights' choice; a restated default is still one
        assert restated(args["weights"], AppConfig.model_fields["weights"].annotation) == []
    assert restated(args, AppConfig) == []


@pytest.mark.parametrize("path", SERVE_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_a_serve_files_deployment_entries_hold_only_what_differs_from_the_bound_defaults(path: Path) -> None:
    same = []
    for entry in app_entry(load_serve_config(path)).get("deployments", []):
        defaults = DEFAULT_OPTIONS[entry["name"]]
        same += [f"{entry['name']}.{key}" for key, value in entry.items() if key in defaults and defaults[key] == value]
        if SETTINGS[entry["name"]] is not None:
            same += [f"{entry['name']}.user_config.{key}"
                     for key in restated(entry.get("user_config"), SETTINGS[entry["name"]])]
    assert same == []


def test_a_job_consumer_entry_may_not_restate_its_autoscaling() -> None:
    # Serve would replace the bound autoscaling_config (which carries the queue-length policy) with the file's.
    with pytest.raises(ValidationError, match="jobs.consumer_autoscaling"):
        AppSpec.model_validate({"args": {"weights": {"preset": "tiny"}, "jobs": {}}, "deployments": [
            {"name": JOB_CONSUMER, "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}]})


def test_the_job_consumer_scales_on_its_own_queue_derived_from_jobs() -> None:
    from deployments.jobs.task_queue import JobQueuePolicy, consumer_autoscaling_config

    spec = app_spec(load_serve_config())
    jobs = spec.args.jobs.model_copy(update={"queue_name": "q2"})
    scaling = consumer_autoscaling_config(jobs)
    assert scaling["policy"]["policy_function"] == f"{JobQueuePolicy.__module__}:JobQueuePolicy"
    assert scaling["policy"]["policy_kwargs"]["queue_name"] == "q2"
    assert scaling["max_replicas"] == jobs.consumer_autoscaling.max_replicas


def test_a_short_file_binds_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    from instantid_app.config import main

    main([str(SERVE_CONFIG_PATH)])
    printed = yaml.safe_load(capsys.readouterr().out)
    bound = {entry.pop("name"): entry for entry in printed["deployments"]}
    # The file has jobs (the JobConsumer too) and no safety (the demo's images are noise: no SafetyChecker).
    assert set(bound) == set(DEFAULT_OPTIONS) - {SAFETY_CHECKER}
    assert bound["Denoiser"]["user_config"]["max_batch_size"] == SETTINGS["Denoiser"]().max_batch_size
    assert bound["OutputWriter"]["max_ongoing_requests"] == DEFAULT_OPTIONS["OutputWriter"]["max_ongoing_requests"]


def test_the_batch_job_reads_the_loras_controlnets_and_depth_model_its_config_registers(
        tmp_path: Path, tiny_root: Path) -> None:
    from batch.job import settings_from_args
    from batch.pairs import resolve_models

    lora = tiny_root / "loras" / "tiny-style.safetensors"
    config = load_serve_config()
    args = app_entry(config)["args"]
    args["loras"] = {"from-config": str(lora)}
    args["controlnets"] = {"canny": None}  # a null removes the weights' own
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = settings_from_args(argparse.Namespace(config=path, weights=str(tiny_root)))
    resolved = resolve_models(settings)
    assert "from-config" in resolved.loras and "tiny-style" in resolved.loras
    assert "canny" not in resolved.controlnets and "depth" in resolved.controlnets


def test_cli_flags_take_their_defaults_and_help_from_generate_params() -> None:
    from instantid_cli.main import PARAM_FLAGS, build_parser, params_from_args

    argv = ["generate", "--face", "f.jpg", "--out", "o", "--prompt", "a cat"]
    args = build_parser().parse_args(argv)
    assert params_from_args(args) == GenerateParams(prompt="a cat")  # every unset flag: the model's default
    changed = params_from_args(build_parser().parse_args([*argv, "--adapter-strength", "0.5", "--scheduler", "lcm"]))
    assert (changed.adapter_strength, changed.scheduler.value) == (0.5, "lcm")
    generate = next(a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                    if a.dest == "identitynet_strength")
    assert "default 0.8" in generate.help and str(GenerateParams.model_fields["identitynet_strength"].default) == "0.8"
    assert set(PARAM_FLAGS) <= set(GenerateParams.model_fields)


def test_the_makefile_writes_the_tiny_preset_where_the_app_reads_it() -> None:
    from instantid_app.config import DEFAULT_TINY_DIR

    (line,) = [line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith("TINY :=")]
    assert line.split(":=")[1].split("#")[0].strip() == DEFAULT_TINY_DIR
