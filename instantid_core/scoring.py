"""The identity score (issue 26): how much each output looks like the reference person, and best-of-N on it.

`scorer.IdentityScorer` runs a recogniser of its own (`scoring_face_pack`, insightface's layout; by default the
conditioning face_pack, which flatters itself: the report says `same_model`). It detects the face in each output,
inside the face region when the request has one, and reports the cosine similarity of its embedding to the
reference's (the mean embedding when several photos were given), or None when no face is found.

`best_of` / `min_identity`: a round generates `params.candidates` images on consecutive seeds; `keep_best` picks the
`num_images` to return, `below_floor` says which of them miss the floor (another round runs on the next seeds while
the operator's bound on candidates allows; `run_rounds` for the library and the batch job). This module loads no
model: the Ingress chooses with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


Candidates = tuple[np.ndarray, IdentityReport | None]
"""A pair's chosen images (num_images, H, W, 3) uint8, and their identity report (None when nothing scored them)."""


def run_rounds(run_round: Callable[[list[int], list[int]], Sequence[np.ndarray | Exception]], seeds: Sequence[int],
               params: Sequence[GenerateParams],
               score: Callable[[int, np.ndarray], list[float | None] | None] | None,
               max_candidates: int, same_model: bool) -> list[Candidates | Exception]:
    """Each pair's images, chosen by identity score as the serving app chooses them (best_of, min_identity):
    the rounds of the library (one pair) and of the batch job (a batch of pairs; the serving app's are async, in its
    Ingress).

    Round one runs every pair: `run_round(pairs, first_seeds)` generates `params[p].candidates` images for each
    pair p of `pairs`, image i on `first_seeds[k] + i`. `score(p, images)` scores pair p's candidates (None: the
    pair is not scored, e.g. several identities; `score` None: nothing is); the `num_images` best are kept
    (`keep_best`). A pair with `min_identity` whose kept images miss it runs another round on the next seeds (its
    seed + the candidates so far) while `next_round` allows within `max_candidates`, and keeps the best of every
    round (`merge_rounds`). The pairs due for another round run in one `run_round` call, so they share GPU batches
    as in round one.

    Returns:
        Per pair: its kept images and report, or the exception `run_round` returned for it (the batch job records
        the pair as an error and retries it on its next run, from round one: the same seeds, the same images).
    """
    results: list[Candidates | Exception | None] = [None] * len(seeds)
    due, first_seeds = list(range(len(seeds))), list(seeds)
    while due:
        again = []
        for pair, first, outcome in zip(due, first_seeds, run_round(due, first_seeds), strict=True):
            if isinstance(outcome, Exception):
                results[pair] = outcome
                continue
            scores = score(pair, outcome) if score is not None else None
            if scores is None:
                results[pair] = (outcome, None)
                continue
            floor, keep = params[pair].min_identity, params[pair].num_images
            kept = keep_best(scores, keep)
            chosen = [scores[i] for i in kept]
            report = IdentityReport(scores=chosen, seeds=[(first + i) % 2**63 for i in kept], candidates=len(scores),
                                    same_model=same_model, min_identity=floor, below_floor=below_floor(chosen, floor))
            images = outcome[kept]
            if results[pair] is not None:  # a later round: the best of this one and those before
                before, before_report = results[pair]
                merged, report = merge_rounds(before_report, report, keep)
                images = np.concatenate([before, images])[merged]
            results[pair] = (images, report)
            if next_round(report.scores, floor, report.candidates, params[pair].candidates, max_candidates):
                again.append(pair)
        due = again
        first_seeds = [(seeds[pair] + results[pair][1].candidates) % 2**63 for pair in again]
    return results
