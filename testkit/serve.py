"""Deploying the `instantid` app for a test on the session's Ray, and finding its replica actors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from testkit.net import wait_ready


@dataclass(frozen=True)
class ServedApp:
    name: str  # the Serve application's name
    url: str  # http://127.0.0.1:PORT[/prefix]
    bucket: str
    tiny_dir: Path
    config: object  # instantid_app.config.AppSpec: args + every deployment's options and user_config


def small_stage_options(**denoiser) -> dict[str, dict]:
    """CPU-light options (deployment name -> Serve options), one replica each, so the apps fit a 2-core machine;
    `denoiser` options go over the Denoiser's."""
    one = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 0.1}}
    return {"Ingress": {**one, "max_ongoing_requests": 32}, "FaceAnalysis": one, "PromptEncoder": one,
            "OutputWriter": one, "Denoiser": {**one, "max_ongoing_requests": 16, **denoiser}}


def deploy(port: int, name: str, route_prefix: str, args: dict, bucket: str, tiny_dir: Path,
           options: dict[str, dict] | None = None, user_config: dict[str, dict] | None = None,
           wait: bool = True) -> ServedApp:
    """Deploy the app under `name` and (with `wait`) wait until it is ready: `args` over the test's (tiny preset,
    the S3 bucket), `options` (deployment name -> Serve options, default small_stage_options()) and `user_config`
    (deployment name -> its live settings). Delete it with `serve.delete(app.name)`."""
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
    if wait:
        wait_ready(url)
    return ServedApp(name, url, bucket, tiny_dir, config)


def replica_actors(deployment: str | None = None, app: str = "instantid") -> list[str]:
    """Names of the live replica actors of `app` (of one `deployment`, or all). A replica that Serve replaces comes
    back under a new name."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#" + (f"{deployment}#" if deployment else "")
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith(prefix))


def kill_replica(name: str) -> None:
    """Kill one replica actor for good (Serve starts a new one in its place)."""
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def wait_replaced(deployment: str, killed: list[str], app: str = "instantid", timeout_s: float = 90) -> list[str]:
    """Until `deployment` runs as many replica actors as `killed` had, none of them; returns their names."""
    from testkit.net import wait_until

    def replaced() -> list[str]:
        now = replica_actors(deployment, app)
        return now if len(now) >= len(killed) and not set(now) & set(killed) else []

    return wait_until(replaced, timeout_s, f"{app}'s {deployment} replicas {killed} replaced", interval_s=0.5)


def ongoing_requests(name: str) -> int:
    """How many requests the replica actor `name` is handling now: the count Serve's router probes it for (the
    replica actor's own method; no public API reports a replica's in-flight requests)."""
    import ray

    return ray.get(ray.get_actor(name, namespace="serve").get_num_ongoing_requests.remote(), timeout=30)
