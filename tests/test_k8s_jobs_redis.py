"""The async jobs' Redis in the cluster (k8s/components/jobs-redis, on in the cpu-demo overlay): the app's broker
URL names its Service, only the Ray pods may connect, and the arguments the manifest gives redis-server start a
real server that keeps queued jobs and job records across a kill, on the volume the manifest mounts, and refuses
writes rather than evicting jobs when full."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from testkit.k8s import one, rendered, validate
from testkit.net import free_port
from testkit.redis import wait_for_redis


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


def redis_container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (container,) = named(docs, "Deployment", "instantid-jobs-redis")["spec"]["template"]["spec"]["containers"]
    return container


def test_the_jobs_redis_writes_to_a_persistent_volume() -> None:
    docs = rendered("cpu-demo")
    pod = named(docs, "Deployment", "instantid-jobs-redis")["spec"]["template"]["spec"]
    assert "--dir" not in redis_container(docs)["args"]  # redis-server writes to its working directory
    data_dir = redis_container(docs)["workingDir"]
    (mount,) = [m for m in redis_container(docs)["volumeMounts"] if m["mountPath"] == data_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = named(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_the_manifests_redis_keeps_queued_jobs_across_a_kill_and_refuses_writes_when_full(tmp_path: Path) -> None:
    import os
    import signal
    import time

    from ray.serve.task_consumer import instantiate_adapter_from_config

    from deployments.jobs.store import JobStore
    from deployments.jobs.task_queue import TASK_NAME, task_processor_config
    from deployments.schemas import JobStatus
    from instantid_app.config import JobsConfig

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make redis-server` (Debian's redis-server)")
    container = redis_container(rendered("cpu-demo"))
    port = free_port()

    def start() -> subprocess.Popen:
        # The manifest's arguments as given; only where it listens and its folder differ (loopback, a free port).
        process = subprocess.Popen([binary, *container["args"], "--port", str(port), "--bind", "127.0.0.1",
                                    "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for_redis(process, port)
        return process

    process = start()
    try:
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, decode_responses=True)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        limit_mib = int(container["resources"]["limits"]["memory"].removesuffix("Mi"))
        assert 0 < int(client.config_get("maxmemory")["maxmemory"]) < limit_mib * 2**20  # below the OOM kill
        jobs = JobsConfig(broker_url=url, broker_url_env=None)
        store = JobStore(url, jobs.status_ttl_s)
        queue = instantiate_adapter_from_config(task_processor_config(jobs))
        for i in range(3):
            now = time.time()
            store.create(JobStatus(job_id=f"job{i}", status="queued", created_at=now, updated_at=now))
            queue.enqueue_task_sync(TASK_NAME, args=[f"job{i}", {}], task_id=f"job{i}")
        time.sleep(1.5)  # appendfsync everysec: what is a second old is on disk
        os.kill(process.pid, signal.SIGKILL)  # as an OOM kill or a node loss: no shutdown save
        process.wait(timeout=10)
        process = start()
        assert client.llen(jobs.queue_name) == 3  # the queued messages came back
        assert [store.get(f"job{i}").status for i in range(3)] == ["queued"] * 3
        assert store.backlog().queued == 3
        client.config_set("maxmemory", "1")
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            store.create(JobStatus(job_id="one-too-many", status="queued", created_at=1.0, updated_at=1.0))
        assert client.llen(jobs.queue_name) == 3 and store.get("job0") is not None  # nothing evicted
    finally:
        if process.poll() is None:
            process.kill()
