"""The one shape of a request's sidecar (`meta.json`), built the same way by the serving app, the CLI and the batch
job: the parameters as they ran (a replay needs no server settings), the seed, the size, digests or names of the
inputs, and what each caller adds (timings, weight revisions, batch size, prompt id). `OutputStore.write_request`
adds `request_id`, `format`, `images` and `created_at`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .config import GenerateParams, Scheduler


def build_sidecar(params: GenerateParams, *, seed: int, width: int, height: int, inputs: Mapping[str, Any],
                  default_scheduler: Scheduler, as_run: Mapping[str, Any] | None = None,
                  params_extra: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """`as_run`: scheduler/steps/guidance a LoRA preset chose (over the request's); `params_extra`: fields that
    replace the request's own in the recorded params (e.g. `controls` with image digests instead of images)."""
    run = params.resolved(default_scheduler)
    recorded = {**params.model_dump(mode="json"), "scheduler": run.scheduler.value, "steps": run.steps,
                "guidance": run.guidance, **(params_extra or {}), **(as_run or {})}
    return {"params": recorded, "seed": seed, "width": width, "height": height, "inputs": dict(inputs), **extra}


def identities_record(params: GenerateParams, placed: Sequence[tuple[Sequence[float], Sequence[Sequence[float]]]],
                      photo_digests: Sequence[Sequence[str | None]]) -> list[dict[str, Any]]:
    """The sidecar's `identities` (issue 23), one entry per identity in request order: its photos' sha256, its
    region (`box`) and keypoints as placed on the output (pixels), and its strengths as run; enough to replay
    the layout. `placed`: (box, keypoints) per identity, as the face stage placed them."""
    return [{"face_image_sha256": list(digests), "box": [float(v) for v in box],
             "keypoints": [[float(x), float(y)] for x, y in keypoints],
             "identitynet_strength": params.identitynet_strength if who.identitynet_strength is None
             else who.identitynet_strength,
             "adapter_strength": params.adapter_strength if who.adapter_strength is None else who.adapter_strength}
            for who, (box, keypoints), digests in zip(params.identities or [], placed, photo_digests, strict=True)]
