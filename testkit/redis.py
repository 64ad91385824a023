"""A real redis-server (Debian's; `make redis-server` installs it) on a free 127.0.0.1 port: nothing on disk
(`start_redis`), or one a fault test stops, freezes and starts again on the same port, optionally persisting to an
append-only file as a production Redis does (`RedisServer`)."""

from __future__ import annotations

import os
import shutil
import signal
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


class RedisServer:
    """A redis-server on one loopback port that a fault test (or bench/jobs_chaos.py) may stop, freeze and start
    again. `persistent`: an append-only file written on every command (appendfsync always), so a restart keeps
    every queued job and job record, as the shipped in-cluster Redis does (k8s/components/jobs-redis)."""

    def __init__(self, workdir: Path, persistent: bool = False) -> None:
        self.workdir, self.persistent, self.port = workdir, persistent, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make redis-server` (Debian's redis-server)")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for_redis(self.process, self.port)

    def stop(self) -> None:
        """Stop it (a clean shutdown, as a pod's SIGTERM); a frozen one is thawed first, so it can exit."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            self.process.wait(timeout=10)

    def freeze(self) -> None:
        """Up but silent (the kernel still accepts connections): a Redis under a network partition or swapping."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
