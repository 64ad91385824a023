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

from testkit.s3 import S3TestServer

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
    with pytest.MonkeyPatch.context() as env:
        for name, value in s3_test_server.environment(TEST_SECRET_ACCESS_KEY, tmp_path_factory.mktemp("aws")).items():
            if value is None:
                env.delenv(name, raising=False)
            else:
                env.setenv(name, value)
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
