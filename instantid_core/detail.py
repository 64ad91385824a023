"""The detail pass for small faces (issue 26, `face_detail: off | auto | on`): after the first image, the face (where
IdentityNet placed it: the condition's face box) is cropped with a margin, upscaled to a size the model works well
at, regenerated with the same identity, prompt and seed through the inpainting path, downscaled and pasted back with
a feathered mask. Only the face box dilated as `inpaint_face` dilates it, plus the feather, can change: every other
pixel stays exactly as it was. `auto` runs it only for a face smaller than the configured size.

The report and the decision load no model library (the Ingress reads them); the pixel work imports `img2img` (cv2,
torch) where it runs, on the Denoiser and in the library pipeline.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from .config import GenerateParams
from .errors import InvalidParameter
from .handoff import FaceCondition

DETAIL_MARGIN = 1.0  # the crop: the face box grown by its larger side on every side (context for the model)
DETAIL_STRENGTH = 0.5  # how much of the face is redrawn: keeps the first image's face shape and light


class FaceDetailReport(BaseModel):
    """Whether the detail pass ran on each image, and its identity score before and after (with a scorer)."""

    mode: str = Field(description="off | auto | on, as asked.")
    ran: list[bool] = Field(description="Per image: whether its face was regenerated.")
    face_side: float = Field(description="The face box's larger side in output pixels (auto compares it to the "
                             "server's face_detail_below).")
    identity_before: list[float | None] | None = Field(None, description="Per image: its identity score before.")
    identity_after: list[float | None] | None = Field(None, description="Per image: its identity score after.")


def wants_detail(params: GenerateParams, face: FaceCondition, below: int) -> bool:
    """Whether the pass runs: `on` always (a face box must lie on the canvas), `auto` below `below` px.

    Raises:
        InvalidParameter: `on` for an output whose face box lies off the canvas (no face to detail), naming
            `face_detail`.
    """
    if params.face_detail == "off":
        return False
    if _on_canvas(face) is None:
        if params.face_detail == "on":
            raise InvalidParameter("face_detail: on, but the output has no face on its canvas to detail",
                                   field="face_detail")
        return False
    return params.face_detail == "on" or face_side(face) < below


def face_side(face: FaceCondition) -> float:
    x1, y1, x2, y2 = face.face_box
    return float(max(x2 - x1, y2 - y1))


def _on_canvas(face: FaceCondition) -> tuple[int, int, int, int] | None:
    x1, y1, x2, y2 = face.face_box
    left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
    right, bottom = min(face.width, math.ceil(x2)), min(face.height, math.ceil(y2))
    return (left, top, right, bottom) if right - left >= 2 and bottom - top >= 2 else None


def crop_box(face: FaceCondition, margin: float = DETAIL_MARGIN) -> tuple[int, int, int, int]:
    """A square around the face box grown by `margin` x its larger side, moved (and if need be shrunk) onto the
    canvas: left, top, right, bottom in output pixels."""
    x1, y1, x2, y2 = face.face_box
    side = min(round(face_side(face) * (1 + 2 * margin)), face.width, face.height)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left = int(min(max(0, round(cx - side / 2)), face.width - side))
    top = int(min(max(0, round(cy - side / 2)), face.height - side))
    return left, top, left + side, top + side


def detail_condition(face: FaceCondition, image: np.ndarray, box: tuple[int, int, int, int],
                     size: int) -> FaceCondition:
    """The regeneration's condition: the crop upscaled to `size` x `size` as init photo, its face box (dilated as
    inpaint_face does) as mask, the keypoint image cropped and scaled alike, the same identity embedding."""
    from . import img2img
    left, top, right, bottom = box
    scale = size / (right - left)
    crop = Image.fromarray(image[top:bottom, left:right]).resize((size, size), Image.LANCZOS)
    kps = Image.fromarray(face.kps_image[top:bottom, left:right]).resize((size, size), Image.NEAREST)
    x1, y1, x2, y2 = face.face_box
    local = ((x1 - left) * scale, (y1 - top) * scale, (x2 - left) * scale, (y2 - top) * scale)
    return replace(face, kps_image=np.array(kps), face_box=local, width=size, height=size,
                   init_image=np.array(crop), mask=img2img.face_box_mask_image(local, (size, size)))


def detail_params(params: GenerateParams) -> GenerateParams:
    """The same request as one inpainting image (no best_of, no second detail pass) at the detail strength."""
    return params.model_copy(update={"num_images": 1, "best_of": 1, "min_identity": None, "face_detail": "off",
                                     "width": None, "height": None, "strength": DETAIL_STRENGTH})


def paste_back(image: np.ndarray, regenerated: np.ndarray, face: FaceCondition,
               box: tuple[int, int, int, int]) -> np.ndarray:
    """The regenerated crop downscaled into `box` and blended over `image` inside the face box dilated as
    inpaint_face does, feathered over img2img.SEAM_PX outside it; every pixel beyond that is `image`'s, exactly."""
    from . import img2img
    left, top, right, bottom = box
    patch = np.asarray(Image.fromarray(regenerated).resize((right - left, bottom - top), Image.LANCZOS))
    full = image.copy()
    full[top:bottom, left:right] = patch
    alpha = img2img.seam_alpha(img2img.face_box_mask_image(face.face_box, (face.width, face.height)))
    outside = np.ones_like(alpha, dtype=bool)
    outside[top:bottom, left:right] = False
    alpha[outside] = 0.0  # the patch covers the crop only (the margin keeps the feather inside it)
    return img2img.composite(image, full, alpha)


def changed_region(face: FaceCondition) -> np.ndarray:
    """(H, W) bool: where the detail pass may change pixels (the dilated face box plus the feather)."""
    from . import img2img
    return img2img.seam_alpha(img2img.face_box_mask_image(face.face_box, (face.width, face.height))) > 0
