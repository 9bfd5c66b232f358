"""The shipped robust checkpoints: each card matches the committed config that retrains it, and the
models are robust on a seeded 500-image test subset (full-test-set numbers are in the cards)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from robustdissect.attacks import make_attack
from robustdissect.data import Dataset
from robustdissect.evaluation import wilson_interval
from robustdissect.models import load_checkpoint, shipped_checkpoints
from robustdissect.resources import read_train_config, train_presets

# The committed presets, in the checkout (the package reads the same files as resources).
CONFIGS = Path(__file__).resolve().parents[1] / "src" / "robustdissect" / "configs" / "train"
ROBUST = ["fmnist-smallcnn-pat", "fmnist-smallcnn-avg-pat", "fmnist-smallcnn-sns"]


def test_every_shipped_checkpoint_has_its_config() -> None:
    names = shipped_checkpoints()
    assert set(ROBUST) <= set(names)
    assert set(names) <= set(train_presets())
    for name in names:
        _model, card = load_checkpoint(name)
        config = CONFIGS / f"{name}.yaml"
        assert config.is_file(), name
        assert card["retrain"] == f"robustdissect train --config {name} --out runs/train-{name}"
        cfg = yaml.safe_load(config.read_text())
        assert read_train_config(name) == cfg, name
        # Every setting of the committed config is the one the checkpoint was trained with.
        stale = {k: card["train_config"].get(k) for k in cfg if card["train_config"].get(k) != cfg[k]}
        assert stale == {}, (name, stale)
        assert card["objective"]["name"] == cfg.get("objective", "vanilla"), name


@pytest.mark.parametrize("name", ROBUST)
def test_shipped_robust_models_resist_pgd(name: str, fmnist: Dataset) -> None:
    model, card = load_checkpoint(name)
    test = fmnist.test.subset(500)
    pgd = make_attack("pgd-linf", eps=0.1, steps=20, step_rule="madry", seed=0)
    with torch.no_grad():
        clean = int((model(test.x).argmax(1) == test.y).sum())
    robust = int(pgd(model.eval(), test.x, test.y).correct.sum())
    # The full-test-set accuracy of the card must lie in the 500-image interval (a stale card fails).
    lo, hi = wilson_interval(clean, 500)
    assert lo - 0.01 <= card["test_accuracy"] <= hi + 0.01, (name, clean / 500, card["test_accuracy"])
    assert clean / 500 >= 0.85, (name, clean)
    # Vanilla reaches 0% here; adversarially trained models keep most of their accuracy.
    assert robust / 500 >= 0.70, (name, robust)
