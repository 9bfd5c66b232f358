"""Ilyas datasets (METHODS §3.2, §3.3, §3.6): representation matching, targets, resumable builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from scipy import stats
from torch import nn

from robustdissect.data import load_dataset
from robustdissect.data.robust_data import load_robust_data
from robustdissect.errors import UserError
from robustdissect.training.robust_data import (
    RobustDataSettings,
    build,
    draw_targets,
    match_representation,
    representation_batch_fn,
    targeted_batch_fn,
)


class IdentityRep(nn.Module):
    """g(z) = z: the layer `rep` is the identity; a linear head makes it a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.rep = nn.Identity()
        self.head = nn.Linear(36, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rep(x).flatten(1))  # type: ignore[no-any-return]


def test_identity_representation_converges_to_x() -> None:
    g = torch.Generator().manual_seed(0)
    x, z0 = torch.rand(6, 1, 6, 6, generator=g), torch.rand(6, 1, 6, 6, generator=g)
    start = (z0 - x).flatten(1).norm(dim=1)
    out = match_representation(IdentityRep().eval(), "rep", x, z0, steps=200, eta=0.05, capture="output")
    dist = (out - x).flatten(1).norm(dim=1)
    assert float(start.min()) > 1.0
    # normalised steps of length η end within one step of the minimiser
    assert float(dist.max()) <= 0.05 + 1e-5
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_det_targets_exact_and_rand_targets_uniform() -> None:
    y = torch.arange(10_000) % 10
    g = torch.Generator().manual_seed(0)
    assert torch.equal(draw_targets(y, 10, "det", g), (y + 1) % 10)
    t = draw_targets(y, 10, "rand", g)
    counts = torch.bincount(t, minlength=10)
    assert int(counts[9]) > 0  # class K-1 is drawn (randint(0, 9) would never draw it)
    assert stats.chisquare(counts.numpy()).pvalue > 0.001  # fixed seed; a test at the 0.1% level
    t2 = draw_targets(y, 10, "rand", g, exclude_true=True)
    assert not bool((t2 == y).any())


def _tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.rand(10, 1, 6, 6, generator=g), torch.arange(10) % 3


def test_targeted_build_labels_are_the_targets(tmp_path: Path) -> None:
    model, x, y = _tiny()
    s = RobustDataSettings("det", n=10, batch=4, eps=1.5, alpha=0.3, attack_steps=5)
    out = build(tmp_path / "det", x, y, targeted_batch_fn(model, 3, s), s, {"source_model": "tiny"})
    xd, yd, card = load_robust_data(out)
    assert torch.equal(yd, (y + 1) % 3)
    assert float((xd - x).flatten(1).norm(dim=1).max()) <= 1.5 + 1e-4
    assert card["settings"]["kind"] == "det" and card["source_model"] == "tiny"
    assert not out.with_name(out.name + ".partial").exists()


def test_killed_build_resumes_to_an_identical_file(tmp_path: Path) -> None:
    model, x, y = _tiny()
    s = RobustDataSettings("r", n=10, batch=3, steps=5, eta=0.1)
    fn = representation_batch_fn(model, x, s, layer="3", capture="input")
    whole = build(tmp_path / "whole", x, y, fn, s)

    def die(b: int) -> None:
        if b == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "cut", x, y, fn, s, on_batch=die)
    partial = tmp_path / "cut.safetensors.partial"
    assert len(list(partial.glob("batch-*.safetensors"))) == 2
    calls: list[int] = []
    cut = build(tmp_path / "cut", x, y, fn, s, on_batch=calls.append)
    assert calls == [2, 3]  # only the missing batches were computed
    # identical content: every tensor bitwise and the metadata (safetensors orders the metadata
    # of its header as a hash map does, so the file bytes themselves may differ between writes)
    tw, tc = load_file(str(whole)), load_file(str(cut))
    assert tw.keys() == tc.keys() and all(torch.equal(tw[k], tc[k]) for k in tw)
    with safe_open(str(whole), "pt") as fw, safe_open(str(cut), "pt") as fc:
        assert fw.metadata() == fc.metadata()
    xs, _, _ = load_robust_data(cut)
    assert not torch.equal(xs, x)
    with pytest.raises(UserError):
        (tmp_path / "cut.safetensors.partial").mkdir()
        (tmp_path / "cut.safetensors.partial" / "settings.json").write_text("{}")
        build(tmp_path / "cut", x, y, fn, s)


def test_loadable_as_a_dataset(tmp_path: Path, fmnist: object) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
    ds = load_dataset("fashion-mnist")
    x, y = ds.train.x[:6], ds.train.y[:6]
    s = RobustDataSettings("det", n=6, batch=6, attack_steps=2)
    out = build(tmp_path / "d", x, y, targeted_batch_fn(model, 10, s), s, {"dataset": "fashion-mnist"})
    rd = load_dataset(f"robust-data:{out}")
    assert len(rd.train) == 6 and torch.equal(rd.train.y, (y + 1) % 10)
    assert torch.equal(rd.test.x, ds.test.x)


def test_selective_variant_matches_the_robust_units_only() -> None:
    from conftest import TinyNet

    from robustdissect.analysis.pushback import UnitSets
    from robustdissect.probe import spatial_reduce
    from robustdissect.training.robust_data import _selective_fn

    torch.manual_seed(0)
    net = TinyNet().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 8, 8, generator=g)
    sets = UnitSets(["conv"], [4], torch.zeros(0, dtype=torch.long), torch.tensor([0, 2]), torch.zeros(4),
                    torch.ones(4), torch.zeros(0))  # fmt: skip
    s = RobustDataSettings("r-selective", n=6, batch=6, steps=100, eta=0.02)
    fn = _selective_fn(net, x, s, sets, ["conv"], spatial_reduce)
    src = torch.arange(6)
    out, yy = fn(x, src % 3, src, torch.Generator().manual_seed(0))
    assert torch.equal(yy, src % 3)

    def f_r(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return spatial_reduce(net.conv(z))[:, [0, 2]]

    z0 = x[(src + torch.randint(1, 6, (6,), generator=torch.Generator().manual_seed(0))) % 6]
    before = (f_r(z0) - f_r(x)).norm(dim=1)
    after = (f_r(out) - f_r(x)).norm(dim=1)
    assert bool((after < 0.2 * before).all())


def _shard_worker(rank: int, world: int, port: int, out: str, done: str) -> None:
    """One torchrun-like rank: RANK / WORLD_SIZE / MASTER_* in the environment, `build` creates the
    gloo group itself; the batches this rank computed go to `done`.RANK."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    model, x, y = _tiny()
    s = RobustDataSettings("r", n=10, batch=3, steps=5, eta=0.1)
    calls: list[int] = []
    build(out, x, y, representation_batch_fn(model, x, s, layer="3", capture="input"), s, on_batch=calls.append)
    Path(f"{done}.{rank}").write_text(" ".join(map(str, calls)))


def test_sharded_build_equals_the_single_process_build(tmp_path: Path) -> None:
    """Two processes (gloo, CPU) share the batches round-robin; rank 0 assembles the same tensors."""
    import socket

    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    model, x, y = _tiny()
    s = RobustDataSettings("r", n=10, batch=3, steps=5, eta=0.1)
    single = build(tmp_path / "one", x, y, representation_batch_fn(model, x, s, layer="3", capture="input"), s)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_shard_worker, args=(2, port, str(tmp_path / "two"), str(tmp_path / "done")), nprocs=2, join=True)
    assert (tmp_path / "done.0").read_text() == "0 2" and (tmp_path / "done.1").read_text() == "1 3"
    t1, t2 = load_file(str(single)), load_file(str(tmp_path / "two.safetensors"))
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert not (tmp_path / "two.safetensors.partial").exists()
    assert (tmp_path / "two.json").is_file()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gamma_at_most_rho_on_random_features_and_attacks(seed: int) -> None:
    """§3.1 / §3.6: the clean point is in every attack's set, so inf_δ y·f(x+δ) ≤ y·f(x) pointwise and
    γ ≤ ρ for every feature — here the channels of a random conv net under random attack settings."""
    from conftest import TinyNet

    from robustdissect.analysis.features import (
        FeatureOptions,
        balanced_usefulness,
        robust_usefulness,
        score_features,
    )
    from robustdissect.attacks import FGSM, PGD

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = TinyNet().eval()
    x, x_ref = torch.rand(48, 1, 8, 8, generator=g), torch.rand(64, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (48,), generator=g)
    eps = float(torch.empty(2).uniform_(0.01, 0.3, generator=g)[0])
    steps = int(torch.randint(1, 8, (1,), generator=g))
    attacks = [PGD(eps, steps=steps, step_rule="madry", seed=seed), FGSM(eps / 2, seed=seed)]
    opts = FeatureOptions(eps=eps, feature_steps=steps, restarts=1, candidates_per_bin=2, depth_bins=1, top_m=1,
                          permutations=10, bootstrap=0)  # fmt: skip
    fs = score_features(net, x, y, x_ref, ["conv"], opts, model_attacks=attacks, num_classes=3, seed=seed)
    assert bool((fs.f_low <= fs.f_clean + 1e-6).all()) and bool((fs.f_high >= fs.f_clean - 1e-6).all())
    assert bool((fs.scores.gamma <= fs.scores.rho + 1e-6).all())
    # the same on arbitrary feature tables: any f_low ≤ f ≤ f_high gives γ ≤ ρ at every class
    f = torch.randn(40, 7, generator=g)
    low = f - torch.rand(40, 7, generator=g)
    high = f + torch.rand(40, 7, generator=g)
    yy = torch.randint(0, 4, (40,), generator=g)
    rho = balanced_usefulness(f, yy, 4)  # (U, K)
    for c in range(4):
        cls = torch.full((7,), c)
        assert bool((robust_usefulness(low, high, yy, cls) <= rho[:, c] + 1e-6).all())
