"""Job webhooks against a real HTTP receiver on loopback (no Ray): Standard Webhooks signatures, checked by the
`standardwebhooks` package a receiver would use; bounded retries with exponential backoff and jitter; what is not
retried (4xx, redirects)."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from deployments.jobs.webhooks import deliver, signing_key
from deployments.schemas import JobStatus
from testkit.net import free_port
from testkit.webhooks import WebhookReceiver

STATUS = JobStatus(job_id="0123abcd", status="done", created_at=1.0, updated_at=2.0)
SECRET = "whsec_" + base64.b64encode(b"a 32-byte key for the test here!").decode()


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[WebhookReceiver]:
    server = WebhookReceiver(getattr(request, "param", []))
    yield server
    server.close()


def send(url: str, secret: str | None = SECRET, attempts: int = 5, backoff_s: float = 0.01):
    return deliver(url, STATUS, secret=signing_key(secret) if secret else None, attempts=attempts,
                   backoff_s=backoff_s, timeout_s=5)


def test_a_signed_call_verifies_with_the_standard_webhooks_library(receiver: WebhookReceiver) -> None:
    assert send(receiver.url).delivered
    ((headers, body, _),) = receiver.calls
    assert headers["webhook-id"] == STATUS.job_id and headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(body, headers) == STATUS.model_dump(mode="json", exclude_none=True)
    with pytest.raises(WebhookVerificationError):  # another key, or a changed body, does not verify
        Webhook("whsec_" + base64.b64encode(b"another key").decode()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"done", b"fail"), headers)


def test_a_plain_string_secret_is_the_key_itself(receiver: WebhookReceiver) -> None:
    assert send(receiver.url, secret="plain-secret").delivered
    ((headers, body, _),) = receiver.calls
    assert Webhook(b"plain-secret").verify(body, headers)["job_id"] == STATUS.job_id


def test_without_a_secret_calls_are_unsigned(receiver: WebhookReceiver) -> None:
    assert send(receiver.url, secret=None).delivered
    ((headers, _, _),) = receiver.calls
    assert "webhook-signature" not in headers and headers["webhook-id"] == STATUS.job_id


@pytest.mark.parametrize("receiver", [[503, 500, 429]], indirect=True)
def test_failures_are_retried_with_exponential_waits_and_bounded_jitter_under_one_id(receiver: WebhookReceiver) -> None:
    backoff = 0.2
    delivery = send(receiver.url, backoff_s=backoff)
    assert delivery.model_dump(exclude_none=True) == {"delivered": True, "attempts": 4, "status_code": 200}
    assert {headers["webhook-id"] for headers, _, _ in receiver.calls} == {STATUS.job_id}
    for headers, body, _ in receiver.calls:  # each try signed afresh (its own timestamp), each verifies
        Webhook(SECRET).verify(body, headers)
    arrivals = [at for _, _, at in receiver.calls]
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
    for n, gap in enumerate(gaps):
        base = backoff * 2**n
        assert base <= gap <= base + backoff + 0.3, (n, gaps)  # exponential, plus at most `backoff` of jitter


@pytest.mark.parametrize("receiver", [[503] * 10], indirect=True)
def test_retries_are_bounded_and_the_last_answer_is_what_the_job_records(receiver: WebhookReceiver) -> None:
    delivery = send(receiver.url, attempts=3)
    assert delivery.model_dump(exclude_none=True) == {"delivered": False, "attempts": 3, "status_code": 503}
    assert len(receiver.calls) == 3


@pytest.mark.parametrize(("receiver", "code", "error"), [([400], 400, None), ([302], 302, "redirect not followed")],
                         indirect=["receiver"])
def test_a_4xx_or_a_redirect_is_final_at_once(receiver: WebhookReceiver, code: int, error: str | None) -> None:
    delivery = send(receiver.url)
    assert (delivery.delivered, delivery.attempts, delivery.status_code, delivery.error) == (False, 1, code, error)
    assert len(receiver.calls) == 1


def test_an_unreachable_receiver_is_tried_the_bounded_number_of_times() -> None:
    delivery = send(f"http://127.0.0.1:{free_port()}/hook", attempts=3)
    assert (delivery.delivered, delivery.attempts, delivery.error) == (False, 3, "ConnectError")


def test_a_whsec_secret_that_is_not_base64_is_refused() -> None:
    with pytest.raises(ValueError, match="whsec_"):
        signing_key("whsec_not base64!")
