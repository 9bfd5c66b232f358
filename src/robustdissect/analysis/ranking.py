"""Rank and set similarity of neuron lists: Levenshtein (Eqs. 7-9), Spearman (Eq. 6), Jaccard
(Eq. 10) and Borda voting (Eq. 5) of the neuron-sensitivity paper (METHODS §5.1, §5.5 items 1-2).

Sequences are ordered neuron ids (best first); sets ignore order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import UserError
from ..stats import spearman

__all__ = [
    "average_pairwise_similarity",
    "borda_top_k",
    "borda_votes",
    "jaccard",
    "levenshtein",
    "levenshtein_similarity",
    "rank_order",
    "spearman",
    "total_jaccard",
]

Encoding = Literal["tokens", "string"]
Ranked = Sequence[Hashable] | str | NDArray[np.generic]  # a ranking: neuron ids in order, or characters


def _encode(seq: Ranked, encoding: Encoding) -> list[Hashable]:
    if encoding == "tokens":
        if isinstance(seq, np.ndarray):
            return [v.item() if isinstance(v, np.generic) else v for v in seq.tolist()]
        return list(seq)
    if encoding == "string":
        if isinstance(seq, str):
            return list(seq)
        items = seq.tolist() if isinstance(seq, np.ndarray) else list(seq)
        return list(" ".join(str(v) for v in items))
    raise UserError(f"encoding must be 'tokens' or 'string', got {encoding!r}")


def levenshtein(
    a: Ranked,
    b: Ranked,
    sub_cost: int = 2,
    encoding: Encoding = "tokens",
) -> int:
    """Edit distance of Eq. 7 with insertions and deletions costing 1 and substitutions
    `sub_cost` (1: classic Levenshtein; 2: insert/delete distance, |a| + |b| - 2 LCS).

    `encoding="tokens"` compares elements (neuron ids; a str compares characters);
    `encoding="string"` joins ids with spaces and compares characters.
    """
    if sub_cost < 1:
        raise UserError(f"substitution cost must be a positive integer, got {sub_cost}")
    sa, sb = _encode(a, encoding), _encode(b, encoding)
    if not sa or not sb:
        return len(sa) + len(sb)
    ids: dict[Hashable, int] = {}
    ia = np.array([ids.setdefault(t, len(ids)) for t in sa], dtype=np.int64)
    ib = np.array([ids.setdefault(t, len(ids)) for t in sb], dtype=np.int64)
    j = np.arange(len(ib) + 1, dtype=np.int64)
    prev = j.copy()
    for i, ai in enumerate(ia, start=1):
        cand = np.empty_like(prev)
        cand[0] = i
        cand[1:] = np.minimum(prev[1:] + 1, prev[:-1] + np.where(ib == ai, 0, sub_cost))
        # insertions within the row: cur[j] = min_{i' <= j} cand[i'] + (j - i')
        prev = np.minimum.accumulate(cand - j) + j
    return int(prev[-1])


def levenshtein_similarity(
    a: Ranked,
    b: Ranked,
    sub_cost: int = 2,
    encoding: Encoding = "tokens",
) -> float:
    """Eq. 8: S = 1 - distance / (|a| + |b|) in [0, 1] (1 for two empty sequences).

    With sub_cost 2 this is python-Levenshtein's `ratio` (= 2 LCS / (|a| + |b|)); with sub_cost 1
    two disjoint sequences of equal length score 0.5."""
    la, lb = len(_encode(a, encoding)), len(_encode(b, encoding))
    if la + lb == 0:
        return 1.0
    return 1.0 - levenshtein(a, b, sub_cost, encoding) / (la + lb)


def average_pairwise_similarity(
    sequences: Sequence[Sequence[Hashable] | NDArray[np.generic]],
    sub_cost: int = 2,
    encoding: Encoding = "tokens",
) -> float:
    """Eq. 9: mean S over the M = Y(Y-1)/2 unordered pairs of sequences (NaN for fewer than 2)."""
    pairs = list(itertools.combinations(range(len(sequences)), 2))
    if not pairs:
        return math.nan
    sims = [levenshtein_similarity(sequences[i], sequences[j], sub_cost, encoding) for i, j in pairs]
    return float(np.mean(sims))


def _as_set(s: Iterable[Hashable] | NDArray[np.generic]) -> set[Hashable]:
    if isinstance(s, np.ndarray):
        return set(s.tolist())
    return set(s)


def jaccard(a: Iterable[Hashable], b: Iterable[Hashable]) -> float:
    """|a ∩ b| / |a ∪ b| (1 for two empty sets)."""
    sa, sb = _as_set(a), _as_set(b)
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


def total_jaccard(sets: Sequence[Iterable[Hashable]]) -> float:
    """Eq. 10: |∩_y Ω^y| / |∪_y Ω^y| over all sets (NaN when none are given)."""
    if not sets:
        return math.nan
    ss = [_as_set(s) for s in sets]
    union = set().union(*ss)
    if not union:
        return 1.0
    return len(set.intersection(*ss)) / len(union)


def rank_order(primary: ArrayLike, tie_break: ArrayLike | None = None) -> NDArray[np.int64]:
    """Indices sorted by `primary` descending, then `tie_break` descending, then index ascending."""
    p = np.asarray(primary, dtype=np.float64).ravel()
    idx = np.arange(p.size)
    if tie_break is None:
        return np.lexsort((idx, -p)).astype(np.int64)
    t = np.asarray(tie_break, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise UserError("tie-break scores must have one value per element")
    return np.lexsort((idx, -t, -p)).astype(np.int64)


def borda_votes(rankings: Iterable[Sequence[int]] | NDArray[np.integer], n: int) -> NDArray[np.float64]:
    """Eq. 5 votes: in each ranking of length k the element at rank r (1-based) gets k - r + 1
    votes; returns the summed votes per element, shape (n,)."""
    votes = np.zeros(n, dtype=np.float64)
    if isinstance(rankings, np.ndarray):
        if rankings.ndim != 2:
            raise UserError(f"rankings must be (N, k), got shape {rankings.shape}")
        if rankings.size == 0:
            return votes
        k = rankings.shape[1]
        w = np.broadcast_to(np.arange(k, 0, -1, dtype=np.float64), rankings.shape)
        np.add.at(votes, rankings.ravel(), w.ravel())
        return votes
    for r in rankings:
        items = list(r)
        if len(set(items)) != len(items):
            raise UserError("a ranking lists the same element twice")
        k = len(items)
        for pos, item in enumerate(items):
            votes[int(item)] += k - pos
    return votes


def borda_top_k(votes: ArrayLike, k: int, tie_break: ArrayLike | None = None) -> NDArray[np.int64]:
    """The k elements with most votes, best first; ties by `tie_break` (e.g. mean φ) descending,
    then by the smaller index."""
    order = rank_order(votes, tie_break)
    return order[: max(0, min(k, order.size))]
