"""Hostile and broken requests against the running app over real HTTP: each gets its documented 4xx with a message,
none gets a 5xx, no replica restarts, and a valid request succeeds right after. Then a bounded schemathesis run
fuzzes every operation of the OpenAPI schema the app serves."""

from __future__ import annotations

import httpx
import pytest

from testkit.api import FAST, b64
from testkit.hostile import body_cases, check, image_cases, send
from testkit.serve import replica_actors

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_every_hostile_request_gets_its_documented_4xx_and_nothing_restarts(served_app, astronaut_bytes):
    config = served_app.config
    corpus = image_cases(astronaut_bytes) + body_cases(b64(astronaut_bytes), served_app.bucket,
                                                       config.ingress.max_body_bytes, config.ingress.max_image_bytes)
    assert len(corpus) >= 40 and len({c.name for c in corpus}) == len(corpus)
    replicas_before = replica_actors()

    with httpx.Client(base_url=served_app.url, timeout=120) as client:
        answers = [(case, send(client, case)) for case in corpus]
        problems = [p for p in (check(case, response) for case, response in answers) if p]
        server_errors = [case.name for case, response in answers if response.status_code >= 500]
        assert not server_errors, f"5xx for: {server_errors}"
        assert not problems, "\n".join(problems)

        assert replica_actors() == replicas_before, "a replica restarted while serving the corpus"
        ok = client.post("/v1/generate", json={"face_image": b64(astronaut_bytes), "prompt": "x", **FAST})
        assert ok.status_code == 200, ok.text


def test_schema_fuzzing_finds_no_server_error(served_app):
    """Property-based requests from the served OpenAPI schema (schemathesis, bounded): never a 5xx, and every
    4xx carries the documented error body."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{served_app.url}/openapi.json")
    replicas_before = replica_actors()
    seen: list[tuple[str, int]] = []

    def fuzzer(path: str, method: str):
        @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=schema[path][method].as_strategy())
        def fuzz(case) -> None:
            response = case.call(base_url=served_app.url, timeout=120)
            seen.append((path, response.status_code))
            assert response.status_code < 500, f"{method} {path}: {response.status_code} {response.text[:300]}"
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["code"] and error["message"], response.text
        return fuzz

    for path, method in (("/v1/generate", "POST"), ("/v1/jobs", "POST"), ("/v1/jobs/{job_id}", "GET"),
                         ("/v1/jobs/{job_id}", "DELETE")):
        fuzzer(path, method)()

    assert len(seen) >= 30, seen
    assert replica_actors() == replicas_before
