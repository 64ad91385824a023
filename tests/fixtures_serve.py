"""Session fixtures: a real Ray instance on loopback with the `instantid` app (tiny preset) serving HTTP on
127.0.0.1 and writing to the S3 test server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from deployments.demo import free_port, wait_ready

WEBHOOK_SECRET = "test-webhook-secret"  # only ever in this test app's consumer environment


@dataclass(frozen=True)
class ServedApp:
    url: str  # http://127.0.0.1:PORT
    bucket: str
    tiny_dir: Path
    config: object  # instantid_app.config.AppSpec: args + every deployment's options and user_config


def small_stage_options(**denoiser) -> dict[str, dict]:
    """CPU-light options (deployment name -> Serve options) so several apps fit on a 2-core machine."""
    one = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 0.1}}
    return {"Ingress": {**one, "max_ongoing_requests": 32}, "FaceAnalysis": one, "PromptEncoder": one,
            "OutputWriter": one, "Denoiser": {**one, "max_ongoing_requests": 16, **denoiser}}


@pytest.fixture(scope="session")
def ray_instance(s3_server: str, redis_url: str) -> Iterator[int]:
    """Ray on loopback with Serve's HTTP proxy on a free 127.0.0.1 port (yielded); after Redis starts and before it
    stops, so no job consumer outlives its broker."""
    import ray
    from ray import serve

    # Workers inherit the S3 test server's AWS_* variables from this process (s3_server set them), as pods do from
    # their environment; putting credentials in a runtime_env would write them into Ray's own logs.
    assert all(name in os.environ for name in ("AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY"))
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # workers import tests.apps.* like the driver
    ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": env}, logging_level="WARNING",
             _node_ip_address="127.0.0.1")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from instantid_core.tiny import ensure_tiny_preset

    return ensure_tiny_preset(tmp_path_factory.mktemp("serve") / "tiny")


def deploy(port: int, name: str, route_prefix: str, args: dict, bucket: str, tiny_dir: Path,
           options: dict[str, dict] | None = None, user_config: dict[str, dict] | None = None) -> ServedApp:
    """Deploy the app: `args` over the test's (tiny preset, the S3 bucket), `options` (deployment name -> Serve
    options, default small_stage_options()) and `user_config` (deployment name -> its live settings)."""
    from ray import serve

    from deployments.app import build_app_from_spec
    from instantid_app.config import AppSpec

    options = options or small_stage_options()
    user_config = user_config or {}
    entries = [{"name": n, **options.get(n, {}), **({"user_config": user_config[n]} if n in user_config else {})}
               for n in sorted({*options, *user_config})]
    config = AppSpec.model_validate({"args": {
        "weights": {"preset": "tiny", "preset_dir": str(tiny_dir)}, "output_uri": f"s3://{bucket}/out",
        "allowed_input_buckets": [bucket], **args}, "deployments": entries})
    serve.run(build_app_from_spec(config), name=name, route_prefix=route_prefix, blocking=False)
    url = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    wait_ready(url)
    return ServedApp(url, bucket, tiny_dir, config)


@pytest.fixture(scope="session")
def served_app(ray_instance: int, s3_server: str, serve_tiny_dir: Path, redis_url: str) -> ServedApp:
    """The app as a user runs it, with batching that waits long enough for concurrent clients to meet, and async
    jobs on the session's Redis (short visibility timeout and lease: a consumer killed in a test is replaced in
    seconds; webhooks to a receiver on loopback, signed)."""
    bucket = f"serve-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    jobs_options = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "max_ongoing_requests": 2,
                    "ray_actor_options": {"num_cpus": 0.1, "runtime_env": {
                        "env_vars": {"INSTANTID_WEBHOOK_SECRET": WEBHOOK_SECRET}}}}
    args = {"allowed_webhook_hosts": ["127.0.0.1"],
            "jobs": {"broker_url": redis_url, "broker_url_env": None, "visibility_timeout_s": 8, "lease_s": 4,
                     "webhook_backoff_s": 0.2, "queue_poll_interval_s": 1}}
    live = {"Denoiser": {"batch_wait_timeout_s": 0.3, "max_batch_size": 8}}
    return deploy(ray_instance, "instantid", "/", args, bucket, serve_tiny_dir,
                  options={**small_stage_options(), "JobConsumer": jobs_options}, user_config=live)
