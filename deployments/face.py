"""FaceAnalysis deployment: image bytes -> FaceCondition (embedding, keypoint image, face box, output size)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from instantid_core.config import GenerateParams
from instantid_core.face import FaceAnalyzer
from instantid_core.images import load_image
from instantid_core.pipeline import FaceCondition, prepare_face

from .cache import LRUCache
from .config import AppConfig
from .schemas import FaceResult
from .weights import resolve_app_weights


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
        settings = self.config.pipeline
        photos = [load_image(data, name=f"face_image[{i}]", max_pixels=settings.max_image_pixels,
                             max_side=settings.max_image_side) for i, data in enumerate(face_images)]
        pose = None if pose_image is None else load_image(
            pose_image, name="pose_image", max_pixels=settings.max_image_pixels, max_side=settings.max_image_side)
        return prepare_face(self.analyzer, photos, params, pose)

    @staticmethod
    def _cache_key(face_images: list[bytes], pose_image: bytes | None, params: GenerateParams) -> tuple:
        digests = tuple(hashlib.sha256(data).hexdigest() for data in face_images)
        pose = hashlib.sha256(pose_image).hexdigest() if pose_image is not None else None
        return digests, pose, params.face_index, params.width, params.height

    async def check_health(self) -> None:
        """One detector forward pass on a small blank image."""
        await asyncio.to_thread(self.analyzer.probe)

    def ready(self) -> bool:
        return True
