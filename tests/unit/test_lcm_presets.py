"""Fast-mode presets: the lcm scheduler with steps/guidance unset runs the demo's LCM recipe, not 30 steps at 5."""

from __future__ import annotations

import numpy as np
import pytest

from instantid_core.config import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    LCM_GUIDANCE,
    LCM_STEPS,
    GenerateParams,
    Scheduler,
)
from instantid_core.handoff import FaceCondition, PromptEmbeds
from instantid_core.pipeline import denoise_request


def _face() -> FaceCondition:
    return FaceCondition(np.zeros(512, np.float32), np.zeros((64, 64, 3), np.uint8), (0.0, 0.0, 8.0, 8.0), 64, 64, 1.0)


def _prompt() -> PromptEmbeds:
    return PromptEmbeds(*(np.zeros(shape, np.float32) for shape in ((77, 64), (77, 64), (32,), (32,))))


@pytest.mark.parametrize(("params", "default", "steps", "guidance"), [
    (dict(scheduler="lcm"), Scheduler.euler, LCM_STEPS, LCM_GUIDANCE),  # unset: the LCM preset
    (dict(), Scheduler.lcm, LCM_STEPS, LCM_GUIDANCE),  # the pipeline's default scheduler is lcm
    (dict(scheduler="lcm", steps=8), Scheduler.euler, 8, LCM_GUIDANCE),  # set: kept
    (dict(scheduler="lcm", guidance=0.0), Scheduler.euler, LCM_STEPS, 0.0),
    (dict(scheduler="euler"), Scheduler.lcm, DEFAULT_STEPS, DEFAULT_GUIDANCE),
    (dict(), Scheduler.euler, 30, 5.0),  # the published defaults
])
def test_lcm_preset_applies_only_to_what_is_unset(params, default, steps, guidance):
    resolved = GenerateParams(prompt="a portrait", **params).resolved(default)
    assert (resolved.steps, resolved.guidance) == (steps, guidance)
    request, key = denoise_request(_face(), _prompt(), GenerateParams(prompt="a portrait", **params), 1, default)
    assert (key.steps, request.guidance) == (steps, guidance)
    assert key.scheduler == (params.get("scheduler") or default)


def test_the_lcm_preset_is_few_steps_at_low_guidance():
    assert LCM_STEPS <= 8 and LCM_GUIDANCE <= 2.0  # the recipe LCM-LoRA is made for
