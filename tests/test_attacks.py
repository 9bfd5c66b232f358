"""Exact steps on a linear model, projection properties, corruptions, ensemble and masking checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import Tensor, nn

import robustdissect as rd
from robustdissect.attacks import (
    APGD,
    CW,
    FGSM,
    JPEG,
    PGD,
    Brightness,
    Contrast,
    GaussianBlur,
    GaussianNoise,
    ImpulseNoise,
    OutputRandomness,
    SampleRandom,
    ShotNoise,
    check_black_box_vs_white_box,
    check_large_eps,
    check_more_steps,
    check_random_output,
    check_zero_gradients,
    get_threat,
    make_attack,
    masking_checks,
    output_randomness,
    worst_case,
    zero_gradient_share,
)
from robustdissect.data import Dataset
from robustdissect.errors import UserError

# ---------------------------------------------------------------- exact values on a linear model
# z = W x for a 2x2 image flattened to (x1, x2, x3, x4); label y = 1.
# dCE/dx = W^T (p - e_1) = p0 (W0 - W1) = p0 * (2, -3, 0.5, -3): sign (+, -, +, -).
W = torch.tensor([[1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, 0.0, 3.0]])
X = torch.tensor([0.2, 0.95, 0.9, 0.0]).view(1, 1, 2, 2)
Y = torch.tensor([1])


def linear_model() -> nn.Module:
    fc = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        fc.weight.copy_(W)
    return nn.Sequential(nn.Flatten(), fc).eval()


def _close(a: Tensor, values: list[float]) -> None:
    torch.testing.assert_close(a.flatten(), torch.tensor(values), atol=1e-6, rtol=0)


def test_fgsm_matches_hand_computation() -> None:
    res = FGSM(eps=0.1)(linear_model(), X, Y)
    # x + 0.1 * (+1, -1, +1, -1), clipped: 0.9 + 0.1 = 1.0, 0.0 - 0.1 -> 0.0
    _close(res.x_adv, [0.3, 0.85, 1.0, 0.0])
    # logits at x': z0 = 0.3 - 1.7 + 0.5 = -0.9, z1 = -0.3 + 0.85 = 0.55
    _close(res.logits, [-0.9, 0.55])
    assert not bool(res.success[0])


def test_fgsm_targeted_descends_towards_target() -> None:
    res = FGSM(eps=0.1)(linear_model(), X, Y, targets=torch.tensor([0]))
    _close(res.x_adv, [0.3, 0.85, 1.0, 0.0])  # towards class 0 = away from class 1 here


def test_pgd_linf_steps_match_hand_computation() -> None:
    model = linear_model()
    one = PGD(eps=0.3, steps=1, alpha=0.1, random_start=False)(model, X, Y)
    _close(one.x_adv, [0.3, 0.85, 1.0, 0.0])
    # two steps of 0.1 in the ball of 0.15: (0.4, 0.75, 1.0, 0.0) projected -> (0.35, 0.8, 1.0, 0.0)
    two = PGD(eps=0.15, steps=2, alpha=0.1, random_start=False)(model, X, Y)
    _close(two.x_adv, [0.35, 0.8, 1.0, 0.0])


def test_pgd_l2_step_matches_hand_computation() -> None:
    g = torch.tensor([2.0, -3.0, 0.5, -3.0])
    unit = g / math.sqrt(4 + 9 + 0.25 + 9)  # ||g|| = 4.71699...
    res = PGD(eps=1.0, norm="l2", steps=1, alpha=0.1, random_start=False)(linear_model(), X, Y)
    expected = (X.flatten() + 0.1 * unit).clamp(0, 1)
    _close(res.x_adv, expected.tolist())
    assert float(res.x_adv[0, 0, 1, 1]) == 0.0  # clipped at the box


def test_pgd_step_rules() -> None:
    assert PGD(eps=0.1, steps=10).alpha == pytest.approx(0.1 / math.sqrt(10))
    assert PGD(eps=0.1, steps=20, step_rule="madry").alpha == pytest.approx(2.5 * 0.1 / 20)
    assert PGD(eps=0.1, steps=20, alpha=0.01).alpha == 0.01
    assert PGD(eps=0.1).name == "pgd-linf" and PGD(eps=1.5, norm="l2").name == "pgd-l2"
    assert rd.attacks.PGDL2().eps == 1.5 and rd.attacks.PGDLinf().eps == 0.1


def test_pgd_keeps_best_iterate() -> None:
    """With a huge step that overshoots back and forth, the best (successful) iterate is kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(32, 1, 4, 4)
    y = torch.randint(0, 3, (32,))
    res = PGD(eps=0.3, steps=5, keep="best")(model, x, y)
    last = PGD(eps=0.3, steps=5, keep="last")(model, x, y)
    assert res.success_rate >= last.success_rate
    first = PGD(eps=0.3, steps=5, keep="first")(model, x, y)
    assert first.success_rate == res.success_rate


# ---------------------------------------------------------------- projections (hypothesis)
def _batch(draw: st.DrawFn, dtype: type) -> tuple[Tensor, Tensor, float]:
    n = draw(st.integers(1, 3))
    shape = (n, draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    x = draw(arrays(dtype, shape, elements=st.floats(0, 1, width=32)))
    v = draw(arrays(dtype, shape, elements=st.floats(-2, 3, width=32)))
    eps = draw(st.one_of(st.just(0.0), st.floats(1e-4, 3.0)))
    return torch.from_numpy(x), torch.from_numpy(v), eps


@st.composite
def batches(draw: st.DrawFn) -> tuple[Tensor, Tensor, float]:
    return _batch(draw, draw(st.sampled_from([np.float32, np.float64])))


@pytest.mark.parametrize("norm", ["linf", "l2"])
@settings(max_examples=150, deadline=None)
@given(case=batches())
def test_projection_idempotent_and_inside(norm: str, case: tuple[Tensor, Tensor, float]) -> None:
    x, v, eps = case
    threat = get_threat(norm)
    p = threat.project(v, x, eps)
    assert p.dtype == v.dtype and p.shape == v.shape
    assert torch.equal(threat.project(p, x, eps), p), "projection must be idempotent"
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    assert float(threat.distance(p, x).max()) <= eps + 1e-6
    # points already inside are left alone, bitwise
    assert torch.equal(threat.project(x, x, eps), x)
    delta = threat.project_delta(v - x, x, eps)
    assert float(threat.distance(x + delta, x).max()) <= eps + 1e-5


@pytest.mark.parametrize("norm", ["linf", "l2"])
@settings(max_examples=60, deadline=None)
@given(case=batches(), seed=st.integers(0, 2**31))
def test_random_start_lands_in_ball(norm: str, case: tuple[Tensor, Tensor, float], seed: int) -> None:
    x, _, eps = case
    threat = get_threat(norm)
    r = threat.random_start(x, eps, SampleRandom.for_images(x.shape[0], seed, x.device))
    assert float(r.min()) >= 0.0 and float(r.max()) <= 1.0
    assert float(threat.distance(r, x).max()) <= eps + 1e-6
    again = threat.random_start(x, eps, SampleRandom.for_images(x.shape[0], seed, x.device))
    assert torch.equal(r, again)


def test_l2_projection_is_radial_inside_the_box() -> None:
    x = torch.full((1, 1, 2, 2), 0.5)
    v = x + torch.tensor([0.3, 0.0, -0.4, 0.0]).view(1, 1, 2, 2)  # ||delta|| = 0.5
    p = get_threat("l2").project(v, x, 0.25)
    torch.testing.assert_close((p - x).flatten(), torch.tensor([0.15, 0.0, -0.2, 0.0]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- corruptions
def _images(n: int = 8, c: int = 1, size: int = 16) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, c, size, size, generator=g)


class _Const(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, :3]


def test_gaussian_noise_levels_and_quantisation() -> None:
    assert GaussianNoise(1).sigma == 0.04 and GaussianNoise(5).sigma == 0.10
    assert GaussianNoise(3, scale="fmnist").sigma == 0.255
    assert GaussianNoise(4, scale="cifar").sigma == 0.09
    assert GaussianNoise(2, sigma=0.5).sigma == 0.5
    x = torch.full((64, 1, 16, 16), 0.5)
    out = GaussianNoise(1, scale="fmnist")(_Const(), x, torch.zeros(64, dtype=torch.long)).x_adv
    assert torch.equal(torch.round(out * 255) / 255, out)
    assert float((out - x).std()) == pytest.approx(0.128, rel=0.05)
    raw = GaussianNoise(1, quantize=False)(_Const(), x, torch.zeros(64, dtype=torch.long)).x_adv
    assert float((raw - x).std()) == pytest.approx(0.04, rel=0.05)


def test_shot_and_impulse_noise_statistics() -> None:
    x = torch.full((64, 1, 16, 16), 0.4)
    y = torch.zeros(64, dtype=torch.long)
    shot = ShotNoise(5, quantize=False)(_Const(), x, y).x_adv  # Poisson(20) / 50
    assert float(shot.mean()) == pytest.approx(0.4, abs=0.01)
    assert float(shot.var()) == pytest.approx(0.4 / 50, rel=0.1)
    imp = ImpulseNoise(5)(_Const(), x, y).x_adv
    changed = (imp != x).float().mean()
    assert float(changed) == pytest.approx(0.07, abs=0.01)
    assert set(torch.unique(imp[imp != x]).tolist()) <= {0.0, 1.0}


def test_blur_contrast_brightness_jpeg() -> None:
    y = torch.zeros(8, dtype=torch.long)
    flat = torch.full((8, 1, 16, 16), 0.3)
    assert torch.allclose(GaussianBlur(5, quantize=False)(_Const(), flat, y).x_adv, flat, atol=1e-6)
    x = _images()
    blurred = GaussianBlur(5, quantize=False)(_Const(), x, y).x_adv
    assert float(blurred.std()) < float(x.std())
    torch.testing.assert_close(blurred.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.02, rtol=0)
    low = Contrast(5, quantize=False)(_Const(), x, y).x_adv
    torch.testing.assert_close(low.std(dim=(2, 3)), 0.15 * x.std(dim=(2, 3)), atol=1e-5, rtol=1e-4)
    bright = Brightness(2, quantize=False)(_Const(), x, y).x_adv
    torch.testing.assert_close(bright, (x + 0.1).clamp(0, 1), atol=1e-6, rtol=0)
    rgb = _images(4, 3)
    brgb = Brightness(3, quantize=False)(_Const(), rgb, y[:4]).x_adv
    v, v2 = rgb.amax(1), brgb.amax(1)
    torch.testing.assert_close(v2, (v + 0.15).clamp(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(brgb / v2[:, None], rgb / v[:, None], atol=1e-5, rtol=1e-5)  # hue/saturation kept
    for c in (1, 3):
        img = _images(2, c, 28)
        j1 = JPEG(1)(_Const(), img, y[:2]).x_adv
        j5 = JPEG(5)(_Const(), img, y[:2]).x_adv
        assert float((j5 - img).abs().mean()) > float((j1 - img).abs().mean()) > 0
    with pytest.raises(UserError, match="channels"):
        JPEG(3)(_Const(), _images(2, 2), y[:2])


def test_corruptions_have_no_ball() -> None:
    for name in ("gaussian-noise", "jpeg", "contrast"):
        a = make_attack(name, severity=2)
        assert a.norm is None and math.isinf(a.eps) and not a.adversarial and not a.white_box


# ---------------------------------------------------------------- worst-case ensemble
@pytest.fixture
def small() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.rand(40, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:5] = (y[:5] + 1) % 4
    return model, x, y


def test_worst_case_cascade(small: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = small
    attacks = [FGSM(eps=0.02), PGD(eps=0.02, steps=5), APGD(eps=0.02, steps=10)]
    res = worst_case(model, x, y, attacks, seed=1)
    assert res.clean_accuracy == pytest.approx(35 / 40)
    alone = [a(model, x, y, seed=1).robust_accuracy for a in attacks]
    assert res.worst_case_accuracy <= min(alone) + 1e-9
    cum = [s.cumulative_accuracy for s in res.per_attack]
    assert cum == sorted(cum, reverse=True) and cum[-1] == res.worst_case_accuracy
    assert res.per_attack[0].n_attacked == 35
    for prev, cur in zip(res.per_attack, res.per_attack[1:], strict=False):
        assert cur.n_attacked == prev.n_attacked - prev.n_broken
    assert int((res.broken_by == -2).sum()) == 5
    assert torch.equal(res.robust, res.broken_by == -1)
    assert float((res.x_adv - x).abs().max()) <= 0.02 + 1e-6
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert torch.equal(pred == y, res.robust)  # every broken point's x_adv is misclassified
    d = res.describe()
    assert d["worst_case_accuracy"] == res.worst_case_accuracy and len(d["attacks"]) == 3


def test_worst_case_accepts_names(small: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = small
    res = worst_case(model, x, y, ["fgsm"])
    assert res.per_attack[0].name == "fgsm"
    with pytest.raises(UserError):
        worst_case(model, x, y, [])


# ---------------------------------------------------------------- gradient-masking checks
def test_masking_checks_on_numbers() -> None:
    w = check_black_box_vs_white_box(
        {"pgd-linf": 0.40, "spsa": 0.20, "fgsm": 0.5}, {"pgd-linf": True, "spsa": False, "fgsm": True}
    )
    assert len(w) == 1 and "spsa" in w[0] and "20.0%" in w[0] and "40.0%" in w[0]
    assert not check_black_box_vs_white_box({"pgd-linf": 0.1, "spsa": 0.3}, {"pgd-linf": True, "spsa": False})
    w = check_large_eps({0.1: 0.5, 0.2: 0.4, 0.5: 0.35})
    assert len(w) == 1 and "35.0%" in w[0] and "eps=0.5" in w[0]
    w = check_large_eps({0.1: 0.2, 0.2: 0.3, 0.5: 0.0})
    assert len(w) == 1 and "rises" in w[0]
    assert not check_large_eps({0.1: 0.3, 0.2: 0.1, 0.5: 0.0})
    w = check_more_steps({1: 0.40, 10: 0.40, 30: 0.399})
    assert len(w) == 1 and "PGD-30" in w[0] and "40.0%" in w[0]
    assert "more robust" in check_more_steps({1: 0.30, 30: 0.35})[0]
    assert not check_more_steps({1: 0.4, 30: 0.1})
    assert not check_more_steps({1: 0.0, 30: 0.0})  # already broken: nothing to learn
    w = check_random_output(OutputRandomness(1e-3, 0.2, 0.95, 0.5))
    assert len(w) == 3 and "20.0%" in w[1] and "0.95" in w[2]
    assert not check_random_output(OutputRandomness(1e-3, 0.0, 0.1, 0.0))


def test_output_randomness_detects_stochastic_model(small: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, _ = small
    stats = output_randomness(model, x)
    assert stats.repeat_max_diff == 0.0 and stats.flip_rate < 0.05

    class Noisy(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return model(x) + torch.randn(x.shape[0], 4) * 10

    noisy = output_randomness(Noisy(), x)
    assert noisy.repeat_max_diff > 1 and noisy.flip_rate > 0.2
    assert check_random_output(noisy)


def test_masking_checks_flag_a_masked_model(small: tuple[nn.Module, Tensor, Tensor]) -> None:
    """A model that quantises its input (zero gradient everywhere) trips the checks."""
    model, x, y = small

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(torch.round(x * 4) / 4)

    report = masking_checks(Masked(), x, y, eps=0.03, steps_values=(1, 5), seed=0)
    assert any("eps=" in w for w in report.warnings)
    assert report.zero_gradient_share == 1.0  # rounding has a zero gradient everywhere
    clean = masking_checks(model, x, y, eps=0.3, steps_values=(1, 5), seed=0)
    assert not any("eps=" in w for w in clean.warnings)
    assert clean.zero_gradient_share == 0.0 and not any("input gradient" in w for w in clean.warnings)


def test_zero_gradient_check_catches_a_saturated_softmax(fmnist: Dataset, shipped_vanilla: nn.Module) -> None:
    """Logits scaled by 1e4 keep every prediction but saturate the float32 softmax: CE's input
    gradient is exactly zero on the confidently correct samples, and the check must say so."""
    x, y = fmnist.test.x[:200], fmnist.test.y[:200]

    class Saturated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = shipped_vanilla

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x) * 1e4

    share = zero_gradient_share(Saturated(), x, y)
    correct = float((shipped_vanilla(x).argmax(1) == y).float().mean())
    assert 0.5 < share <= correct  # most correct samples saturate; no misclassified one can
    assert check_zero_gradients(share) and "zero (or non-finite) input gradient" in check_zero_gradients(share)[0]
    assert zero_gradient_share(shipped_vanilla, x, y) == 0.0
    assert check_zero_gradients(0.0) == []


# ---------------------------------------------------------------- registry and API
def test_registry_and_public_api() -> None:
    names = rd.attacks.ATTACKS.names()
    assert "pgd-linf" in names and "cw-l2" in names
    with pytest.raises(UserError, match="did you mean"):
        make_attack("pgd-lnf")
    assert isinstance(make_attack("pgd-l2", eps=0.5), PGD)
    assert make_attack("apgd-dlr", norm="l2").norm == "l2"
    assert CW().eps == math.inf and CW(eps=1.0).eps == 1.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(4, 1, 4, 4)
    res = rd.attacks.PGD(eps=0.1)(model, x, torch.zeros(4, dtype=torch.long))
    assert res.x_adv.shape == x.shape


# ---------------------------------------------------------------- cost: no redundant forwards
class _Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.images = 0
        self.with_grad = 0

    def forward(self, x: Tensor) -> Tensor:
        self.images += x.shape[0]
        self.with_grad += x.shape[0] if x.requires_grad else 0
        return self.inner(x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_costs_k_gradients_plus_one_forward(norm: str, small: tuple[nn.Module, Tensor, Tensor]) -> None:
    model, x, y = small
    counting = _Counting(model)
    k = 7
    res = PGD(eps=0.05 if norm == "linf" else 0.5, norm=norm, steps=k)(counting, x, y)
    failed = int((~res.success).sum())
    n = x.shape[0]
    assert counting.with_grad == k * n  # one forward+backward per step
    # + one forward on the last iterate, the one-image probe, and the clean check of failed points
    assert counting.images <= (k + 1) * n + 1 + failed
    counting.images = counting.with_grad = 0
    FGSM(eps=0.05)(counting, x, y)
    assert counting.with_grad == n and counting.images <= 2 * n + 1


# ---------------------------------------------------------------- early stop on the shipped model
@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_pgd_early_stop_same_verdicts_fewer_forwards(eps: float, fmnist: Dataset, shipped_vanilla: nn.Module) -> None:
    """Dropping a sample at its first successful iterate changes no per-sample verdict of PGD with
    keep="best", keeps every point in B(x, eps) ∩ [0, 1], and forwards fewer images (at eps 0.1,
    where every sample falls within a few steps, also fewer calls)."""
    x, y = fmnist.test.x[:200], fmnist.test.y[:200]
    counts = {"calls": 0, "images": 0}

    def count(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        counts["calls"] += 1
        counts["images"] += inputs[0].shape[0]

    runs: dict[bool, tuple[rd.attacks.AttackResult, dict[str, int]]] = {}
    handle = shipped_vanilla.register_forward_pre_hook(count)
    try:
        for early_stop in (False, True):
            counts.update(calls=0, images=0)
            attack = PGD(eps, steps=10, step_rule="madry", keep="best", early_stop=early_stop)
            runs[early_stop] = attack(shipped_vanilla, x, y), dict(counts)
    finally:
        handle.remove()
    (full, full_counts), (stop, stop_counts) = runs[False], runs[True]

    assert torch.equal(stop.correct, full.correct)
    assert torch.equal(stop.success, full.success) and torch.equal(stop.success, ~stop.correct)
    assert stop.robust_accuracy == full.robust_accuracy
    clean = float((shipped_vanilla(x).argmax(1) == y).float().mean())
    if eps == 0.02:  # a mix of broken and robust samples, so the flags compare something
        assert 0.2 < stop.robust_accuracy < clean - 0.3
    else:
        assert stop.robust_accuracy == 0.0 and clean > 0.9
    assert torch.equal(stop.logits.argmax(1) == y, stop.correct)
    for res in (stop, full):
        assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
        assert float((res.x_adv - x).abs().amax()) <= eps + 1e-6

    assert stop_counts["images"] < full_counts["images"]
    assert stop_counts["calls"] <= full_counts["calls"]
    if eps == 0.1:
        assert stop_counts["calls"] < full_counts["calls"]
