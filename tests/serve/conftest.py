"""The serve package's fixtures: one Ray on loopback (Serve's HTTP proxy on a free 127.0.0.1 port) and two apps on
it, both on the session's tiny preset, writing to the S3 test server:

- `served_app` ("instantid" at /): the app as a user runs it, with every extension the suite exercises (LoRAs incl.
  a preset and files that are not LoRAs, the pose ControlNet beside the preset's canny and depth, async jobs and
  webhooks, the safety checker in block mode that a request may turn off) and two Denoiser replicas (LoRA sets are
  routed to the replica that holds them);
- `keyed_app` ("keyed" at /keyed): API keys with per-key rate limits, a short stage timeout, a Denoiser that takes
  one request at a time with a queue of one, URL inputs from 127.0.0.1, and the safety checker in blur mode.

Both apps' tiny safety checker flags only images close to its pattern (tests/serve/test_safety.py); the tiny
pipeline's ordinary outputs score far below its threshold (tests/unit/test_safety.py), so no other test is flagged.

Package-scoped: both apps are deployed together (the first serve test waits for both) and deleted, and Ray shut
down, when the last serve test has run; the cluster tests, which start Rays of their own, have ended before the first
serve test starts this one.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
import torch
import yaml
from safetensors.torch import save_file

from testkit.api import FAST, b64
from testkit.net import free_port, wait_ready, wait_until
from testkit.serve import ServedApp, deploy, small_stage_options

WEBHOOK_SECRET = "test-webhook-secret"  # only ever in this test app's consumer environment
# Logical CPUs for the session's Ray: the two apps' 14 replicas ask 0.1 each, a batch job's tasks and actors 3.5
# (prompt encoding 1, face 1, denoise 1, writer 0.5), the caller app 0.1; the rest is headroom, not parallelism.
RAY_CPUS = 6
# Each worker hands its metrics to Ray's exporter every 10 s by default; the metric tests (jobs backlog, safety
# counters) wait for what a request changed to show on the metrics port, so the session's Ray reports every 2 s.
METRICS_SYSTEM_CONFIG = {"metrics_report_interval_ms": 2000}
SAFETY_OPTIONS = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 0.1}}


@pytest.fixture(scope="package")
def ray_instance(s3_server: str, redis_url: str) -> Iterator[int]:
    """Ray on loopback with Serve's HTTP proxy on a free 127.0.0.1 port (yielded); after Redis and the S3 server
    start and before they stop, so no job consumer outlives its broker."""
    import os

    import ray
    from ray import serve

    # Workers inherit the S3 test server's AWS_* variables from this process (s3_server set them), as pods do from
    # their environment; putting credentials in a runtime_env would write them into Ray's own logs.
    assert all(name in os.environ for name in ("AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY"))
    # Replicas' logs stay in the session's logs folder, where the log tests read them; streaming every access-log
    # line to this process cost it CPU the other worker wants.
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _node_ip_address="127.0.0.1", _system_config=METRICS_SYSTEM_CONFIG)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


def _new_bucket(prefix: str) -> str:
    bucket = f"{prefix}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="package")
def webhook_secret() -> str:
    return WEBHOOK_SECRET


def _deploy_served(ray_instance: int, tiny_root: Path, redis_url: str,
                   tmp_path_factory: pytest.TempPathFactory) -> ServedApp:
    """The app with batching that waits long enough for concurrent clients to meet; the safety checker in block mode
    (a request may turn it off); async jobs on the session's Redis (short visibility timeout and lease: a consumer
    killed in a test is replaced in seconds; webhooks to a receiver on loopback, signed); LoRAs: the preset's
    tiny-style, `fast-style` (tiny-style with steps and guidance of its own) and two files that are not LoRAs for
    this UNet (`not-a-lora`, `sdxl-sized`); ControlNets: the preset's canny and depth, and pose; identity scoring
    (best_of, min_identity) up to 6 candidates."""
    bad = tmp_path_factory.mktemp("bad-loras")
    save_file({"foo.weight": torch.zeros(2, 2)}, str(bad / "not-a-lora.safetensors"))
    # A LoRA for the real SDXL UNet (1280-wide attention) does not fit the tiny one.
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{key}.lora_A.weight": torch.zeros(4, 1280), f"{key}.lora_B.weight": torch.zeros(1280, 4)},
              str(bad / "sdxl-sized.safetensors"))
    fast_style = {"source": str(tiny_root / "loras" / "tiny-style.safetensors"), "steps": 2, "guidance": 1.0}
    jobs_options = {"max_ongoing_requests": 2,
                    "ray_actor_options": {"num_cpus": 0.1, "runtime_env": {
                        "env_vars": {"INSTANTID_WEBHOOK_SECRET": WEBHOOK_SECRET}}}}
    args = {"allowed_webhook_hosts": ["127.0.0.1"],
            "jobs": {"broker_url": redis_url, "broker_url_env": None, "visibility_timeout_s": 8, "lease_s": 4,
                     "webhook_backoff_s": 0.2, "queue_poll_interval_s": 1,
                     "consumer_autoscaling": {"min_replicas": 1, "max_replicas": 1}},
            "loras": {"broken": str(bad), "fast-style": fast_style},
            "controlnets": {"pose": str(tiny_root / "controlnets" / "pose")},
            "safety": {"mode": "block", "allow_request_disable": True},
            "scoring": {"max_candidates": 6},  # the tiny preset's second recogniser scores every output
            "pipeline": {"face_detail_size": 128}}  # face_detail regenerates the crop at 128 px: seconds on CPU
    options = {**small_stage_options(autoscaling_config={"min_replicas": 2, "max_replicas": 2}),
               "JobConsumer": jobs_options, "SafetyChecker": SAFETY_OPTIONS}
    live = {"Denoiser": {"batch_wait_timeout_s": 0.3, "max_batch_size": 8}}
    return deploy(ray_instance, "instantid", "/", args, _new_bucket("serve"), tiny_root, options=options,
                  user_config=live, wait=False)


@pytest.fixture(scope="package")
def api_keys() -> dict[str, str]:
    """The keyed app's keys by name: `full` (generate, jobs), `poller` (jobs), `load` (generate: the overload
    test's own rate bucket), `play` (the playground's), and `unknown` (in no file)."""
    return {name: f"{name}-{secrets.token_hex(16)}" for name in ("full", "poller", "load", "play", "unknown")}


def _deploy_keyed(ray_instance: int, tiny_root: Path, api_keys: dict[str, str],
                  tmp_path_factory: pytest.TempPathFactory) -> ServedApp:
    """The app under /keyed with keys from a file, a per-key rate limit (30/min, a burst of 12), a 4 s stage
    timeout, a Denoiser that takes one request at a time with a queue of one and batches of one, URL inputs
    from 127.0.0.1 and the safety checker in blur mode (requests may not turn it off); no jobs API, no pose
    ControlNet."""
    keys_file = tmp_path_factory.mktemp("keys") / "api-keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [
        {"name": "full", "key": api_keys["full"], "actions": ["generate", "jobs"]},
        {"name": "poller", "key": api_keys["poller"], "actions": ["jobs"]},
        {"name": "load", "key": api_keys["load"], "actions": ["generate"]},
        {"name": "play", "key": api_keys["play"]},
    ]}))
    stages = small_stage_options(max_ongoing_requests=1, max_queued_requests=1)
    live = {"Denoiser": {"max_batch_size": 1},
            "Ingress": {"stage_timeout_s": 4, "access": {"api_keys_file": str(keys_file), "rate_limit_per_minute": 30,
                                                         "rate_limit_burst": 12}}}
    args = {"allow_url_inputs": True, "allowed_url_hosts": ["127.0.0.1"], "safety": {"mode": "blur"}}
    return deploy(ray_instance, "keyed", "/keyed", args, _new_bucket("keyed"), tiny_root,
                  options={**stages, "SafetyChecker": SAFETY_OPTIONS}, user_config=live, wait=False)


def _warm_up(app: ServedApp, face: bytes, headers: dict[str, str]) -> None:
    """One cheap request answered 200, so no test's first request pays for cold models and caches. The keyed app's
    4 s stage timeout can cut a cold request short while the other xdist worker loads the machine (seen in CI); a
    504 leaves its work running and warming, so the warm-up asks again until one is answered in time."""
    body = {"face_image": b64(face), "prompt": "x", **FAST}
    wait_until(lambda: httpx.post(f"{app.url}/v1/generate", json=body, headers=headers, timeout=60).status_code == 200,
               120, f"a warm-up request to {app.name} answered 200", 1)


@pytest.fixture(scope="package")
def session_apps(ray_instance: int, tiny_root: Path, redis_url: str, api_keys: dict[str, str],
                 astronaut_bytes: bytes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServedApp]]:
    """Both apps, deployed together so that their replicas start side by side (the package's longest wait), both
    ready and warmed before a test uses either; deleted when the package ends."""
    from ray import serve

    apps = {"served": _deploy_served(ray_instance, tiny_root, redis_url, tmp_path_factory),
            "keyed": _deploy_keyed(ray_instance, tiny_root, api_keys, tmp_path_factory)}
    for app in apps.values():
        wait_ready(app.url)
    _warm_up(apps["served"], astronaut_bytes, {})
    _warm_up(apps["keyed"], astronaut_bytes, {"Authorization": f"Bearer {api_keys['full']}"})
    yield apps
    for app in apps.values():
        serve.delete(app.name)


@pytest.fixture(scope="package")
def served_app(session_apps: dict[str, ServedApp]) -> ServedApp:
    return session_apps["served"]


@pytest.fixture(scope="package")
def keyed_app(session_apps: dict[str, ServedApp]) -> ServedApp:
    return session_apps["keyed"]


@pytest.fixture(scope="package")
def library(served_app: ServedApp):
    """The same weights through the plain library: what every served result must equal."""
    from instantid_core.pipeline import InstantIDPipeline

    return InstantIDPipeline.from_root(served_app.tiny_dir)
