"""pytest plugin: a real S3 API (moto's HTTP server) on 127.0.0.1 for the whole session.

boto3 finds it through the environment it reads itself (AWS_ENDPOINT_URL and test credentials), so the code
under test creates its clients exactly as it does in production.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

# Variables that would point boto3 at a real account, profile or endpoint instead of the test server.
_CLEARED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3")


class S3TestServer:
    """moto's threaded S3 server on loopback that a fault test can stop and start again on the same port.

    moto keeps buckets in this process's memory, not in the server thread, so objects survive a restart."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._server.stop()
            self.running = False

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        if not self.running:
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()
            self.running = True


# A secret no other text contains, so a test can grep logs and bodies for it.
TEST_SECRET_ACCESS_KEY = f"s3-test-secret-{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def s3_test_server() -> Iterator[S3TestServer]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = S3TestServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(s3_test_server: S3TestServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's HTTP server on a free loopback port; yields its endpoint URL.

    For the session, boto3's environment points at it (restored afterwards).
    """
    endpoint = s3_test_server.endpoint
    no_file = str(tmp_path_factory.mktemp("aws") / "absent")  # ignore any ~/.aws config on the machine
    with pytest.MonkeyPatch.context() as env:
        for name in _CLEARED:
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_ACCESS_KEY)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_CONFIG_FILE", no_file)
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", no_file)
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield endpoint


@pytest.fixture
def s3_client(s3_server: str) -> Any:
    """A fresh boto3 S3 client per test, so event hooks a test registers do not leak into others."""
    return boto3.client("s3")


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A new, uniquely named, empty bucket; emptied and deleted afterwards."""
    client = boto3.client("s3")  # not `s3_client`: a test may have made that one fail on purpose
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=name)
