"""Contracts that every registered attack keeps (parametrised over the whole registry)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from robustdissect.attacks import ATTACKS, Attack, SampleRandom, SearchOutput, make_attack
from robustdissect.errors import UserError

# Small budgets so the whole file runs in seconds; every registered attack needs an entry.
FAST: dict[str, dict[str, Any]] = {
    "fgsm": {"eps": 0.1},
    "pgd-linf": {"eps": 0.1, "steps": 3},
    "pgd-l2": {"eps": 0.5, "steps": 3},
    "cw-l2": {"steps": 8, "search_steps": 2, "c0": 1.0},
    "spsa": {"eps": 0.1, "n_samples": 8, "iterations": 3},
    "nattack": {"eps": 0.1, "population": 8, "iterations": 3},
    "apgd-ce": {"eps": 0.1, "steps": 5},
    "apgd-dlr": {"eps": 0.1, "steps": 5},
    "square-linf": {"eps": 0.1, "queries": 12},
    "square-l2": {"eps": 0.5, "queries": 12},
    "gaussian-noise": {"severity": 3},
    "shot-noise": {"severity": 3},
    "impulse-noise": {"severity": 3},
    "gaussian-blur": {"severity": 3},
    "contrast": {"severity": 3},
    "brightness": {"severity": 3},
    "jpeg": {"severity": 3},
}
NAMES = ATTACKS.names()
# Extra configurations that exercise other code paths of the same attacks.
CASES = [(n, FAST.get(n, {})) for n in NAMES] + [
    ("cw-l2", {**FAST["cw-l2"], "eps": 0.4}),
    ("apgd-ce", {**FAST["apgd-ce"], "norm": "l2", "eps": 0.5}),
    ("pgd-linf", {**FAST["pgd-linf"], "restarts": 2, "random_start": False}),
]
CASE_IDS = [f"{n}-{i}" if i >= len(NAMES) else n for i, (n, _) in enumerate(CASES)]


def build(name: str, **over: Any) -> Attack:
    return make_attack(name, **{**FAST.get(name, {}), **over})


class Net(nn.Module):
    """1x8x8 -> conv -> BN -> ReLU -> pool -> linear(4); records the training flag it runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 4)
        self.seen_training: set[bool] = set()

    def forward(self, x: Tensor) -> Tensor:
        self.seen_training.add(self.training or self.bn.training)
        return self.fc(self.pool(self.relu(self.bn(self.conv(x)))).flatten(1))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def data(net: Net) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(10, 1, 8, 8, generator=g)
    x[0] = 0.0  # edge of the box
    x[1] = 1.0
    with torch.no_grad():
        y = net(x).argmax(1)
    y[-3:] = (y[-3:] + 1) % 4  # three clean errors
    return x, y


def _hooks_of(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            n += len(getattr(m, attr, {}))
    import torch.nn.modules.module as mm

    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        n += len(getattr(mm, attr, {}))
    return n


def test_every_registered_attack_has_fast_settings() -> None:
    assert set(NAMES) == set(FAST), "add small settings for new attacks to FAST"
    assert {"fgsm", "pgd-linf", "pgd-l2", "cw-l2", "spsa", "nattack", "apgd-ce", "apgd-dlr"} <= set(NAMES)
    assert {"gaussian-noise", "shot-noise", "impulse-noise", "gaussian-blur", "contrast", "brightness", "jpeg"} <= set(
        NAMES
    )


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_output_shape_dtype_device_and_box(
    name: str, kwargs: dict[str, Any], net: Net, data: tuple[Tensor, Tensor]
) -> None:
    x, y = data
    attack = make_attack(name, **kwargs)
    res = attack(net, x, y)
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype and res.x_adv.device == x.device
    assert res.success.shape == (10,) and res.success.dtype == torch.bool
    assert res.correct.shape == (10,) and res.logits.shape == (10, 4)
    assert not res.x_adv.requires_grad
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert bool(torch.isfinite(res.logits).all())
    with torch.no_grad():
        torch.testing.assert_close(res.logits, net(res.x_adv), atol=1e-5, rtol=1e-5)
    assert torch.equal(res.success, res.logits.argmax(1) != y)
    assert torch.equal(res.correct, res.logits.argmax(1) == y)
    if attack.norm == "linf":
        assert float((res.x_adv - x).abs().max()) <= attack.eps + 1e-6
    elif attack.norm == "l2" and math.isfinite(attack.eps):
        assert float((res.x_adv - x).flatten(1).norm(dim=1).max()) <= attack.eps + 1e-6
    else:
        assert attack.norm is None or name == "cw-l2"


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_same_seed_same_output(name: str, kwargs: dict[str, Any], net: Net, data: tuple[Tensor, Tensor]) -> None:
    x, y = data
    attack = make_attack(name, **kwargs)
    a = attack(net, x, y, seed=3)
    b = attack(net, x, y, seed=3)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    c = attack(net, x, y)  # default seed: the attack's own (0)
    d = attack(net, x, y, seed=0)
    assert torch.equal(c.x_adv, d.x_adv)


@pytest.mark.parametrize("name", NAMES)
def test_modes_and_requires_grad_restored(name: str, net: Net, data: tuple[Tensor, Tensor]) -> None:
    x, y = data
    net.train()
    net.bn.eval()  # a mixed state must come back exactly
    net.conv.bias.requires_grad_(False)
    before_modes = [m.training for m in net.modules()]
    before_flags = [p.requires_grad for p in net.parameters()]
    grad_mode = torch.is_grad_enabled()
    net.seen_training.clear()
    build(name)(net, x, y)
    assert net.seen_training == {False}, "the attack must run the model in eval mode"
    assert [m.training for m in net.modules()] == before_modes
    assert [p.requires_grad for p in net.parameters()] == before_flags
    assert all(p.grad is None for p in net.parameters()), "attacks must not accumulate parameter gradients"
    assert torch.is_grad_enabled() == grad_mode
    assert _hooks_of(net) == 0


class Exploding(Net):
    """Raises inside forward on the given call (0 = the first)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls > self.fail_at:
            raise RuntimeError("boom")
        return super().forward(x)


@pytest.mark.parametrize("fail_at", [0, 1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_exception_inside_forward_restores_everything(name: str, fail_at: int, data: tuple[Tensor, Tensor]) -> None:
    x, y = data
    torch.manual_seed(0)
    attack = build(name)
    net = Exploding(fail_at if attack.adversarial else min(fail_at, 1))  # corruptions call the model twice
    net.train()
    flags = [p.requires_grad for p in net.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        attack(net, x, y)
    assert net.training and all(m.training for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == flags
    assert _hooks_of(net) == 0
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("name", NAMES)
def test_zero_budget_returns_input_exactly(name: str, net: Net, data: tuple[Tensor, Tensor]) -> None:
    x, y = data
    attack = build(name, severity=0) if "severity" in FAST[name] else build(name, eps=0.0)
    res = attack(net, x, y)
    assert torch.equal(res.x_adv, x)
    assert res.x_adv.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("name", NAMES)
def test_robust_accuracy_not_above_clean(name: str, net: Net, data: tuple[Tensor, Tensor]) -> None:
    x, y = data
    attack = build(name)
    res = attack(net, x, y)
    with torch.no_grad():
        clean_correct = net(x).argmax(1) == y
    if attack.adversarial:
        # per sample: correct after the attack implies correct before it
        assert not bool((res.correct & ~clean_correct).any())
        assert res.robust_accuracy <= float(clean_correct.float().mean())
    else:
        assert attack.norm is None and math.isinf(attack.eps)


@pytest.mark.parametrize("name", NAMES)
def test_describe_is_json_and_complete(name: str, net: Net, data: tuple[Tensor, Tensor]) -> None:
    attack = build(name)
    d = attack.describe()
    assert d["name"] == name and "norm" in d and "eps" in d and "white_box" in d and d["seed"] == 0
    json.dumps(d, allow_nan=False)
    res = attack(net, *data)
    json.dumps(res.describe(), allow_nan=False)
    assert res.describe()["n"] == 10
    assert name in repr(attack) or type(attack).__name__ in repr(attack)


@pytest.mark.parametrize("name", [n for n in NAMES if not make_attack(n).white_box])
def test_black_box_attacks_never_need_gradients(name: str, net: Net, data: tuple[Tensor, Tensor]) -> None:
    class NoGrad(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            assert not torch.is_grad_enabled(), "a black-box attack ran the model with autograd on"
            assert not x.requires_grad
            return self.inner(x)

    build(name)(NoGrad(net), *data)


@pytest.mark.parametrize("name", NAMES)
def test_targets(name: str, net: Net, data: tuple[Tensor, Tensor]) -> None:
    x, y = data
    attack = build(name)
    targets = (y + 1) % 4
    if not attack.supports_targeted:
        with pytest.raises(UserError, match="targeted"):
            attack(net, x, y, targets=targets)
        with pytest.raises(UserError):
            build(name, target="random")
        return
    res = attack(net, x, y, targets=targets)
    assert res.targets is not None and torch.equal(res.targets, targets)
    assert torch.equal(res.success, res.logits.argmax(1) == targets)
    with torch.no_grad():
        clean_correct = net(x).argmax(1) == y
    assert not bool((res.correct & ~clean_correct).any())
    for mode in ("random", "least-likely"):
        r = build(name, target=mode)(net, x, y)
        assert r.targets is not None and bool((r.targets != y).all() or mode == "least-likely")
    r1 = build(name, target="random")(net, x, y, seed=5)
    r2 = build(name, target="random")(net, x, y, seed=5)
    assert r1.targets is not None and r2.targets is not None and torch.equal(r1.targets, r2.targets)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_batches(name: str, net: Net, data: tuple[Tensor, Tensor]) -> None:
    x, y = data
    res = build(name, batch_size=4)(net, x, y)
    assert res.x_adv.shape == x.shape and res.logits.shape == (10, 4)
    again = build(name, batch_size=4)(net, x, y)
    assert torch.equal(res.x_adv, again.x_adv)


def test_input_validation(net: Net, data: tuple[Tensor, Tensor]) -> None:
    x, y = data
    pgd = build("pgd-linf")
    for bad_x, msg in [
        (x * 255, r"\[0, 1\]"),
        (x - 0.5, r"\[0, 1\]"),
        (x[0], "N, C, H, W"),
        ((x * 255).to(torch.uint8), "floating"),
        (x.clone().fill_(float("nan")), "NaN"),
        (x[:0], "no images"),
        ("x", "torch.Tensor"),
    ]:
        with pytest.raises(UserError, match=msg):
            pgd(net, bad_x, y[: len(bad_x)] if isinstance(bad_x, Tensor) and bad_x.dim() == 4 else y)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="shape"):
        pgd(net, x, y[:3])
    with pytest.raises(UserError, match="integer"):
        pgd(net, x, y.float())
    with pytest.raises(UserError, match=r"\[0, 3\]"):
        pgd(net, x, y + 4)
    with pytest.raises(UserError, match="targets"):
        pgd(net, x, y, targets=y[:2])
    with pytest.raises(UserError, match="logits"):
        pgd(nn.Identity(), x, y)


def test_bad_settings_are_user_errors() -> None:
    with pytest.raises(UserError, match="eps"):
        make_attack("pgd-linf", eps=-0.1)
    with pytest.raises(UserError, match="steps"):
        make_attack("pgd-linf", steps=0)
    with pytest.raises(UserError, match="step_rule"):
        make_attack("pgd-l2", step_rule="fast")
    with pytest.raises(UserError, match="target"):
        make_attack("pgd-linf", target="most-likely")
    with pytest.raises(UserError, match="severity"):
        make_attack("jpeg", severity=6)
    with pytest.raises(UserError, match="no parameter"):
        make_attack("fgsm", steps=3)
    with pytest.raises(UserError, match="pgd-linf"):
        make_attack("pgd-lnf")


def test_works_under_no_grad_and_inference_mode(net: Net, data: tuple[Tensor, Tensor]) -> None:
    x, y = data
    pgd = build("pgd-linf")
    ref = pgd(net, x, y)
    with torch.no_grad():
        a = pgd(net, x, y)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        b = pgd(net, xi, yi)
    assert torch.equal(a.x_adv, ref.x_adv) and torch.equal(b.x_adv, ref.x_adv)


def test_call_is_final() -> None:
    with pytest.raises(TypeError, match="__call__"):

        class Bad(Attack):
            def __call__(self, *a: Any, **k: Any) -> Any:  # type: ignore[override]
                return None

            def _search(self, model: nn.Module, x: Tensor, y: Tensor, t: Tensor | None, g: SampleRandom) -> Tensor:
                return x


def test_search_output_outside_ball_is_projected(net: Net, data: tuple[Tensor, Tensor]) -> None:
    """A search that returns garbage outside the ball still yields a point inside it."""

    class Wild(Attack):
        def __init__(self) -> None:
            super().__init__(name="wild", norm="l2", eps=0.3)

        def _search(self, model: nn.Module, x: Tensor, y: Tensor, t: Tensor | None, g: SampleRandom) -> SearchOutput:
            far = x + 5 * g.randn(*x.shape[1:])
            return SearchOutput(far, logits=torch.zeros(x.shape[0], 4))  # stale logits must be ignored

    x, y = data
    res = Wild()(net, x, y)
    assert float((res.x_adv - x).flatten(1).norm(dim=1).max()) <= 0.3 + 1e-6
    with torch.no_grad():
        torch.testing.assert_close(res.logits, net(res.x_adv))
