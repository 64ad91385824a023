"""The suite: tests/unit (in-process, no Ray), tests/batch (the Ray Data job on a Ray of its own), tests/cluster
(clusters of their own), tests/serve (the session's Ray with one app carrying the extensions and one keyed app). They
run in that order, whatever the command line names first: each package's Ray is shut down (its fixtures are
package- or module-scoped) before the next starts its own.

`make test` runs the suite on two pytest-xdist workers (`-n 2`, scheduled by `work_unit` below): the cluster and
serve packages are one unit, so one worker runs them in that order, alone with the Ray they start, while the other
runs everything else, a module (or the batch package) at a time, so that no module- or package-scoped fixture is
built twice. On a 2-core machine the cluster tests mostly wait (nodes starting and dying, autoscaling): run first,
they overlap the other worker's computing; the serve tests, which keep both cores busy, run last, when the other
worker has finished (cluster last left the machine half idle for the last ~2 minutes). Every cluster module stays
in the lane: one run beside the serve package's replicas starting met `ray start` timing out ("the node timed out
during startup")."""

from __future__ import annotations

import os

import pytest

# One torch (OpenMP) thread in this process and the ones it starts (CLI and bench subprocesses, Ray's workers, which
# Ray gives one already): the suite's models are tiny, so a second thread buys nothing and its barrier spins while
# the other process on a 2-core runner wants the core (test_denoise, test_accel and test_img2img: 34.5 s with two
# threads, 31.3 s with one, on a quiet machine). Set before anything imports torch; a caller's own value wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["tests.fixtures_tiny", "tests.fixtures_s3", "tests.fixtures_redis"]

ORDER = ("unit", "batch", "cluster", "serve")  # tests directly under tests/ run with the unit tests
RAY_LANE = ("cluster", "serve")  # one unit of work: one worker, in this order (serve's Ray after the clusters)


def _package(path_parts: tuple[str, ...]) -> str | None:
    return path_parts[1] if len(path_parts) > 2 and path_parts[0] == "tests" and path_parts[1] in ORDER else None


def work_unit(nodeid: str) -> str:
    """What a pytest-xdist worker takes whole: the Ray lane, the batch package, or one module."""
    path = nodeid.split("::")[0]
    package = _package(tuple(path.split("/")))
    if package in RAY_LANE:
        return "ray-lane"
    return "batch" if package == "batch" else path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return ORDER.index(_package(item.path.relative_to(item.session.config.rootpath).parts) or "unit")

    items.sort(key=rank)  # stable: within a package, pytest's own order


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist's scope scheduling with work_unit as the scope: each unit goes whole to one worker, in order, largest
    first (the Ray lane). Not `--dist loadgroup`'s marks: xdist 3.8 writes a group into a test's id through a private
    attribute that pytest 9 no longer reads, so the marks are silently ignored."""
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return LaneScheduling(config, log)
