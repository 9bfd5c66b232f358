"""Levenshtein, Spearman, Jaccard and Borda on worked examples (METHODS §5.6)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from robustdissect.analysis.ranking import (
    average_pairwise_similarity,
    borda_top_k,
    borda_votes,
    jaccard,
    levenshtein,
    levenshtein_similarity,
    rank_order,
    spearman,
    total_jaccard,
)
from robustdissect.errors import UserError


def test_levenshtein_oracles() -> None:
    assert levenshtein_similarity("abc", "abc") == 1.0
    assert levenshtein_similarity("abc", "abc", sub_cost=1) == 1.0
    a, b = list(range(20)), list(range(100, 120))
    assert levenshtein_similarity(a, b, sub_cost=1) == 0.5
    assert levenshtein_similarity(a, b, sub_cost=2) == 0.0
    assert levenshtein_similarity(np.arange(20), np.arange(100, 120), sub_cost=1) == 0.5


def test_levenshtein_worked_examples() -> None:
    assert levenshtein("kitten", "sitting", sub_cost=1) == 3
    assert levenshtein("kitten", "sitting", sub_cost=2) == 5  # 13 - 2 * LCS(4)
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3
    assert levenshtein_similarity("", "") == 1.0
    # a shifted list: one deletion and one insertion
    assert levenshtein([1, 2, 3, 4], [2, 3, 4, 5], sub_cost=1) == 2
    assert levenshtein_similarity([1, 2, 3, 4], [2, 3, 4, 5], sub_cost=2) == 1 - 2 / 8
    # swapped pair: two substitutions (cost 1) or two indels (cost 2)
    assert levenshtein([1, 2, 3], [2, 1, 3], sub_cost=1) == 2
    assert levenshtein([1, 2, 3], [2, 1, 3], sub_cost=2) == 2
    # tokens compare whole ids; strings compare characters of the space-joined ids
    assert levenshtein([12, 3], [1, 23], sub_cost=2) == 4
    assert levenshtein([12, 3], [1, 23], sub_cost=2, encoding="string") == 2  # "12 3" vs "1 23"
    assert levenshtein_similarity([12, 3], [12, 3], encoding="string") == 1.0
    with pytest.raises(UserError):
        levenshtein("a", "b", sub_cost=0)


def test_levenshtein_matches_reference_dp() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.integers(0, 6, rng.integers(0, 9)).tolist()
        b = rng.integers(0, 6, rng.integers(0, 9)).tolist()
        for cost in (1, 2):
            assert levenshtein(a, b, cost) == _reference(a, b, cost)


def _reference(a: list[int], b: list[int], cost: int) -> int:
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        for j in range(len(b) + 1):
            if min(i, j) == 0:
                d[i][j] = max(i, j)
            else:
                d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost * (a[i - 1] != b[j - 1]))
    return d[len(a)][len(b)]


def test_average_pairwise_similarity() -> None:
    seqs = [[1, 2], [1, 2], [3, 4]]
    # pairs: (0,1) -> 1, (0,2) -> 0, (1,2) -> 0 with sub_cost 2
    assert average_pairwise_similarity(seqs) == pytest.approx(1 / 3)
    assert average_pairwise_similarity(seqs, sub_cost=1) == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert math.isnan(average_pairwise_similarity([[1, 2]]))


def test_jaccard() -> None:
    assert jaccard({1, 2, 3}, [3, 2, 1]) == 1.0
    assert jaccard([1, 2], [3, 4]) == 0.0
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5
    assert jaccard([], []) == 1.0
    assert total_jaccard([[1, 2, 3], [1, 2, 3]]) == 1.0
    assert total_jaccard([[1, 2], [3, 4]]) == 0.0
    assert total_jaccard([[1, 2, 3], [2, 3, 4], [3, 4, 5]]) == pytest.approx(1 / 5)
    assert total_jaccard([np.array([0, 1]), np.array([1, 0])]) == 1.0
    assert math.isnan(total_jaccard([]))


def test_spearman_worked_examples() -> None:
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 9]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # no ties: Eq. 6, d = (0, 1, -1, 0) -> 1 - 6 * 2 / (64 - 4) = 0.8
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    # ties: average ranks (1, 2, 3.5, 5, 3.5) -> Pearson of ranks = 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_borda_worked_example() -> None:
    rankings = [[0, 1, 2], [1, 0, 3], [1, 2, 0]]
    # rank 1 -> 3 votes, rank 2 -> 2, rank 3 -> 1
    votes = borda_votes(rankings, n=5)
    assert votes.tolist() == [6.0, 8.0, 3.0, 1.0, 0.0]
    assert borda_votes(np.array(rankings), n=5).tolist() == votes.tolist()
    assert borda_top_k(votes, 2).tolist() == [1, 0]
    # ties broken by the tie-break score (mean φ), then by index
    tied = np.array([2.0, 5.0, 2.0, 2.0])
    assert borda_top_k(tied, 3, tie_break=[0.1, 0.0, 0.3, 0.2]).tolist() == [1, 2, 3]
    assert borda_top_k(tied, 3).tolist() == [1, 0, 2]
    assert rank_order([1.0, 3.0, 2.0]).tolist() == [1, 2, 0]
    with pytest.raises(UserError):
        borda_votes([[1, 1]], n=3)
