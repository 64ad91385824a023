"""The suite: tests/unit (in-process, no Ray), tests/batch (the Ray Data job on a Ray of its own), tests/serve (the
session's Ray with one app carrying the extensions and one keyed app), tests/cluster (clusters of their own). They run
in that order, whatever the command line names first: each package's Ray is shut down (its fixtures are
package-scoped) before the next starts its own.

`make test` runs the suite on two workers (pytest-xdist, `--dist loadgroup`): the serve and cluster packages are one
group, so one worker runs them in that order, alone with the Ray they start, while the other runs everything else,
a module (or the batch package) at a time, so that no module- or package-scoped fixture is built twice. On a 2-core
machine the serve and cluster tests mostly wait (replicas starting, nodes dying, autoscaling) while the unit tests
compute, so the two lanes overlap."""

from __future__ import annotations

import os

import pytest

# One torch (OpenMP) thread in this process and the ones it starts (CLI and bench subprocesses, Ray's workers, which
# Ray gives one already): the suite's models are tiny, so a second thread buys nothing and its barrier spins while
# the other process on a 2-core runner wants the core (test_denoise, test_accel and test_img2img: 34.5 s with two
# threads, 31.3 s with one, on a quiet machine). Set before anything imports torch; a caller's own value wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["tests.fixtures_tiny", "tests.fixtures_s3", "tests.fixtures_redis"]

ORDER = ("unit", "batch", "serve", "cluster")  # tests directly under tests/ run with the unit tests
RAY_LANE = ("serve", "cluster")  # one xdist group: one worker, in this order (the cluster tests after serve's Ray)


def _package(item: pytest.Item) -> str | None:
    parts = item.path.relative_to(item.session.config.rootpath).parts
    return parts[1] if len(parts) > 2 and parts[0] == "tests" and parts[1] in ORDER else None


def _xdist_group(item: pytest.Item) -> str:
    """The unit of work a pytest-xdist worker takes whole: the Ray lane, the batch package, or a module."""
    package = _package(item)
    if package in RAY_LANE:
        return "ray-lane"
    return package if package == "batch" else item.nodeid.split("::")[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: ORDER.index(_package(item) or "unit"))  # stable: within a package, pytest's order
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_xdist_group(item)))  # read only under `-n N --dist loadgroup`
