"""Where our conditioning must equal the official InstantID code's for the same inputs (issue 26): the canny edge
map of its multi-ControlNet demo (gradio_demo/controlnet_util.py, `get_canny_image`)."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from instantid_core.controls import CANNY_THRESHOLDS, canny_map
from testkit.api import FACE


def demo_canny(rgb: np.ndarray) -> np.ndarray:
    """The demo's computation, written out: cv2.Canny on the BGR colour image, thresholds 100 and 200."""
    return cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), 100, 200)


def test_canny_edges_are_taken_on_the_colour_photo_as_the_demo_takes_them():
    assert CANNY_THRESHOLDS == (100, 200)
    photo = np.asarray(Image.open(FACE).convert("RGB"))
    ours = np.asarray(canny_map(Image.fromarray(photo)))
    assert ours.shape == (*photo.shape[:2], 3) and (ours == demo_canny(photo)[..., None]).all()


def test_an_edge_between_two_colours_of_one_brightness_is_kept():
    halves = np.zeros((64, 64, 3), np.uint8)
    halves[:, :32] = (200, 0, 0)
    halves[:, 32:] = (0, 102, 0)  # the same luma as the red (0.299 * 200 = 0.587 * 102)
    grey = cv2.cvtColor(halves, cv2.COLOR_RGB2GRAY)
    assert not cv2.Canny(grey, 100, 200).any()  # a grey conversion first loses the edge
    edges = np.asarray(canny_map(Image.fromarray(halves)))[..., 0]
    assert edges[:, 30:34].any() and not edges[:, :28].any() and not edges[:, 36:].any()
