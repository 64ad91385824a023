"""Job webhooks: the URL check at submit time and the signed, retried POST when a job ends.

Only hosts the operator lists in `allowed_webhook_hosts` are ever called (a webhook is a server-side request the
caller chooses: without the list it would reach internal services), redirects are not followed (a listed host
could otherwise bounce the call anywhere), and a failed call is retried a bounded number of times with doubling
waits. With a secret configured, each call carries `X-InstantID-Timestamp` and
`X-InstantID-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">` so the receiver can check that the
call is ours and fresh (the scheme Stripe and Standard Webhooks use).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from urllib.parse import urlsplit

import httpx

from instantid_core.errors import InvalidParameter

from ..errors import WebhookNotAllowed
from ..schemas import JobStatus, WebhookDelivery

logger = logging.getLogger("ray.serve")
SIGNATURE_HEADER = "X-InstantID-Signature"
TIMESTAMP_HEADER = "X-InstantID-Timestamp"


def check_webhook_url(url: str, allowed_hosts: list[str]) -> None:
    """Raise a typed error naming `webhook_url` unless it is an http(s) URL to an allowed host."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise InvalidParameter(f"webhook_url: not a URL ({exc})", field="webhook_url") from exc
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidParameter("webhook_url: give an http:// or https:// URL", field="webhook_url")
    if parts.username or parts.password:
        raise InvalidParameter("webhook_url: credentials in the URL are not accepted", field="webhook_url")
    if host.lower() not in {h.lower() for h in allowed_hosts}:
        raise WebhookNotAllowed(f"webhook_url: host {host!r} is not in this server's allowed_webhook_hosts",
                                field="webhook_url")


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def deliver(url: str, status: JobStatus, *, secret: bytes | None, attempts: int, backoff_s: float,
            timeout_s: float) -> WebhookDelivery:
    """POST the final status; retry connection errors, 429 and 5xx; give up on other answers (a 3xx included)."""
    body = status.model_dump_json(exclude_none=True).encode()
    last = WebhookDelivery(delivered=False, attempts=0)
    with httpx.Client(follow_redirects=False, timeout=timeout_s) as client:
        for attempt in range(1, attempts + 1):
            timestamp = str(int(time.time()))
            headers = {"content-type": "application/json", TIMESTAMP_HEADER: timestamp,
                       "user-agent": "instantid-serve-webhook"}
            if secret:
                headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
            try:
                answer = client.post(url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                last = WebhookDelivery(delivered=False, attempts=attempt, error=type(exc).__name__)
            else:
                if 200 <= answer.status_code < 300:
                    return WebhookDelivery(delivered=True, attempts=attempt, status_code=answer.status_code)
                last = WebhookDelivery(delivered=False, attempts=attempt, status_code=answer.status_code,
                                       error="redirect not followed" if 300 <= answer.status_code < 400 else None)
                if answer.status_code != 429 and answer.status_code < 500:
                    break
            if attempt < attempts:
                time.sleep(backoff_s * 2 ** (attempt - 1))
    logger.warning("job %s: webhook not delivered after %d tries (%s)", status.job_id, last.attempts,
                   last.error or last.status_code)
    return last
