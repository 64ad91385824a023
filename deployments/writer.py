"""OutputWriter deployment (CPU): applies the safety mode to flagged images (`instantid_core.safety.apply_safety`:
block, blur or flag), encodes what is left and writes it plus the sidecar through OutputStore."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np

from instantid_app.config import AppConfig
from instantid_app.settings import WriterSettings
from instantid_core.config import GenerateParams
from instantid_core.safety import safety_outcome
from instantid_core.scoring import identity_record
from instantid_core.sidecar import build_sidecar, identities_record
from instantid_core.storage import OutputStore, StoredOutput, encode_image

from .metrics import StageMetrics
from .schemas import DenoiseResult, GenerateResponse

HEALTH_IMAGE = np.zeros((8, 8, 3), np.uint8)


class OutputWriter:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        self.store = OutputStore(self.config.output_uri)
        self.settings = WriterSettings()
        self.metrics = StageMetrics()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.settings = WriterSettings.model_validate(user_config)

    async def write(self, result: DenoiseResult, request_id: str, seed: int, params: GenerateParams,
                    recorded: dict[str, Any], fmt: str, prefix: str | None, inline: bool,
                    unchecked: str | None = None) -> GenerateResponse:
        """`recorded`: what the Ingress read of the request for its sidecar (`inputs` digests, `params_extra`).
        `unchecked`: why no safety checker looked at `result` (when its `flagged` is None).

        Raises:
            UnsafeContent: block mode and the checker flagged every image (nothing is written).
        """
        with self.metrics.track():
            return await self._write(result, request_id, seed, params, recorded, fmt, prefix, inline, unchecked)

    async def _write(self, result: DenoiseResult, request_id: str, seed: int, params: GenerateParams,
                     recorded: dict[str, Any], fmt: str, prefix: str | None, inline: bool,
                     unchecked: str | None) -> GenerateResponse:
        start = time.perf_counter()
        mode = self.config.safety.mode if self.config.safety is not None else None
        images, safety = await asyncio.to_thread(  # blurring takes a while
            safety_outcome, result.images, result.flagged, mode, unchecked or "no safety checker looked at the images")
        encoded = await asyncio.to_thread(lambda: [encode_image(image, fmt) for image in images])
        timings = {**result.timings, "encode": time.perf_counter() - start}
        # as_run: what ran (a LoRA's preset may have chosen it), so the sidecar replays exactly.
        meta = build_sidecar(params, seed=seed, width=result.width, height=result.height, inputs=recorded["inputs"],
                             default_scheduler=self.config.pipeline.default_scheduler, as_run=result.as_run,
                             params_extra=recorded.get("params_extra"), batch_size=result.batch_size,
                             timings_s=timings, safety=safety.model_dump(mode="json", exclude_none=True),
                             **({"identities": identities_record(
                                 params, result.layout, recorded["inputs"]["identities_face_image_sha256"])}
                                if result.layout is not None else {}),
                             **identity_record(result.identity),
                             **({"face_detail": result.face_detail.model_dump(mode="json", exclude_none=True)}
                                if result.face_detail is not None else {}))
        stored: StoredOutput = await asyncio.to_thread(
            self.store.write_request, request_id, encoded, fmt, meta, prefix=prefix)
        timings["write"] = time.perf_counter() - start - timings["encode"]
        small = result.width * result.height <= self.settings.inline_max_pixels
        return GenerateResponse(
            request_id=request_id, seed=seed, width=result.width, height=result.height, images=stored.image_uris,
            metadata=stored.meta_uri, timings_ms={k: round(v * 1000, 2) for k, v in timings.items()},
            batch_size=result.batch_size, cache_hits=result.cache_hits, denoiser_replica=result.replica_id,
            inline_images=[base64.b64encode(data).decode() for data in encoded] if inline and small else None,
            safety=safety, identity=result.identity, face_detail=result.face_detail,
        )

    async def live_settings(self) -> dict[str, Any]:
        """What this replica writes with now (the playground's /v1/options reports inline_max_pixels)."""
        return self.settings.model_dump(mode="json")

    async def check_health(self) -> None:
        """Encode a tiny image (the encoder libraries work); the store is checked by real writes, so an S3 outage
        answers 503 rather than restarting this replica."""
        await asyncio.to_thread(encode_image, HEALTH_IMAGE, "png")
