"""The batch package's fixture: a Ray of its own on loopback for the Ray Data job (as `ray job submit` gives a job
a cluster), started after the S3 test server so its workers read the same endpoint, shut down with the package.

Its own, not the serve package's: the batch tests need no Serve app, and under `make test`'s two workers they run
beside the serve package (tests/conftest.py), so neither waits for the other."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

BATCH_RAY_CPUS = 4  # the job's prompt task, face and denoise actors (one CPU each) and its writer (half of one)


@pytest.fixture(scope="package")
def batch_ray(s3_server: str) -> Iterator[str]:
    """The GCS address of the package's Ray (a killed job's driver joins it as a separate process)."""
    import ray

    ray.init(num_cpus=BATCH_RAY_CPUS, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
