"""Face keypoints without a pose photo: the standard five-point face template turned by a named angle and placed in
a box of the output, or five points given outright. They are drawn by the reference's `draw_kps`, as a pose photo's
keypoints are.

The template is the one ArcFace alignment maps faces onto (insightface's `arcface_dst`, a 112 x 112 crop: eyes,
nose tip, mouth corners, in the image's left-to-right order). A 2D template cannot turn by itself, so each point
gets a depth: eyes and mouth corners near the face's plane, the nose tip in front (proportions of an adult face:
the nose tip stands out about 0.4 of the distance between the eyes). Turning is a rotation about the vertical axis
(yaw: `three_quarter_*`, `profile_*`) or in the image plane (roll: `tilt_*`), then an orthographic projection.
Directions are the image's: `three_quarter_left` turns the nose towards the image's left edge, `tilt_left` leans the
top of the head towards it.
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np

from .errors import InvalidParameter

# insightface.utils.face_align.arcface_dst: where ArcFace alignment puts the five points in a 112 x 112 crop.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]], np.float64)
TEMPLATE_SIDE = 112.0
# Depth towards the viewer, in template pixels (eye distance ~35): nose tip 0.4 of it in front, mouth corners a bit.
DEPTH = np.array([0.0, 0.0, 14.0, 4.0, 4.0])
MIN_BOX_SIDE = 32  # below this the five points (drawn with radius-10 circles) overlap into one blob


class PosePreset(str, Enum):
    frontal = "frontal"
    three_quarter_left = "three_quarter_left"
    three_quarter_right = "three_quarter_right"
    profile_left = "profile_left"
    profile_right = "profile_right"
    tilt_left = "tilt_left"
    tilt_right = "tilt_right"


# (yaw, roll) in degrees. Yaw stops short of 90: at a true profile both eyes project onto one point.
ANGLES: dict[PosePreset, tuple[float, float]] = {
    PosePreset.frontal: (0.0, 0.0),
    PosePreset.three_quarter_left: (35.0, 0.0),
    PosePreset.three_quarter_right: (-35.0, 0.0),
    PosePreset.profile_left: (70.0, 0.0),
    PosePreset.profile_right: (-70.0, 0.0),
    PosePreset.tilt_left: (0.0, 20.0),
    PosePreset.tilt_right: (0.0, -20.0),
}


def turned_template(preset: PosePreset) -> np.ndarray:
    """The five template points (in the 112 x 112 crop) turned by the preset's yaw and roll about the crop's
    centre: (5, 2)."""
    yaw, roll = (math.radians(a) for a in ANGLES[preset])
    centre = TEMPLATE_SIDE / 2
    x, y, z = ARCFACE_TEMPLATE[:, 0] - centre, ARCFACE_TEMPLATE[:, 1] - centre, DEPTH
    # Yaw: a positive angle moves the points that stand out (the nose) towards -x, the image's left.
    x = x * math.cos(yaw) - z * math.sin(yaw)
    # Roll: a positive angle leans the top of the head towards the left (counter-clockwise on screen, y down).
    x, y = x * math.cos(roll) + y * math.sin(roll), -x * math.sin(roll) + y * math.cos(roll)
    return np.stack([x, y], axis=1) + centre


def preset_keypoints(preset: PosePreset, box: tuple[float, float, float, float]) -> np.ndarray:
    """The preset's five points placed in `box` (x1, y1, x2, y2 in output pixels): the template's 112 x 112 crop
    scaled uniformly to the box's shorter side and centred in it. (5, 2) float32."""
    x1, y1, x2, y2 = box
    scale = min(x2 - x1, y2 - y1) / TEMPLATE_SIDE
    offset = np.array([(x1 + x2) / 2, (y1 + y2) / 2]) - scale * TEMPLATE_SIDE / 2
    return (turned_template(preset) * scale + offset).astype(np.float32)


def keypoints_box(kps: np.ndarray) -> tuple[float, float, float, float]:
    """The face box the keypoints stand for (region control needs one): the template crop's extent relative to its
    points, so explicit points get the box a preset with those points would have had."""
    # In the template, the points span ~35 x 41 px of a 112 px crop: the crop is ~2.9x the points' larger span.
    centre = kps.mean(axis=0)
    span = float(max(np.ptp(kps[:, 0]), np.ptp(kps[:, 1]), 1.0))
    half = span * TEMPLATE_SIDE / float(np.ptp(ARCFACE_TEMPLATE[:, 1])) / 2
    return (float(centre[0] - half), float(centre[1] - half), float(centre[0] + half), float(centre[1] + half))


def place_face(preset: PosePreset | None, box: tuple[float, float, float, float] | None,
               keypoints: list[tuple[float, float]] | None, size: tuple[int, int]
               ) -> tuple[np.ndarray, tuple[float, float, float, float]] | None:
    """The keypoints (5, 2) and face box a request places on an output of `size` (width, height): from `preset` in
    `box`, or `keypoints` as given; None when it places none (the pose photo's or face photo's face decides).

    Raises:
        InvalidParameter: both forms given, a box outside the output or smaller than MIN_BOX_SIDE, points outside
            the output; the message names the field (`pose.box`, `keypoints`).
    """
    width, height = size
    if preset is not None and keypoints is not None:
        raise InvalidParameter("keypoints: give a pose preset or keypoints, not both", field="keypoints")
    if preset is not None and box is not None:
        x1, y1, x2, y2 = box
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise InvalidParameter(f"pose.box: {list(box)} must lie inside the {width}x{height} output, with x1 < "
                                   "x2 and y1 < y2", field="pose.box")
        if min(x2 - x1, y2 - y1) < MIN_BOX_SIDE:
            raise InvalidParameter(f"pose.box: its sides must be at least {MIN_BOX_SIDE} px to hold a face",
                                   field="pose.box")
        return preset_keypoints(preset, box), (float(x1), float(y1), float(x2), float(y2))
    if keypoints is not None:
        kps = np.asarray(keypoints, np.float32)
        if not ((kps >= 0).all() and (kps[:, 0] < width).all() and (kps[:, 1] < height).all()):
            raise InvalidParameter(f"keypoints: every point must lie inside the {width}x{height} output",
                                   field="keypoints")
        return kps, keypoints_box(kps)
    return None
