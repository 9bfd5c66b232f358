"""Layer diagnosis (METHODS §1.7): the 0.75 oracle of a 2x2 mean, max against avg pooling for a
learned decoder, the invariants of V_l, V_l^soft and A_l, decoders resumed bit-identically, the
flip layer and the correlation on cases with known answers, and the stage end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
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
from robustdissect.analysis.pooling_study import differences


def test_mean_of_a_2x2_gaussian_block_reconstructs_with_mse_075() -> None:
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
        assert (tmp_path / "resumed" / f"{layer}.safetensors").read_bytes() == (
            tmp_path / "full" / f"{layer}.safetensors"
        ).read_bytes()
    card = json.loads((tmp_path / "full" / "2.json").read_text())
    assert card["feature_shape"] == [4, 4, 4] and card["image_shape"] == [1, 8, 8]
    # other settings: the checkpoint is not reused
    other = DecoderBank(model, tmp_path / "full", x, DecoderSettings(epochs=1, batch_size=16, seed=3))
    other.decoder("1")
    assert other.trained == ["1"]


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


def test_pooling_differences_pair_seeds() -> None:
    def row(pooling: str, seed: int, acc: float, schedule: str = "3 epochs") -> dict[str, Any]:
        return {"model": f"{pooling}{seed}", "pooling": pooling, "training": "standard", "seed": seed, "eps": 0.1,
                "schedule": schedule, "pgd_accuracy": acc, "clean_accuracy": 0.9,
                "layers": [{"layer": "pool1", "IL": 0.2 if pooling == "max" else 0.1, "V": 0.1,
                            "V_soft": 0.1}]}  # fmt: skip

    rows = [row("max", 0, 0.30, "8"), row("avg", 0, 0.35, "12"), row("max", 1, 0.20), row("avg", 1, 0.26),
            row("max", 2, 0.22), row("avg", 2, 0.27)]  # fmt: skip
    d = {(r["pairs"], r["metric"]): r for r in differences(rows)}
    pgd = d[("all pairs", "pgd_accuracy")]
    assert pgd["n_pairs"] == 3 and pgd["max_minus_avg"] == pytest.approx(np.mean([-0.05, -0.06, -0.05]))
    assert pgd["ci_low"] < pgd["max_minus_avg"] < pgd["ci_high"] < 0
    assert d[("like-for-like pairs", "pgd_accuracy")]["n_pairs"] == 2
    assert d[("all pairs", "IL_pooling_layers")]["max_minus_avg"] == pytest.approx(0.1)


def test_diagnose_stage_end_to_end(tmp_path: Path, fmnist: Any) -> None:
    from robustdissect.config import RunConfig
    from robustdissect.pipeline import run_pipeline
    from robustdissect.runs import read_table

    study = Path(__file__).resolve().parents[1] / "docs" / "results" / "ig1"
    stages = {"overview": {}, "diagnose": {"n": 12, "inversion_steps": 5, "resamples": 20, "show": 2, "steps": 5,
                                           "study": str(study)}}  # fmt: skip
    cfg = RunConfig(model="fmnist-smallcnn-vanilla", n=12, quick=False, stages=stages)
    run = run_pipeline(cfg, tmp_path / "run")
    res = json.loads((run / "results.json").read_text())
    entry = res["stages"]["diagnose"]
    assert entry["judge"] == "fmnist-smallcnn-pat"
    rows = read_table(run / "tables" / "diagnose_layers.csv")
    assert [r["layer"] for r in rows][:4] == ["input", "relu1", "relu2", "pool1"]
    v = [float(r["V"]) for r in rows]
    assert sum(v) <= 1.0 + 1e-9 and all(float(r["V_soft"]) >= 0 for r in rows[1:])
    assert all(np.isfinite(float(r["sigma_ratio"])) for r in rows[1:])
    for f in ("diagnose_layers", "diagnose_strips"):
        assert (run / "figures" / f"{f}.png").is_file()
    assert "Layer diagnosis" in (run / "report.html").read_text()
    # the committed IG-1 study is shown: max - avg per training, eps and metric
    diffs = read_table(run / "tables" / "diagnose_ig1_differences.csv")
    assert {(r["training"], float(r["eps"])) for r in diffs} == {("standard", 0.1), ("standard", 0.2),
                                                                 ("pgd-at", 0.1), ("pgd-at", 0.2)}  # fmt: skip
    assert (run / "figures" / "diagnose_ig1.png").is_file() and "IG-1" in entry["text"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["diagnose", "--inverter", "gan"], "inverter must be one of"),
        (["diagnose", "--layers", "pool9"], "pool9"),
        (["diagnose", "--judge", "fmnist-smallcnn-pta"], "fmnist-smallcnn-pta"),
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
