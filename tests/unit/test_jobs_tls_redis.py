"""The jobs API over TLS (no Ray): a real redis-server that listens only with TLS on loopback, its certificate from a
CA this test makes with openssl, and Celery's documented URL form
`rediss://127.0.0.1:PORT/0?ssl_cert_reqs=required&ssl_ca_certs=CA`. The job records, the Celery producer (broker
and result backend), a Celery worker taking the job, and the JobConsumer's queue-length policy all work on it; a
client that does not trust the CA is refused (the certificate is checked, not merely encrypted)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from deployments.jobs.api import JobsAPI
from deployments.jobs.store import JobStore
from deployments.jobs.task_queue import TASK_NAME, JobQueuePolicy, redis_ssl_options, task_processor_config
from deployments.schemas import JobRequest
from instantid_app.config import AppConfig, JobsConfig
from testkit.net import free_port, wait_until

pytestmark = pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("openssl")),
                                reason="needs Debian's redis-server and openssl")

REQUEST = JobRequest(face_image="aGVsbG8=", prompt="a portrait", steps=2, width=64, height=64)


def make_ca_and_server_cert(folder: Path, name: str = "test-ca") -> Path:
    """A CA and a certificate for 127.0.0.1 signed by it (ca.pem, server.pem, server.key in `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", f"/CN={name}")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "1", "-extfile", "san.cnf")
    return folder / "ca.pem"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A TLS-only redis-server (`--port 0`: no plain-TCP listener) on a free loopback port; yields Celery's
    documented URL for it and the CA file."""
    folder = tmp_path_factory.mktemp("tls")
    ca = make_ca_and_server_cert(folder)
    port = free_port()
    process = subprocess.Popen(
        [shutil.which("redis-server"), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(folder / "server.pem"), "--tls-key-file", str(folder / "server.key"),
         "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
         "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"

    def answers() -> bool:
        assert process.poll() is None, "redis-server exited: was it built with TLS?"
        try:
            return bool(redis.Redis.from_url(url).ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(answers, 20, "the TLS redis-server answers PING")
        yield url, ca
    finally:
        process.terminate()
        process.wait(timeout=10)


def jobs_config(url: str, queue: str) -> JobsConfig:
    return JobsConfig(broker_url=url, broker_url_env=None, queue_name=queue)


def test_the_url_form_gives_redis_py_its_tls_options() -> None:
    assert redis_ssl_options("redis://h:1/0") is None
    assert redis_ssl_options("rediss://:pw@h:1/0?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs=/ca.pem&x=1") == {
        "ssl_cert_reqs": "required", "ssl_ca_certs": "/ca.pem"}


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_redis: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = tls_redis
    other_ca = make_ca_and_server_cert(tmp_path / "other", name="other-ca")
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(url.split("&ssl_ca_certs=")[0] + f"&ssl_ca_certs={other_ca}").ping()
    plain = url.replace("rediss://", "redis://").split("?")[0]
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(plain, socket_timeout=2).ping()  # no plain-TCP answer on the TLS port


def test_job_records_and_submit_work_over_tls(tls_redis: tuple[str, Path]) -> None:
    url, _ = tls_redis
    config = AppConfig.model_validate({"weights": {"preset": "tiny"}, "jobs": {
        "broker_url": url, "broker_url_env": None, "queue_name": "tls-submit"}})
    api = JobsAPI(config)
    job = asyncio.run(api.submit(REQUEST))  # the record, then Celery's send_task (broker and result backend)
    assert asyncio.run(api.status(job.job_id)).status == "queued"
    assert JobStore(url, 600).backlog().queued >= 1
    assert asyncio.run(api.cancel(job.job_id)).status == "cancelled"


def test_a_celery_worker_takes_a_job_over_tls(tls_redis: tuple[str, Path]) -> None:
    from ray.serve.task_consumer import instantiate_adapter_from_config

    url, _ = tls_redis
    config = task_processor_config(jobs_config(url, "tls-worker"))
    taken: list[list] = []
    ran = threading.Event()

    def run_job(job_id: str, payload: dict) -> dict:
        taken.append([job_id, payload])
        ran.set()
        return {"job_id": job_id, "status": "done"}

    worker = instantiate_adapter_from_config(config)
    worker.register_task_handle(run_job, TASK_NAME)
    # What the adapter's start_consumer() runs in a replica (it names the worker after the replica, so it needs
    # Serve): Celery's worker on the job queue, in a thread, with the adapter's Celery app and settings.
    app = worker._app
    thread = threading.Thread(target=app.worker_main, args=(["worker", "--hostname=tls@test", "-Q", "tls-worker"],),
                              daemon=True)
    thread.start()
    try:
        producer = instantiate_adapter_from_config(config)
        producer.enqueue_task_sync(TASK_NAME, args=["tlsjob", {"inline": False}], task_id="tlsjob")
        assert ran.wait(60), "the worker never took the job over TLS"
        assert taken == [["tlsjob", {"inline": False}]]
        deadline = time.monotonic() + 30  # its result reaches the result backend over TLS too
        while producer.get_task_status_sync("tlsjob").status != "SUCCESS":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        app.control.broadcast("shutdown", destination=["tls@test"])
        thread.join(timeout=20)
    assert not thread.is_alive(), "the Celery worker did not stop on its shutdown broadcast"


def test_the_consumers_queue_length_policy_reads_a_tls_queue(tls_redis: tuple[str, Path]) -> None:
    from ray.serve.task_consumer import instantiate_adapter_from_config

    url, _ = tls_redis
    jobs = jobs_config(url, "tls-policy")
    producer = instantiate_adapter_from_config(task_processor_config(jobs))
    for i in range(3):
        producer.enqueue_task_sync(TASK_NAME, args=[f"p{i}", {}], task_id=f"p{i}")
    policy = JobQueuePolicy(jobs.queue_name, jobs.broker_url, poll_interval_s=0.1)

    async def poll() -> None:
        policy._ensure_broker()
        await policy._poll_once()

    asyncio.run(poll())
    assert policy._queue_length == 3
