"""Ingress (FastAPI) routes: validates, assigns a request id, fans out face || prompt, then denoise, then write.

Reading the body and the images is `inputs.py`'s; the status code and JSON body of every error is `errors.py`'s.

Stage responses are passed straight into the next handle call (Serve resolves them in the callee), so the ingress
awaits once, at the end. The same `generate` method serves HTTP and Python `DeploymentHandle` callers.
(No `from __future__ import annotations` here: FastAPI must see the real `Request` type through Serve's wrapper.)
"""


import asyncio
import contextlib
import dataclasses
import logging
import re
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle

from instantid_app.config import AppConfig
from instantid_app.settings import IngressSettings
from instantid_core.config import GenerateParams
from instantid_core.detail import FaceDetailReport
from instantid_core.errors import InstantIDError, InvalidParameter
from instantid_core.loras import lora_set, lora_set_id
from instantid_core.request_rules import check_init_inputs, draw_seed
from instantid_core.safety import DISABLED_BY_REQUEST, NOT_CONFIGURED, SafetyReport
from instantid_core.scoring import (
    DEFAULT_MAX_CANDIDATES,
    IdentityReport,
    check_scoring_params,
    merge_rounds,
    next_round,
)
from instantid_core.storage import OutputStore

from . import metrics, openai_api, playground
from .access import AccessControl, Action
from .errors import (
    InternalError,
    RequestIdInUse,
    ServiceOverloaded,
    StageTimeout,
    error_response,
    http_status,
    install_error_handlers,
    internal_error_response,
)
from .inputs import MAX_FACE_IMAGES, InputReader, RequestInputs
from .jobs.api import JobsAPI
from .links import OutputLinks, link_ttl, public_url
from .schemas import DenoiseResult, ErrorBody, GenerateRequest, GenerateResponse, JobRequest, JobStatus

logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="InstantID",
    version="0.1.0",
    description="Identity-preserving SDXL generation from one face photo and a prompt.",
)

MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["params"],
    "properties": {
        "face_image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "identities[0].face_image": {"type": "array", "items": {"type": "string", "format": "binary"},
                                     "description": "The identities form: identity i's photos as parts "
                                     "`identities[i].face_image` (i < 4), its box and strengths in params.identities"},
        "pose_image": {"type": "string", "format": "binary"},
        "init_image": {"type": "string", "format": "binary"},
        "mask_image": {"type": "string", "format": "binary"},
        "params": {"type": "string", "description": "GenerateParams (and optional `output`) as a JSON object"},
    },
}
GENERATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}},
            "multipart/form-data": {"schema": MULTIPART_SCHEMA},
        },
    }
}
JOB_BODY = {"requestBody": {**GENERATE_BODY["requestBody"], "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
    "multipart/form-data": {"schema": MULTIPART_SCHEMA}}}}
ERROR_RESPONSES = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503, 504)}
# A caller's x-request-id becomes the request id (response header and body, output keys, every stage's log lines:
# Serve's own request context carries the header's value to each replica's JSON logs) when it is a safe token:
# one path segment, no "..", short. Anything else is ignored and the request gets an id of its own.
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]{0,127}")


def safe_request_id(value: str | None) -> str | None:
    return value if value and SAFE_REQUEST_ID.fullmatch(value) and ".." not in value else None


def caller_request_id(request: Request) -> str | None:
    return safe_request_id(request.headers.get("x-request-id"))


def serve_request_id() -> str | None:
    """Serve's id of the current HTTP request (the caller's x-request-id, or one Serve generated), which its proxy
    returns in the x-request-id response header and puts on every stage's log lines. Ray has no public accessor
    for it in 2.60; the private one is read defensively (an id of our own when it is absent or not a safe token)."""
    try:
        from ray.serve.context import _get_serve_request_context

        return safe_request_id(_get_serve_request_context().request_id)
    except Exception:  # noqa: BLE001 - a moved private API must not fail requests
        return None


def public_result(request: Request, result: GenerateResponse) -> GenerateResponse:
    """A result as an HTTP answer gives it: its links absolute (links.public_url)."""
    if not result.urls:
        return result
    return result.model_copy(update={"urls": [public_url(request, link) for link in result.urls]})


def openapi_schema() -> dict[str, Any]:
    """FastAPI's schema plus `GenerateRequest`, which the routes read from the raw body (JSON or multipart) and
    FastAPI therefore never sees; GENERATE_BODY refers to it."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        request_schema = GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(request_schema.pop("$defs", {}))
        components["GenerateRequest"] = request_schema
        job_schema = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(job_schema.pop("$defs", {}))
        components["JobRequest"] = job_schema
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = openapi_schema


install_error_handlers(app)


async def _none() -> None:
    return None


def _cancel(*stages: Any) -> None:
    """Cancel the stage calls made so far (DeploymentResponses; an awaited result or None is left alone)."""
    for stage in stages:
        if hasattr(stage, "cancel"):
            stage.cancel()


app.include_router(playground.router)  # the page at / and /v1/options, /v1/outputs (deployments/playground)
app.include_router(openai_api.router)  # /v1/images/generations and /v1/images/edits (OpenAI's shapes)


@serve.ingress(app)
class Ingress:
    def __init__(self, face: DeploymentHandle, prompt: DeploymentHandle, denoiser: DeploymentHandle,
                 writer: DeploymentHandle, config: dict[str, Any], jobs: DeploymentHandle | None = None,
                 safety: DeploymentHandle | None = None) -> None:
        self.config = AppConfig.model_validate(config)
        self.face, self.prompt, self.denoiser, self.writer = face, prompt, denoiser, writer
        self.safety = safety  # the SafetyChecker, with `safety` in args
        self.consumer = jobs  # the JobConsumer (bound here so it is part of the app; probed by /readyz)
        self.jobs = JobsAPI(self.config)
        self.outputs = OutputStore(self.config.output_uri)  # a caller's request id is refused where outputs exist
        self.metrics, self.http_metrics = metrics.StageMetrics(), metrics.IngressMetrics()
        self.reconfigure({})
        app.state.playground_host = self  # the playground's routes reach this replica through it (Depends)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live settings (user_config: limits, timeouts, API keys and rate limits), applied by Serve without a
        restart. A bad entry (or an unreadable key file) raises, so the deploy fails naming it and the replica keeps
        its previous settings."""
        settings = IngressSettings.model_validate(user_config)
        # Rate-limit buckets live in the jobs' Redis when there is one: shared by every replica, kept across this.
        access = AccessControl(settings.access, self.config.jobs.resolved_broker_url() if self.config.jobs else None)
        links = OutputLinks(self.outputs, settings.links)
        self.settings, self.access, self.links = settings, access, links
        self.inputs = InputReader(self.config, settings)

    # --- the handle API (and the body of the HTTP route) ------------------------------------------------------------
    async def generate(self, request: GenerateRequest, inline: bool = False, request_id: str | None = None,
                       job_id: str | None = None, new_id: bool = False, attempt: int | None = None
                       ) -> GenerateResponse:
        """Run one request through the DAG; raises typed InstantIDErrors for expected failures.

        `request_id` names the outputs; a job passes its own id so that re-running it rewrites the same objects,
        and `job_id`, so the Denoiser reports its progress and stops it when it is cancelled. With `attempt` (the
        JobConsumer's), the job is marked done here once its outputs are written, so a consumer that dies now
        leaves a finished job rather than one that runs again. `new_id`: the id is the caller's (x-request-id),
        so outputs that already exist under it are a 409. The answer's `urls` expire `output.url_ttl_s` after
        the images were written; a file:// output's is relative to the app's root (HTTP answers make it absolute)."""
        rerun = job_id is not None and attempt is not None and attempt > 1
        ttl_s = link_ttl(request.output.url_ttl_s, self.settings.links)  # before any work: a 400 costs nothing
        written = await self._written_before(job_id, request.output.prefix) if rerun and not inline else None
        if written is None:
            holding = (self.jobs.lease_held(job_id, attempt) if self.jobs.enabled and job_id is not None
                       and attempt is not None else contextlib.nullcontext())
            async with holding:
                with self.metrics.track():  # HTTP and handle callers alike, by outcome code
                    written = await self._generate(request, inline, request_id, job_id, new_id)
        if ttl_s:  # presigning is local work, but boto3's first client loads its models: off the event loop
            written.urls, written.urls_expire_at = await asyncio.to_thread(self.links.make, written.images, ttl_s)
        written.notice = self.config.notice
        if job_id is not None and attempt is not None:
            await self.jobs.complete(job_id, attempt, written)
        return written

    async def _written_before(self, job_id: str, prefix: str | None) -> GenerateResponse | None:
        """The response of an earlier run of this job that wrote its outputs but could not record them (its
        consumer died, or Redis was away when it ended), read back from its sidecar, which the writer puts after
        every image: a rerun then writes nothing a second time. None when there is none (or it cannot be read:
        then the job runs again, rewriting the same keys)."""
        uri = self.outputs.request_meta_uri(job_id, prefix=prefix)
        try:
            if not await asyncio.to_thread(self.outputs.exists, uri):
                return None
            meta = await asyncio.to_thread(self.outputs.get_json, uri)
            safety = SafetyReport.model_validate(meta["safety"]) if meta.get("safety") else None
            identity = IdentityReport.model_validate(meta["identity"]) if meta.get("identity") else None
            detail = FaceDetailReport.model_validate(meta["face_detail"]) if meta.get("face_detail") else None
            return GenerateResponse(request_id=job_id, seed=meta["seed"], width=meta["width"], height=meta["height"],
                                    images=meta["images"], metadata=uri, batch_size=meta.get("batch_size", 1),
                                    safety=safety, identity=identity, face_detail=detail)
        except (InstantIDError, KeyError, TypeError) as exc:
            logger.warning("job %s: the outputs of an earlier run are unreadable (%s); running it again", job_id, exc)
            return None

    async def _generate(self, request: GenerateRequest, inline: bool, request_id: str | None,
                        job_id: str | None = None, new_id: bool = False) -> GenerateResponse:
        started = time.perf_counter()
        request_id = request_id or uuid.uuid4().hex
        if new_id:
            await self._refuse_taken_id(request_id, request.output.prefix)
        params = request.params()
        scoring = self.config.scoring
        check_scoring_params(params, scoring is not None, scoring.max_candidates if scoring else DEFAULT_MAX_CANDIDATES)
        self._check_safety_opt_out(request)
        seed = params.seed if params.seed is not None else draw_seed()
        inputs = await self._read_inputs(request, params)
        response = await self._run_stages(inputs, request, request_id, seed, inline, job_id)
        response.timings_ms["total"] = round((time.perf_counter() - started) * 1000, 2)
        return response

    def _check_safety_opt_out(self, request: GenerateRequest) -> None:
        safety = self.config.safety
        if not request.safety_checker and safety is not None and not safety.allow_request_disable:
            raise InvalidParameter("safety_checker: this server does not let a request turn its safety checker off",
                                   field="safety_checker")

    async def _refuse_taken_id(self, request_id: str, prefix: str | None) -> None:
        existing = self.outputs.request_meta_uri(request_id, prefix=prefix)
        if await asyncio.to_thread(self.outputs.exists, existing):
            raise RequestIdInUse(f"x-request-id {request_id!r} is taken: its outputs exist ({existing}); send a new "
                                 "id", field="x-request-id")

    async def _read_inputs(self, request: GenerateRequest, params: GenerateParams) -> RequestInputs:
        """Every image the request names, read and checked (sizes, formats, allowed sources) before any stage runs,
        and what its sidecar records of them (digests, hashed in a worker thread, never on the event loop)."""
        identities = None
        if request.identities is not None:  # several people: each identity's photos, all read concurrently
            groups = [who.face_image if isinstance(who.face_image, list) else [who.face_image]
                      for who in request.identities]
            for i, group in enumerate(groups):
                if not 1 <= len(group) <= MAX_FACE_IMAGES:
                    raise InvalidParameter(f"identities[{i}].face_image: give 1 to {MAX_FACE_IMAGES} images",
                                           field=f"identities[{i}].face_image")
            flat = await asyncio.gather(*(self.inputs.read_image(src, f"identities[{i}].face_image[{j}]")
                                          for i, group in enumerate(groups) for j, src in enumerate(group)))
            offsets = [sum(len(g) for g in groups[:i]) for i in range(len(groups))]
            identities = [list(flat[start:start + len(group)]) for start, group in zip(offsets, groups, strict=True)]
        face_sources = [] if request.face_image is None else (
            request.face_image if isinstance(request.face_image, list) else [request.face_image])
        if identities is None and not 1 <= len(face_sources) <= MAX_FACE_IMAGES:
            raise InvalidParameter(f"face_image: give 1 to {MAX_FACE_IMAGES} images", field="face_image")
        faces = await asyncio.gather(*(self.inputs.read_image(src, f"face_image[{i}]")
                                       for i, src in enumerate(face_sources)))
        pose = await self.inputs.read_image(request.pose_image, "pose_image") if request.pose_image else None
        check_init_inputs(params, request.init_image is not None, request.mask_image is not None)
        init = await self.inputs.read_image(request.init_image, "init_image") if request.init_image else None
        mask = await self.inputs.read_image(request.mask_image, "mask_image") if request.mask_image else None
        control_images, params = await self._read_control_images(params)
        inputs = RequestInputs(params, list(faces), pose, init, mask, control_images, identities=identities)
        inputs.recorded = await asyncio.to_thread(inputs.sidecar_record)
        return inputs

    async def _run_stages(self, inputs: RequestInputs, request: GenerateRequest, request_id: str, seed: int,
                          inline: bool, job_id: str | None) -> GenerateResponse:
        """Face and prompt concurrently, then the Denoiser, then the writer; every failure mapped to a typed error,
        and every stage still running cancelled when the caller goes away or the request times out."""
        params = inputs.params
        face = prompt = images = checked = written = None
        try:
            # Several identities: one call places them all (a pose photo's faces are shared out left to right).
            face = self.face.analyze.remote(inputs.faces, inputs.pose, params, inputs.init, inputs.mask,
                                            identity_images=inputs.identities)
            prompt = self.prompt.encode.remote(params.prompt, params.negative_prompt, params.style)
            # A LoRA set is a multiplexed model: Serve sends the request to a Denoiser replica that holds it.
            denoiser = (self.denoiser.options(multiplexed_model_id=lora_set_id(params.loras)) if lora_set(params.loras)
                        else self.denoiser)

            def candidates(first_seed: int) -> Any:
                """One round: params.candidates images on seeds first_seed.., scored (with `scoring`) on the face
                stage, a CPU replica, never the Denoiser's."""
                round_images = denoiser.generate.remote(
                    face, prompt, params, first_seed, inputs.control_images,
                    inputs.pose or (inputs.faces or inputs.identities[0])[0], job_id=job_id)
                if self.config.scoring is None or params.identities:  # several people: no one reference face
                    return round_images
                return self.face.score.remote(round_images, face, params.num_images, first_seed, params.min_identity)

            images = candidates(seed)
            if params.min_identity is not None:
                images = await asyncio.wait_for(self._rounds(images, candidates, params, seed),
                                                timeout=self.settings.stage_timeout_s)
            if params.face_detail != "off":  # the face crops regenerated on the Denoiser, then scored again
                images = denoiser.detail.remote(images, face, prompt, params, seed, job_id=job_id)
                if self.config.scoring is not None:
                    images = self.face.score_detail.remote(images, face)
            checked, unchecked = self._check_safety(images, request.safety_checker)
            written = self.writer.write.remote(checked, request_id, seed, params, inputs.recorded,
                                               request.output.format, request.output.prefix, inline, unchecked)
            return await asyncio.wait_for(written, timeout=self.settings.stage_timeout_s)
        except InstantIDError:
            raise
        except asyncio.CancelledError:
            # The caller went away (HTTP client disconnected, or a handle caller cancelled): every stage still
            # running for it stops (the Denoiser drops its samples at the next step) and the writer never starts.
            _cancel(face, prompt, images, checked, written)
            raise
        except asyncio.TimeoutError as exc:
            _cancel(face, prompt, images, checked, written)  # nobody waits for them: free the replicas
            raise StageTimeout(f"the request took longer than {self.settings.stage_timeout_s:.0f}s; retry later or "
                               "ask for fewer steps/images") from exc
        except BackPressureError as exc:
            raise ServiceOverloaded("the service is at capacity; retry after the Retry-After delay") from exc
        except (RayActorError, RayServeException) as exc:  # replica death, upstream crash, unavailable
            logger.warning("request %s: a stage replica died: %s", request_id, type(exc).__name__)
            raise ServiceOverloaded("a stage restarted while serving this request; retry it") from exc
        except RayTaskError as exc:  # a bug in a stage: a 500 that names the request, never the internals
            logger.error("request %s: stage error: %s", request_id, exc)
            raise InternalError(f"internal error in request {request_id}; it has been logged") from exc

    async def _rounds(self, first: Any, candidates: Any, params: GenerateParams, seed: int) -> DenoiseResult:
        """min_identity: more rounds on the next seeds while a kept image misses the floor and the server's bound
        on candidates allows another round; the best of every round's candidates."""
        result: DenoiseResult = await first
        bound = self.config.scoring.max_candidates
        while next_round(result.identity.scores, params.min_identity, result.identity.candidates, params.candidates,
                         bound):
            more: DenoiseResult = await candidates((seed + result.identity.candidates) % 2**63)
            kept, identity = merge_rounds(result.identity, more.identity, params.num_images)
            images = np.concatenate([result.images, more.images])[kept]
            timings = {**result.timings, "denoise": result.timings["denoise"] + more.timings["denoise"],
                       "score": result.timings.get("score", 0.0) + more.timings.get("score", 0.0)}
            result = dataclasses.replace(result, images=images, identity=identity, timings=timings)
        return result

    def _check_safety(self, images: Any, wanted: bool) -> tuple[Any, str | None]:
        """The Denoiser's result through the SafetyChecker (a response passed on, awaited by the writer), or the
        result itself and why no checker looks at it."""
        if self.safety is None:
            return images, NOT_CONFIGURED
        if not wanted:  # allowed: _check_safety_opt_out refused it otherwise
            return images, DISABLED_BY_REQUEST
        return self.safety.check.remote(images), None

    async def _read_control_images(self, params: GenerateParams) -> tuple[list[bytes | None], GenerateParams]:
        """Each control's own image as bytes (base64, s3:// or URL, like face_image), and the params without them:
        images travel to the Denoiser as bytes, and the sidecar records their digests only."""
        images = await asyncio.gather(*(
            self.inputs.read_image(control.image, f"controls[{i}].image") if control.image else _none()
            for i, control in enumerate(params.controls)))
        stripped = [control.model_copy(update={"image": None}) for control in params.controls]
        return list(images), params.model_copy(update={"controls": stripped})

    # --- HTTP -------------------------------------------------------------------------------------------------------
    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES, openapi_extra=GENERATE_BODY)
    async def http_generate(self, request: Request, inline: bool = False) -> Response:
        """Generate images: a JSON body (images as base64 or s3:// URIs) or a multipart upload."""
        async def run() -> Response:
            result = await self.generate(await self.inputs.parse_request(request), inline=inline,
                                         request_id=request.state.request_id, new_id=request.state.new_id)
            return JSONResponse(public_result(request, result).model_dump(mode="json", exclude_none=True))

        return await self._http(request, "generate", run, action="generate")

    @app.post("/v1/jobs", status_code=202, response_model=JobStatus, responses=ERROR_RESPONSES,
              openapi_extra=JOB_BODY)
    async def http_submit_job(self, request: Request, inline: bool = False) -> Response:
        """Queue a generation (the /v1/generate body plus an optional `webhook_url`); answers 202 at once.
        Poll GET /v1/jobs/{job_id}; DELETE it to cancel."""
        async def submit() -> Response:
            status = await self.submit_job(await self.inputs.parse_request(request, JobRequest), inline=inline)
            return JSONResponse(status.model_dump(mode="json", exclude_none=True), status_code=202)

        return await self._http(request, "jobs", submit, action="jobs")

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, responses=ERROR_RESPONSES)
    async def http_job_status(self, request: Request, job_id: str) -> Response:
        """queued | running (with `progress: {step, steps}`) | done (with `result`) | failed (with `error`) |
        cancelled."""
        async def status() -> Response:
            job = await self.job_status(job_id)
            if job.result is not None:
                job = job.model_copy(update={"result": public_result(request, job.result)})
            return JSONResponse(job.model_dump(mode="json", exclude_none=True))

        return await self._http(request, "job_status", status, action="jobs")

    @app.delete("/v1/jobs/{job_id}", response_model=JobStatus, responses=ERROR_RESPONSES)
    async def http_cancel_job(self, request: Request, job_id: str) -> Response:
        """Cancel: a queued job at once (200, `cancelled`); a running one stops at its next denoising step (202,
        `running` with `cancel_requested`); a finished job is left as it is (200)."""
        async def cancel() -> Response:
            status = await self.cancel_job(job_id)
            code = 202 if status.status == "running" else 200
            return JSONResponse(status.model_dump(mode="json", exclude_none=True), status_code=code)

        return await self._http(request, "job_cancel", cancel, action="jobs")

    # --- the jobs handle API (the bodies of the routes above) -------------------------------------------------------
    async def submit_job(self, request: JobRequest, inline: bool = False) -> JobStatus:
        link_ttl(request.output.url_ttl_s, self.settings.links)  # refused now, not when the job has run
        return await self.jobs.submit(request, inline)

    async def job_status(self, job_id: str) -> JobStatus:
        return await self.jobs.status(job_id)

    async def cancel_job(self, job_id: str) -> JobStatus:
        return await self.jobs.cancel(job_id)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> Response:
        """Ready = every stage has a RUNNING replica in Serve's own view: replicas that passed the health checks
        Serve already runs (each stage's check_health, every health_check_period_s). No model pass per probe, and a
        busy stage is not reported unready. The JobConsumer is reported, but does not gate readiness:
        /v1/generate works without the jobs' Redis."""
        stages = {"face": self.face, "prompt": self.prompt, "denoiser": self.denoiser, "writer": self.writer}
        if self.safety is not None:
            stages["safety"] = self.safety
        if self.consumer is not None:
            stages["jobs"] = self.consumer
        try:
            # serve.status() asks the controller (a blocking call): off the event loop, bounded.
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), timeout=5.0)
            deployments = status.applications[serve.get_replica_context().app_name].deployments
            results = {stage: deployments[handle.deployment_name].replica_states.get("RUNNING", 0) > 0
                       for stage, handle in stages.items()}
        except Exception:  # no answer from the controller in time is "not ready", which is the answer
            results = dict.fromkeys(stages, False)
        ready = all(ok for stage, ok in results.items() if stage != "jobs")
        return JSONResponse({"ready": ready, "stages": results}, status_code=200 if ready else 503)

    # --- helpers ----------------------------------------------------------------------------------------------------
    async def _http(self, request: Request, route: str, run, action: Action | None) -> Response:
        """`run` behind the API keys (`action`; None: no key, e.g. a signed link, whose signature is the
        permission), every error answered in JSON and counted."""
        started = time.perf_counter()
        given = caller_request_id(request)
        # The caller's safe id, else Serve's own (so the header Serve's proxy returns, the body and the logs agree).
        request.state.request_id = request_id = given or serve_request_id() or uuid.uuid4().hex
        request.state.new_id = given is not None
        try:
            if action is not None:
                await self.access.admit(request.headers.get("authorization"), request.headers.get("x-api-key"),
                                        action)
            response = await run()
        except InstantIDError as exc:
            if http_status(exc) >= 500 and http_status(exc) not in (503, 504):
                logger.error("route %s: %s", route, exc.message)
            response = error_response(exc, self.settings.retry_after_s)
        except Exception as exc:  # a bug: a JSON 500 naming the request, the traceback in the log, counted
            response = internal_error_response(request_id, route, exc)
        self.http_metrics.http(route, response.status_code, time.perf_counter() - started)
        # No x-request-id header set here: Serve's proxy adds its own (the same id), a second would repeat it.
        return response
