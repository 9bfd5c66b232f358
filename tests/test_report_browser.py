"""Open report.html in real headless Chromium: no console errors, every image loads, not blank."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from robustdissect.config import RunConfig
from robustdissect.pipeline import run_pipeline

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.browser
def test_report_opens_cleanly_in_chromium(tmp_path: Path, fmnist) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed; run `bash scripts/setup.sh --dev`")
    from playwright.sync_api import sync_playwright

    stages = {
        "overview": {},
        "evaluate": {"attacks": ["fgsm", "pgd-linf"], "corruptions": ["gaussian-noise"], "pgd_steps": 5,
                     "eps_sweep": [0.05, 0.1], "steps_sweep": [1, 5], "curve_n": 100},
    }  # fmt: skip
    run = run_pipeline(RunConfig(n=200, stages=stages), tmp_path / "run")
    # a user-supplied string must be escaped, never interpreted
    report = (run / "report.html").read_text()
    assert "<script" not in report.lower()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((run / "report.html").as_uri())
            page.wait_for_load_state("load")
            n_images = page.evaluate("document.images.length")
            all_loaded = page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            shot = page.screenshot(full_page=False)
            # the answers open the page: on the first screen, above every table
            answers = page.inner_text("#findings")
            first_li = page.evaluate("document.querySelector('#findings li').getBoundingClientRect().bottom")
            first_table = page.evaluate("document.querySelector('table').getBoundingClientRect().top")
        finally:
            browser.close()
    assert errors == []
    assert n_images >= 3 and all_loaded
    import io

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=np.float32)
    assert pixels.std() > 10.0  # not a blank page
    assert "Model card" in report and "Confusion matrix" in report
    assert answers.startswith("What this run found")
    assert "Clean accuracy of fmnist-smallcnn-vanilla" in answers and "Worst-case robust accuracy under L∞" in answers
    assert first_li < 900 and first_li < first_table
