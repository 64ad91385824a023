"""Optional API keys and a per-key rate limit for the HTTP API.

Keys come from a file (YAML or JSON) or an environment variable (JSON) named in AccessConfig, never from the config
itself, so `serve_config.yaml` and the KubeRay manifest hold no secrets. Either source holds a list of
`{name, key, actions}`; `name` is what logs and metrics see, the key itself is never logged or echoed.
Health, readiness, metrics and the OpenAPI pages stay open. Python `DeploymentHandle` callers are inside the Ray
cluster and are not checked here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from instantid_app.config import AccessConfig

from .errors import Forbidden, RateLimited, Unauthorized

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


class AccessControl:
    """Authenticate a request's key and check its action; one per ingress replica."""

    def __init__(self, config: AccessConfig) -> None:
        self.enabled = config.enabled
        # Compare fixed-length digests so neither the length nor the content of a wrong key leaks through timing.
        self._keys = [(hashlib.sha256(k.key.get_secret_value().encode()).digest(), k) for k in load_keys(config)]
        self._limiter = (RateLimiter(config.rate_limit_per_minute, config.rate_limit_burst)
                         if config.rate_limit_per_minute else None)

    def check(self, authorization: str | None, x_api_key: str | None, action: Action) -> str | None:
        """The key's name if the request may run `action`; raises Unauthorized/Forbidden/RateLimited."""
        if not self.enabled:
            return None
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
        if self._limiter is not None:
            self._limiter.take(match.name)
        return match.name
