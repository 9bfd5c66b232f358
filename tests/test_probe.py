"""Probe: recording, interventions and streaming reducers (METHODS §5.6 oracles)."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from robustdissect.errors import ReusedModuleError, UserError
from robustdissect.models import build_model
from robustdissect.probe import (
    ChannelHistogram,
    ChannelRange,
    PairStats,
    RunningTopK,
    Welford,
    activation_stats,
    channel_quantiles,
    intervene,
    probe_pairs,
    record,
    replace_channels,
    scale_channels,
    zero_channels,
)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("smallcnn", width=4)
    # non-trivial BN statistics so that conv (BN) and relu hooks differ
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_record_alias_and_path(cnn: nn.Module, images: torch.Tensor) -> None:
    with record(cnn, ["conv1", "conv1.bn", "relu1"]) as rec:
        cnn(images[:2])
    assert rec.paths == {"conv1": "conv1.bn", "conv1.bn": "conv1.bn", "relu1": "conv1.relu"}
    assert torch.equal(rec.outputs["conv1"], rec.outputs["conv1.bn"])
    assert torch.equal(rec.outputs["relu1"], rec.outputs["conv1"].clamp_min(0))
    assert rec.outputs["conv1"].min() < 0  # pre-ReLU values survive
    assert _hook_count(cnn) == 0


def test_record_input_capture(cnn: nn.Module, images: torch.Tensor) -> None:
    with record(cnn, ["fc1", "gap"]) as out, record(cnn, ["fc1"], capture="input") as inp:
        cnn(images[:3])
    assert inp.outputs["fc1"].shape == (3, 16)
    assert torch.equal(inp.outputs["fc1"], out.outputs["gap"].flatten(1))


def test_unknown_layer_lists_close_matches(cnn: nn.Module) -> None:
    with pytest.raises(UserError, match="conv1"), record(cnn, ["convv1"]):
        pass


def test_no_hook_survives_exception(cnn: nn.Module, images: torch.Tensor) -> None:
    before = _hook_count(cnn)
    with pytest.raises(RuntimeError), record(cnn, ["conv1", "relu2"]):
        cnn(images[:1])
        raise RuntimeError("boom")
    assert _hook_count(cnn) == before

    def bad(_name: str, _t: torch.Tensor) -> None:
        raise ValueError("inside the hook")

    with pytest.raises(ValueError), record(cnn, ["relu3"], bad):
        cnn(images[:1])
    with pytest.raises(RuntimeError), intervene(cnn, [scale_channels("relu1", [0], 0.5)]):
        raise RuntimeError("boom")
    with pytest.raises(UserError), intervene(cnn, [scale_channels("relu1", [99], 0.5)]):
        cnn(images[:1])  # channel out of range raises inside the hook
    with pytest.raises(UserError):
        probe_pairs(cnn, (images[:2], images[:2]), ["conv1", "nope"])
    assert _hook_count(cnn) == before


class _InplaceNet(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1)
        self.act2 = nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.conv2(self.act(self.conv(x)))).mean((2, 3))


def test_safe_with_inplace_relu(images: torch.Tensor) -> None:
    plain, inplace = _InplaceNet(False), _InplaceNet(True)
    inplace.load_state_dict(plain.state_dict())
    x = images[:4]
    with record(plain, ["conv", "act", "conv2"]) as r1:
        plain(x)
    with record(inplace, ["conv", "act", "conv2"]) as r2:
        inplace(x)
    for name in ("conv", "act", "conv2"):
        assert torch.equal(r1.outputs[name], r2.outputs[name])
    assert r2.outputs["conv"].min() < 0  # not clobbered by the in-place ReLU
    xa = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    s1 = probe_pairs(plain, (x, xa), ["conv", "conv2", "act2"], batch_size=2)
    s2 = probe_pairs(inplace, (x, xa), ["conv", "conv2", "act2"], batch_size=2)
    for name in s1:
        assert torch.allclose(s1[name].sigma(), s2[name].sigma(), rtol=0, atol=1e-7)
        assert torch.allclose(s1[name].ratio_mean(), s2[name].ratio_mean(), rtol=0, atol=1e-7)
    # interventions compose with in-place ReLUs too
    with intervene(inplace, [zero_channels("conv", [0])]), record(inplace, ["act"]) as r3:
        inplace(x)
    assert torch.all(r3.outputs["act"][:, 0] == 0)


def test_beta_one_is_bit_identical(cnn: nn.Module, images: torch.Tensor) -> None:
    x = images
    ref = cnn(x)
    edits = [scale_channels(f"relu{i}", [0, 1, 2], 1.0) for i in range(1, 7)]
    with intervene(cnn, edits):
        out = cnn(x)
    assert torch.equal(out, ref)
    with intervene(cnn, [scale_channels("relu2", [], 0.5)]):
        assert torch.equal(cnn(x), ref)
    with intervene(cnn, [scale_channels("relu2", [1], 0.9)]):
        assert not torch.equal(cnn(x), ref)
    assert torch.equal(cnn(x), ref)


def test_scale_zero_replace(cnn: nn.Module, images: torch.Tensor) -> None:
    x, xa = images[:3], images[3:6]
    with record(cnn, ["relu2"]) as rec:
        cnn(x)
    clean = rec.outputs["relu2"]
    with intervene(cnn, [scale_channels("relu2", [1, 3], 0.5)]), record(cnn, ["relu2"]) as r:
        cnn(x)
    a = r.outputs["relu2"]
    assert torch.equal(a[:, [1, 3]], clean[:, [1, 3]] * 0.5)
    assert torch.equal(a[:, [0, 2]], clean[:, [0, 2]])
    with intervene(cnn, [zero_channels("relu2", [2])]), record(cnn, ["relu2"]) as r:
        cnn(x)
    assert torch.all(r.outputs["relu2"][:, 2] == 0)
    assert torch.equal(r.outputs["relu2"][:, :2], clean[:, :2])
    # replace from a given source
    with intervene(cnn, [replace_channels("relu2", [0], clean)]), record(cnn, ["relu2"]) as r:
        cnn(xa)
    assert torch.equal(r.outputs["relu2"][:, 0], clean[:, 0])
    # replace within a [clean; adversarial] batch
    with intervene(cnn, [replace_channels("relu2", [0, 1])]), record(cnn, ["relu2"]) as r:
        cnn(torch.cat([x, xa]))
    out = r.outputs["relu2"]
    assert torch.equal(out[3:, :2], out[:3, :2])
    assert torch.equal(out[:3], clean)
    with pytest.raises(UserError), intervene(cnn, [replace_channels("relu2", [0], clean[:1])]):
        cnn(xa)


def test_intervention_is_differentiable(cnn: nn.Module, images: torch.Tensor) -> None:
    x = images[:2].clone().requires_grad_(True)
    with intervene(cnn, [scale_channels("relu3", [0, 1], 0.7), zero_channels("conv2", [1])]):
        cnn(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_pair_stats_merge_equals_single_pass(cnn: nn.Module, images: torch.Tensor) -> None:
    x = images
    xa = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    layers = ["conv1", "relu3", "pool2", "gap", "fc1"]
    full = probe_pairs(cnn, (x, xa), layers, batch_size=4)
    # same batch boundaries: only the float64 summation order differs
    shards = [probe_pairs(cnn, (x[s : s + 4], xa[s : s + 4]), layers) for s in (0, 4, 8)]
    # other batch boundaries: the forward itself may round differently (float32)
    a = probe_pairs(cnn, (x[:7], xa[:7]), layers, batch_size=3)
    b = probe_pairs(cnn, (x[7:], xa[7:]), layers, batch_size=5)
    for name in layers:
        merged = functools.reduce(PairStats.merge, [PairStats(), *(sh[name] for sh in shards)])
        other = a[name].merge(b[name])
        assert merged.n == other.n == full[name].n == 12
        for attr in ("sigma", "sigma_mindarmour", "ratio_mean", "ratio_of_sums"):
            want = getattr(full[name], attr)()
            got = getattr(merged, attr)()
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-15), (name, attr)
            assert torch.allclose(getattr(other, attr)(), want, rtol=1e-4, atol=1e-6)
        assert torch.equal(merged.ratio_count(), full[name].ratio_count())
        rt = PairStats.from_state_dict(merged.state_dict())
        assert torch.equal(rt.sigma(), merged.sigma()) and rt.n == merged.n


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.act(x) - 0.5)


def test_layer_reused_in_forward_is_refused(images: torch.Tensor) -> None:
    with pytest.raises(ReusedModuleError, match="module 'act' is called 2 times"):
        probe_pairs(_Twice(), (images[:2], images[2:4]), ["act"])


def test_probe_pairs_select_and_batches(cnn: nn.Module, images: torch.Tensor) -> None:
    x, xa = images, images.flip(0)
    keep = torch.tensor([True, False] * 6)

    def select(lc: torch.Tensor, la: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        assert lc.shape == la.shape and y is not None
        return y % 2 == 0

    y = torch.arange(12)
    st = probe_pairs(cnn, (x, xa, y), ["relu1"], select=select, batch_size=4)["relu1"]
    ref = probe_pairs(cnn, [(x[keep], xa[keep])], ["relu1"])["relu1"]
    assert st.n == 6
    assert torch.allclose(st.sigma(), ref.sigma(), rtol=1e-9)


def test_welford_topk_histogram_merge() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(101, 5, generator=g) * 3 + 1
    w = functools.reduce(Welford.merge, [Welford(), *(_welford(c) for c in v.split(17))])
    assert torch.allclose(w.mean, v.double().mean(0), atol=1e-12)
    assert torch.allclose(w.variance(ddof=1), v.double().var(0), atol=1e-10)
    single = RunningTopK(4)
    single.update(v)
    shards = []
    for i, c in enumerate(v.split(30)):
        t = RunningTopK(4)
        t.update(c, i * 30)
        shards.append(t)
    merged = functools.reduce(RunningTopK.merge, shards)
    assert torch.equal(merged.values, single.values)
    assert torch.equal(merged.indices, single.indices)
    ref = v.t().topk(4, dim=1)
    assert torch.equal(single.values, ref.values)
    assert torch.equal(single.indices, ref.indices)
    # ties go to the earlier image, however the data is split
    ties = torch.ones(6, 2)
    t1, t2 = RunningTopK(3), RunningTopK(3)
    t1.update(ties)
    t2.update(ties[3:], 3)
    t3 = RunningTopK(3)
    t3.update(ties[:3], 0)
    assert torch.equal(t2.merge(t3).indices, t1.indices)
    assert t1.indices[0].tolist() == [0, 1, 2]

    a = torch.randn(40, 3, 4, 4, generator=g)
    rng = ChannelRange()
    rng.update(a)
    h = ChannelHistogram(rng.lo, rng.hi, bins=1024)
    h.update(a)
    h1, h2 = ChannelHistogram(rng.lo, rng.hi, 1024), ChannelHistogram(rng.lo, rng.hi, 1024)
    h1.update(a[:13])
    h2.update(a[13:])
    assert torch.equal(h1.merge(h2).counts, h.counts)
    srt = a.transpose(0, 1).reshape(3, -1).double().sort(1).values
    width = (rng.hi - rng.lo) / 1024
    q = h.quantile(0.9)
    assert torch.all((q >= srt[:, 575] - width) & (q <= srt[:, 577] + width))  # n = 640


def _welford(values: torch.Tensor) -> Welford:
    w = Welford()
    w.update(values)
    return w


def test_channel_quantiles(cnn: nn.Module, images: torch.Tensor) -> None:
    q = channel_quantiles(cnn, "pool1", images, 0.995, batch_size=5, bins=8192)
    with record(cnn, ["pool1"]) as rec:
        cnn(images)
    a = rec.outputs["pool1"].transpose(0, 1).reshape(4, -1).double()
    srt = a.sort(1).values
    n = a.shape[1]
    width = (a.amax(1) - a.amin(1)) / 8192
    lo = srt[:, int(0.995 * n) - 1] - width - 1e-9  # within the bracketing order statistics
    hi = srt[:, int(0.995 * n) + 1] + width + 1e-9
    assert torch.all((q >= lo) & (q <= hi))
    sub = channel_quantiles(cnn, "pool1", images, 0.995, channels=[2], bins=8192)
    assert torch.allclose(sub, q[2:3])


def test_activation_stats(cnn: nn.Module, images: torch.Tensor) -> None:
    stats = activation_stats(cnn, images, ["relu2", "fc1"], how="max", top_k=3, batch_size=5)
    with record(cnn, ["relu2", "fc1"]) as rec:
        cnn(images)
    r = rec.outputs["relu2"].flatten(2).amax(-1).double()
    st = stats["relu2"]
    assert st.moments.n == 12
    assert torch.allclose(st.moments.mean, r.mean(0), atol=1e-9)
    assert torch.allclose(st.moments.variance(), r.var(0, unbiased=False), atol=1e-9)
    assert st.top is not None and torch.equal(st.top.indices, r.t().topk(3, dim=1).indices)
    assert torch.allclose(st.range.hi, rec.outputs["relu2"].amax((0, 2, 3)).double())
    fc = activation_stats(cnn, [images[:4], images[4:]], ["fc1"])["fc1"]
    assert fc.top is None and torch.allclose(fc.moments.mean, rec.outputs["fc1"].double().mean(0), atol=1e-9)


def test_lazy_pairs_may_run_the_model(cnn: nn.Module, images: torch.Tensor) -> None:
    """A generator that attacks the model while the probe's hooks are registered (as
    `attack_pairs` does) neither disturbs the statistics nor loses its gradients."""

    def fgsm_like() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for s in range(0, 12, 4):
            x = images[s : s + 4].clone().requires_grad_(True)
            cnn(x[:1])  # a one-image probe forward, like an attack's shape check
            cnn(x).sum().backward()
            assert x.grad is not None
            yield images[s : s + 4], (images[s : s + 4] + 0.05 * x.grad.sign()).clamp(0, 1)

    pairs = list(fgsm_like())
    lazy = probe_pairs(cnn, fgsm_like(), ["conv2", "relu4"])
    eager = probe_pairs(cnn, pairs, ["conv2", "relu4"])
    for name in lazy:
        assert lazy[name].n == 12
        assert torch.equal(lazy[name].sigma(), eager[name].sigma())
    stats = activation_stats(cnn, (xb for xb, _ in fgsm_like()), ["relu4"])
    assert stats["relu4"].moments.n == 12
