"""Job webhooks: the URL check at submit time and the signed, retried POST when a job ends.

Only hosts the operator lists in `allowed_webhook_hosts` are ever called (a webhook is a server-side request the
caller chooses: without the list it would reach internal services), redirects are not followed (a listed host
could otherwise bounce the call anywhere), and a failed call (no answer, 429, 5xx) is retried a bounded number of
times with exponential backoff and jitter (tenacity), so receivers that failed together are not hit together.

With a secret configured, each call is signed in the Standard Webhooks format (standardwebhooks.com): headers
`webhook-id` (the job id: the same on every retry, so a receiver can drop repeats), `webhook-timestamp` (Unix
seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`; a secret written
`whsec_<base64>` is that spec's form (the key is the decoded bytes), any other value is the key as UTF-8.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import time
from urllib.parse import urlsplit

import httpx
from tenacity import Retrying, retry_if_result, stop_after_attempt, wait_exponential_jitter

from instantid_core.errors import InvalidParameter

from ..errors import WebhookNotAllowed
from ..schemas import JobStatus, WebhookDelivery

logger = logging.getLogger("ray.serve")
ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER = "webhook-id", "webhook-timestamp", "webhook-signature"
BACKOFF_MAX_S = 60.0  # no single wait longer than this, however many tries


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


def signing_key(secret: str) -> bytes:
    """The HMAC key of a configured secret: `whsec_<base64>` decoded (the Standard Webhooks form), else its bytes."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except binascii.Error as exc:
            raise ValueError("the webhook secret starts with whsec_ but the rest is not base64") from exc
    return secret.encode()


def sign(key: bytes, message_id: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def longest_delivery_s(attempts: int, timeout_s: float) -> float:
    """An upper bound on one delivery with all its tries: each try's timeout and each wait's cap."""
    return attempts * timeout_s + (attempts - 1) * BACKOFF_MAX_S


def deliver(url: str, status: JobStatus, *, secret: bytes | None, attempts: int, backoff_s: float,
            timeout_s: float) -> WebhookDelivery:
    """POST the final status; retry no answer, 429 and 5xx with backoff and jitter (the n-th wait is
    backoff_s * 2**(n-1) plus up to backoff_s, at most BACKOFF_MAX_S); give up at once on other answers (a 3xx
    included). Returns what the last try got (the record the job keeps)."""
    body = status.model_dump_json(exclude_none=True).encode()
    message_id = status.job_id
    tries = 0

    def post(client: httpx.Client) -> tuple[WebhookDelivery, bool]:
        """One try: what it got, and whether to try again."""
        nonlocal tries
        tries += 1
        timestamp = str(int(time.time()))
        headers = {"content-type": "application/json", "user-agent": "instantid-serve-webhook",
                   ID_HEADER: message_id, TIMESTAMP_HEADER: timestamp}
        if secret:
            headers[SIGNATURE_HEADER] = sign(secret, message_id, timestamp, body)
        try:
            answer = client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return WebhookDelivery(delivered=False, attempts=tries, error=type(exc).__name__), True
        code = answer.status_code
        if 200 <= code < 300:
            return WebhookDelivery(delivered=True, attempts=tries, status_code=code), False
        return WebhookDelivery(delivered=False, attempts=tries, status_code=code,
                               error="redirect not followed" if 300 <= code < 400 else None), code == 429 or code >= 500

    retrying = Retrying(stop=stop_after_attempt(attempts), retry=retry_if_result(lambda outcome: outcome[1]),
                        wait=wait_exponential_jitter(initial=backoff_s, max=BACKOFF_MAX_S, jitter=backoff_s),
                        retry_error_callback=lambda state: state.outcome.result())  # tries spent: the last one
    with httpx.Client(follow_redirects=False, timeout=timeout_s) as client:
        delivery, _ = retrying(post, client)
    if not delivery.delivered:
        logger.warning("job %s: webhook not delivered after %d tries (%s)", status.job_id, delivery.attempts,
                       delivery.error or delivery.status_code)
    return delivery
