"""A real redis-server (Debian's; `make redis-server` installs it) on a free 127.0.0.1 port, with nothing on disk."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from testkit.net import free_port


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    """Start redis-server on a free loopback port; returns the process and its URL (redis://127.0.0.1:PORT/0).

    Raises:
        RuntimeError: redis-server is not installed, or did not answer in time.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run `make redis-server` (Debian's redis-server)")
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


def stop_redis(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=10)
