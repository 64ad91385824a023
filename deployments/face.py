"""FaceAnalysis deployment: image bytes -> FaceCondition (embedding, keypoint image, face box, output size); with
`scoring` in args also the identity score of the Denoiser's outputs (a CPU stage: never on the Denoiser's thread).

Its cache holds face analyses (embedding, keypoints, box: a few KB), keyed by each photo's sha256 and the face
index, bounded in bytes: the keypoint image is drawn per request (milliseconds), so one cached photo serves every
output size. Hashing, decoding and analysis run in a worker thread, never on the replica's event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from instantid_app.cache import LRUCache, nbytes
from instantid_app.config import AppConfig
from instantid_app.settings import FaceSettings
from instantid_app.weights import resolve_app_weights
from instantid_core.config import GenerateParams
from instantid_core.detail import wants_detail
from instantid_core.images import load_image
from instantid_core.scoring import IdentityReport, below_floor, keep_best, mean_embedding

from .metrics import CacheMetrics, IdentityMetrics, StageMetrics
from .schemas import DenoiseResult, FaceResult

if TYPE_CHECKING:
    from instantid_core.face import FaceInfo


def replica_cpus(default: int = 1) -> int:
    """The CPUs Ray assigned to this replica (its `num_cpus`, rounded up), so onnxruntime's thread pool matches
    the replica's share instead of every core of the node."""
    import ray

    try:
        assigned = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not inside a Ray worker (a plain Python caller)
        return default
    return max(1, math.ceil(assigned)) if assigned else default


class _Lookups:
    """One request's view of the shared cache: counts its own misses (cache_hit = every photo was known)."""

    def __init__(self, cache: LRUCache[FaceInfo]) -> None:
        self.cache, self.misses = cache, 0

    def get(self, key: tuple[str, int | None]) -> FaceInfo | None:
        found = self.cache.get(key)
        self.misses += found is None
        return found

    def __setitem__(self, key: tuple[str, int | None], value: FaceInfo) -> None:
        self.cache.put(key, value)


class FaceAnalysis:
    def __init__(self, config: dict[str, Any]) -> None:
        # The face models' code (onnxruntime, insightface, OpenCV) is imported in the replica, not with this module:
        # Serve's app build (`serve deploy` on the controller, a driver's `serve.run`) imports it only to bind the
        # graph.
        from instantid_core.face import FaceAnalyzer
        from instantid_core.scorer import scorer_for

        self.config = AppConfig.model_validate(config)
        settings = self.config.pipeline
        if settings.face_threads is None:
            settings = settings.model_copy(update={"face_threads": replica_cpus()})
        self.settings = settings
        weights = resolve_app_weights(self.config, stage="FaceAnalysis")
        self.analyzer = FaceAnalyzer(weights.face_pack, settings)
        self.scorer = (scorer_for(weights.face_pack, weights.scoring_face_pack, settings)
                       if self.config.scoring is not None else None)
        self.cache: LRUCache[FaceInfo] = LRUCache(FaceSettings().cache_bytes, sizeof=nbytes)
        # the scoring recogniser's embeddings of reference photos, keyed like the analyses
        self.references: LRUCache[np.ndarray] = LRUCache(FaceSettings().cache_bytes // 8, sizeof=nbytes)
        self.metrics, self.cache_metrics = StageMetrics(), CacheMetrics()
        self.score_metrics, self.identity_metrics = StageMetrics(), IdentityMetrics()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live settings (user_config): the cache bound changes in place, keeping the most recent analyses."""
        self.live = FaceSettings.model_validate(user_config)
        self.cache.resize(self.live.cache_bytes)

    async def analyze(self, face_images: list[bytes], pose_image: bytes | None, params: GenerateParams,
                      init_image: bytes | None = None, mask_image: bytes | None = None,
                      identity_images: list[list[bytes]] | None = None) -> FaceResult:
        """`identity_images`: the identities form's photos, per identity (`face_images` is then empty)."""
        with self.metrics.track():
            result = await self._analyze_cached(face_images, pose_image, params, init_image, mask_image,
                                                identity_images)
        self.cache_metrics.lookup(result.cache_hit)
        return result

    async def _analyze_cached(self, face_images: list[bytes], pose_image: bytes | None, params: GenerateParams,
                              init_image: bytes | None, mask_image: bytes | None,
                              identity_images: list[list[bytes]] | None) -> FaceResult:
        from instantid_core.conditioning import RequestPhotos, face_condition  # lazily, as in __init__

        start = time.perf_counter()
        lookups = _Lookups(self.cache)
        # onnxruntime releases the GIL: run in a thread so the replica keeps answering health checks.
        photos = RequestPhotos(face_images, pose_image, init_image, mask_image, identities=identity_images)
        condition = await asyncio.to_thread(face_condition, self.analyzer, photos, params, self.settings, lookups)
        wants_detail(params, condition, self.settings.face_detail_below)  # face_detail: on without a face: 400
        if self.scorer is not None and not identity_images:  # several people: no one reference face to score
            reference = await asyncio.to_thread(self._reference, face_images, params.face_index)
            condition = dataclasses.replace(condition, identity_reference=reference)
        return FaceResult(condition, time.perf_counter() - start, cache_hit=lookups.misses == 0)

    def _reference(self, face_images: list[bytes], face_index: int | None) -> np.ndarray | None:
        """The scoring recogniser's mean embedding of the face photos (each photo's cached by its sha256)."""
        embeddings = []
        for i, data in enumerate(face_images):
            index = face_index if i == 0 else None
            key = (hashlib.sha256(data).hexdigest(), index)
            embedding = self.references.get(key)
            if embedding is None:
                photo = load_image(data, name=f"face_image[{i}]", max_pixels=self.settings.max_image_pixels,
                                   max_side=self.settings.max_image_side)
                embedding = self.scorer.embed(photo, face_index=index)
                if embedding is not None:
                    self.references.put(key, embedding)
            embeddings.append(embedding)
        return mean_embedding(embeddings)

    async def score_detail(self, result: DenoiseResult, face: FaceResult) -> DenoiseResult:
        """The identity score of the images after the detail pass (beside the report's score before)."""
        if self.scorer is None or result.face_detail is None or not any(result.face_detail.ran):
            return result
        scores = await asyncio.to_thread(self.scorer.score, result.images, face.condition.identity_reference,
                                         face.condition.face_box)
        report = result.face_detail.model_copy(update={"identity_after": scores})
        return dataclasses.replace(result, face_detail=report)

    async def score(self, result: DenoiseResult, face: FaceResult, keep: int, seed: int,
                    min_identity: float | None = None) -> DenoiseResult:
        """The Denoiser's candidates (image i of seed + i) scored against the reference, in the face region; the
        `keep` best of them (all, in their order, when there is nothing to choose) with their scores and seeds."""
        if self.scorer is None:
            raise ValueError("FaceAnalysis.score needs `scoring` in the app's args")
        start = time.perf_counter()
        with self.score_metrics.track():
            scores = await asyncio.to_thread(self.scorer.score, result.images, face.condition.identity_reference,
                                             face.condition.face_box)
        self.identity_metrics.scored(scores, self.scorer.same_model)
        kept = keep_best(scores, keep)
        chosen = [scores[i] for i in kept]
        identity = IdentityReport(scores=chosen, seeds=[(seed + i) % 2**63 for i in kept], candidates=len(scores),
                                  same_model=self.scorer.same_model, min_identity=min_identity,
                                  below_floor=below_floor(chosen, min_identity))
        timings = {**result.timings, "score": result.timings.get("score", 0.0) + time.perf_counter() - start}
        return dataclasses.replace(result, images=result.images[kept], identity=identity, timings=timings)

    async def check_health(self) -> None:
        """One detector forward pass on a small blank image."""
        await asyncio.to_thread(self.analyzer.probe)
