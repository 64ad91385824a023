"""Error mapping of the HTTP API: the one table of status codes per error type, and the JSON error body.

The core's errors carry a `code` and a message, never an HTTP status; the serving layer's own errors (overload,
timeouts, access) are defined here too. Every error answers `{"error": {code, message, field}}`.
"""

from __future__ import annotations

import logging
import re
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from instantid_core import errors as core
from instantid_core.errors import InstantIDError, InvalidParameter
from instantid_core.loras import InvalidLora

from .schemas import ErrorBody, ErrorDetail

logger = logging.getLogger("ray.serve")


class Unauthorized(InstantIDError):
    code = "unauthorized"  # no API key, or one that matches none (answers with WWW-Authenticate: Bearer)


class Forbidden(InstantIDError):
    """The API key is valid but not for this action (its `actions` list leaves it out)."""

    code = "forbidden"


class LinkExpired(Forbidden):
    """A signed output link past its `expires` (deployments.links): ask for the image again or use its URI."""

    code = "link_expired"


class LinkInvalid(Forbidden):
    """A signed output link whose signature does not match its URI and expiry (changed, or another server's)."""

    code = "link_invalid"


class RateLimited(InstantIDError):
    """The key sent more than its per-minute rate allows; Retry-After says when its bucket holds a request again."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServiceOverloaded(InstantIDError):
    """A stage's queue is full, or a stage replica restarted under the request: retry after Retry-After."""

    code = "overloaded"


class StageTimeout(InstantIDError):
    code = "stage_timeout"  # the request's stages took longer than stage_timeout_s; they are cancelled


class InternalError(InstantIDError):
    """A bug in a stage. The answer names the request id (the logs have the traceback), never the internals."""

    code = "internal"


class RequestIdInUse(InstantIDError):
    """The caller's x-request-id names outputs that exist: a reused id never overwrites another request's images."""

    code = "request_id_in_use"


class JobNotFound(InstantIDError):
    code = "job_not_found"  # unknown job id, or its record expired (jobs.status_ttl_s)


class JobCancelled(InstantIDError):
    """A job cancelled while it ran: raised where the Denoiser stops it, so no stage after it writes anything."""

    code = "job_cancelled"


class JobsDisabled(InstantIDError):
    code = "jobs_disabled"  # the app has no `jobs` (broker) configured


class JobsUnavailable(InstantIDError):
    """The jobs broker (Redis) did not answer in time: retry after Retry-After. /v1/generate is not affected."""

    code = "jobs_unavailable"


class JobsBacklogFull(RateLimited):
    """`jobs.max_queued` jobs already wait: a new one is refused (429) rather than queued behind hours of work."""

    code = "jobs_backlog_full"


class WebhookNotAllowed(InstantIDError):
    code = "webhook_not_allowed"  # webhook_url's host is not in allowed_webhook_hosts


class RouteNotFound(InstantIDError):
    """Starlette's 404 for a path no route serves, in our error format."""

    code = "not_found"


class MethodNotAllowed(InstantIDError):
    code = "method_not_allowed"


# The most specific class in an error's MRO decides; an InstantIDError not listed is a 400.
HTTP_STATUS: dict[type[InstantIDError], int] = {
    InstantIDError: 400,
    InvalidParameter: 400,
    Unauthorized: 401,
    Forbidden: 403,
    LinkExpired: 403,
    LinkInvalid: 403,
    core.InputNotAllowed: 403,
    core.InputNotFound: 404,
    JobNotFound: 404,
    WebhookNotAllowed: 403,
    JobCancelled: 409,
    JobsDisabled: 503,
    JobsUnavailable: 503,
    JobsBacklogFull: 429,
    RouteNotFound: 404,
    MethodNotAllowed: 405,
    RequestIdInUse: 409,
    core.ImageTooLarge: 413,
    core.InvalidImage: 415,
    core.NoFaceDetected: 422,
    core.UnsafeContent: 422,
    InvalidLora: 422,
    RateLimited: 429,
    InternalError: 500,
    core.WeightsError: 500,
    core.StorageError: 503,
    core.GPUMemoryError: 503,  # the size that does not fit is named; Retry-After: memory frees as batches end
    ServiceOverloaded: 503,
    StageTimeout: 504,
}
RETRYABLE = (429, 503)  # these answer with Retry-After


def http_status(exc: InstantIDError) -> int:
    return next(HTTP_STATUS[cls] for cls in type(exc).__mro__ if cls in HTTP_STATUS)


def error_response(exc: InstantIDError, retry_after_s: int, status: int | None = None) -> JSONResponse:
    status = status or http_status(exc)
    body = ErrorBody(error=ErrorDetail(code=exc.code, message=exc.message, field=exc.field,
                                       images=getattr(exc, "images", None)))
    headers = {}
    if status in RETRYABLE:
        headers["Retry-After"] = str(exc.retry_after_s if isinstance(exc, RateLimited) else retry_after_s)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers or None)


def internal_error_response(request_id: str, route: str, exc: BaseException) -> JSONResponse:
    """An unexpected exception: logged with its traceback (the Ingress counts the HTTP 500 in its metrics),
    answered as a JSON 500 that names the request id (what an operator greps the logs for), never a plain-text
    page or the internals."""
    logger.error("request %s: unexpected error in %s", request_id, route, exc_info=exc)
    return error_response(InternalError(f"internal error in request {request_id}; it has been logged"),
                          retry_after_s=1)


def validation_error(exc: ValidationError | RequestValidationError) -> InvalidParameter:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"] if part not in ("body", "query", "path")) or None
    if field is None and first["type"] == "value_error":
        # A check across fields (a model validator) has no location; its message starts with the field it names.
        named = re.match(r"Value error, ([A-Za-z_][\w.\[\]]*): ", first["msg"])
        if named:
            return InvalidParameter(first["msg"].removeprefix("Value error, "), field=named.group(1))
    return InvalidParameter(f"{field or 'body'}: {first['msg']}", field=field)


def install_error_handlers(app: FastAPI) -> None:
    """Starlette's own 404/405 and FastAPI's parameter checks answer in the same error format as ours."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(RouteNotFound(f"no route {request.method} {request.url.path}"), retry_after_s=1)
        if exc.status_code == 405:
            return error_response(MethodNotAllowed(str(exc.detail)), retry_after_s=1)
        return error_response(InstantIDError(str(exc.detail)), retry_after_s=1, status=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Routes outside the ingress's own error handling (health, readiness, docs) answer in JSON too.
        request_id = getattr(request.state, "request_id", None) or uuid.uuid4().hex
        return internal_error_response(request_id, request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _parameter_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc), retry_after_s=1)
