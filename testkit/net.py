"""Loopback ports and waiting for conditions: the one `free_port`, `wait_until` and `wait_ready`."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.2) -> T:
    """Call `condition` until it returns something truthy, and return that; TimeoutError naming `what` (and the
    last falsy answer) once `timeout_s` has passed. Use it instead of a fixed sleep before a check."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = condition()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not true after {timeout_s:.0f}s (last: {answer!r})")
        time.sleep(interval_s)


def wait_ready(url: str, timeout_s: float = 300) -> None:
    """Until `{url}/readyz` answers 200; TimeoutError with the last answer otherwise."""
    import httpx

    last = ["no answer"]

    def ready() -> bool:
        try:
            answer = httpx.get(f"{url}/readyz", timeout=10)
        except httpx.HTTPError as exc:
            last[0] = repr(exc)
            return False
        last[0] = f"{answer.status_code} {answer.text[:300]}"
        return answer.status_code == 200

    try:
        wait_until(ready, timeout_s, f"{url}/readyz answers 200", interval_s=0.5)
    except TimeoutError:
        raise TimeoutError(f"the app at {url} was not ready within {timeout_s:.0f}s; last answer: {last[0]}") from None
