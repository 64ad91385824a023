"""Links that expire and the tiny preset's notice, through real HTTP on the session's app (tiny preset, outputs in the
S3 test server, which refuses a presigned URL past its time as S3 does). Signed links to file:// outputs are
covered against the real outputs route in tests/unit/test_links.py: the served apps write to S3."""

from __future__ import annotations

import os
import time

import httpx

from instantid_app.config import TINY_PRESET_NOTICE
from testkit.api import FAST, b64, post, s3_keys, s3_read
from testkit.net import wait_until


def test_a_response_links_each_image_by_a_presigned_url_that_downloads_then_expires(served_app, astronaut_bytes):
    asked = time.time()  # links expire at a whole second (int(now) + ttl), as S3's X-Amz-Date + X-Amz-Expires
    answer = post(served_app, {"face_image": b64(astronaut_bytes), "prompt": "a portrait", "num_images": 2, **FAST,
                               "output": {"url_ttl_s": 5}})  # long enough to download on a loaded machine
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["images"][0].startswith(f"s3://{served_app.bucket}/")  # today's fields stay
    assert len(result["urls"]) == 2 and int(asked) + 5 <= result["urls_expire_at"] <= int(time.time()) + 5
    for uri, url in zip(result["images"], result["urls"], strict=True):
        assert url.startswith(os.environ["AWS_ENDPOINT_URL"]) and "X-Amz-Signature=" in url, url
        image = httpx.get(url, timeout=30)  # no credentials, no API key: the URL is the permission
        assert image.status_code == 200 and image.content == s3_read(uri)
    expired = wait_until(lambda: [r for r in [httpx.get(result["urls"][0], timeout=30)] if r.status_code == 403],
                         20, "the 5 s presigned URL expired")[0]
    assert b"Request has expired" in expired.content
    assert result["notice"] == TINY_PRESET_NOTICE


def test_links_default_to_an_hour_none_with_ttl_0_and_a_ttl_above_the_bound_is_a_400(served_app, astronaut_bytes):
    body = {"face_image": b64(astronaut_bytes), "prompt": "x", **FAST}
    default = post(served_app, body).json()
    assert abs(default["urls_expire_at"] - (time.time() + 3600)) < 120, default
    assert "urls" not in post(served_app, {**body, "output": {"url_ttl_s": 0}}).json()

    bound = served_app.config.ingress.links.max_ttl_s
    refused = {**body, "output": {"url_ttl_s": bound + 1, "prefix": "links-refused"}}
    for route in ("generate", "jobs"):
        answer = httpx.post(f"{served_app.url}/v1/{route}", json=refused, timeout=60)
        assert answer.status_code == 400, (route, answer.text)
        error = answer.json()["error"]
        assert error["field"] == "output.url_ttl_s" and str(bound) in error["message"], error
    assert s3_keys(served_app.bucket, "out/links-refused/") == []  # refused before any stage ran


def test_options_say_the_tiny_preset_makes_noise_and_how_to_serve_real_weights(served_app):
    options = httpx.get(f"{served_app.url}/v1/options", timeout=30).json()
    assert options["notice"] == TINY_PRESET_NOTICE and options["weights"] == "tiny preset"
    assert "noise" in options["notice"] and "weights: {sources: {}}" in options["notice"]
    assert options["links"] == {"default_ttl_s": 3600, "max_ttl_s": 7 * 86400}
