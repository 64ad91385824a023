"""Rate limits shared by every Ingress replica through a real redis-server on loopback (no Ray): two AccessControls
(two replicas) draw on one bucket per key, a new one (a reconfigure, a restart) finds the bucket as it was, and while
Redis is down or frozen each replica limits on its own (counted), never refusing every request and never waiting
on Redis for long."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from deployments import access as access_module
from deployments.access import AccessControl
from deployments.errors import RateLimited
from instantid_app.settings import AccessConfig
from testkit.redis import start_redis, stop_redis

KEY = "shared-key-0123456789abcdef"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[object, str]]:
    process, url = start_redis(tmp_path)
    yield process, url
    if process.poll() is None:
        os.kill(process.pid, signal.SIGCONT)
        stop_redis(process)


@pytest.fixture
def config(tmp_path: Path) -> AccessConfig:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [{"name": "app", "key": KEY}]}))
    # One token a second, three at once: a burst of requests meets the limit at the fourth.
    return AccessConfig(api_keys_file=str(path), rate_limit_per_minute=60, rate_limit_burst=3)


def admitted(replica: AccessControl) -> bool:
    try:
        asyncio.run(replica.admit(f"Bearer {KEY}", None, "generate"))
        return True
    except RateLimited as exc:
        assert exc.retry_after_s >= 1
        return False


def test_replicas_share_one_bucket_per_key(redis_server, config: AccessConfig) -> None:
    _, url = redis_server
    first, second = AccessControl(config, redis_url=url), AccessControl(config, redis_url=url)
    answers = [admitted(replica) for replica in (first, second, first, second, first, second)]
    assert answers[:3] == [True] * 3 and answers[3:].count(True) <= 1  # per replica, six would pass
    time.sleep(1.1)  # a token a second
    assert admitted(second)
    assert first._limiter.fallbacks == second._limiter.fallbacks == 0


def test_a_reconfigure_or_restart_does_not_refill_the_bucket(redis_server, config: AccessConfig) -> None:
    _, url = redis_server
    spent = AccessControl(config, redis_url=url)
    while admitted(spent):
        pass
    assert not admitted(AccessControl(config, redis_url=url))  # the replica's next AccessControl


def test_without_redis_each_replica_limits_on_its_own_and_counts_it(redis_server, config: AccessConfig,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    process, url = redis_server
    monkeypatch.setattr(access_module, "SHARED_LIMIT_RETRY_S", 0.5)
    replica = AccessControl(config, redis_url=url)
    assert admitted(replica)
    stop_redis(process)
    started = time.monotonic()
    answers = [admitted(replica) for _ in range(4)]
    assert time.monotonic() - started < 2
    assert answers == [True, True, True, False]  # its own full bucket of 3, then its own limit
    assert replica._limiter.fallbacks == 4


def test_a_frozen_redis_costs_one_bounded_wait_then_the_replica_limits_alone(redis_server, config: AccessConfig,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    process, url = redis_server
    monkeypatch.setattr(access_module, "SHARED_LIMIT_RETRY_S", 0.5)
    replica = AccessControl(config, redis_url=url)
    assert admitted(replica)  # connected
    os.kill(process.pid, signal.SIGSTOP)
    started = time.monotonic()
    assert admitted(replica)  # waited at most the bound, then its own bucket
    assert time.monotonic() - started < 2 * access_module.SHARED_LIMIT_TIMEOUT_S + 0.5
    started = time.monotonic()
    assert admitted(replica)  # within the retry delay Redis is not asked
    assert time.monotonic() - started < 0.1
    os.kill(process.pid, signal.SIGCONT)
    time.sleep(0.6)
    fallbacks = replica._limiter.fallbacks
    admitted(replica)
    assert replica._limiter.fallbacks == fallbacks  # shared again once Redis answers
