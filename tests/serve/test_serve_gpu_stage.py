"""The served Denoiser under GPU conditions, proven on CPU: a request whose client went away stops at the next step
and writes nothing. (Out of memory: tests/unit/test_denoiser_stage.py runs the Denoiser's batch path with the
fault injected, and tests/unit/test_error_mapping.py holds `gpu_memory` to a 503 with Retry-After.)"""

from __future__ import annotations

import base64
import uuid

import boto3
import httpx
import pytest

from testkit.net import wait_until
from testkit.serve import ongoing_requests, replica_actors

FAST = {"steps": 2, "width": 64, "height": 64}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.slow
def test_a_dropped_client_stops_its_denoising_and_writes_nothing(served_app, astronaut_bytes):
    prefix = f"dropped-{uuid.uuid4().hex[:8]}"
    # Hundreds of seconds of denoising on this CPU at this size: far more than the short request below may wait.
    long = {"face_image": b64(astronaut_bytes), "prompt": "a long one", "steps": 100, "width": 1024, "height": 1024,
            "output": {"prefix": prefix}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served_app.url}/v1/generate", json=long, timeout=httpx.Timeout(120, read=4))
    # The connection is closed: Serve cancels the request, the Denoiser drops it at its next step. Had it run on,
    # its replica would hold it for hundreds of seconds; every Denoiser replica is idle again well within 90 s.
    wait_until(lambda: all(ongoing_requests(name) == 0 for name in replica_actors("Denoiser")), 90,
               "every Denoiser replica idle after the client went away")
    short = httpx.post(f"{served_app.url}/v1/generate",
                       json={"face_image": b64(astronaut_bytes), "prompt": "a short one", **FAST}, timeout=150)
    assert short.status_code == 200, short.text
    listed = boto3.client("s3").list_objects_v2(Bucket=served_app.bucket, Prefix=f"out/{prefix}/")
    assert listed.get("KeyCount", 0) == 0, listed.get("Contents")
