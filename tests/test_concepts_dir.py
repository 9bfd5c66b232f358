"""The user's own concepts (`--concept-dir`): images/, one label PNG per image in masks/ and a label
list, read into a ConceptSet; a unit planted to respond to one concept is found as its detector."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Cli
from PIL import Image
from torch import nn

from robustdissect.analysis.concepts import dissect
from robustdissect.data.concepts import load_concept_dir, read_label_list
from robustdissect.errors import UserError

NET = '''
import torch
from torch import nn


class Planted(nn.Module):
    """conv unit 0: darkness 1 - mean(R, G, B); unit 1: greenness G - (R + B) / 2 (centre taps)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        w = torch.zeros(2, 3, 3, 3)
        w[0, :, 1, 1] = -1 / 3
        w[1, :, 1, 1] = torch.tensor([-0.5, 1.0, -0.5])
        with torch.no_grad():
            self.conv.weight.copy_(w)
            self.conv.bias.copy_(torch.tensor([1.0, 0.0]))
        self.relu = nn.ReLU()
        self.head = nn.Linear(2, num_classes)

    def forward(self, x):
        return self.head(self.relu(self.conv(x)).mean((2, 3)))


def make(num_classes=10):
    return Planted(num_classes)
'''

GRASS, BRICK, WHEEL = 1, 2, 3


def write_concept_dir(root: Path, n: int = 12, size: int = 40, seed: int = 0) -> Path:
    """`n` RGB images on a grey background with a grass patch (green vertical stripes), a brick
    patch (red blocks with white mortar) and, in 3 of 4 images, a wheel (a black disc); masks are
    label PNGs (mode L, every third one mode P), images PNG except every fourth (JPEG)."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text("index,name,category\n0,background,\n1,grass,material\n2,brick,material\n"
                                     "3,wheel,part\n")  # fmt: skip
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        img = np.full((size, size, 3), 128.0)
        mask = np.zeros((size, size), dtype=np.uint8)

        def rect(h: int, w: int) -> np.ndarray:
            y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w)
            return (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)

        grass = rect(12, 14)
        img[grass] = np.where((xx[grass] // 2 % 2 == 0)[:, None], [90, 230, 90], [150, 255, 150])
        mask[grass] = GRASS
        brick = rect(12, 14)
        mortar = (yy % 6 == 0) | ((xx + 5 * (yy // 6 % 2)) % 10 == 0)
        img[brick] = np.where(mortar[brick][:, None], [255, 255, 255], [220, 110, 90])
        mask[brick] = BRICK
        if i % 4 != 3:
            r = rng.uniform(6, 8)
            cy, cx = rng.uniform(r, size - r, size=2)
            wheel = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            img[wheel] = 20
            mask[wheel] = WHEEL
        img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"img{i:02d}.{'jpg' if i % 4 == 1 else 'png'}", quality=95)
        if i % 3 == 0:
            pal = Image.frombytes("P", (size, size), mask.tobytes())
            pal.putpalette([0, 0, 0, 0, 255, 0, 200, 80, 60, 40, 40, 40] + [0] * 756)
            pal.save(root / "masks" / f"img{i:02d}.png")
        else:
            Image.fromarray(mask, mode="L").save(root / "masks" / f"img{i:02d}.png")
    return root


def _planted() -> nn.Module:
    namespace: dict[str, object] = {}
    exec(NET, namespace)
    model = namespace["make"]()
    assert isinstance(model, nn.Module)
    return model.eval()


def test_concept_dir_loads_into_a_concept_set(tmp_path: Path) -> None:
    root = write_concept_dir(tmp_path / "concepts")
    cs = load_concept_dir(root, (3, 32, 32))
    assert len(cs) == 12 and cs.images.shape == (12, 3, 32, 32) and len(cs.planes) == 1
    assert cs.concepts == ["grass", "brick", "wheel"]
    assert [cs.category_of(c) for c in range(3)] == ["material", "material", "part"]
    assert cs.kinds == ["concept-dir"] * 12 and cs.identity.startswith("concept-dir:") and not cs.warnings
    plane = cs.planes[0]
    assert set(plane.unique().tolist()) == {-1, 0, 1, 2}
    wheel_images = [i for i in range(12) if bool(cs.concept_mask(2, i).any())]
    assert wheel_images == [i for i in range(12) if i % 4 != 3]
    # nearest-neighbour masks: the resized wheel pixels are dark in the bilinear-resized image
    dark = cs.images.mean(1) < 0.3
    assert float((dark & (plane == 2)).sum()) / float((plane == 2).sum()) > 0.8
    # one channel: grayscale, same masks
    gray = load_concept_dir(root, (1, 28, 28))
    assert gray.images.shape == (12, 1, 28, 28) and gray.planes[0].shape == (12, 28, 28)
    assert gray.concepts == cs.concepts


def test_planted_units_are_found_as_detectors(tmp_path: Path) -> None:
    """Unit 0 of the first conv responds to dark pixels: the wheel's detector, IoU near 1 at a top
    quantile equal to the wheel's pixel share; unit 1 (greenness) is grass's."""
    cs = load_concept_dir(write_concept_dir(tmp_path / "concepts"), (3, 32, 32))
    share = float(cs.areas()[2]) / cs.planes[0].numel()
    res = dissect(_planted(), cs, ["conv"], quantile=share, permutations=20)
    wheel, grass = res.unit("conv", 0), res.unit("conv", 1)
    assert wheel.concept == "wheel" and wheel.label == "wheel" and wheel.detector
    assert wheel.iou > 0.8 and wheel.iou > wheel.null_iou
    assert wheel.category == "part"
    assert grass.concept == "grass" and grass.iou > 0.3


def test_concepts_command_with_a_concept_dir(tmp_path: Path, cli: Cli) -> None:
    from test_training_user import write_cifar

    root = write_concept_dir(tmp_path / "concepts")
    cs = load_concept_dir(root, (3, 32, 32))
    share = float(cs.areas()[2]) / cs.planes[0].numel()
    (tmp_path / "net.py").write_text(NET)
    data = write_cifar(tmp_path / "cifar", per_batch=20, n_test=30)
    run = tmp_path / "run"
    code, _out, err = cli(["concepts", "--model", f"{tmp_path / 'net.py'}:make", "--data", "cifar10", "--data-dir",
                           str(data), "--concept-dir", str(root), "--no-join", "--permutations", "20", "--quantile",
                           f"{share:.4f}", "--n", "20", "--out", str(run)])  # fmt: skip
    assert code == 0, err
    with (run / "tables" / "concept_units.csv").open() as f:
        units = {(u["layer"], int(u["unit"])): u for u in csv.DictReader(f)}
    wheel = units[("conv", 0)]
    assert wheel["concept"] == "wheel" and wheel["detector"] == "True" and float(wheel["iou"]) > 0.8
    results = json.loads((run / "results.json").read_text())
    entry = results["stages"]["concepts"]
    assert entry["summary"]["concept images"] == 12 and entry["summary"]["concepts"] == 3
    assert "user-provided (concept directory)" in (run / "report.html").read_text()


def _expect(root: Path, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        load_concept_dir(root, (3, 32, 32))
    assert "\n" not in str(info.value)


def test_concept_dir_refusals(tmp_path: Path, cli: Cli) -> None:
    root = write_concept_dir(tmp_path / "c", n=4)
    (root / "masks" / "img02.png").unlink()
    _expect(root, r"images/img02.png has no mask masks/img02.png")
    code, _out, err = cli(["concepts", "--concept-dir", str(root), "--out", str(tmp_path / "run")])
    assert code == 2 and "has no mask" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()

    root = write_concept_dir(tmp_path / "d", n=4)
    Image.fromarray(np.full((40, 40), 7, dtype=np.uint8)).save(root / "masks" / "img01.png")
    _expect(root, r"masks/img01.png holds label 7, which labels.csv does not list")

    root = write_concept_dir(tmp_path / "e", n=4)
    (root / "images" / "img00.png").write_bytes(b"not a png")
    _expect(root, r"cannot read images/img00.png")

    root = write_concept_dir(tmp_path / "f", n=4)
    Image.fromarray(np.tile(np.array([1, 2, 3], dtype=np.uint8), (40, 40, 1))).save(root / "masks" / "img00.png")
    _expect(root, r"is a RGB image; a mask is a one-channel label PNG")

    root = write_concept_dir(tmp_path / "g", n=4)
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(root / "masks" / "img03.png")
    _expect(root, r"masks/img03.png is 20x20 but images/img03.png is 40x40")

    (root / "labels.csv").unlink()
    _expect(root, "labels.txt or labels.csv is missing")
    _expect(tmp_path / "nothing", "does not exist")


def test_label_lists(tmp_path: Path) -> None:
    txt = tmp_path / "labels.txt"
    txt.write_text("# index name category\n0 background\n1 grass material\n2 brick\n\n3, wheel, Part\n")
    assert read_label_list(txt) == {1: ("grass", "material"), 2: ("brick", "object"), 3: ("wheel", "part")}
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("1,grass\n2,car wheel,part\n")
    assert read_label_list(csv_file) == {1: ("grass", "object"), 2: ("car wheel", "part")}
    for text, match in (("1 grass\n1 brick\n", "listed twice"), ("1 grass\n2 grass\n", "listed twice"),
                        ("x grass\n", "is not 'INDEX, NAME"), ("0 background\n", "lists no concept")):  # fmt: skip
        txt.write_text(text)
        with pytest.raises(UserError, match=match):
            read_label_list(txt)


def test_void_and_listed_absent_labels(tmp_path: Path) -> None:
    """255 (Pascal VOC's void) is unlabelled unless listed; a listed label in no mask is a warning."""
    root = write_concept_dir(tmp_path / "c", n=4)
    mask = np.asarray(Image.open(root / "masks" / "img01.png")).copy()
    mask[:2] = 255
    Image.fromarray(mask, mode="L").save(root / "masks" / "img01.png")
    (root / "labels.csv").write_text("index,name,category\n1,grass,material\n2,brick,material\n3,wheel,part\n"
                                     "4,sky,object\n")  # fmt: skip
    cs = load_concept_dir(root, (3, 40, 40))
    assert cs.concepts == ["grass", "brick", "wheel"] and "sky" in cs.warnings[0]
    assert bool((cs.planes[0][1, :2] == -1).all())
    assert torch.equal(cs.planes[0][1, 2:], torch.from_numpy(mask[2:].astype(np.int64)) - 1)
