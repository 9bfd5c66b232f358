"""Layer diagnosis (METHODS §1.7): the 0.75 oracle of a 2x2 mean, max against avg pooling for a
learned decoder, the invariants of V_l, V_l^soft and A_l, decoders resumed bit-identically, the
flip layer and the correlation on cases with known answers, and the stage end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustdissect.analysis.diagnose import (
    DecoderBank,
    DecoderSettings,
    InformationLoss,
    InversionSettings,
    OptimisationInverter,
    Vulnerability,
    diagnosis_layers,
    distortion_amplification,
    explanations,
    flip_layers,
    information_loss,
    layer_correlations,
    train_decoder,
)
from robustdissect.errors import UserError
from robustdissect.studies import ig1 as ps


def test_mean_of_a_2x2_gaussian_block_reconstructs_with_mse_075() -> None:
    # analytic: the best reconstruction of i.i.d. N(0,1) x (4,) from its mean is the projection
    # P = 11ᵀ/4 applied to x; E‖x − Px‖²/4 = tr(I − P)/4 = 3/4 exactly
    proj = torch.full((4, 4), 0.25, dtype=torch.float64)
    assert float(torch.trace(torch.eye(4, dtype=torch.float64) - proj)) / 4 == 0.75
    # sampled: the optimisation inversion through a 2x2 average pool finds that projection
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 1, 2, 2, generator=g)
    model = nn.Sequential(nn.AvgPool2d(2))
    inv = OptimisationInverter(model, torch.zeros(1, 2, 2),
                               InversionSettings(steps=300, lr=0.05, tv=0.0, clamp=False, batch_size=2000))  # fmt: skip
    recon = explanations(model, inv, x, ["0"])[:, 1:]
    # the optimum is the block mean in every pixel (least squares from a start in the row space)
    mean = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    assert torch.allclose(recon[:, 0], mean, atol=1e-3)
    info = information_loss(x, recon, torch.zeros(1, 2, 2), ["0"])
    per_element = info.err.sum() / x.numel()
    assert per_element == pytest.approx(0.75, abs=0.03)  # analytic: 1 - 1/4
    assert info.R()[0] == pytest.approx(0.75, abs=0.03)  # x̄ = 0, E‖x‖² = 1 per element
    assert info.IL()[0] == pytest.approx(info.R()[0])  # R_0 = 0


def test_learned_decoder_reconstructs_worse_after_max_than_after_avg_pooling(fmnist: Any) -> None:
    x = fmnist.test.x[:200]
    train, held = x[:150], x[150:]
    errors = {}
    for kind, pool in (("max", nn.MaxPool2d(2)), ("avg", nn.AvgPool2d(2))):
        model = nn.Sequential(pool)
        dec, losses = train_decoder(model, "0", train, DecoderSettings(epochs=25, batch_size=50, lr=3e-3,
                                                                       lambda_cls=0.0, seed=0))  # fmt: skip
        assert losses["img"] > 0
        with torch.no_grad():
            errors[kind] = float((dec(model(held)) - held).pow(2).mean())
    assert errors["max"] > errors["avg"], errors


def test_flip_layer_on_hand_cases() -> None:
    classes = torch.tensor([[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    y_adv = torch.tensor([1, 1, 1, 1, 1])
    assert flip_layers(classes, y_adv).tolist() == [1, 2, -1, 0, -1]


def test_vulnerability_invariants() -> None:
    g = torch.Generator().manual_seed(1)
    m, big_l = 300, 6
    classes = torch.randint(0, 3, (m, big_l + 1), generator=g)
    p = torch.rand(m, big_l + 1, generator=g)
    vul = Vulnerability([f"l{i}" for i in range(1, big_l + 1)], classes, p, torch.zeros(m, dtype=torch.long),
                        torch.randint(1, 3, (m,), generator=g))  # fmt: skip
    v, vs = vul.V(), vul.V_soft()
    assert v.shape == (big_l + 1,) and vs.shape == (big_l,)
    assert v.sum() <= 1.0 + 1e-12 and (v >= 0).all()
    assert 1.0 - v.sum() == pytest.approx(float((vul.flip == -1).float().mean()))
    assert (vs >= 0).all()
    # V^soft is the mean positive drop of p_J(y|·) from one layer to the next
    expected = np.clip(p[:, :-1].double().numpy() - p[:, 1:].double().numpy(), 0, None).mean(0)
    assert np.allclose(vs, expected)


def test_identity_layer_does_not_amplify() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Identity(), nn.ReLU())
    x = torch.rand(20, 1, 8, 8)
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    amp = distortion_amplification(model, x, x_adv, ["0", "1", "2"])
    a = amp.amplification()
    assert a[1] == 1.0  # h_1 = h_0 exactly
    d = amp.d()
    assert d[0] == pytest.approx(float((x_adv - x).abs().sum() / x.abs().sum()))
    assert a[0] == pytest.approx(d[1] / d[0])


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3)).eval()  # fmt: skip


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_decoder_losses_are_the_methods_squared_norms(reduction: str) -> None:
    """One batch, one step: the recorded losses are those of the freshly initialised G_l, so they can
    be recomputed: ‖G(h) − x‖²₂ and ‖h_l(G(h)) − h‖²₂ per image, averaged ("sum", METHODS §1.2), or
    the per-element MSE and the latent error relative to mean h² ("mean")."""
    from robustdissect.analysis.diagnose import Decoder, _layer_seed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).eval()  # fmt: skip
    x = torch.rand(6, 1, 8, 8)
    s = DecoderSettings(epochs=1, batch_size=6, seed=2, reduction=reduction)
    _dec, losses = train_decoder(model, "2", x, s)
    with torch.no_grad():
        h = model[:3](x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_layer_seed(2, "2"))
        fresh = Decoder(h.shape[1:], x.shape[1:], s.width).train()
    order = torch.randperm(6, generator=torch.Generator().manual_seed(_layer_seed(2, "2")))
    with torch.no_grad():
        xb, hb = x[order], h[order]
        rec = fresh(hb)
        hr = model[:3](rec)
        if reduction == "sum":
            img, feat = ((rec - xb) ** 2).sum((1, 2, 3)).mean(), ((hr - hb) ** 2).sum((1, 2, 3)).mean()
        else:
            img, feat = ((rec - xb) ** 2).mean(), ((hr - hb) ** 2).mean() / (hb**2).mean()
        cls = F.cross_entropy(model(rec), model(xb).argmax(1))
    assert losses["img"] == pytest.approx(float(img), rel=1e-5)
    assert losses["feat"] == pytest.approx(float(feat), rel=1e-5)
    assert losses["cls"] == pytest.approx(float(cls), rel=1e-5)
    with pytest.raises(UserError, match="reduction must be sum or mean"):
        DecoderSettings(reduction="l1")


def test_decoders_are_the_default_inverter_and_the_default_run_inverts_by_optimisation() -> None:
    from robustdissect.config import RunConfig
    from robustdissect.pipeline import stage_settings

    assert stage_settings("diagnose", RunConfig(quick=False)).inverter == "decoder"
    assert stage_settings("diagnose", RunConfig(quick=True)).inverter == "optim"
    assert stage_settings("diagnose", RunConfig(quick=True, stages={"diagnose": {"inverter": "decoder"}})).inverter \
        == "decoder"


def _decoder_items(root: Path) -> dict[str, list[tuple[str, list[float]]]]:
    """The decoder evidence items stored under root: {key: [(tensor name, values), ...]}, so two
    roots compare equal when every stored tensor is bit-identical."""
    from safetensors.torch import load_file

    items = {p.stem: load_file(str(p)) for p in sorted((root / "decoder").glob("*.safetensors"))}
    return {k: [(n, t.double().flatten().tolist()) for n, t in sorted(v.items())] for k, v in items.items()}


def test_decoders_resume_bit_identically(tmp_path: Path) -> None:
    model = _tiny()
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    s = DecoderSettings(epochs=2, batch_size=16, seed=3)
    full = DecoderBank(model, tmp_path / "full", x, s)
    for layer in ("1", "2"):
        full.decoder(layer)
    # an interrupted run finished only layer 1; the resumed one loads it and trains layer 2
    DecoderBank(model, tmp_path / "resumed", x, s).decoder("1")
    resumed = DecoderBank(model, tmp_path / "resumed", x, s)
    for layer in ("1", "2"):
        resumed.decoder(layer)
    assert resumed.loaded == ["1"] and resumed.trained == ["2"]
    for layer in ("1", "2"):
        a, b = full.decoders[layer].state_dict(), resumed.decoders[layer].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert _decoder_items(tmp_path / "resumed") == _decoder_items(tmp_path / "full")
    assert len(_decoder_items(tmp_path / "full")) == 2
    card = full.cards["2"]
    assert card["feature_shape"] == [4, 4, 4] and card["image_shape"] == [1, 8, 8]
    assert resumed.cards["1"]["losses"] == full.cards["1"]["losses"]
    # other settings: the checkpoint is not reused
    other = DecoderBank(model, tmp_path / "full", x, DecoderSettings(epochs=1, batch_size=16, seed=3))
    other.decoder("1")
    assert other.trained == ["1"]


def test_gan_decoders_build_a_discriminator_record_it_and_resume_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import robustdissect.analysis.diagnose as dg

    built: list[int] = []

    class Spy(dg.Discriminator):
        def __init__(self, channels: int) -> None:
            built.append(channels)
            super().__init__(channels)

    monkeypatch.setattr(dg, "Discriminator", Spy)
    model = _tiny()
    x = torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    s = DecoderSettings(epochs=2, batch_size=16, seed=3, gan=True, lambda_adv=0.01)
    full = DecoderBank(model, tmp_path / "full", x, s)
    for layer in ("1", "2"):
        full.decoder(layer)
    assert built == [1, 1]  # one D_l per layer, on the image channels
    card = full.cards["2"]
    assert card["settings"]["gan"] is True and card["settings"]["lambda_adv"] == 0.01
    assert set(card["losses"]) == {"img", "feat", "cls", "adv", "disc"}
    assert all(np.isfinite(v) for v in card["losses"].values()) and card["losses"]["disc"] > 0
    # interrupted after layer 1: the resumed bank loads it, trains layer 2, and matches bit for bit
    DecoderBank(model, tmp_path / "resumed", x, s).decoder("1")
    resumed = DecoderBank(model, tmp_path / "resumed", x, s)
    for layer in ("1", "2"):
        resumed.decoder(layer)
    assert resumed.loaded == ["1"] and resumed.trained == ["2"] and len(built) == 4  # none for the loaded one
    assert _decoder_items(tmp_path / "resumed") == _decoder_items(tmp_path / "full")
    # the GAN term changes the decoder, and a GAN-free bank does not reuse a GAN checkpoint
    plain = DecoderBank(model, tmp_path / "full", x, DecoderSettings(epochs=2, batch_size=16, seed=3))
    plain.decoder("2")
    assert plain.trained == ["2"] and len(built) == 4  # no discriminator without the GAN term
    card = plain.cards["2"]
    assert card["settings"]["gan"] is False and "disc" not in card["losses"]
    a, b = resumed.decoders["2"].state_dict(), plain.decoders["2"].state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_correlation_has_known_answers() -> None:
    # IL rises with depth on every image; the flip layer of every example is the deepest layer,
    # V = (0, 0, 0, 1): Spearman(IL, V) is that of (1, 2, 3) with (0, 0, 1)
    n, big_l = 40, 3
    err = np.cumsum(np.ones((n, big_l)) * np.array([1.0, 2.0, 3.0]), axis=1)
    info = InformationLoss(["a", "b", "c"], err, np.full(n, 10.0))
    assert np.allclose(info.IL(), [0.1, 0.2, 0.3])
    classes = torch.tensor([[0, 0, 0, 1]] * n)
    p = torch.tensor([[0.9, 0.8, 0.6, 0.1]] * n)
    vul = Vulnerability(["a", "b", "c"], classes, p, torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long))
    corr = {c.what: c for c in layer_correlations(info, vul, np.arange(n), resamples=50)}
    assert corr["V"].rho == pytest.approx(np.sqrt(3) / 2)
    assert corr["V_soft"].rho == pytest.approx(1.0)  # drops 0.1, 0.2, 0.5 rise with IL
    assert corr["V_soft"].low == pytest.approx(1.0) and corr["V_soft"].high == pytest.approx(1.0)


def test_diagnosis_layers_follow_the_forward_order(fmnist: Any) -> None:
    from robustdissect.models.io import build_model

    x = fmnist.test.x[:1]
    smallcnn = build_model("smallcnn")
    assert diagnosis_layers(smallcnn, x) == ["relu1", "relu2", "pool1", "relu3", "relu4", "pool2", "relu5", "relu6",
                                             "pool3"]  # fmt: skip
    user = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.LazyLinear(3))
    user(x)
    assert diagnosis_layers(user, x) == ["1", "2"]


# ---------------------------------------------------------------------------------------------
# user models: named layer boundaries, decoders sized from the activation shapes (32x32 RGB)

USER_NET = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.down1 = nn.AvgPool2d(2)
        self.body = nn.Conv2d(8, 16, 3, padding=1)
        self.act2 = nn.ReLU()
        self.down2 = nn.MaxPool2d(2)
        self.head = nn.Linear(16 * 8 * 8, num_classes)

    def forward(self, x):
        x = self.down1(self.act1(self.stem(x)))
        x = self.down2(self.act2(self.body(x)))
        return self.head(x.flatten(1))


def make(num_classes=10):
    torch.manual_seed(0)
    return Net(num_classes)
"""


def _diagnose_user_model(model: nn.Module, layers: list[str], folder: Path) -> None:
    """The whole diagnosis with decoders on 6 random 32x32 RGB images (a 3-step PGD), judged by
    the model itself; checks the decoder shapes and the §1.7 invariants."""
    from robustdissect.analysis.diagnose import diagnose, layer_features
    from robustdissect.attacks import PGD

    g = torch.Generator().manual_seed(0)
    x, x_train = torch.rand(6, 3, 32, 32, generator=g), torch.rand(16, 3, 32, 32, generator=g)
    # untrained: BatchNorm statistics from the training images, so the logits depend on the input
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x_train)
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)  # the model's own labels: every clean image is "correct"
    res = PGD(0.3, steps=3, alpha=0.1, seed=0)(model, x, y)
    bank = DecoderBank(model, folder, x_train, DecoderSettings(epochs=1, batch_size=8, width=8, seed=0))
    d = diagnose(model, x, y, res.x_adv, res.logits.argmax(1), layers, bank, model, x_train.mean(0), resamples=10,
                 show=2)  # fmt: skip
    feats = layer_features(model, x[:1], layers)
    for layer in layers:  # one decoder per boundary, sized from that layer's activation shape
        card = bank.cards[layer]
        shape = list(feats[layer].shape[1:])
        assert card["feature_shape"] == (shape if len(shape) == 3 else [shape[0], 1, 1]), layer
        assert card["image_shape"] == [3, 32, 32] and card["layer"] == layer
    assert bank.trained == layers and len(list((folder / "decoder").glob("*.safetensors"))) == len(layers)
    assert d.layers == layers and d.vulnerability.y.numel() > 0
    assert d.adv_strips.shape[1:] == (len(layers) + 1, 3, 32, 32)
    assert d.adv_strips.min() >= 0 and d.adv_strips.max() <= 1
    rows = d.layer_rows()
    assert [r["layer"] for r in rows] == ["input", *layers]
    assert sum(r["V"] for r in rows) <= 1 + 1e-12 and all(r["V_soft"] >= 0 for r in rows[1:])
    assert all(np.isfinite(r["R"]) and np.isfinite(r["d"]) for r in rows)


@pytest.mark.parametrize(
    ("arch", "args", "layers"),
    [
        # paper-style aliases and a module path, across the pooling stages down to 1x1
        ("vgg16", {"width_mult": 1 / 16}, ["relu2", "pool1", "features.pool3", "relu13"]),
        # block ReLUs (after the residual add), a whole stage and the global pool (1x1 features)
        ("resnet18", {"width": 4}, ["relu1", "l2b1r2", "layer4_output", "avgpool"]),
    ],
)
def test_diagnosis_on_zoo_vgg16_and_resnet18_with_named_layers(
    arch: str, args: dict[str, Any], layers: list[str], tmp_path: Path
) -> None:
    from robustdissect.models.resolve import resolve_model

    torch.manual_seed(0)
    model, _card = resolve_model(arch, model_args={"num_classes": 10, "in_channels": 3, **args},
                                 require_weights=False)  # fmt: skip
    _diagnose_user_model(model, layers, tmp_path / "decoders")


def test_default_layers_of_zoo_models_are_every_relu_and_pool_in_forward_order() -> None:
    from robustdissect.models.io import build_model

    x = torch.rand(1, 3, 32, 32)
    vgg = diagnosis_layers(build_model("vgg16", width_mult=1 / 16), x)
    assert len(vgg) == 18 and vgg[:5] == ["relu1", "relu2", "pool1", "relu3", "relu4"] and vgg[-1] == "pool5"
    resnet = diagnosis_layers(build_model("resnet18", width=4), x)
    assert resnet[:3] == ["relu1", "l1b1r1", "l1b1r2"] and resnet[-1] == "l4b2r2" and len(resnet) == 17


@pytest.mark.parametrize("form", ["module", "file"])
def test_diagnosis_on_a_module_factory_model(form: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from robustdissect.models.resolve import resolve_model

    (tmp_path / "diag_user_net.py").write_text(USER_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = "diag_user_net:make" if form == "module" else f"{tmp_path / 'diag_user_net.py'}:make"
    model, card = resolve_model(spec, model_args={"num_classes": 4})
    assert card["user_model"] is True
    # default boundaries: every ReLU and pooling module in forward order, by module name
    assert diagnosis_layers(model, torch.rand(1, 3, 32, 32)) == ["act1", "down1", "act2", "down2"]
    _diagnose_user_model(model, ["act1", "down1", "down2"], tmp_path / "decoders")


def _study_row(model: str, pooling: str, seed: int, acc: float, group: str = ps.SEED_GROUP, epochs: int = 3,
               training: str = "standard") -> dict[str, Any]:  # fmt: skip
    return {"model": model, "group": group, "pooling": pooling, "training": training, "seed": seed, "eps": 0.1,
            "n": 300, "pgd_accuracy": acc, "pgd_ci": [acc - 0.05, acc + 0.05], "clean_accuracy": 0.9,
            "clean_ci": [0.86, 0.93], "stale": [],
            "train_config": {"epochs": epochs, "seed": seed, "model_args": {"width": 16, "pooling": pooling}},
            "layers": [{"layer": "pool1", "IL": 0.2 if pooling == "max" else 0.1, "V": 0.1, "V_soft": 0.1},
                       {"layer": "relu2", "IL": 0.5, "V": 0.3, "V_soft": 0.2}]}  # fmt: skip


def test_pooling_comparisons_pair_seeds_and_leave_out_what_is_not_like_for_like() -> None:
    rows = [_study_row(f"{p}{s}", p, s, acc) for p, s, acc in
            [("max", 0, 0.30), ("avg", 0, 0.35), ("max", 1, 0.20), ("avg", 1, 0.26), ("max", 2, 0.22),
             ("avg", 2, 0.27), ("max", 3, 0.5)]]  # fmt: skip
    # the shipped pair: one PAT pair alike, one standard pair with different schedules
    rows += [_study_row("pat", "max", 0, 0.80, ps.SHIPPED_GROUP, 20, "pgd-at"),
             _study_row("avg-pat", "avg", 0, 0.82, ps.SHIPPED_GROUP, 20, "pgd-at"),
             _study_row("vanilla", "max", 0, 0.0, ps.SHIPPED_GROUP, 8),
             _study_row("avg-vanilla", "avg", 0, 0.0, ps.SHIPPED_GROUP, 12)]  # fmt: skip
    diffs, excluded = ps.comparisons(rows)
    d = {(r["comparison"], r["training"], r["metric"]): r for r in diffs}
    pgd = d[(ps.SEED_GROUP, "standard", "pgd_accuracy")]
    assert pgd["n_pairs"] == 3 and pgd["seeds"] == "0,1,2"
    assert pgd["avg_minus_max"] == pytest.approx(np.mean([0.05, 0.06, 0.05]))  # avg − max: positive = avg higher
    assert 0 < pgd["ci_low"] < pgd["avg_minus_max"] < pgd["ci_high"] and pgd["interval"].startswith("t over 3")
    assert d[(ps.SEED_GROUP, "standard", "IL_pooling_layers")]["avg_minus_max"] == pytest.approx(-0.1)
    assert d[(ps.SEED_GROUP, "standard", "V_pooling_layers")]["avg_minus_max"] == pytest.approx(0.0)
    # one like-for-like shipped pair: Newcombe's interval over test images for accuracies, none for IL
    ship = d[(ps.SHIPPED_GROUP, "pgd-at", "pgd_accuracy")]
    assert ship["n_pairs"] == 1 and ship["avg_minus_max"] == pytest.approx(0.02)
    assert ship["ci_low"] < 0.02 < ship["ci_high"] and ship["interval"].startswith("Newcombe")
    assert np.isnan(d[(ps.SHIPPED_GROUP, "pgd-at", "IL_pooling_layers")]["ci_low"])
    assert (ps.SHIPPED_GROUP, "standard", "pgd_accuracy") not in d
    why = {(e["comparison"], e["training"], e["seed"]): e["reason"] for e in excluded}
    assert why[(ps.SEED_GROUP, "standard", 3)] == "no avg-pooling model at seed 3"
    assert "epochs 8 vs 12" in why[(ps.SHIPPED_GROUP, "standard", 0)]
    # a stale checkpoint (its card no longer matches its preset) is left out with the reason
    rows[1]["stale"] = ["epochs 10 in the card, 3 in the preset"]
    diffs, excluded = ps.comparisons(rows)
    assert {r["n_pairs"] for r in diffs if r["comparison"] == ps.SEED_GROUP} == {2}
    assert any("avg0 is stale (epochs 10" in e["reason"] for e in excluded)
    text = ps.note(diffs, excluded, [{"model": "m-s9", "reason": "not shipped"}])
    assert "avg − max" in text and "Not yet available: m-s9" in text and "avg0 is stale" in text


def test_pooling_comparisons_leave_out_pairs_whose_flip_share_is_undefined() -> None:
    rows = [_study_row(f"{p}{s}", p, s, acc) for p, s, acc in
            [("max", 0, 0.30), ("avg", 0, 0.35), ("max", 1, 0.20), ("avg", 1, 0.26), ("max", 2, 0.22),
             ("avg", 2, 0.27)]]  # fmt: skip
    for lr in rows[2]["layers"]:  # max1: no judged adversarial example, so V is undefined
        lr["V"] = math.nan
    d = {r["metric"]: r for r in ps.comparisons(rows)[0]}
    assert d["V_pooling_layers"]["n_pairs"] == 2 and d["V_pooling_layers"]["seeds"] == "0,2"
    assert np.isfinite(d["V_pooling_layers"]["avg_minus_max"])
    assert d["pgd_accuracy"]["n_pairs"] == 3  # the other metrics keep the pair


def test_the_ig1_family_has_three_like_for_like_seeds_per_variant() -> None:
    from robustdissect.resources import read_train_config, train_presets

    fam = ps.family()
    assert all(m.name in train_presets() for m in fam)
    seeds = [m for m in fam if m.group == ps.SEED_GROUP]
    assert len(seeds) == 12 and {m.seed for m in seeds} == {0, 1, 2}
    for training in ps.TRAININGS:
        variant = [m for m in seeds if m.training == training]
        base = read_train_config(variant[0].name)
        for m in variant:  # one schedule: the presets differ only in pooling and seed
            cfg = read_train_config(m.name)
            assert cfg["seed"] == m.seed and cfg["model_args"]["pooling"] == m.pooling
            assert ps.config_differences(cfg, base, ignore=("seed", "model_args.pooling")) == [], m.name
    # the shipped PAT pair: the 20-epoch preset for both, only the pooling differs
    pat, avg_pat = (read_train_config(ps.SHIPPED[("pgd-at", p)]) for p in ("max", "avg"))
    assert pat["epochs"] == 20 and ps.config_differences(pat, avg_pat) == ["model_args.pooling max vs avg"]
    stale = ps.preset_mismatch("fmnist-smallcnn-pat", {**pat, "epochs": 10})
    assert stale == ["epochs 10 in the card, 20 in the preset"]
    assert ps.preset_mismatch("fmnist-smallcnn-pat", pat) == []


def test_pooling_study_rows_resume_skip_unshipped_and_invalidate_on_new_settings(
    tmp_path: Path, fmnist: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import robustdissect.data

    members = [ps.Member("fmnist-smallcnn-ig1-max-pat-s1", ps.SEED_GROUP, "pgd-at", "max", 1),
               ps.Member("fmnist-smallcnn-ig1-avg-pat-s1", ps.SEED_GROUP, "pgd-at", "avg", 1),
               ps.Member("fmnist-smallcnn-ig1-max-pat-s7", ps.SEED_GROUP, "pgd-at", "max", 7)]  # fmt: skip
    monkeypatch.setattr(ps, "family", lambda: members)
    monkeypatch.setattr(robustdissect.data, "load_dataset", lambda *a, **k: fmnist)
    calls: list[tuple[str, float]] = []
    fail_at: list[int] = []

    def fake_row(name: str, model: nn.Module, card: Any, x: torch.Tensor, y: torch.Tensor, x_mean: torch.Tensor,
                 judge: nn.Module, eps: float, *args: Any) -> dict[str, Any]:  # fmt: skip
        if fail_at and len(calls) == fail_at[0]:
            raise KeyboardInterrupt
        calls.append((name, eps))
        assert len(x) == 40
        row = _study_row(name, "max" if "-max-" in name else "avg", 1, 0.5 + eps, training="pgd-at")
        return {**row, "eps": eps, "settings": args[-1]}

    monkeypatch.setattr(ps, "model_row", fake_row)
    argv = ["--out", str(tmp_path), "--n", "40", "--eps", "0.1,0.2"]
    study = ps.run_study(ps.parser().parse_args(argv))
    assert len(calls) == 4 and len(study["models"]) == 4
    assert [s["model"] for s in study["skipped"]] == ["fmnist-smallcnn-ig1-max-pat-s7"]
    assert "not shipped yet" in caplog.text and "--config fmnist-smallcnn-ig1-max-pat-s7" in caplog.text
    stored = json.loads((tmp_path / "models" / "fmnist-smallcnn-ig1-max-pat-s1.json").read_text())["rows"]
    assert {r["settings"]["eps"] for r in stored} == {0.1, 0.2}
    assert stored[0]["settings"]["n"] == 40 and len(stored[0]["settings"]["checkpoint"]) == 64
    assert [d["n_pairs"] for d in study["differences"] if d["metric"] == "pgd_accuracy"] == [1, 1]
    # same settings: every row is reused
    calls.clear()
    ps.run_study(ps.parser().parse_args(argv))
    assert calls == []
    # new settings (PGD steps): every row is recomputed; interrupted after 1 row, the rerun resumes
    calls.clear()
    fail_at.append(1)
    with pytest.raises(KeyboardInterrupt):
        ps.run_study(ps.parser().parse_args([*argv, "--steps", "10"]))
    fail_at.clear()
    ps.run_study(ps.parser().parse_args([*argv, "--steps", "10"]))
    assert len(calls) == 4 and len(set(calls)) == 4
    # a row whose checkpoint changed (retrained model) is recomputed; --cached-only computes nothing
    path = tmp_path / "models" / "fmnist-smallcnn-ig1-avg-pat-s1.json"
    got = json.loads(path.read_text())
    got["rows"][0]["settings"]["checkpoint"] = "0" * 64
    path.write_text(json.dumps(got))
    calls.clear()
    study = ps.run_study(ps.parser().parse_args([*argv, "--steps", "10", "--cached-only"]))
    assert calls == [] and len(study["models"]) == 3
    ps.run_study(ps.parser().parse_args([*argv, "--steps", "10"]))
    assert calls == [("fmnist-smallcnn-ig1-avg-pat-s1", 0.1)]


def test_diagnose_stage_end_to_end(tmp_path: Path, fmnist: Any) -> None:
    from robustdissect.config import RunConfig
    from robustdissect.pipeline import run_pipeline
    from robustdissect.runs import read_table

    stages = {"overview": {}, "diagnose": {"n": 12, "inverter": "optim", "inversion_steps": 5, "resamples": 20,
                                           "show": 2, "steps": 5}}  # fmt: skip
    cfg = RunConfig(model="fmnist-smallcnn-vanilla", n=12, quick=False, stages=stages)
    run = run_pipeline(cfg, tmp_path / "run")
    res = json.loads((run / "results.json").read_text())
    entry = res["stages"]["diagnose"]
    assert entry["judge"] == "fmnist-smallcnn-pat"
    # the evaluate stage's attack, early-stopped, so a run that evaluated reuses its examples
    assert entry["attack"]["early_stop"] is True and entry["attack"]["steps"] == 5
    assert "each image kept at its first successful step" in entry["text"]
    rows = read_table(run / "tables" / "diagnose_layers.csv")
    assert [r["layer"] for r in rows][:4] == ["input", "relu1", "relu2", "pool1"]
    v = [float(r["V"]) for r in rows]
    assert sum(v) <= 1.0 + 1e-9 and all(float(r["V_soft"]) >= 0 for r in rows[1:])
    assert all(np.isfinite(float(r["sigma_ratio"])) for r in rows[1:])
    for f in ("diagnose_layers", "diagnose_strips"):
        assert (run / "figures" / f"{f}.png").is_file()
    assert "Layer diagnosis" in (run / "report.html").read_text()
    # the IG-1 study shipped in the package is shown: avg - max per training, eps and metric
    diffs = read_table(run / "tables" / "diagnose_ig1_differences.csv")
    assert {(r["training"], float(r["eps"])) for r in diffs} == {("standard", 0.1), ("standard", 0.2),
                                                                 ("pgd-at", 0.1), ("pgd-at", 0.2)}  # fmt: skip
    assert (run / "figures" / "diagnose_ig1.png").is_file() and "IG-1" in entry["text"]


def test_diagnose_stage_with_decoders_keeps_them_as_evidence(tmp_path: Path, fmnist: Any) -> None:
    from robustdissect.config import RunConfig
    from robustdissect.pipeline import run_pipeline
    from robustdissect.store import list_evidence

    stages = {"diagnose": {"n": 8, "inverter": "decoder", "decoder_n": 64, "decoder_epochs": 1, "resamples": 10,
                           "show": 1, "steps": 3}}  # fmt: skip
    run = run_pipeline(RunConfig(model="fmnist-smallcnn-vanilla", n=8, quick=False, stages=stages), tmp_path / "run")
    entry = json.loads((run / "results.json").read_text())["stages"]["diagnose"]
    layers = [r["layer"] for r in entry["layers"][1:]]
    assert entry["inverter"]["method"] == "decoder" and entry["inverter"]["reduction"] == "sum"
    assert sorted(entry["decoders"]["trained"]) == sorted(layers) and entry["decoders"]["loaded"] == []
    cards = {e["parts"]["layer"]: e["parts"] for e in list_evidence(run) if e["kind"] == "decoder"}
    assert set(cards) == set(layers)
    assert cards["pool1"]["n_train"] == 64 and cards["pool1"]["settings"]["batch_size"] == 32
    assert "decoders G_l trained on 64 clean images" in entry["text"]
    assert all(r["R"] >= 0.0 for r in entry["layers"][1:])


def test_diagnose_cli_without_early_stop_attacks_to_the_last_step(tmp_path: Path, cli: Any) -> None:
    from robustdissect.attacks import make_attack
    from robustdissect.evaluation import EvaluateOptions

    out = tmp_path / "deep"
    code, _out, err = cli(["diagnose", "--n", "8", "--steps", "4", "--no-early-stop", "--inverter", "optim",
                           "--inversion-steps", "2", "--out", str(out)])  # fmt: skip
    assert code == 0, err
    entry = json.loads((out / "results.json").read_text())["stages"]["diagnose"]
    assert entry["attack"]["early_stop"] is False and entry["attack"]["steps"] == 4
    assert "every step run, the highest-loss successful iterate kept" in entry["text"]
    # the same PGD as the evaluate stage's otherwise: its step rule and budget
    ev = EvaluateOptions()
    reference = make_attack("pgd-linf", eps=0.1, steps=4, step_rule=ev.step_rule, early_stop=False).describe()
    assert {k: entry["attack"][k] for k in ("eps", "alpha", "step_rule", "keep")} == {
        k: reference[k] for k in ("eps", "alpha", "step_rule", "keep")
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["diagnose", "--inverter", "gan"], "inverter must be one of"),
        (["diagnose", "--layers", "pool9"], "pool9"),
        (["diagnose", "--judge", "fmnist-smallcnn-pta"], "fmnist-smallcnn-pta"),
        (["diagnose", "--study", "no-such-folder"], "no IG-1 study in no-such-folder"),
    ],
)
def test_cli_mistakes_are_one_line_and_leave_nothing(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from robustdissect.cli import main

    out_dir = tmp_path / "out"
    try:
        main([*args, "--n", "10", "--out", str(out_dir)])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    _out, err = capsys.readouterr()
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_no_adversarial_example_gives_undefined_vulnerability_not_an_error() -> None:
    model = _tiny()
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        pred = model(x).argmax(1)
    from robustdissect.analysis.diagnose import diagnose

    inv = OptimisationInverter(model, x.mean(0), InversionSettings(steps=2))
    # the "attack" changed nothing: no prediction flips, M = 0
    d = diagnose(model, x, pred, x.clone(), pred, ["1", "2"], inv, model, x.mean(0), resamples=5, show=2)
    assert d.vulnerability.y.numel() == 0 and d.adv_strips.shape[0] == 0
    assert np.isnan(d.vulnerability.V()).all() and np.isnan(d.vulnerability.V_soft()).all()
    assert all(np.isnan(c.rho) for c in d.correlations)
    assert len(d.layer_rows()) == 3
