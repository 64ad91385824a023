"""The suite: tests/unit (in-process, no Ray), tests/serve (the session's Ray with one app carrying the extensions
and one keyed app), tests/cluster (clusters of their own). They run in that order, whatever the command line names
first: the serve package's Ray is shut down (its fixtures are package-scoped) before a cluster test starts its own."""

from __future__ import annotations

import os

import pytest

# One torch (OpenMP) thread in this process and the ones it starts (CLI and bench subprocesses, Ray's workers, which
# Ray gives one already): the suite's models are tiny, so a second thread buys nothing and its barrier spins while
# the other process on a 2-core runner wants the core (test_denoise, test_accel and test_img2img: 34.5 s with two
# threads, 31.3 s with one, on a quiet machine). Set before anything imports torch; a caller's own value wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["tests.fixtures_tiny", "tests.fixtures_s3", "tests.fixtures_redis"]

ORDER = ("unit", "serve", "cluster")  # tests directly under tests/ run with the unit tests


def _rank(item: pytest.Item) -> int:
    parts = item.path.relative_to(item.session.config.rootpath).parts
    return ORDER.index(parts[1]) if len(parts) > 2 and parts[0] == "tests" and parts[1] in ORDER else 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: within a package, pytest's own order
