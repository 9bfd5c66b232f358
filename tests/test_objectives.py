"""Robust training objectives: contracts on a width-4 smallcnn, oracles, resume, presets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import interrupt_at
from torch import nn

from robustdissect.attacks import PGD, SampleRandom
from robustdissect.data import Dataset, Split
from robustdissect.errors import UserError
from robustdissect.models import build_model
from robustdissect.training import OBJECTIVES, PAT, TrainConfig, make_objective, train
from robustdissect.training.robust import ALP, TRADES, FastAT

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "robustdissect" / "configs" / "train"
FAST: dict[str, dict[str, Any]] = {
    "vanilla": {},
    "pat": {"steps": 2},
    "alp": {"steps": 2},
    "trades": {"steps": 2},
    "fast": {},
    "sns": {"steps": 2, "reference": "initial", "select_n": 32, "layers": "top2"},
}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("smallcnn", width=4).train()


@pytest.fixture(scope="module")
def batch(fmnist: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return fmnist.train.x[:16].clone(), fmnist.train.y[:16].clone()


def test_registry_lists_every_objective() -> None:
    assert set(FAST) <= set(OBJECTIVES.names())


@pytest.mark.parametrize("name", sorted(FAST))
def test_objective_steps_with_finite_loss_and_gradients(
    name: str, batch: tuple[torch.Tensor, torch.Tensor], fmnist: Dataset
) -> None:
    x, y = batch
    model = _model()
    obj = OBJECTIVES.get(name)(**FAST[name])
    if hasattr(obj, "setup"):
        obj.setup(model, Split(fmnist.train.x[:64], fmnist.train.y[:64]), torch.device("cpu"))
    model.train()
    obj.on_epoch_start(model, 0)
    modes = {n: m.training for n, m in model.named_modules()}
    out = obj(model, x, y)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.logits.shape == (16, 10)
    assert {n: m.training for n, m in model.named_modules()} == modes  # inner attack restored modes
    out.loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert "name" in obj.describe()


def _reference_linf_pgd(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int, g: torch.Generator
) -> torch.Tensor:
    """Madry et al.'s L-inf PGD written out in plain torch: uniform start, signed steps, clamp."""
    lo, hi = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
    u = SampleRandom.coerce(g, x.shape[0], x.device).rand(*x.shape[1:])  # the start's per-image streams
    x_adv = torch.max(torch.min(x + (2 * u - 1) * eps, hi), lo)
    model.eval()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = torch.max(torch.min(x_adv.detach() + alpha * grad.sign(), hi), lo)
    model.train()
    return x_adv


def test_training_perturbation_is_the_attack_librarys_pgd(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """PAT's inner maximisation equals plain Madry PGD bitwise, stays in the ball and box, and
    leaves the model's modes and parameter flags as they were."""
    x, y = batch
    model = _model()
    pat = PAT(eps=0.1, steps=3, alpha=0.04, seed=7)
    pat.on_epoch_start(model, 0)
    x_adv = pat.pgd(model, x, y)
    ref = _reference_linf_pgd(model, x, y, 0.1, 0.04, 3, torch.Generator().manual_seed(7 * 1_000_003))
    assert torch.equal(x_adv, ref)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad
    with torch.no_grad():
        model.eval()
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_trades_inner_loss_is_kl_to_the_clean_prediction(fmnist: Dataset, shipped_vanilla: nn.Module) -> None:
    x, y = fmnist.test.x[:16], fmnist.test.y[:16]
    model = shipped_vanilla
    trades = TRADES(eps=0.1, steps=5)
    assert trades.attack.loss == "kl" and trades.attack.random_start == "gaussian"
    trades.on_epoch_start(model, 0)
    x_adv = trades.pgd(model, x, y)
    with torch.no_grad():
        p = F.softmax(model(x), dim=1)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p, reduction="batchmean")
    assert kl > 1.0  # the start is 0.001-Gaussian, where KL is ~0: PGD must have climbed


def test_step_size_rules() -> None:
    assert PGD.default_alpha(0.1, 4) == pytest.approx(0.05)
    assert PGD.default_alpha(0.1, 10, "madry") == pytest.approx(0.025)
    assert PGD(0.1, steps=10, alpha=0.3).alpha == 0.3
    with pytest.raises(UserError):
        PGD(0.1, step_rule="nope")


def test_pat_with_zero_eps_is_cross_entropy(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    model = _model()
    pat = PAT(eps=0.0, steps=2)
    pat.on_epoch_start(model, 0)
    loss = pat(model, x, y).loss
    ce = F.cross_entropy(model(x), y)
    assert torch.allclose(loss, ce, atol=1e-5)
    adv_only = PAT(eps=0.0, steps=2, mix="adv")
    adv_only.on_epoch_start(model, 0)
    assert torch.allclose(adv_only(model, x, y).loss, ce, atol=1e-5)


def test_alp_pair_term_and_trades_kl_vanish_at_zero_eps(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    model = _model()
    alp = ALP(eps=0.0, steps=2)
    alp.on_epoch_start(model, 0)
    out = alp(model, x, y)
    assert out.extra["alp_pair"] == pytest.approx(0.0, abs=1e-10)
    assert torch.allclose(out.loss, F.cross_entropy(model(x), y), atol=1e-5)
    trades = TRADES(eps=0.0, steps=2)
    trades.on_epoch_start(model, 0)
    assert trades(model, x, y).extra["trades_kl"] == pytest.approx(0.0, abs=1e-6)


def test_alp_pair_is_positive_and_fast_uses_wong_step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    model = _model()
    alp = ALP(eps=0.1, steps=2)
    alp.on_epoch_start(model, 0)
    assert alp(model, x, y).extra["alp_pair"] > 0
    assert FastAT(eps=0.1).alpha == pytest.approx(0.125)
    with pytest.raises(UserError, match="mix"):
        PAT(mix="third")


def test_same_seed_same_random_start(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    model = _model()
    a, b = PAT(steps=1, seed=5), PAT(steps=1, seed=5)
    a.on_epoch_start(model, 2)
    b.on_epoch_start(model, 2)
    assert torch.equal(a.pgd(model, x, y), b.pgd(model, x, y))
    b.on_epoch_start(model, 3)
    assert not torch.equal(a.pgd(model, x, y), b.pgd(model, x, y))


def test_robust_resume_matches_uninterrupted(tmp_path: Path, fmnist: Dataset) -> None:
    args = {"eps": 0.1, "steps": 2}
    cfg = TrainConfig(
        model_args={"width": 4}, n=128, epochs=2, batch_size=64, seed=3, objective="pat", objective_args=args
    )
    full = train(cfg, tmp_path / "full", data=fmnist)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", objective=interrupt_at(PAT(seed=3, **args), 1), data=fmnist)
    resumed = train(cfg, tmp_path / "cut", resume=True, data=fmnist)
    wf, wr = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert full.card["objective"]["name"] == "pat" and full.card["objective"]["seed"] == 3


def test_init_loads_checkpoint_weights(tmp_path: Path, fmnist: Dataset, shipped_vanilla: nn.Module) -> None:
    cfg = TrainConfig(model_args={"width": 16}, n=64, epochs=1, batch_size=64, lr=0.0, init="fmnist-smallcnn-vanilla")
    result = train(cfg, tmp_path / "ft", data=fmnist)
    w0 = shipped_vanilla.state_dict()
    assert torch.equal(result.model.state_dict()["conv1.conv.weight"], w0["conv1.conv.weight"])
    with pytest.raises(UserError, match="architecture"):
        bad = TrainConfig(model_args={"width": 4}, n=64, epochs=1, init="fmnist-smallcnn-vanilla")
        train(bad, tmp_path / "bad", data=fmnist)


def test_bad_objective_args_are_user_errors() -> None:
    with pytest.raises(UserError, match="objective_args"):
        make_objective(TrainConfig(objective="pat", objective_args={"epsilon": 0.1}))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_train_configs_load(path: Path) -> None:
    cfg = TrainConfig(**yaml.safe_load(path.read_text()))
    obj = make_objective(cfg)
    assert obj.describe()["name"] == cfg.objective


def test_cifar_vgg16_presets_step_on_random_data() -> None:
    torch.manual_seed(0)
    x, y = torch.rand(24, 3, 32, 32), torch.randint(0, 10, (24,))
    for name in ("pat", "alp", "sns"):
        cfg = TrainConfig(**yaml.safe_load((CONFIGS / f"cifar10-vgg16-{name}.yaml").read_text()))
        assert cfg.objective_args["eps"] == pytest.approx(8 / 255)
        model = build_model("vgg16", width_mult=0.125, num_classes=10, in_channels=3).train()
        opt = torch.optim.SGD([p for p in model.parameters()], lr=0.01, momentum=0.9)
        args = {**cfg.objective_args, "steps": 2}
        if name == "sns":
            args["select_n"] = 8
        obj = OBJECTIVES.get(cfg.objective)(**args)
        if name == "sns":
            obj.setup(model, Split(x, y), torch.device("cpu"))
            assert obj.layers == [f"conv{i}" for i in range(8, 14)]
            assert "features.conv7.bn" in obj.frozen and "features.conv8.conv" not in obj.frozen
        obj.on_epoch_start(model, 0)
        out = obj(model, x[:8], y[:8])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        assert torch.isfinite(out.loss)


def test_channels_last_and_bf16_autocast_train(tmp_path: Path, fmnist: Dataset) -> None:
    cfg = TrainConfig(
        model_args={"width": 4},
        n=64,
        epochs=1,
        batch_size=32,
        objective="pat",
        objective_args={"steps": 1},
        channels_last=True,
        amp="bf16",
    )
    result = train(cfg, tmp_path / "cl", data=fmnist)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    with pytest.raises(UserError, match="amp"):
        train(TrainConfig(n=64, epochs=1, amp="fp8"), tmp_path / "bad", data=fmnist)
    assert not (tmp_path / "bad").exists()


def test_compiled_training_matches_eager(tmp_path: Path, fmnist: Dataset) -> None:
    """`compile` wraps the step model in torch.compile; through the "eager" backend the graph
    capture must not change a single weight (the inductor default needs a C++ compiler)."""
    base = {"model_args": {"width": 4}, "n": 64, "epochs": 1, "batch_size": 32, "objective": "pat",
            "objective_args": {"steps": 2}}  # fmt: skip
    plain = train(TrainConfig(**base), tmp_path / "plain", data=fmnist)
    compiled = train(TrainConfig(**base, compile="eager"), tmp_path / "compiled", data=fmnist)
    for (name, a), b in zip(plain.model.state_dict().items(), compiled.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    with pytest.raises(UserError, match="backend"):
        train(TrainConfig(**base, compile="no-such-backend"), tmp_path / "bad", data=fmnist)
    assert not (tmp_path / "bad").exists()
