"""FaceAnalysis deployment: image bytes -> FaceCondition (embedding, keypoint image, face box, output size).

Its cache holds face analyses (embedding, keypoints, box: a few KB), keyed by each photo's sha256 and the face
index, bounded in bytes: the keypoint image is drawn per request (milliseconds), so one cached photo serves every
output size. Hashing, decoding and analysis run in a worker thread, never on the replica's event loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from instantid_app.cache import LRUCache, nbytes
from instantid_app.config import AppConfig
from instantid_app.settings import FaceSettings
from instantid_app.weights import resolve_app_weights
from instantid_core.config import GenerateParams
from instantid_core.face import FaceAnalyzer, FaceInfo
from instantid_core.pipeline import RequestPhotos, face_condition

from .metrics import CacheMetrics, StageMetrics
from .schemas import FaceResult


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
        self.config = AppConfig.model_validate(config)
        settings = self.config.pipeline
        if settings.face_threads is None:
            settings = settings.model_copy(update={"face_threads": replica_cpus()})
        self.settings = settings
        self.analyzer = FaceAnalyzer(resolve_app_weights(self.config, stage="FaceAnalysis").face_pack, settings)
        self.cache: LRUCache[FaceInfo] = LRUCache(FaceSettings().cache_bytes, sizeof=nbytes)
        self.metrics, self.cache_metrics = StageMetrics(), CacheMetrics()

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
        start = time.perf_counter()
        lookups = _Lookups(self.cache)
        # onnxruntime releases the GIL: run in a thread so the replica keeps answering health checks.
        photos = RequestPhotos(face_images, pose_image, init_image, mask_image, identities=identity_images)
        condition = await asyncio.to_thread(face_condition, self.analyzer, photos, params, self.settings, lookups)
        return FaceResult(condition, time.perf_counter() - start, cache_hit=lookups.misses == 0)

    async def check_health(self) -> None:
        """One detector forward pass on a small blank image."""
        await asyncio.to_thread(self.analyzer.probe)
