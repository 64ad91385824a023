"""JobStore: the state of async jobs in Redis (the broker's server, its own keys), one hash per job.

Fields of `instantid:job:<id>`: `record` (the JobStatus JSON the API answers; never the request or its photos),
`progress` (`step/steps`, written by the Denoiser after every denoising step), `cancel` (set by DELETE), `lease`
(the Unix time a consumer last renewed the running job). Every write refreshes the hash's TTL, so a record expires
`status_ttl_s` after its job's last change. Transitions that two parties race for (a consumer starting a job
while a caller cancels it) run as Redis transactions (WATCH/MULTI), not read-then-write.

Two sorted sets index the jobs by state, written in the same transaction as the record, so they never disagree
with it: `instantid:jobs:queued` (score: when the job entered the queue) and `instantid:jobs:running` (score: its
last lease). They bound the backlog at submit (`create(..., max_queued)`) and give the backlog gauges; an entry
older than `status_ttl_s` belongs to an expired record and is trimmed.

`instantid:webhook-claim:<id>` (a string with its own expiry) is held by the consumer delivering a job's webhook,
so a redelivery of the finished job does not call the receiver a second time while the first call is under way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from ..schemas import GenerateResponse, JobProgress, JobStatus

TERMINAL = ("done", "failed", "cancelled")
Change = tuple[JobStatus, dict[str, str]]
KEY_PREFIX = "instantid:job:"
QUEUED_KEY = "instantid:jobs:queued"
RUNNING_KEY = "instantid:jobs:running"
WEBHOOK_CLAIM_PREFIX = "instantid:webhook-claim:"
# What a call to an unreachable, restarting or out-of-memory Redis raises (redis-py wraps socket errors, mostly).
REDIS_ERRORS = (redis.RedisError, OSError)


def job_key(job_id: str) -> str:
    return f"{KEY_PREFIX}{job_id}"


@dataclass(frozen=True)
class Backlog:
    queued: int
    running: int
    oldest_queued_age_s: float  # 0 with nothing queued


class JobStore:
    def __init__(self, url: str, status_ttl_s: float, timeout_s: float = 3.0) -> None:
        # One client per process; redis-py's connection pool makes it safe across threads. The timeouts bound every
        # call, so an unreachable Redis fails a job request in seconds (503) instead of holding it. A rediss:// URL
        # carries its TLS settings (ssl_cert_reqs, ssl_ca_certs) in its query, which from_url reads.
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.ttl = max(1, int(status_ttl_s))

    # --- reads --------------------------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobStatus | None:
        """The job's status with its latest progress; None when unknown or expired."""
        fields = self.redis.hgetall(job_key(job_id))
        if b"record" not in fields:
            return None
        status = JobStatus.model_validate_json(fields[b"record"])
        if status.status == "running" and b"progress" in fields:
            step, steps = (int(part) for part in fields[b"progress"].split(b"/"))
            status = status.model_copy(update={"progress": JobProgress(step=step, steps=steps)})
        if status.status not in TERMINAL and b"cancel" in fields:
            status = status.model_copy(update={"cancel_requested": True})
        return status

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.hexists(job_key(job_id), "cancel"))

    def backlog(self) -> Backlog:
        """Jobs queued and running now, and how long the oldest queued one has waited (one round trip)."""
        now = time.time()
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(QUEUED_KEY, "-inf", now - self.ttl)
            pipe.zremrangebyscore(RUNNING_KEY, "-inf", now - self.ttl)
            pipe.zcard(QUEUED_KEY)
            pipe.zcard(RUNNING_KEY)
            pipe.zrange(QUEUED_KEY, 0, 0, withscores=True)
            _, _, queued, running, oldest = pipe.execute()
        return Backlog(queued=queued, running=running,
                       oldest_queued_age_s=max(0.0, now - oldest[0][1]) if oldest else 0.0)

    # --- writes -------------------------------------------------------------------------------------------------
    def create(self, status: JobStatus, max_queued: int | None = None) -> bool:
        """Write a new queued job's record unless `max_queued` jobs already wait; returns whether it was written.
        The count and the write are one transaction: concurrent submits never overshoot the bound."""
        key = job_key(status.job_id)
        self.redis.zremrangebyscore(QUEUED_KEY, "-inf", time.time() - self.ttl)  # expired records' entries
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(QUEUED_KEY)
                    if max_queued is not None and pipe.zcard(QUEUED_KEY) >= max_queued:
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.hset(key, "record", _dump(status))
                    pipe.expire(key, self.ttl)
                    _index(pipe, status)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def delete(self, job_id: str) -> None:
        """Forget a job whose message never reached the queue (so no record says `queued` for ever)."""
        with self.redis.pipeline() as pipe:
            pipe.delete(job_key(job_id))
            pipe.zrem(QUEUED_KEY, job_id)
            pipe.zrem(RUNNING_KEY, job_id)
            pipe.execute()

    def save(self, status: JobStatus, *, clear: tuple[str, ...] = ()) -> None:
        key = job_key(status.job_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, "record", _dump(status))
            if clear:
                pipe.hdel(key, *clear)
            pipe.expire(key, self.ttl)
            _index(pipe, status)
            pipe.execute()

    def renew_lease(self, job_id: str, attempt: int | None = None) -> None:
        """Refresh the running job's lease; with `attempt`, only while the job still runs as that attempt (the
        Ingress's renewals stop mattering once the job is done, cancelled or taken over)."""
        if attempt is not None:
            status = self.get(job_id)
            if status is None or status.status != "running" or status.attempts != attempt:
                return
        key = job_key(job_id)
        now = time.time()
        with self.redis.pipeline() as pipe:
            pipe.hset(key, "lease", repr(now))
            pipe.expire(key, self.ttl)
            pipe.zadd(RUNNING_KEY, {job_id: now}, xx=True)  # only while it is indexed as running
            pipe.execute()

    def report_step(self, job_id: str, step: int, steps: int) -> bool:
        """Record progress (one round trip); returns whether the job is still wanted (not cancelled)."""
        key = job_key(job_id)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(key)
            pipe.hexists(key, "cancel")
            exists, cancelled = pipe.execute()
        if exists:  # never recreate an expired record (it would have no TTL-bound owner)
            self.redis.hset(key, "progress", f"{step}/{steps}")
        return not cancelled

    def transition(self, job_id: str, change: Callable[[JobStatus, dict[bytes, bytes]], Change | None], *,
                   clear: tuple[str, ...] = ()) -> tuple[JobStatus | None, bool]:
        """Atomically replace the record with what `change(status, fields)` returns, (status, extra fields to set),
        also deleting `clear`; None leaves it. Returns the record as it is afterwards (None: unknown job) and
        whether it changed."""
        key = job_key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    fields = pipe.hgetall(key)
                    if b"record" not in fields:
                        pipe.unwatch()
                        return None, False
                    current = JobStatus.model_validate_json(fields[b"record"])
                    changed = change(current, fields)
                    if changed is None:
                        pipe.unwatch()
                        return current, False
                    new, extra = changed
                    pipe.multi()
                    pipe.hset(key, mapping={"record": _dump(new), **extra})
                    if clear:
                        pipe.hdel(key, *clear)
                    pipe.expire(key, self.ttl)
                    _index(pipe, new)
                    pipe.execute()
                    return new, True
                except redis.WatchError:
                    continue

    def complete(self, job_id: str, attempt: int, result: GenerateResponse) -> bool:
        """Mark the job done with `result` if it is still running as attempt `attempt` (a fencing check: a run
        whose job was cancelled, finished or taken over by a later attempt meanwhile changes nothing). Returns
        whether it did."""
        def done(status: JobStatus, _: dict[bytes, bytes]) -> Change | None:
            if status.status != "running" or status.attempts != attempt:
                return None
            return status.model_copy(update={"status": "done", "result": result, "updated_at": time.time()}), {}

        return self.transition(job_id, done, clear=("progress", "lease"))[1]

    def claim_webhook(self, job_id: str, hold_s: float) -> bool:
        """Take the right to deliver the job's webhook for `hold_s` (the longest a delivery with all its retries
        takes); False while another consumer holds it. A holder that dies frees it when the hold expires."""
        return bool(self.redis.set(f"{WEBHOOK_CLAIM_PREFIX}{job_id}", "1", nx=True, ex=max(1, int(hold_s))))

    def request_cancel(self, job_id: str) -> JobStatus | None:
        """Mark the job cancelled: a queued job at once (its consumer will skip it), a running one when its
        consumer sees the flag at the next denoising step. A finished job is left as it is."""
        key = job_key(job_id)
        if not self.redis.exists(key):
            return None

        def cancel(status: JobStatus, _: dict[bytes, bytes]) -> Change | None:
            if status.status == "queued":
                return status.model_copy(update={"status": "cancelled", "updated_at": time.time()}), {}
            return None  # finished: left as it is; running: the flag stops it at its next step

        with self.redis.pipeline() as pipe:
            pipe.hsetnx(key, "cancel", repr(time.time()))
            pipe.expire(key, self.ttl)
            pipe.execute()
        self.transition(job_id, cancel)
        return self.get(job_id)


def _dump(status: JobStatus) -> str:
    # progress and cancel_requested live in their own fields; the record holds the rest.
    return json.dumps(status.model_dump(mode="json", exclude_none=True, exclude={"progress", "cancel_requested"}))


def _index(pipe: redis.client.Pipeline, status: JobStatus) -> None:
    """Queue the writes that keep the state index equal to the record `status` being written with them."""
    now = time.time()
    if status.status == "queued":
        pipe.zadd(QUEUED_KEY, {status.job_id: now})
        pipe.zrem(RUNNING_KEY, status.job_id)
    elif status.status == "running":
        pipe.zrem(QUEUED_KEY, status.job_id)
        pipe.zadd(RUNNING_KEY, {status.job_id: now})
    else:  # done, failed, cancelled
        pipe.zrem(QUEUED_KEY, status.job_id)
        pipe.zrem(RUNNING_KEY, status.job_id)
