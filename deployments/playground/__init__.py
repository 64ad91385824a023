"""The playground: a single page at `/` that drives the public API from a browser, plus the two small routes it
needs and any other client may use.

- `GET /` and `GET /playground/{file}`: static HTML/CSS/JS shipped in this package (no build step, no CDN).
- `GET /v1/options`: what this server offers (the request schema, size presets, limits, whether keys are needed),
  so the page renders fields other modules add to the request model without changes here.
- `GET /v1/outputs?uri=...`: the bytes of one output image or sidecar written under the configured output URI, so
  a browser can show and download `file://` and `s3://` results and refill the form from the sidecar. With
  `expires` and `sig` (a response's signed link, deployments/links.py) no API key is needed until it expires;
  an expired or altered link answers 403.

`router` holds plain route functions; what they need of the serving replica (`PlaygroundHost`: the app config, the
live settings and access control, the output store, the writer's handle, the shared HTTP wrapper) reaches them
through FastAPI's dependency injection from `app.state.playground_host`, which the Ingress sets to itself.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources
from typing import Any, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from instantid_core.config import DEFAULT_GUIDANCE, DEFAULT_STEPS
from instantid_core.errors import InstantIDError, InvalidParameter
from instantid_core.styles import builtin_styles, load_styles

from ..schemas import ErrorBody, GenerateRequest

router = APIRouter()

STATIC = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
# The page loads only its own files and talks only to this origin; images arrive as blob: URLs or by their links
# (this origin's signed outputs route, or the bucket's origin for presigned S3 URLs: `page_headers`).
CSP = ("default-src 'self'; img-src 'self' blob: data:{images}; object-src 'none'; base-uri 'self'; "
       "frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP.format(images=""),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# SDXL's trained sizes (the reference demo's list), then small ones that run in seconds on the tiny preset.
SIZE_PRESETS = [
    (None, None, "Follow the photo (short side 1024)"),
    (1024, 1024, "1024 x 1024 (square)"), (1152, 896, "1152 x 896 (landscape)"), (896, 1152, "896 x 1152 (portrait)"),
    (1216, 832, "1216 x 832 (landscape)"), (832, 1216, "832 x 1216 (portrait)"), (1344, 768, "1344 x 768 (wide)"),
    (768, 1344, "768 x 1344 (tall)"), (1536, 640, "1536 x 640 (panorama)"), (640, 1536, "640 x 1536 (banner)"),
    (512, 512, "512 x 512 (quick)"), (256, 256, "256 x 256 (preview)"),
]
# What an output object may be called (OutputStore.write_request): `{index}.{ext}` images and `meta.json`. Anything
# else under the output URI (job state with the caller's uploaded photos, for one) is never served.
OUTPUT_NAME = re.compile(r"^(?:\d{1,3}\.(?:png|jpg|webp)|meta\.json)$")
OUTPUT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "json": "application/json"}


@cache
def static_file(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def request_schema() -> dict[str, Any]:
    """GenerateRequest's JSON schema, definitions inlined under `$defs` (what the page renders)."""
    return GenerateRequest.model_json_schema()


class PlaygroundHost(Protocol):
    """What the playground's routes use of the replica that serves them (the Ingress)."""

    config: Any  # AppConfig
    settings: Any  # IngressSettings (live)
    access: Any  # AccessControl (live)
    outputs: Any  # OutputStore of config.output_uri
    links: Any  # OutputLinks of that store (live: the Ingress's links settings)
    writer: Any  # the OutputWriter's DeploymentHandle

    async def _http(self, request: Request, route: str, run: Callable[[], Awaitable[Response]],
                    action: str) -> Response: ...


def serving_host(request: Request) -> PlaygroundHost:
    return request.app.state.playground_host


Host = Depends(serving_host)


def style_names(config: Any) -> list[str]:
    # The operator's styles file is read by the prompt stage; where this replica cannot read it, the built-ins.
    try:
        return list(load_styles(config.pipeline))
    except (OSError, ValueError, InstantIDError):
        return list(builtin_styles())


@router.get("/", include_in_schema=False)
async def playground_page(request: Request, host: PlaygroundHost = Host) -> Response:
    if not host.config.playground:
        raise StarletteHTTPException(404)
    # <base> makes every relative URL in the page (its files, the API) resolve under the app's route prefix.
    root = request.scope.get("root_path", "").rstrip("/")
    page = static_file("index.html").replace(b"<head>", f'<head><base href="{root}/">'.encode(), 1)
    # The bucket's origin comes from presigning once (boto3's first client loads its models): off the event loop.
    origin = await asyncio.to_thread(lambda: host.links.image_origin)
    return Response(page, media_type="text/html; charset=utf-8", headers=page_headers(origin))


def page_headers(image_origin: str | None) -> dict[str, str]:
    """HEADERS, with the origin of presigned S3 URLs allowed as an image source when outputs are on S3."""
    return {**HEADERS, "Content-Security-Policy": CSP.format(images=f" {image_origin}" if image_origin else "")}


@router.get("/playground/{name}", include_in_schema=False)
async def playground_file(name: str, host: PlaygroundHost = Host) -> Response:
    if not host.config.playground or name not in STATIC or name == "index.html":
        raise StarletteHTTPException(404)
    return Response(static_file(name), media_type=f"{STATIC[name]}; charset=utf-8", headers=HEADERS)


@router.get("/v1/options")
async def http_options(host: PlaygroundHost = Host) -> dict[str, Any]:
    """What this server offers: the request schema, size presets, limits, and whether API keys are required."""
    config, settings = host.config, host.settings
    writer = await host.writer.live_settings.remote()  # its user_config: a live setting of another deployment
    return {
        # The tiny preset's images are noise: said first, with the change that serves real weights (absent then).
        **({"notice": config.notice} if config.notice else {}),
        "weights": "tiny preset" if config.weights.preset == "tiny" else "real",
        "request_schema": request_schema(),
        "default_scheduler": config.pipeline.default_scheduler.value,
        # Where a field's default depends on others (steps, guidance: the scheduler's preset), what the page
        # shows for "auto"; `choices`: the values a free-text field accepts on this server.
        "param_defaults": {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE},
        "choices": {"style": style_names(config)},
        "size_presets": [{"width": w, "height": h, "label": label} for w, h, label in SIZE_PRESETS],
        "limits": {"max_image_bytes": settings.max_image_bytes, "max_body_bytes": settings.max_body_bytes,
                   "inline_max_pixels": writer["inline_max_pixels"]},
        # Responses' `urls` live output.url_ttl_s (default and bound here).
        "links": {"default_ttl_s": settings.links.default_ttl_s, "max_ttl_s": settings.links.max_ttl_s},
        "api_key_required": bool(host.access.enabled),
        # Without a job queue (AppConfig.jobs) the page uses /v1/generate: no step progress.
        "jobs": config.jobs is not None,
        "playground": config.playground,
        # The safety stage (null: none): its mode, and whether `safety_checker: false` is accepted.
        "safety": config.safety.model_dump(mode="json", include={"mode", "allow_request_disable"})
        if config.safety else None,
    }


@router.get("/v1/outputs", responses={
    200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}, "application/json": {}}},
    **{code: {"model": ErrorBody} for code in (400, 401, 403, 404, 429, 503)}})
async def http_output(request: Request, uri: str, expires: int | None = None, sig: str | None = None,
                      host: PlaygroundHost = Host) -> Response:
    """One output image or `meta.json` sidecar, by the URI a generate response or job result named.

    Only objects under this server's output URI named like outputs are served; with API keys on, a key is
    needed (request ids are random, but a URI may have been shared in logs), unless the request is a response's
    signed link (`expires`, `sig`): that serves without a key until it expires, then answers 403."""
    signed = expires is not None or sig is not None

    async def read() -> Response:
        if signed:  # checked before anything is read
            host.links.verify(uri, expires, sig)
        key = output_key(host.outputs.base_uri, uri)
        data = await asyncio.to_thread(host.outputs.read_bytes, key)
        return Response(data, media_type=OUTPUT_TYPES[key.rsplit(".", 1)[1]],
                        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})

    # "jobs": the page reads results of jobs; a key for /v1/generate alone has the URIs in its answers.
    return await host._http(request, "outputs", read, action=None if signed else "jobs")


def output_key(base_uri: str, uri: str) -> str:
    """The store key of an output `uri` under `base_uri`; InvalidParameter for anything else."""
    base = base_uri + "/"
    key = uri[len(base):] if uri.startswith(base) else ""
    parts = key.split("/")
    if not key or len(parts) < 3 or not OUTPUT_NAME.match(parts[-1]) or any(p in ("", ".", "..") for p in parts):
        raise InvalidParameter("uri: not an output of this server (use a URI from a response's `images` or "
                               "`metadata`)", field="uri")
    return key
