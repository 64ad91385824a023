"""The choice by identity score of the library and the batch job (`instantid_core.scoring.run_rounds`), without
Ray or models: best_of keeps the best candidates, min_identity runs more rounds on the next seeds up to the bound, as
the serving app does. Each "image" here carries its seed, and its score is a fixed function of that seed, so every
choice can be recomputed."""

from __future__ import annotations

import numpy as np

from instantid_core.config import GenerateParams
from instantid_core.scoring import next_round, run_rounds


def score_of(seed: int) -> float:
    return ((seed * 37) % 100) / 100  # a spread of scores in [0, 1), the same for a seed every time


class Rounds:
    """`run_round` and `score` for run_rounds: image i of a pair's round holds its seed; every call recorded."""

    def __init__(self, params: list[GenerateParams], fail: dict[tuple[int, int], Exception] | None = None,
                 unscored: frozenset[int] = frozenset()) -> None:
        self.params, self.fail, self.unscored = params, fail or {}, unscored  # fail: (pair, its round) -> error
        self.calls: list[tuple[list[int], list[int]]] = []

    def run_round(self, pairs: list[int], first_seeds: list[int]) -> list[np.ndarray | Exception]:
        self.calls.append((list(pairs), list(first_seeds)))
        return [self.fail.get((pair, sum(pair in called for called, _ in self.calls)))
                or np.array([[[first + i]] for i in range(self.params[pair].candidates)])  # (N, 1, 1): its seed
                for pair, first in zip(pairs, first_seeds, strict=True)]

    def score(self, pair: int, images: np.ndarray) -> list[float | None] | None:
        return None if pair in self.unscored else [score_of(int(image[0, 0])) for image in images]


def test_min_identity_runs_rounds_on_the_next_seeds_up_to_the_bound_and_keeps_the_best_of_all():
    params = [GenerateParams(prompt="x", best_of=3, min_identity=0.999)]  # no score reaches it
    rounds = Rounds(params)
    ((images, report),) = run_rounds(rounds.run_round, [100], params, rounds.score, max_candidates=10,
                                     same_model=False)
    ran = 3
    while next_round([0.0], 0.999, ran, 3, 10):  # the rule: another round of 3 while it stays within 10
        ran += 3
    assert report.candidates == ran == 9
    assert [first for _, (first,) in rounds.calls] == [100, 103, 106]  # seed + the candidates so far
    best = max(range(100, 109), key=lambda seed: (score_of(seed), -seed))
    assert report.seeds == [best] and report.scores == [score_of(best)] and int(images[0, 0, 0]) == best
    assert report.below_floor == [True] and report.min_identity == 0.999 and report.same_model is False


def test_rounds_stop_once_the_kept_images_reach_the_floor():
    # seed 101 scores 0.37 and 102 scores 0.74: the second round of one candidate reaches 0.5
    params = [GenerateParams(prompt="x", min_identity=0.5)]
    rounds = Rounds(params)
    ((images, report),) = run_rounds(rounds.run_round, [101], params, rounds.score, max_candidates=16,
                                     same_model=True)
    assert len(rounds.calls) == 2 and report.candidates == 2
    assert report.seeds == [102] and report.below_floor == [False] and int(images[0, 0, 0]) == 102


def test_best_of_without_a_floor_is_one_round_keeping_the_best_in_score_order():
    params = [GenerateParams(prompt="x", best_of=4, num_images=2)]
    rounds = Rounds(params)
    ((images, report),) = run_rounds(rounds.run_round, [7], params, rounds.score, max_candidates=16,
                                     same_model=False)
    ranked = sorted(range(7, 11), key=lambda seed: (-score_of(seed), seed))[:2]
    assert len(rounds.calls) == 1 and report.candidates == 4 and report.below_floor is None
    assert report.seeds == ranked and [int(image[0, 0]) for image in images] == ranked


def test_pairs_due_another_round_share_one_call_and_an_unscored_pair_keeps_every_image():
    params = [GenerateParams(prompt="x", min_identity=0.999), GenerateParams(prompt="x", num_images=2),
              GenerateParams(prompt="x", best_of=2, min_identity=0.999), GenerateParams(prompt="x", num_images=2)]
    rounds = Rounds(params, unscored=frozenset({3}))  # several identities: no one reference face
    first, plain, pair, unscored = run_rounds(rounds.run_round, [0, 50, 200, 5], params, rounds.score,
                                              max_candidates=4, same_model=False)
    assert rounds.calls[0] == ([0, 1, 2, 3], [0, 50, 200, 5])  # round one: every pair in one call
    assert rounds.calls[1] == ([0, 2], [1, 202])  # round two: those below the floor, on their next seeds
    assert [called for called, _ in rounds.calls] == [[0, 1, 2, 3], [0, 2], [0], [0]]
    assert first[1].candidates == 4 and pair[1].candidates == 4
    assert plain[1].seeds == [50, 51] and plain[1].candidates == 2  # nothing to choose: generation order, all kept
    assert unscored[1] is None and [int(image[0, 0]) for image in unscored[0]] == [5, 6]


def test_a_failed_round_fails_its_pair_only():
    params = [GenerateParams(prompt="x", min_identity=0.999), GenerateParams(prompt="x", min_identity=0.999)]
    rounds = Rounds(params, fail={(1, 2): RuntimeError("out of memory")})
    first, second = run_rounds(rounds.run_round, [0, 10], params, rounds.score, max_candidates=3, same_model=False)
    assert first[1].candidates == 3
    assert isinstance(second, RuntimeError)  # recorded as an error: the job's next run retries it from round one
    assert [called for called, _ in rounds.calls] == [[0, 1], [0, 1], [0]]


def test_without_a_scorer_every_pair_is_one_round_of_its_images():
    params = [GenerateParams(prompt="x", num_images=3)]
    rounds = Rounds(params)
    ((images, report),) = run_rounds(rounds.run_round, [9], params, None, max_candidates=0, same_model=False)
    assert report is None and images.shape[0] == 3 and len(rounds.calls) == 1
