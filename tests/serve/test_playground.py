"""The playground at `/`, used as a person would: Debian's chromium (headless) driven by Playwright, against the
real app (tiny preset, real Ray on loopback, outputs in the S3 test server).

Screenshots land in `test-artifacts/` (desktop and 375 px wide) for a person to look at.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from testkit.serve import ServedApp

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make setup` installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served_app: ServedApp):
    """A fresh page that records JavaScript errors, and apart from them the HTTP errors chromium logs (an API
    answer the page handles, like a 405 to DELETE on a server that cannot cancel, is no JavaScript error)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.js_errors, page.failed_loads = [], []
    page.on("pageerror", lambda exc: page.js_errors.append(str(exc)))
    page.on("console", lambda msg: msg.type == "error" and (
        page.failed_loads if msg.text.startswith("Failed to load resource") else page.js_errors).append(msg.text))
    yield page
    context.close()


def open_playground(page, url: str) -> None:
    page.goto(f"{url}/")
    page.wait_for_selector("#generate:not([disabled])")


def png(color=(200, 200, 200), size=(256, 256)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def fill_request(page, face: dict, prompt: str = "an astronaut, watercolor", steps: int = 4) -> None:
    page.set_input_files("input[name=face_image]", files=[face])
    page.fill("textarea[name=prompt]", prompt)
    page.select_option("#size-preset", label="256 x 256 (preview)")
    page.fill("input[name=steps]", str(steps))


def job_reports_progress(url: str) -> bool:
    """Whether this server's job status has `progress` (the jobs API on the task queue); without it the bar shows
    an indeterminate state."""
    schemas = httpx.get(f"{url}/openapi.json").json()["components"]["schemas"]
    return "progress" in schemas["JobStatus"]["properties"]


def test_page_loads_without_errors_and_its_fields_are_the_api_parameters(page, served_app):
    open_playground(page, served_app.url)
    schema = httpx.get(f"{served_app.url}/openapi.json").json()["components"]["schemas"]["GenerateRequest"]
    names = page.eval_on_selector_all("#generate-form [name]", "nodes => nodes.map(n => n.getAttribute('name'))")
    top = {name for name in names if "." not in name}
    assert top == set(schema["properties"]), (top ^ set(schema["properties"]))
    output = resolve(schema["properties"]["output"], served_app.url)
    assert {n for n in names if n.startswith("output.")} == {f"output.{p}" for p in output["properties"]}
    unlabelled = page.eval_on_selector_all(
        "input, select, textarea",
        "nodes => nodes.filter(n => n.type !== 'hidden' && !n.labels.length && !n.getAttribute('aria-label'))"
        ".map(n => n.outerHTML)")
    assert not unlabelled
    assert page.get_by_role("button", name="Generate").is_enabled()
    assert page.is_hidden("#key-row")  # this server needs no key
    assert not page.js_errors and not page.failed_loads


def test_the_tiny_preset_banner_says_the_images_are_noise_and_how_to_serve_real_weights(page, served_app):
    open_playground(page, served_app.url)
    banner = page.locator("#tiny-preset-notice")
    assert banner.is_visible()
    text = banner.inner_text()
    assert "random" in text and "noise" in text and "weights: {sources: {}}" in text, text
    assert text == httpx.get(f"{served_app.url}/v1/options").json()["notice"]
    assert not page.js_errors


def resolve(node: dict, url: str) -> dict:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        return httpx.get(f"{url}/openapi.json").json()["components"]["schemas"][name]
    return node


def test_face_and_prompt_make_an_image_with_progress_download_and_its_settings(page, served_app, astronaut_bytes):
    open_playground(page, served_app.url)
    # Record what the progress bar showed while the job ran (the job may be quick: a poll can miss steps).
    page.evaluate("""() => {
        window.seen = {visible: false, values: []};
        const bar = document.getElementById('progress');
        new MutationObserver(() => {
            if (!document.getElementById('progress-row').hidden) window.seen.visible = true;
            const now = bar.getAttribute('aria-valuenow');
            if (now === null) return;
            window.seen.values.push([Number(now), Number(bar.getAttribute('aria-valuemax'))]);
        }).observe(document.body, {attributes: true, subtree: true});
    }""")
    steps = 12
    fill_request(page, {"name": "astronaut.jpg", "mimeType": "image/jpeg", "buffer": astronaut_bytes}, steps=steps)
    page.fill("input[name=seed]", "")
    # A field the page knows nothing special about, rendered from the schema: a list of LoRAs, rows on demand.
    page.click("#advanced summary")
    page.get_by_role("button", name="Add LoRA").click()
    page.fill("[name='loras.0.name']", "tiny-style")
    page.get_by_role("button", name="Generate").click()
    page.get_by_role("progressbar").wait_for(state="visible")
    assert page.get_by_role("button", name="Cancel").is_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-generating.png"))
    page.wait_for_function("() => { const i = document.querySelector('#results img'); "
                           "return i && i.complete && i.naturalWidth > 0; }")
    assert page.is_hidden("[role=alert]"), page.inner_text("[role=alert]")
    seen = page.evaluate("window.seen")
    assert seen["visible"]
    if job_reports_progress(served_app.url):
        assert seen["values"] and all(of == steps and 0 <= step <= steps for step, of in seen["values"]), seen
    image = page.locator("#results img").first
    assert image.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [256, 256]
    # Shown by its link that expires: a presigned URL to the S3 test server (the page's CSP allows that origin).
    assert image.get_attribute("src").startswith(os.environ["AWS_ENDPOINT_URL"])
    assert "X-Amz-Signature=" in image.get_attribute("src")
    figure = page.locator("#results figure").first
    seed = figure.get_attribute("data-seed")
    download = figure.get_by_role("link", name="Download")
    assert download.get_attribute("href").startswith("blob:") and download.get_attribute("download").endswith(".png")
    with page.expect_download() as info:
        download.click()
    saved = info.value.path()
    assert Image.open(saved).size == (256, 256)
    page.screenshot(path=str(ARTIFACTS / "playground-desktop.png"), full_page=True)

    # "Use these settings" refills the form from the image's sidecar, seed included.
    page.fill("input[name=seed]", "7")
    page.fill("input[name=steps]", "30")
    page.fill("textarea[name=prompt]", "something else")
    page.fill("[name='loras.0.name']", "another")
    figure.get_by_role("button", name="Use these settings").click()
    page.wait_for_function(f"() => document.querySelector('[name=seed]').value === '{seed}'")
    assert page.input_value("input[name=steps]") == str(steps)
    assert page.input_value("textarea[name=prompt]") == "an astronaut, watercolor"
    assert page.input_value("input[name=width]") == "256"
    assert page.input_value("[name='loras.0.name']") == "tiny-style"
    assert not page.js_errors

    page.set_viewport_size({"width": 375, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # nothing sticks out sideways
    assert page.get_by_role("button", name="Generate").bounding_box()["width"] <= 375
    page.screenshot(path=str(ARTIFACTS / "playground-375px.png"), full_page=True)


def test_a_pose_preset_is_sent_only_with_its_box_and_places_the_face(page, served_app, astronaut_bytes):
    """The pose fields are rendered from the schema like any other; the preset's select alone (showing its
    default) sends no pose, the preset with a box sends both."""
    open_playground(page, served_app.url)
    fill_request(page, {"name": "astronaut.jpg", "mimeType": "image/jpeg", "buffer": astronaut_bytes}, steps=2)
    page.click("#advanced summary")
    page.select_option("[name='pose.preset']", "profile_left")
    fill_box(page, "pose.box", [16, 16, 240, 240])
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.get_by_role("button", name="Generate").click()
    assert sent.value.post_data_json["pose"] == {"preset": "profile_left", "box": [16, 16, 240, 240]}
    page.wait_for_function("() => { const i = document.querySelector('#results img'); "
                           "return i && i.complete && i.naturalWidth > 0; }")
    assert page.is_hidden("[role=alert]"), page.inner_text("[role=alert]")
    fill_box(page, "pose.box", ["", "", "", ""])
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.get_by_role("button", name="Generate").click()
    assert "pose" not in sent.value.post_data_json
    assert not page.js_errors


def fill_box(page, name: str, box: list) -> None:
    """A box is four number fields (x1, y1, x2, y2)."""
    for part, value in enumerate(box):
        page.fill(f"[name='{name}'] input[data-part='{part}']", str(value))


def test_people_are_rows_with_their_box_as_numbers_and_a_preview(page, served_app, astronaut_bytes):
    open_playground(page, served_app.url)
    page.fill("textarea[name=prompt]", "two people")
    page.select_option("#size-preset", label="256 x 256 (preview)")
    page.fill("input[name=steps]", "2")
    photo = {"name": "astronaut.jpg", "mimeType": "image/jpeg", "buffer": astronaut_bytes}
    for index, box in enumerate(([0, 64, 128, 192], [128, 64, 256, 192])):
        page.get_by_role("button", name="Add Person").click()
        page.set_input_files(f"input[name='identities.{index}.face_image']", files=[photo])
        fill_box(page, f"identities.{index}.box", box)
    assert page.locator("#identity-preview").is_visible()
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    assert [who["box"] for who in body["identities"]] == [[0, 64, 128, 192], [128, 64, 256, 192]]
    assert all(who["face_image"] for who in body["identities"]) and "face_image" not in body
    page.wait_for_function("() => { const i = document.querySelector('#results img'); "
                           "return i && i.complete && i.naturalWidth > 0; }")
    assert page.is_hidden("[role=alert]"), page.inner_text("[role=alert]")
    assert not page.js_errors


def test_blank_photo_shows_an_alert_about_the_face(page, served_app):
    open_playground(page, served_app.url)
    fill_request(page, {"name": "blank.png", "mimeType": "image/png", "buffer": png()})
    page.get_by_role("button", name="Generate").click()
    alert = page.get_by_role("alert")
    alert.wait_for(state="visible")
    assert "face" in alert.inner_text().lower()
    assert page.locator("#results img").count() == 0
    page.screenshot(path=str(ARTIFACTS / "playground-no-face.png"))
    assert not page.js_errors


def test_a_file_that_is_not_an_image_is_named_in_the_alert(page, served_app):
    open_playground(page, served_app.url)
    # Checked in the page (a text file) and by the server (an image type with bytes no decoder reads).
    fill_request(page, {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"})
    page.get_by_role("button", name="Generate").click()
    assert "notes.txt" in page.get_by_role("alert").inner_text() and "not an image" in \
        page.get_by_role("alert").inner_text()
    fill_request(page, {"name": "broken.png", "mimeType": "image/png", "buffer": b"\x89PNG not really"})
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => document.querySelector('[role=alert]').textContent.includes('Not an image')")
    assert not page.js_errors


def test_cancel_stops_waiting_and_the_page_is_ready_again(page, served_app, astronaut_bytes):
    open_playground(page, served_app.url)
    fill_request(page, {"name": "astronaut.jpg", "mimeType": "image/jpeg", "buffer": astronaut_bytes}, steps=60)
    page.get_by_role("button", name="Generate").click()
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_selector("#generate:not([disabled])")
    assert page.is_hidden("[role=progressbar]")
    assert page.inner_text("#status").startswith(("Cancelled", "Stopped waiting"))
    assert page.locator("#results img").count() == 0
    assert not page.js_errors


@pytest.mark.slow
def test_under_a_route_prefix_with_keys_the_page_asks_for_the_key(browser, keyed_app, api_keys, astronaut_bytes):
    """The session's keyed app (/keyed), with its `play` key."""
    page = browser.new_page(viewport={"width": 375, "height": 800})
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    open_playground(page, keyed_app.url)
    assert page.get_by_label("API key").is_visible()
    fill_request(page, {"name": "astronaut.jpg", "mimeType": "image/jpeg", "buffer": astronaut_bytes})
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => document.querySelector('[role=alert]').textContent.includes('API key')")
    page.get_by_label("API key").fill(api_keys["play"])
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => { const i = document.querySelector('#results img'); "
                           "return i && i.complete && i.naturalWidth > 0; }")
    page.screenshot(path=str(ARTIFACTS / "playground-keyed-375px.png"), full_page=True)

    # Over the key's rate limit the page says the service is busy and when to retry (the 429's Retry-After).
    # Drained until the server answers 429 (serial requests on a loaded machine also refill the bucket).
    for _ in range(10 * keyed_app.config.ingress.access.rate_limit_burst):
        if httpx.get(f"{keyed_app.url}/v1/jobs/{'0' * 32}", headers={"X-API-Key": api_keys["play"]}).status_code == 429:
            break
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => /service is busy: retry in \\d+ s/.test("
                           "document.querySelector('[role=alert]').textContent)")
    assert not errors
    page.close()


def test_outputs_route_serves_only_this_servers_outputs(served_app, astronaut_bytes):
    import base64

    body = {"face_image": base64.b64encode(astronaut_bytes).decode(), "prompt": "x", "steps": 2, "width": 64,
            "height": 64}
    result = httpx.post(f"{served_app.url}/v1/generate", json=body, timeout=120).json()
    get = lambda uri: httpx.get(f"{served_app.url}/v1/outputs", params={"uri": uri}, timeout=30)  # noqa: E731
    image = get(result["images"][0])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (64, 64)
    meta = get(result["metadata"])
    assert meta.status_code == 200 and json.loads(meta.content)["seed"] == result["seed"]
    folder = result["metadata"].rsplit("/", 1)[0]
    for uri in (f"{folder}/../meta.json", f"{folder}/request.json", f"s3://other/{folder[5:]}/meta.json",
                "file:///etc/passwd", f"s3://{served_app.bucket}/out/jobs/x.json"):
        refused = get(uri)
        assert refused.status_code == 400 and refused.json()["error"]["field"] == "uri", uri
    missing = get(f"{folder[:-8]}00000000/0.png")
    assert missing.status_code == 404


def test_playground_false_turns_the_page_off():
    # The router on an app of its own, with a host that has the playground off: what it receives is all it uses.
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from deployments.playground import router
    from instantid_app.config import AppConfig

    app = FastAPI()
    app.include_router(router)
    app.state.playground_host = SimpleNamespace(
        config=AppConfig.model_validate({"weights": {"preset": "tiny"}, "playground": False}))
    with TestClient(app) as client:
        for path in ("/", "/playground/app.js"):
            assert client.get(path).status_code == 404, path
        app.state.playground_host.config = AppConfig.model_validate({"weights": {"preset": "tiny"}})
        assert client.get("/playground/app.js").status_code == 200
