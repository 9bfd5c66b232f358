"""The fast dissection (streamed tail thresholds, sparse active pixels, label codes, batched
null) against a straightforward reference: every map upsampled with F.interpolate, masks
compared with T_k, intersections counted per plane, each shuffle of the null tallied image by
image. Same IoU table, thresholds, labels, null percentiles and p-values, bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustdissect.analysis import concepts as C
from robustdissect.analysis.concepts import dissect
from robustdissect.data.concepts import ConceptSet, generate_concept_set
from robustdissect.probe import record
from robustdissect.probe.quantiles import StreamingQuantile


class Net(nn.Module):
    """16×16 images -> maps of 16×16 (followed by an in-place ReLU), 8×8, 4×4, 3×3 (a ratio that
    is no power of two) and a linear layer (1×1 maps)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.r1 = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(4, 5, 3, padding=1)
        self.p2 = nn.AvgPool2d(2)
        self.c3 = nn.Conv2d(5, 6, 3, padding=1)
        self.p3 = nn.AvgPool2d(2)
        self.p4 = nn.AdaptiveAvgPool2d(3)
        self.fc = nn.Linear(6 * 9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.r1(self.c1(x))
        b = self.p2(self.c2(a))
        c = self.p3(self.c3(b))
        return self.fc(self.p4(c).flatten(1))


LAYERS = ["c1", "p2", "p3", "p4", "fc"]


def _concepts(n: int = 46, seed: int = 0) -> ConceptSet:
    g = torch.Generator().manual_seed(seed)
    garments = torch.zeros(24, 1, 16, 16)
    garments[:, :, 3:13, 4:12] = torch.rand(24, 1, 10, 8, generator=g) * 0.8 + 0.2
    return generate_concept_set(
        n, (1, 16, 16), class_images=garments, class_labels=torch.arange(24) % 3,
        class_names=["a", "b", "c"], natural=False, seed=seed,
    )  # fmt: skip


def reference(model: nn.Module, cs: ConceptSet, layers: list[str], **kw: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Network Dissection the plain way (METHODS §4.1, §4.3 item 4), on the whole set at once."""
    q, p_count, bs = kw["quantile"], kw["permutations"], kw["batch_size"]
    n, size = len(cs), (int(cs.images.shape[2]), int(cs.images.shape[3]))
    maps: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    with torch.no_grad(), record(model, layers) as rec:
        for s in range(0, n, bs):  # the model's batches as in dissect (conv results depend on them)
            model(cs.images[s : s + bs])
            for name in layers:
                a = rec.outputs[name].float()
                maps[name].append(a[:, :, None, None] if a.ndim == 2 else a)
    k, g = len(cs.concepts), len(cs.categories)
    cat = torch.tensor(cs.concept_category)
    ann = torch.zeros(n, g, dtype=torch.bool)  # image i carries a label of category g
    area = torch.zeros(k, dtype=torch.float64)
    for plane in cs.planes:
        for c in range(k):
            hit = plane == c
            area[c] += hit.sum()
            ann[:, cat[c]] |= hit.flatten(1).any(1)
    # each plane as one-hot labels (N, H, W, K); -1 (no label) is no concept
    onehots = [F.one_hot(p.clamp_min(0), k).double() * (p >= 0).double()[..., None] for p in cs.planes]
    out = {}
    for name in layers:
        batches = maps[name]
        upsampled = kw["quantile_on"] == "upsampled"
        values = [F.interpolate(a, size=size, mode="bilinear") if upsampled else a for a in batches]
        u = batches[0].shape[1]
        if kw["threshold"] == "exact":
            pooled = torch.cat([v.transpose(0, 1).reshape(u, -1) for v in values], 1).double()
            t = torch.quantile(pooled, 1 - q, dim=1)
        else:  # the full one-pass histogram, fed batch by batch
            sketch = StreamingQuantile(kw["bins"])
            for v in values:
                sketch.update(v.transpose(0, 1).reshape(u, -1))
            t = sketch.quantile(1 - q)
        up = F.interpolate(torch.cat(batches), size=size, mode="bilinear")
        mask = (up > t.float()[None, :, None, None]).double()  # (N, U, H, W)

        def tally(label_image: torch.Tensor, mask: torch.Tensor = mask) -> tuple[torch.Tensor, torch.Tensor]:
            """Intersections (U, K) and activation counts (U, G), image i's mask meeting the
            labels of image label_image[i]."""
            inter = torch.stack([torch.einsum("iuhw,ihwc->uc", mask, o[label_image]) for o in onehots]).sum(0)
            act = mask.sum((2, 3)).t() @ ann[label_image].double()
            return inter, act

        def iou(inter: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
            union = act[..., cat] + area - inter
            return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))

        observed = iou(*tally(torch.arange(n)))
        gen = torch.Generator().manual_seed(kw["seed"])
        nulls = [torch.zeros(u, k, dtype=torch.float64) for _ in range(p_count)]
        shuffles = []
        for s in range(0, n, bs):
            b = min(bs, n - s)
            shuffles.append(s + torch.argsort(torch.rand(p_count, b, generator=gen), dim=1))
        for p in range(p_count):
            nulls[p] = iou(*tally(torch.cat([perm[p] for perm in shuffles])))
        null = torch.stack(nulls)
        top = null.amax(2)
        out[name] = {
            "thresholds": t, "iou": observed, "null_iou": torch.quantile(null, kw["null_percentile"], dim=0),
            "null_max": torch.quantile(top, kw["null_percentile"], dim=0),
            "p_value": (1 + (top >= observed.amax(1)).sum(0).double()) / (1 + p_count),
        }  # fmt: skip
    return out


SETTINGS: dict[str, Any] = {
    "quantile": 0.02, "threshold": "streaming", "quantile_on": "raw", "permutations": 13, "null_percentile": 0.99,
    "bins": 256, "batch_size": 10, "seed": 3, "iou_threshold": 0.04,
}  # fmt: skip


@pytest.mark.parametrize(
    "changes",
    [
        {},  # streaming thresholds (the tail sketch), shuffles within uneven batches
        {"threshold": "exact", "quantile": 0.05, "null_percentile": 0.9, "permutations": 20},
        {"quantile_on": "upsampled", "quantile": 0.01, "batch_size": 46},
        {"per_plane": True, "threshold": "exact"},  # one label lookup per plane instead of per code
    ],
)
def test_fast_dissection_equals_the_reference(changes: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    kw: dict[str, Any] = {**SETTINGS, **changes}
    if kw.pop("per_plane", False):
        monkeypatch.setattr(C._Labels, "KEYS", 1)
    model, cs = Net().eval(), _concepts()
    res = dissect(model, cs, LAYERS, **kw)
    ref = reference(model, cs, LAYERS, **kw)
    for name in LAYERS:
        ld = res.layers[name]
        for field, want in ref[name].items():
            assert torch.equal(getattr(ld, field), want), (name, field)
        assert ld.iou.amax().item() > 0.04  # the toy has active units: the comparison is not vacuous
    units = [u for u in res.units if u.layer == "p3"]
    best, null = ref["p3"]["iou"].amax(1), ref["p3"]["null_max"]
    assert [u.detector for u in units] == [bool(b > 0.04 and b > m) for b, m in zip(best, null, strict=True)]
    assert [u.concept for u in units] == [cs.concepts[int(c)] for c in ref["p3"]["iou"].argmax(1)]


def test_tail_sketch_falls_back_to_a_full_pass_when_the_order_drifts(caplog: pytest.LogCaptureFixture) -> None:
    """Full-contrast images first, then faint ones: the first batch places the tail cut above the
    set's final T_k."""
    cs = _concepts(40, seed=1)
    images = cs.images.clone()
    images[8:] *= 0.05
    cs = ConceptSet(images, cs.planes, cs.concepts, cs.categories, cs.concept_category)
    model = Net().eval()
    kw: dict[str, Any] = {**SETTINGS, "quantile": 0.05, "batch_size": 8}
    with caplog.at_level("INFO", logger="robustdissect.analysis.concepts"):
        res = dissect(model, cs, LAYERS, **kw)
    assert "streaming those layers again" in caplog.text
    ref = reference(model, cs, LAYERS, **kw)
    for name in LAYERS:
        assert torch.equal(res.layers[name].thresholds, ref[name]["thresholds"])
        assert torch.equal(res.layers[name].iou, ref[name]["iou"])


def test_tail_sketch_is_the_full_sketch_where_it_covers() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        bins = int(torch.randint(8, 400, (1,), generator=g))
        full, tail = StreamingQuantile(bins), StreamingQuantile(bins, tail=0.05)
        drift = trial % 4 == 3
        for i in range(6):  # ranges that grow by powers of two, ties at bin edges, drifting values
            x = torch.randn(int(torch.randint(50, 400, (1,), generator=g)), 3, 4, generator=g) * (1 + 2 * i)
            x = x - 4 * i if drift else x
            x = x.round() if trial % 2 else x
            full.update_maps(x)
            tail.update_maps(x)
        assert torch.equal(full.n, tail.n) and bool(tail.cut.gt(0).any())
        for q in (0.5, 0.9, 0.97, 0.99, 0.995, 1.0):
            covered = tail.covers(q)
            if bool(covered.all()):
                assert torch.equal(tail.quantile(q), full.quantile(q))
            else:
                assert drift or q < 0.95  # beyond the tail (5%), or a drifting order
                with pytest.raises(Exception, match="folded part"):
                    tail.quantile(q)
        assert not bool(tail.covers(0.1).any())


def test_upper_quantile_is_torch_quantile_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        x = torch.rand(int(torch.randint(1, 150, (1,), generator=g)), 4, 3, generator=g, dtype=torch.float64)
        x = (x * 5).round() / 5 if trial % 2 else x  # ties
        for q in (0.99, 0.995, 0.5, float(torch.rand((), generator=g))):
            for dim in (0, 1):
                assert torch.equal(C._upper_quantile(x, q, dim=dim), torch.quantile(x, q, dim=dim))


class Plateaus(nn.Module):
    """(N, 2, 4, 4) maps: unit 0 is 1 on the left half of every other image and 1 + 2^-23 in one
    corner of every third, so T_k = 1 exactly and many upsampled values lie at or a rounding error
    from it; unit 1 is a smooth ramp."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        idx = (x[:, 0, 0, 0] * 1000).round().long()  # the image's index, written into its first pixel
        a = torch.zeros(n, 2, 4, 4)
        a[:, 0, :, :2] = (idx % 2 == 0).float()[:, None, None]
        a[:, 0, 0, 3] = torch.where(idx % 3 == 0, 1 + 2.0**-23, 0.0)
        a[:, 1] = torch.linspace(0, 1, 16).view(4, 4) * (idx.float()[:, None, None] + 1)
        return a


def test_values_at_the_threshold_are_settled_by_f_interpolate(monkeypatch: pytest.MonkeyPatch) -> None:
    cs = _concepts(30, seed=2)
    images = cs.images.clone()
    images[:, 0, 0, 0] = torch.arange(30) / 1000
    cs = ConceptSet(images, cs.planes, cs.concepts, cs.categories, cs.concept_category)
    model = Probe(Plateaus())
    calls = []
    upsample = C._upsample

    def counted(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        calls.append(a.shape[0])
        return upsample(a, size)

    monkeypatch.setattr(C, "_upsample", counted)
    kw: dict[str, Any] = {**SETTINGS, "threshold": "exact", "quantile": 0.2, "batch_size": 7}
    res = dissect(model, cs, ["unit"], **kw)
    assert calls  # the near-threshold maps went through F.interpolate
    assert float(res.layers["unit"].thresholds[0]) == 1.0
    ref = reference(model, cs, ["unit"], **kw)
    for field, want in ref["unit"].items():
        assert torch.equal(getattr(res.layers["unit"], field), want), field


class Probe(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.unit = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit(x).mean((2, 3))
