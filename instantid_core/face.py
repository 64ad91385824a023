"""The face stage: photo -> FaceInfo (identity embedding, five keypoints, box), and the keypoint image.

`FaceAnalyzer` wraps insightface's `FaceAnalysis` on an antelopev2-layout pack (detection + recognition only), as
the InstantID reference does. It picks the largest face by box area, `(x2 - x1) * (y2 - y1)`, as the official demo
does (gradio_demo/app.py sorts by exactly that key; a widely used hosted fork's `(x2 - x1) * y2 - y1` is the one
with the parentheses wrong), or the index the caller asks for in that order (`face_index` for the face photo,
`pose_face_index` for the pose photo); no face is a typed error instead of an IndexError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
from insightface.app import FaceAnalysis
from insightface.app.common import Face
from PIL import Image

from .config import PipelineSettings
from .errors import NoFaceDetected, WeightsError
from .images import image_to_bgr

EMBEDDING_DIM = 512
# The reference keypoint image (InstantID's draw_kps): colours of points 0..4 (left eye, right eye, nose, left and
# right mouth corner), limbs from each point to the nose, ellipses of half-width 4, limbs dimmed to 0.6, dots r=10.
KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
STICK_WIDTH = 4
LIMB_DIM = 0.6
DOT_RADIUS = 10
MIN_DET_SIZE = 160  # below this the detector sees too few pixels to be worth a retry


@dataclass(frozen=True, eq=False)
class FaceInfo:
    """One detected face, as plain read-only numpy arrays (cheap to pickle across Ray processes).

    Attributes:
        embedding: (512,) float32, the recogniser's raw (not normalised) output, as the reference uses it.
        kps: (5, 2) float32 keypoints in photo pixels: left eye, right eye, nose, left and right mouth corner.
        bbox: (4,) float32 face box x1, y1, x2, y2 in photo pixels.
        det_score: Detector confidence in [0, 1].
        image_size: (width, height) of the photo the coordinates refer to.
    """

    embedding: np.ndarray
    kps: np.ndarray
    bbox: np.ndarray
    det_score: float
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        for field, shape in (("embedding", (EMBEDDING_DIM,)), ("kps", (5, 2)), ("bbox", (4,))):
            value = np.array(getattr(self, field), dtype=np.float32)  # a private copy
            if value.shape != shape:
                raise ValueError(f"FaceInfo.{field} must have shape {shape}, got {value.shape}")
            value.flags.writeable = False
            object.__setattr__(self, field, value)
        object.__setattr__(self, "det_score", float(self.det_score))
        object.__setattr__(self, "image_size", (int(self.image_size[0]), int(self.image_size[1])))


def _retry_sizes(det_size: int) -> tuple[int, ...]:
    """det_size, then 3/4 and 1/2 of it (multiples of 32): a face that fills the photo can be too large for the
    detector's anchors at full size and is found at a smaller one (640 -> 480 -> 320)."""
    sizes = [det_size] + [max(MIN_DET_SIZE, round(det_size * f / 32) * 32) for f in (0.75, 0.5)]
    return tuple(dict.fromkeys(s for s in sizes if s <= det_size))


class FaceAnalyzer:
    """insightface detection + recognition on a face pack, picking one face per photo.

    Safe to call from several threads at once: detection and recognition are stateless per call.
    """

    def __init__(self, face_pack_dir: Path, settings: PipelineSettings, *, part: str = "face_pack") -> None:
        """Load the pack's detector and recogniser.

        Args:
            face_pack_dir: Folder holding the antelopev2 ONNX files (scrfd_10g_bnkps.onnx, glintr100.onnx), or any
                insightface pack with a keypoint detector and a recogniser.
            settings: Uses `det_size` and `face_providers` (the first available provider wins; CPU otherwise).
            part: The weight part errors name (`scoring_face_pack` for the identity scorer's pack).

        Raises:
            WeightsError: The pack cannot be loaded or lacks a detector or recogniser.
        """
        folder = Path(face_pack_dir)
        if not folder.is_dir() or not any(folder.glob("*.onnx")):
            # checked here: for a name that is not a folder, insightface would try to download a model pack
            raise WeightsError(f"{part}: no ONNX files in {folder}", field=part)
        available = set(onnxruntime.get_available_providers())
        providers = [p for p in settings.face_providers if p in available] or ["CPUExecutionProvider"]
        ctx_id = -1 if providers[0] == "CPUExecutionProvider" else 0  # insightface: ctx_id < 0 means CPU
        try:
            options = onnxruntime.SessionOptions()
            if settings.face_threads is not None:  # one replica's CPUs, not every core of the node
                options.intra_op_num_threads = settings.face_threads
                options.inter_op_num_threads = 1
            self._app = FaceAnalysis(name=str(folder), allowed_modules=["detection", "recognition"],
                                     providers=providers, sess_options=options)
            self._app.prepare(ctx_id=ctx_id, det_size=(settings.det_size, settings.det_size))
        except Exception as err:  # insightface asserts, onnxruntime raises its own types
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise WeightsError(f"{part}: cannot load {folder} ({reason})", field=part) from err
        if "recognition" not in self._app.models or not getattr(self._app.det_model, "use_kps", False):
            raise WeightsError(f"{part}: {folder} needs a keypoint detector and a recogniser", field=part)
        self._detector = self._app.det_model
        self._recogniser = self._app.models["recognition"]
        self.det_sizes = _retry_sizes(settings.det_size)
        self.providers = providers

    def analyze(self, image: Image.Image, *, face_index: int | None = None, name: str = "image") -> FaceInfo:
        """Detect faces, pick one (largest first, or `face_index` in that order) and embed it.

        Args:
            image: An RGB photo (as `load_image` returns).
            face_index: Which face, counting from the largest box (0); None for the largest.
            name: What the caller calls this photo; errors name it.

        Returns:
            The chosen face.

        Raises:
            NoFaceDetected: No face at any detection size, or fewer faces than `face_index` + 1.
        """
        bgr = image_to_bgr(image)  # the only RGB -> BGR conversion: insightface wants OpenCV's order
        boxes, kpss = self._detect(bgr)
        if len(boxes) == 0:
            raise NoFaceDetected(f"{name}: no face found; use a photo with a clear, frontal face", field=name)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        order = sorted(range(len(boxes)), key=lambda i: (-areas[i], -boxes[i, 4]))  # largest first
        index = 0 if face_index is None else face_index
        if not 0 <= index < len(order):
            raise NoFaceDetected(
                f"{name}: face_index {index} asked for, but {len(order)} face(s) found "
                f"(valid: 0..{len(order) - 1}, largest first)", field="face_index")
        chosen = order[index]
        face = Face(bbox=boxes[chosen, :4], kps=kpss[chosen], det_score=boxes[chosen, 4])
        embedding = self._recogniser.get(bgr, face)
        return FaceInfo(embedding, face.kps, face.bbox, face.det_score, image.size)

    def analyze_all(self, image: Image.Image, *, name: str = "image") -> list[FaceInfo]:
        """Every face of a photo, left to right by box centre, each embedded (a pose photo of several people, issue
        23: identities without a box take its faces in this order).

        Raises:
            NoFaceDetected: No face at any detection size.
        """
        bgr = image_to_bgr(image)
        boxes, kpss = self._detect(bgr)
        if len(boxes) == 0:
            raise NoFaceDetected(f"{name}: no face found; use a photo with a clear, frontal face", field=name)
        faces = []
        for i in sorted(range(len(boxes)), key=lambda i: float(boxes[i, 0] + boxes[i, 2])):
            face = Face(bbox=boxes[i, :4], kps=kpss[i], det_score=boxes[i, 4])
            faces.append(FaceInfo(self._recogniser.get(bgr, face), face.kps, face.bbox, face.det_score, image.size))
        return faces

    def probe(self) -> None:
        """One detector forward pass on a small blank image (a health check: raises if the session is broken)."""
        self._detector.detect(np.zeros((64, 64, 3), np.uint8), input_size=(self.det_sizes[-1],) * 2)

    def _detect(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 5) boxes with scores and (N, 5, 2) keypoints at the first detection size that finds any face."""
        boxes, kpss = np.empty((0, 5), np.float32), np.empty((0, 5, 2), np.float32)
        for size in self.det_sizes:
            boxes, kpss = self._detector.detect(bgr, input_size=(size, size))
            if len(boxes):
                break
        return boxes, kpss


def draw_kps(size: tuple[int, int], kps: np.ndarray) -> Image.Image:
    """The reference keypoint image (InstantID's `draw_kps`) on a black canvas of `size` = (width, height).

    Limbs from each point to the nose as filled ellipses (half-width 4) in the point's colour, the canvas dimmed
    to 0.6 (so limbs end at 0.6 of their colour), then a filled circle of radius 10 per point at full colour.
    Coordinates are truncated to int as in the reference, so the pixels match it exactly.
    """
    kps = np.asarray(kps, dtype=np.float64)
    width, height = size
    canvas = np.zeros((height, width, 3))  # float64 like the reference: the 0.6 dimming truncates the same way
    for a, b in LIMBS:
        x, y = kps[[a, b], 0], kps[[a, b], 1]
        length = math.hypot(x[0] - x[1], y[0] - y[1])
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))), (int(length / 2), STICK_WIDTH), int(angle),
                                   0, 360, 1)
        canvas = cv2.fillConvexPoly(canvas, polygon, KPS_COLORS[a])
    out = (canvas * LIMB_DIM).astype(np.uint8)
    for (x, y), color in zip(kps, KPS_COLORS, strict=True):
        out = cv2.circle(out, (int(x), int(y)), DOT_RADIUS, color, -1)
    return Image.fromarray(out)


def map_kps_to_output(kps: np.ndarray, src_size: tuple[int, int], dst_size: tuple[int, int]) -> np.ndarray:
    """Points of a photo of `src_size` placed on an output canvas of `dst_size`, both (width, height).

    The photo is resized to *cover* the canvas (uniform scale, the larger of the two ratios) and centre-cropped:
    the same framing a caller gets when asking for an output shape other than the photo's, and the identity when
    the aspect ratios match. Points may land outside the canvas when their part of the photo is cropped away.

    Args:
        kps: (N, 2) points (x, y) in photo pixels, e.g. the five keypoints or the box corners.
        src_size: Photo (width, height).
        dst_size: Output (width, height).

    Returns:
        (N, 2) float32 points in output pixels.
    """
    (sw, sh), (dw, dh) = src_size, dst_size
    scale = max(dw / sw, dh / sh)
    offset = np.array([(sw * scale - dw) / 2, (sh * scale - dh) / 2])
    return (np.asarray(kps, dtype=np.float64) * scale - offset).astype(np.float32)
