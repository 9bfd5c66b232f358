"""Gradient-masking checks warn only on evidence: a model robust well beyond eps (flat PGD-k
curve, broken at a larger eps) gets no warning; masked and saturated models do, and each
warning names its check and how sure it is."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from robustdissect.attacks import check_black_box_breaks, check_more_steps, masking_checks


class Scaled(nn.Module):
    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.inner(x) * self.scale
        return out


def test_steps_check_needs_a_larger_eps_to_agree() -> None:
    flat = {1: 0.975, 20: 0.975}
    assert check_more_steps(flat, eps_curve={0.1: 0.975, 0.5: 0.0}) == []  # robust beyond eps
    strong = check_more_steps(flat, eps_curve={0.1: 0.975, 0.5: 0.6})
    assert len(strong) == 1 and "[more steps; strong evidence]" in strong[0] and "60.0%" in strong[0]
    weak = check_more_steps(flat)
    assert len(weak) == 1 and "[more steps; weak evidence]" in weak[0]
    assert check_more_steps({1: 0.0, 20: 0.0}, eps_curve={0.5: 0.9}) == []  # already broken
    assert check_more_steps({1: 0.6, 20: 0.3}, eps_curve={0.5: 0.9}) == []  # steps help
    rising = check_more_steps({1: 0.3, 20: 0.4}, eps_curve={0.5: 0.0})
    assert len(rising) == 1 and "[more steps; moderate evidence]" in rising[0]


def test_black_box_breaks_grades_its_evidence() -> None:
    assert check_black_box_breaks("square-linf", 0, 150, 200) == []
    assert "[black box beats white box; weak evidence]" in check_black_box_breaks("square-linf", 1, 150, 200)[0]
    w = check_black_box_breaks("square-linf", 4, 150, 200)
    assert "strong evidence" in w[0] and "4 of the 150" in w[0] and "2.0%" in w[0]


@pytest.fixture(scope="module")
def batch(fmnist: Any) -> tuple[Tensor, Tensor]:
    return fmnist.test.x[:40], fmnist.test.y[:40]


def test_a_model_robust_beyond_eps_gets_no_warning(batch: tuple[Tensor, Tensor]) -> None:
    """The PAT model (trained at eps 0.1) at eps 0.02: PGD-1 and PGD-20 agree, as they did for
    the issue's LeNet trained at 3x the eps, and eps 0.5 breaks it: no masking."""
    from robustdissect.models import load_checkpoint

    pat = load_checkpoint("fmnist-smallcnn-pat")[0]
    x, y = batch
    report = masking_checks(pat, x, y, eps=0.02, steps_values=(1, 20), eps_values=(0.02,), large_eps=0.5)
    steps = report.accuracy_vs_steps
    assert steps[1] == steps[20] > 0.5  # the flat curve that used to trip the steps check
    assert check_more_steps(steps)  # on its own (no larger eps) it is still reported, as weak evidence
    assert report.accuracy_vs_eps[0.5] <= 0.05
    assert report.warnings == []


@pytest.mark.parametrize("scale", [1e4, 100.0])
def test_saturated_softmax_models_are_flagged(scale: float, batch: tuple[Tensor, Tensor],
                                             shipped_vanilla: nn.Module) -> None:  # fmt: skip
    """Logits x 1e4 (the existing case) and x 100 (a saturated-softmax net that keeps some
    gradient): the zero-gradient check and the agreeing steps / large-eps checks fire."""
    x, y = batch
    report = masking_checks(Scaled(shipped_vanilla, scale), x, y, eps=0.1, steps_values=(1, 20), eps_values=(0.1,),
                            large_eps=0.5)  # fmt: skip
    text = "\n".join(report.warnings)
    assert "[zero gradients; strong evidence]" in text
    assert "[more steps; strong evidence]" in text and "[large eps;" in text
    assert all(w.startswith("gradient masking? [") for w in report.warnings)
    with torch.no_grad():
        clean = float((shipped_vanilla(x).argmax(1) == y).float().mean())
    assert report.accuracy_vs_steps[20] >= clean - 0.2  # PGD barely moves it: that is what is flagged
