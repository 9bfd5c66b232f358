"""Per-image random streams: the hash equals its reference, the draws have the right
distributions, and an attack's result for an image does not depend on the other images in its
call, on the batch size, or on which process attacks it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from robustdissect.attacks import SampleRandom, make_attack
from robustdissect.attacks.rng import _mix, _mix_int, _signed


def test_tensor_hash_equals_the_integer_reference() -> None:
    g = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**63), 2**63 - 1, (2000,), generator=g, dtype=torch.int64)
    got = _mix(words).tolist()
    want = [_signed(_mix_int(w & ((1 << 64) - 1))) for w in words.tolist()]
    assert got == want


def test_draws_have_the_stated_distributions() -> None:
    rng = SampleRandom.for_images(400, seed=3, device="cpu")
    u = rng.rand(50)
    assert u.shape == (400, 50) and float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    z = rng.randn(50, dtype=torch.float64)
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    k = rng.randint(2, 7, 50)
    assert set(k.unique().tolist()) == {2, 3, 4, 5, 6}
    counts = torch.bincount(k.flatten() - 2).double() / k.numel()
    assert float((counts - 0.2).abs().max()) < 0.01
    s = rng.signs(10)
    assert set(s.unique().tolist()) == {-1.0, 1.0}


def test_streams_are_per_image_and_advance() -> None:
    rng = SampleRandom.for_images(6, seed=1, device="cpu")
    first = rng.rand(5)
    again = SampleRandom.for_images(6, seed=1, device="cpu").rand(5)
    assert torch.equal(first, again)  # reproducible
    assert not torch.equal(rng.rand(5), first)  # the next draw differs
    sub = SampleRandom.for_images(3, seed=1, device="cpu", ids=torch.tensor([4, 0, 2])).rand(5)
    assert torch.equal(sub, first[[4, 0, 2]])  # a subset keyed by the same ids draws the same rows
    assert not torch.equal(SampleRandom.for_images(6, seed=2, device="cpu").rand(5), first)  # seed matters
    restart = SampleRandom.for_images(6, seed=1, device="cpu").spawn(1).rand(5)
    assert not torch.equal(restart, first)  # a spawned stream is another stream
    rows = first.flatten().tolist()
    assert len(set(rows)) > 0.99 * len(rows)


class TinyNet(nn.Module):
    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("pgd-linf", {"eps": 0.05, "steps": 5, "restarts": 2}),
        ("pgd-l2", {"eps": 0.5, "steps": 5}),
        ("apgd-dlr", {"eps": 0.05, "steps": 10}),
        ("square-linf", {"eps": 0.05, "queries": 30}),
        ("square-l2", {"eps": 0.5, "queries": 30}),
        ("spsa", {"eps": 0.05, "iterations": 3, "n_samples": 8}),
        ("nattack", {"eps": 0.05, "iterations": 3, "population": 6}),
        ("gaussian-noise", {"severity": 3}),
        ("shot-noise", {"severity": 3}),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_an_images_example_does_not_depend_on_its_company(name: str, kwargs: dict, channels: int) -> None:
    """Attacking all 24 images at once, in batches of 5, or a subset passed with its ids gives
    each image the same adversarial example (what makes torchrun shards equal one process)."""
    net = TinyNet(channels).double()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(24, channels, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (24,), generator=g)
    whole = make_attack(name, **kwargs)(net, x, y).x_adv
    batched = make_attack(name, **kwargs, batch_size=5)(net, x, y).x_adv
    torch.testing.assert_close(batched, whole, rtol=0, atol=1e-9)  # float64: equal up to BLAS order
    pick = torch.tensor([23, 3, 11, 4, 17])
    sub = make_attack(name, **kwargs)(net, x[pick], y[pick], ids=pick).x_adv
    torch.testing.assert_close(sub, whole[pick], rtol=0, atol=1e-9)
    assert not math.isclose(float((whole - x).abs().sum()), 0.0)  # the attack moved something


class ViewsActivations(nn.Module):
    """A classic LeNet-style model that `.view`s its conv output (fails in channels-last)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


@pytest.mark.parametrize("net", [TinyNet(3), ViewsActivations()], ids=["reshapes", "views"])
def test_cpu_search_layout_is_restored_and_changes_no_result(net: nn.Module) -> None:
    """On the CPU the search runs with channels-last weights where the model allows it; the
    weights come back in their layout, and the examples equal a search in the default layout."""
    from robustdissect.attacks.base import cpu_channels_last

    g = torch.Generator().manual_seed(2)
    x = torch.rand(16, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = make_attack("pgd-linf", eps=0.05, steps=5)(net, x, y)
    assert all(p.is_contiguous() for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with cpu_channels_last(net, x):
        converted = net.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert converted == isinstance(net, TinyNet)  # the viewing model stays as it is
    plain = make_attack("pgd-linf", eps=0.05, steps=5)
    with torch.no_grad():  # the reference: the same search with the layout fixed to the default
        ref = plain(_Contiguous(net), x, y)
    # the layouts round the convolution's sums differently; a sign step turns that into the same
    # step unless a gradient entry is within rounding of 0, so nearly every pixel is identical
    differs = (res.x_adv - ref.x_adv).abs() > 1e-6
    assert float(differs.float().mean()) <= 0.01 and torch.equal(res.correct, ref.correct)
    assert float((res.x_adv - x).abs().max()) > 0.04  # the search moved the images


class _Contiguous(nn.Module):
    """Wraps a model so that its first call sees a 2-D weight-free wrapper (no conversion)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = [inner]  # not a submodule: cpu_channels_last finds no Conv2d here

    def forward(self, x: Tensor) -> Tensor:
        return self.inner[0](x)
