"""The unit explorer (units.html): its table equals the stages' outputs, every string is escaped,
masks and images are what the model computes, and the page works in headless Chromium."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from robustdissect.analysis.concepts import ConceptDissection, UnitConcept
from robustdissect.analysis.features import FeatureOptions, score_features
from robustdissect.attacks import PGD
from robustdissect.config import RunConfig
from robustdissect.pipeline import run_pipeline
from robustdissect.report.explorer import (
    attach_images,
    build_atlas,
    explorer_rows,
    map_thresholds,
    mask_png,
    png_uri,
    render_explorer,
    top_images,
    unit_images,
)
from robustdissect.runs import read_table

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HOSTILE = "<b>x</b>"
HOSTILE_MODEL = "</script><script>alert(1)</script>"


def page_data(html: str) -> dict[str, Any]:
    m = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', html, re.S)
    assert m is not None
    data: dict[str, Any] = json.loads(m.group(1))
    return data


def table_number(v: str) -> float | None:
    """A CSV cell as the explorer holds it: blank and nan are None."""
    f = float(v) if v not in ("", "nan") else math.nan
    return f if math.isfinite(f) else None


# ---------------------------------------------------------------------------------------------
# a tiny model whose one layer has a name that is HTML


class HostileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.add_module(HOSTILE, nn.Conv2d(1, 4, 3, padding=1))
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(getattr(self, HOSTILE)(x)))


@pytest.fixture(scope="module")
def hostile() -> dict[str, Any]:
    torch.manual_seed(0)
    model = HostileNet().eval()
    x, y = torch.rand(30, 1, 8, 8), torch.arange(30) % 3
    opts = FeatureOptions(reference_n=40, feature_steps=2, restarts=1, candidates_per_bin=1, permutations=5,
                          bootstrap=0, depth_bins=1, batch_size=16)  # fmt: skip
    scores = score_features(model, x, y, torch.rand(40, 1, 8, 8), [HOSTILE], opts, num_classes=3, model_name="m")
    x_adv = PGD(0.1, steps=5, seed=0)(model, x, y).x_adv
    return {"model": model, "x": x, "y": y, "x_adv": x_adv, "scores": scores}


def _dissection(units: list[int]) -> ConceptDissection:
    def unit(k: int) -> UnitConcept:
        label = "<i>stripes</i>" if k == 0 else None
        return UnitConcept(HOSTILE, k, label, "texture" if label else None, "<i>stripes</i>", "texture",
                           0.123456789, 0.02, 0.01, 0.06, 1.0, 0.0, label is not None)  # fmt: skip

    return ConceptDissection(["<i>stripes</i>"], ["texture"], [0], {}, [unit(k) for k in units], {})


def test_rows_equal_the_scores_with_blanks_where_no_stage_covers_a_unit(hostile: dict[str, Any]) -> None:
    scores = hostile["scores"]
    rows = explorer_rows(scores, _dissection([0, 1]), {(HOSTILE, 0): 0.25, ("other", 1): 9.0}, ["a", "b", "c"])
    assert len(rows) == sum(scores.channels) == 4
    for row, ref in zip(rows, scores.rows(), strict=True):
        assert (row["layer"], row["unit"], row["quadrant"]) == (HOSTILE, ref["unit"], ref["quadrant"])
        assert row["class"] == "abc"[ref["class"]]
        for key in ("rho", "gamma", "r", "s"):
            want = float(f"{ref[key]:.6g}") if math.isfinite(ref[key]) else None
            assert row[key] == want
    assert rows[0]["sigma"] == 0.25 and all(r["sigma"] is None for r in rows[1:])  # σ only where analysed
    assert rows[0]["concept"] == "<i>stripes</i>" and rows[0]["detector"] is True and rows[0]["iou"] == 0.123457
    assert rows[1]["detector"] is False and rows[1]["concept"] == "<i>stripes</i>"
    assert all(r["concept"] is None and r["iou"] is None and r["category"] is None for r in rows[2:])
    assert all(r["concept"] is None for r in explorer_rows(scores, None))  # no concepts stage


def test_masks_and_responses_come_from_the_model(hostile: dict[str, Any]) -> None:
    model, x, x_adv, scores = hostile["model"], hostile["x"], hostile["x_adv"], hostile["scores"]
    top = top_images(scores.f_clean, 3)
    assert top.shape == (4, 3)
    for u in range(4):  # highest clean response first
        f = scores.f_clean[:, u]
        assert torch.equal(f[top[u]], f.sort(descending=True).values[:3])
    thr = map_thresholds(model, [HOSTILE], x, quantile=0.05)
    with torch.no_grad():
        maps = getattr(model, HOSTILE)(x)  # (N, 4, 8, 8)
        maps_adv = getattr(model, HOSTILE)(x_adv)
    exact = torch.quantile(maps.transpose(0, 1).reshape(4, -1).double(), 0.95, dim=1)
    assert torch.allclose(thr, exact, atol=float((maps.amax() - maps.amin()) / 2048 * 2))
    images = unit_images(model, [HOSTILE], x, x_adv, top, thr, batch_size=7)
    a = scores.f_clean * scores.reference.sd + scores.reference.mu  # the features' responses
    for u in range(4):
        assert torch.allclose(images.response[u], a[top[u], u].double(), atol=1e-5)
        assert torch.equal(images.masks[u], maps[top[u], u] > thr[u].float())  # 8x8 maps: no upsampling
        assert torch.equal(images.masks_adv[u], maps_adv[top[u], u] > thr[u].float())
        assert torch.equal(images.pred_adv[u], model(x_adv[top[u]]).argmax(1))
    from PIL import Image

    strip = Image.open(io.BytesIO(mask_png(images.masks[0], images.masks_adv[0])))
    assert strip.size == (3 * 8, 2 * 8) and strip.mode == "P"
    px = torch.from_numpy(np.asarray(strip).copy())
    assert torch.equal(px[:8, 8:16].bool(), images.masks[0, 1])  # clean row, second image
    assert torch.equal(px[8:, :8].bool(), images.masks_adv[0, 0])  # attacked row, first image
    atlas = build_atlas(x, x_adv, images, (8, 8), hostile["y"].tolist())
    m = len(atlas["positions"])
    assert atlas["positions"] == torch.unique(top).tolist() and atlas["grid"][0] * atlas["grid"][1] >= 2 * m


def test_page_escapes_every_string(hostile: dict[str, Any], tmp_path: Path) -> None:
    page = _hostile_page(hostile)
    assert HOSTILE not in page and "<i>" not in page and HOSTILE_MODEL not in page
    assert page.count("</script>") == 2  # the data block and the script, nothing a string closed
    data = page_data(page)
    assert [u["layer"] for u in data["units"]] == [HOSTILE] * 4 and data["model"] == HOSTILE_MODEL
    assert data["units"][0]["concept"] == "<i>stripes</i>" and data["classes"][0] == "<i>a</i>"
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the title, escaped by Jinja2


def _hostile_page(hostile: dict[str, Any]) -> str:
    model, x, x_adv, scores = hostile["model"], hostile["x"], hostile["x_adv"], hostile["scores"]
    top = top_images(scores.f_clean, 3)
    thr = map_thresholds(model, [HOSTILE], x, quantile=0.05)
    images = unit_images(model, [HOSTILE], x, x_adv, top, thr)
    rows = explorer_rows(scores, _dissection([0, 1]), {(HOSTILE, 0): 0.25}, ["<i>a</i>", "b", "c"])
    atlas = build_atlas(x, x_adv, images, (8, 8), hostile["y"].tolist())
    strips = [png_uri(mask_png(images.masks[i], images.masks_adv[i])) for i in range(len(rows))]
    units = attach_images(rows, images, strips, atlas["positions"], scores.f_clean, scores.f_adv)
    meta = {"model": HOSTILE_MODEL, "dataset": "<u>d</u>", "classes": ["<i>a</i>", "b", "c"], "layers": [HOSTILE],
            "quadrants": {"RU": "robust & useful", "NRU": "non-robust & useful (dangerous)", "RL": "r", "NL": "n"},
            "threshold": "<em>T</em>", "attack": "PGD", "scale": 4, "images": 30, "top_images": 3,
            "text": "<script>alert(2)</script>", "caption": "c", "atlas": atlas}  # fmt: skip
    return render_explorer(units, meta)


# ---------------------------------------------------------------------------------------------
# the stage in a run: features, concepts, sensitivity (σ), explorer on Fashion-MNIST

FEATURES = {"n": 80, "reference_n": 300, "feature_steps": 3, "restarts": 1, "candidates_per_bin": 1,
            "permutations": 20, "bootstrap": 0, "compare": []}  # fmt: skip
STAGES = {
    "sensitivity": {"n": 60, "experiments": ["profiles"], "compare": []},
    "features": FEATURES,
    "concepts": {"n": 200, "permutations": 20, "compare": [], "figure_concepts": 0, "gradcam_images": 0},
    "explorer": {},
}


@pytest.fixture(scope="module")
def explorer_run(tmp_path_factory: pytest.TempPathFactory, fmnist: Any) -> Iterator[Path]:
    run = run_pipeline(RunConfig(n=100, quick=False, stages=STAGES), tmp_path_factory.mktemp("explorer") / "run")
    yield run


def test_table_equals_the_stage_outputs(explorer_run: Path) -> None:
    run = explorer_run
    results = json.loads((run / "results.json").read_text())
    entry = results["stages"]["explorer"]
    assert entry["warnings"] == [] and entry["pages"][0]["file"] == "units.html"
    html = (run / "units.html").read_text()
    data = page_data(html)
    units = data["units"]
    features = read_table(run / "tables" / "feature_units.csv")
    assert len(units) == results["stages"]["features"]["summary"]["units"] == len(features) == 224
    assert entry["summary"]["units"] == 224 and entry["bytes"] == len(html.encode())
    concepts = {(r["layer"], int(r["unit"])): r for r in read_table(run / "tables" / "concept_units.csv")}
    sigma = {(r["layer"], int(r["neuron"])): r for r in read_table(run / "tables" / "sigma.csv")}
    classes = results["dataset"]["classes"]
    for u, f in zip(units, features, strict=True):
        assert (u["layer"], u["unit"]) == (f["layer"], int(f["unit"]))
        assert u["quadrant"] == f["quadrant"] and u["strict_quadrant"] == f["strict_quadrant"]
        assert u["class"] == classes[int(f["class"])]
        for key in ("rho", "gamma", "r", "s"):
            assert u[key] == table_number(f[key]), (u["id"], key)
        c = concepts[(u["layer"], u["unit"])]
        assert (u["concept"], u["category"]) == (c["concept"], c["concept_category"])
        assert u["iou"] == table_number(c["iou"]) and u["detector"] == (c["detector"] == "True")
        assert u["threshold"] == table_number(c["threshold"])  # masks cut at the dissection's T_k
        assert u["sigma"] == table_number(sigma[(u["layer"], u["unit"])]["sigma"])
        top = u["top"]
        assert len(top["cell"]) == 5 and u["strip"].startswith("data:image/png;base64,")
        assert top["f"] == sorted(top["f"], reverse=True)  # top images by clean response
    # the page reuses the stages' evidence: one feature scoring, one dissection, no other thresholds
    ev = results["evidence"]
    assert ev["misses"]["features"] == 1 and ev["hits"]["features"] >= 2
    assert ev["misses"]["concepts"] == 1 and ev["hits"]["concepts"] >= 1
    assert "unit_thresholds" not in ev["misses"]
    report = (run / "report.html").read_text()
    assert 'href="units.html"' in report and "<script" not in report.lower()


def test_without_concepts_blank_columns_and_without_features_no_page(tmp_path: Path, fmnist: Any) -> None:
    run = run_pipeline(RunConfig(n=100, quick=False, stages={"features": FEATURES, "explorer": {}}), tmp_path / "a")
    data = page_data((run / "units.html").read_text())
    assert len(data["units"]) == 224
    assert all(u["concept"] is None and u["iou"] is None and u["sigma"] is None for u in data["units"])
    assert all(u["threshold"] is not None for u in data["units"]) and "analysed clean images" in data["threshold"]
    assert 'href="units.html"' in (run / "report.html").read_text()

    bare = run_pipeline(RunConfig(n=50, quick=False, stages={"overview": {}, "explorer": {}}), tmp_path / "b")
    entry = json.loads((bare / "results.json").read_text())["stages"]["explorer"]
    assert "no features stage" in entry["warnings"][0] and "pages" not in entry
    assert not (bare / "units.html").exists() and "units.html" not in (bare / "report.html").read_text()


# ---------------------------------------------------------------------------------------------
# headless Chromium


def _browser(p: Any) -> Any:
    return p.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run"],
    )  # fmt: skip


@pytest.mark.browser
def test_explorer_filters_sorts_and_shows_images_in_chromium(
    explorer_run: Path, hostile: dict[str, Any], tmp_path: Path
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed; run `bash scripts/setup.sh --dev`")
    from playwright.sync_api import sync_playwright

    hostile_page = tmp_path / "hostile.html"
    hostile_page.write_text(_hostile_page(hostile))
    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: errors.append(f"request {r.url[:60]}") if not r.url.startswith(
                ("file:", "data:")) else None)  # fmt: skip

            page.goto((explorer_run / "report.html").as_uri())  # the report links the page
            page.click("p.page-link a")
            page.wait_for_load_state("load")
            assert page.url.endswith("/units.html")
            visible = "#units-body tr:not([hidden])"
            assert page.locator(visible).count() == 224

            page.select_option("#f-quadrant", "NRU")  # the dangerous quadrant
            quads = page.locator(f"{visible} td[data-key=quadrant]").all_inner_texts()
            total = json.loads(page.evaluate("document.getElementById('explorer-data').textContent"))["units"]
            assert 0 < len(quads) == sum(u["quadrant"] == "NRU" for u in total) < 224
            assert set(quads) == {"NRU"}
            assert page.inner_text("#count").startswith(f"{len(quads)} of 224")

            page.click("th[data-key=rho] button")  # numeric sort, ascending then descending
            rho = [float(v) for v in page.locator(f"{visible} td[data-key=rho]").all_inner_texts()]
            assert rho == sorted(rho) and page.get_attribute("th[data-key=rho]", "aria-sort") == "ascending"
            page.click("th[data-key=rho] button")
            rho = [float(v) for v in page.locator(f"{visible} td[data-key=rho]").all_inner_texts()]
            assert rho == sorted(rho, reverse=True) and rho[0] > rho[-1]
            page.click("th[data-key=unit] button")  # integers sort as numbers, not as text
            unit = [int(v) for v in page.locator(f"{visible} td[data-key=unit]").all_inner_texts()]
            assert unit == sorted(unit) and max(unit) >= 10

            first = page.locator(visible).first
            layer = first.locator("td[data-key=layer]").inner_text()
            unit0 = first.locator("td[data-key=unit]").inner_text()
            first.click()
            page.wait_for_function(
                "document.querySelectorAll('#detail img').length > 0 && "
                "Array.from(document.querySelectorAll('#detail img')).every(i => i.complete)"
            )
            assert f"{layer} : unit {unit0}" in page.inner_text("#detail h2")
            for row in ("clean", "adversarial"):
                assert page.locator(f"#detail .strip-row.{row} figure").count() == 5
            loaded = page.evaluate(
                "Array.from(document.querySelectorAll('#detail img')).map(i => i.complete && i.naturalWidth > 0)"
            )
            assert len(loaded) == 2 * 2 * 5 and all(loaded)  # image and mask per cell
            assert page.locator("#detail figcaption").first.inner_text().startswith("f = ")

            page.fill("#f-concept", "zzz-no-such-concept")  # the concept filter
            assert page.locator(visible).count() == 0
            page.fill("#f-concept", "")
            page.select_option("#f-layer", "conv1")
            page.select_option("#f-quadrant", "")
            layers = page.locator(f"{visible} td[data-key=layer]").all_inner_texts()
            assert len(layers) == 16 and set(layers) == {"conv1"}

            # a layer, a model and concepts named in HTML stay text
            page.goto(hostile_page.as_uri())
            page.wait_for_load_state("load")
            cells = page.locator("#units-body td[data-key=layer]").all_inner_texts()
            assert cells == [HOSTILE] * 4
            assert page.evaluate("document.querySelectorAll('#units b, #units i, #detail b').length") == 0
            assert page.evaluate("document.scripts.length") == 2
            page.locator("#units-body tr").first.click()
            assert HOSTILE in page.inner_text("#detail h2")
            page.wait_for_function("Array.from(document.querySelectorAll('#detail img')).every(i => i.complete)")
            assert page.evaluate(
                "Array.from(document.querySelectorAll('#detail img')).every(i => i.naturalWidth > 0)"
            )
        finally:
            browser.close()
    assert errors == []
