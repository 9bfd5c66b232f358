"""Attack strength on the shipped fmnist-smallcnn-vanilla checkpoint (Fashion-MNIST test split).

The data is required: a missing dataset fails (fixture `fmnist` in conftest), it is never skipped.
Black-box and C&W budgets are reduced to keep the file fast; the assertions stay meaningful.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from robustdissect.attacks import APGD, ATTACKS, CW, PGD, GaussianNoise, NAttack, make_attack
from robustdissect.data import Dataset

EPS = 0.1


@pytest.fixture(scope="module")
def batch(fmnist: Dataset) -> tuple[Tensor, Tensor]:
    s = fmnist.test.subset(200, seed=0)
    return s.x, s.y


def _clean(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_pgd20_breaks_the_vanilla_model(shipped_vanilla: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch
    assert _clean(shipped_vanilla, x, y) > 0.85
    res = PGD(eps=EPS, steps=20, step_rule="madry")(shipped_vanilla, x, y)
    assert res.robust_accuracy < 0.10
    assert float((res.x_adv - x).abs().max()) <= EPS + 1e-6


def test_apgd_ce_and_dlr_far_below_clean(shipped_vanilla: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch[0][:100], batch[1][:100]
    clean = _clean(shipped_vanilla, x, y)
    for loss in ("ce", "dlr"):
        acc = APGD(eps=EPS, loss=loss, steps=10)(shipped_vanilla, x, y).robust_accuracy
        assert acc < clean - 0.5, (loss, acc, clean)


def test_cw_far_below_clean(shipped_vanilla: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch[0][:32], batch[1][:32]
    clean = _clean(shipped_vanilla, x, y)
    res = CW(c0=0.1, search_steps=2, steps=30, lr=0.05)(shipped_vanilla, x, y)
    assert res.robust_accuracy < clean - 0.5
    broken = res.success
    # C&W finds small perturbations: median L2 well below the L2 budget of the paper setting (1.5)
    assert float((res.x_adv - x)[broken].flatten(1).norm(dim=1).median()) < 1.5


def test_nattack_clearly_below_clean(shipped_vanilla: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch[0][:10], batch[1][:10]
    clean = _clean(shipped_vanilla, x, y)
    res = NAttack(eps=EPS, population=50, iterations=15, lr=0.03)(shipped_vanilla, x, y)
    assert res.robust_accuracy <= clean - 0.3
    assert float((res.x_adv - x).abs().max()) <= EPS + 1e-6


def test_gaussian_noise_degrades_with_severity(shipped_vanilla: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch
    accs = [GaussianNoise(s, scale="fmnist")(shipped_vanilla, x, y).robust_accuracy for s in range(6)]
    assert accs[0] == _clean(shipped_vanilla, x, y)
    assert all(b <= a for a, b in itertools.pairwise(accs)), accs
    assert accs[5] < accs[0] - 0.3


LARGE: dict[str, dict[str, Any]] = {
    "fgsm": {"eps": 0.3},
    "pgd-linf": {"eps": 0.3, "steps": 5},
    "pgd-l2": {"eps": 3.0, "steps": 5},
    "cw-l2": {"c0": 1.0, "search_steps": 1, "steps": 20, "lr": 0.05},
    "spsa": {"eps": 0.3, "n_samples": 32, "iterations": 5},
    "nattack": {"eps": 0.3, "population": 32, "iterations": 5, "lr": 0.05},
    "apgd-ce": {"eps": 0.3, "steps": 5},
    "apgd-dlr": {"eps": 0.3, "steps": 5},
    "square-linf": {"eps": 0.3, "queries": 50},
    "square-l2": {"eps": 3.0, "queries": 50},
}


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_strictly_lowers_accuracy_at_large_budget(
    name: str, shipped_vanilla: nn.Module, batch: tuple[Tensor, Tensor]
) -> None:
    attack = make_attack(name, **LARGE.get(name, {"severity": 5}))
    # Corruptions are cheap: all 200 images, on which even JPEG at severity 5 costs accuracy.
    x, y = (batch[0][:24], batch[1][:24]) if attack.adversarial else batch
    res = attack(shipped_vanilla, x, y)
    clean = _clean(shipped_vanilla, x, y)
    if attack.adversarial:
        assert res.robust_accuracy < clean - 0.2, (name, res.robust_accuracy, clean)
    else:
        assert res.robust_accuracy < clean, (name, res.robust_accuracy, clean)
