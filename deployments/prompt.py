"""PromptEncoder deployment: (prompt, negative, style) -> PromptEmbeds as numpy, cached by the strings."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from instantid_app.cache import LRUCache
from instantid_app.config import AppConfig
from instantid_app.settings import PromptSettings
from instantid_app.weights import resolve_app_weights
from instantid_core.config import Style
from instantid_core.handoff import PromptEmbeds

from .metrics import CacheMetrics, StageMetrics
from .schemas import PromptResult


class PromptEncoderDeployment:
    def __init__(self, config: dict[str, Any]) -> None:
        # The text encoders' code (compel, transformers) is imported in the replica, not with this module: Serve's
        # app build (`serve deploy` on the controller, a driver's `serve.run`) imports it only to bind the graph.
        from instantid_core.text import PromptEncoder

        self.config = AppConfig.model_validate(config)
        self.encoder = PromptEncoder(resolve_app_weights(self.config, stage="PromptEncoder").sdxl,
                                     self.config.prompt_pipeline())
        self.cache: LRUCache[PromptEmbeds] = LRUCache(PromptSettings().cache_bytes)
        self.metrics, self.cache_metrics = StageMetrics(), CacheMetrics()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live settings (user_config): the cache bound changes in place, keeping the most recent embeddings."""
        self.settings = PromptSettings.model_validate(user_config)
        self.cache.resize(self.settings.cache_bytes)

    async def encode(self, prompt: str, negative_prompt: str, style: Style) -> PromptResult:
        with self.metrics.track():
            result = await self._encode_cached(prompt, negative_prompt, style)
        self.cache_metrics.lookup(result.cache_hit)
        return result

    async def _encode_cached(self, prompt: str, negative_prompt: str, style: Style) -> PromptResult:
        start = time.perf_counter()
        key = (prompt, negative_prompt, style)
        cached = self.cache.get(key)
        if cached is not None:
            return PromptResult(cached, time.perf_counter() - start, cache_hit=True)
        embeds = await asyncio.to_thread(self.encoder.encode, prompt, negative_prompt, style)
        self.cache.put(key, embeds)
        return PromptResult(embeds, time.perf_counter() - start, cache_hit=False)

    async def check_health(self) -> None:
        """Both text encoders on a one-word prompt (not cached: it runs the models)."""
        await asyncio.to_thread(self.encoder.encode, "health")
