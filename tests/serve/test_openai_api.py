"""The OpenAI-compatible images API (deployments/openai_api.py) driven by the official `openai` client over real HTTP
against the served apps (tiny preset): generations and edits in both response formats, the same images as
/v1/generate, OpenAI-shaped errors that name the field and write nothing, and API keys as `Authorization: Bearer`."""

from __future__ import annotations

import base64
import json
import os
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from fastapi import Request

from instantid_app.config import TINY_PRESET_NOTICE
from testkit.api import FAST, b64, png_pixels, s3_keys, s3_read

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def client(app, key: str = "no-key-needed") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_generations_answer_urls_and_b64_json_of_the_images_v1_generate_makes(served_app, astronaut_bytes):
    instantid = {"face_image": b64(astronaut_bytes), **FAST, "seed": 11}
    ours = httpx.post(f"{served_app.url}/v1/generate", params={"inline": "true"}, timeout=120,
                      json={**instantid, "prompt": "a portrait", "num_images": 2})
    assert ours.status_code == 200, ours.text
    expected = [png_pixels(base64.b64decode(image)) for image in ours.json()["inline_images"]]

    linked = client(served_app).images.generate(prompt="a portrait", n=2, response_format="url", model="instantid",
                                                user="tester", extra_body={"instantid": instantid})
    assert linked.size == "64x64" and linked.output_format == "png" and len(linked.data) == 2
    assert linked.model_extra["notice"] == TINY_PRESET_NOTICE  # the tiny preset's images are noise, and it says so
    for item, pixels in zip(linked.data, expected, strict=True):
        # The links that expire: presigned S3 URLs (deployments/links.py), fetched with no credentials.
        assert item.url.startswith(os.environ["AWS_ENDPOINT_URL"]) and "X-Amz-Signature=" in item.url, item.url
        fetched = httpx.get(item.url, timeout=30)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        assert (png_pixels(fetched.content) == pixels).all()

    inline = client(served_app).images.generate(prompt="a portrait", n=2, response_format="b64_json",
                                                extra_body={"instantid": instantid})
    assert [item.url for item in inline.data] == [None, None]
    for item, pixels in zip(inline.data, expected, strict=True):
        assert (png_pixels(base64.b64decode(item.b64_json)) == pixels).all()


def test_edit_takes_the_upload_as_the_face_a_listed_size_and_the_extension(served_app, astronaut_bytes):
    result = client(served_app).images.edit(
        image=("face.jpg", astronaut_bytes, "image/jpeg"), prompt="a watercolor portrait", size="256x256",
        response_format="url", extra_body={"instantid": json.dumps({"steps": 2, "seed": 5, "style": "Watercolor"})})
    assert result.size == "256x256" and len(result.data) == 1
    image = httpx.get(result.data[0].url, timeout=30)
    assert image.status_code == 200 and png_pixels(image.content).shape == (256, 256, 3)
    bucket_and_key = urlsplit(result.data[0].url).path.lstrip("/")  # the presigned URL's path: /bucket/key
    sidecar = json.loads(s3_read(f"s3://{bucket_and_key}".replace("0.png", "meta.json")))
    assert (sidecar["seed"], sidecar["params"]["steps"], sidecar["params"]["style"]) == (5, 2, "Watercolor"), sidecar


def test_bad_input_is_an_openai_error_naming_the_field_and_nothing_is_generated(served_app, astronaut_bytes):
    api = client(served_app)
    refused = {"output": {"prefix": "openai-refused"}}  # where anything these requests wrote would be
    face = {"face_image": b64(astronaut_bytes), **FAST, **refused}
    generations = [  # (what the call sends beside the prompt, the param the 400 names)
        ({"size": "1000x1000", "extra_body": {"instantid": {"face_image": face["face_image"], **refused}}}, "size"),
        ({"n": 0, "extra_body": {"instantid": face}}, "n"),
        ({"n": 9, "extra_body": {"instantid": face}}, "n"),
        ({"response_format": "gif", "extra_body": {"instantid": face}}, "response_format"),
        ({"quality": "hd", "extra_body": {"instantid": face}}, "quality"),
        ({}, "instantid"),
        ({"extra_body": {"instantid": {**face, "steps": 0}}}, "instantid.steps"),
        ({"extra_body": {"instantid": {**face, "prompt": "y"}}}, "instantid.prompt"),
        ({"extra_body": {"instantid": {**face, "face_image": "%%%"}}}, "instantid.face_image[0]"),
    ]
    for kwargs, param in generations:
        with pytest.raises(openai.BadRequestError) as caught:
            api.images.generate(prompt="x", **kwargs)
        error = caught.value
        assert (error.param, error.type) == (param, "invalid_request_error") and error.code, (kwargs, error.body)
        assert error.body["message"], error.body

    with pytest.raises(openai.BadRequestError) as caught:
        api.images.edit(image=("face.png", astronaut_bytes, "image/png"), prompt="x", size="7x7",
                        extra_body={"instantid": json.dumps(refused)})
    assert caught.value.param == "size"
    # Not an image: 415 as on /v1/generate (errors.py's one table of status codes), in OpenAI's shape.
    with pytest.raises(openai.APIStatusError) as caught:
        api.images.edit(image=("face.png", b"not an image at all", "image/png"), prompt="x",
                        extra_body={"instantid": json.dumps({**FAST, **refused})})
    error = caught.value
    assert (error.status_code, error.param, error.code) == (415, "image", "invalid_image"), error.body
    assert s3_keys(served_app.bucket, "out/openai-refused/") == []  # none of them was generated
    api.images.generate(prompt="x", response_format="b64_json", extra_body={"instantid": face})  # a good one is
    assert [key.rsplit("/", 1)[1] for key in s3_keys(served_app.bucket, "out/openai-refused/")] == \
        ["0.png", "meta.json"]


def test_api_keys_arrive_as_bearer_and_guard_the_openai_routes(keyed_app, api_keys, astronaut_bytes):
    extension = {"extra_body": {"instantid": {"face_image": b64(astronaut_bytes), **FAST}}}
    with pytest.raises(openai.AuthenticationError) as caught:
        client(keyed_app, api_keys["unknown"]).images.generate(prompt="x", **extension)
    assert (caught.value.type, caught.value.code) == ("authentication_error", "unauthorized")
    assert caught.value.response.headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(openai.PermissionDeniedError) as caught:  # `poller` may use jobs only
        client(keyed_app, api_keys["poller"]).images.edit(image=("f.jpg", astronaut_bytes), prompt="x")
    assert caught.value.code == "forbidden"
    with pytest.raises(openai.BadRequestError) as caught:  # a good key gets past the check to the request's own
        client(keyed_app, api_keys["full"]).images.generate(prompt="x", size="3x3", **extension)
    assert caught.value.param == "size"


def test_urls_follow_the_route_prefix_and_a_tls_proxys_forwarded_headers():
    # The route on an app of its own: output_url (links.public_url) makes every link of an answer absolute.
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from deployments.openai_api import output_url
    from deployments.playground import router

    app = FastAPI()
    app.include_router(router)

    @app.get("/link")
    def link(request: Request) -> str:
        return output_url(request, "s3://bucket/out/2026-01-01/abc/0.png")

    with TestClient(app, root_path="/keyed") as test:
        assert test.get("/link").json() == \
            "http://testserver/keyed/v1/outputs?uri=s3%3A%2F%2Fbucket%2Fout%2F2026-01-01%2Fabc%2F0.png"
        behind_tls = test.get("/link", headers={"x-forwarded-proto": "https", "x-forwarded-host": "img.example.com"})
        assert behind_tls.json().startswith("https://img.example.com/keyed/v1/outputs?uri=s3%3A%2F%2F")
        hostile = test.get("/link", headers={"x-forwarded-proto": "javascript", "x-forwarded-host": "a/b@evil"})
        assert hostile.json().startswith("http://testserver/keyed/v1/outputs?")
