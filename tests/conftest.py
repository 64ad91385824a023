"""The suite: tests/unit (in-process, no Ray), tests/serve (the session's Ray with one app carrying the extensions
and one keyed app), tests/cluster (clusters of their own). They run in that order, whatever the command line names
first: the serve package's Ray is shut down (its fixtures are package-scoped) before a cluster test starts its own."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures_tiny", "tests.fixtures_s3", "tests.fixtures_redis"]

ORDER = ("unit", "serve", "cluster")  # tests directly under tests/ run with the unit tests


def _rank(item: pytest.Item) -> int:
    parts = item.path.relative_to(item.session.config.rootpath).parts
    return ORDER.index(parts[1]) if len(parts) > 2 and parts[0] == "tests" and parts[1] in ORDER else 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)  # stable: within a package, pytest's own order
