"""The async jobs' Redis in the cluster (k8s/components/jobs-redis, on in the cpu-demo overlay): the app's broker
URL names its Service, only the Ray pods may connect, and the arguments the manifest gives redis-server start a
real server that keeps nothing on disk."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from testkit.net import free_port
from testkit.redis import wait_for_redis
from tests.test_k8s import one, rendered, validate


def named(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def ray_pod_labels(rayservice: dict[str, Any]) -> list[dict[str, str]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["metadata"]["labels"] for group in groups]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_cpu_demo_points_the_app_at_the_redis_it_runs() -> None:
    import base64

    docs = rendered("cpu-demo")
    for doc in docs:
        validate(doc)
    secret = named(docs, "Secret", "instantid-jobs")
    broker = urlsplit(base64.b64decode(secret["data"]["INSTANTID_BROKER_URL"]).decode())
    service = named(docs, "Service", broker.hostname)
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == broker.port]
    deployment = named(docs, "Deployment", broker.hostname)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], pod_labels)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": port["targetPort"], "containerPort": 6379} in container["ports"]
    # Every Ray container reads INSTANTID_BROKER_URL from exactly this Secret.
    rayservice = one(docs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["INSTANTID_BROKER_URL"]["valueFrom"]["secretKeyRef"]["name"] == "instantid-jobs"


def test_only_the_ray_pods_reach_the_jobs_redis_and_it_is_not_one_of_them() -> None:
    docs = rendered("cpu-demo")
    deployment = named(docs, "Deployment", "instantid-jobs-redis")
    redis_labels = deployment["spec"]["template"]["metadata"]["labels"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    guarding = [p for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], redis_labels)]
    assert [p["metadata"]["name"] for p in guarding] == ["instantid-jobs-redis-from-ray"]
    (rule,) = guarding[0]["spec"]["ingress"]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}  # this namespace's pods only
    ray_labels = ray_pod_labels(one(docs, "RayService"))
    assert all(selects(source["podSelector"]["matchLabels"], labels) for labels in ray_labels)
    assert not selects(source["podSelector"]["matchLabels"], redis_labels)


def test_the_gpu_overlay_expects_its_own_managed_redis() -> None:
    docs = rendered("gpu")
    assert not [d for d in docs if d["kind"] == "Deployment"]
    assert not [d for d in docs if d["kind"] == "Secret"]  # instantid-jobs comes from k8s/secrets.template.yaml


def test_the_manifests_redis_arguments_start_a_server_that_keeps_nothing_on_disk(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make redis-server` (Debian's redis-server)")
    docs = rendered("cpu-demo")
    (container,) = named(docs, "Deployment", "instantid-jobs-redis")["spec"]["template"]["spec"]["containers"]
    port = free_port()
    # The manifest's arguments as given; only where it listens differs (loopback, a free port).
    process = subprocess.Popen([binary, *container["args"], "--port", str(port), "--bind", "127.0.0.1",
                                "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_redis(process, port)
        client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.set("probe", "x")
        client.shutdown(nosave=True)
        process.wait(timeout=10)
        assert list(tmp_path.iterdir()) == []  # no dump.rdb, no appendonly file
    finally:
        if process.poll() is None:
            process.kill()
