"""Optional API keys and a per-key rate limit for the HTTP API.

Keys come from a file (YAML or JSON) or an environment variable (JSON) named in AccessConfig, never from the config
itself, so `serve_config.yaml` and the KubeRay manifest hold no secrets. Either source holds a list of
`{name, key, actions}`; `name` is what logs and metrics see, the key itself is never logged or echoed.
Health, readiness, metrics and the OpenAPI pages stay open. Python `DeploymentHandle` callers are inside the Ray
cluster and are not checked here.

A key file is re-read when it changes (checked every `keys_reload_interval_s`, by the file's identity, size and
mtime through any symlinks: a Kubernetes Secret volume swaps a `..data` symlink), so rotating or revoking a key
needs no restart. A file that does not parse (caught mid-write, or a bad edit) leaves the previous keys in force,
logged, rather than refusing everyone.

Rate limits are token buckets (`rate_limit_per_minute`, `rate_limit_burst`) kept in Redis when the Ingress has one
(the jobs' Redis): one bucket per key shared by every Ingress replica, taken atomically by a Lua script on Redis's
clock, and kept across reconfigures and replica restarts. While Redis does not answer (within
SHARED_LIMIT_TIMEOUT_S), each replica falls back to its own in-memory buckets, logged once per outage and counted
(`instantid_rate_limit_fallbacks`), and tries Redis again after SHARED_LIMIT_RETRY_S: never refusing everyone,
never waiting on Redis on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import redis
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from instantid_app.settings import AccessConfig

from .errors import Forbidden, RateLimited, Unauthorized
from .metrics import AccessMetrics

logger = logging.getLogger("ray.serve")
Action = Literal["generate", "jobs"]
ALL_ACTIONS: tuple[Action, ...] = ("generate", "jobs")


class AccessConfigError(ValueError):
    """The key file or variable is missing or malformed (raised at replica start, so the deploy fails loudly)."""


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    key: SecretStr = Field(..., min_length=16)
    actions: list[Action] = Field(default_factory=lambda: list(ALL_ACTIONS))


def load_keys(config: AccessConfig) -> list[ApiKey]:
    """Read the keys; errors name the source, never a key."""
    if config.api_keys_file:
        path = Path(config.api_keys_file)
        if not path.is_file():
            raise AccessConfigError(f"api_keys_file {path} does not exist")
        raw, source = yaml.safe_load(path.read_text()), f"api_keys_file {path}"
    elif config.api_keys_env:
        text = os.environ.get(config.api_keys_env)
        if not text:
            raise AccessConfigError(f"environment variable {config.api_keys_env} is not set")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AccessConfigError(f"{config.api_keys_env} is not JSON (line {exc.lineno})") from None
        source = f"environment variable {config.api_keys_env}"
    else:
        return []
    if isinstance(raw, dict):
        raw = raw.get("keys")
    if not isinstance(raw, list) or not raw:
        raise AccessConfigError(f"{source}: expected a non-empty list of {{name, key, actions}}")
    try:
        keys = [ApiKey.model_validate(item) for item in raw]
    except ValidationError as exc:
        first = exc.errors()[0]
        raise AccessConfigError(f"{source}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if len({k.name for k in keys}) != len(keys):
        raise AccessConfigError(f"{source}: key names must be unique")
    return keys


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """A token bucket per key name, in this replica's memory: with N ingress replicas a key gets up to N times
    the rate (documented; a shared limiter would put a network hop on every request)."""

    per_minute: float
    burst: int
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, name: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60.0
        with self._lock:
            bucket = self._buckets.setdefault(name, _Bucket(float(self.burst), now))
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait_s = math.ceil((1.0 - bucket.tokens) / rate)
        raise RateLimited(f"rate limit of {self.per_minute:g} requests/minute reached for key '{name}'; "
                          f"retry after {wait_s}s", retry_after_s=wait_s)


SHARED_LIMIT_TIMEOUT_S = 0.5  # a limit check that waits longer on Redis falls back to this replica's buckets
SHARED_LIMIT_RETRY_S = 5.0  # how long a replica keeps to its own buckets before trying Redis again
BUCKET_KEY_PREFIX = "instantid:ratelimit:"
# KEYS[1]: the bucket; ARGV: tokens per second, burst. Returns {1, 0} (taken) or {0, seconds until one token}.
TAKE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(bucket[1]) or burst, tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local taken = 0
if tokens >= 1 then tokens = tokens - 1; taken = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
if taken == 1 then return {1, 0} end
return {0, math.ceil((1 - tokens) / rate)}
"""


class SharedRateLimiter:
    """Token buckets in Redis shared by every Ingress replica, with this replica's RateLimiter as the fallback."""

    def __init__(self, url: str, per_minute: float, burst: int) -> None:
        self.per_minute, self.burst = per_minute, burst
        self.redis = redis.Redis.from_url(url, socket_timeout=SHARED_LIMIT_TIMEOUT_S,
                                          socket_connect_timeout=SHARED_LIMIT_TIMEOUT_S)
        self.script = self.redis.register_script(TAKE_SCRIPT)
        # Its own threads: a call stuck on a frozen Redis never holds one of the loop's default executor.
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rate-limit-redis")
        self.local = RateLimiter(per_minute, burst)
        self.metrics = AccessMetrics()
        self.fallbacks = 0
        self._redis_after = 0.0  # monotonic time before which Redis is not tried again

    async def take(self, name: str) -> None:
        now = time.monotonic()
        if now >= self._redis_after:
            try:
                work = asyncio.get_running_loop().run_in_executor(self.pool, lambda: self.script(
                    keys=[BUCKET_KEY_PREFIX + name], args=[self.per_minute / 60.0, self.burst]))
                taken, wait_s = await asyncio.wait_for(work, SHARED_LIMIT_TIMEOUT_S * 2)
            except (TimeoutError, redis.RedisError, OSError) as exc:
                if self._redis_after == 0.0 or now - self._redis_after > SHARED_LIMIT_RETRY_S:
                    logger.warning("rate limits: Redis unavailable (%s); this replica limits on its own until it "
                                   "answers", type(exc).__name__)
                self._redis_after = time.monotonic() + SHARED_LIMIT_RETRY_S  # from when the try gave up
            else:
                self._redis_after = 0.0
                if not taken:
                    raise RateLimited(f"rate limit of {self.per_minute:g} requests/minute reached for key "
                                      f"'{name}'; retry after {wait_s}s", retry_after_s=max(1, int(wait_s)))
                return
        self.fallbacks += 1
        self.metrics.fallback()
        self.local.take(name)


class AccessControl:
    """Authenticate a request's key and check its action; one per ingress replica."""

    def __init__(self, config: AccessConfig, redis_url: str | None = None) -> None:
        """`redis_url`: where the rate limits' buckets are shared (the jobs' Redis); None: per replica."""
        self.config = config
        self.enabled = config.enabled
        self._file = Path(config.api_keys_file) if config.api_keys_file else None
        self._stamp = _file_stamp(self._file) if self._file else None
        self._checked = time.monotonic()
        self._keys = _digests(load_keys(config))  # raises: a bad source fails the deploy at start
        self._limiter: RateLimiter | SharedRateLimiter | None = None
        if config.rate_limit_per_minute and redis_url:
            self._limiter = SharedRateLimiter(redis_url, config.rate_limit_per_minute, config.rate_limit_burst)
        elif config.rate_limit_per_minute:
            self._limiter = RateLimiter(config.rate_limit_per_minute, config.rate_limit_burst)

    def _reload_if_changed(self) -> None:
        """Re-read the key file when its stamp changed (at most every keys_reload_interval_s; a stat is cheap)."""
        now = time.monotonic()
        if self._file is None or now - self._checked < self.config.keys_reload_interval_s:
            return
        self._checked = now
        stamp = _file_stamp(self._file)
        if stamp == self._stamp:
            return
        try:
            keys = _digests(load_keys(self.config))
        except (AccessConfigError, OSError, yaml.YAMLError) as exc:
            # The stamp is not kept: the next check tries again (a writer may be mid-way through the file).
            logger.warning("API key file changed but was not loaded (%s); the previous keys stay in force",
                           type(exc).__name__ if isinstance(exc, yaml.YAMLError) else exc)
            return
        self._keys, self._stamp = keys, stamp
        logger.info("API keys reloaded from %s: %s", self._file, ", ".join(key.name for _, key in keys))

    def check(self, authorization: str | None, x_api_key: str | None, action: Action) -> str | None:
        """The key's name if the request may run `action`; raises Unauthorized/Forbidden/RateLimited."""
        if not self.enabled:
            return None
        self._reload_if_changed()
        secret = presented_key(authorization, x_api_key)
        if not secret:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        digest = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
        match = None
        for known, key in self._keys:  # no early exit: every key is compared
            if hmac.compare_digest(known, digest):
                match = key
        if match is None:
            raise Unauthorized("the API key is not valid")
        if action not in match.actions:
            raise Forbidden(f"key '{match.name}' may not use '{action}'; it may use: {', '.join(match.actions)}")
        if isinstance(self._limiter, RateLimiter):
            self._limiter.take(match.name)
        return match.name

    async def admit(self, authorization: str | None, x_api_key: str | None, action: Action) -> str | None:
        """`check`, then the key's shared rate limit (its Redis call in a worker thread, bounded in time)."""
        name = self.check(authorization, x_api_key, action)
        if name is not None and isinstance(self._limiter, SharedRateLimiter):
            await self._limiter.take(name)
        return name


def _digests(keys: list[ApiKey]) -> list[tuple[bytes, ApiKey]]:
    # Compare fixed-length digests so neither the length nor the content of a wrong key leaks through timing.
    return [(hashlib.sha256(k.key.get_secret_value().encode()).digest(), k) for k in keys]


def _file_stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when the file is rewritten or its symlinks are swapped; None while it is missing."""
    try:
        stat = path.stat()  # follows symlinks: a swapped ..data link gives another inode
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns
