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


# -- the SNS bridge (METHODS §6.5): Ω = the brittle units ---------------------------------------

PLANTED_UNITS = {"feature_steps": 20, "candidates_per_bin": 1, "depth_bins": 1, "top_m": 1}


def _bridge(model: nn.Module, train: Split, **kwargs: Any) -> SNS:
    args: dict[str, Any] = {"eps": 0.1, "steps": 3, "variant": "brittle", "reference": "initial", "layers": ["feat"],
                            "units_n": 200, "units_reference_n": 400, "units_options": PLANTED_UNITS,
                            "freeze": False, **kwargs}  # fmt: skip
    obj = SNS(**args)
    obj.setup(model, train, CPU)
    obj.on_epoch_start(model, 0)
    return obj


def _reference_l_sns(model: nn.Module, omega: dict[str, list[int]], x: torch.Tensor, x2: torch.Tensor) -> float:
    """Σ_{k∈Ω} ‖F_k(x) − F_k(x′)‖₁ / dim(F_k), averaged over the pairs, written out unit by unit."""
    modules = dict(model.named_modules())
    total = 0.0
    for i in range(len(x)):
        for path, units in omega.items():
            maps: list[torch.Tensor] = []
            h = modules[path].register_forward_hook(lambda _m, _i, out, maps=maps: maps.append(out.detach()))
            with torch.no_grad():
                model(x[i : i + 1])
                model(x2[i : i + 1])
            h.remove()
            for k in units:
                a, b = maps[0][0, k], maps[1][0, k]
                total += float((a - b).abs().sum()) / a.numel()
    return total / len(x)


def test_bridge_omega_is_the_planted_brittle_unit_and_is_in_the_card() -> None:
    from conftest import Planted, planted_data

    torch.manual_seed(0)
    model = Planted().eval()
    train = Split(*planted_data(600, seed=1))
    obj = _bridge(model, train)
    assert {p: v.tolist() for p, v in obj.omega.items()} == {"feat": [1]}  # unit 1 brittle, unit 0 robust
    card = obj.describe()
    assert card["variant"] == "brittle" and card["omega"] == {"feat": [1]} and card["layers"] == ["feat"]
    assert card["units"]["brittle"] == 1 and card["units"]["robust"] == 1
    assert card["units"]["probe"] == "200 training images" and card["units"]["reference_images"] == 400
    # the same probe and seed give the same Ω
    assert _bridge(Planted().eval(), train).describe()["omega"] == card["omega"]


def test_bridge_loss_is_zero_for_x_prime_equal_x_positive_otherwise_and_matches_a_reference() -> None:
    from conftest import Planted, planted_data

    torch.manual_seed(0)
    model = Planted().eval()
    train = Split(*planted_data(600, seed=1))
    obj = _bridge(model, train)
    x, y = train.x[:16], train.y[:16]
    obj.pgd = lambda _m, xx, _y: xx.clone()  # type: ignore[method-assign]  # x' = x
    assert obj(model, x, y).extra["sns"] == 0.0
    x2 = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    obj.pgd = lambda _m, _xx, _y: x2  # type: ignore[method-assign]
    out = obj(model, x, y)
    ref = _reference_l_sns(model, {"feat": [1]}, x, x2)
    assert ref > 0 and out.extra["sns"] == pytest.approx(ref, rel=1e-5)
    logits = model(torch.cat([x, x2]))
    base = 0.5 * torch.nn.functional.cross_entropy(logits[:16], y) + 0.5 * torch.nn.functional.cross_entropy(
        logits[16:], y
    )
    assert float(out.loss.detach()) == pytest.approx(float(base.detach()) + 5.0 * ref, rel=1e-5)


def test_bridge_on_spatial_maps_matches_the_reference(split: Split, shipped_vanilla: nn.Module) -> None:
    """On the shipped vanilla smallcnn (maps of 28×28 down to 7×7, so the /dim(F_k) matters) with Ω
    from its own dissection, the objective's L_sns equals the unit-by-unit reference."""
    import copy

    model = copy.deepcopy(shipped_vanilla).eval()
    obj = SNS(steps=2, variant="brittle", reference="initial", units_n=32, units_reference_n=32, freeze=False)
    obj.setup(model, split, CPU)
    obj.on_epoch_start(model, 0)
    assert obj.omega and all(len(v) for v in obj.omega.values())
    omega = {p: v.tolist() for p, v in obj.omega.items()}
    assert obj.describe()["omega"] == {n: omega[p] for n, p in zip(obj.layers, obj.paths, strict=True)}
    x, y = split.x[:4], split.y[:4]
    x2 = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    obj.pgd = lambda _m, _xx, _y: x2  # type: ignore[method-assign]
    out = obj(model, x, y)
    assert out.extra["sns"] == pytest.approx(_reference_l_sns(model, omega, x, x2), rel=1e-4)


def test_bridge_smoke_training_records_omega_in_the_card(tmp_path: Path, fmnist: Dataset) -> None:
    args = {"steps": 2, "variant": "brittle", "reference": "initial", "units_n": 32, "units_reference_n": 32,
            "freeze": False}  # fmt: skip
    cfg = TrainConfig(model_args={"width": 16, "pooling": "max"}, init="fmnist-smallcnn-vanilla", n=64, epochs=1,
                      batch_size=32, lr=0.01, objective="sns", objective_args=args)  # fmt: skip
    res = train(cfg, tmp_path / "bridge", data=fmnist)
    obj = res.card["objective"]
    assert obj["variant"] == "brittle" and obj["omega"]
    assert obj["units"]["brittle"] == sum(map(len, obj["omega"].values()))
    assert set(obj["omega"]) <= {f"conv{i}" for i in range(1, 7)} and obj["frozen"] == []
    assert all(u == sorted(u) for u in obj["omega"].values())


def test_bridge_preset_is_a_short_fine_tuning_of_the_vanilla_model() -> None:
    from robustdissect.resources import read_train_config

    cfg = read_train_config("fmnist-smallcnn-bridge")
    assert cfg["init"] == "fmnist-smallcnn-vanilla" and cfg["objective"] == "sns"
    args = cfg["objective_args"]
    assert args["variant"] == "brittle" and args["steps"] == 7 and args["eps"] == 0.1
    # lambda x |Omega| matched to SNS_sen's (5 x 15 / ~151 units), as the SNS_all preset does: lambda = 5 collapsed
    assert args["lam"] == 0.5
    assert cfg["epochs"] * cfg["n"] <= 3 * 20_000  # a few minutes on 2 cores
    TrainConfig(**cfg)  # valid
