"""As an operator runs it: `ray start --head` (testkit.cluster, its own --temp-dir and free ports on 127.0.0.1),
`serve deploy serve_config.yaml`, edit the file, deploy again.

serve_config.yaml is deployed with only what a 2-core test machine and a private temp dir need changed (ports, CPU
shares, one replica per deployment, where the tiny preset and the outputs go); everything else is the file's.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from instantid_app.config import DEFAULT_OPTIONS, SERVE_CONFIG_PATH, app_entry, app_spec
from testkit.api import FAST, b64
from testkit.net import free_port

pytestmark = pytest.mark.slow


def _blank_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64)).save(out, "PNG")
    return out.getvalue()


BLANK_PNG = _blank_png()  # no face in it: a 422 no_face

# A driver in its own process (the test session may hold another Ray driver): the Denoiser's replica actors (id,
# pid, state) and what the replica reports it runs with.
DRIVER = """
import json, sys, ray
from ray import serve
from ray.util.state import list_actors
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
actors = [{"actor_id": a.actor_id, "pid": a.pid} for a in list_actors(address=sys.argv[1],
    filters=[("class_name", "=", "ServeReplica:instantid:Denoiser"), ("state", "=", "ALIVE")])]
live = serve.get_deployment_handle("Denoiser", app_name="instantid").live_settings.remote().result(timeout_s=60)
print(json.dumps({"actors": actors, "live": live, "metrics_ports": [n["MetricsExportPort"] for n in ray.nodes()
                                                                   if n["Alive"]]}))
"""


@dataclass
class Operator:
    cluster: Any  # testkit.cluster.LocalCluster
    config_path: Path
    http_port: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def serve(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.cluster.env}
        serve_cli = shutil.which("serve", path=str(Path(sys.executable).parent)) or shutil.which("serve") or "serve"
        return subprocess.run([serve_cli, *args, "-a", self.cluster.dashboard_url],
                              env=env, capture_output=True, text=True, timeout=timeout, check=False)

    def deploy(self, config: dict[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        done = self.serve("deploy", str(self.config_path))
        assert done.returncode == 0, done.stderr

    def app_status(self) -> dict[str, Any]:
        details = httpx.get(f"{self.cluster.dashboard_url}/api/serve/applications/", timeout=30).json()
        return details["applications"].get("instantid", {})

    def failure_text(self, status: dict[str, Any]) -> str:
        """What the app's status says went wrong: its message and each deployment's (Serve puts the replica's
        error, e.g. a bad user_config field or a missing weights path, on the deployment)."""
        return "\n".join([status.get("message", ""), *(d.get("message", "") for d in
                                                          status.get("deployments", {}).values())])

    def wait_running(self, timeout_s: float = 240) -> dict[str, Any]:
        deadline, status = time.monotonic() + timeout_s, {}
        while time.monotonic() < deadline:
            status = self.app_status()
            if status.get("status") == "RUNNING":
                return status
            if status.get("status") == "DEPLOY_FAILED":
                pytest.fail(f"deploy failed: {status.get('message')}")
            time.sleep(1)
        pytest.fail(f"instantid not RUNNING after {timeout_s}s: {status.get('status')} {status.get('message')}")

    def facts(self) -> dict[str, Any]:
        env = {**os.environ, **self.cluster.env}
        done = subprocess.run([sys.executable, "-c", DRIVER, self.cluster.address], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])


def operator_config(tiny_dir: Path, out_dir: Path, http_port: int, broker_url: str) -> dict[str, Any]:
    """serve_config.yaml with the test machine's changes only (the jobs' Redis is the session's own; one replica
    of each stage, each with a tenth of a CPU)."""
    config = yaml.safe_load(SERVE_CONFIG_PATH.read_text())
    config["http_options"].update(host="127.0.0.1", port=http_port)
    app = app_entry(config)
    app["args"]["weights"]["preset_dir"] = str(tiny_dir)
    app["args"]["output_uri"] = out_dir.as_uri()
    app["args"]["jobs"].update(broker_url=broker_url, broker_url_env=None)
    app["args"]["jobs"]["consumer_autoscaling"] = {"min_replicas": 1, "max_replicas": 1}
    deployed = {name for name, _ in app_spec(config).stages()}  # the file's app: no SafetyChecker without `safety`
    app["deployments"] = [{"name": name, "ray_actor_options": {**options.get("ray_actor_options", {}), "num_cpus": 0.1},
                           **({} if name == "JobConsumer" else {"autoscaling_config": {
                               **options["autoscaling_config"], "min_replicas": 1, "max_replicas": 1}})}
                          for name, options in DEFAULT_OPTIONS.items() if name in deployed]
    return config


def denoiser_entry(config: dict[str, Any]) -> dict[str, Any]:
    (entry,) = [d for d in app_entry(config)["deployments"] if d["name"] == "Denoiser"]
    return entry


# Serve starts a replica whose constructor raised up to 3 times (per replica) before it calls the deploy failed; the
# failing deploys below fail in every constructor alike (a missing weights path, a user_config refused by the replica's
# reconfigure), so each retry is another replica process importing torch for the same error. One try here: the same
# failure, the same DEPLOY_FAILED status and message, a third of the replica starts (Serve's own setting, read by its
# controller from the cluster's environment; nothing in the app or the deployed file changes). Ray's own metrics
# report interval (10 s) stays: its exporter keeps a gauge for two intervals after its last report, and the Denoiser
# sets its GPU memory gauges per batch and per health check (every 10 s), so a shorter interval lets them age out.
SERVE_ENV = {"RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1"}


@pytest.fixture(scope="module")
def operator(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Operator]:
    from testkit.cluster import NodeSpec, start_local_cluster

    work = tmp_path_factory.mktemp("operator")
    with start_local_cluster([NodeSpec("head", num_cpus=3)], dashboard=True, auth="disabled",
                             env=SERVE_ENV) as cluster:
        op = Operator(cluster, work / "serve_config.yaml", free_port())
        op.config = operator_config(tiny_root, work / "out", op.http_port, redis_url)
        op.deploy(op.config)
        op.wait_running()
        yield op


def test_a_redeploy_changes_max_replicas_and_max_batch_size_on_the_same_replicas(operator: Operator) -> None:
    before = operator.facts()
    assert len(before["actors"]) == 1 and before["live"]["max_batch_size"] == 4  # DenoiserSettings'
    edited = copy.deepcopy(operator.config)
    denoiser = denoiser_entry(edited)
    denoiser["autoscaling_config"]["max_replicas"] = 3
    denoiser.setdefault("user_config", {})["max_batch_size"] = 2
    operator.deploy(edited)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = operator.wait_running()
        config = status["deployments"]["Denoiser"]["deployment_config"]
        after = operator.facts()
        if config["autoscaling_config"]["max_replicas"] == 3 and after["live"]["max_batch_size"] == 2:
            break
        time.sleep(1)
    assert config["autoscaling_config"]["max_replicas"] == 3 and config["user_config"]["max_batch_size"] == 2
    # The same replica actor, the same process: reconfigured, not restarted (no SDXL reload on a GPU).
    assert after["actors"] == before["actors"]
    assert after["live"]["pid"] == before["live"]["pid"] and after["live"]["replica"] == before["live"]["replica"]
    # ... and the new values are what Serve's batcher runs with.
    assert after["live"]["max_batch_size"] == 2 and after["live"]["settings"]["max_batch_size"] == 2
    operator.config = edited


def test_a_job_runs_through_the_file_deployed_job_consumer_that_scales_on_its_queue(
        operator: Operator, astronaut_bytes: bytes) -> None:
    status = operator.wait_running()
    policy = status["deployments"]["JobConsumer"]["deployment_config"]["autoscaling_config"]["policy"]
    # The file's JobConsumer entry gave no autoscaling_config: the bound one, with the queue-length policy on the
    # file's own queue and broker.
    assert policy["policy_function"] == "deployments.jobs.task_queue:JobQueuePolicy"
    jobs = app_entry(operator.config)["args"]["jobs"]
    assert policy["policy_kwargs"]["queue_name"] == "instantid-jobs"
    assert policy["policy_kwargs"]["broker_url"] == jobs["broker_url"]
    submitted = httpx.post(f"{operator.url}/v1/jobs", json={"face_image": b64(astronaut_bytes), "prompt": "job",
                                                            **FAST}, timeout=60)
    assert submitted.status_code == 202, submitted.text
    deadline, job = time.monotonic() + 120, {}
    while time.monotonic() < deadline:
        job = httpx.get(f"{operator.url}/v1/jobs/{submitted.json()['job_id']}", timeout=30).json()
        if job["status"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert job["status"] == "done", job
    assert all(f"/{job['job_id']}/" in uri for uri in job["result"]["images"])  # the job id names its outputs


SAFETY_METRICS = "ray_instantid_safety_"


def scrape(ports: list[int]) -> str:
    return "\n".join(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text for port in ports)


def test_every_metric_the_dashboard_and_alerts_query_is_exported_on_rays_metrics_port(
        operator: Operator, astronaut_bytes: bytes) -> None:
    from testkit.k8s import queried_metrics

    body = {"face_image": b64(astronaut_bytes), "prompt": "metrics", **FAST}
    for _ in range(2):  # a cache miss, then a hit
        assert httpx.post(f"{operator.url}/v1/generate", json=body, timeout=120).status_code == 200
    blank = base64.b64encode(BLANK_PNG).decode()
    assert httpx.post(f"{operator.url}/v1/generate", json={**body, "face_image": blank}, timeout=120).status_code == 422
    # The safety stage's counters come from a SafetyChecker, which serve_config.yaml's app has not (no `safety` on
    # noise); tests/serve/test_safety.py reads them from the session app that runs one.
    wanted = {name for name in queried_metrics() if not name.startswith(SAFETY_METRICS)}
    ports = operator.facts()["metrics_ports"]
    # Each stage's own series, tagged by Ray with the application and the deployment that recorded it, and the
    # series the requests above must have moved.
    series = {f"{deployment}'s requests": r'ray_instantid_stage_requests_total\{[^}]*deployment="' + deployment + '"'
              for deployment in ("Ingress", "FaceAnalysis", "PromptEncoder", "Denoiser", "OutputWriter")}
    series.update({
        "the Denoiser's batch sizes": r'ray_instantid_denoiser_batch_images_bucket\{[^}]*application="instantid"[^}]*'
                                      r'deployment="Denoiser"',
        "the no-face answer": r'ray_instantid_stage_requests_total\{[^}]*code="no_face"[^}]*deployment="FaceAnalysis"',
        "the face cache's hit": r'ray_instantid_cache_lookups_total\{[^}]*deployment="FaceAnalysis"[^}]*result="hit"',
        # The Ingress counts each HTTP answer by route and status (the no-face 422 above among them).
        "the Ingress's 422": r'ray_instantid_http_requests_total\{(?=[^}]*code="422")(?=[^}]*route="generate")',
    })
    deadline, text, exported = time.monotonic() + 120, "", set()
    while time.monotonic() < deadline:  # each worker's exporter flushes on its own clock, every few seconds
        text = scrape(ports)
        exported = {re.sub(r"_(bucket|sum|count)$", "", line.split("{")[0].split(" ")[0])
                    for line in text.splitlines() if line.startswith("ray_")}
        if wanted <= exported and all(re.search(pattern, text) for pattern in series.values()):
            break
        time.sleep(2)
    assert not wanted - exported, f"queried by the dashboard or the alerts but not exported: {wanted - exported}"
    missing = [what for what, pattern in series.items() if not re.search(pattern, text)]
    assert not missing, f"not exported after 120 s: {missing}"
    # ... and none on the public port.
    assert httpx.get(f"{operator.url}/metrics", timeout=30).status_code == 404


def test_a_callers_request_id_names_outputs_and_every_stages_json_logs_and_a_reuse_is_409(
        operator: Operator, astronaut_bytes: bytes) -> None:

    body = {"face_image": b64(astronaut_bytes), "prompt": "request id", **FAST}
    request_id = f"op-{uuid.uuid4().hex[:12]}"
    first = httpx.post(f"{operator.url}/v1/generate", json=body, headers={"x-request-id": request_id}, timeout=120)
    assert first.status_code == 200, first.text
    assert first.headers["x-request-id"] == request_id and first.json()["request_id"] == request_id
    assert all(f"/{request_id}/" in uri for uri in [*first.json()["images"], first.json()["metadata"]])
    again = httpx.post(f"{operator.url}/v1/generate", json=body, headers={"x-request-id": request_id}, timeout=120)
    assert again.status_code == 409, again.text
    error = again.json()["error"]
    assert error["code"] == "request_id_in_use" and request_id in error["message"] and error["field"] == "x-request-id"
    unsafe = httpx.post(f"{operator.url}/v1/generate", json=body, headers={"x-request-id": "../../etc"}, timeout=120)
    assert unsafe.status_code == 200 and unsafe.json()["request_id"] != "../../etc"  # an id of its own
    # Every stage's JSON log lines carry it (Serve's request context passes the header's id to each replica).
    deadline, seen = time.monotonic() + 30, set()
    while time.monotonic() < deadline and len(seen) < 5:
        for path in operator.cluster.root.rglob("logs/serve/replica_instantid_*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if request_id in line:
                    record = json.loads(line)  # logging_config.encoding: JSON
                    assert record["request_id"] == request_id
                    seen.add(record["deployment"].removeprefix("instantid_"))  # Ray logs it as app_deployment
        time.sleep(1)
    assert seen == {"Ingress", "FaceAnalysis", "PromptEncoder", "Denoiser", "OutputWriter"}, seen


def wait_deploy_failed(operator: Operator, timeout_s: float) -> dict:
    """The app's status once it is DEPLOY_FAILED, or the last one seen when `timeout_s` ran out."""
    deadline, status = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        status = operator.app_status()
        if status.get("status") == "DEPLOY_FAILED":
            break
        time.sleep(1)
    return status


def test_a_bad_user_config_fails_the_deploy_naming_the_field_and_keeps_serving(operator: Operator) -> None:
    edited = copy.deepcopy(operator.config)
    denoiser_entry(edited).setdefault("user_config", {})["max_batch_size"] = 0
    operator.deploy(edited)
    status = wait_deploy_failed(operator, 120)
    assert status.get("status") == "DEPLOY_FAILED" and "max_batch_size" in operator.failure_text(status), status
    operator.deploy(operator.config)
    operator.wait_running()


def test_a_source_that_does_not_exist_fails_the_deploy_naming_it(operator: Operator, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-weights"
    edited = copy.deepcopy(operator.config)
    app_entry(edited)["args"]["weights"] = {"sources": {
        "sdxl": str(missing / "sdxl"), "identitynet": str(missing / "InstantID/ControlNetModel"),
        "adapter": str(missing / "InstantID/ip-adapter.bin"), "face_pack": str(missing / "antelopev2")}}
    operator.deploy(edited)
    status = wait_deploy_failed(operator, 180)
    assert status.get("status") == "DEPLOY_FAILED", status
    # The app status says which path (on the deployments whose replicas loaded it); no tiny preset stood in.
    assert str(missing) in operator.failure_text(status), operator.failure_text(status)
