"""FaceAnalysis deployment: image bytes -> FaceCondition (embedding, keypoint image, face box, output size)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from instantid_app.cache import LRUCache
from instantid_app.config import AppConfig
from instantid_app.weights import resolve_app_weights
from instantid_core.config import GenerateParams
from instantid_core.face import FaceAnalyzer
from instantid_core.pipeline import FaceCondition, face_condition

from .schemas import FaceResult


class FaceAnalysis:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        self.analyzer = FaceAnalyzer(resolve_app_weights(self.config).face_pack, self.config.pipeline)
        self.cache: LRUCache[FaceCondition] = LRUCache(self.config.face_cache_size)

    async def analyze(self, face_images: list[bytes], pose_image: bytes | None, params: GenerateParams) -> FaceResult:
        start = time.perf_counter()
        key = self._cache_key(face_images, pose_image, params)
        cached = self.cache.get(key)
        if cached is not None:
            return FaceResult(cached, time.perf_counter() - start, cache_hit=True)
        # onnxruntime releases the GIL: run in a thread so the replica keeps answering health checks.
        condition = await asyncio.to_thread(self._analyze, face_images, pose_image, params)
        self.cache.put(key, condition)
        return FaceResult(condition, time.perf_counter() - start, cache_hit=False)

    def _analyze(self, face_images: list[bytes], pose_image: bytes | None, params: GenerateParams) -> FaceCondition:
        return face_condition(self.analyzer, face_images, params, self.config.pipeline, pose_image)

    @staticmethod
    def _cache_key(face_images: list[bytes], pose_image: bytes | None, params: GenerateParams) -> tuple:
        digests = tuple(hashlib.sha256(data).hexdigest() for data in face_images)
        pose = hashlib.sha256(pose_image).hexdigest() if pose_image is not None else None
        return digests, pose, params.face_index, params.width, params.height

    async def check_health(self) -> None:
        """One detector forward pass on a small blank image."""
        await asyncio.to_thread(self.analyzer.probe)
