"""A real Redis server on a free 127.0.0.1 port for the session (the job queue's broker and the job records)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testkit.redis import start_redis, stop_redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    stop_redis(process)
