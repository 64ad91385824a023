"""Handle calls from another app and serve_config.yaml as AppConfig (replica death: tests/serve/test_faults.py)."""

from __future__ import annotations

import yaml
from ray import serve

from instantid_app.config import SERVE_CONFIG_PATH, AppConfig, app_config_from_serve_config, validate_serve_config
from testkit.api import b64

FAST = {"steps": 3, "width": 128, "height": 128}


def test_a_second_app_calls_instantid_through_its_handle(served_app, astronaut_bytes):
    from deployments.schemas import GenerateRequest, GenerateResponse
    from testkit.caller_app import app

    caller = serve.run(app, name="caller", route_prefix="/caller")
    try:
        response = caller.remote(GenerateRequest(face_image=b64(astronaut_bytes), prompt="x", seed=9,
                                                 **FAST)).result(timeout_s=120)
        assert isinstance(response, GenerateResponse) and response.seed == 9 and response.images
    finally:
        serve.delete("caller")


def test_serve_config_yaml_is_an_appconfig_with_serve_build_structure():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(SERVE_CONFIG_PATH.read_text())
    ServeDeploySchema.parse_obj(config)  # what `serve deploy` / `serve run` accept
    assert set(config) <= {"proxy_location", "http_options", "grpc_options", "logging_config", "applications"}
    (app,) = config["applications"]
    assert app["name"] == "instantid" and app["import_path"] == "deployments.app:build_app"
    parsed = app_config_from_serve_config()
    assert parsed == AppConfig.model_validate(app["args"])
    # Every option in the file survives validation (nothing silently dropped by the model), and reaches the binding.
    spec = validate_serve_config(config)
    for entry in app.get("deployments", []):  # the file lists only what it changes (none, in the demo)
        bound = spec.options(entry["name"])
        given = {k: v for k, v in entry.items() if k != "name"}
        assert _within(given, bound), (entry["name"], given, bound)  # the bound options also fill in defaults


def _within(given: object, bound: object) -> bool:
    """Every key and value of `given` is in `bound` (mappings recursively; the bound side may have more keys)."""
    if isinstance(given, dict):
        return isinstance(bound, dict) and all(k in bound and _within(v, bound[k]) for k, v in given.items())
    return given == bound


def test_build_app_binds_the_five_stages_and_the_job_consumer_from_the_file():
    from ray.serve._private.build_app import build_app as serve_build

    from deployments.app import build_app

    config = validate_serve_config(yaml.safe_load(SERVE_CONFIG_PATH.read_text()))
    built = serve_build(build_app(config.args), name="instantid")
    assert {d.name for d in built.deployments} == {"Ingress", "FaceAnalysis", "PromptEncoder", "Denoiser",
                                                   "OutputWriter", "JobConsumer"}
    # A request refused at any full queue, the Ingress's own included (Serve's proxy answers that one), gets
    # Retry-After. The JobConsumer takes its work from the broker, never from a caller's queue.
    called = [d for d in built.deployments if d.name != "JobConsumer"]
    assert {d.backpressure_config.retry_after_s for d in called} == {config.ingress.retry_after_s}
    (consumer,) = [d for d in built.deployments if d.name == "JobConsumer"]
    policy = consumer._deployment_config.autoscaling_config.policy  # scales on the queue, whatever the file's entry
    assert policy.policy_function == "deployments.jobs.task_queue:JobQueuePolicy"



def test_safety_in_args_binds_a_safety_checker_that_answers_a_full_queue_with_retry_after():
    from ray.serve._private.build_app import build_app as serve_build

    from deployments.app import build_app

    config = validate_serve_config(yaml.safe_load(SERVE_CONFIG_PATH.read_text()))
    args = {**config.args.model_dump(mode="json"), "jobs": None, "safety": {"mode": "flag"}}
    built = serve_build(build_app(args), name="instantid")
    assert {d.name for d in built.deployments} == {"Ingress", "FaceAnalysis", "PromptEncoder", "Denoiser",
                                                   "OutputWriter", "SafetyChecker"}
    (safety,) = [d for d in built.deployments if d.name == "SafetyChecker"]
    assert safety.backpressure_config.retry_after_s == config.ingress.retry_after_s

def test_url_inputs_need_an_allow_list_of_hosts():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="allowed_url_hosts"):
        AppConfig.model_validate({"weights": {"preset": "tiny"}, "allow_url_inputs": True})
    assert AppConfig.model_validate({"weights": {"preset": "tiny"}, "allow_url_inputs": True,
                                     "allowed_url_hosts": ["images.example.com"]})
