"""OpenAI-compatible images API on the Ingress: `POST /v1/images/generations` and `POST /v1/images/edits`, so the
`openai` client libraries, gateways and tools that speak OpenAI's images API drive this service.

Both routes translate the request into a GenerateRequest and run it through the Ingress's own `generate` (the same
stages and checks as /v1/generate), behind the same API keys and rate limits (action `generate`; keys arrive as
`Authorization: Bearer`). What OpenAI's body cannot say travels in one extension object, `instantid`: every
GenerateRequest field (`face_image` required on generations; the upload is the face on edits) except `prompt` and
`num_images`, which are OpenAI's `prompt` and `n`.

Answers are in OpenAI's shapes: `{created, data: [{url | b64_json}], size, output_format}` and errors as
`{"error": {message, type, param, code}}`, with the status codes of errors.py's one table (`param` names the
OpenAI field, or `instantid.<field>`). A `url` is the image's link that expires (deployments/links.py: a presigned
S3 URL, or a signed absolute link to `/v1/outputs`); with `instantid.output.url_ttl_s: 0`, an unsigned link to the
outputs route, which needs a key with the `jobs` action where API keys are on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any, Literal, Protocol
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from instantid_core.config import GenerateParams
from instantid_core.errors import InstantIDError, InvalidParameter

from .errors import validation_error
from .links import OUTPUTS_ROUTE, public_url
from .playground import SIZE_PRESETS, Host
from .schemas import GenerateRequest, GenerateResponse

router = APIRouter(tags=["OpenAI-compatible"])

# `size` values: SDXL's trained sizes and the small ones that run in seconds on the tiny preset (the playground's
# presets), and "auto" (the default: follow the face photo, short side 1024). Any other multiple of 8 can be asked
# for as instantid.width/height.
SIZES: dict[str, tuple[int, int] | None] = {"auto": None, **{f"{w}x{h}": (w, h) for w, h, _ in SIZE_PRESETS if w}}
MAX_N = next(m.le for m in GenerateParams.model_fields["num_images"].metadata if hasattr(m, "le"))
# The extension may not restate what OpenAI's own fields say.
OWN_FIELDS = {"prompt": "prompt", "num_images": "n"}
EDIT_FIELDS = {"image", "image[]", "prompt", "n", "size", "response_format", "model", "user", "instantid"}
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


class ImagesRequest(BaseModel):
    """OpenAI's fields common to both routes."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., description="What to draw (our `prompt`: weights and long prompts as in /v1/generate).")
    n: int = Field(1, ge=1, le=MAX_N, description=f"Images to generate, 1 to {MAX_N} (our `num_images`).")
    size: str | None = Field(None, description=f"WIDTHxHEIGHT, one of {', '.join(SIZES)}; default auto.")
    response_format: Literal["url", "b64_json"] = Field("url", description="url: a link that expires "
                                                        "(instantid.output.url_ttl_s); b64_json: the encoded "
                                                        "image in the response.")
    model: str | None = Field(None, description="Accepted and ignored: the app serves one model.")
    user: str | None = Field(None, description="Accepted and ignored.")

    @field_validator("size")
    @classmethod
    def _known_size(cls, value: str | None) -> str | None:
        if value is not None and value not in SIZES:
            raise ValueError(f"must be one of {', '.join(SIZES)} (or give instantid.width and instantid.height), "
                             f"got {value!r}")
        return value


class ImagesGenerationRequest(ImagesRequest):
    instantid: dict[str, Any] = Field(..., description="Every /v1/generate field but prompt and num_images; "
                                      "face_image (base64 or s3://) is required.")


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time of the answer.")
    data: list[ImageData]
    size: str = Field(description="WIDTHxHEIGHT of the images.")
    output_format: str = Field(description="png, jpeg or webp (instantid.output.format).")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


class ImagesHost(Protocol):
    """What these routes use of the replica that serves them (the Ingress)."""

    inputs: Any  # InputReader (live limits)
    outputs: Any  # OutputStore of config.output_uri

    async def generate(self, request: GenerateRequest, inline: bool = False, request_id: str | None = None,
                       job_id: str | None = None, new_id: bool = False, attempt: int | None = None
                       ) -> GenerateResponse: ...

    async def _http(self, request: Request, route: str, run: Any, action: str) -> Response: ...


ERRORS = {code: {"model": OpenAIErrorBody} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503, 504)}
GENERATIONS_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": ImagesGenerationRequest.model_json_schema()}}}}
EDITS_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "prompt"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "The face photo (`image[]`: several)."},
        **ImagesRequest.model_json_schema()["properties"],
        "instantid": {"type": "string", "description": "A JSON object: every /v1/generate field but prompt, "
                                                       "num_images and face_image."}}}}}}}


@router.post("/v1/images/generations", response_model=ImagesResponse, responses=ERRORS,
             openapi_extra=GENERATIONS_BODY)
async def images_generations(request: Request, host: ImagesHost = Host) -> Response:
    """OpenAI's image generation: a JSON body with the face photo in `instantid.face_image`."""
    async def run() -> Response:
        try:
            body = ImagesGenerationRequest.model_validate_json(await host.inputs.read_body(request))
        except ValidationError as exc:
            raise validation_error(exc) from exc
        return await _generate(request, host, body, dict(body.instantid), faces_param="instantid.face_image")

    return openai_error(await host._http(request, "openai_generations", run, action="generate"))


@router.post("/v1/images/edits", response_model=ImagesResponse, responses=ERRORS, openapi_extra=EDITS_BODY)
async def images_edits(request: Request, host: ImagesHost = Host) -> Response:
    """OpenAI's image edit: a multipart upload whose `image` is the face photo."""
    async def run() -> Response:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise InvalidParameter("send a multipart/form-data body (image, prompt, ...)")
        form = await host.inputs.read_form(request, await host.inputs.read_body(request), max_files=8,
                                           max_fields=16)
        unknown = sorted(set(form) - EDIT_FIELDS)
        if unknown:
            hint = " (inpainting: instantid.init_image and instantid.mask_image)" if unknown[0] == "mask" else ""
            raise InvalidParameter(f"{unknown[0]}: not supported here{hint}", field=unknown[0])
        faces = [await part.read() for name in ("image", "image[]") for part in form.getlist(name)
                 if hasattr(part, "read")]
        if not faces:
            raise InvalidParameter("image: upload the face photo as a file", field="image")
        fields = {name: value for name, value in form.items()
                  if isinstance(value, str) and name not in ("image", "image[]", "instantid")}
        try:
            body = ImagesRequest.model_validate(fields)
        except ValidationError as exc:
            raise validation_error(exc) from exc
        extension = _extension(form.get("instantid"))
        if "face_image" in extension:
            raise InvalidParameter("instantid.face_image: the `image` upload is the face photo",
                                   field="instantid.face_image")
        extension["face_image"] = [base64.b64encode(face).decode() for face in faces]
        return await _generate(request, host, body, extension, faces_param="image")

    return openai_error(await host._http(request, "openai_edits", run, action="generate"))


def _extension(value: Any) -> dict[str, Any]:
    """The edit's `instantid` form field: a JSON object, or nothing."""
    if value is None:
        return {}
    try:
        extension = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        extension = None
    if not isinstance(extension, dict):
        raise InvalidParameter("instantid: not a JSON object", field="instantid")
    return extension


async def _generate(request: Request, host: ImagesHost, body: ImagesRequest, extension: dict[str, Any],
                    faces_param: str) -> Response:
    """`body` and its extension as one GenerateRequest through the Ingress's generate, answered in OpenAI's shape;
    errors name OpenAI's field (or `instantid.<field>`)."""
    params = dict(OWN_FIELDS)  # our field -> OpenAI's, for the errors
    for name, param in OWN_FIELDS.items():
        if name in extension:
            raise InvalidParameter(f"instantid.{name}: give it as `{param}`", field=f"instantid.{name}")
    size = SIZES.get(body.size or "auto")
    if size is not None:
        if {"width", "height"} & extension.keys():
            raise InvalidParameter("size: give size or instantid.width/height, not both", field="size")
        extension.update(width=size[0], height=size[1])
        params.update(width="size", height="size")
    try:
        try:
            generate = GenerateRequest.model_validate({**extension, "prompt": body.prompt, "num_images": body.n})
        except ValidationError as exc:
            raise validation_error(exc) from exc
        b64 = body.response_format == "b64_json"
        result = await host.generate(generate, inline=b64, request_id=request.state.request_id,
                                     new_id=request.state.new_id)
    except InstantIDError as exc:
        exc.field = _param(exc.field, params, faces_param)
        raise
    if b64:
        images = result.inline_images or [  # over the writer's inline_max_pixels: read back what it wrote
            base64.b64encode(data).decode()
            for data in await asyncio.gather(*(asyncio.to_thread(host.outputs.read_bytes, uri)
                                               for uri in result.images))]
        data = [{"b64_json": image} for image in images]
    else:  # the links that expire; with output.url_ttl_s 0 the outputs route (an API key where keys are on)
        data = [{"url": public_url(request, link)} for link in result.urls or ()] or \
            [{"url": output_url(request, uri)} for uri in result.images]
    answer = {"created": int(time.time()), "data": data, "size": f"{result.width}x{result.height}",
              "output_format": generate.output.format}
    if result.notice:  # the tiny preset: its images are noise (an extra key; OpenAI's clients keep extras)
        answer["notice"] = result.notice
    return JSONResponse(answer)


def _param(field: str | None, params: dict[str, str], faces_param: str) -> str | None:
    """Our field name as the OpenAI request spells it."""
    if field is None or field in params.values() or field.startswith("instantid") or field == "x-request-id":
        return field
    if field in params:
        return params[field]
    if field.startswith("face_image"):
        return faces_param if faces_param == "image" else f"instantid.{field}"
    return f"instantid.{field}"


def output_url(request: Request, uri: str) -> str:
    """An absolute, unsigned link to the outputs route for an output URI (see links.public_url)."""
    return public_url(request, f"{OUTPUTS_ROUTE}?{urlencode({'uri': uri})}")


def openai_error(response: Response) -> Response:
    """Our error answer (errors.error_response: the status, Retry-After, WWW-Authenticate) in OpenAI's shape."""
    if response.status_code < 400:
        return response
    error = json.loads(response.body)["error"]
    status = response.status_code
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = OpenAIErrorBody(error=OpenAIErrorDetail(message=error["message"], type=kind, param=error.get("field"),
                                                   code=error["code"]))
    headers = {name: response.headers[name] for name in ("retry-after", "www-authenticate") if name in response.headers}
    return JSONResponse(body.model_dump(), status_code=status, headers=headers or None)
