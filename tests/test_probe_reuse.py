"""Modules called more than once per forward pass: call counts, refusal to record them, their
exclusion from the default layer lists, and the hook-point wording of layers."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from torch import nn

from robustdissect.analysis.sensitivity import neuron_sensitivity
from robustdissect.errors import ReusedModuleError, UserError
from robustdissect.models import build_model
from robustdissect.models.layers import default_conv_layers, hook_description, list_layers, reused_layers
from robustdissect.probe import call_counts, probe_pairs, record


class _Block(nn.Module):
    """conv-bn-relu-conv-bn + identity, one ReLU module called twice (torchvision's BasicBlock)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class _ResNetLike(nn.Module):
    """1x8x8 -> conv(2) -> relu -> block -> gap -> linear(3)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.act = nn.ReLU()
        self.block = _Block(2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.block(self.act(self.stem(x))))))


class _Thrice(nn.Module):
    """One activation module called three times; optional zoo-style aliases."""

    layer_aliases: dict[str, str]

    def __init__(self, act: nn.Module | None = None, aliases: dict[str, str] | None = None) -> None:
        super().__init__()
        self.act = nn.Tanh() if act is None else act
        self.layer_aliases = aliases or {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.act(self.act(x)) + 1.0).mean((1, 2, 3)).unsqueeze(1)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def net() -> _ResNetLike:
    torch.manual_seed(0)
    return _ResNetLike().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_call_counts_names_the_reused_relu(net: _ResNetLike, x: torch.Tensor) -> None:
    net.train()
    counts = call_counts(net, x)
    assert counts == {
        "stem": 1,
        "act": 1,
        "block": 1,
        "block.conv1": 1,
        "block.bn1": 1,
        "block.relu": 2,
        "block.conv2": 1,
        "block.bn2": 1,
        "pool": 1,
        "flat": 1,
        "fc": 1,
    }
    assert net.training and net.block.bn1.training  # modes restored
    assert _hook_count(net) == 0
    assert call_counts(_Thrice(), x)["act"] == 3
    with pytest.raises(UserError, match="at least one input image"):
        call_counts(net, x[:0])


def test_call_counts_without_reuse() -> None:
    cnn = build_model("smallcnn", width=4)
    counts = call_counts(cnn, torch.rand(2, 1, 28, 28))
    called = {p for p, n in counts.items() if n}
    assert set(counts.values()) == {1}
    assert {"conv1.conv", "conv1.bn", "conv1.relu", "conv6.bn", "gap", "fc1"} <= called
    assert reused_layers(cnn, (1, 28, 28)) == []


def test_record_refuses_a_reused_module(net: _ResNetLike, x: torch.Tensor) -> None:
    seen: list[str] = []
    with (
        pytest.raises(ReusedModuleError) as info,
        record(net, ["block.bn1", "block.relu"], lambda name, _t: seen.append(name), keep=False),
    ):
        net(x)
    err = info.value
    assert isinstance(err, UserError)
    assert (err.module, err.calls, err.layer) == ("block.relu", 2, "block.relu")
    assert "'block.relu'" in str(err) and "2 times" in str(err) and "enclosing block 'block'" in str(err)
    assert seen == ["block.bn1", "block.relu"]  # the second call never reached the callback
    assert _hook_count(net) == 0
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is ReusedModuleError and str(again) == str(err)


def test_reuse_reports_the_full_count_and_alias() -> None:
    model = _Thrice(aliases={"tanh1": "act"})
    with (
        pytest.raises(ReusedModuleError, match=r"layer 'tanh1' \(module 'act'\) is called 3 times"),
        record(model, ["tanh1"]),
    ):
        model(torch.rand(1, 1, 2, 2))


def test_record_of_other_layers_is_unchanged(net: _ResNetLike, x: torch.Tensor) -> None:
    with record(net, ["act", "block.bn2", "block"]) as rec:
        logits = net(x)
    assert rec.calls == {"act": 1, "block.bn2": 1, "block": 1}
    expected = torch.relu(rec.outputs["block.bn2"] + rec.outputs["act"])
    assert torch.allclose(rec.outputs["block"], expected)
    assert torch.allclose(net.fc(rec.outputs["block"].mean((2, 3))), logits)


def test_failed_forward_does_not_disable_the_check(net: _ResNetLike, x: torch.Tensor) -> None:
    with record(net, ["block.relu"]) as rec:
        with pytest.raises(RuntimeError):
            net(torch.rand(1, 3, 8, 8))  # wrong channel count: fails in the stem
        with pytest.raises(ReusedModuleError):
            net(x)
        rec.reset()
        with pytest.raises(ReusedModuleError):
            net(x)
    assert _hook_count(net) == 0


def test_probe_pairs_refuses_a_reused_module(net: _ResNetLike, x: torch.Tensor) -> None:
    xa = (x + 0.1).clamp(0, 1)
    with pytest.raises(ReusedModuleError, match="block.relu"):
        probe_pairs(net, (x, xa), ["block.bn2", "block.relu"], batch_size=2)
    stats = probe_pairs(net, (x, xa), ["block.bn2"], batch_size=2)["block.bn2"]
    with record(net, ["block.bn2"]) as rec:
        net(torch.cat([x, xa]))
    a = rec.outputs["block.bn2"].double()
    expected = (a[:4] - a[4:]).abs().sum((2, 3)).mean(0) / 64
    assert stats.n == 4 and torch.allclose(stats.sigma(), expected, atol=1e-6)


def test_default_layers_exclude_reused_modules(net: _ResNetLike, x: torch.Tensor) -> None:
    assert default_conv_layers(net, "relu") == ["act", "block.relu"]  # no example: nothing known
    assert default_conv_layers(net, "relu", (1, 8, 8)) == ["act"]
    assert default_conv_layers(net, "relu", x) == ["act"]
    assert default_conv_layers(net, "conv", x) == ["stem", "block.conv1", "block.conv2"]
    assert reused_layers(net, (1, 8, 8)) == ["block.relu"]
    assert reused_layers(net, x) == ["block.relu"]
    paths = [info.path for info in list_layers(net, (1, 8, 8))]
    block = ["block", "block.conv1", "block.bn1", "block.conv2", "block.bn2"]
    assert paths == ["stem", "act", *block, "pool", "flat", "fc"]
    with pytest.raises(UserError, match="image shape"):
        reused_layers(net, (1, 0, 8))


def test_zoo_default_layers_unchanged_with_example() -> None:
    cnn = build_model("smallcnn", width=4)
    convs = [f"conv{i}" for i in range(1, 7)]
    assert default_conv_layers(cnn, "conv") == default_conv_layers(cnn, "conv", (1, 28, 28)) == convs
    relus = [f"relu{i}" for i in range(1, 7)]
    assert default_conv_layers(cnn, "relu", torch.rand(1, 1, 28, 28)) == relus
    assert len(list_layers(cnn, (1, 28, 28))) == sum(1 for p, _ in cnn.named_modules() if p)


def test_sensitivity_defaults_skip_reused_modules(
    net: _ResNetLike, x: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    xa = (x + 0.1).clamp(0, 1)
    with caplog.at_level(logging.WARNING, logger="robustdissect.analysis.sensitivity"):
        result = neuron_sensitivity(net, (x, xa), hook="relu", batch_size=2)
    assert list(result.layers) == ["act"]
    assert "block.relu" in caplog.text
    only_reused = _Thrice(nn.ReLU())
    with pytest.raises(UserError, match=r"more than once per forward pass \(act\)"):
        neuron_sensitivity(only_reused, (torch.rand(2, 1, 2, 2), torch.rand(2, 1, 2, 2)), hook="relu")


def test_hook_description() -> None:
    cnn = build_model("smallcnn", width=4)
    assert hook_description(cnn, "conv1") == "BN output"
    assert hook_description(cnn, "relu3") == "ReLU output"
    assert hook_description(cnn, "fc1") == "Linear output"
    lenet = build_model("lenet")
    assert hook_description(lenet, "conv1") == "Conv2d output"
    net = _ResNetLike()
    assert hook_description(net, "block.bn2") == "BN output"
    assert hook_description(net, "stem") == "Conv2d output"
    with pytest.raises(UserError, match="did you mean"):
        hook_description(net, "stemm")


def test_depth_is_the_forward_order_not_the_listing_order() -> None:
    """A model that lists its layers out of call order: depth follows the forward pass."""
    from robustdissect.analysis import neuron_sensitivity
    from robustdissect.probe import forward_order

    class Shuffled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Conv2d(4, 4, 3, padding=1)  # listed first, called second
            self.early = nn.Conv2d(1, 4, 3, padding=1)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.late(torch.relu(self.early(x))))

    torch.manual_seed(0)
    model = Shuffled().eval()
    x = torch.rand(6, 1, 8, 8)
    order = forward_order(model, x)
    assert order["early"] < order["late"] < order["head"]
    res = neuron_sensitivity(model, (x, (x + 0.05).clamp(0, 1)), ["late", "early"])
    depth = {r["layer"]: r["depth"] for r in res.summary_rows()}
    assert depth == {"early": 1, "late": 2}
