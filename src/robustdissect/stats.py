"""The project's interval estimates and rank correlations, one function each.

- `wilson_interval`, `proportion_interval`: a proportion k / n with its Wilson score interval
  (Wilson 1927), e.g. an accuracy over N test images.
- `newcombe_interval`: a difference of two proportions from their Wilson intervals (Newcombe 1998,
  method 10, the hybrid score interval).
- `t_interval`: the mean of a few values (e.g. paired differences over training seeds) with its
  Student t interval.
- `resample_indices`, `percentile_interval`: the percentile bootstrap (Efron & Tibshirani 1993):
  seeded resamples of N items with replacement, and the interval between the (1 − level) / 2 and
  (1 + level) / 2 quantiles of a statistic's replicates.
- `spearman`, `kendall`: rank correlations with average ranks for ties (NaN when either side is
  constant, where the coefficient is undefined).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy import stats as _scipy_stats

from .errors import UserError

__all__ = [
    "kendall",
    "newcombe_interval",
    "percentile_interval",
    "proportion_interval",
    "resample_indices",
    "spearman",
    "t_interval",
    "wilson_interval",
]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (low, high) of the proportion successes / n (z = 1.96: 95%);
    (nan, nan) when n = 0."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def proportion_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """(successes / n, Wilson low, Wilson high), low <= p <= high; all NaN when n = 0."""
    lo, hi = wilson_interval(successes, n, z)
    if not n:
        return math.nan, lo, hi
    p = successes / n
    return p, min(lo, p), max(hi, p)  # rounding can put a bound a hair past p at 0 or n successes


def newcombe_interval(p1: float, ci1: Sequence[float], p2: float, ci2: Sequence[float]) -> tuple[float, float]:
    """Newcombe's hybrid score interval (low, high) for p1 − p2 from the two proportions' Wilson
    intervals ci1, ci2 (independent samples; conservative when both were measured on the same
    items)."""
    d = p1 - p2
    lo = d - math.sqrt((p1 - ci1[0]) ** 2 + (ci2[1] - p2) ** 2)
    hi = d + math.sqrt((ci1[1] - p1) ** 2 + (p2 - ci2[0]) ** 2)
    return lo, hi


def t_interval(values: ArrayLike, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student t interval of the mean of values (n,); (mean, nan, nan) with
    fewer than 2 values (mean nan with none)."""
    d = np.asarray(values, dtype=np.float64).ravel()
    mean = float(d.mean()) if d.size else math.nan
    if d.size < 2:
        return mean, math.nan, math.nan
    half = float(_scipy_stats.t.ppf((1 + level) / 2, d.size - 1)) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return mean, mean - half, mean + half


def resample_indices(
    n: int, resamples: int, seed: int, generator: Literal["numpy", "torch"] = "numpy"
) -> NDArray[np.int64]:
    """Bootstrap resamples (resamples, n) of the positions 0..n−1, drawn with replacement.

    Row b is the b-th draw of a seeded numpy `default_rng` (generator="numpy") or of a seeded
    `torch.Generator` ("torch"): the two give different draws, and the analyses whose shipped
    results were drawn with torch's (feature shares, reliance shift) keep it so those results
    reproduce. The same seed gives the same rows whatever the statistic, so replicates of two
    models scored on the same items are paired."""
    if n < 0 or resamples < 0:
        raise UserError(f"bootstrap needs n >= 0 and resamples >= 0, got {n} and {resamples}")
    if generator == "torch":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, max(n, 1), (resamples, n), generator=g).numpy().astype(np.int64)
    rng = np.random.default_rng(seed)
    return np.asarray(rng.integers(0, max(n, 1), (resamples, n)), dtype=np.int64)


def percentile_interval(replicates: ArrayLike | torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of a statistic's replicates (B,): their
    (1 − level) / 2 and (1 + level) / 2 quantiles (linear interpolation), over the finite
    replicates only (a resample can leave the statistic undefined); (nan, nan) when none is."""
    if not 0.0 < level < 1.0:
        raise UserError(f"interval level must lie in (0, 1), got {level}")
    if isinstance(replicates, torch.Tensor):
        replicates = replicates.detach().cpu().double().numpy()
    v = np.asarray(replicates, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if not v.size:
        return math.nan, math.nan
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _rank_correlation(method: str, a: ArrayLike, b: ArrayLike) -> float:
    """scipy's spearmanr ("spearman") or kendalltau ("kendall") statistic of a (n,) and b (n,);
    NaN when either side is constant or n < 2 (the coefficient is undefined)."""
    xa, xb = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if xa.shape != xb.shape:
        raise UserError(f"{method} needs inputs of equal length, got {xa.size} and {xb.size}")
    if xa.size < 2 or np.all(xa == xa[0]) or np.all(xb == xb[0]):
        return math.nan
    test = _scipy_stats.spearmanr if method == "spearman" else _scipy_stats.kendalltau
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(test(xa, xb).statistic)


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman's rank correlation of a (n,) and b (n,) with average ranks for ties (as
    scipy.stats.spearmanr); NaN when either side is constant or n < 2."""
    return _rank_correlation("spearman", a, b)


def kendall(a: ArrayLike, b: ArrayLike) -> float:
    """Kendall's τ-b of a (n,) and b (n,) (ties counted as scipy.stats.kendalltau does); NaN when
    either side is constant or n < 2."""
    return _rank_correlation("kendall", a, b)
