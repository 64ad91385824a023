"""The jobs API against a real redis-server on loopback (no Ray): a bounded backlog (429 with Retry-After), the
backlog figures the gauges export, and Redis faults (stopped, frozen, restarted) answered as a typed 503 in bounded
time while the event loop keeps running."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deployments.errors import JobsBacklogFull, JobsUnavailable, error_response
from deployments.jobs.api import JobsAPI
from deployments.jobs.store import JobStore
from deployments.schemas import GenerateResponse, JobRequest, JobStatus
from instantid_app.config import AppConfig
from testkit.redis import RedisServer

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server")

REQUEST = JobRequest(face_image="aGVsbG8=", prompt="a portrait", steps=2, width=64, height=64)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def jobs_api(url: str, **jobs: object) -> JobsAPI:
    config = AppConfig.model_validate({"weights": {"preset": "tiny"}, "jobs": {
        "broker_url": url, "broker_url_env": None, "redis_timeout_s": 1.0, **jobs}})
    return JobsAPI(config)


def status(job_id: str, state: str = "queued") -> JobStatus:
    now = time.time()
    return JobStatus(job_id=job_id, status=state, created_at=now, updated_at=now)


def test_concurrent_creates_never_overshoot_max_queued(redis_server: RedisServer) -> None:
    store = JobStore(redis_server.url, status_ttl_s=600)
    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda i: store.create(status(f"job{i}"), max_queued=3), range(16)))
    assert created.count(True) == 3
    assert store.backlog().queued == 3
    written = [i for i, ok in enumerate(created) if ok]
    assert all(store.get(f"job{i}") is not None for i in written)
    assert all(store.get(f"job{i}") is None for i in range(16) if i not in written)  # refused: no record


def test_backlog_follows_the_records_queued_running_and_ended(redis_server: RedisServer) -> None:
    store = JobStore(redis_server.url, status_ttl_s=600)
    assert store.backlog().queued == 0 and store.backlog().oldest_queued_age_s == 0
    for name in ("a", "b", "c"):
        store.create(status(name))
    time.sleep(0.3)
    backlog = store.backlog()
    assert (backlog.queued, backlog.running) == (3, 0) and 0.3 <= backlog.oldest_queued_age_s < 5
    store.transition("a", lambda s, _: (s.model_copy(update={"status": "running"}), {}))
    store.save(status("b", "done"))
    assert (store.backlog().queued, store.backlog().running) == (1, 1)
    store.save(status("a", "queued"))  # back to the queue after a stage restarted
    assert (store.backlog().queued, store.backlog().running) == (2, 0)
    store.request_cancel("c")  # a queued job is cancelled at once
    store.save(status("a", "failed"))
    assert (store.backlog().queued, store.backlog().running) == (0, 0)


def test_entries_of_expired_records_leave_the_backlog(redis_server: RedisServer) -> None:
    store = JobStore(redis_server.url, status_ttl_s=1)
    store.create(status("gone"))
    assert store.backlog().queued == 1
    time.sleep(2.2)  # past the record's TTL: the record and its index entry are both gone
    assert store.get("gone") is None and store.backlog().queued == 0
    assert store.create(status("new"), max_queued=1)


def test_submit_past_max_queued_answers_429_with_retry_after(redis_server: RedisServer) -> None:
    api = jobs_api(redis_server.url, max_queued=2, backlog_retry_after_s=17)
    first = asyncio.run(api.submit(REQUEST))
    asyncio.run(api.submit(REQUEST))
    with pytest.raises(JobsBacklogFull) as refused:
        asyncio.run(api.submit(REQUEST))
    response = error_response(refused.value, retry_after_s=2)
    assert response.status_code == 429 and response.headers["retry-after"] == "17"
    assert b'"jobs_backlog_full"' in response.body
    asyncio.run(api.cancel(first.job_id))  # a queued job cancelled frees its place at once
    assert asyncio.run(api.submit(REQUEST)).status == "queued"


async def _fails_unavailable_while_the_loop_runs(call, bound_s: float) -> float:
    """Run `call()`; assert it raises JobsUnavailable within `bound_s` while a ticker on the same loop keeps
    ticking (the call never blocks the event loop). Returns how long it took."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    with pytest.raises(JobsUnavailable):
        await call()
    took = time.monotonic() - started
    task.cancel()
    assert took < bound_s, took
    assert ticks >= int(took / 0.05) // 2, (ticks, took)  # the loop ran throughout
    return took


def test_job_endpoints_answer_a_typed_503_while_redis_is_down_and_recover_when_it_is_back(
        redis_server: RedisServer) -> None:
    api = jobs_api(redis_server.url)
    job = asyncio.run(api.submit(REQUEST))
    redis_server.stop()
    for call in (lambda: api.submit(REQUEST), lambda: api.status(job.job_id), lambda: api.cancel(job.job_id)):
        asyncio.run(_fails_unavailable_while_the_loop_runs(call, bound_s=5))
    with pytest.raises(JobsUnavailable) as down:
        asyncio.run(api.status(job.job_id))
    response = error_response(down.value, retry_after_s=3)
    assert response.status_code == 503 and response.headers["retry-after"] == "3"
    assert b'"jobs_unavailable"' in response.body
    # An Ingress that starts while Redis is down still starts (and serves /v1/generate).
    late = jobs_api(redis_server.url)
    redis_server.start()  # same port, empty (no persistence in this test server)
    assert asyncio.run(api.submit(REQUEST)).status == "queued"
    assert asyncio.run(late.submit(REQUEST)).status == "queued"


def test_a_frozen_redis_fails_job_calls_within_the_timeout_and_not_the_loop(redis_server: RedisServer) -> None:
    api = jobs_api(redis_server.url)
    job = asyncio.run(api.submit(REQUEST))
    redis_server.freeze()
    try:
        # redis_timeout_s is 1: the status read gives up after it; a submit after twice it at most (its enqueue).
        assert asyncio.run(_fails_unavailable_while_the_loop_runs(lambda: api.status(job.job_id), 3)) >= 0.9
        asyncio.run(_fails_unavailable_while_the_loop_runs(lambda: api.submit(REQUEST), 4))
    finally:
        redis_server.thaw()
    assert asyncio.run(api.status(job.job_id)).status == "queued"


def test_a_failed_enqueue_leaves_no_record_saying_queued(redis_server: RedisServer) -> None:
    store = JobStore(redis_server.url, status_ttl_s=600)
    # A user that may write the job records but not the queue: the record is written, then the broker refuses the
    # message. The job must not stay `queued` for ever.
    store.redis.acl_setuser("records", enabled=True, passwords=["+pw"], keys=["instantid:*"], commands=["+@all"])
    api = jobs_api(f"redis://records:pw@127.0.0.1:{redis_server.port}/0")
    with pytest.raises(JobsUnavailable):
        asyncio.run(api.submit(REQUEST))
    assert store.backlog().queued == 0
    assert not list(store.redis.scan_iter("instantid:job:*"))


def test_a_full_redis_refuses_the_job_as_unavailable_not_a_500(redis_server: RedisServer) -> None:
    store = JobStore(redis_server.url, status_ttl_s=600)
    # What the shipped Redis (maxmemory, noeviction) does when full: it refuses writes rather than drop keys.
    store.redis.config_set("maxmemory", "1")
    store.redis.config_set("maxmemory-policy", "noeviction")
    with pytest.raises(JobsUnavailable):
        asyncio.run(jobs_api(redis_server.url).submit(REQUEST))
    store.redis.config_set("maxmemory", "0")
    assert not list(store.redis.scan_iter("instantid:job:*"))


def test_job_calls_stuck_on_a_frozen_redis_leave_the_default_executor_free(redis_server: RedisServer) -> None:
    """/v1/generate's file and S3 work runs on the event loop's default executor: job calls stuck on Redis must not
    take its threads (there are only min(32, CPUs + 4))."""
    api = jobs_api(redis_server.url)
    asyncio.run(api.submit(REQUEST))

    async def many_stuck_submits_and_one_generate_step() -> float:
        submits = [asyncio.create_task(api.submit(REQUEST)) for _ in range(24)]
        await asyncio.sleep(0.2)  # every submit is now waiting on the frozen Redis
        started = time.monotonic()
        await asyncio.to_thread(lambda: None)  # what the Ingress does for each /v1/generate (outputs, sidecar)
        took = time.monotonic() - started
        results = await asyncio.gather(*submits, return_exceptions=True)
        assert all(isinstance(result, JobsUnavailable) for result in results), results
        return took

    redis_server.freeze()
    try:
        assert asyncio.run(many_stuck_submits_and_one_generate_step()) < 0.5
    finally:
        redis_server.thaw()


def test_a_run_marks_its_job_done_only_while_it_still_holds_it(redis_server: RedisServer) -> None:
    store = JobStore(redis_server.url, status_ttl_s=600)
    result = GenerateResponse(request_id="j", seed=1, width=64, height=64, images=["s3://b/j.png"],
                              metadata="s3://b/j.json")

    def start(job_id: str) -> None:
        store.transition(job_id, lambda s, _: (s.model_copy(update={"status": "running",
                                                                     "attempts": s.attempts + 1}), {}))

    store.create(status("j"))
    start("j")
    start("j")  # taken over by a second attempt (its first consumer's lease went stale)
    assert not store.complete("j", 1, result)  # the stale first run changes nothing
    assert store.get("j").status == "running"
    assert store.complete("j", 2, result)
    done = store.get("j")
    assert done.status == "done" and done.result == result and store.backlog().running == 0
    assert not store.complete("j", 2, result)  # once: a finished job stays as it is
    store.create(status("c"))
    store.request_cancel("c")
    assert not store.complete("c", 0, result) and store.get("c").status == "cancelled"


def test_one_consumer_at_a_time_may_call_a_jobs_webhook(redis_server: RedisServer) -> None:
    store = JobStore(redis_server.url, status_ttl_s=600)
    with ThreadPoolExecutor(8) as pool:
        claims = list(pool.map(lambda _: store.claim_webhook("w", hold_s=1), range(8)))
    assert claims.count(True) == 1
    time.sleep(1.2)  # a holder that died frees it when the hold expires
    assert store.claim_webhook("w", hold_s=1)
