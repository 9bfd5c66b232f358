"""The stats module against closed forms, scipy and coverage on seeded samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from robustdissect.errors import UserError
from robustdissect.stats import (
    kendall,
    newcombe_interval,
    percentile_interval,
    proportion_interval,
    resample_indices,
    spearman,
    t_interval,
    wilson_interval,
)


def test_wilson_known_counts() -> None:
    # 81 of 263 (Newcombe 1998, Table I example): 0.2553 to 0.3662
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=5e-5) and hi == pytest.approx(0.3662, abs=5e-5)
    # closed form for k = 0: (0, z² / (n + z²))
    z = 1.96
    assert wilson_interval(0, 10) == pytest.approx((0.0, z * z / (10 + z * z)))
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] == pytest.approx(10 / (10 + z * z))
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    p, lo, hi = proportion_interval(45, 50)
    assert p == 0.9 and (lo, hi) == wilson_interval(45, 50) and lo < 0.9 < hi
    assert all(math.isnan(v) for v in proportion_interval(0, 0))
    for n in range(1, 1001):  # the bounds hold p at 0 and n successes too (rounding once put them past it)
        for k in (0, n):
            p, lo, hi = proportion_interval(k, n)
            assert lo <= p <= hi, (k, n)


def test_newcombe_known_answer() -> None:
    # Newcombe 1998, Table II example (a): 56/70 vs 48/80 -> 0.0524 to 0.3339 (method 10)
    p1, p2 = 56 / 70, 48 / 80
    lo, hi = newcombe_interval(p1, wilson_interval(56, 70), p2, wilson_interval(48, 80))
    assert lo == pytest.approx(0.0524, abs=5e-4) and hi == pytest.approx(0.3339, abs=5e-4)
    lo0, hi0 = newcombe_interval(0.5, wilson_interval(50, 100), 0.5, wilson_interval(50, 100))
    assert lo0 == pytest.approx(-hi0) and hi0 > 0


def test_t_interval_matches_scipy() -> None:
    v = [0.1, 0.4, -0.2, 0.3, 0.05]
    mean, lo, hi = t_interval(v, level=0.9)
    ref = sps.t.interval(0.9, len(v) - 1, loc=np.mean(v), scale=sps.sem(v))
    assert mean == pytest.approx(np.mean(v)) and (lo, hi) == pytest.approx(ref)
    m1, lo1, hi1 = t_interval([2.0])
    assert m1 == 2.0 and math.isnan(lo1) and math.isnan(hi1)
    assert math.isnan(t_interval([])[0])


def test_bootstrap_interval_covers_the_mean_of_normal_samples() -> None:
    rng = np.random.default_rng(0)
    covered, trials, n = 0, 200, 60
    for t in range(trials):
        x = rng.normal(3.0, 2.0, n)
        idx = resample_indices(n, 400, seed=t)
        lo, hi = percentile_interval(x[idx].mean(1))
        covered += lo <= 3.0 <= hi
    # nominal 95%; the percentile bootstrap of a mean at n = 60 is slightly narrow
    assert 0.88 <= covered / trials <= 0.99


def test_percentile_interval_and_resamples() -> None:
    v = np.arange(101, dtype=np.float64)
    assert percentile_interval(v, 0.9) == pytest.approx((5.0, 95.0))
    assert percentile_interval([math.nan, 1.0, math.inf, 3.0], 0.5) == pytest.approx((1.5, 2.5))
    assert all(math.isnan(x) for x in percentile_interval([math.nan]))
    assert percentile_interval(torch.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    with pytest.raises(UserError):
        percentile_interval(v, 1.0)
    a = resample_indices(17, 5, seed=3)
    assert a.shape == (5, 17) and a.min() >= 0 and a.max() < 17
    assert np.array_equal(a, resample_indices(17, 5, seed=3))
    # each row is the next draw of the seeded generator (rows do not depend on how many are drawn)
    assert np.array_equal(resample_indices(17, 2, seed=3), a[:2])
    g = torch.Generator().manual_seed(3)
    drawn = torch.randint(0, 17, (5, 17), generator=g)
    assert np.array_equal(resample_indices(17, 5, seed=3, generator="torch"), drawn)
    assert resample_indices(4, 0, seed=0).shape == (0, 4)


def test_rank_correlations_match_scipy() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=30), rng.normal(size=30)
    b[:5] = b[5]  # ties
    assert spearman(a, b) == pytest.approx(sps.spearmanr(a, b).statistic)
    assert kendall(a, b) == pytest.approx(sps.kendalltau(a, b).statistic)
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert kendall([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(4 / 6)
    assert kendall([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(kendall([1, 2, 3], [5, 5, 5]))
    assert math.isnan(spearman([1.0], [2.0]))
    with pytest.raises(UserError):
        spearman([1, 2], [1, 2, 3])
