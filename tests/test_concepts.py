"""Network Dissection (METHODS §4.4 oracles): hand-made concept units, exact and streaming
thresholds, IoU on toy masks with known answers, the permutation null, concept sets, Broden."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from robustdissect.analysis.concepts import dissect, iou_from_counts
from robustdissect.data.concepts import (
    COLOUR_NAMES,
    ConceptSet,
    colour_names,
    generate_concept_set,
    load_broden,
)
from robustdissect.probe.quantiles import StreamingQuantile
from robustdissect.store import EvidenceStore


class Probe(nn.Module):
    """`unit` = a fixed function of the image, hooked at `self.unit`; logits from its mean."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.unit = fn
        self.head = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.unit(x).mean((2, 3)))


class BrightMinusRest(nn.Module):
    """Unit 0: brightness − 0.5 (grayscale) or red − mean(green, blue) (RGB); unit 1: its negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :1] - 0.5 if x.shape[1] == 1 else x[:, :1] - x[:, 1:].mean(1, keepdim=True)
        return torch.cat([s, -s], 1)


class NoiseUnits(nn.Module):
    """(N, 8, 3, 3) noise that depends on nothing but a hash of each image (the same in every pass)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for img in x:
            g = torch.Generator().manual_seed(int(img.double().sum() * 1e6) % (2**31))
            out.append(torch.randn(8, 3, 3, generator=g))
        return torch.stack(out)


def test_bright_unit_gets_white_and_red_unit_gets_red() -> None:
    gray = generate_concept_set(150, (1, 28, 28), natural=False, seed=1)
    share = float((gray.images >= 2 / 3).double().mean())  # the 'white' band covers ~30% of pixels:
    # at the default top-0.5% level a perfect brightness unit's IoU with it is at most 0.005 / share
    res = dissect(Probe(BrightMinusRest()), gray, ["unit"], quantile=share, permutations=20)
    u0, u1 = res.unit("unit", 0), res.unit("unit", 1)
    assert u0.concept == "white" and u0.label == "white" and u0.iou > 0.04 and u0.detector
    assert u0.iou > 0.9
    assert u1.concept == "black" and u1.category == "intensity"
    rgb = generate_concept_set(120, (3, 32, 32), natural=False, seed=2)
    red = dissect(Probe(BrightMinusRest()), rgb, ["unit"], permutations=20).unit("unit", 0)
    assert red.concept == "red" and red.label == "red" and red.iou > 0.04


def test_exact_threshold_is_torch_quantile_and_streaming_within_bound() -> None:
    cs = generate_concept_set(80, (1, 28, 28), natural=False, seed=3)
    conv = nn.Conv2d(1, 6, 3, padding=1)
    torch.manual_seed(0)
    nn.init.normal_(conv.weight)
    model = Probe(nn.Sequential(conv, nn.ReLU()))
    with torch.no_grad():
        acts = model.unit(cs.images)  # (N, 6, 28, 28)
    pooled = acts.transpose(0, 1).reshape(6, -1).double()
    for q in (0.005, 0.01):
        expected = torch.quantile(pooled, 1 - q, dim=1)
        exact = dissect(model, cs, ["unit"], quantile=q, threshold="exact", permutations=5, batch_size=17)
        assert torch.equal(exact.layers["unit"].thresholds, expected)
        stream = dissect(model, cs, ["unit"], quantile=q, threshold="streaming", permutations=5, batch_size=17, bins=64)
        ld = stream.layers["unit"]
        assert (ld.thresholds - expected).abs().le(ld.threshold_error * (1 + 1e-9)).all()
        assert ld.threshold_error.gt(0).all()  # a coarse histogram: the bound is what is checked


def test_streaming_quantile_bound_with_a_growing_range() -> None:
    g = torch.Generator().manual_seed(0)
    sq = StreamingQuantile(bins=50)
    chunks = [torch.zeros(3, 100)]  # a first batch of zeros: the range grows by powers of two later
    chunks += [torch.randn(3, 400, generator=g) * (1 + i) + 3 * i for i in range(8)]
    for c in chunks:
        sq.update(c)
    values = torch.cat(chunks, 1).double()
    for q in (0.0, 0.5, 0.99, 0.995, 1.0):
        exact = torch.quantile(values, q, dim=1)
        assert (sq.quantile(q) - exact).abs().le(sq.width).all(), q
    span = values.amax(1) - values.amin(1)
    assert sq.width.le(4 * span / 50).all()  # the bound stays a few bins of the data's range


def _toy_set() -> ConceptSet:
    """3 images of 4×4. Pixel concept 'left' (category part) on the left half of image 0; image-level
    concept 'scene-a' (category scene) on image 1; image 2 annotated for neither... except part
    label 'left' absent: it carries 'top' (part) on its first row."""
    n, h, w = 3, 4, 4
    part = torch.full((n, h, w), -1, dtype=torch.long)
    part[0, :, :2] = 0  # left
    part[2, 0, :] = 2  # top
    scene = torch.full((n, h, w), -1, dtype=torch.long)
    scene[1] = 1  # scene-a, image level
    images = torch.zeros(n, 1, h, w)
    images[0, 0, :, 0] = 1.0  # unit fires on column 0 of image 0 (4 px inside 'left')
    images[1, 0, 0, :] = 1.0  # row 0 of image 1 (4 px inside the image-level 'scene-a')
    images[2, 0, 0, 3] = 1.0  # one pixel of image 2, inside 'top'
    return ConceptSet(images, [part, scene], ["left", "scene-a", "top"], ["part", "scene"], [0, 1, 0])


def test_iou_on_toy_masks_with_image_level_labels() -> None:
    cs = _toy_set()
    # 9 active pixels of 48: quantile 9/48 puts T in [0, 1), so the mask is exactly the ones
    res = dissect(Probe(nn.Identity()), cs, ["unit"], quantile=9 / 48, threshold="exact", permutations=10)
    iou = res.layers["unit"].iou[0]
    # left: images annotated for 'part' are 0 and 2 -> |M| = 4 + 1; |L| = 8; inter = 4 -> 4 / 9
    assert iou[0].item() == pytest.approx(4 / 9)
    # scene-a (whole image 1): |M over scene-annotated images| = 4; |L| = 16; inter = 4 -> 4 / 16
    assert iou[1].item() == pytest.approx(4 / 16)
    # top: inter 1, union 5 + 4 - 1 = 8
    assert iou[2].item() == pytest.approx(1 / 8)
    assert res.unit("unit", 0).concept == "left"
    # the same numbers from counts, and an empty union gives 0
    got = iou_from_counts(
        torch.tensor([[4.0, 4.0, 1.0, 0.0]]),
        torch.tensor([[5.0, 4.0, 0.0]]),
        torch.tensor([8.0, 16.0, 4.0, 0.0]),
        torch.tensor([0, 1, 0, 2]),
    )
    assert got[0].tolist() == pytest.approx([4 / 9, 4 / 16, 1 / 8, 0.0])


def test_intersections_and_unions_are_summed_over_the_set_not_averaged() -> None:
    # image 0: unit mask = concept mask (IoU 1); image 1: 3 active pixels, 1 labelled (IoU 1/3)
    h = w = 4
    images = torch.zeros(2, 1, h, w)
    plane = torch.full((2, h, w), -1, dtype=torch.long)
    images[0, 0, 0, 0] = 1.0
    plane[0, 0, 0] = 0
    images[1, 0, 1, :3] = 1.0
    plane[1, 1, 0] = 0
    cs = ConceptSet(images, [plane], ["c"], ["cat"], [0])
    res = dissect(Probe(nn.Identity()), cs, ["unit"], quantile=4 / 32, threshold="exact", permutations=4)
    assert res.layers["unit"].iou[0, 0].item() == pytest.approx(2 / 4)  # not (1 + 1/3) / 2


def test_null_rejects_random_units_at_3x3_maps() -> None:
    cs = generate_concept_set(40, (1, 28, 28), natural=False, seed=4)
    res = dissect(Probe(NoiseUnits()), cs, ["unit"], quantile=0.05, permutations=100, batch_size=40)
    units = [u for u in res.units if u.layer == "unit"]
    assert res.layers["unit"].map_size == (3, 3)
    assert sum(u.iou > 0.04 for u in units) >= 4  # the bare IoU threshold would label them
    assert not any(u.detector for u in units)
    with pytest.raises(Exception, match="permutation null"):
        dissect(Probe(NoiseUnits()), cs, ["unit"], permutations=0)


def test_colour_name_fallback() -> None:
    px = torch.tensor([[1.0, 0.0, 0.0], [128 / 255] * 3, [0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    names = colour_names(px.t().reshape(1, 3, 5, 1)).ravel().tolist()
    assert [COLOUR_NAMES[i] for i in names] == ["red", "grey", "blue", "white", "black"]


def test_generated_set_is_seeded_and_composites_have_exact_masks() -> None:
    g = torch.Generator().manual_seed(0)
    garments = torch.zeros(20, 1, 28, 28)
    garments[:, :, 6:22, 8:20] = torch.rand(20, 1, 16, 12, generator=g) * 0.8 + 0.2
    labels = torch.arange(20) % 4
    kw = {"class_images": garments, "class_labels": labels, "class_names": ["a", "b", "c", "d"], "natural": False}
    a = generate_concept_set(60, (1, 28, 28), seed=5, **kw)
    b = generate_concept_set(60, (1, 28, 28), seed=5, **kw)
    assert torch.equal(a.images, b.images) and all(torch.equal(p, q) for p, q in zip(a.planes, b.planes, strict=True))
    assert a.images.min() >= 0 and a.images.max() <= 1
    fg = a.concepts.index("foreground")
    tex = [i for i, c in enumerate(a.concept_category) if a.categories[c] == "texture"]
    composites = [i for i, k in enumerate(a.kinds) if k == "composite"]
    assert composites
    for i in composites:
        fmask = a.concept_mask(fg, i)
        assert torch.equal(fmask[6:22, 8:20], torch.ones(16, 12, dtype=torch.bool)) and int(fmask.sum()) == 16 * 12
        tmask = torch.zeros(28, 28, dtype=torch.bool)
        for t in tex:
            tmask |= a.concept_mask(t, i)
        assert torch.equal(tmask, ~fmask)  # the texture fills exactly the background
    assert set(a.kinds) == {"garment", "texture", "composite", "collage", "patch"}


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def test_broden_layout_loads(tmp_path: Path) -> None:
    root = tmp_path / "broden"
    (root / "images").mkdir(parents=True)
    (root / "label.csv").write_text(
        "number,name,category,frequency,coverage,syns\n0,-,-,0,0,\n1,red-c,color(2),2,1,\n"
        "2,dog,object(1),1,1,\n3,striped,texture(1),1,1,\n"
    )
    img = np.zeros((8, 8, 3))
    img[:, :4] = [255, 0, 0]
    _png(root / "images" / "a.jpg.png", img)
    _png(root / "images" / "b.png", np.full((8, 8, 3), 128))
    color = np.zeros((4, 4, 3))
    color[:, :2, 0] = 1  # label 1 (R + 256·G) on the left half, at half resolution
    _png(root / "images" / "a_color.png", color)
    obj = np.zeros((4, 4, 3))
    obj[2:, :, 0] = 2
    _png(root / "images" / "a_object.png", obj)
    (root / "index.csv").write_text(
        "image,split,ih,iw,sh,sw,color,object,part,material,scene,texture\n"
        "a.jpg.png,train,8,8,4,4,a_color.png,a_object.png,,,,\n"
        "b.png,train,8,8,4,4,,,,,,3\n"
    )
    cs = load_broden(root, (3, 8, 8))
    assert cs.concepts == ["red-c", "dog", "striped"] and len(cs) == 2
    assert [cs.categories[c] for c in cs.concept_category] == ["color", "object", "texture"]
    assert torch.equal(cs.concept_mask(0, 0)[:, :4], torch.ones(8, 4, dtype=torch.bool))
    assert int(cs.concept_mask(0, 0).sum()) == 32
    assert int(cs.concept_mask(1, 0).sum()) == 32 and bool(cs.concept_mask(1, 0)[7, 0])
    assert bool(cs.concept_mask(2, 1).all()) and not bool(cs.concept_mask(2, 0).any())  # image-level texture
    assert cs.images[0, 0, 0, 0].item() == pytest.approx(1.0) and cs.images[0, 1, 0, 0].item() == 0.0
    gray = load_broden(root, (1, 8, 8), max_images=1)
    assert gray.images.shape == (1, 1, 8, 8)
    with pytest.raises(Exception, match="not a Broden directory"):
        load_broden(tmp_path)


def test_cached_dissection_is_computed_once(tmp_path: Path) -> None:
    from robustdissect.analysis.concepts import cached_dissection

    store = EvidenceStore(tmp_path / "evidence")
    cs = generate_concept_set(30, (1, 28, 28), natural=False, seed=6)
    model = Probe(BrightMinusRest())
    a = cached_dissection(store, model, cs, ["unit"], permutations=5)
    b = cached_dissection(store, model, cs, ["unit"], permutations=5)
    assert a is b and store.misses["concepts"] == 1 and store.hits["concepts"] == 1


def test_concept_fragility_on_a_toy_join() -> None:
    from robustdissect.analysis.concepts import ConceptDissection, UnitConcept, concept_fragility

    def unit(k: int, label: str | None, cat: str | None) -> UnitConcept:
        return UnitConcept("l", k, label, cat, label or "black", cat or "intensity", 0.1 if label else 0.01, 0.02,
                           0.01, 0.06, 1.0, 0.0, label is not None)  # fmt: skip

    units = [unit(0, "stripes-0-high", "texture"), unit(1, "stripes-0-high", "texture"), unit(2, "noise", "texture"),
             unit(3, "Bag", "class"), unit(4, "Bag", "class"), unit(5, None, None)]  # fmt: skip
    diss = ConceptDissection(["black", "stripes-0-high", "noise", "Bag"], ["intensity", "texture", "class"],
                             [0, 1, 1, 2], {}, units, {})  # fmt: skip
    r = [0.2, -0.4, 0.5, 0.9, 0.7, 0.1]
    quad = ["NRU", "NRU", "NRU", "RU", "RU", "NL"]
    rows = [{"layer": "l", "unit": k, "r": r[k], "quadrant": quad[k], "rho": 1.0, "gamma": r[k], "s": 0.1}
            for k in range(6)]  # fmt: skip
    frag = concept_fragility(diss, rows, "toy")
    by_concept = {row["concept"]: row for row in frag.concepts}
    assert by_concept["stripes-0-high"]["fragility"] == pytest.approx(1 - (0.2 - 0.4) / 2)
    assert by_concept["stripes-0-high"]["nru_share"] == 1.0 and by_concept["Bag"]["nru"] == 0
    by_cat = {row["category"]: row for row in frag.categories}
    assert by_cat["texture"]["fragility"] == pytest.approx(1 - (0.2 - 0.4 + 0.5) / 3)
    assert by_cat["class"]["fragility"] == pytest.approx(1 - 0.8)
    assert by_cat["texture"]["units"] == 3 and "intensity" not in by_cat  # unit 5 is no detector
    tex = next(e for e in frag.enrichment if e["concepts"] == "texture" and e["units"] == "detectors")
    assert (tex["nru_in_group"], tex["nru_outside"], tex["other_in_group"], tex["other_outside"]) == (3, 0, 0, 2)
    assert tex["p_value"] == pytest.approx(0.1)  # hypergeometric: 1 / C(5, 3) arrangements as extreme
    assert frag.most_fragile(1)[0]["concept"] == "stripes-0-high"


def test_pnas_thresholds_are_taken_after_upsampling() -> None:
    cs = generate_concept_set(40, (1, 28, 28), natural=False, seed=7)
    torch.manual_seed(1)
    pool = Probe(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.AvgPool2d(4)))  # 7×7 maps
    with torch.no_grad():
        maps = pool.unit(cs.images)
        up = torch.nn.functional.interpolate(maps, size=(28, 28), mode="bilinear", align_corners=False)
    res = dissect(pool, cs, ["unit"], quantile=0.01, quantile_on="upsampled", threshold="exact", permutations=5)
    expected = torch.quantile(up.transpose(0, 1).reshape(3, -1).double(), 0.99, dim=1)
    assert torch.equal(res.layers["unit"].thresholds, expected)
    raw = dissect(pool, cs, ["unit"], quantile=0.01, threshold="exact", permutations=5).layers["unit"].thresholds
    assert torch.equal(raw, torch.quantile(maps.transpose(0, 1).reshape(3, -1).double(), 0.99, dim=1))
    assert not torch.equal(raw, expected)


def test_fragility_figure_takes_wilson_bounds_rounded_inside_the_share() -> None:
    from robustdissect.report.plots_concepts import plot_fragility

    row = {"model": "m", "category": "class", "concept": "Bag", "units": 3, "nru": 3, "fragility": 1.1,
           "fragility_se": float("nan"), "nru_share": 1.0, "nru_low": 0.44, "nru_high": 1.0 - 1e-12}  # fmt: skip
    fig = plot_fragility([row], [row], "m")
    assert len(fig.axes) == 3


def test_balanced_accuracy_and_unit_ablation() -> None:
    from robustdissect.analysis.concepts import balanced_accuracy, remove_units, unit_ablation
    from robustdissect.probe import intervene, record, zero_channels

    pred, y = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 1, 2, 0])
    # class 0: recall 1/2, TNR 2/3; class 1: recall 1/2, TNR 1; class 2: recall 1, TNR 3/4
    assert balanced_accuracy(pred, y, 3).tolist() == pytest.approx([(1 / 2 + 2 / 3) / 2, 0.75, 0.875])

    class Net(nn.Module):
        """Class c's logit = the mean of channel c of `feat` (3 channels that copy the input's sign)."""

        def __init__(self) -> None:
            super().__init__()
            self.feat = nn.Conv2d(1, 3, 1)
            with torch.no_grad():
                self.feat.weight.copy_(torch.tensor([1.0, -1.0, 0.5]).view(3, 1, 1, 1))
                self.feat.bias.copy_(torch.tensor([0.0, 0.0, 0.3]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.feat(x).mean((2, 3))

    net = Net()
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(60, 1, 4, 4, generator=g)  # class means spread over all three classes
    with torch.no_grad():
        y = net(x).argmax(1)
    # ablating a unit leaves every other channel bit-identical
    with torch.no_grad(), record(net, ["feat"]) as rec:
        logits = net(x)
        clean = rec.outputs["feat"].clone()
    # the edit's hook runs first, so the recording sees the ablated output
    with torch.no_grad(), intervene(net, [zero_channels("feat", [1])]), record(net, ["feat"]) as rec:
        logits_ablated = net(x)
        ablated = rec.outputs["feat"]
    assert torch.equal(ablated[:, [0, 2]], clean[:, [0, 2]]) and not ablated[:, 1].any()
    assert torch.equal(logits_ablated[:, [0, 2]], logits[:, [0, 2]]) and not logits_ablated[:, 1].any()
    abl = unit_ablation(net, x, y, "feat", num_classes=3)
    assert abl.baseline.tolist() == [1.0, 1.0, 1.0]  # y is the model's own prediction
    assert abl.ranking(1)[0] == 1 and float(abl.drop[1, 1]) > 0  # class 1 needs unit 1
    rows = remove_units(net, x, y, "feat", abl.ranking(1), cls=1, counts=(1, 3), num_classes=3)
    assert [r["n"] for r in rows] == [1, 3] and rows[0]["balanced_accuracy"] == pytest.approx(float(abl.ablated[1, 1]))
    kept = remove_units(net, x, y, "feat", abl.ranking(1), cls=1, counts=(3,), keep=True, num_classes=3)
    assert kept[0]["balanced_accuracy"] == 1.0  # keeping every unit removes nothing
