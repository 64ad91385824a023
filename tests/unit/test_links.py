"""Links that expire (deployments/links.py): the HMAC signing of file:// links and its key, the bound on
output.url_ttl_s, the outputs route serving signed links through FastAPI's TestClient against the real router, and
presigned S3 URLs against the S3 test server (which refuses them once expired, as S3 does)."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from deployments.errors import LinkExpired, LinkInvalid, error_response
from deployments.links import OUTPUTS_ROUTE, SECRET_FILE, OutputLinks, link_ttl, public_url, sign, verify
from deployments.playground import page_headers, router
from instantid_app.config import TINY_PRESET_NOTICE, AppConfig
from instantid_app.settings import IngressSettings, LinkSettings
from instantid_core.errors import InstantIDError, InvalidParameter
from instantid_core.storage import OutputStore
from testkit.net import wait_until

SECRET = b"k" * 32
URI = "file:///data/out/2026-12-06/abc/0.png"


def test_a_signature_holds_until_its_expiry_and_for_its_uri_and_expiry_only():
    expires = 2_000_000_000
    sig = sign(SECRET, URI, expires)
    verify(SECRET, URI, expires, sig, now=expires - 1)
    with pytest.raises(LinkExpired):
        verify(SECRET, URI, expires, sig, now=expires)
    for uri, when, signature, secret in ((URI.replace("0.png", "1.png"), expires, sig, SECRET),
                                         (URI, expires + 3600, sig, SECRET),  # a longer life is not for the taking
                                         (URI, expires, sig[:-1] + ("0" if sig[-1] != "0" else "1"), SECRET),
                                         (URI, expires, sig, b"another server's key"),
                                         (URI, expires, "", SECRET), (URI, None, sig, SECRET),
                                         (URI, expires, sig, None)):
        with pytest.raises(LinkInvalid) as caught:
            verify(secret, uri, when, signature, now=expires - 1)
        assert caught.value.field == "sig"


def test_url_ttl_defaults_to_the_servers_and_above_its_bound_is_refused_naming_the_field():
    settings = LinkSettings(default_ttl_s=600, max_ttl_s=3600)
    assert (link_ttl(None, settings), link_ttl(3600, settings), link_ttl(0, settings)) == (600, 3600, 0)
    with pytest.raises(InvalidParameter) as caught:
        link_ttl(3601, settings)
    assert caught.value.field == "output.url_ttl_s" and "3600" in caught.value.message
    with pytest.raises(ValueError, match="default_ttl_s"):
        LinkSettings(default_ttl_s=7200, max_ttl_s=3600)
    assert IngressSettings().links.default_ttl_s == 3600  # links on by default, for an hour


def test_replicas_share_the_key_beside_file_outputs_or_the_environments(tmp_path, monkeypatch):
    monkeypatch.delenv("INSTANTID_LINK_SECRET", raising=False)
    store = OutputStore(f"file://{tmp_path}/out")
    first, second = OutputLinks(store, LinkSettings()), OutputLinks(OutputStore(f"file://{tmp_path}/out"),
                                                                     LinkSettings())
    assert first.secret and first.secret == second.secret  # what one replica signs, another accepts
    assert os.stat(tmp_path / "out" / SECRET_FILE).st_mode & 0o777 == 0o600
    assert [p.name for p in (tmp_path / "out").iterdir()] == [SECRET_FILE]  # no temporary file left
    assert OutputLinks(OutputStore(f"file://{tmp_path}/other"), LinkSettings()).secret != first.secret
    monkeypatch.setenv("LINKS_KEY", "from-a-secret")
    assert OutputLinks(store, LinkSettings(secret_env="LINKS_KEY")).secret == b"from-a-secret"


@pytest.fixture
def outputs_app(tmp_path, monkeypatch):
    """The playground's router on an app of its own whose host has real parts: the config, a file:// store with one
    request written, and its links. `_http` is the Ingress's shape of answering errors (its metrics aside)."""
    monkeypatch.delenv("INSTANTID_LINK_SECRET", raising=False)
    store = OutputStore(f"file://{tmp_path}/out")
    stored = store.write_request("req1", [b"\x89PNG image bytes"], "png", {"seed": 1})

    async def _http(request: Request, route: str, run, action):
        assert action is None, "a signed link needs no key"
        try:
            return await run()
        except InstantIDError as exc:
            return error_response(exc, retry_after_s=1)

    app = FastAPI()
    app.include_router(router)

    @app.get("/link")
    def public(request: Request, link: str) -> str:
        return public_url(request, link)

    app.state.playground_host = SimpleNamespace(
        config=AppConfig.model_validate({"weights": {"preset": "tiny"}, "output_uri": store.base_uri}),
        outputs=store, links=OutputLinks(store, LinkSettings()), _http=_http)
    with TestClient(app, root_path="/demo") as client:
        yield client, app.state.playground_host.links, stored


def refused(response: httpx.Response) -> list[httpx.Response]:
    """[response] once it is a 403 (for wait_until), else []."""
    return [response] if response.status_code == 403 else []


def absolute(client: TestClient, link: str) -> str:
    """The link as the app's HTTP answers give it (public_url, under the app's route prefix)."""
    return client.get("/link", params={"link": link}).json()


def test_a_signed_file_link_serves_the_image_until_it_expires(outputs_app):
    client, links, stored = outputs_app
    (link,), expires = links.make(stored.image_uris, ttl_s=60)
    assert link.startswith(f"{OUTPUTS_ROUTE}?") and expires - 60 <= time.time()
    url = absolute(client, link)
    assert url.startswith("http://testserver/demo/v1/outputs?uri=file%3A%2F%2F"), url
    answer = client.get(url)
    assert answer.status_code == 200 and answer.content == b"\x89PNG image bytes"
    assert answer.headers["content-type"] == "image/png"

    (short,), short_expires = links.make(stored.image_uris, ttl_s=1)
    first = client.get(absolute(client, short))
    # Served until it expires: a 200, unless this loaded machine took the whole second to ask (then a 403 already).
    assert first.status_code == 200 or time.time() >= short_expires, first.json()
    expired = wait_until(lambda: refused(client.get(absolute(client, short))), 10, "the 1 s link expired")[0]
    assert expired.json()["error"]["code"] == "link_expired" and expired.json()["error"]["field"] == "expires"


def test_a_changed_signed_link_is_refused_before_anything_is_read(outputs_app):
    client, links, stored = outputs_app
    (link,), expires = links.make(stored.image_uris, ttl_s=60)
    query = {k: v[0] for k, v in parse_qs(urlsplit(link).query).items()}
    changes = [{"uri": stored.meta_uri}, {"expires": str(expires + 86400)}, {"sig": "0" * 64}, {"sig": ""},
               {"uri": "file:///etc/passwd"}]
    for change in changes:
        refused = client.get("/v1/outputs", params={**query, **change})
        assert refused.status_code == 403, change
        assert refused.json()["error"]["code"] == "link_invalid", (change, refused.json())
    no_sig = client.get("/v1/outputs", params={"uri": query["uri"], "expires": query["expires"]})
    assert no_sig.status_code == 403 and no_sig.json()["error"]["code"] == "link_invalid"


def test_presigned_s3_urls_download_until_their_ttl_then_s3_answers_403(s3_bucket):
    store = OutputStore(f"s3://{s3_bucket}/out")
    stored = store.write_request("req2", [b"png bytes"], "png", {"seed": 2})
    links = OutputLinks(store, LinkSettings())
    (url,), expires = links.make(stored.image_uris, ttl_s=1)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=1" in url
    first = httpx.get(url)  # no credentials: the URL is the permission
    assert first.status_code == 200 and first.content == b"png bytes"
    expired = wait_until(lambda: refused(httpx.get(url)), 10, "the presigned URL expired")[0]
    assert b"Request has expired" in expired.content
    assert links.image_origin == f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"
    assert f"img-src 'self' blob: data: {links.image_origin};" in page_headers(links.image_origin)[
        "Content-Security-Policy"]


def test_the_tiny_preset_says_its_images_are_noise_and_real_weights_say_nothing():
    tiny = AppConfig.model_validate({"weights": {"preset": "tiny"}})
    assert tiny.notice == TINY_PRESET_NOTICE and "noise" in tiny.notice and "weights: {sources: {}}" in tiny.notice
    assert AppConfig.model_validate({"weights": {"sources": {}}}).notice is None
