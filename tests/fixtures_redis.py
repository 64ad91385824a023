"""A real Redis server on a free 127.0.0.1 port for the session (the job queue's broker and the job records)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures_serve import free_port


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make services` (Debian's redis-server)")
    port = free_port()
    # No persistence: a test broker keeps nothing on disk (and nothing of a job's photos).
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "no", "--dir", str(workdir), "--protected-mode", "yes"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_for_redis(process, port)
    return process, f"redis://127.0.0.1:{port}/0"


def wait_for_redis(process: subprocess.Popen, port: int, timeout_s: float = 20) -> None:
    """Until the redis-server `process` answers PING on 127.0.0.1:`port`; RuntimeError if it exits or is late."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    process.terminate()
    process.wait(timeout=10)
