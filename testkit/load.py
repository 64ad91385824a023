"""A bounded closed-loop load generator against the running app (POST /v1/generate), and an audit of what its
answers reported against what the store holds. Used by tests/serve/test_faults.py (short runs) and bench/load.py
(the long one)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Answer:
    status: int
    seconds: float
    started: float  # monotonic time the request was sent
    body: dict[str, Any] | None
    retry_after: str | None
    error: str | None = None  # a transport error (timeout, reset) instead of an HTTP answer


@dataclass
class LoadResult:
    answers: list[Answer] = field(default_factory=list)
    wall_s: float = 0.0

    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for a in self.answers:
            key = a.error or str(a.status)
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def ok(self) -> list[Answer]:
        return [a for a in self.answers if a.status == 200]

    def percentile_s(self, q: float, only_ok: bool = True) -> float:
        values = sorted(a.seconds for a in (self.ok() if only_ok else self.answers))
        if not values:
            return float("nan")
        return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]

    def goodput(self) -> float:
        """Images per second delivered in 200 answers over the run's wall time."""
        return sum(len(a.body["images"]) for a in self.ok()) / self.wall_s if self.wall_s else 0.0


def run_load(url: str, make_body: Callable[[int], dict], *, clients: int, requests: int, timeout_s: float,
             headers: dict[str, str] | None = None,
             during: Callable[[LoadResult], Any] | None = None) -> LoadResult:
    """`clients` concurrent loops sending `requests` POST /v1/generate in all; `during(result)` runs in a thread
    meanwhile, with the answers so far in `result.answers` (e.g. to inject a fault once some have come back)."""
    return asyncio.run(_load(url, make_body, clients, requests, timeout_s, headers or {}, during))


async def _load(url: str, make_body: Callable[[int], dict], clients: int, requests: int, timeout_s: float,
                headers: dict[str, str], during: Callable[[LoadResult], Any] | None) -> LoadResult:
    result, counter = LoadResult(), iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(http: httpx.AsyncClient) -> None:
        for index in counter:
            sent = time.monotonic()
            try:
                response = await http.post(f"{url}/v1/generate", json=make_body(index), headers=headers)
                body = response.json() if response.headers.get("content-type", "").startswith("application/json") \
                    else None
                result.answers.append(Answer(response.status_code, time.monotonic() - sent, sent, body,
                                             response.headers.get("retry-after")))
            except httpx.HTTPError as exc:  # a hang past the timeout or a dropped connection: recorded, not hidden
                result.answers.append(Answer(0, time.monotonic() - sent, sent, None, None, type(exc).__name__))

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        side = asyncio.create_task(asyncio.to_thread(during, result)) if during else None
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
        if side:
            await side
    result.wall_s = time.monotonic() - started
    return result


def audit_outputs(result: LoadResult, listed: set[str], read: Callable[[str], bytes]) -> dict[str, Any]:
    """Compare what 200 answers reported with what the store holds under the run's prefix.

    `listed`: every object URI under the prefix. Returns counts of missing outputs (reported, not stored), orphans
    (stored, never reported) and sidecars whose image list disagrees with the answer."""
    reported: set[str] = set()
    bad_sidecars = 0
    for answer in result.ok():
        uris = [*answer.body["images"], answer.body["metadata"]]
        reported.update(uris)
        if answer.body["metadata"] in listed:
            sidecar = json.loads(read(answer.body["metadata"]))
            bad_sidecars += sidecar.get("images") != answer.body["images"]
    return {"reported": len(reported), "stored": len(listed), "missing": sorted(reported - listed),
            "orphans": sorted(listed - reported), "bad_sidecars": bad_sidecars}


def answered(result: LoadResult, count: int, timeout_s: float) -> bool:
    """Wait (in a `during` thread) until `count` answers have come back; False if the run ends or time runs out."""
    deadline = time.monotonic() + timeout_s
    while len(result.answers) < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
