"""IdentityScorer: a detector + recogniser pack (insightface's layout) that scores outputs against the reference
(the arithmetic and the choice of candidates are `scoring`'s, which loads no model)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .config import PipelineSettings
from .errors import NoFaceDetected
from .face import FaceAnalyzer
from .scoring import cosine, mean_embedding, region_slices

SCORING_PART = "scoring_face_pack"


class IdentityScorer:
    """A detector + recogniser pack that scores outputs against a reference embedding (CPU, thread-safe)."""

    def __init__(self, face_pack_dir: Path, settings: PipelineSettings, *, same_model: bool = False) -> None:
        """Load the pack (insightface's model_zoo routes its ONNX files).

        Args:
            face_pack_dir: The scoring pack's folder (or the conditioning pack's, with `same_model`).
            settings: det_size, face_providers, face_threads as for the conditioning pack.
            same_model: Whether this is the conditioning pack (reported with every score).

        Raises:
            WeightsError: The pack lacks a keypoint detector or a recogniser (names `scoring_face_pack`).
        """
        self.analyzer = FaceAnalyzer(face_pack_dir, settings, part=SCORING_PART)
        self.same_model = same_model

    def embed(self, photo: Image.Image, *, face_index: int | None = None) -> np.ndarray | None:
        """The scoring recogniser's embedding of a reference photo's face (None when it finds none)."""
        try:
            return self.analyzer.analyze(photo, face_index=face_index).embedding
        except NoFaceDetected:
            return None

    def score(self, images: np.ndarray, reference: np.ndarray | None,
              face_box: Sequence[float] | None = None) -> list[float | None]:
        """Cosine similarity of each image's face to `reference`.

        Args:
            images: (N, H, W, 3) uint8 outputs.
            reference: (512,) the reference embedding (a mean of several is fine); None: nothing to compare to.
            face_box: x1, y1, x2, y2 in output pixels where the face should be; the search is limited to it, grown
                by REGION_MARGIN. None: the whole image (the largest face).

        Returns:
            Per image the cosine in [-1, 1], or None when no face was found (or there is no reference).
        """
        if reference is None:
            return [None] * len(images)
        return [self._score_one(np.asarray(image), reference, face_box) for image in images]

    def _score_one(self, image: np.ndarray, reference: np.ndarray, face_box: Sequence[float] | None) -> float | None:
        crop = image[region_slices(face_box, image.shape[1], image.shape[0])] if face_box is not None else image
        try:
            face = self.analyzer.analyze(Image.fromarray(np.ascontiguousarray(crop)), name="output")
        except NoFaceDetected:
            return None
        return cosine(face.embedding, reference)


def scorer_for(face_pack: Path, scoring_face_pack: Path | None, settings: PipelineSettings) -> IdentityScorer:
    """The scorer on the scoring pack, or on the conditioning pack (then its reports say `same_model`)."""
    if scoring_face_pack is None:
        return IdentityScorer(face_pack, settings, same_model=True)
    return IdentityScorer(scoring_face_pack, settings)


def reference_embedding(scorer: IdentityScorer, photos: list[Image.Image],
                        face_index: int | None = None) -> np.ndarray | None:
    """The scorer's reference: the mean of its embeddings of the face photos (face_index picks the first one's)."""
    return mean_embedding([scorer.embed(photo, face_index=face_index if i == 0 else None)
                           for i, photo in enumerate(photos)])
