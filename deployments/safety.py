"""SafetyChecker deployment (CPU or GPU, only with `safety` in args): between the Denoiser and the OutputWriter, it
marks each image of a DenoiseResult flagged or not (diffusers' CompVis checker, instantid_core.safety). What a mode
does to flagged images is the writer's (`apply_safety`): this stage only looks, so a GPU replica does GPU work only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import numpy as np

from instantid_app.config import AppConfig
from instantid_app.weights import resolve_app_weights
from instantid_core.safety import SafetyChecker

from .metrics import SafetyMetrics, StageMetrics
from .schemas import DenoiseResult

logger = logging.getLogger("ray.serve")
HEALTH_IMAGES = np.zeros((1, 8, 8, 3), np.uint8)


class SafetyCheckerDeployment:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        if self.config.safety is None:
            raise ValueError("the SafetyChecker deployment needs `safety` in the app's args")
        folder = resolve_app_weights(self.config, stage="SafetyChecker").safety_checker
        if folder is None:  # the tiny preset always has one; real sources are required by AppConfig
            raise ValueError("safety: no safety_checker weights were resolved")
        self.checker = SafetyChecker(folder, self.config.safety_pipeline())
        self.mode = self.config.safety.mode.value
        self.metrics, self.safety_metrics = StageMetrics(), SafetyMetrics()

    async def check(self, result: DenoiseResult) -> DenoiseResult:
        """The same result with `flagged` set per image (the images are left as they are)."""
        with self.metrics.track():
            verdict = await asyncio.to_thread(self.checker.check, result.images)
        self.safety_metrics.checked(verdict.flagged, self.mode)
        if any(verdict.flagged):
            logger.info("safety: flagged images %s (scores %s)",
                        [i for i, f in enumerate(verdict.flagged) if f], verdict.scores)
        return dataclasses.replace(result, flagged=verdict.flagged)

    async def check_health(self) -> None:
        """One checker pass on a blank image (Serve restarts the replica when it raises)."""
        await asyncio.to_thread(self.checker.check, HEALTH_IMAGES)
