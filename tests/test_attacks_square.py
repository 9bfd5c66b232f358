"""Square attack oracles: budget and box, honest success flags, determinism, per-sample early
stop, the paper's p schedule, and breaking a weak model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from robustdissect.attacks import SampleRandom, Square, get_threat, make_attack
from robustdissect.attacks.square import meta_pattern, p_schedule
from robustdissect.errors import UserError


@pytest.fixture(scope="module")
def batch(fmnist: Any) -> tuple[Tensor, Tensor]:
    return fmnist.test.x[:64], fmnist.test.y[:64]


class Counting(nn.Module):
    """Wraps a model and counts the images it is asked about."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.images = 0

    def forward(self, x: Tensor) -> Tensor:
        self.images += x.shape[0]
        out: Tensor = self.inner(x)
        return out


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("linf", 0.03), ("l2", 1.5), ("l2", 0.5)])
def test_budget_box_and_honest_success(
    norm: str, eps: float, shipped_vanilla: nn.Module, batch: tuple[Tensor, Tensor]
) -> None:
    x, y = batch
    res = Square(eps, norm=norm, queries=60)(shipped_vanilla, x, y)
    dist = get_threat(norm).distance(res.x_adv, x)
    assert float(dist.max()) <= eps * (1 + 1e-5) + 1e-6
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    with torch.no_grad():
        pred = shipped_vanilla(res.x_adv).argmax(1)
        clean = shipped_vanilla(x).argmax(1) == y
    assert torch.equal(res.success, pred != y)  # success exactly where the model misclassifies x_adv
    assert torch.equal(res.correct, pred == y)
    assert bool((res.correct <= clean).all())  # never robust where the clean image is already wrong
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_same_seed_same_output_other_seed_other_search(norm: str, shipped_vanilla: nn.Module,
                                                        batch: tuple[Tensor, Tensor]) -> None:  # fmt: skip
    x, y = batch[0][:16], batch[1][:16]
    a = Square(0.03 if norm == "linf" else 0.5, norm=norm, queries=20, seed=3)(shipped_vanilla, x, y)
    b = Square(0.03 if norm == "linf" else 0.5, norm=norm, queries=20, seed=3)(shipped_vanilla, x, y)
    c = Square(0.03 if norm == "linf" else 0.5, norm=norm, queries=20, seed=4)(shipped_vanilla, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    assert not torch.equal(a.x_adv, c.x_adv)


@pytest.mark.parametrize(("norm", "eps", "queries"), [("linf", 0.1, 150), ("l2", 2.0, 300)])
def test_breaks_the_vanilla_model(
    norm: str, eps: float, queries: int, shipped_vanilla: nn.Module, batch: tuple[Tensor, Tensor]
) -> None:
    x, y = batch
    with torch.no_grad():
        clean = float((shipped_vanilla(x).argmax(1) == y).float().mean())
    res = make_attack(f"square-{norm}", eps=eps, queries=queries)(shipped_vanilla, x, y)
    assert clean > 0.8 and res.robust_accuracy < 0.25


def test_linf_starts_from_vertical_stripes(batch: tuple[Tensor, Tensor]) -> None:
    """Every pixel of the stripe start moved by eps where the box allows, one sign per column."""
    x = batch[0][:32]
    eps = 0.1
    init = Square(eps, queries=1)._init(x, SampleRandom.for_images(x.shape[0], 0, x.device))
    d = init - x
    inside = ((x - eps) >= 0) & ((x + eps) <= 1)
    assert torch.allclose(d[inside].abs(), torch.full_like(d[inside], eps), atol=1e-6)
    col_sign = torch.sign(d).where(inside, torch.zeros_like(d))
    # one sign per column: no column holds both +eps and -eps moves
    assert not bool(((col_sign > 0).any(dim=2) & (col_sign < 0).any(dim=2)).any())


def test_per_sample_early_stop_and_batched_queries(shipped_vanilla: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch[0][:32], batch[1][:32]
    counted = Counting(shipped_vanilla)
    queries = 40
    res = Square(0.1, queries=queries)(counted, x, y)
    broken = int(res.success.sum())
    assert broken >= 20
    # a full search would query every image `queries` times; broken images leave the search
    full = x.shape[0] * (queries + 1)
    assert counted.images < 0.5 * full


def test_p_schedule_and_meta_pattern() -> None:
    assert p_schedule(0.8, 0, 10000) == 0.8 and p_schedule(0.8, 10, 10000) == 0.8
    assert p_schedule(0.8, 11, 10000) == 0.4 and p_schedule(0.8, 51, 10000) == 0.2
    assert p_schedule(0.8, 9999, 10000) == pytest.approx(0.8 / 512)
    assert p_schedule(0.8, 2, 1000) == 0.4  # rescaled: iteration 2 of 1,000 is 20 of 10,000
    for s in (3, 5, 7, 11):
        m = meta_pattern(s)
        assert m.shape == (s, s) and float(m.norm()) == pytest.approx(1.0, abs=1e-5)
        assert bool((m[: s // 2] > 0).all()) and bool((m[s // 2 :] < 0).all())
        # the bump peaks in the centre of each half
        top = m[: s // 2]
        assert float(top.max()) == float(top[(s // 2) // 2, s // 2])


def test_bad_settings() -> None:
    with pytest.raises(UserError, match="queries"):
        Square(0.1, queries=0)
    with pytest.raises(UserError, match="p_init"):
        Square(0.1, p_init=1.5)
    with pytest.raises(UserError, match="norm"):
        Square(0.1, norm="l1")
