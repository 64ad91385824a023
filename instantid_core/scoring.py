"""The identity score (issue 26): how much each output looks like the reference person, and best-of-N on it.

`scorer.IdentityScorer` runs a recogniser of its own (`scoring_face_pack`, insightface's layout; by default the
conditioning face_pack, which flatters itself: the report says `same_model`). It detects the face in each output,
inside the face region when the request has one, and reports the cosine similarity of its embedding to the
reference's (the mean embedding when several photos were given), or None when no face is found.

`best_of` / `min_identity`: a round generates `params.candidates` images on consecutive seeds; `keep_best` picks the
`num_images` to return, `below_floor` says which of them miss the floor (another round runs on the next seeds while
the operator's bound on candidates allows). This module loads no model: the Ingress chooses with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field

from .config import MAX_BEST_OF, GenerateParams
from .errors import InvalidParameter

REGION_MARGIN = 0.5  # the face box grown by half its width and height on each side: a face drawn a little off its box
DEFAULT_MAX_CANDIDATES = 16  # candidates one request may cost in all (best_of x rounds) unless the operator says
NO_FACE = -2.0  # sorts below every cosine: an image without a face is the last choice


class IdentityReport(BaseModel):
    """The identity scores of one request's returned images (response, sidecar, job result, batch manifest)."""

    scores: list[float | None] = Field(description="Per returned image, in the order of `images` (block mode's "
                                       "withheld ones included, as `safety.flagged`): cosine similarity of its "
                                       "face to the reference's embedding; null when no face was found.")
    seeds: list[int] = Field(description="Per returned image: the seed that generated it.")
    candidates: int = Field(description="Images generated to choose from (best_of, and more rounds for "
                            "min_identity).")
    same_model: bool = Field(description="The score comes from the recogniser that conditioned the image (the "
                             "server configured no scoring_face_pack of its own): it flatters itself.")
    min_identity: float | None = Field(None, description="The floor the request asked for.")
    below_floor: list[bool] | None = Field(None, description="With min_identity: per returned image, whether it "
                                           "stayed below the floor after every candidate the server allows.")


def region_slices(face_box: Sequence[float], width: int, height: int) -> tuple[slice, slice]:
    """Row and column slices of the face box grown by REGION_MARGIN on each side, clipped to the image."""
    x1, y1, x2, y2 = (float(v) for v in face_box)
    dx, dy = (x2 - x1) * REGION_MARGIN, (y2 - y1) * REGION_MARGIN
    left, top = max(0, int(x1 - dx)), max(0, int(y1 - dy))
    right, bottom = min(width, int(np.ceil(x2 + dx))), min(height, int(np.ceil(y2 + dy)))
    if right - left < 2 or bottom - top < 2:  # the box lies off the canvas: look at the whole image
        return slice(None), slice(None)
    return slice(top, bottom), slice(left, right)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator > 0 else 0.0


def mean_embedding(embeddings: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """The mean of the embeddings found (photos where the scorer saw no face are left out); None when none."""
    found = [e for e in embeddings if e is not None]
    return np.mean(np.stack(found), axis=0).astype(np.float32) if found else None


def keep_best(scores: Sequence[float | None], keep: int) -> list[int]:
    """Indices of the `keep` candidates to return: all of them in generation order when there is nothing to choose
    (so `best_of: 1` is today's request), else the highest scores first (no face last; ties: the earlier seed)."""
    if keep >= len(scores):
        return list(range(len(scores)))
    ranked = sorted(range(len(scores)), key=lambda i: (-(scores[i] if scores[i] is not None else NO_FACE), i))
    return ranked[:keep]


def below_floor(scores: Sequence[float | None], floor: float | None) -> list[bool] | None:
    """Per score, whether it misses `floor` (no face always does); None without a floor."""
    if floor is None:
        return None
    return [score is None or score < floor for score in scores]


def next_round(scores: Sequence[float | None], floor: float | None, ran: int, per_round: int,
               max_candidates: int) -> bool:
    """Whether `min_identity` asks for another round: a returned image misses the floor, and another round of
    `per_round` candidates stays within `max_candidates`."""
    misses = below_floor(scores, floor)
    return bool(misses and any(misses)) and ran + per_round <= max_candidates


def check_scoring_params(params: GenerateParams, scoring: bool, max_candidates: int) -> None:
    """best_of / min_identity need a scorer, and best_of stays within the candidates allowed.

    Raises:
        InvalidParameter: naming `best_of` or `min_identity`.
    """
    if not scoring and params.best_of > 1:
        raise InvalidParameter("best_of: this server scores no identities (no `scoring` configured)", field="best_of")
    if not scoring and params.min_identity is not None:
        raise InvalidParameter("min_identity: this server scores no identities (no `scoring` configured)",
                               field="min_identity")
    bound = min(max_candidates, MAX_BEST_OF)
    if params.candidates > bound:
        raise InvalidParameter(f"best_of: at most {bound} candidates per request on this server, got "
                               f"{params.candidates}", field="best_of")


def merge_rounds(first: IdentityReport, more: IdentityReport, keep: int) -> tuple[list[int], IdentityReport]:
    """Two rounds' kept candidates (first's then more's, as one list) -> which of them to keep, and the report."""
    scores, seeds = [*first.scores, *more.scores], [*first.seeds, *more.seeds]
    kept = keep_best(scores, keep)
    chosen = [scores[i] for i in kept]
    return kept, first.model_copy(update={
        "scores": chosen, "seeds": [seeds[i] for i in kept], "candidates": first.candidates + more.candidates,
        "below_floor": below_floor(chosen, first.min_identity)})


def identity_record(report: IdentityReport | None) -> dict:
    """The sidecar's (and batch manifest's) `identity` entry: nothing when no scorer ran."""
    return {"identity": report.model_dump(mode="json", exclude_none=True)} if report is not None else {}
