"""Robustness metric Ψ and input-space landscapes (METHODS §2.2, §2.3, §2.5)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustdissect.analysis.landscape import decision_margin, landscape
from robustdissect.analysis.metric import (
    DEFAULT_STEPS,
    calibrate_temperature,
    clear_calibration_cache,
    kl_divergence,
    metric_attack,
    model_temperature,
    robustness_metric,
)
from robustdissect.attacks import PGD
from robustdissect.data import Dataset
from robustdissect.errors import UserError


class SmallConv(nn.Module):
    """1x8x8 -> conv(6) -> relu -> conv(6) -> relu -> gap -> fc(4)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class Constant(nn.Module):
    """Logits that do not depend on the input: (N, K) copies of `values`."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = nn.Parameter(torch.tensor(values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values.expand(len(x), -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)


class Counting(nn.Module):
    """Counts forward calls of the wrapped model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


@pytest.fixture
def net_and_x() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = SmallConv().eval()  # small logits: far from saturation, so raw KL grows with their scale
    x = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return net, x


def _scaled_last_layer(net: nn.Module, factor: float) -> nn.Module:
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.fc.weight.mul_(factor)
        other.fc.bias.mul_(factor)
    return other


@pytest.mark.parametrize("steps", [None, 10])  # None: the default K = 5
def test_calibrated_psi_is_invariant_to_scaling_the_logits(
    net_and_x: tuple[nn.Module, torch.Tensor], steps: int | None
) -> None:
    net, x = net_and_x
    big = _scaled_last_layer(net, 10.0)
    kw: dict = {"eps": 0.1, "seed": 0, **({"steps": steps} if steps else {})}
    cal = robustness_metric(net, x, **kw)
    cal_big = robustness_metric(big, x, **kw)
    assert cal.calibrated and cal_big.calibrated
    assert cal.temperature is not None and cal_big.temperature is not None
    assert cal_big.temperature == pytest.approx(10.0 * cal.temperature, rel=1e-4)
    assert cal.mean > 1e-3
    assert cal_big.mean == pytest.approx(cal.mean, rel=2e-2)
    assert cal_big.p90 == pytest.approx(cal.p90, rel=2e-2)
    norm = robustness_metric(net, x, calibration="logit_norm", **kw)
    norm_big = robustness_metric(big, x, calibration="logit_norm", **kw)
    assert norm_big.mean == pytest.approx(norm.mean, rel=2e-2)
    raw = robustness_metric(net, x, calibration="none", **kw)
    raw_big = robustness_metric(big, x, calibration="none", **kw)
    assert raw_big.mean > 10.0 * raw.mean  # raw KL grows with the logit scale


def test_psi_is_nonnegative_and_zero_for_a_constant_model(net_and_x: tuple[nn.Module, torch.Tensor]) -> None:
    net, x = net_and_x
    r = robustness_metric(net, x, eps=0.05, steps=5)
    assert r.psi.shape == (len(x),)
    assert bool((r.psi >= 0).all())
    assert r.mean == pytest.approx(float(r.psi.mean()))
    assert r.p90 == pytest.approx(float(torch.quantile(r.psi.double(), 0.9)), rel=1e-6)
    for values in ([0.5, 2.0, -1.0, 0.0], [1.0, 1.0, 1.0, 1.0]):
        const = Constant(values)
        for calibration in ("temperature", "none", "logit_norm"):
            c = robustness_metric(const, x, eps=0.1, steps=5, calibration=calibration)
            assert torch.equal(c.psi, torch.zeros(len(x))), (values, calibration)
            assert c.flipped == 0.0
        assert robustness_metric(const, x).psi.eq(0).all()  # default K, temperature
    tied = robustness_metric(Constant([1.0, 1.0, 1.0, 1.0]), x, eps=0.1, steps=3)
    assert not tied.calibrated  # every T gives max-softmax 1/4: the target 0.9 is out of reach
    assert robustness_metric(net, x, eps=0.0, steps=3).mean == 0.0  # eps = 0: x' = x


def test_temperature_calibration_hits_the_target() -> None:
    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(0)) * 3
    t, ok = calibrate_temperature(logits, 0.9)
    assert ok
    conf = float(F.softmax(logits / t, dim=1).amax(1).mean())
    assert conf == pytest.approx(0.9, abs=1e-6)
    t10, _ = calibrate_temperature(10 * logits, 0.9)
    assert t10 == pytest.approx(10 * t, rel=1e-6)
    with pytest.raises(UserError):
        calibrate_temperature(logits, 1.5)


def test_kl_divergence_matches_the_definition() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    p, q = F.softmax(a, 1), F.softmax(b, 1)
    expected = (p * (p.log() - q.log())).sum(1)
    assert torch.allclose(kl_divergence(a, b), expected, atol=1e-6)
    assert torch.equal(kl_divergence(a, a), torch.zeros(5))


def test_max_loss_keeps_the_highest_kl_iterate(net_and_x: tuple[nn.Module, torch.Tensor]) -> None:
    """keep='max-loss' returns, per image, at least the divergence of keep='best' on the same
    trajectory (same seed and start), and is the metric's maximiser."""
    net, x = net_and_x
    y = net(x).argmax(1)
    p = F.softmax(net(x), 1).detach()

    def kl(x_adv: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (p * (p.log() - F.log_softmax(net(x_adv), 1))).sum(1)

    common = {"steps": 10, "alpha": 0.025, "loss": "kl", "random_start": "gaussian", "seed": 0}
    best = PGD(0.1, keep="best", **common)(net, x, y).x_adv
    top = PGD(0.1, keep="max-loss", **common)(net, x, y).x_adv
    assert bool((kl(top) >= kl(best) - 1e-6).all())
    m = metric_attack(0.1, steps=10)
    assert m.keep == "max-loss" and m.loss == "kl" and m.alpha == pytest.approx(0.025)
    assert metric_attack(0.1).steps == DEFAULT_STEPS == 5
    with pytest.raises(UserError, match="max-loss"):
        PGD(0.1, keep="max-loss", early_stop=True)


def test_default_psi_runs_no_extra_forward_and_caches_the_calibration(
    net_and_x: tuple[nn.Module, torch.Tensor],
) -> None:
    """One call: calibration (1 forward), clean logits (1), the attack's class probe (1) and KL
    clean probabilities (1), K gradient steps and the last iterate (1); the attack's clean check and
    ψ reuse logits already computed. A second call on the same weights and images skips the
    calibration; it gives the same Ψ."""
    net, x = net_and_x
    x_cal = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    counted = Counting(net)
    clear_calibration_cache()
    first = robustness_metric(counted, x, calibration_x=x_cal)
    assert first.steps == DEFAULT_STEPS
    assert counted.calls == DEFAULT_STEPS + 5
    assert not first.calibration_cached and 0 < first.calibration_seconds <= first.seconds
    counted.calls = 0
    again = robustness_metric(counted, x, calibration_x=x_cal)
    assert counted.calls == DEFAULT_STEPS + 4
    assert again.calibration_cached and again.calibration_seconds == 0.0
    assert again.temperature == first.temperature and torch.equal(again.psi, first.psi)
    counted.calls = 0
    robustness_metric(counted, x, calibration_x=x_cal, steps=20)  # K is an option; T still cached
    assert counted.calls == 20 + 4
    # the cache is off, or the images or the weights change: calibrated again
    counted.calls = 0
    off = robustness_metric(counted, x, calibration_x=x_cal, cache_calibration=False)
    assert counted.calls == DEFAULT_STEPS + 5 and not off.calibration_cached
    assert torch.equal(off.psi, first.psi)
    assert not robustness_metric(net, x, calibration_x=x_cal[:20]).calibration_cached
    big = _scaled_last_layer(net, 10.0)
    t_big, reached, seconds, cached = model_temperature(big, x_cal)
    assert reached and not cached and seconds > 0
    assert t_big == pytest.approx(10.0 * float(first.temperature or 0), rel=1e-4)
    assert model_temperature(big, x_cal)[3]
    # what the call reports
    summary = first.summary()
    assert summary["steps"] == DEFAULT_STEPS and summary["calibration_cached"] is False
    clear_calibration_cache()
    assert not robustness_metric(net, x, calibration_x=x_cal).calibration_cached


def test_psi_reads_the_attacks_logits(net_and_x: tuple[nn.Module, torch.Tensor]) -> None:
    """ψ from the maximiser's own logits equals the KL recomputed from its x_adv."""
    net, x = net_and_x
    r = robustness_metric(net, x, eps=0.1, calibration="none")
    y = net(x).argmax(1)
    x_adv = metric_attack(0.1)(net, x, y).x_adv
    with torch.no_grad():
        expected = kl_divergence(net(x), net(x_adv))
    assert torch.allclose(r.psi, expected, atol=1e-5)


def _linear_binary(d: int, margin_l1: float) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 2-class linear model on 1x4x4 inputs with x = 0.5 everywhere predicted as class 0 with
    margin D(x) = margin_l1 * ‖w_0 − w_1‖₁; returns (model, x, y, w_0 − w_1)."""
    torch.manual_seed(5)
    lin = nn.Linear(d, 2)
    model = nn.Sequential(nn.Flatten(), lin).eval()
    x = torch.full((1, 1, 4, 4), 0.5)
    dw = (lin.weight[0] - lin.weight[1]).detach()
    with torch.no_grad():
        z = lin(x.flatten(1))[0]
        lin.bias[0] += margin_l1 * float(dw.abs().sum()) - float(z[0] - z[1])
    return model, x, torch.tensor([0]), dw


@pytest.mark.parametrize("direction", ["gradient", "pgd"])
def test_boundary_distance_of_a_linear_model_is_analytic(direction: str) -> None:
    model, x, y, dw = _linear_binary(16, 0.3)
    with torch.no_grad():
        d_x = float(decision_margin(model(x), y)[0])
    x_adv = PGD(0.2, steps=20, alpha=0.05, random_start=False)(model, x, y).x_adv if direction == "pgd" else None
    r = landscape(model, x, y, eps=0.2, radius=0.45, grid=5, line_points=46, direction=direction, x_adv=x_adv)
    # L-inf: the boundary along -sign(dw) is at D(x) / ‖dw‖₁ = 0.3
    assert float(r.boundary[0]) == pytest.approx(d_x / float(dw.abs().sum()), rel=1e-4)
    assert float(r.boundary[0]) == pytest.approx(0.3, rel=1e-4)
    # the slope of D along d1 is ‖dw‖₁
    assert float(r.steepness[0]) == pytest.approx(float(dw.abs().sum()), rel=1e-4)
    # L2: the boundary along -dw/‖dw‖₂ is at D(x) / ‖dw‖₂
    r2 = landscape(model, x, y, eps=0.5, radius=2.0, grid=5, line_points=101, norm="l2", direction="gradient")
    expected = d_x / float(dw.norm())
    assert expected < 2.0
    assert float(r2.boundary[0]) == pytest.approx(expected, rel=1e-4)
    # no crossing within the radius: inf
    far = landscape(model, x, y, eps=0.05, radius=0.1, grid=3, line_points=11, direction="gradient")
    assert math.isinf(float(far.boundary[0]))


def test_landscape_centre_is_the_margin_and_calls_are_batched(net_and_x: tuple[nn.Module, torch.Tensor]) -> None:
    net, x = net_and_x
    y = torch.arange(len(x)) % 4
    counted = Counting(net)
    g, line, chunk = 9, 21, 100
    r = landscape(counted, x, y, eps=0.1, grid=g, line_points=line, direction="gradient", chunk_size=chunk)
    with torch.no_grad():
        logits = net(x)
    c = g // 2
    assert torch.allclose(r.decision[:, c, c], decision_margin(logits, y), atol=1e-5)
    assert torch.allclose(r.loss[:, c, c], F.cross_entropy(logits, y, reduction="none"), atol=1e-5)
    assert torch.allclose(r.margin, decision_margin(logits, y), atol=1e-5)
    assert r.a[c] == 0 and r.b[c] == 0 and r.a[-1] == pytest.approx(0.2)
    n = len(x)
    expected = math.ceil(n * g * g / chunk) + math.ceil(n * (line + 1) / chunk)
    assert r.model_calls == expected
    assert counted.calls == expected + 1  # plus the one forward of the gradient direction
    assert counted.calls < n * g  # far fewer than one call per grid row and image
    assert r.mean_decision.shape == (g, g) and r.decision.shape == (n, g, g)
    # a chunk as big as the grid: one call for the grid
    counted.calls = 0
    landscape(counted, x, y, eps=0.1, grid=g, line_points=line, direction="gradient", chunk_size=n * g * g)
    assert counted.calls == 1 + 1 + 1
    with pytest.raises(UserError, match="odd"):
        landscape(net, x, y, grid=4)


def test_l2_directions_are_orthonormal(net_and_x: tuple[nn.Module, torch.Tensor]) -> None:
    from robustdissect.analysis.landscape import landscape_directions

    net, x = net_and_x
    y = net(x).argmax(1)
    d1, d2 = landscape_directions(net, x, y, norm="l2", direction="gradient", seed=0)
    f1, f2 = d1.flatten(1), d2.flatten(1)
    assert torch.allclose(f1.norm(dim=1), torch.ones(len(x)), atol=1e-5)
    assert torch.allclose(f2.norm(dim=1), torch.ones(len(x)), atol=1e-5)
    assert float((f1 * f2).sum(1).abs().max()) < 1e-5
    s1, s2 = landscape_directions(net, x, y, norm="linf", direction="gradient", seed=0)
    assert set(s2.unique().tolist()) == {-1.0, 1.0} and float(s1.abs().max()) == 1.0


def test_shipped_models_pattern(fmnist: Dataset) -> None:
    """Standard model: larger Ψ, boundary inside ε along d1, steeper; PAT: smaller Ψ, a* > ε."""
    from robustdissect.models import load_checkpoint

    test = fmnist.test.subset(64, seed=0)
    out = {}
    for name in ("fmnist-smallcnn-vanilla", "fmnist-smallcnn-pat"):
        model, _ = load_checkpoint(name)
        model.eval()
        psi = robustness_metric(model, test.x, eps=0.1, steps=10, calibration_x=fmnist.val.x[:256])
        x_adv = PGD(0.1, steps=10, step_rule="madry")(model, test.x[:16], test.y[:16]).x_adv
        land = landscape(model, test.x[:16], test.y[:16], eps=0.1, grid=3, line_points=41, x_adv=x_adv)
        out[name] = (psi.mean, land.summary())
    van, pat = out["fmnist-smallcnn-vanilla"], out["fmnist-smallcnn-pat"]
    assert van[0] > 10 * pat[0]
    assert van[1]["boundary_inside_eps"] >= 0.9
    assert pat[1]["boundary_median"] > 0.1
    assert van[1]["steepness_mean"] > 3 * pat[1]["steepness_mean"]
