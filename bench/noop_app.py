"""A no-op DAG of the serving app's shape: the floor that `bench/serve_overhead.py` measures the app against.

Same five deployments as `deployments/app.py:build_app` (FastAPI ingress -> FaceAnalysis || PromptEncoder ->
Denoiser -> OutputWriter, composed by DeploymentHandles, each stage's response passed straight into the next call and
awaited once at the end), the same Serve options per stage (taken from the same AppConfig), the same `@serve.batch`
on the denoiser (max batch size and wait timeout from the config) and the same payloads crossing each hop:

- in: the JSON body with the base64 face photo; the ingress decodes it and sends the photo's bytes to the face stage;
- face -> denoiser: a `FaceResult` holding the real `FaceCondition` (512-d embedding, keypoint image at the output
  size), prompt -> denoiser: a `PromptResult` holding the real `PromptEmbeds` (both computed once by the caller);
- denoiser -> writer: a `DenoiseResult` with a (num_images, H, W, 3) uint8 array of the output size;
- out: a `GenerateResponse` with URIs shaped like the OutputStore's and the same timing keys.

Every stage returns at once: nothing is decoded, run, encoded or written. The ingress does the least an HTTP
front can (read the body, `json.loads`, base64-decode) and no validation. Stages report their own (tiny) elapsed
times under the same `timings_ms` keys as the real app, so one formula gives the overhead of both.
(No `from __future__ import annotations`: FastAPI must see the real `Request` type through Serve's wrapper.)
"""

import base64
import json
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from deployments.schemas import DenoiseResult, FaceResult, GenerateResponse, PromptResult
from instantid_app.config import AppSpec
from instantid_core.handoff import FaceCondition, PromptEmbeds

app = FastAPI(title="InstantID no-op DAG")


class NoopFace:
    def __init__(self, condition: FaceCondition) -> None:
        self.condition = condition

    async def analyze(self, face_images: list[bytes], pose_image: bytes | None, params: dict) -> FaceResult:
        start = time.perf_counter()
        return FaceResult(self.condition, time.perf_counter() - start, cache_hit=True)

    def ready(self) -> bool:
        return True


class NoopPrompt:
    def __init__(self, embeds: PromptEmbeds) -> None:
        self.embeds = embeds

    async def encode(self, prompt: str, negative_prompt: str, style: str) -> PromptResult:
        start = time.perf_counter()
        return PromptResult(self.embeds, time.perf_counter() - start, cache_hit=True)

    def ready(self) -> bool:
        return True


class NoopDenoiser:
    """Batches like the real Denoiser (same `@serve.batch` settings), then returns zero images of the output size."""

    def __init__(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self._run_batch.set_max_batch_size(max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def generate(self, face: FaceResult, prompt: PromptResult, params: dict, seed: int) -> DenoiseResult:
        num_images = params.get("num_images", 1)
        width, height = face.condition.width, face.condition.height
        enqueued = time.perf_counter()
        started, batch_size = await self._run_batch(num_images)
        images = np.zeros((num_images, height, width, 3), np.uint8)  # (N, H, W, 3), as the real denoiser returns
        timings = {"face": face.seconds, "prompt": prompt.seconds, "queue": started - enqueued,
                   "denoise": time.perf_counter() - started}
        return DenoiseResult(images, width, height, batch_size, timings)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05, batch_size_fn=sum)
    async def _run_batch(self, num_images: list[int]) -> list[tuple[float, int]]:
        started = time.perf_counter()
        return [(started, sum(num_images))] * len(num_images)

    def ready(self) -> bool:
        return True


class NoopWriter:
    def __init__(self, output_uri: str) -> None:
        self.output_uri = output_uri.rstrip("/")

    async def write(self, result: DenoiseResult, request_id: str, seed: int, meta: dict[str, Any], fmt: str,
                    prefix: str | None, inline: bool) -> GenerateResponse:
        start = time.perf_counter()
        folder = f"{self.output_uri}/{datetime.now(timezone.utc):%Y-%m-%d}/{request_id}"
        extension = "jpg" if fmt == "jpeg" else fmt
        timings = {**result.timings, "encode": 0.0, "write": time.perf_counter() - start}
        return GenerateResponse(
            request_id=request_id, seed=seed, width=result.width, height=result.height,
            images=[f"{folder}/{i}.{extension}" for i in range(len(result.images))], metadata=f"{folder}/meta.json",
            timings_ms={k: round(v * 1000, 2) for k, v in timings.items()}, batch_size=result.batch_size,
        )

    def ready(self) -> bool:
        return True


@serve.ingress(app)
class NoopIngress:
    def __init__(self, face: DeploymentHandle, prompt: DeploymentHandle, denoiser: DeploymentHandle,
                 writer: DeploymentHandle) -> None:
        self.face, self.prompt, self.denoiser, self.writer = face, prompt, denoiser, writer

    @app.post("/v1/generate")
    async def generate(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        body = json.loads(await request.body())
        faces = [base64.b64decode(body.pop("face_image"))]
        output = body.pop("output", {})
        request_id, seed = uuid.uuid4().hex, body.get("seed") or 0
        face = self.face.analyze.remote(faces, None, body)
        prompt = self.prompt.encode.remote(body["prompt"], body.get("negative_prompt", ""), body.get("style", ""))
        images = self.denoiser.generate.remote(face, prompt, body, seed)
        written = self.writer.write.remote(images, request_id, seed, {"request_id": request_id, "params": body},
                                           output.get("format", "png"), None, False)
        response: GenerateResponse = await written
        response.timings_ms["total"] = round((time.perf_counter() - started) * 1000, 2)
        return JSONResponse(response.model_dump(mode="json", exclude_none=True))

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        for handle in (self.face, self.prompt, self.denoiser, self.writer):
            await handle.ready.remote()
        return JSONResponse({"ready": True})


def build_noop_app(config: AppSpec, face: FaceCondition, prompt: PromptEmbeds) -> Application:
    """The no-op DAG with the Serve options, batch settings and output URI of `config`.

    Args:
        config: the AppSpec the real app is built from; each no-op stage gets its stage's deployment options.
        face: the face stage's output for the benchmark's photo and size (returned as is by every call).
        prompt: the prompt stage's output for the benchmark's prompt (returned as is by every call).
    """
    def deployment(cls: type, name: str, stage: str) -> serve.Deployment:
        options = {k: v for k, v in config.options(stage).items() if k != "user_config"}  # no reconfigure() here
        return serve.deployment(cls, name=name, **options)

    return deployment(NoopIngress, "NoopIngress", "Ingress").bind(
        deployment(NoopFace, "NoopFace", "FaceAnalysis").bind(face),
        deployment(NoopPrompt, "NoopPrompt", "PromptEncoder").bind(prompt),
        deployment(NoopDenoiser, "NoopDenoiser", "Denoiser").bind(config.denoiser.max_batch_size,
                                                                  config.denoiser.batch_wait_timeout_s),
        deployment(NoopWriter, "NoopWriter", "OutputWriter").bind(config.args.output_uri),
    )
