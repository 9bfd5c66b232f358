"""Sensitive Neuron Stabilizing: Eq. 12 oracles, freezing, variants, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import interrupt_at
from torch import nn

from robustdissect.data import Dataset, Split
from robustdissect.errors import UserError
from robustdissect.models import build_model
from robustdissect.training import SNS, TrainConfig, train
from robustdissect.training.sns import _capture, frozen_prefix, parse_layers, sns_loss

CPU = torch.device("cpu")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("smallcnn", width=4).train()


@pytest.fixture(scope="module")
def split(fmnist: Dataset) -> Split:
    return Split(fmnist.train.x[:64].clone(), fmnist.train.y[:64].clone())


def _sns(model: nn.Module, split: Split, **kwargs: Any) -> SNS:
    args: dict[str, Any] = {"steps": 2, "reference": "initial", "select_n": 32, **kwargs}
    obj = SNS(**args)
    obj.setup(model, split, CPU)
    obj.on_epoch_start(model, 0)
    return obj


def test_layer_spec_forms() -> None:
    model = _model()
    assert parse_layers(model, "top3") == ["conv4", "conv5", "conv6"]
    assert parse_layers(model, 2, hook="relu") == ["relu5", "relu6"]
    assert parse_layers(model, ["conv5", "conv6.bn"]) == ["conv5", "conv6.bn"]
    with pytest.raises(UserError):
        parse_layers(model, "top9")
    with pytest.raises(UserError):
        parse_layers(model, ["conv77"])


def test_frozen_prefix_is_everything_below_s() -> None:
    frozen = frozen_prefix(_model(), ["conv4", "conv5", "conv6"])
    assert {"conv1", "conv1.bn", "conv3.conv", "conv3.bn", "pool1"} <= set(frozen)
    assert not any(f.startswith(("conv4", "conv5", "conv6", "fc1")) for f in frozen)


def test_sns_loss_is_zero_for_identical_pairs(split: Split) -> None:
    model = _model()
    obj = _sns(model, split, variant="all")
    x = split.x[:8]
    with _capture(model, obj.paths) as feats:
        model(torch.cat([x, x]))
    assert sns_loss(feats, obj.omega, 8).item() == 0.0


def test_sns_gradient_flows_only_through_selected_neurons_and_layers(split: Split) -> None:
    model = _model()
    obj = _sns(model, split, variant="rand", layers=["conv6"], seed=1)
    (idx,) = obj.omega.values()
    x = split.x[:8]
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    with _capture(model, obj.paths) as feats:
        model(torch.cat([x, x_adv]))
    loss = sns_loss(feats, obj.omega, 8)
    assert loss > 0
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("conv1.", "conv2.", "conv3.", "conv4.", "conv5.")):
            assert not p.requires_grad and p.grad is None, name  # frozen below S
    assert model.fc1.weight.grad is None  # above S: no path from L_sns
    mask = torch.zeros(model.conv6.conv.weight.shape[0], dtype=torch.bool)
    mask[idx] = True
    for g in (model.conv6.conv.weight.grad, model.conv6.bn.weight.grad):
        assert g is not None
        flat = g.reshape(g.shape[0], -1)
        assert flat[~mask].abs().max() == 0  # unselected neurons get nothing
        assert flat[mask].abs().max() > 0
    bias = model.conv6.bn.bias.grad  # a shift of both halves cancels in F(x) - F(x')
    assert bias is not None and bias.abs().max() == 0


def test_frozen_batchnorm_stays_in_eval_mode(split: Split) -> None:
    model = _model()
    obj = _sns(model, split, variant="all")
    model.train()
    obj.on_epoch_start(model, 1)
    assert not model.conv1.bn.training and not model.conv3.bn.training
    assert model.conv4.bn.training and model.fc1.training
    running = model.conv2.bn.running_mean.clone()
    out = obj(model, split.x[:8], split.y[:8])
    assert torch.isfinite(out.loss) and out.extra["sns"] > 0
    assert torch.equal(model.conv2.bn.running_mean, running)


def test_rand_selection_is_seeded(split: Split) -> None:
    a = _sns(_model(), split, variant="rand", seed=4)
    b = _sns(_model(), split, variant="rand", seed=4)
    c = _sns(_model(), split, variant="rand", seed=5)
    assert all(torch.equal(a.omega[p], b.omega[p]) for p in a.omega)
    assert any(not torch.equal(a.omega[p], c.omega[p]) for p in a.omega)
    assert [len(v) for v in a.omega.values()] == [1, 2, 2]  # round(0.1 * C), at least 1: C = 8, 16, 16


def test_sen_selection_matches_the_sensitivity_analysis(split: Split) -> None:
    obj = _sns(_model(), split, variant="sen", fraction=0.25)
    assert [len(v) for v in obj.omega.values()] == [2, 4, 4]
    assert obj.describe()["omega"]["conv6"] == obj.omega["conv6.bn"].tolist()


def test_dyn_reselects_every_later_epoch(split: Split, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    obj = _sns(model, split, variant="dyn", dyn_n=16)
    calls: list[int | None] = []
    original = obj._select

    def counting(ref: nn.Module, train: Split, n: int | None, seed: int, device: torch.device) -> Any:
        calls.append(n)
        return original(ref, train, n, seed, device)

    monkeypatch.setattr(obj, "_select", counting)
    obj.on_epoch_start(model, 0)
    assert calls == []
    obj.on_epoch_start(model, 1)
    obj.on_epoch_start(model, 2)
    assert calls == [16, 16]


def test_sns_needs_setup_and_valid_options() -> None:
    with pytest.raises(UserError, match="setup"):
        SNS(steps=1)(_model(), torch.rand(2, 1, 28, 28), torch.tensor([0, 1]))
    with pytest.raises(UserError, match="variant"):
        SNS(variant="best")
    with pytest.raises(UserError, match="base_loss"):
        SNS(base_loss="none")


def test_sns_dyn_resume_matches_uninterrupted(tmp_path: Path, fmnist: Dataset) -> None:
    args = {"steps": 2, "reference": "initial", "select_n": 32, "dyn_n": 16, "variant": "dyn", "layers": "top2"}
    cfg = TrainConfig(
        model_args={"width": 4}, n=128, epochs=2, batch_size=64, seed=2, objective="sns", objective_args=args
    )
    full = train(cfg, tmp_path / "full", data=fmnist)

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", objective=interrupt_at(SNS(seed=2, **args), 1), data=fmnist)
    resumed = train(cfg, tmp_path / "cut", resume=True, data=fmnist)
    wf, wr = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert resumed.card["objective"]["frozen"] and resumed.card["objective"]["variant"] == "dyn"
