"""Extra ControlNets beside IdentityNet: canny, depth and pose, each with its own per-sample strength.

    request controls [{type, strength, image?}] --prepare_control--> ControlMap (uint8 map at the output size)
      canny: OpenCV's Canny edges of the given image, else the pose photo, else the face photo
      depth: transformers' `depth-estimation` pipeline on the same choice of image
      pose:  the supplied pose map as is (no pose model is shipped)
    per forward --ExtraControlNets.add_residuals--> IdentityNet's residuals + sum(strength_s * ControlNet_type)

Each ControlNet is conditioned on the TEXT embeddings (IdentityNet alone sees the face tokens), as in the
official multi-ControlNet InstantID demo. A type no sample of the batch uses does not run; a sample without a
type gets strength 0 for it, which adds exactly nothing, so batching with control requests changes no image.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import ControlParams, ControlType
from .errors import InvalidParameter
from .weight_layout import load_variant

log = logging.getLogger(__name__)
CANNY_THRESHOLDS = (100, 200)  # the thresholds diffusers' ControlNet docs and the InstantID demo use


@dataclass(frozen=True)
class ControlMap:
    """A prepared control: the conditioning image at the output size, plain numpy to cross processes."""

    type: ControlType
    strength: float
    image: np.ndarray  # (H, W, 3) uint8


def fit_to_output(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Cover the (width, height) canvas and centre-crop: the framing `face.map_kps_to_output` gives keypoints."""
    return ImageOps.fit(image.convert("RGB"), size, method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def canny_map(image: Image.Image) -> Image.Image:
    """The edge map as the official demo makes it (gradio_demo/controlnet_util.py): OpenCV's Canny on the colour
    image (BGR, as cv2 holds it), which takes the strongest gradient of the three channels, so an edge between two
    colours of equal brightness is kept (a grey conversion first would lose it)."""
    import cv2

    bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    edges = cv2.Canny(bgr, *CANNY_THRESHOLDS)  # (H, W) uint8, 0 or 255
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


class ExtraControlNets:
    """The configured extra ControlNets (loaded once) and the depth estimator, on one device."""

    def __init__(self, sources: Mapping[str, Path], depth_estimator: Path | None, *, device: torch.device,
                 dtype: torch.dtype) -> None:
        from diffusers import ControlNetModel

        self.device, self.dtype = device, dtype
        self.models: dict[ControlType, ControlNetModel] = {}
        for name, path in sources.items():
            variant = load_variant(Path(path), str(dtype).removeprefix("torch."))
            model = ControlNetModel.from_pretrained(path, torch_dtype=dtype, variant=variant)
            self.models[ControlType(name)] = model.to(device).eval().requires_grad_(False)
        self.depth_estimator = None
        if depth_estimator is not None and ControlType.depth in self.models:
            from transformers import pipeline

            # transformers' own pipeline: the published depth models' pre- and post-processing.
            self.depth_estimator = pipeline("depth-estimation", model=str(depth_estimator), device=device)
        if self.models:
            log.info("extra ControlNets: %s", ", ".join(t.value for t in self.models))

    @property
    def types(self) -> list[str]:
        return sorted(t.value for t in self.models)

    def check(self, controls: Sequence[ControlParams], field: str = "controls") -> None:
        """Raises InvalidParameter naming a control type this server has no ControlNet (or depth model) for."""
        for index, control in enumerate(controls):
            if control.type not in self.models:
                configured = ", ".join(self.types) or "none"
                raise InvalidParameter(f"{field}[{index}].type: {control.type.value!r} is not configured on this "
                                       f"server (configured: {configured})", field=f"{field}[{index}].type")
            if control.type == ControlType.depth and self.depth_estimator is None:
                raise InvalidParameter(f"{field}[{index}].type: depth needs a depth_estimator in the weights",
                                       field=f"{field}[{index}].type")

    def prepare(self, controls: Sequence[ControlParams], images: Sequence[bytes | None], fallback: bytes | None,
                size: tuple[int, int], field: str = "controls") -> tuple[ControlMap, ...]:
        """Control maps at the output `size` (width, height); strength-0 controls are dropped (they add nothing).

        Args:
            images: per control, its own image bytes (or None).
            fallback: the pose photo, else the face photo: the canny/depth input when a control has no image.
        """
        from .images import load_image

        self.check(controls, field)
        maps = []
        for index, (control, data) in enumerate(zip(controls, images, strict=True)):
            if control.strength == 0.0:
                continue
            if control.type == ControlType.pose and data is None:
                raise InvalidParameter(f"{field}[{index}].image: pose needs a pose map image",
                                       field=f"{field}[{index}].image")
            data = data if data is not None else fallback
            if data is None:
                raise InvalidParameter(f"{field}[{index}].image: no image to compute {control.type.value} from",
                                       field=f"{field}[{index}].image")
            photo = load_image(data, name=f"{field}[{index}].image", max_pixels=40_000_000, max_side=4096)
            if control.type == ControlType.canny:
                condition = canny_map(fit_to_output(photo, size))
            elif control.type == ControlType.depth:
                condition = fit_to_output(self.estimate_depth(photo), size)
            else:
                condition = fit_to_output(photo, size)
            maps.append(ControlMap(control.type, float(control.strength), np.asarray(condition, np.uint8)))
        return tuple(maps)

    def estimate_depth(self, photo: Image.Image) -> Image.Image:
        depth = self.depth_estimator(photo)["depth"]  # PIL "L" image at the photo's size, near = bright
        return depth.convert("RGB")

    # --- inside the denoiser's forward -----------------------------------------------------------------------------
    def conditioning(self, per_sample: Sequence[Sequence[ControlMap]], size: tuple[int, int],
                     processor) -> dict[ControlType, tuple[torch.Tensor, torch.Tensor]]:
        """Per used type: (control images (2B, 3, H, W) in [0, 1], strengths (2B, 1, 1, 1)), CFG halves stacked.
        Samples without the type get a black image at strength 0."""
        height, width = size
        out = {}
        used = {m.type for maps in per_sample for m in maps}
        for kind in sorted(used, key=lambda t: t.value):
            images, strengths = [], []
            for maps in per_sample:
                found = next((m for m in maps if m.type == kind), None)
                images.append(Image.fromarray(found.image) if found else Image.new("RGB", (width, height)))
                strengths.append(found.strength if found else 0.0)
            control = processor.preprocess(images, height=height, width=width).to(self.device, self.dtype)
            scale = torch.tensor(strengths, device=self.device, dtype=self.dtype)[:, None, None, None]
            out[kind] = (torch.cat([control, control]), torch.cat([scale, scale]))
        return out

    def add_residuals(self, down: list[torch.Tensor], mid: torch.Tensor, model_input: torch.Tensor,
                      t: torch.Tensor, text: torch.Tensor, added: dict, controls: dict,
                      pick) -> tuple[list[torch.Tensor], torch.Tensor]:
        """IdentityNet's residuals plus each used ControlNet's, scaled per sample (text-conditioned)."""
        for kind, (image, scale) in controls.items():
            c_down, c_mid = self.models[kind](
                model_input, t, encoder_hidden_states=text, controlnet_cond=pick(image), conditioning_scale=1.0,
                added_cond_kwargs=added, return_dict=False,
            )
            scale = pick(scale)
            down = [d + c * scale.to(c.dtype) for d, c in zip(down, c_down, strict=True)]
            mid = mid + c_mid * scale.to(c_mid.dtype)
        return down, mid

